//! The `airlock` command line. Exit codes: 0 every model passed, 1 at least
//! one was rejected, 2 usage or internal error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use std::sync::Arc;

use crate::artifact::{Model, OpenError, ReadMode};
use crate::lifecycle::{Quarantine, Root};
use crate::pipeline::{Event, ModelVerdict, Outcome, ScanError, ScanInput, Scanner, StageResult, StageVerdict};
use crate::plugin::Runtime;
use crate::policy::{self, Policy, Stage};

/// `println!` that returns an error instead of panicking when stdout is gone
/// (`airlock plugin inspect x.wasm | head`); `main` ends quietly on it.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(crate::cli::stdout_error)?
    };
}

/// `eprintln!` that drops the line instead of panicking when stderr is gone.
macro_rules! errln {
    ($($arg:tt)*) => {
        { let _ = writeln!(std::io::stderr(), $($arg)*); }
    };
}

mod lifecycle;
mod plugin;
mod sarif;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Quarantine for AI model files: every check is a sandboxed WebAssembly plugin"
)]
struct Cli {
    /// airlock's data root: quarantine/{incoming,scanning,rejected}, registry/, state/.
    #[arg(long, global = true, env = "AIRLOCK_ROOT", value_name = "DIR", default_value = "/var/lib/airlock")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// What `scan` prints.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ScanFormat {
    /// Log lines: `[quarantine] Stage n/7: <stage> — PASS|FAIL|SKIP (...)`.
    Text,
    /// One JSON object per model, one per line.
    Json,
    /// One SARIF 2.1.0 log for all the models, as GitHub code scanning takes it.
    Sarif,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OutputFormat {
    /// Log lines: `[quarantine] Stage n/7: <stage> — PASS|FAIL|SKIP (...)`.
    Text,
    /// One JSON object per model, one per line.
    Json,
}

/// Where the policy and the plugins come from.
#[derive(Args)]
struct EngineArgs {
    /// Folder holding policy.yaml and sources.allowlist.yaml. Default: /etc/airlock
    /// if it has a policy.yaml, else the policy compiled into this binary.
    #[arg(long, env = "AIRLOCK_POLICY", value_name = "DIR")]
    policy: Option<PathBuf>,
    /// Where the built-in plugins (<name>.wasm) are. Default: `plugins/` beside the binary.
    #[arg(long, env = "AIRLOCK_PLUGIN_DIR", value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
    /// Where compiled plugins are cached. Default: <root>/state/plugin-cache if
    /// <root>/state exists, else ~/.cache/airlock.
    #[arg(long, env = "AIRLOCK_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the policy's stage chain over one or more models (files or folders), read-only.
    ///
    /// Exits 0 when every model passed, 1 when any was rejected, 2 on a usage
    /// or internal error (for example a model that cannot be opened), 141 when
    /// the output pipe was closed (`| head`).
    Scan {
        /// Model files (GGUF, safetensors, ...) or folders to scan. They are only read.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        engine: EngineArgs,
        /// The URL the model was downloaded from. Overrides `<file>.origin` and the
        /// `user.xdg.origin.url` xattr; checked against sources.allowlist.yaml.
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
        /// The expected sha256 of the model (64 hex digits); overrides the pins in
        /// <root>/state/models.lock.yaml. Only with a single PATH.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Output: text log lines, one JSON object per model per line, or one SARIF log.
        #[arg(long, value_enum, default_value = "text")]
        format: ScanFormat,
        /// Read the model with pread instead of a memory map (one more copy per read). For
        /// filesystems where maps misbehave; a file truncated under a map is handled either way.
        #[arg(long)]
        pread: bool,
    },
    /// Create the data root's folders with safe permissions.
    Init,
    /// Copy a model into incoming/ (atomically, with its origin) for the watcher to take.
    Admit {
        /// The model file, a model folder (transformers or diffusers), or a Hugging
        /// Face cache snapshot (models--ORG--NAME/snapshots/REV, admitted as ORG--NAME).
        path: PathBuf,
        /// Where it was downloaded from; stored as `<name>.origin` beside it.
        #[arg(long, value_name = "URL")]
        origin: Option<String>,
        /// A signature to keep beside it (repeatable): `*.asc`, `*.sig`,
        /// `*.sigstore.json` or a model-signing `*.model.sig` / `model.sig`.
        #[arg(long = "signature", value_name = "FILE")]
        signatures: Vec<PathBuf>,
    },
    /// Take models from incoming/ as they arrive: scan, then promote or reject each.
    ///
    /// At start it finishes work a crash interrupted and takes what is already waiting.
    /// SIGTERM or SIGINT finishes the current model, then exits.
    Watch {
        #[command(flatten)]
        engine: EngineArgs,
        /// Take what is waiting now, then exit instead of watching.
        #[arg(long)]
        once: bool,
        /// How long a file's size and mtime must stay unchanged before it is taken.
        #[arg(long, value_name = "MS", default_value = "2000")]
        settle_ms: u64,
        /// How many models are scanned at once.
        #[arg(long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Send the scans to `airlock worker`s through this NATS JetStream server
        /// (nats://HOST:PORT) instead of running them here. The watcher still claims,
        /// promotes and rejects; the workers read the models from shared storage.
        /// Use --jobs at least the number of workers so they all have work.
        #[arg(long, value_name = "URL")]
        dispatch: Option<String>,
        /// How the workers get the bytes: `shared-path` (they read the claim folder
        /// at the same path) or `object-store` (the watcher puts each model in the
        /// JetStream Object Store bucket airlock-models; no shared storage needed).
        #[arg(long, value_enum, default_value = "shared-path", requires = "dispatch")]
        transfer: crate::scale_out::Transfer,
        /// Use a NATS server that lets clients in without credentials (anyone who
        /// reaches it can forge a result); refused without this flag.
        #[arg(long, requires = "dispatch")]
        insecure_nats: bool,
    },
    /// Scan jobs from a NATS JetStream work queue (the other end of `watch --dispatch`).
    ///
    /// Runs until SIGTERM or SIGINT; the scans in hand finish first. The NATS
    /// credentials come from the policy's `nats:` section.
    Worker {
        #[command(flatten)]
        engine: EngineArgs,
        /// The NATS server, nats://HOST:PORT.
        #[arg(long, value_name = "URL")]
        nats: String,
        /// How many jobs this worker scans at once.
        #[arg(long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: u16,
        /// Where models that come through the Object Store are written while
        /// they are scanned (one folder per job, removed after it).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// Use a NATS server that lets clients in without credentials (anyone who
        /// reaches it can forge a job or a result); refused without this flag.
        #[arg(long)]
        insecure_nats: bool,
    },
    /// Make a worker's result-signing key (an nkey seed, mode 600) at FILE, or
    /// read the one there, and print its public key for the watcher's
    /// `scale_out.trusted_workers`.
    WorkerKey {
        /// The seed file; made if it does not exist.
        file: PathBuf,
    },
    /// Show the scale-out queue on a NATS server: jobs waiting and being
    /// scanned, idle worker slots, results, dead letters, models in transit.
    ///
    /// Read-only. Logs in with the policy's `nats:` credentials (the
    /// watcher's login may read all of it). Exits 2 if the server cannot be
    /// reached or no watcher has dispatched to it yet.
    Queue {
        /// The NATS server, nats://HOST:PORT.
        #[arg(long, value_name = "URL")]
        nats: String,
        /// Folder holding the policy.yaml with the `nats:` credentials. Default:
        /// /etc/airlock if it has a policy.yaml, else no credentials.
        #[arg(long, env = "AIRLOCK_POLICY", value_name = "DIR")]
        policy: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// List the promoted models.
    List {
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Show a promoted model's manifest: digests, fingerprint and stage results.
    Show { name: String },
    /// Re-hash a promoted model against its manifest. Exits 1 on any difference.
    Verify { name: String },
    /// Move a rejected model back to incoming/ so it is scanned again.
    Rescan { name: String },
    /// Print the audit log; with --verify, check its hash chain (exit 1 if broken).
    Audit {
        #[arg(long)]
        verify: bool,
    },
    /// Serve a web UI and JSON API over the data root: registry, models, rejected
    /// models, the queue and the audit log. Read-only unless --token-file is given.
    Serve {
        /// Address to listen on. On a loopback address, requests for another Host are refused.
        #[arg(long, value_name = "ADDR:PORT", default_value = crate::serve::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// File holding the bearer token that allows actions (rescan); mode 600, at least 16 characters.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Write, build, inspect and pin third-party plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Check a policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Scaffold a plugin crate: a minimal stage, a test that builds, pins and scans, a README.
    New {
        /// The plugin's name (lowercase letters, digits, `_`, `-`).
        name: String,
        /// Where to create it. Default: ./NAME
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The airlock-sdk crate to depend on (by path). Default: $AIRLOCK_SDK, else the
        /// `sdk/` of the source tree this binary was built from.
        #[arg(long, value_name = "DIR", env = "AIRLOCK_SDK")]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin crate into a wasm32-wasip2 component with the toolchain route available.
    /// Prints the component's path on stdout.
    Build {
        /// The plugin crate's folder.
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Show a component's world and version, imports, exports, size, sha256 and describe().
    /// Exits 2, naming the import, if this host cannot provide what it needs.
    Inspect {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: OutputFormat,
    },
    /// Print the policy entry to paste: path, sha256, the grants it asks for, default limits.
    Pin {
        file: PathBuf,
        /// The stage whose chain the entry is for (only changes the comment).
        #[arg(long, default_value = "static_scan", value_parser = parse_stage)]
        stage: policy::Stage,
        /// Run it only on these formats (comma-separated: gguf, safetensors, folder, ...).
        #[arg(long, value_delimiter = ',')]
        formats: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a whole policy: it parses, every plugin exists and loads, every third-party
    /// plugin matches its pin, and each is granted exactly what it imports. Exit 1 on problems.
    Check {
        #[command(flatten)]
        engine: EngineArgs,
    },
    /// Print the policy digest: the sha256 of the canonical (RFC 8785) JSON of
    /// everything that decides a verdict (chains with their components'
    /// sha256s, configs, grants and limits; keys by content; allowlist;
    /// thresholds), never paths. A watcher and its workers must print the same.
    Digest {
        #[command(flatten)]
        engine: EngineArgs,
    },
}

fn parse_stage(s: &str) -> Result<policy::Stage, String> {
    policy::Stage::ALL
        .into_iter()
        .find(|st| st.name() == s)
        .ok_or_else(|| format!("unknown stage {s:?} (stages: {})", policy::Stage::ALL.map(|st| st.name()).join(", ")))
}

/// Entry point used by `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Under journald (JOURNAL_STREAM is set) or any non-terminal: plain lines,
    // no colours and no timestamps (journald adds its own).
    let tty = interactive();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(tty);
    if tty {
        subscriber.init()
    } else {
        subscriber.without_time().init()
    }
    match run(cli) {
        Ok(code) => code,
        // Whoever read our output went away (`airlock scan m.gguf | head`): end
        // quietly with the status a process killed by SIGPIPE has, not an error.
        // Only output is lost: a scan changes nothing, and `watch` and `admit`
        // never stop on a failed write.
        Err(e) if e.is::<StdoutClosed>() => ExitCode::from(141),
        Err(e) => {
            errln!("airlock: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// A write to stdout failed because whoever read it went away.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub(crate) struct StdoutClosed;

/// What a failed write to stdout becomes: `StdoutClosed` when its reader went
/// away, the error otherwise. Only these writes end a command quietly: a broken
/// pipe anywhere else (the inference worker's, say) stays an error.
pub(crate) fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let root = cli.root;
    match cli.command {
        Command::Scan { paths, engine, origin, sha256, format, pread } => {
            if sha256.is_some() && paths.len() > 1 {
                bail!("--sha256 pins one model; pass a single PATH");
            }
            if let Some(s) = &sha256
                && !policy::is_sha256(s)
            {
                bail!("--sha256 {s:?} is not 64 hex digits");
            }
            let input = ScanInput {
                origin,
                sha256,
                pinned_files: None,
                read_mode: if pread { ReadMode::Pread } else { ReadMode::Mmap },
            };
            // Opening the first model starts its hashing thread, the longest
            // single job of a scan, so it runs while the plugins load.
            let policy = load_policy(engine.policy.as_deref())?;
            let first = paths.first().map(|p| Model::open(p, input.read_mode, &policy.folder_limits).map(Arc::new));
            let pins = policy::load_pins(&Root::new(&root).pins())?;
            let (scanner, _policy) = scanner(&engine, &root, pins, policy)?;
            scan_all(&scanner, &paths, first, &input, format)
        }
        Command::Init => {
            let r = Root::new(&root);
            r.init().with_context(|| format!("creating {}", root.display()))?;
            outln!("initialised {}", root.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Admit { path, origin, signatures } => {
            lifecycle::admit(&Root::new(&root), &path, origin.as_deref(), &signatures)
        }
        Command::Watch { engine, once, settle_ms, jobs, dispatch, transfer, insecure_nats } => {
            let r = Root::new(&root);
            r.check()?;
            let (scanner, policy) =
                scanner(&engine, &root, Default::default(), load_policy(engine.policy.as_deref())?)?;
            let dispatcher = match &dispatch {
                Some(url) => {
                    Some(crate::scale_out::Dispatcher::connect(url, &policy, &scanner, transfer, insecure_nats)?)
                }
                None => None,
            };
            let mut q = Quarantine::new(r, &scanner, &policy)?;
            if let Some(d) = &dispatcher {
                errln!(
                    "airlock: scans go to the workers on {} (policy {}, bytes by {})",
                    dispatch.as_deref().unwrap_or(""),
                    d.digest,
                    match transfer {
                        crate::scale_out::Transfer::SharedPath => "the shared path",
                        crate::scale_out::Transfer::ObjectStore => "the Object Store bucket airlock-models",
                    }
                );
                q = q.with_scan(d);
            }
            lifecycle::watch(&q, once, std::time::Duration::from_millis(settle_ms), jobs.into())
        }
        Command::Worker { engine, nats, jobs, scratch, insecure_nats } => {
            let policy = load_policy(engine.policy.as_deref())?;
            // No pins of its own: each job carries the watcher's pins for its model.
            let (scanner, policy) = scanner(&engine, &root, Default::default(), policy)?;
            let scratch = scratch.unwrap_or_else(|| std::env::temp_dir().join("airlock-worker"));
            let claims = Root::new(&root).scanning();
            crate::scale_out::run_worker(&nats, &policy, scanner, jobs.into(), &scratch, &claims, insecure_nats)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::WorkerKey { file } => {
            let signer = if std::fs::symlink_metadata(&file).is_ok() {
                crate::scale_out::Signer::from_file(&file)?
            } else {
                let s = crate::scale_out::Signer::create(&file)?;
                errln!(
                    "airlock: made {} (mode 600); name it in the worker's scale_out.signing_key_file",
                    file.display()
                );
                s
            };
            outln!("{}", signer.public_key());
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { nats, policy, format } => {
            let policy = load_policy(policy.as_deref())?;
            let status = crate::scale_out::queue_status(&nats, &policy)?;
            lifecycle::print_queue(&status, format == OutputFormat::Json)
        }
        Command::List { format } => lifecycle::list(&Root::new(&root), format == OutputFormat::Json),
        Command::Show { name } => lifecycle::show(&Root::new(&root), &name),
        Command::Verify { name } => lifecycle::verify(&Root::new(&root), &name),
        Command::Rescan { name } => {
            crate::lifecycle::rescan(&Root::new(&root), &name, "cli").map_err(anyhow::Error::msg)?;
            outln!("{name}: moved back to incoming/");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { verify } => lifecycle::audit(&Root::new(&root), verify),
        Command::Serve { listen, token_file } => {
            let r = Root::new(&root);
            r.check()?;
            let token = crate::serve::token(token_file.as_ref())?;
            let writable = token.is_some();
            crate::serve::run(r, listen, token, |addr| {
                if !addr.ip().is_loopback() {
                    errln!(
                        "airlock serve: listening on {addr}, not loopback: anyone who reaches it can read the registry"
                    );
                }
                let mode = if writable { "rescan allowed with the token" } else { "read-only" };
                // The first line names the address: a test or a script that asked for port 0 reads it.
                let _ = writeln!(std::io::stdout(), "listening on http://{addr} ({mode})");
                let _ = std::io::stdout().flush();
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => plugin::new(&name, dir.as_deref(), sdk.as_deref()),
        Command::Plugin(PluginCommand::Build { dir }) => plugin::build(&dir),
        Command::Plugin(PluginCommand::Inspect { file, format }) => {
            plugin::inspect(&file, format == OutputFormat::Json)
        }
        Command::Plugin(PluginCommand::Pin { file, stage, formats }) => plugin::pin(&file, stage, &formats),
        Command::Policy(PolicyCommand::Check { engine }) => {
            let policy = match load_policy(engine.policy.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    outln!("PROBLEM  {e:#}");
                    return Ok(ExitCode::from(1));
                }
            };
            let plugin_dir = match &engine.plugin_dir {
                Some(d) => d.clone(),
                None => default_plugin_dir()?,
            };
            // The scans' cache: a check compiles each plugin once for them too.
            let cache = engine.cache_dir.clone().unwrap_or_else(|| default_cache_dir(&root));
            plugin::policy_check(&policy, &plugin_dir, cache)
        }
        Command::Policy(PolicyCommand::Digest { engine }) => {
            let policy = load_policy(engine.policy.as_deref())?;
            let (scanner, policy) = scanner(&engine, &root, Default::default(), policy)?;
            outln!("{}", crate::pipeline::digest::policy_digest(&policy, &scanner));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads the policy's plugins.
fn scanner(
    engine: &EngineArgs,
    root: &Path,
    pins: std::collections::BTreeMap<String, policy::Pin>,
    policy: Policy,
) -> Result<(Scanner, Policy)> {
    let plugin_dir = match &engine.plugin_dir {
        Some(d) => d.clone(),
        None => default_plugin_dir()?,
    };
    let cache = engine.cache_dir.clone().unwrap_or_else(|| default_cache_dir(root));
    let runtime = Runtime::new(Some(cache))?;
    Ok((Scanner::new(runtime, &policy, &plugin_dir, pins)?, policy))
}

fn load_policy(dir: Option<&Path>) -> Result<Policy> {
    Ok(match dir {
        Some(d) => Policy::load_dir(d)?,
        None if Path::new("/etc/airlock/policy.yaml").exists() => Policy::load_dir(Path::new("/etc/airlock"))?,
        None => Policy::builtin_default()?,
    })
}

fn default_plugin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the airlock binary")?;
    let dir = exe.parent().map(|p| p.join("plugins")).context("the binary has no parent folder")?;
    Ok(dir)
}

fn default_cache_dir(root: &Path) -> PathBuf {
    let root = Root::new(root);
    if root.state().is_dir() {
        return root.plugin_cache();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("airlock")
}

fn scan_all(
    scanner: &Scanner,
    paths: &[PathBuf],
    mut first: Option<Result<Arc<Model>, OpenError>>,
    input: &ScanInput,
    format: ScanFormat,
) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut worst = 0u8;
    let progress = Progress::new(true);
    // SARIF is one document for every model: kept until the last one is scanned.
    let mut sarif = Vec::new();
    for path in paths {
        let mut print = |e: Event| {
            if format == ScanFormat::Text {
                progress.event(&e);
            }
        };
        let opened =
            first.take().unwrap_or_else(|| Model::open(path, input.read_mode, scanner.folder_limits()).map(Arc::new));
        let files = opened.as_ref().map_or_else(
            |_| (Vec::new(), false),
            |m| (m.files.iter().map(|f| f.rel_path.clone()).collect(), m.kind == crate::artifact::ModelKind::Folder),
        );
        let result = opened.map_err(ScanError::from).map(|model| scanner.scan_model(&model, path, input, &mut print));
        progress.clear();
        let report = match result {
            Ok(outcome) => {
                if outcome.verdict != ModelVerdict::Pass {
                    worst = worst.max(1);
                }
                if format == ScanFormat::Text {
                    print_verdict(&mut out, &outcome).map_err(stdout_error)?;
                }
                serde_json::to_value(&outcome)?
            }
            Err(e) => {
                worst = 2;
                errln!("airlock: error: {}: {e}", path.display());
                serde_json::json!({
                    "model": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "path": path.display().to_string(),
                    "verdict": "error",
                    "failed_stage": null,
                    "reason": e.to_string(),
                    "sha256": null,
                    "stages": [],
                })
            }
        };
        match format {
            ScanFormat::Json => writeln!(out, "{report}").map_err(stdout_error)?,
            ScanFormat::Sarif => {
                sarif.push(sarif::Scanned { report, path: path.display().to_string(), files: files.0, folder: files.1 })
            }
            ScanFormat::Text => {}
        }
        out.flush().map_err(stdout_error)?;
    }
    if format == ScanFormat::Sarif {
        writeln!(out, "{}", serde_json::to_string_pretty(&sarif::log(&sarif))?).map_err(stdout_error)?;
    }
    Ok(ExitCode::from(worst))
}

pub(crate) const PREFIX: &str = "[quarantine]";

/// True when stderr is a terminal a person watches (not journald, not a pipe).
fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("JOURNAL_STREAM").is_none()
}

/// A stage progress bar on stderr for long scans: one per model, cleared
/// before its verdict line; only on a terminal, never under journald.
pub(crate) struct Progress {
    enabled: bool,
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
}

impl Progress {
    /// A bar only when `wanted` and stderr is a terminal a person watches.
    pub(crate) fn new(wanted: bool) -> Progress {
        Progress { enabled: wanted && interactive(), bar: std::sync::Mutex::new(None) }
    }

    /// Prints the event's log line above the bar and moves the bar.
    pub(crate) fn event(&self, e: &Event) {
        let print = || {
            let _ = print_event(&mut std::io::stdout().lock(), e);
        };
        if !self.enabled {
            return print();
        }
        let mut bar = self.bar.lock().unwrap_or_else(|p| p.into_inner());
        if let Event::Processing(name) = e {
            let pb = indicatif::ProgressBar::new(Stage::ALL.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:21}] stage {pos}/{len} {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.set_message(name.to_string());
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            *bar = Some(pb);
        }
        match bar.as_ref() {
            Some(pb) => {
                pb.suspend(print);
                match e {
                    Event::StageStart(stage, _) => pb.set_position(stage.number() as u64 - 1),
                    Event::StageDone(r) => pb.set_position(r.number as u64),
                    Event::Processing(_) => {}
                }
            }
            None => print(),
        }
    }

    /// Removes the current model's bar (before its verdict line).
    pub(crate) fn clear(&self) {
        if let Some(pb) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            pb.finish_and_clear();
        }
    }
}

pub(crate) fn print_event(out: &mut impl Write, e: &Event) -> std::io::Result<()> {
    match e {
        Event::Processing(name) => writeln!(out, "{PREFIX} Processing: {}", one_line(name)),
        Event::StageStart(stage, plugin) => {
            if *stage == crate::policy::Stage::SourcePolicy && plugin.is_none() {
                writeln!(
                    out,
                    "{PREFIX} Stage {}/{}: {} — checking origin...",
                    stage.number(),
                    Stage::ALL.len(),
                    stage.name()
                )?;
            }
            Ok(())
        }
        Event::StageDone(r) => print_stage(out, r),
    }
}

fn print_stage(out: &mut impl Write, r: &StageResult) -> std::io::Result<()> {
    let verdict = r.verdict.upper();
    // In a stage with several plugins, say which one this line is from.
    let who = match &r.plugin_info {
        Some(i) if r.shared_stage => format!("{}: ", i.name),
        _ => String::new(),
    };
    let summary = if r.summary.is_empty() { String::new() } else { format!(" ({who}{})", r.summary) };
    writeln!(out, "{PREFIX} Stage {}/{}: {} — {verdict}{summary}", r.number, Stage::ALL.len(), r.stage)?;
    if let Some(why) = &r.still_ran {
        writeln!(out, "{PREFIX}   ({why})")?;
    }
    if r.verdict == StageVerdict::Fail {
        // Findings that only restate the summary add nothing to the log.
        for f in r.findings.iter().filter(|f| !f.message.ends_with(&r.summary) && !r.summary.ends_with(&f.message)) {
            for line in f.message.lines() {
                writeln!(out, "{PREFIX}   {line}")?;
            }
        }
    }
    Ok(())
}

/// A name or reason as one log line: control characters (a newline, a
/// carriage return, an escape sequence) are written escaped, so a model
/// named to look like another log line cannot forge one under journald or
/// reach the terminal.
pub(crate) fn one_line(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

fn print_verdict(out: &mut impl Write, o: &Outcome) -> std::io::Result<()> {
    match o.verdict {
        ModelVerdict::Pass => {
            writeln!(out, "{PREFIX} PASSED: {} (sha256={})", one_line(&o.model), o.sha256.as_deref().unwrap_or("n/a"))
        }
        ModelVerdict::Fail => writeln!(
            out,
            "{PREFIX} REJECTED: {} — {}: {}",
            one_line(&o.model),
            o.failed_stage.map_or("?", |f| f.name()),
            one_line(o.reason.as_deref().unwrap_or(""))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn control_characters_are_escaped_in_log_lines() {
        assert_eq!(one_line("plain name.gguf"), "plain name.gguf");
        assert_eq!(one_line("x\n[quarantine] PROMOTED: y"), "x\\n[quarantine] PROMOTED: y");
        assert_eq!(one_line("a\r\x1b[31mb\tc"), "a\\r\\u{1b}[31mb\\tc");
    }
}
