//! Runs one model through the policy's chain and decides the verdict.
//!
//! Every enabled stage runs its plugins in order; the first FAIL ends the
//! chain and the remaining stages are recorded as not reached. The one
//! exception is the static scan: it reads the whole model but needs no earlier
//! verdict, so its plugins run in parallel from the start, beside the hashing
//! thread, and their findings are kept even when an earlier stage failed. A plugin that
//! traps, times out, hits a limit, returns an oversized report or was refused
//! at load time gives its stage FAIL with that cause: airlock fails closed.

pub mod digest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::artifact::{FileBytes, Model, OpenError, ReadMode};
use crate::plugin::Grant;
use crate::plugin::{Finding, Origin, Plugin, RunContext, Runtime, Verdict};
use crate::policy::{ChainEntry, Pin, PluginSource, Policy, Stage};

/// Why a scan could not run at all (exit 2), as opposed to a rejection.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot open the model: {0}")]
    Open(#[from] OpenError),
    #[error("plugin {plugin} for stage {stage}: {message}")]
    Plugin { stage: &'static str, plugin: String, message: String },
}

/// What one plugin decided for its stage, as reported (`pass`, `fail`, `skip`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageVerdict {
    Pass,
    Fail,
    /// Not run: disabled by policy, not reached, or not this plugin's kind of model.
    Skip,
}

impl StageVerdict {
    pub fn upper(self) -> &'static str {
        match self {
            StageVerdict::Pass => "PASS",
            StageVerdict::Fail => "FAIL",
            StageVerdict::Skip => "SKIP",
        }
    }
}

/// What the chain decided for one model (`pass` or `fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelVerdict {
    Pass,
    Fail,
}

/// Where a model was refused: at one of the seven stages, or at a step the
/// host takes around them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FailedAt {
    Stage(Stage),
    Host(HostStep),
}

/// The host's own steps that can refuse a model (reported as `claim`, `host`, `registry`, `dispatch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStep {
    /// The entry in incoming/ cannot be taken as a model (a link, a device, an unopenable file).
    Claim,
    /// The model changed under the scan, or its manifest could not be computed.
    Host,
    /// A model of the same name is already promoted.
    Registry,
    /// The scan was sent to workers (`watch --dispatch`) and none brought back a
    /// result this watcher can accept.
    Dispatch,
}

impl FailedAt {
    pub fn name(self) -> &'static str {
        match self {
            FailedAt::Stage(s) => s.name(),
            FailedAt::Host(HostStep::Claim) => "claim",
            FailedAt::Host(HostStep::Host) => "host",
            FailedAt::Host(HostStep::Registry) => "registry",
            FailedAt::Host(HostStep::Dispatch) => "dispatch",
        }
    }
}

impl std::fmt::Display for FailedAt {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One (stage, plugin) result, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: Stage,
    pub number: usize,
    pub plugin: Option<String>,
    /// The plugin's `describe()`: its own name, version and description.
    pub plugin_info: Option<crate::plugin::StageInfo>,
    pub plugin_sha256: Option<String>,
    pub verdict: StageVerdict,
    pub summary: String,
    pub findings: Vec<Finding>,
    pub score: Option<f32>,
    pub details: Option<serde_json::Value>,
    pub log: Vec<String>,
    pub elapsed_ms: u64,
    /// Set on a static-scan result when an earlier stage had already
    /// stopped the chain: why it still ran, so a PASS or FAIL here does not
    /// read as a second verdict after stages 3 and 4 said "not reached".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub still_ran: Option<String>,
    /// The stage runs more than one plugin: the log line names which one this is.
    #[serde(skip)]
    pub shared_stage: bool,
}

impl StageResult {
    fn skipped(stage: Stage, summary: String) -> StageResult {
        StageResult {
            stage,
            number: stage.number(),
            plugin: None,
            plugin_info: None,
            plugin_sha256: None,
            verdict: StageVerdict::Skip,
            summary,
            findings: Vec::new(),
            score: None,
            details: None,
            log: Vec::new(),
            elapsed_ms: 0,
            still_ran: None,
            shared_stage: false,
        }
    }

