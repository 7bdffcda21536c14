//! The plugin runtime: one wasmtime `Engine` (component model, epoch
//! interruption), a compiled-component cache, import checks against grants,
//! and a fresh, limited `Store` for every (plugin, model) pair.

mod cache;
mod compat;
#[doc(hidden)]
pub mod host;
mod pipe;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;

use crate::artifact::Model;
use host::HostState;
use pipe::BoundedPipe;

#[allow(missing_docs)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/stage.wit",
        world: "stage",
        imports: { default: trappable },
        additional_derives: [serde::Serialize, serde::Deserialize],
        with: {
            "airlock:stage/artifact.model": super::host::ModelHandle,
            "airlock:stage/artifact.file": super::host::FileHandle,
        },
    });
}

/// The `split-stage` world: a stage that also exports `split`. Its imports are
/// the `stage` world's, so they map onto `bindings` and are served by the same code.
#[allow(missing_docs)]
mod bindings_split {
    wasmtime::component::bindgen!({
        path: "../wit/stage.wit",
        world: "split-stage",
        imports: { default: trappable },
        with: {
            "airlock:stage/types": super::bindings::airlock::stage::types,
            "airlock:stage/artifact": super::bindings::airlock::stage::artifact,
            "airlock:stage/context": super::bindings::airlock::stage::context,
            "airlock:stage/log": super::bindings::airlock::stage::log,
            "airlock:stage/sidecars": super::bindings::airlock::stage::sidecars,
            "airlock:stage/inference": super::bindings::airlock::stage::inference,
        },
    });
}

/// The 0.1 world, for plugins built against the older minor. 0.2 only added
/// functions, so `host.rs` serves 0.1 by calling the 0.2 functions; its value
/// types are the same shapes under other Rust names, converted through serde.
#[allow(missing_docs)]
pub(crate) mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/archive/0.1.0/stage.wit",
        world: "stage",
        imports: { default: trappable },
        additional_derives: [serde::Serialize, serde::Deserialize],
        with: {
            "airlock:stage/artifact.model": super::host::ModelHandle,
            "airlock:stage/artifact.file": super::host::FileHandle,
        },
    });
}

/// The WIT package, the major.minor this host implements, and the older
/// minors it still serves (newest first).
pub const WIT_PACKAGE: &str = "airlock:stage";
pub const WIT_VERSION: (u64, u64) = (0, 2);
pub const WIT_VERSIONS: [(u64, u64); 2] = [(0, 2), (0, 1)];

const EPOCH_TICK: Duration = Duration::from_millis(10);
const MAX_TABLE_ELEMENTS: usize = 1_000_000;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 8;

/// A capability beyond the baseline imports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// `airlock:stage/sidecars`: read signature files beside the model.
    Sidecars,
    /// `airlock:stage/inference`: run the model.
    Inference,
}

impl Grant {
    pub fn interface(self) -> &'static str {
        match self {
            Grant::Sidecars => "sidecars",
            Grant::Inference => "inference",
        }
    }
}

/// What one plugin run may use.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Bytes of linear memory.
    pub memory_bytes: u64,
    /// Wall-clock time for `run`.
    pub timeout: Duration,
    /// Bytes per `read` call.
    pub max_read_bytes: u32,
    /// Bytes of report (summary, findings, details) accepted.
    pub max_report_bytes: usize,
    /// Bytes of log lines and of stdout/stderr kept.
    pub max_log_bytes: usize,
    /// Bytes of any single value the host copies in (metadata, tensor table).
    pub max_value_bytes: usize,
    /// Bytes `read` may hand out over the whole run; `None`: four times the
    /// model's size plus 64 MiB.
    pub max_total_read: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 << 20,
            timeout: Duration::from_secs(60),
            max_read_bytes: 16 << 20,
            max_report_bytes: 1 << 20,
            max_log_bytes: 64 << 10,
            max_value_bytes: 64 << 20,
            max_total_read: None,
        }
    }
}

