//! The host side of the WIT imports: read-only views of the model, the run's
//! context, bounded logging, and the capability interfaces.
//!
//! Every function returns an error or traps; none panics. Sizes the guest can
//! influence (read length, metadata values, live handles, log volume) are capped.

use std::sync::Arc;

use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Result, format_err};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::airlock::stage::{artifact, context, inference, log, sidecars, types};
use super::{Limits, RunContext};
use crate::artifact::{Dtype, Format, MetaValue, Model, ModelFile};

/// The `model` resource: the one model of this run.
pub struct ModelHandle;

/// The `file` resource: an index into the model's files.
#[derive(Clone, Copy)]
pub struct FileHandle(usize);

/// Most live handles a guest may hold at once (it gets a new one per `files()` entry).
const MAX_HANDLES: usize = 100_000;

/// Per-store state. A new one for every (plugin, model) pair.
pub struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub model: Arc<Model>,
    pub ctx: Arc<RunContext>,
    pub limits: Limits,
    /// Set when the limiter refused a memory or table growth: that refusal,
    /// not the trap it causes, is the cause to report.
    pub limit_hit: bool,
    pub log: Vec<String>,
    log_bytes: usize,
    log_dropped: usize,
    handles: usize,
    /// The run's wall-clock deadline: host calls that block (inference) stop there.
    deadline: std::time::Instant,
    /// The inference backend, started on the first `generate` (or why it could not start).
    inference: Option<Result<crate::inference::Session, String>>,
    /// Bytes handed out by `file.read` so far, and how many this run may have.
    read_total: u64,
    read_budget: u64,
}

impl HostState {
    pub fn new(
        wasi: WasiCtx,
        model: Arc<Model>,
        ctx: Arc<RunContext>,
        limits: Limits,
        deadline: std::time::Instant,
    ) -> Self {
        HostState {
            wasi,
            table: ResourceTable::new(),
            model,
            ctx,
            limits,
            limit_hit: false,
            log: Vec::new(),
            log_bytes: 0,
            log_dropped: 0,
            handles: 0,
            deadline,
            inference: None,
            read_total: 0,
            read_budget: 0,
        }
        .with_read_budget()
    }

    /// The policy's `max_total_read_mib`, or by default four passes over the
    /// model plus 64 MiB: room for any honest analysis, a stop for a read loop.
    fn with_read_budget(mut self) -> Self {
        let size: u64 = self.model.files.iter().map(|f| f.size()).sum();
        self.read_budget =
            self.limits.max_total_read.unwrap_or_else(|| size.saturating_mul(4).saturating_add(64 << 20));
        self
    }

    /// Ends the inference session, if one was started, and describes it.
    pub fn finish_inference(&mut self) -> Option<serde_json::Value> {
        match self.inference.take()? {
            Ok(session) => Some(session.finish()),
            Err(why) => Some(serde_json::json!({ "failed": why })),
        }
    }