    fn failed(stage: Stage, l: &Loaded, cause: String) -> StageResult {
        StageResult {
            plugin: Some(l.label.clone()),
            plugin_sha256: Some(l.sha256.clone()),
            verdict: StageVerdict::Fail,
            summary: format!("plugin {} {cause}", l.label),
            ..StageResult::skipped(stage, String::new())
        }
    }
}

/// The outcome for one model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub model: String,
    pub path: String,
    pub verdict: ModelVerdict,
    pub failed_stage: Option<FailedAt>,
    pub reason: Option<String>,
    pub sha256: Option<String>,
    pub format: Vec<String>,
    /// The origin the host resolved (`--origin`, `<name>.origin`, the xattr),
    /// whatever the source-policy plugin made of it: the manifest records this.
    pub origin: Option<String>,
    pub stages: Vec<StageResult>,
}

/// Progress, for printing as the scan goes.
pub enum Event<'a> {
    Processing(&'a str),
    StageStart(Stage, Option<&'a str>),
    StageDone(&'a StageResult),
}

/// The claim a scan is for: the lifecycle's id and the model's name.
pub struct ScanJob<'a> {
    pub id: &'a str,
    pub name: &'a str,
}

/// How a claimed model is scanned: here ([`Scanner`]) or by workers
/// (`scale_out::Dispatcher`). The lifecycle sees only this seam; whatever
/// checks a way of scanning needs (a worker's result against the claim)
/// belong to that way.
pub trait Scan: Sync {
    /// `Ok(Ok)`: the outcome, as a scan here would give it. `Ok(Err)`: the
    /// scan could not be had or believed; the model is rejected at
    /// `dispatch` with this reason. `Err`: stopped before an answer; the
    /// claim stays for the next start.
    fn scan_claim(
        &self,
        job: &ScanJob,
        model: &Arc<Model>,
        path: &Path,
        input: &ScanInput,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Result<Outcome, String>, String>;
}

impl Scan for Scanner {
    fn scan_claim(
        &self,
        _job: &ScanJob,
        model: &Arc<Model>,
        path: &Path,
        input: &ScanInput,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Result<Outcome, String>, String> {
        Ok(Ok(self.scan_model(model, path, input, on_event)))
    }
}

/// A split plugin's parts, one per shard in shard order, or why one is missing.
pub type Joined = Result<Vec<String>, String>;

/// Per-scan inputs from the command line.
#[derive(Clone, Debug, Default)]
pub struct ScanInput {
    pub origin: Option<String>,
    pub sha256: Option<String>,
    /// Per-file pins of a folder model, overriding the scanner's (the watcher reads them per model).
    pub pinned_files: Option<BTreeMap<String, String>>,
    pub read_mode: ReadMode,
}

struct Loaded {
    entry: ChainEntry,
    label: String,
    /// The plugin, or why it was refused at load time (a stage FAIL). Set
    /// once: at construction for the static scan, by the loading thread for
    /// the other stages (see [`Scanner::new`]).
    plugin: Arc<OnceLock<Result<Plugin, String>>>,
    /// The component's sha256, reported with every result.
    sha256: String,
}

impl Loaded {
    /// The plugin, waiting for the loading thread if it has not got here yet.
    fn plugin(&self) -> &Result<Plugin, String> {
        self.plugin.wait()
    }
}

/// A policy with its plugins loaded, ready to scan models.
pub struct Scanner {
    runtime: Arc<Runtime>,
    chain: BTreeMap<Stage, Vec<Loaded>>,
    pins: BTreeMap<String, Pin>,
    inference: crate::inference::InferenceConfig,
    folder_limits: crate::artifact::FolderLimits,
}

/// A component read and checked against its pin, not yet compiled.
struct Pending {
    cell: Arc<OnceLock<Result<Plugin, String>>>,
    bytes: FileBytes,
    sha256: String,
    entry: ChainEntry,
    label: String,
    stage: Stage,
}

impl Pending {
    fn load(self, runtime: &Runtime) {
        let plugin = compile(runtime, self.bytes.bytes(), self.sha256, &self.entry);
        // A grant the plugin does not import is harmless (it cannot call it) but is
        // not least privilege; `airlock policy check` reports it as a problem.
        if let Ok(p) = &plugin {
            for g in unused_grants(&self.entry, p) {
                tracing::warn!(
                    "{} (stage {}) is granted {} but does not import it; remove the grant",
                    self.label,
                    self.stage,
                    g.interface()
                );
            }
        }
        let _ = self.cell.set(plugin);
    }
}

/// Fills whatever the loading thread left unset, so that no stage waits
/// forever if it stops early (a panic in a load).
struct FillUnset(Vec<Arc<OnceLock<Result<Plugin, String>>>>);

impl Drop for FillUnset {
    fn drop(&mut self) {
        for cell in &self.0 {
            let _ = cell.set(Err("was not loaded: the plugin-loading thread stopped (a bug in airlock)".into()));
        }
    }
}

impl Scanner {
    /// Loads every plugin the policy enables. A missing or mis-pinned
    /// component is an error; a component refused for its imports is kept as
    /// a load failure that fails its stage when a model reaches it.
    ///
    /// Every component is read and checked against its pin here. The static
    /// scan's plugins are compiled here too; the other stages' are compiled on
    /// a thread of its own, so the static scan (the longest part of a scan)
    /// can start while stages 1-4 are still loading. A stage waits for its
    /// plugins when it runs.
    pub fn new(
        runtime: Runtime,
        policy: &Policy,
        plugin_dir: &Path,
        pins: BTreeMap<String, Pin>,
    ) -> Result<Scanner, ScanError> {
        let runtime = Arc::new(runtime);
        let mut chain = BTreeMap::new();
        let (mut now, mut later) = (Vec::new(), Vec::new());
        for (stage, entries) in &policy.chain {
            let mut loaded = Vec::new();
            for entry in entries {
                let label = entry.source.label();
                let err = |message: String| ScanError::Plugin { stage: stage.name(), plugin: label.clone(), message };
                let (bytes, sha256) = read_entry(entry, plugin_dir).map_err(err)?;
                let cell = Arc::new(OnceLock::new());
                let pending = Pending {
                    cell: cell.clone(),
                    bytes,
                    sha256: sha256.clone(),
                    entry: entry.clone(),
                    label,
                    stage: *stage,
                };
                loaded.push(Loaded { entry: entry.clone(), label: pending.label.clone(), plugin: cell, sha256 });
                if *stage == Stage::StaticScan { now.push(pending) } else { later.push(pending) }
            }
            chain.insert(*stage, loaded);
        }
        for p in now {
            p.load(&runtime);
        }
        if !later.is_empty() {
            let fill = FillUnset(later.iter().map(|p| p.cell.clone()).collect());
            let rt = runtime.clone();
            let spawned = std::thread::Builder::new().name("airlock-loader".into()).spawn(move || {
                let _fill = fill;
                for p in later {
                    p.load(&rt);
                }
            });
            if let Err(e) = spawned {
                return Err(ScanError::Plugin {
                    stage: "all",
                    plugin: "(loader)".into(),
                    message: format!("cannot start the plugin-loading thread: {e}"),
                });
            }
        }
        Ok(Scanner { runtime, chain, pins, inference: policy.inference.clone(), folder_limits: policy.folder_limits })
    }

    /// Scans one model, reporting progress through `on_event`.
    pub fn scan(&self, path: &Path, input: &ScanInput, on_event: &mut dyn FnMut(Event)) -> Result<Outcome, ScanError> {
        let model = Arc::new(Model::open(path, input.read_mode, &self.folder_limits)?);
        Ok(self.scan_model(&model, path, input, on_event))
    }

    /// Scans an opened model; the caller keeps it (for the manifest).
    pub fn scan_model(
        &self,
        model: &Arc<Model>,
        path: &Path,
        input: &ScanInput,
        on_event: &mut dyn FnMut(Event),
    ) -> Outcome {
        self.scan_model_joined(model, path, input, &BTreeMap::new(), on_event)
    }

    /// The pins a scan hands its plugins: the caller's, else the scanner's.
    fn pins_for(&self, model: &Model, input: &ScanInput) -> (Option<String>, Vec<(String, String)>) {
        match (&input.sha256, self.pins.get(&model.name)) {
            (Some(sha), _) => (Some(sha.clone()), Vec::new()),
            (None, _) if input.pinned_files.is_some() => {
                (None, input.pinned_files.clone().unwrap_or_default().into_iter().collect())
            }
            (None, Some(Pin::File(sha))) => (Some(sha.clone()), Vec::new()),
            (None, Some(Pin::Folder(files))) => (None, files.clone().into_iter().collect()),
            (None, None) => (None, Vec::new()),
        }
    }

    /// What one plugin run is given.
    fn context(
        &self,
        l: &Loaded,
        origin: &Option<Origin>,
        pins: &(Option<String>, Vec<(String, String)>),
        streams: Vec<Option<crate::artifact::Stream>>,
    ) -> Arc<RunContext> {
        Arc::new(RunContext {
            config_json: l.entry.config.to_string(),
            origin: origin.clone(),
            pinned_sha256: pins.0.clone(),
            pinned_files: pins.1.clone(),
            inference: l.entry.grants.contains(&Grant::Inference).then(|| self.inference.clone()),
            streams: Arc::new(streams),
        })
    }

    /// The static scan's plugins that consent to be split, as (position in the
    /// stage's chain, label). Those plugins are compiled when the scanner is made.
    pub fn split_plugins(&self) -> Vec<(usize, String)> {
        let entries = self.chain.get(&Stage::StaticScan).map(Vec::as_slice).unwrap_or_default();
        entries
            .iter()
            .enumerate()
            .filter(|(_, l)| l.plugin().as_ref().is_ok_and(Plugin::splits))
            .map(|(i, l)| (i, l.label.clone()))
            .collect()
    }

    /// Runs `part` of the named static-scan plugins (by position, see
    /// [`Scanner::split_plugins`]) over `shard`: some of a model's files.
    /// One result per plugin, in the order asked: its part, or why there is
    /// none (without the plugin's label, which the join's report adds).
    pub fn scan_part(&self, shard: &Arc<Model>, input: &ScanInput, plugins: &[usize]) -> Vec<Result<String, String>> {
        let entries = self.chain.get(&Stage::StaticScan).map(Vec::as_slice).unwrap_or_default();
        let origin = resolve_origin(shard, input.origin.as_deref());
        let pins = self.pins_for(shard, input);
        plugins
            .iter()
            .map(|&i| {
                let l = entries.get(i).ok_or_else(|| format!("the static scan has no plugin number {}", i + 1))?;
                let plugin = l.plugin().as_ref().map_err(Clone::clone)?;
                let ctx = self.context(l, &origin, &pins, shard.files.iter().map(|f| f.stream()).collect());
                self.runtime.run_part(plugin, Arc::clone(shard), ctx, l.entry.limits.clone()).result
            })
            .collect()
    }

    /// Scans an opened model; the static-scan plugins named in `joined` (by
    /// position in the stage's chain) are not run over the model but joined
    /// from the parts given, one per shard in shard order. `Err`: why a part
    /// is missing (its `part` failed), which fails the plugin as a failed `run` would.
    pub fn scan_model_joined(
        &self,
        model: &Arc<Model>,
        path: &Path,
        input: &ScanInput,
        joined: &BTreeMap<usize, Joined>,
        on_event: &mut dyn FnMut(Event),
    ) -> Outcome {
        on_event(Event::Processing(&model.name));
        let origin = resolve_origin(model, input.origin.as_deref());
        let pins = self.pins_for(model, input);

        let run = |stage: Stage, l: &Loaded, streams: Vec<Option<crate::artifact::Stream>>, parts: Option<&Joined>| {
            self.run_entry(stage, l, model, self.context(l, &origin, &pins, streams), parts)
        };

        let mut stages = Vec::new();
        let mut failed: Option<(FailedAt, String)> = None;
        std::thread::scope(|scope| {
            // The static scan reads every byte of every tensor; it needs no
            // earlier verdict and touches nothing, so its plugins start now,
            // each on its own thread, beside the hashing thread and stages 1-4.
            // Its results are reported even when an earlier stage fails: for a
            // pickle denied at the format gate, the pickle scan says *why*.
            let static_scan = self.chain.get(&Stage::StaticScan).map(Vec::as_slice).unwrap_or_default();
            // Each of its plugins registers as a reader of every file before
            // any starts, so the files' maps are given back only behind the
            // slowest of them (and the hashing thread).
            // A joined plugin reads no bytes, so it holds no stream back.
            let streams: Vec<Vec<_>> = (0..static_scan.len())
                .map(|i| match joined.contains_key(&i) {
                    true => Vec::new(),
                    false => model.files.iter().map(|f| f.stream()).collect(),
                })
                .collect();
            if !static_scan.is_empty() {
                model.files.iter().for_each(|f| f.release_behind_streams());
            }
            let mut early: Vec<_> = static_scan
                .iter()
                .zip(streams)
                .enumerate()
                .map(|(i, (l, streams))| {
                    let run = &run;
                    std::thread::Builder::new()
                        // Thread names keep 15 bytes: "airlock-weights", not "airlock-builtin".
                        .name(format!("airlock-{}", l.label.rsplit(':').next().unwrap_or(&l.label)))
                        .spawn_scoped(scope, move || run(Stage::StaticScan, l, streams, joined.get(&i)))
                        .map_err(|e| (l, e.to_string()))
                })
                .collect();
            // Taken from the back as the stage loop reaches each entry.
            early.reverse();

            for stage in Stage::ALL {
                let skip = |summary: String| StageResult::skipped(stage, summary);
                let Some(entries) = self.chain.get(&stage) else {
                    let r = skip("disabled by policy".into());
                    on_event(Event::StageDone(&r));
                    stages.push(r);
                    continue;
                };
                if let Some((at, _)) = &failed
                    && stage != Stage::StaticScan
                {
                    let r = skip(format!("not reached: the chain stopped at {at}"));
                    on_event(Event::StageDone(&r));
                    stages.push(r);
                    continue;
                }
                for l in entries {
                    let multi = entries.len() > 1;
                    on_event(Event::StageStart(stage, multi.then_some(l.label.as_str())));
                    let mut r = if stage == Stage::StaticScan {
                        match early.pop() {
                            Some(Ok(handle)) => handle.join().unwrap_or_else(|_| {
                                StageResult::failed(stage, l, "panicked in the host (a bug in airlock)".into())
                            }),
                            Some(Err((l, e))) => StageResult::failed(stage, l, format!("cannot start a thread: {e}")),
                            None => StageResult::failed(stage, l, "was not started (a bug in airlock)".into()),
                        }
                    } else {
                        run(stage, l, Vec::new(), None)
                    };
                    r.shared_stage = multi;
                    if let Some((at, _)) = &failed {
                        r.still_ran = Some(format!(
                            "still ran after the chain stopped at {at}: the static scan needs no earlier verdict \
                             and runs beside stages 1-4, so its findings say what the model holds; the verdict is \
                             {at}'s"
                        ));
                    }
                    on_event(Event::StageDone(&r));
                    if r.verdict == StageVerdict::Fail && failed.is_none() {
                        failed = Some((FailedAt::Stage(stage), r.summary.clone()));
                    }
                    stages.push(r);
                    if failed.is_some() && stage != Stage::StaticScan {
                        break;
                    }
                }
            }
        });
        // A model that changed under the scan was not the model we scanned.
        if failed.is_none()
            && let Err(e) = model.check_unchanged()
        {
            failed = Some((FailedAt::Host(HostStep::Host), e));
        }
        let sha256 = match model.files.as_slice() {
            [one] if model.kind == crate::artifact::ModelKind::File => one.sha256().ok(),
            _ => None,
        };
        let mut format: Vec<String> = model.files.iter().map(|f| f.format.name().to_string()).collect();
        // Files are in path order, so the same format recurs: each once, by name.
        format.sort();
        format.dedup();
        Outcome {
            model: model.name.clone(),
            path: path.display().to_string(),
            verdict: if failed.is_some() { ModelVerdict::Fail } else { ModelVerdict::Pass },
            failed_stage: failed.as_ref().map(|f| f.0),
            reason: failed.map(|f| f.1),
            sha256,
            format,
            origin: origin.map(|o| o.url),
            stages,
        }
    }

    /// Runs one plugin of a stage and turns its output into a result; with
    /// `parts`, the plugin's `join` over them instead of its `run`.
    fn run_entry(
        &self,
        stage: Stage,
        l: &Loaded,
        model: &Arc<Model>,
        ctx: Arc<RunContext>,
        parts: Option<&Joined>,
    ) -> StageResult {
        if let Some(why) = not_for(&l.entry, model) {
            return StageResult {
                plugin: Some(l.label.clone()),
                plugin_info: l.plugin().as_ref().ok().map(|p| p.info.clone()),
                plugin_sha256: Some(l.sha256.clone()),
                ..StageResult::skipped(stage, why)
            };
        }
        let mut inference = None;
        let (result, log, elapsed_ms) = match l.plugin() {
            Err(cause) => (Err(cause.clone()), Vec::new(), 0),
            Ok(_) if let Some(Err(why)) = parts => (Err(why.clone()), Vec::new(), 0),
            Ok(plugin) => {
                let limits = l.entry.limits.clone();
                let out = match parts {
                    Some(Ok(p)) => self.runtime.run_join(plugin, p.clone(), Arc::clone(model), ctx, limits),
                    _ => self.runtime.run(plugin, Arc::clone(model), ctx, limits),
                };
                inference = out.inference;
                let mut log = out.log;
                if let Some(Ok(p)) = parts {
                    log.insert(0, format!("joined from {} parts, one per weight shard", p.len()));
                }
                if !out.output.is_empty() {
                    log.extend(out.output.lines().map(|s| format!("output: {s}")));
                }
                (out.result, log, out.elapsed.as_millis() as u64)
            }
        };
        let (verdict, summary, findings, score, details) = match result {
            Ok(r) => {
                let (v, s) = match r.verdict {
                    Verdict::Pass => (StageVerdict::Pass, r.summary),
                    Verdict::Fail(reason) => {
                        (StageVerdict::Fail, if r.summary.is_empty() { reason } else { r.summary })
                    }
                    Verdict::Skip(reason) => {
                        (StageVerdict::Skip, if r.summary.is_empty() { reason } else { r.summary })
                    }
                };
                (v, s, r.findings, r.score, r.details)
            }
            Err(cause) => (StageVerdict::Fail, format!("plugin {} {cause}", l.label), Vec::new(), None, None),
        };
        // What the inference backend did goes beside the plugin's own details.
        let details = match (details, inference) {
            (d, None) => d,
            (Some(serde_json::Value::Object(mut m)), Some(i)) => {
                m.insert("inference".into(), i);
                Some(serde_json::Value::Object(m))
            }
            (d, Some(i)) => Some(serde_json::json!({ "plugin": d, "inference": i })),
        };
        StageResult {
            stage,
            number: stage.number(),
            plugin: Some(l.label.clone()),
            plugin_info: l.plugin().as_ref().ok().map(|p| p.info.clone()),
            plugin_sha256: Some(l.sha256.clone()),
            verdict,
            summary,
            findings,
            score,
            details,
            log,
            elapsed_ms,
            still_ran: None,
            shared_stage: false,
        }
    }

    /// The policy's limits on walking folder models.
    pub fn folder_limits(&self) -> &crate::artifact::FolderLimits {
        &self.folder_limits
    }

    /// Every loaded plugin as (stage, label, component sha256), in chain order.
    pub fn components(&self) -> Vec<(Stage, String, String)> {
        self.chain.iter().flat_map(|(s, ls)| ls.iter().map(|l| (*s, l.label.clone(), l.sha256.clone()))).collect()
    }

    /// The stages the policy switches off.
    pub fn disabled_stages(&self) -> Vec<String> {
        Stage::ALL.iter().filter(|s| !self.chain.contains_key(s)).map(|s| s.name().to_string()).collect()
    }
}

/// Reads a chain entry's component, checks it against its pin and loads it
/// with the entry's grants; returns its sha256 and the plugin. `Err`: it
/// cannot be used at all (unreadable, or not what was pinned). A component
/// refused at load time is `Ok` with the refusal, which fails its stage.
pub fn load_entry(
    runtime: &Runtime,
    entry: &ChainEntry,
    plugin_dir: &Path,
) -> Result<(String, Result<Plugin, String>), String> {
    let (bytes, actual) = read_entry(entry, plugin_dir)?;
    let plugin = compile(runtime, bytes.bytes(), actual.clone(), entry);
    Ok((actual, plugin))
}

/// Compiles (or takes from the cache) a component already read and checked
/// against its pin, with the entry's grants; `Err` is why it was refused.
fn compile(runtime: &Runtime, bytes: &[u8], sha256: String, entry: &ChainEntry) -> Result<Plugin, String> {
    runtime.load_hashed(bytes, sha256, &entry.grants).map_err(|e| format!("refused at load time: {e}"))
}

/// Reads a chain entry's component and checks it against its pin: its bytes and sha256.
fn read_entry(entry: &ChainEntry, plugin_dir: &Path) -> Result<(FileBytes, String), String> {
    let path: PathBuf = match &entry.source {
        PluginSource::Builtin(name) => plugin_dir.join(format!("{name}.wasm")),
        PluginSource::Path { path, .. } => path.clone(),
    };
    let unreadable = |e: std::io::Error| match &entry.source {
        PluginSource::Builtin(_) => format!(
            "cannot read {}: {e} (built-in plugins are installed beside the binary by `cargo xtask build`; or set --plugin-dir)",
            path.display()
        ),
        _ => format!("cannot read {}: {e}", path.display()),
    };
    let bytes = FileBytes::open(&path).map_err(unreadable)?;
    let actual = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes.bytes()));
    bytes.intact().map_err(unreadable)?;
    if let PluginSource::Path { sha256: pinned, .. } = &entry.source
        && &actual != pinned
    {
        return Err(format!("{} does not match its pin\n  expected: {pinned}\n  actual:   {actual}", path.display()));
    }
    Ok((bytes, actual))
}

/// The grants an entry gives that its plugin does not import.
pub fn unused_grants(entry: &ChainEntry, plugin: &Plugin) -> Vec<Grant> {
    let wanted = crate::plugin::wanted_grants(&plugin.imports);
    entry.grants.iter().filter(|g| !wanted.contains(g)).copied().collect()
}

/// Why a chain entry with `formats` does not run on this model, if it does not.
fn not_for(entry: &ChainEntry, model: &Model) -> Option<String> {
    let formats = entry.formats.as_ref()?;
    let mut have: Vec<&str> = model.files.iter().map(|f| f.format.name()).collect();
    if model.kind == crate::artifact::ModelKind::Folder {
        have.push("folder");
    }
    if have.iter().any(|h| formats.iter().any(|f| f == h)) {
        return None;
    }
    have.sort();
    have.dedup();
    Some(format!(
        "not run: the policy runs {} on {} only; this model is {}",
        entry.source.label(),
        formats.join(", "),
        if have.is_empty() { "empty".to_string() } else { have.join(", ") }
    ))
}

/// The recorded origin: `--origin`, else what the model was opened with
/// (`<name>.origin`, else the xattr that wget, curl and browsers write).
fn resolve_origin(model: &Model, flag: Option<&str>) -> Option<Origin> {
    match flag {
        Some(url) => Some(Origin { url: url.to_string(), source: crate::artifact::OriginSource::Flag }),
        None => model.sidecars.origin.clone(),
    }
}