/// A recorded origin and where it came from (read with the model's sidecars).
pub use crate::artifact::Origin;

/// What the host tells one plugin about this run.
#[derive(Clone, Debug, Default)]
pub struct RunContext {
    pub config_json: String,
    pub origin: Option<Origin>,
    pub pinned_sha256: Option<String>,
    /// Per-file pins of a folder model: (path, sha256).
    pub pinned_files: Vec<(String, String)>,
    /// The inference backend, for a plugin granted `inference`.
    pub inference: Option<crate::inference::InferenceConfig>,
    /// Per model file: where this run reads, for a run that streams through
    /// the files beside others (the static scan). Dropped with the run.
    pub streams: Arc<Vec<Option<crate::artifact::Stream>>>,
}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Compile(String),
    #[error("import {import:?} refused: {why}")]
    Import { import: String, why: String },
    #[error("cannot link: {0}")]
    Link(String),
}

/// A compiled, import-checked plugin, ready to instantiate.
pub struct Plugin {
    pub sha256: String,
    pub imports: Vec<String>,
    /// What the plugin's `describe()` returned when it was loaded.
    pub info: StageInfo,
    /// The `airlock:stage` minor it was built against, e.g. `0.1`.
    pub wit_version: (u64, u64),
    /// The component's exports, as `name: kind`.
    pub exports: Vec<String>,
    pre: Pre,
    /// Set when the plugin exports `split`: its consent to be run per shard and joined.
    split: Option<bindings_split::SplitStagePre<HostState>>,
}

impl Plugin {
    /// True when the plugin exports `airlock:stage/split`.
    pub fn splits(&self) -> bool {
        self.split.is_some()
    }
}

/// The interface a stage exports to consent to being split.
const SPLIT_EXPORT: &str = "airlock:stage/split@";

/// A pre-instantiated plugin of one of the served minors.
enum Pre {
    V0_2(bindings::StagePre<HostState>),
    V0_1(bindings_v0_1::StagePre<HostState>),
}

type WitReport = bindings::airlock::stage::types::Report;
type WitInfo = bindings::airlock::stage::types::StageInfo;

impl Pre {
    fn describe(&self, store: &mut Store<HostState>) -> wasmtime::Result<WitInfo> {
        match self {
            Pre::V0_2(p) => p.instantiate(&mut *store)?.call_describe(store),
            Pre::V0_1(p) => compat::same_shape(p.instantiate(&mut *store)?.call_describe(store)?),
        }
    }

    fn run(&self, store: &mut Store<HostState>) -> wasmtime::Result<WitReport> {
        match self {
            Pre::V0_2(p) => {
                let inst = p.instantiate(&mut *store)?;
                let handle = store.data_mut().model_resource()?;
                inst.call_run(store, handle)
            }
            Pre::V0_1(p) => {
                let inst = p.instantiate(&mut *store)?;
                let handle = store.data_mut().model_resource()?;
                compat::same_shape(inst.call_run(store, handle)?)
            }
        }
    }
}

/// A plugin's own name, version and description.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageInfo {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// Severity of a finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub rule: String,
    pub severity: Severity,
    pub message: String,
    pub location: Option<String>,
    pub offset: Option<u64>,
    pub confidence: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(String),
    Skip(String),
}

/// What a plugin returned, checked and converted.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub verdict: Verdict,
    pub summary: String,
    pub findings: Vec<Finding>,
    pub score: Option<f32>,
    pub details: Option<serde_json::Value>,
}

/// The outcome of one run: a report, or why there is none (a trap, the
/// deadline, a limit, a refused report). Log and output are kept either way.
pub struct RunOutput {
    pub result: Result<Report, String>,
    pub log: Vec<String>,
    pub output: String,
    pub elapsed: Duration,
    /// What the inference backend did (sandbox, peak memory, speed), if the plugin used it.
    pub inference: Option<serde_json::Value>,
}