    /// Log lines, with a note if some were dropped.
    pub fn take_log(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.log);
        if self.log_dropped > 0 {
            out.push(format!(
                "[{} more log lines dropped: over the {}-byte cap]",
                self.log_dropped, self.limits.max_log_bytes
            ));
        }
        out
    }

    pub fn model_resource(&mut self) -> Result<Resource<ModelHandle>> {
        self.handles += 1;
        Ok(self.table.push(ModelHandle)?)
    }

    /// `file.read`: the bytes are handed to wasmtime as `Bytes`, so a mapped
    /// file is copied once, straight from the page cache into guest memory.
    pub fn read_shared(
        &mut self,
        f: &Resource<FileHandle>,
        offset: u64,
        len: u32,
    ) -> Result<std::result::Result<bytes::Bytes, String>> {
        let cap = self.limits.max_read_bytes;
        if len > cap {
            return Ok(Err(format!("read of {len} bytes refused: this plugin may read at most {cap} bytes per call")));
        }
        let (index, file) = self.file_and_index(f)?;
        if offset > file.size() {
            return Ok(Err(format!("offset {offset} is past the end of the file ({} bytes)", file.size())));
        }
        // What this read hands out counts against the run's budget; past it the
        // plugin is stopped (a trap), not told, so a read loop cannot go on.
        let n = (len as u64).min(file.size() - offset);
        if self.read_total + n > self.read_budget {
            self.limit_hit = true;
            return Err(format_err!(
                "read limit of {} bytes exceeded (the plugin had read {} bytes and asked for {} more); \
                 raise max_total_read_mib for this plugin if it needs more",
                self.read_budget,
                self.read_total,
                n
            ));
        }
        let file = Arc::clone(file);
        self.read_total += n;
        if let Some(Some(stream)) = self.ctx.streams.get(index) {
            stream.plugin_at(offset);
        }
        Ok(file.read_bytes(offset, len as usize).map_err(|e| format!("read at offset {offset} failed: {e}")))
    }

    fn file(&self, res: &Resource<FileHandle>) -> Result<&Arc<ModelFile>> {
        Ok(self.file_and_index(res)?.1)
    }

    /// The file a handle names, and its index in the model.
    fn file_and_index(&self, res: &Resource<FileHandle>) -> Result<(usize, &Arc<ModelFile>)> {
        let FileHandle(i) = *self.table.get(res)?;
        Ok((i, self.model.files.get(i).ok_or_else(|| format_err!("file handle {i} out of range"))?))
    }

    /// Refuses a value above the per-value cap: the guest cannot make the host
    /// copy unbounded data in one call.
    fn capped<T>(&self, what: &str, bytes: usize, value: T) -> Result<T> {
        if bytes > self.limits.max_value_bytes {
            return Err(format_err!(
                "host refused: {what} is {bytes} bytes, above this plugin's cap of {} bytes per value",
                self.limits.max_value_bytes
            ));
        }
        Ok(value)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        if desired as u64 > self.limits.memory_bytes {
            self.limit_hit = true;
            return Err(format_err!(
                "memory limit of {} MiB exceeded (the plugin tried to grow its memory from {} to {} MiB)",
                self.limits.memory_bytes >> 20,
                current >> 20,
                desired >> 20
            ));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> Result<bool> {
        if desired > super::MAX_TABLE_ELEMENTS {
            self.limit_hit = true;
            return Err(format_err!("table limit of {} elements exceeded", super::MAX_TABLE_ELEMENTS));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        super::MAX_INSTANCES
    }
    fn tables(&self) -> usize {
        super::MAX_TABLES
    }
    fn memories(&self) -> usize {
        super::MAX_MEMORIES
    }
}

impl types::Host for HostState {}

fn format_to_wit(f: Format) -> artifact::Format {
    use artifact::Format as W;
    match f {
        Format::Gguf => W::Gguf,
        Format::Safetensors => W::Safetensors,
        Format::Pickle => W::Pickle,
        Format::PytorchZip => W::PytorchZip,
        Format::Zip => W::Zip,
        Format::Numpy => W::Numpy,
        Format::Onnx => W::Onnx,
        Format::Json => W::Json,
        Format::Text => W::Text,
        Format::Unknown => W::Unknown,
    }
}

fn dtype_to_wit(d: Dtype) -> artifact::Dtype {
    use artifact::Dtype as W;
    match d {
        Dtype::F64 => W::F64,
        Dtype::F32 => W::F32,
        Dtype::F16 => W::F16,
        Dtype::Bf16 => W::Bf16,
        Dtype::I64 => W::I64,
        Dtype::I32 => W::I32,
        Dtype::I16 => W::I16,
        Dtype::I8 => W::I8,
        Dtype::U64 => W::U64,
        Dtype::U32 => W::U32,
        Dtype::U16 => W::U16,
        Dtype::U8 => W::U8,
        Dtype::Boolean => W::Boolean,
        Dtype::F8e4m3 => W::F8e4m3,
        Dtype::F8e5m2 => W::F8e5m2,
        Dtype::Q40 => W::Q40,
        Dtype::Q41 => W::Q41,
        Dtype::Q50 => W::Q50,
        Dtype::Q51 => W::Q51,
        Dtype::Q80 => W::Q80,
        Dtype::Q81 => W::Q81,
        Dtype::Q2k => W::Q2k,
        Dtype::Q3k => W::Q3k,
        Dtype::Q4k => W::Q4k,
        Dtype::Q5k => W::Q5k,
        Dtype::Q6k => W::Q6k,
        Dtype::Q8k => W::Q8k,
        Dtype::Iq2xxs => W::Iq2xxs,
        Dtype::Iq2xs => W::Iq2xs,
        Dtype::Iq3xxs => W::Iq3xxs,
        Dtype::Iq1s => W::Iq1s,
        Dtype::Iq4nl => W::Iq4nl,
        Dtype::Iq3s => W::Iq3s,
        Dtype::Iq2s => W::Iq2s,
        Dtype::Iq4xs => W::Iq4xs,
        Dtype::Iq1m => W::Iq1m,
        Dtype::Tq10 => W::Tq10,
        Dtype::Tq20 => W::Tq20,
        Dtype::Mxfp4 => W::Mxfp4,
        Dtype::Other => W::Other,
    }
}

/// The value and roughly how many bytes it makes the host copy.
fn meta_to_wit(v: &MetaValue) -> (artifact::MetaValue, usize) {
    use artifact::MetaValue as W;
    match v {
        MetaValue::Text(s) => (W::Text(s.clone()), s.len()),
        MetaValue::Int(i) => (W::Int(*i), 8),
        MetaValue::Uint(u) => (W::Uint(*u), 8),
        MetaValue::Float(f) => (W::Float(*f), 8),
        MetaValue::Bool(b) => (W::Boolean(*b), 1),
        MetaValue::Texts(v) => (W::Texts(v.iter().map(String::from).collect()), v.joined().len() + 8 * v.len()),
        MetaValue::Ints(v) => (W::Ints(v.clone()), v.len() * 8),
        MetaValue::Uints(v) => (W::Uints(v.clone()), v.len() * 8),
        MetaValue::Floats(v) => (W::Floats(v.clone()), v.len() * 8),
        MetaValue::Bools(v) => (W::Booleans(v.clone()), v.len()),
    }
}

impl artifact::Host for HostState {}

impl artifact::HostFile for HostState {
    fn path(&mut self, f: Resource<FileHandle>) -> Result<String> {
        Ok(self.file(&f)?.rel_path.clone())
    }

    fn size(&mut self, f: Resource<FileHandle>) -> Result<u64> {
        Ok(self.file(&f)?.size())
    }

    fn format(&mut self, f: Resource<FileHandle>) -> Result<artifact::Format> {
        Ok(format_to_wit(self.file(&f)?.format))
    }

    fn parse_error(&mut self, f: Resource<FileHandle>) -> Result<Option<artifact::ParseError>> {
        Ok(self.file(&f)?.parse_error().map(|e| artifact::ParseError {
            offset: e.offset,
            field: e.field.clone(),
            message: e.message.clone(),
        }))
    }

    fn read(&mut self, f: Resource<FileHandle>, offset: u64, len: u32) -> Result<std::result::Result<Vec<u8>, String>> {
        // Shadowed in the linker by `read_shared` (see Runtime::new); kept so the bindings stay whole.
        Ok(self.read_shared(&f, offset, len)?.map(|b| b.to_vec()))
    }

    fn tensors(&mut self, f: Resource<FileHandle>) -> Result<Vec<artifact::TensorInfo>> {
        let file = self.file(&f)?;
        let Some(h) = file.parsed() else { return Ok(Vec::new()) };
        let bytes: usize = h.tensors.iter().map(|t| t.name.len() + t.dtype_name.len() + 8 * t.shape.len() + 40).sum();
        let list = h
            .tensors
            .iter()
            .map(|t| artifact::TensorInfo {
                name: t.name.clone(),
                dtype: dtype_to_wit(t.dtype),
                dtype_name: t.dtype_name.clone(),
                shape: t.shape.clone(),
                offset: t.offset,
                length: t.length,
            })
            .collect();
        self.capped("the tensor table", bytes, list)
    }

    fn alignment(&mut self, f: Resource<FileHandle>) -> Result<Option<u64>> {
        Ok(self.file(&f)?.parsed().and_then(|h| h.alignment))
    }

    fn data_offset(&mut self, f: Resource<FileHandle>) -> Result<Option<u64>> {
        Ok(self.file(&f)?.parsed().and_then(|h| h.data_offset))
    }

    fn metadata_keys(&mut self, f: Resource<FileHandle>) -> Result<Vec<String>> {
        let file = self.file(&f)?;
        let keys: Vec<String> =
            file.parsed().map(|h| h.metadata.iter().map(|(k, _)| k.clone()).collect()).unwrap_or_default();
        let bytes = keys.iter().map(|k| k.len() + 8).sum();
        self.capped("the metadata key list", bytes, keys)
    }

    fn metadata(&mut self, f: Resource<FileHandle>, key: String) -> Result<Option<artifact::MetaValue>> {
        let file = self.file(&f)?;
        let Some(v) = file.parsed().and_then(|h| h.metadata.iter().find(|(k, _)| *k == key)).map(|(_, v)| v) else {
            return Ok(None);
        };
        let (value, bytes) = meta_to_wit(v);
        self.capped(&format!("metadata value {key:?}"), bytes, Some(value))
    }

    fn metadata_kind(&mut self, f: Resource<FileHandle>, key: String) -> Result<Option<artifact::MetaKind>> {
        use artifact::MetaKind as K;
        let file = self.file(&f)?;
        Ok(file.parsed().and_then(|h| h.metadata.iter().find(|(k, _)| *k == key)).map(|(_, v)| match v {
            MetaValue::Text(_) => K::Text,
            MetaValue::Int(_) => K::Int,
            MetaValue::Uint(_) => K::Uint,
            MetaValue::Float(_) => K::Float,
            MetaValue::Bool(_) => K::Boolean,
            MetaValue::Texts(_) => K::Texts,
            MetaValue::Ints(_) => K::Ints,
            MetaValue::Uints(_) => K::Uints,
            MetaValue::Floats(_) => K::Floats,
            MetaValue::Bools(_) => K::Booleans,
        }))
    }

    fn metadata_packed_texts(&mut self, f: Resource<FileHandle>, key: String) -> Result<Option<artifact::PackedTexts>> {
        let file = self.file(&f)?;
        let Some(MetaValue::Texts(list)) =
            file.parsed().and_then(|h| h.metadata.iter().find(|(k, _)| *k == key)).map(|(_, v)| v)
        else {
            return Ok(None);
        };
        let total = list.joined().len();
        self.capped(&format!("metadata value {key:?}"), total + 4 * list.len(), ())?;
        let bytes = list.joined().as_bytes().to_vec();
        // `capped` bounds the total far below 4 GiB, so every end fits in a u32.
        let ends = list.ends().iter().map(|&e| e as u32).collect();
        Ok(Some(artifact::PackedTexts { bytes, ends }))
    }

    fn version(&mut self, f: Resource<FileHandle>) -> Result<Option<u32>> {
        Ok(self.file(&f)?.parsed().and_then(|h| h.version))
    }

    fn sha256(&mut self, f: Resource<FileHandle>) -> Result<std::result::Result<String, String>> {
        Ok(self.file(&f)?.sha256())
    }

    fn drop(&mut self, f: Resource<FileHandle>) -> Result<()> {
        self.table.delete(f)?;
        self.handles = self.handles.saturating_sub(1);
        Ok(())
    }
}

impl artifact::HostModel for HostState {
    fn name(&mut self, _m: Resource<ModelHandle>) -> Result<String> {
        Ok(self.model.name.clone())
    }

    fn kind(&mut self, _m: Resource<ModelHandle>) -> Result<String> {
        Ok(self.model.kind.name().to_string())
    }

    fn files(&mut self, _m: Resource<ModelHandle>) -> Result<Vec<Resource<FileHandle>>> {
        let n = self.model.files.len();
        if self.handles + n > MAX_HANDLES {
            return Err(format_err!(
                "host refused: more than {MAX_HANDLES} live file handles (drop the ones you no longer use)"
            ));
        }
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(self.table.push(FileHandle(i))?);
            self.handles += 1;
        }
        Ok(out)
    }

    fn surroundings(&mut self, _m: Resource<ModelHandle>) -> Result<Vec<artifact::Surrounding>> {
        Ok(self
            .model
            .surroundings
            .iter()
            .map(|s| artifact::Surrounding { kind: s.kind.to_string(), path: s.path.clone(), detail: s.detail.clone() })
            .collect())
    }

    fn drop(&mut self, m: Resource<ModelHandle>) -> Result<()> {
        self.table.delete(m)?;
        self.handles = self.handles.saturating_sub(1);
        Ok(())
    }
}

impl context::Host for HostState {
    fn config(&mut self) -> Result<String> {
        Ok(self.ctx.config_json.clone())
    }

    fn origin(&mut self) -> Result<Option<context::RecordedOrigin>> {
        Ok(self
            .ctx
            .origin
            .as_ref()
            .map(|o| context::RecordedOrigin { url: o.url.clone(), source: o.source.name().to_string() }))
    }

    fn pinned_sha256(&mut self) -> Result<Option<String>> {
        Ok(self.ctx.pinned_sha256.clone())
    }

    fn pinned_files(&mut self) -> Result<Vec<(String, String)>> {
        Ok(self.ctx.pinned_files.clone())
    }

    fn read_budget(&mut self) -> Result<u64> {
        Ok(self.read_budget.saturating_sub(self.read_total))
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) -> Result<()> {
        if self.log_bytes + message.len() > self.limits.max_log_bytes {
            self.log_dropped += 1;
            return Ok(());
        }
        self.log_bytes += message.len();
        let level = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        tracing::debug!(target: "airlock::plugin", "{level}: {message}");
        self.log.push(format!("{level}: {message}"));
        Ok(())
    }
}

/// A plugin may ask `sidecar` only for the files that travel with a model;
/// they come from the value read when the model was opened, never from disk.
impl sidecars::Host for HostState {
    fn sidecar(&mut self, suffix: String) -> Result<std::result::Result<Option<Vec<u8>>, String>> {
        if !crate::artifact::SIDECAR_SUFFIXES.contains(&suffix.as_str()) {
            let known = crate::artifact::SIDECAR_SUFFIXES;
            return Ok(Err(format!("sidecar suffix {suffix:?} is not one of {known:?}")));
        }
        Ok(self.model.sidecars.file(&suffix).map(|b| b.map(<[u8]>::to_vec)))
    }
}

impl inference::Host for HostState {
    fn generate(&mut self, prompt: String, opts: inference::Options) -> Result<std::result::Result<String, String>> {
        let Some(cfg) = self.ctx.inference.clone() else {
            return Ok(Err("no inference backend is configured for this plugin".into()));
        };
        let limit = self.limits.max_value_bytes;
        if prompt.len() > limit || opts.system.as_ref().is_some_and(|s| s.len() > limit) {
            return Ok(Err(format!("the prompt is above the host's {limit}-byte cap")));
        }
        if self.inference.is_none() {
            self.inference = Some(crate::inference::Session::start(&cfg, &self.model, self.deadline));
        }
        let deadline = self.deadline;
        let result = match self.inference.as_mut().expect("set above") {
            Ok(session) => {
                let req = crate::inference::Request {
                    prompt: &prompt,
                    system: opts.system.as_deref(),
                    max_tokens: opts.max_tokens,
                    temperature: opts.temperature,
                };
                session.generate(&req, deadline)
            }
            Err(why) => Err(format!("the inference backend could not start: {why}")),
        };
        match result {
            Ok(text) if text.len() > limit => Ok(Err(format!("the answer is above the host's {limit}-byte cap"))),
            other => Ok(other),
        }
    }
}