/// The engine, the linker and the cache, shared by every run.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    cache: Option<cache::Cache>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine and linker. `cache_dir` holds compiled components.
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Runtime> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // For plugin authors: `AIRLOCK_WASM_PROFILE=perfmap` lets `perf record` name JIT-compiled
        // plugin functions (use a fresh --cache-dir so the plugins are compiled in this process).
        if std::env::var("AIRLOCK_WASM_PROFILE").as_deref() == Ok("perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e:#}"))?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI: {e:#}"))?;
        bindings::Stage::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("linking airlock:stage: {e:#}"))?;
        bindings_v0_1::Stage::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("linking airlock:stage@0.1: {e:#}"))?;
        // `file.read` again, returning `Bytes` instead of the generated `Vec<u8>`: wasmtime
        // lowers `Bytes` straight into guest memory, so a mapped model is copied once per read.
        linker.allow_shadowing(true);
        for (major, minor) in WIT_VERSIONS {
            linker
                .instance(&format!("{WIT_PACKAGE}/artifact@{major}.{minor}.0"))
                .and_then(|mut i| {
                    i.func_wrap(
                        "[method]file.read",
                        |mut store: wasmtime::StoreContextMut<'_, HostState>,
                         (f, offset, len): (wasmtime::component::Resource<host::FileHandle>, u64, u32)| {
                            Ok((store.data_mut().read_shared(&f, offset, len)?,))
                        },
                    )
                })
                .map_err(|e| anyhow::anyhow!("linking file.read: {e:#}"))?;
        }
        linker.allow_shadowing(false);

        // The ticker drives epoch deadlines; it stops when the runtime is dropped.
        let stop_ticker = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.weak();
            let stop = stop_ticker.clone();
            std::thread::Builder::new().name("airlock-epoch".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(e) => e.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        }
        let cache = cache_dir.map(|d| cache::Cache::new(d, &engine));
        Ok(Runtime { engine, linker, cache, stop_ticker })
    }

    /// Compiles (or takes from the cache) a component, checks its imports
    /// against `grants`, and pre-instantiates it.
    pub fn load(&self, bytes: &[u8], grants: &[Grant]) -> Result<Plugin, LoadError> {
        self.load_hashed(bytes, hex::encode(Sha256::digest(bytes)), grants)
    }

    /// [`Runtime::load`] for a caller that has hashed `bytes` already (to check a pin).
    pub fn load_hashed(&self, bytes: &[u8], sha256: String, grants: &[Grant]) -> Result<Plugin, LoadError> {
        if !airlock_wasm_toolchain::is_component(bytes) {
            return Err(LoadError::Compile(
                "not a WebAssembly component (a core module or something else); build it for wasm32-wasip2".into(),
            ));
        }
        let cached = self.cache.as_ref().and_then(|c| c.get(&self.engine, &sha256));
        let component = match cached {
            Some(c) => c,
            None => {
                // `bytes` may be a map of a file someone can still write: compile
                // a private copy, and only if it is still what was hashed.
                let private = bytes.to_vec();
                if hex::encode(Sha256::digest(&private)) != sha256 {
                    return Err(LoadError::Compile("the component changed while it was being read".into()));
                }
                let c = Component::new(&self.engine, &private).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
                if let Some(cache) = &self.cache {
                    cache.put(&sha256, &c);
                }
                c
            }
        };
        let ty = component.component_type();
        // Type imports (the world's `use artifact.{model}`) carry no capability;
        // instances and functions do.
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .filter(|(_, item)| !matches!(item.ty, ComponentItem::Type(_) | ComponentItem::Resource(_)))
            .map(|(name, _)| name.to_string())
            .collect();
        let mut version: Option<(u64, u64)> = None;
        for import in &imports {
            if let Some(v) = check_import(import, grants)? {
                match version {
                    Some(seen) if seen != v => {
                        return Err(LoadError::Import {
                            import: import.clone(),
                            why: format!(
                                "the plugin mixes {WIT_PACKAGE}@{}.{} and @{}.{} imports; build it against one SDK",
                                seen.0, seen.1, v.0, v.1
                            ),
                        });
                    }
                    _ => version = Some(v),
                }
            }
        }
        let exports: Vec<String> =
            ty.exports(&self.engine).map(|(name, item)| format!("{name}: {}", item_kind(&item.ty))).collect();
        let wit_version = version.unwrap_or(WIT_VERSION);
        let link = |e: wasmtime::Error| {
            LoadError::Link(format!("not an {WIT_PACKAGE}@{}.{} stage: {e:#}", wit_version.0, wit_version.1))
        };
        let pre = self.linker.instantiate_pre(&component).map_err(link)?;
        // A plugin that exports `split` but not in the shape this host calls is
        // refused, not run whole: it claims a consent the host cannot honour.
        let split = match exports.iter().find(|e| e.starts_with(SPLIT_EXPORT)) {
            None => None,
            Some(e) if wit_version != WIT_VERSION => {
                return Err(LoadError::Link(format!(
                    "exports {e} but is an {WIT_PACKAGE}@{}.{} stage; split needs @{}.{}",
                    wit_version.0, wit_version.1, WIT_VERSION.0, WIT_VERSION.1
                )));
            }
            Some(e) => Some(bindings_split::SplitStagePre::new(pre.clone()).map_err(|err| {
                LoadError::Link(format!(
                    "exports {e}, but not as {WIT_PACKAGE}@{}.{} defines it: {err:#}",
                    wit_version.0, wit_version.1
                ))
            })?),
        };
        let pre = match wit_version {
            (0, 1) => Pre::V0_1(bindings_v0_1::StagePre::new(pre).map_err(link)?),
            _ => Pre::V0_2(bindings::StagePre::new(pre).map_err(link)?),
        };
        let info = self.describe(&pre).map_err(LoadError::Link)?;
        Ok(Plugin { sha256, imports, info, wit_version, exports, pre, split })
    }

    /// Calls `describe()` in a fresh, limited instance.
    fn describe(&self, pre: &Pre) -> Result<StageInfo, String> {
        let nothing = Arc::new(Model {
            name: String::new(),
            kind: crate::artifact::ModelKind::File,
            root: PathBuf::new(),
            files: Vec::new(),
            surroundings: Vec::new(),
            sidecars: Default::default(),
        });
        let limits = Limits { timeout: Duration::from_secs(10), ..Limits::default() };
        let (mut store, output) = self.store(nothing, Arc::default(), limits.clone());
        let i =
            pre.describe(&mut store).map_err(|e| format!("describe(): {}", explain(&store, &limits, &output, e)))?;
        let cap = |s: String| s.chars().take(256).collect::<String>();
        Ok(StageInfo { name: cap(i.name), version: cap(i.version), description: cap(i.description) })
    }

    fn store(&self, model: Arc<Model>, ctx: Arc<RunContext>, limits: Limits) -> (Store<HostState>, BoundedPipe) {
        // Deny-all WASI: no preopens, no environment, no arguments, no network;
        // stdin is empty and stdout/stderr go to one bounded buffer.
        let output = BoundedPipe::new(limits.max_log_bytes);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(output.clone()).stderr(output.clone());
        wasi.allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false);
        wasi.socket_addr_check(|_, _| Box::pin(async { false }));
        let ticks = (limits.timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        let deadline = Instant::now() + limits.timeout;
        let state = HostState::new(wasi.build(), model, ctx, limits, deadline);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        (store, output)
    }

    /// Runs a plugin over a model in a fresh store with `limits`. Never panics
    /// on plugin behaviour: every failure becomes an `Err` cause in the output.
    pub fn run(&self, plugin: &Plugin, model: Arc<Model>, ctx: Arc<RunContext>, limits: Limits) -> RunOutput {
        let start = Instant::now();
        let (mut store, output) = self.store(model, ctx, limits.clone());
        let result = plugin
            .pre
            .run(&mut store)
            .map_err(|e| explain(&store, &limits, &output, e))
            .and_then(|report| convert(report, &limits));
        let inference = store.data_mut().finish_inference();
        let mut log = store.data_mut().take_log();
        if let Some(i) = &inference {
            log.push(format!("inference: {i}"));
        }
        RunOutput { result, log, output: output.text(), elapsed: start.elapsed(), inference }
    }
}

/// The outcome of a `part` run: the part's statistics as JSON, or why there are none.
pub struct PartOutput {
    pub result: Result<String, String>,
    pub log: Vec<String>,
    pub output: String,
    pub elapsed: Duration,
}

impl Runtime {
    /// Runs a split plugin's `part` over the files `model` holds (a shard, or
    /// any subset of a model's files). The output is capped at
    /// `limits.max_value_bytes`, like any value the host copies.
    pub fn run_part(&self, plugin: &Plugin, model: Arc<Model>, ctx: Arc<RunContext>, limits: Limits) -> PartOutput {
        let start = Instant::now();
        let (mut store, output) = self.store(model, ctx, limits.clone());
        let result = match &plugin.split {
            None => Err(not_split(plugin)),
            Some(pre) => {
                let called = pre.instantiate(&mut store).and_then(|inst| {
                    let handle = store.data_mut().model_resource()?;
                    inst.airlock_stage_split().call_part(&mut store, handle)
                });
                match called {
                    Err(e) => Err(explain(&store, &limits, &output, e)),
                    Ok(Err(e)) => Err(format!("part() failed: {e}")),
                    Ok(Ok(json)) if json.len() > limits.max_value_bytes => Err(format!(
                        "part() returned {} bytes of statistics, above the {}-byte cap",
                        json.len(),
                        limits.max_value_bytes
                    )),
                    Ok(Ok(json)) => Ok(json),
                }
            }
        };
        let log = store.data_mut().take_log();
        PartOutput { result, log, output: output.text(), elapsed: start.elapsed() }
    }

    /// Runs a split plugin's `join` over every part's output, in file order.
    /// `model` is what its context sees (the join reads no bytes, but it may ask the name).
    pub fn run_join(
        &self,
        plugin: &Plugin,
        parts: Vec<String>,
        model: Arc<Model>,
        ctx: Arc<RunContext>,
        limits: Limits,
    ) -> RunOutput {
        let start = Instant::now();
        let (mut store, output) = self.store(model, ctx, limits.clone());
        let result = match &plugin.split {
            None => Err(not_split(plugin)),
            Some(pre) => pre
                .instantiate(&mut store)
                .and_then(|inst| inst.airlock_stage_split().call_join(&mut store, &parts))
                .map_err(|e| explain(&store, &limits, &output, e))
                .and_then(|report| convert(report, &limits)),
        };
        let log = store.data_mut().take_log();
        RunOutput { result, log, output: output.text(), elapsed: start.elapsed(), inference: None }
    }
}

fn not_split(plugin: &Plugin) -> String {
    format!("plugin {} does not export {SPLIT_EXPORT}{}.{}.0", plugin.info.name, WIT_VERSION.0, WIT_VERSION.1)
}

/// A component item's kind, for `plugin inspect`.
fn item_kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) => "func",
        ComponentItem::CoreFunc(_) => "core func",
        ComponentItem::Module(_) => "module",
        ComponentItem::Component(_) => "component",
        ComponentItem::ComponentInstance(_) => "instance",
        ComponentItem::Type(_) => "type",
        ComponentItem::Resource(_) => "resource",
    }
}

/// Turns a wasmtime error into the cause printed after FAIL.
fn explain(store: &Store<HostState>, limits: &Limits, output: &BoundedPipe, e: wasmtime::Error) -> String {
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return format!("timed out: the plugin ran past its {:?} deadline and was stopped", limits.timeout);
    }
    if store.data().limit_hit {
        // The limiter's own message names the limit; it is the root cause.
        let root = e.chain().last().map(|c| c.to_string()).unwrap_or_default();
        return format!("limit hit: {root}");
    }
    let mut msg = match e.downcast_ref::<Trap>() {
        Some(trap) => format!("trapped ({trap})"),
        None => format!("failed: {}", e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")),
    };
    if let Some(panic) = panic_message(&output.text()) {
        msg.push_str(&format!(": {panic}"));
    }
    msg
}

/// The message of a Rust panic, from the plugin's stderr
/// ("thread '...' panicked at file:line:col:\nmessage").
fn panic_message(output: &str) -> Option<String> {
    let at = output.rfind("panicked at ")?;
    let mut lines = output[at..].lines();
    let place = lines.next()?.trim_start_matches("panicked at ").trim_end_matches(':');
    let message = lines.next().unwrap_or("").trim();
    Some(format!("panicked at {place}: {message}"))
}

fn report_size(r: &bindings::airlock::stage::types::Report) -> usize {
    r.summary.len()
        + r.details.as_ref().map_or(0, String::len)
        + r.findings
            .iter()
            .map(|f| f.rule.len() + f.message.len() + f.location.as_ref().map_or(0, String::len) + 32)
            .sum::<usize>()
        + match &r.verdict {
            bindings::airlock::stage::types::Verdict::Fail(s) | bindings::airlock::stage::types::Verdict::Skip(s) => {
                s.len()
            }
            bindings::airlock::stage::types::Verdict::Pass => 0,
        }
}

fn convert(r: bindings::airlock::stage::types::Report, limits: &Limits) -> Result<Report, String> {
    use bindings::airlock::stage::types as t;
    let size = report_size(&r);
    if size > limits.max_report_bytes {
        return Err(format!(
            "report refused: it is {size} bytes, above this plugin's cap of {} bytes",
            limits.max_report_bytes
        ));
    }
    let details = match r.details {
        None => None,
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v @ serde_json::Value::Object(_)) => Some(v),
            Ok(_) => return Err("report refused: details must be a JSON object".into()),
            Err(e) => return Err(format!("report refused: details are not valid JSON ({e})")),
        },
    };
    let verdict = match r.verdict {
        t::Verdict::Pass => Verdict::Pass,
        t::Verdict::Fail(s) => Verdict::Fail(s),
        t::Verdict::Skip(s) => Verdict::Skip(s),
    };
    let findings = r
        .findings
        .into_iter()
        .map(|f| Finding {
            rule: f.rule,
            severity: match f.severity {
                t::Severity::Info => Severity::Info,
                t::Severity::Low => Severity::Low,
                t::Severity::Medium => Severity::Medium,
                t::Severity::High => Severity::High,
                t::Severity::Critical => Severity::Critical,
            },
            message: f.message,
            location: f.location,
            offset: f.offset,
            confidence: f.confidence,
        })
        .collect();
    Ok(Report { verdict, summary: r.summary, findings, score: r.score, details })
}

/// WASI interfaces linked deny-all: present so std links, useless without preopens.
const WASI_ALLOWED: [&str; 5] = ["wasi:cli/", "wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:filesystem/"];
/// Our interfaces every stage may import.
const BASELINE: [&str; 4] = ["types", "artifact", "context", "log"];

/// Is this import allowed for a plugin with `grants`? The error names the
/// import and why not. For an `airlock:stage` import, returns its major.minor.
fn check_import(import: &str, grants: &[Grant]) -> Result<Option<(u64, u64)>, LoadError> {
    let refuse = |why: String| Err(LoadError::Import { import: import.to_string(), why });
    if let Some(rest) = import.strip_prefix(WIT_PACKAGE).and_then(|r| r.strip_prefix('/')) {
        let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
        let (major, minor) = (parts.next().flatten(), parts.next().flatten());
        let Some(v) = major.zip(minor).filter(|v| WIT_VERSIONS.contains(v)) else {
            let served: Vec<String> = WIT_VERSIONS.iter().map(|(a, b)| format!("{a}.{b}.x")).collect();
            return refuse(format!(
                "the plugin was built for {WIT_PACKAGE}@{version}; this host (airlock {}) provides {WIT_PACKAGE}@{}",
                env!("CARGO_PKG_VERSION"),
                served.join(" and @")
            ));
        };
        if BASELINE.contains(&iface) {
            return Ok(Some(v));
        }
        return match grants.iter().find(|g| g.interface() == iface) {
            Some(_) => Ok(Some(v)),
            None if [Grant::Sidecars, Grant::Inference].iter().any(|g| g.interface() == iface) => refuse(format!(
                "the capability \"{iface}\" is not granted to this plugin by the policy (add it to its grants)"
            )),
            None => refuse(format!("this host has no interface \"{iface}\" in {WIT_PACKAGE}")),
        };
    }
    if WASI_ALLOWED.iter().any(|p| import.starts_with(p)) {
        return Ok(None);
    }
    if import.starts_with("wasi:sockets/") || import.starts_with("wasi:http/") {
        return refuse("network access is never granted to plugins".into());
    }
    refuse("the host does not provide it".into())
}

/// The capabilities a plugin's imports ask for.
pub fn wanted_grants(imports: &[String]) -> Vec<Grant> {
    let mut out: Vec<Grant> = [Grant::Sidecars, Grant::Inference]
        .into_iter()
        .filter(|g| {
            imports.iter().any(|i| {
                i.strip_prefix(WIT_PACKAGE)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| r.split('@').next() == Some(g.interface()))
            })
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_checked_against_grants() {
        assert_eq!(check_import("airlock:stage/artifact@0.1.0", &[]).unwrap(), Some((0, 1)));
        assert_eq!(check_import("airlock:stage/artifact@0.2.3", &[]).unwrap(), Some((0, 2)));
        assert!(check_import("airlock:stage/artifact@0.1.7", &[]).is_ok());
        assert!(check_import("wasi:io/streams@0.2.6", &[]).is_ok());
        let e = check_import("airlock:stage/inference@0.1.0", &[]).unwrap_err().to_string();
        assert!(e.contains("airlock:stage/inference@0.1.0") && e.contains("not granted"), "{e}");
        assert!(check_import("airlock:stage/inference@0.1.0", &[Grant::Inference]).is_ok());
        let e = check_import("airlock:stage/artifact@0.3.0", &[]).unwrap_err().to_string();
        assert!(e.contains("@0.3.0") && e.contains("0.2.x") && e.contains("0.1.x"), "{e}");
        let e = check_import("airlock:stage/artifact@1.0.0", &[]).unwrap_err().to_string();
        assert!(e.contains("@1.0.0"), "{e}");
        assert!(check_import("wasi:sockets/tcp@0.2.6", &[]).unwrap_err().to_string().contains("network"));
        assert!(check_import("example:evil/backdoor@1.0.0", &[]).is_err());
    }

    /// A component that exports `airlock:stage/split@0.2.0` with a `part`
    /// returning a number, importing `imports` (component text).
    fn odd_split(imports: &str) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(component
                {imports}
                (core module $m (func (export "part") (result i32) i32.const 0))
                (core instance $i (instantiate $m))
                (func $part (result u32) (canon lift (core func $i "part")))
                (instance $split (export "part" (func $part)))
                (export "airlock:stage/split@0.2.0" (instance $split)))"#
        ))
        .unwrap()
    }

    /// Exporting `split` is a consent the host must be able to honour: a
    /// plugin whose `split` is not the shape the host calls, or that claims it
    /// from a 0.1 stage (which had no split), is refused at load, not run whole.
    #[test]
    fn a_split_export_the_host_cannot_call_is_refused_at_load() {
        let runtime = Runtime::new(None).unwrap();
        let e = runtime.load(&odd_split(""), &[]).err().expect("refused").to_string();
        assert!(
            e.contains("exports airlock:stage/split@0.2.0") && e.contains("but not as airlock:stage@0.2 defines it"),
            "{e}"
        );
        let e = runtime
            .load(&odd_split(r#"(import "airlock:stage/log@0.1.0" (instance))"#), &[])
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("exports airlock:stage/split@0.2.0") && e.contains("split needs @0.2"), "{e}");
    }
}
