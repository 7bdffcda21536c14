//! Scale-out over NATS JetStream. `airlock worker` takes scan jobs from a
//! work-queue stream and publishes each verdict to a results stream;
//! `airlock watch --dispatch` publishes its claims as jobs and promotes or
//! rejects from those results. The lifecycle stays single-writer: only the
//! watcher moves models and writes the audit log, and it accepts a result only
//! when the worker scanned the same bytes under the same policy.
//!
//! Delivery: a job is acked only after its result is stored in the results
//! stream. A worker that dies mid-scan stops sending progress, the job comes
//! back after the ack wait to another worker, and after `MAX_SCANS` tries it
//! goes to `airlock.dead.<id>` with the reason, which the watcher turns into a
//! rejection (fail closed) that `rescan` can retry. A worker that hands a job
//! back says why on `airlock.dead.<id>_handed_back`, so the dead letter names
//! the cause even when the delivery that files it is not the one that refused.
//!
//! Bytes: a job names the model by its path on storage the workers share, or
//! (`--transfer object-store`) by objects the watcher put in a JetStream
//! Object Store bucket; the worker streams those into a scratch folder and
//! checks each file's size and sha256 against the job before it scans.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, AckKind, consumer::pull, object_store, stream};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::artifact::{FolderLimits, Format, Model, ModelKind, ReadMode, Sidecars};
use crate::pipeline::{Outcome, ScanInput, Scanner};
use crate::policy::{NatsAuth, Policy};

pub const JOBS_STREAM: &str = "AIRLOCK_JOBS";
/// Each job is published on `airlock.jobs.<claim id>`, so a restarted
/// watcher can ask the stream whether its job is still there (queued or held
/// by a worker) instead of sending it a second time.
const JOBS_SUBJECTS: &str = "airlock.jobs.*";
pub const RESULTS_STREAM: &str = "AIRLOCK_RESULTS";
/// The durable pull consumer every worker shares.
pub const CONSUMER: &str = "airlock-workers";
/// airlock's own reply subjects. Jobs reach a worker as replies to its pull
/// requests; under the common `_INBOX.>` permission any other login could
/// read them (red team D14). The shipped permission sets allow this prefix
/// to airlock's logins only.
pub const INBOX_PREFIX: &str = "_AIRLOCK_INBOX";
/// A job not acked (or kept alive by progress) for this long goes to another worker.
const ACK_WAIT: Duration = Duration::from_secs(20);
/// How often a worker tells the server it is still on a job.
const PROGRESS_EVERY: Duration = Duration::from_secs(4);
/// How long a worker tries to store why it hands a job back: well inside
/// ACK_WAIT, so the job is not redelivered while the note is on its way.
const NOTE_DEADLINE: Duration = Duration::from_secs(10);
/// Scans tried for one job; any later delivery only files the dead letter.
/// The consumer itself does not cap deliveries: a delivery can be lost (to a
/// worker killed with a pull request pending), and a capped consumer that lost
/// its last one would hold the job forever with no letter for the watcher.
pub const MAX_SCANS: i64 = 3;
/// Results are kept this long for inspection (`nats stream view AIRLOCK_RESULTS`).
/// The most the results stream holds; the oldest messages go first.
const RESULTS_MAX_BYTES: i64 = 1 << 30;
const RESULTS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The Object Store bucket models travel in with `--transfer object-store`.
pub const MODELS_BUCKET: &str = "airlock-models";
/// The watcher deletes a model's objects once it has the reply; this bounds
/// what a watcher that died first leaves behind.
const MODELS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the workers get a model's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transfer {
    /// Workers read the claim folder at the same path (NFS, CephFS, a shared disk).
    SharedPath,
    /// The watcher puts every file in the `airlock-models` Object Store bucket;
    /// workers stream them into a scratch folder, checked against the job's sha256s.
    ObjectStore,
}

fn job_subject(id: &str) -> String {
    format!("airlock.jobs.{id}")
}

fn results_subject(id: &str) -> String {
    format!("airlock.results.{id}")
}

fn dead_subject(id: &str) -> String {
    format!("airlock.dead.{id}")
}

/// Where a worker that hands delivery `delivery` of a job back says why (one
/// token, so the `airlock.dead.*` subject filter and permission cover it). Job
/// ids are digits and dashes: no job's dead subject holds this. One subject per
/// delivery: the dead letter quotes the latest note by its delivery number, not
/// by which message the server reports last on a shared subject.
fn handed_back_subject(id: &str, delivery: i64) -> String {
    format!("airlock.dead.{id}{HANDED_BACK}_{delivery}")
}

const HANDED_BACK: &str = "_handed_back";

/// One model to scan: a path on storage the watcher and the workers share.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The watcher's claim id; results come back under it.
    pub id: String,
    pub name: String,
    pub path: PathBuf,
    /// The pinned sha256 of a file model, if any.
    pub sha256: Option<String>,
    /// The pinned per-file sha256s of a folder model, if any.
    pub pinned_files: Option<BTreeMap<String, String>>,
    /// `policy_digest` of the watcher's policy; a worker with another refuses the job.
    pub policy_digest: String,
    /// Set when the bytes travel in the Object Store (`path` is then just the name).
    #[serde(default)]
    pub objects: Option<Objects>,
    /// Set for the jobs of a split scan: one part per weight shard, then the join.
    #[serde(default)]
    pub split: Option<SplitJob>,
    /// What travels with the model (origin, signatures) as the watcher read
    /// it at claim. The worker judges with exactly these, whichever way the
    /// bytes travel: a scratch copy has none of its own, and a shared path's
    /// must be the same.
    pub sidecars: Sidecars,
    /// The links, special and hardlinked files the watcher saw in a folder
    /// (never followed, never sent): a scratch copy is judged with them, as
    /// the format gate on the watcher would.
    #[serde(default)]
    pub surroundings: Vec<SurroundingRef>,
}

/// A [`crate::artifact::Surrounding`] in a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurroundingRef {
    pub kind: String,
    pub path: String,
    pub detail: String,
}

impl SurroundingRef {
    fn of(s: &crate::artifact::Surrounding) -> SurroundingRef {
        SurroundingRef { kind: s.kind.to_string(), path: s.path.clone(), detail: s.detail.clone() }
    }

    fn to_surrounding(&self) -> crate::artifact::Surrounding {
        let kind = match self.kind.as_str() {
            "symlink" => "symlink",
            "hardlink" => "hardlink",
            _ => "special-file",
        };
        crate::artifact::Surrounding { kind, path: self.path.clone(), detail: self.detail.clone() }
    }
}

/// A sharded folder is scanned as one job per weight shard, each running
/// `part` of the static-scan plugins that consent to be split, and one join
/// job: the whole scan, with those plugins joined from the parts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitJob {
    Part {
        /// 1-based, of `of`: the shard's place in the model's file order.
        part: usize,
        of: usize,
        /// The shard's files, by their paths in the model.
        files: Vec<String>,
        plugins: Vec<SplitPlugin>,
    },
    Join {
        plugins: Vec<SplitPlugin>,
        /// The part results the watcher checked, in shard order.
        parts: Vec<PartRef>,
    },
}

/// A static-scan plugin run in parts: its position in the stage's chain, and its label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlugin {
    pub index: usize,
    pub label: String,
}

/// A part result as the watcher accepted it: its job, and the sha256 of the
/// stored message, so the join reads exactly what was checked.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartRef {
    pub id: String,
    /// Where it is in the results stream.
    pub sequence: u64,
    pub sha256: String,
}

/// A worker's parts of one shard.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartResult {
    pub id: String,
    pub worker: String,
    pub delivery: i64,
    pub policy_digest: String,
    /// The shard's files with their sha256 as the worker read them.
    pub files: BTreeMap<String, String>,
    /// One per plugin of the job, in its order: the part, or why there is none.
    pub parts: Vec<Result<String, String>>,
}

/// The job id of part `n` of a claim: one subject token, no `_` (see `handed_back_subject`).
fn part_id(claim: &str, n: usize) -> String {
    format!("{claim}-part{n}")
}

/// A model's files in the Object Store bucket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Objects {
    pub bucket: String,
    /// A folder model (files below a folder named after the model) or one file.
    pub folder: bool,
    pub files: Vec<ObjectFile>,
}

/// One file of a model in the bucket, with what the watcher read in its claim.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectFile {
    /// The file's path in the model (for a single file, its name).
    pub rel_path: String,
    pub object: String,
    pub size: u64,
    pub sha256: String,
}

/// A worker's verdict on a job.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobResult {
    pub id: String,
    /// `<host>/<pid>` of the worker that scanned it.
    pub worker: String,
    /// Which delivery of the job this was (1 on the first try).
    pub delivery: i64,
    pub policy_digest: String,
    /// Every file's sha256 as the worker read it, by its path in the model.
    pub files: BTreeMap<String, String>,
    /// The sidecars the worker judged with, as [`Sidecars::digests`].
    pub sidecars: BTreeMap<String, String>,
    pub outcome: Outcome,
}

/// A job no worker could finish, and why. The same shape, on
/// `handed_back_subject`, records a hand-back of a job still in play.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: String,
    /// The model's name (empty in letters from airlock before 0.2).
    #[serde(default)]
    pub name: String,
    pub worker: String,
    pub deliveries: i64,
    pub reason: String,
}

/// What came back for a job.
pub enum Reply {
    Result(Box<JobResult>),
    Dead(DeadLetter),
    /// The watcher refused a part of a split scan (the reason names it).
    Refused(String),
}

pub use crate::pipeline::digest::policy_digest;

mod signing;
pub use signing::Signer;

/// A claim id as the watcher makes them (`<nanos>-<pid>-<n>`), or a part's (`<claim id>-part<n>`).
fn is_job_id(id: &str) -> bool {
    let claim = id.rsplit_once("-part").filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let claim = claim.map_or(id, |(c, _)| c);
    let parts: Vec<&str> = claim.split('-').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.len() <= 40 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// 16 bytes from the kernel's random source, in hex.
fn random_hex() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        // Still unique (time and pid), only no longer secret; said in the log.
        tracing::warn!("reading /dev/urandom: {e}; the result's message id is predictable");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    hex::encode(b)
}

fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", host.trim(), std::process::id())
}

/// Connects with the policy's credentials. A server that also lets a client
/// in without credentials is refused unless `insecure` (`--insecure-nats`):
/// anyone who reaches it could publish a forged result or read every job
/// (red team D8).
async fn connect(url: &str, auth: Option<&NatsAuth>, name: &str, insecure: bool) -> Result<async_nats::Client> {
    let open = match auth {
        // Connected below without credentials: if that works, the server is open.
        None => true,
        Some(_) => async_nats::ConnectOptions::new()
            .name(format!("{name} (checking that the server asks for credentials)"))
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .is_ok(),
    };
    let client = connect_with(url, auth, name).await?;
    if open {
        let why = format!(
            "the NATS server at {url} lets in clients without credentials, so anyone who reaches it can read every              job and publish a forged result"
        );
        if !insecure {
            bail!(
                "{why}. Give the server an authorization block and the policy a `nats:` section                  (docs/scale-out.md, \"Credentials\"), or pass --insecure-nats to accept the risk"
            );
        }
        tracing::warn!("--insecure-nats: {why}");
    }
    Ok(client)
}

async fn connect_with(url: &str, auth: Option<&NatsAuth>, name: &str) -> Result<async_nats::Client> {
    let options = match auth {
        None => async_nats::ConnectOptions::new(),
        Some(NatsAuth::UserPassword { user, password_file }) => {
            let pass = std::fs::read_to_string(password_file)
                .with_context(|| format!("reading the NATS password file {}", password_file.display()))?;
            async_nats::ConnectOptions::with_user_and_password(user.clone(), pass.trim_end().to_string())
        }
        Some(NatsAuth::Nkey { seed_file }) => {
            let seed = std::fs::read_to_string(seed_file)
                .with_context(|| format!("reading the NATS nkey seed file {}", seed_file.display()))?;
            async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        }
    };
    let how = match auth {
        None => "without credentials (the policy has no `nats:` section)",
        Some(NatsAuth::UserPassword { .. }) => "with the policy's user and password",
        Some(NatsAuth::Nkey { .. }) => "with the policy's nkey",
    };
    // The server reports a refused subject (a permissions violation) only
    // as an asynchronous error; the request itself just times out. Logging
    // it names the subject the login may not use.
    let server = url.to_string();
    let options = options.event_callback(move |event| {
        let server = server.clone();
        async move {
            match event {
                async_nats::Event::ServerError(e) => tracing::error!("the NATS server at {server} says: {e}"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to the NATS server at {server}; reconnecting")
                }
                _ => {}
            }
        }
    });
    options
        .name(name)
        .custom_inbox_prefix(INBOX_PREFIX)
        .connect(url)
        .await
        .with_context(|| format!("connecting to the NATS server at {url} {how}"))
}

/// Opens the stream, or creates it if it is missing. A worker and a watcher
/// started together (both units at boot) can both find it missing; the
/// server then refuses the slower create with "subjects overlap with an
/// existing stream", though the configurations are the same. The second try
/// opens the stream the other one made; a real conflict fails again.
async fn open_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    match js.get_or_create_stream(config.clone()).await {
        Ok(s) => Ok(s),
        Err(e) => {
            tracing::info!("creating the stream {}: {e}; opening it again", config.name);
            tokio::time::sleep(Duration::from_millis(500)).await;
            js.get_or_create_stream(config).await
        }
    }
}

/// Creates the two streams if they are missing (file storage: they outlive a server restart).
async fn ensure_streams(js: &jetstream::Context) -> Result<(stream::Stream, stream::Stream)> {
    let jobs = open_or_create_stream(js, stream::Config {
            name: JOBS_STREAM.into(),
            subjects: vec![JOBS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .with_context(|| {
            format!(
                "creating or opening the JetStream stream {JOBS_STREAM} (is the server run with -js? may this login \
                 use it? a worker's login with the AIRLOCK_WORKER permissions cannot create it: start the watcher first)"
            )
        })?;
    let results = open_or_create_stream(
        js,
        stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec!["airlock.results.*".into(), "airlock.dead.*".into()],
            storage: stream::StorageType::File,
            max_age: RESULTS_MAX_AGE,
            // Bounded (red team D15): a flood of junk ages out the oldest
            // messages instead of filling the disk. A result lost that way is
            // found missing by its waiting watcher, which sends the job again.
            max_bytes: RESULTS_MAX_BYTES,
            max_messages_per_subject: 64,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("creating or opening the JetStream stream {RESULTS_STREAM}"))?;
    Ok((jobs, results))
}

/// A jobs stream made by an earlier airlock took every job on the one
/// subject `airlock.jobs`; jobs now go on `airlock.jobs.<claim id>`. The
/// watcher (whose login may update streams) adds the subject; jobs already in
/// the stream stay there and workers still take them.
async fn take_jobs_by_claim(js: &jetstream::Context, jobs: &stream::Stream) -> Result<()> {
    // The configuration as ensure_streams just read or made it.
    let mut config = jobs.cached_info().config.clone();
    if config.subjects.iter().any(|s| s == JOBS_SUBJECTS) {
        return Ok(());
    }
    tracing::warn!("the stream {JOBS_STREAM} takes jobs on {:?}; adding {JOBS_SUBJECTS}", config.subjects);
    config.subjects.push(JOBS_SUBJECTS.into());
    js.update_stream(&config).await.with_context(|| format!("adding the subject {JOBS_SUBJECTS} to {JOBS_STREAM}"))?;
    Ok(())
}

/// Publishes and waits for the stream's acknowledgement, retrying through a
/// lost connection (a server restart) until `deadline`. The message id makes
/// a retry of a publish that did land a no-op. For an id that must be
/// this message's own (`own_id`, a result's), finding it taken on the first
/// try is an error: another client published under it.
async fn publish_stored(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    own_id: bool,
    payload: Vec<u8>,
    deadline: Duration,
) -> Result<()> {
    publish_signed(js, subject, msg_id, own_id, payload, None, deadline).await
}

/// [`publish_stored`], with headers (a result's signature).
async fn publish_signed(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    own_id: bool,
    payload: Vec<u8>,
    headers: Option<async_nats::HeaderMap>,
    deadline: Duration,
) -> Result<()> {
    let started = Instant::now();
    let payload = bytes::Bytes::from(payload);
    let mut first = true;
    loop {
        let attempt = async {
            let mut publish = jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(msg_id);
            if let Some(h) = &headers {
                for (name, values) in h.iter() {
                    for v in values {
                        publish = publish.header(name.clone(), v.clone());
                    }
                }
            }
            let ack = js.send_publish(subject.clone(), publish).await?.await?;
            Ok::<_, async_nats::Error>(ack.duplicate)
        };
        match attempt.await {
            // The first try found the id taken: another client published under
            // it, and the server dropped this message as its duplicate.
            Ok(true) if first && own_id => {
                return Err(anyhow::anyhow!(
                    "publishing to {subject}: the server already held a message with id {msg_id} and dropped this \
                     one as a duplicate"
                ));
            }
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() < deadline => {
                first = false;
                tracing::warn!("publishing to {subject}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("publishing to {subject}: {e}")),
        }
    }
}

/// Opens the models bucket, creating it if it is missing (file storage).
async fn models_bucket(js: &jetstream::Context) -> Result<object_store::ObjectStore> {
    if let Ok(b) = js.get_object_store(MODELS_BUCKET).await {
        return Ok(b);
    }
    js.create_object_store(object_store::Config {
        bucket: MODELS_BUCKET.into(),
        description: Some("models on their way from the airlock watcher to its workers".into()),
        max_age: MODELS_MAX_AGE,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the JetStream Object Store bucket {MODELS_BUCKET}"))
}

// ---------------------------------------------------------------------------
// The worker.

/// `airlock worker`: scans jobs, `jobs` at a time, until SIGTERM or SIGINT
/// (the scans in hand are finished and their results published first).
/// Models that come through the Object Store are written below `scratch`.
pub fn run_worker(
    url: &str,
    policy: &Policy,
    scanner: Scanner,
    jobs: usize,
    scratch: &Path,
    claims: &Path,
    insecure: bool,
) -> Result<()> {
    let digest = policy_digest(policy, &scanner);
    let signer = Arc::new(Signer::from_policy(policy)?);
    let trusted = Arc::new(policy.scale_out.trusted_workers.clone());
    make_scratch(scratch)?;
    // Resolved once: shared-path jobs must name a model below it. A worker
    // that only takes Object Store jobs may have no such folder.
    let claims = Arc::new(std::fs::canonicalize(claims).unwrap_or_else(|_| claims.to_path_buf()));
    let scratch = Arc::new(scratch.to_path_buf());
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let name = worker_name();
    rt.block_on(async {
        let client = connect(url, policy.nats.as_ref(), &format!("airlock-worker {name}"), insecure).await?;
        let js = jetstream::new(client);
        let consumer = open_consumer(&js).await?;
        eprintln!(
            "airlock worker {name}: taking jobs from {JOBS_STREAM} on {url}, {jobs} at a time (policy {digest}); \
             signing results as {}",
            signer.public_key()
        );
        let scanner = Arc::new(scanner);
        let mut loops = Vec::new();
        for _ in 0..jobs {
            let keys = Trust { signer: signer.clone(), trusted: trusted.clone(), claims: claims.clone() };
            let (consumer, js, scanner, digest, name, stop, scratch) = (
                consumer.clone(),
                js.clone(),
                scanner.clone(),
                digest.clone(),
                name.clone(),
                stop.clone(),
                scratch.clone(),
            );
            loops.push(tokio::spawn(async move {
                let mut consumer = consumer;
                while !stop.load(Ordering::Relaxed) {
                    let next = async {
                        let mut batch =
                            consumer.fetch().max_messages(1).expires(Duration::from_secs(2)).messages().await?;
                        Ok::<_, async_nats::Error>(match batch.next().await {
                            Some(m) => Some(m?),
                            None => None,
                        })
                    };
                    match next.await {
                        Ok(Some(msg)) => handle(&js, msg, &scanner, &digest, &name, &scratch, &keys).await,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("fetching a job: {e}; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            // A deleted stream or consumer (red team D13) is made again;
                            // on a lost connection this fails and the fetch is retried.
                            match open_consumer(&js).await {
                                Ok(c) => consumer = c,
                                Err(e) => tracing::warn!("{e:#}"),
                            }
                        }
                    }
                }
            }));
        }
        for l in loops {
            let _ = l.await;
        }
        eprintln!("airlock worker {name}: stopped");
        Ok(())
    })
}

/// Opens the streams and the workers' durable consumer, making any that is
/// missing. Create or update: a consumer made by an older airlock (which
/// capped deliveries at MAX_SCANS + 1) gets the uncapped config.
async fn open_consumer(js: &jetstream::Context) -> Result<jetstream::consumer::Consumer<pull::Config>> {
    let (jobs_stream, _) = ensure_streams(js).await?;
    jobs_stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            // Uncapped: deliveries past MAX_SCANS only file the dead letter (see MAX_SCANS).
            max_deliver: -1,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating or opening the consumer {CONSUMER} on {JOBS_STREAM}"))
}

/// The worker's scratch folder: a real folder (not a link), owned by this
/// user and closed to others, so no one else can swap the bytes it scans.
fn make_scratch(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the scratch folder {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "the scratch folder {} is not a folder (a link?)", dir.display());
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    anyhow::ensure!(
        meta.uid() == me && meta.mode() & 0o077 == 0,
        "the scratch folder {} must belong to this user (uid {me}) with mode 700; it is uid {} mode {:o}",
        dir.display(),
        meta.uid(),
        meta.mode() & 0o7777
    );
    Ok(())
}

/// Whether a shared-path job names a model inside a claim folder under
/// `claims` (the worker's `<root>/quarantine/scanning`, resolved): its file
/// name is the job's model name, and its folder, links resolved, lies below
/// `claims`.
fn inside_claims(job: &Job, claims: &Path) -> Result<(), String> {
    let refused = |why: &str| {
        Err(format!(
            "the job names {}, {why}; a worker reads shared-path models only in claim folders under {} (run it with \
             the watcher's --root)",
            job.path.display(),
            claims.display()
        ))
    };
    if job.path.file_name().and_then(|n| n.to_str()) != Some(job.name.as_str()) {
        return refused("whose file name is not the job's model name");
    }
    let Some(parent) = job.path.parent() else { return refused("which has no folder") };
    match std::fs::canonicalize(parent) {
        Ok(dir) if dir.starts_with(claims) && dir != claims => Ok(()),
        Ok(_) => refused("which is outside them"),
        Err(e) => refused(&format!("whose folder cannot be resolved ({e})")),
    }
}

/// What a worker trusts and answers with: its own key, which signs its
/// results; the keys whose part results it accepts in a join; and the claim
/// folders (its `--root`'s, resolved) below which a shared-path job may point.
struct Trust {
    signer: Arc<Signer>,
    trusted: Arc<Vec<String>>,
    claims: Arc<PathBuf>,
}

/// One delivery of a job: scan it, store the result, then ack.
async fn handle(
    js: &jetstream::Context,
    msg: jetstream::Message,
    scanner: &Arc<Scanner>,
    digest: &str,
    me: &str,
    scratch: &Path,
    keys: &Trust,
) {
    let delivery = msg.info().map(|i| i.delivered).unwrap_or(1);
    let job: Job = match serde_json::from_slice(&msg.payload) {
        Ok(j) => j,
        Err(e) => {
            // Not from a watcher: there is no claim to answer, so it is dropped, loudly.
            tracing::error!("a message on {} is not a job ({e}); dropped", msg.subject);
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
    };
    // An id that is not a claim id (or a part of one) names no claim to
    // answer and could make subjects of its own: refused at once, never retried.
    if !is_job_id(&job.id) {
        tracing::error!("a job on {} has the id {:?}, which is not a claim id; dropped", msg.subject, job.id);
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    }
    if delivery > MAX_SCANS {
        let mut reason = format!(
            "{} deliveries of this job ended without a verdict: workers died, lost the server, handed it back, or a \
             delivery was lost in transit (this one reached {me})",
            delivery - 1
        );
        match last_hand_back(js, &job.id).await {
            Ok(Some(h)) => reason.push_str(&format!(
                "; the last hand-back, delivery {} to worker {}, said: {}",
                h.deliveries, h.worker, h.reason
            )),
            Ok(None) => reason.push_str("; no worker handed it back with a reason"),
            Err(e) => reason.push_str(&format!("; the hand-backs could not be read: {e}")),
        }
        dead_letter(js, &msg, &job, delivery, me, reason).await;
        return;
    }
    // A shared-path job may name only a claim under this worker's data root
    // (red team D12: a job naming /etc/passwd was scanned and its digest stored).
    if job.objects.is_none()
        && let Err(why) = inside_claims(&job, &keys.claims)
    {
        dead_letter(js, &msg, &job, delivery, me, why).await;
        return;
    }
    if job.policy_digest != digest {
        let reason = format!(
            "worker {me} runs policy {digest}, the job was made under {}: workers and watcher must load the same policy, plugins and airlock version",
            job.policy_digest
        );
        retry_or_dead(js, &msg, &job, delivery, me, reason).await;
        return;
    }
    eprintln!("airlock worker {me}: scanning {} (job {}, delivery {delivery})", job.what(), job.id);
    let msg = Arc::new(msg);
    let progress = {
        let msg = msg.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        })
    };
    // A join reads the parts the watcher checked before it fetches any bytes.
    let joined = match &job.split {
        Some(SplitJob::Join { plugins, parts }) => match read_parts(js, plugins, parts, digest, &keys.trusted).await {
            Ok(j) => Some(j),
            Err(why) => {
                progress.abort();
                retry_or_dead(js, &msg, &job, delivery, me, why).await;
                return;
            }
        },
        _ => None,
    };
    // Bytes from the Object Store land in a scratch folder that goes when the scan is done.
    let local = match &job.objects {
        None => None,
        Some(set) => match fetch(js, &job, set, scratch, delivery, scanner.folder_limits()).await {
            Ok(s) => {
                let bytes: u64 = set.files.iter().map(|f| f.size).sum();
                let n = set.files.len();
                eprintln!(
                    "airlock worker {me}: fetched {} ({n} file{}, {bytes} bytes) from {MODELS_BUCKET}, every sha256 as the job says",
                    job.what(),
                    if n == 1 { "" } else { "s" }
                );
                Some(s)
            }
            Err(why) => {
                progress.abort();
                retry_or_dead(js, &msg, &job, delivery, me, why).await;
                return;
            }
        },
    };
    let scanned = {
        let (scanner, job, who) =
            (scanner.clone(), job.clone(), Done { me: me.into(), delivery, digest: digest.into() });
        let path = local.as_ref().map_or_else(|| job.path.clone(), |s| s.model.clone());
        tokio::task::spawn_blocking(move || work(&scanner, &job, &path, joined, who)).await
    };
    drop(local);
    let (payload, said) = match scanned {
        Ok(Ok(done)) => done,
        Ok(Err(why)) => {
            progress.abort();
            retry_or_dead(js, &msg, &job, delivery, me, why).await;
            return;
        }
        Err(e) => {
            progress.abort();
            retry_or_dead(js, &msg, &job, delivery, me, format!("the scan panicked on worker {me}: {e}")).await;
            return;
        }
    };
    // Said plainly, not left to the server's refusal of the publish (which
    // would only bring the job back to fail the same way).
    let max = js.client().server_info().max_payload;
    if max > 0 && payload.len() > max {
        progress.abort();
        let why = format!(
            "the result is {} bytes; the NATS server takes at most {max} per message (max_payload in its config)",
            payload.len()
        );
        retry_or_dead(js, &msg, &job, delivery, me, why).await;
        return;
    }
    let size = payload.len();
    // Stored first, acked second: a worker killed in between leaves the job to be
    // scanned again, never a job acked without a verdict.
    // An id no other client can know beforehand: a forger who published
    // under it first would have the server drop the genuine result as a duplicate.
    let msg_id = format!("{}-{delivery}-{}", job.id, random_hex());
    let subject = results_subject(&job.id);
    let headers = match keys.signer.headers(&subject, &payload) {
        Ok(h) => h,
        Err(e) => {
            progress.abort();
            retry_or_dead(js, &msg, &job, delivery, me, format!("worker {me} could not sign its result: {e:#}")).await;
            return;
        }
    };
    let stored = publish_signed(js, subject, &msg_id, true, payload, Some(headers), ACK_WAIT * 3).await;
    progress.abort();
    match stored {
        Ok(()) => {
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(
                    "job {}: the result is stored but the ack failed ({e}); it may be scanned again",
                    job.id
                );
            }
            eprintln!("airlock worker {me}: {} {said} (job {}, result {} bytes)", job.what(), job.id, size);
        }
        Err(e) => {
            // Not acked: the job comes back after the ack wait.
            tracing::error!("job {}: {e:#}; left for redelivery", job.id);
        }
    }
}

impl Job {
    /// The model, or which part of it, for log lines.
    fn what(&self) -> String {
        match &self.split {
            Some(SplitJob::Part { part, of, .. }) => format!("part {part} of {of} of {}", self.name),
            _ => self.name.clone(),
        }
    }
}

/// Who did a job, for its result.
struct Done {
    me: String,
    delivery: i64,
    digest: String,
}

/// Does a job (a whole scan, a part or a join) and encodes its result; also
/// says what it found, for the log line.
fn work(
    scanner: &Scanner,
    job: &Job,
    path: &Path,
    joined: Option<Joined>,
    who: Done,
) -> Result<(Vec<u8>, String), String> {
    let (payload, said) = match &job.split {
        Some(SplitJob::Part { files, plugins, .. }) => {
            let (files, parts) = part_job(scanner, job, path, files, plugins)?;
            let refused = parts.iter().filter(|p| p.is_err()).count();
            let said = if refused == 0 { "done".to_string() } else { format!("done, {refused} plugin(s) refused") };
            let r = PartResult {
                id: job.id.clone(),
                worker: who.me,
                delivery: who.delivery,
                policy_digest: who.digest,
                files,
                parts,
            };
            (serde_json::to_vec(&r), said)
        }
        _ => {
            let joined = joined.unwrap_or_default();
            let (files, sidecars, mut outcome) = scan_job(scanner, job, path, &joined)?;
            // The parts must be of the bytes this worker joined them over.
            for (f, (sha, worker)) in &joined.files {
                if files.get(f) != Some(sha) {
                    return Err(format!(
                        "{f}: worker {worker} made its part from sha256 {sha}, this worker reads {:?}",
                        files.get(f)
                    ));
                }
            }
            for s in outcome.stages.iter_mut().filter(|s| s.log.first().is_some_and(|l| l.starts_with("joined from"))) {
                s.log.insert(1, format!("parts by {}", joined.workers.join(", ")));
            }
            let pass = outcome.verdict == crate::pipeline::ModelVerdict::Pass;
            let r = JobResult {
                id: job.id.clone(),
                worker: who.me,
                delivery: who.delivery,
                policy_digest: who.digest,
                files,
                sidecars,
                outcome,
            };
            (serde_json::to_vec(&r), if pass { "PASS" } else { "FAIL" }.to_string())
        }
    };
    Ok((payload.map_err(|e| format!("the result cannot be encoded: {e}"))?, said))
}

/// Opens the job's model (at `path`: shared storage or the scratch copy)
/// read-only and scans it, the plugins in `joined` joined from their parts
/// (which must cover every weight shard);
/// returns every file's sha256, the sidecars' and the outcome.
type Scanned = (BTreeMap<String, String>, BTreeMap<String, String>, Outcome);
fn scan_job(scanner: &Scanner, job: &Job, path: &Path, joined: &Joined) -> Result<Scanned, String> {
    let model = open_job_model(scanner, job, path)?;
    // A join over fewer shards than the model holds would judge the rest
    // unseen (a planted layer in a missing shard passes): refused before any
    // plugin runs, whoever sent the job.
    if !joined.parts.is_empty() {
        let shards = weight_shards(&model);
        let missing: Vec<&String> = shards.iter().filter(|f| !joined.files.contains_key(*f)).collect();
        let extra: Vec<&String> = joined.files.keys().filter(|f| !shards.contains(f)).collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(format!(
                "the join's parts are of {} file(s), the model's weight shards are {}: no part for {missing:?}, \
                 parts of no weight shard {extra:?}; a join needs exactly one part per shard",
                joined.files.len(),
                shards.len()
            ));
        }
    }
    let input = ScanInput {
        origin: None,
        sha256: job.sha256.clone(),
        pinned_files: job.pinned_files.clone(),
        read_mode: ReadMode::default(),
    };
    let outcome = scanner.scan_model_joined(&model, path, &input, &joined.parts, &mut |_| {});
    let files = file_digests(&model)?;
    model.check_unchanged()?;
    Ok((files, model.sidecars.digests(), outcome))
}

/// Opens the job's model with the sidecars the job carries. On shared
/// storage the sidecars beside the model must be those the watcher claimed
/// (a changed or vanished signature is refused, named); a scratch copy from
/// the Object Store has none of its own and takes the job's.
fn open_job_model(scanner: &Scanner, job: &Job, path: &Path) -> Result<Arc<Model>, String> {
    if !path.is_absolute() {
        return Err(format!("{}: a job's path must be absolute", path.display()));
    }
    let mut model = Model::open(path, ReadMode::default(), scanner.folder_limits())
        .map_err(|e| format!("{}: cannot be opened on this worker: {e}", path.display()))?;
    if job.objects.is_none() && model.sidecars != job.sidecars {
        let (here, sent) = (model.sidecars.digests(), job.sidecars.digests());
        let differ: Vec<String> = here
            .keys()
            .chain(sent.keys())
            .filter(|k| here.get(*k) != sent.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.map_or("absent".to_string(), Clone::clone);
                format!("{k}: the claim held {}, this worker reads {}", show(sent.get(k)), show(here.get(k)))
            })
            .collect();
        return Err(format!(
            "{}: the model's sidecars are not those the watcher claimed ({})",
            path.display(),
            differ.join("; ")
        ));
    }
    model.sidecars = job.sidecars.clone();
    if job.objects.is_some() {
        model.surroundings = job.surroundings.iter().map(SurroundingRef::to_surrounding).collect();
    }
    Ok(Arc::new(model))
}

/// Runs `part` of each job plugin over the shard's files of the model at
/// `path`; returns the shard's sha256s and one part (or refusal) per plugin.
type Parts = (BTreeMap<String, String>, Vec<Result<String, String>>);
fn part_job(
    scanner: &Scanner,
    job: &Job,
    path: &Path,
    files: &[String],
    plugins: &[SplitPlugin],
) -> Result<Parts, String> {
    let mine = scanner.split_plugins();
    if let Some(p) = plugins.iter().find(|p| !mine.contains(&(p.index, p.label.clone()))) {
        return Err(format!(
            "the job asks for parts of {} (static-scan plugin {}), which does not consent to be split on this worker",
            p.label,
            p.index + 1
        ));
    }
    let model = open_job_model(scanner, job, path)?;
    let shard = Arc::new(Model {
        name: model.name.clone(),
        kind: model.kind,
        root: model.root.clone(),
        files: model.files.iter().filter(|f| files.contains(&f.rel_path)).cloned().collect(),
        surroundings: Vec::new(),
        sidecars: model.sidecars.clone(),
    });
    if shard.files.len() != files.len() || files.is_empty() {
        return Err(format!("the job's shard {files:?} is not a set of files the model holds"));
    }
    let indices: Vec<usize> = plugins.iter().map(|p| p.index).collect();
    let parts = scanner.scan_part(&shard, &ScanInput::default(), &indices);
    let digests = file_digests(&shard)?;
    model.check_unchanged()?;
    Ok((digests, parts))
}

/// A join's inputs: each split plugin's parts in shard order, each shard
/// file's sha256 with the worker that read it, and those workers.
#[derive(Default)]
struct Joined {
    parts: BTreeMap<usize, crate::pipeline::Joined>,
    files: BTreeMap<String, (String, String)>,
    workers: Vec<String>,
}

/// A folder's weight files (safetensors or GGUF) in model order when it has
/// two or more: the shards a split scan makes one part of each. Empty for a
/// single file or a folder with one weight file.
fn weight_shards(model: &Model) -> Vec<String> {
    if model.kind != ModelKind::Folder {
        return Vec::new();
    }
    let shards: Vec<String> = model
        .files
        .iter()
        .filter(|f| matches!(f.format, Format::Safetensors | Format::Gguf))
        .map(|f| f.rel_path.clone())
        .collect();
    if shards.len() > 1 { shards } else { Vec::new() }
}

/// Reads the part results a join job names, exactly as the watcher checked
/// them (by stream sequence and sha256), under this worker's policy.
async fn read_parts(
    js: &jetstream::Context,
    plugins: &[SplitPlugin],
    refs: &[PartRef],
    digest: &str,
    trusted: &[String],
) -> Result<Joined, String> {
    if trusted.is_empty() {
        return Err("this worker's policy lists no scale_out.trusted_workers, so it cannot check who made the parts \
                    of a join"
            .into());
    }
    let results = js.get_stream(RESULTS_STREAM).await.map_err(|e| format!("opening {RESULTS_STREAM}: {e}"))?;
    let mut joined = Joined::default();
    for (n, r) in refs.iter().enumerate() {
        let what = format!("part {} of {} (job {})", n + 1, refs.len(), r.id);
        let m = results.get_raw_message(r.sequence).await.map_err(|e| {
            format!("{what}: its result (message {} in {RESULTS_STREAM}) cannot be read: {e}", r.sequence)
        })?;
        let sha = hex::encode(sha2::Sha256::digest(&m.payload));
        if m.subject.as_str() != results_subject(&r.id) || sha != r.sha256 {
            return Err(format!(
                "{what}: message {} in {RESULTS_STREAM} is {} with sha256 {sha}, not the result the watcher checked (sha256 {})",
                r.sequence, m.subject, r.sha256
            ));
        }
        signing::verify(trusted, &m.subject, Some(&m.headers), &m.payload).map_err(|e| format!("{what}: {e}"))?;
        let p: PartResult = serde_json::from_slice(&m.payload).map_err(|e| format!("{what}: cannot be read: {e}"))?;
        if p.policy_digest != digest || p.parts.len() != plugins.len() {
            return Err(format!(
                "{what}: made under policy {} with {} parts, this join is under {digest} with {}",
                p.policy_digest,
                p.parts.len(),
                plugins.len()
            ));
        }
        // A plugin whose part failed fails in the join, naming the first failed part.
        for (plugin, part) in plugins.iter().zip(p.parts) {
            match (joined.parts.entry(plugin.index).or_insert_with(|| Ok(Vec::new())), part) {
                (Ok(parts), Ok(part)) => parts.push(part),
                (all @ Ok(_), Err(e)) => *all = Err(format!("failed on {what} on worker {}: {e}", p.worker)),
                (Err(_), _) => {}
            }
        }
        for (f, sha) in p.files {
            // A shard joined twice would count its tensors twice in every comparison.
            if joined.files.insert(f.clone(), (sha, p.worker.clone())).is_some() {
                return Err(format!("{what}: is of {f}, which an earlier part of this join is of too"));
            }
        }
        if !joined.workers.contains(&p.worker) {
            joined.workers.push(p.worker);
        }
    }
    Ok(joined)
}

/// A job's copy of a model in the worker's scratch folder, removed when dropped.
struct Scratch {
    dir: PathBuf,
    /// The model: `<dir>/<name>`, a file or a folder.
    model: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing the scratch copy {}: {e}", self.dir.display());
        }
    }
}

/// One normal path component (a model's name, a claim id): never `..`, `/` or empty.
fn one_component<'a>(what: &str, s: &'a str) -> Result<&'a str, String> {
    let mut c = Path::new(s).components();
    match (c.next(), c.next()) {
        (Some(Component::Normal(n)), None) if n == s => Ok(s),
        _ => Err(format!("the job's {what} {s:?} is not a plain name")),
    }
}

/// A path inside a model: only normal components.
fn inside_model(rel: &str) -> Result<&Path, String> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("the job names the file {rel:?}, which is not a path inside a model"));
    }
    Ok(p)
}

/// Streams a job's objects into `<scratch>/<id>.<delivery>/<name>`, checking
/// each file's size and sha256 against the job, within the policy's folder limits.
async fn fetch(
    js: &jetstream::Context,
    job: &Job,
    set: &Objects,
    scratch: &Path,
    delivery: i64,
    limits: &FolderLimits,
) -> Result<Scratch, String> {
    let name = one_component("model name", &job.name)?;
    let id = one_component("id", &job.id)?;
    if set.bucket != MODELS_BUCKET {
        return Err(format!("the job's bytes are in the bucket {:?}; workers read only {MODELS_BUCKET}", set.bucket));
    }
    if set.files.is_empty() {
        return Err("the job names no files".into());
    }
    if !set.folder && (set.files.len() != 1 || set.files[0].rel_path != job.name) {
        return Err("a single-file job must name exactly its own file".into());
    }
    if set.files.len() > limits.max_files {
        return Err(format!("the job names {} files; the policy allows {}", set.files.len(), limits.max_files));
    }
    let total = set.files.iter().try_fold(0u64, |t, f| t.checked_add(f.size));
    if total.is_none_or(|t| t > limits.max_total_gib.saturating_mul(1 << 30)) {
        return Err(format!("the job's files add up to more than the policy's {} GiB", limits.max_total_gib));
    }
    let dir = scratch.join(format!("{id}.{delivery}"));
    // A copy left by a worker killed mid-download is not trusted: start again.
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("removing the old scratch copy {}: {e}", dir.display()));
        }
        _ => {}
    }
    std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let local = Scratch { model: dir.join(name), dir };
    if set.folder {
        std::fs::create_dir(&local.model).map_err(|e| format!("creating {}: {e}", local.model.display()))?;
    }
    let bucket = js
        .get_object_store(&set.bucket)
        .await
        .map_err(|e| format!("opening the Object Store bucket {}: {e}", set.bucket))?;
    for f in &set.files {
        let dest = if set.folder { local.model.join(inside_model(&f.rel_path)?) } else { local.model.clone() };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        download(&bucket, f, &dest)
            .await
            .map_err(|e| format!("{} (object {} in {}): {e}", f.rel_path, f.object, set.bucket))?;
    }
    Ok(local)
}

/// One object into a new file, refused unless it has the job's size and sha256.
async fn download(bucket: &object_store::ObjectStore, f: &ObjectFile, dest: &Path) -> Result<(), String> {
    let mut object = bucket.get(&f.object).await.map_err(|e| format!("cannot be fetched: {e}"))?;
    if object.info.size as u64 != f.size {
        return Err(format!("the object holds {} bytes, the job says {}", object.info.size, f.size));
    }
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .await
        .map_err(|e| format!("creating {}: {e}", dest.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = object.read(&mut buf).await.map_err(|e| format!("reading the object: {e}"))?;
        if n == 0 {
            break;
        }
        got += n as u64;
        if got > f.size {
            return Err(format!("the object holds more than the job's {} bytes", f.size));
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).await.map_err(|e| format!("writing {}: {e}", dest.display()))?;
    }
    out.flush().await.map_err(|e| format!("writing {}: {e}", dest.display()))?;
    let sha = hex::encode(h.finalize());
    if got != f.size || sha != f.sha256 {
        return Err(format!(
            "refused: the object's bytes ({got} bytes, sha256 {sha}) are not the job's ({} bytes, sha256 {})",
            f.size, f.sha256
        ));
    }
    Ok(())
}

/// Every file of a model with its sha256, by its path in the model.
pub fn file_digests(model: &Model) -> Result<BTreeMap<String, String>, String> {
    model.files.iter().map(|f| Ok((f.rel_path.clone(), f.sha256()?))).collect()
}

/// A worker-side failure: the job goes back for another worker, or, on its
/// last scan, to the dead-letter subject with the reason.
async fn retry_or_dead(
    js: &jetstream::Context,
    msg: &jetstream::Message,
    job: &Job,
    delivery: i64,
    me: &str,
    reason: String,
) {
    if delivery >= MAX_SCANS {
        dead_letter(js, msg, job, delivery, me, reason).await;
    } else {
        // Said before the nak, so the next delivery can find it. A note that
        // cannot be stored costs only the reason, never the job.
        let note = DeadLetter {
            id: job.id.clone(),
            name: job.name.clone(),
            worker: me.to_string(),
            deliveries: delivery,
            reason: reason.clone(),
        };
        let payload = serde_json::to_vec(&note).unwrap_or_default();
        let id = format!("{}-handed-back-{delivery}", job.id);
        // A loaded server may be slow to answer; the job is ours until the ack wait.
        let subject = handed_back_subject(&job.id, delivery);
        if let Err(e) = publish_stored(js, subject, &id, false, payload, NOTE_DEADLINE).await {
            tracing::warn!("job {} delivery {delivery}: the reason for handing it back is not stored: {e:#}", job.id);
        }
        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(2)))).await;
        // Logged once done: the line means the reason is stored (unless warned above) and the job is back.
        tracing::warn!("job {} ({}) delivery {delivery}: {reason}; handed back", job.id, job.name);
    }
}

/// The payload of the last message on `subject`, or `None` when there is none yet.
async fn last_payload(
    stream: &stream::Stream,
    subject: &str,
) -> Result<Option<bytes::Bytes>, stream::LastRawMessageError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(m.payload)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The hand-back note of the latest delivery that stored one, if any. Notes
/// are written for deliveries below MAX_SCANS only (the last scan files the
/// dead letter itself), so this asks for those, newest first. (An earlier
/// airlock kept them all on one subject; a job dead-lettered across the
/// upgrade is still rejected, its letter just lacks the quote.)
async fn last_hand_back(js: &jetstream::Context, id: &str) -> Result<Option<DeadLetter>> {
    let results = js.get_stream(RESULTS_STREAM).await.with_context(|| format!("opening {RESULTS_STREAM}"))?;
    for subject in (1..MAX_SCANS).rev().map(|d| handed_back_subject(id, d)) {
        let payload = last_payload(&results, &subject).await.with_context(|| format!("reading {subject}"))?;
        if let Some(p) = payload {
            return serde_json::from_slice(&p).map(Some).with_context(|| format!("reading {subject}"));
        }
    }
    Ok(None)
}

async fn dead_letter(
    js: &jetstream::Context,
    msg: &jetstream::Message,
    job: &Job,
    delivery: i64,
    me: &str,
    reason: String,
) {
    eprintln!("airlock worker {me}: job {} ({}) dead-lettered: {reason}", job.id, job.name);
    let letter =
        DeadLetter { id: job.id.clone(), name: job.name.clone(), worker: me.to_string(), deliveries: delivery, reason };
    let payload = serde_json::to_vec(&letter).unwrap_or_default();
    match publish_stored(js, dead_subject(&job.id), &format!("{}-dead", job.id), false, payload, ACK_WAIT * 3).await {
        Ok(()) => {
            let _ = msg.ack_with(AckKind::Term).await;
        }
        Err(e) => tracing::error!("job {}: {e:#}; left for redelivery", job.id),
    }
}

// ---------------------------------------------------------------------------
// The watcher's side.

impl crate::pipeline::Scan for Dispatcher {
    /// Has the workers scan the claimed model and checks their result against
    /// the claim: signed by a trusted worker (in [`Dispatcher::scan`]), for
    /// this job, under this policy digest, of the same bytes and sidecars, and
    /// for a pass a result from every plugin this policy runs.
    fn scan_claim(
        &self,
        job: &crate::pipeline::ScanJob,
        model: &Arc<Model>,
        path: &Path,
        input: &ScanInput,
        on_event: &mut dyn FnMut(crate::pipeline::Event),
    ) -> Result<Result<Outcome, String>, String> {
        on_event(crate::pipeline::Event::Processing(job.name));
        let mut r = match self.scan(job.id, job.name, path, model, input)? {
            Reply::Dead(l) => {
                return Ok(Err(format!(
                    "no worker finished the scan ({} deliveries, last to {}): {}",
                    l.deliveries, l.worker, l.reason
                )));
            }
            Reply::Refused(why) => return Ok(Err(why)),
            Reply::Result(r) => r,
        };
        if let Err(why) = self.check_result(job, model, &r) {
            return Ok(Err(why));
        }
        for s in &r.outcome.stages {
            on_event(crate::pipeline::Event::StageDone(s));
        }
        // The worker saw the model at its own path (shared storage, or its scratch copy).
        r.outcome.path = path.display().to_string();
        Ok(Ok(r.outcome))
    }
}

impl Dispatcher {
    /// Whether a (signature-checked) result answers this claim: `Err` says why not.
    fn check_result(&self, job: &crate::pipeline::ScanJob, model: &Model, r: &JobResult) -> Result<(), String> {
        if r.id != job.id || r.policy_digest != self.digest {
            return Err(format!(
                "the result from worker {} was refused: it is for job {} under policy {}, this claim is {} under policy {}",
                r.worker, r.id, r.policy_digest, job.id, self.digest
            ));
        }
        let ours = file_digests(model)
            .map_err(|e| format!("the watcher cannot hash the claimed model to check the result: {e}"))?;
        if r.files != ours {
            let differ: Vec<String> = ours
                .keys()
                .chain(r.files.keys())
                .filter(|f| ours.get(*f) != r.files.get(*f))
                .map(|f| {
                    let show = |v: Option<&String>| v.map_or("absent".to_string(), |s| s.clone());
                    format!(
                        "{f}: worker {} read {}, the claim holds {}",
                        r.worker,
                        show(r.files.get(f)),
                        show(ours.get(f))
                    )
                })
                .collect();
            return Err(format!("the result was refused: the worker scanned other bytes ({})", differ.join("; ")));
        }
        // A pass must carry the result of every plugin this watcher's policy
        // runs, from the component it loaded: a forged pass with no stages
        // (or a replay from other plugins) is refused.
        if r.outcome.verdict == crate::pipeline::ModelVerdict::Pass {
            let missing: Vec<String> = self
                .components
                .iter()
                .filter(|(stage, label, sha)| {
                    !r.outcome.stages.iter().any(|s| {
                        s.stage == *stage
                            && s.plugin.as_deref() == Some(label.as_str())
                            && s.plugin_sha256.as_deref() == Some(sha.as_str())
                    })
                })
                .map(|(stage, label, _)| format!("{} {label}", stage.name()))
                .collect();
            if !missing.is_empty() {
                return Err(format!(
                    "the pass from worker {} was refused: it carries no result of {} from the component this policy \
                     loads",
                    r.worker,
                    missing.join(", ")
                ));
            }
        }
        let sidecars = model.sidecars.digests();
        if r.sidecars != sidecars {
            return Err(format!(
                "the result was refused: worker {} judged the model with other sidecars (origin, signatures) than \
                 the claim holds: it read {:?}, the claim holds {:?}",
                r.worker, r.sidecars, sidecars
            ));
        }
        Ok(())
    }
}

/// `watch --dispatch`: sends claims to the workers and waits for their replies.
pub struct Dispatcher {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
    jobs: stream::Stream,
    results: stream::Stream,
    pub digest: String,
    stop: Arc<AtomicBool>,
    url: String,
    /// The bucket models travel in, with `--transfer object-store`.
    models: Option<object_store::ObjectStore>,
    /// The static scan's plugins that consent to be split.
    split: Vec<SplitPlugin>,
    /// `scale_out.trusted_workers`: a result must be signed by one of these.
    trusted: Vec<String>,
    /// Every plugin this watcher's policy runs, as (stage, label, sha256):
    /// a pass must carry a result from each.
    components: Vec<(crate::policy::Stage, String, String)>,
}

/// How long the watcher keeps trying to put a model in the bucket before it
/// gives the model up to a `dispatch` rejection (which `rescan` retries).
const PUT_DEADLINE: Duration = Duration::from_secs(60);

/// A job with no reply this long gets a warning that says what the queue
/// looks like (no worker connected, none asking, one holding it), so a
/// watcher with no workers does not look like a hung one; then every
/// `WAITING_NOTICE_EVERY`.
/// How often a waiting watcher checks that its job is still queued.
const LOST_JOB_CHECK: Duration = Duration::from_secs(5);
const WAITING_NOTICE: Duration = Duration::from_secs(30);
const WAITING_NOTICE_EVERY: Duration = Duration::from_secs(300);

impl Dispatcher {
    pub fn connect(
        url: &str,
        policy: &Policy,
        scanner: &Scanner,
        transfer: Transfer,
        insecure: bool,
    ) -> Result<Dispatcher> {
        let trusted = policy.scale_out.trusted_workers.clone();
        if trusted.is_empty() {
            bail!(
                "the policy lists no scale_out.trusted_workers: a worker's result could not be told from a forgery. \
                 List each worker's public key (`airlock worker-key FILE` prints it; docs/scale-out.md, \
                 \"Signed results\")"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
        }
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let (js, jobs, results, models) = rt.block_on(async {
            let client = connect(url, policy.nats.as_ref(), "airlock-watch", insecure).await?;
            let js = jetstream::new(client);
            let (jobs, results) = ensure_streams(&js).await?;
            take_jobs_by_claim(&js, &jobs).await?;
            let models = match transfer {
                Transfer::SharedPath => None,
                Transfer::ObjectStore => Some(models_bucket(&js).await?),
            };
            Ok::<_, anyhow::Error>((js, jobs, results, models))
        })?;
        let digest = policy_digest(policy, scanner);
        let split = scanner.split_plugins().into_iter().map(|(index, label)| SplitPlugin { index, label }).collect();
        let components = scanner.components();
        Ok(Dispatcher { rt, js, jobs, results, digest, stop, url: url.to_string(), models, split, trusted, components })
    }

    /// Publishes the claim as a job (unless a reply is already stored: a
    /// watcher restarted after sending it) and waits for the reply. A sharded
    /// folder, when the static scan has plugins that consent, goes first as
    /// one part job per weight shard; the watcher checks every part, then
    /// sends the claim's job as the join over them. `Err` when the watcher is
    /// told to stop first: the claim stays for the next start.
    pub fn scan(&self, id: &str, name: &str, path: &Path, model: &Model, input: &ScanInput) -> Result<Reply, String> {
        let (job_path, objects) = match &self.models {
            // Workers reach the model by this path on shared storage.
            None => {
                let dir = path.parent().and_then(|d| std::fs::canonicalize(d).ok()).ok_or_else(|| {
                    format!("{}: cannot resolve the claim folder to an absolute path", path.display())
                })?;
                (dir.join(name), None)
            }
            Some(_) => {
                let files = model
                    .files
                    .iter()
                    .map(|f| {
                        Ok(ObjectFile {
                            rel_path: f.rel_path.clone(),
                            object: format!("{id}/{}", f.rel_path),
                            size: f.size(),
                            sha256: f.sha256()?,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                let folder = model.kind == ModelKind::Folder;
                (PathBuf::from(name), Some(Objects { bucket: MODELS_BUCKET.into(), folder, files }))
            }
        };
        let mut job = Job {
            id: id.to_string(),
            name: name.to_string(),
            path: job_path,
            sha256: input.sha256.clone(),
            pinned_files: input.pinned_files.clone(),
            policy_digest: self.digest.clone(),
            objects,
            split: None,
            sidecars: model.sidecars.clone(),
            surroundings: model.surroundings.iter().map(SurroundingRef::of).collect(),
        };
        let shards = self.shards(model);
        self.rt.block_on(async {
            // A reply already in (a watcher restarted after it came) ends it,
            // split or not: the parts were checked before the join was sent.
            let started = match self.reply(id).await? {
                Some(reply) => Some(reply),
                None if shards.len() > 1 => match self.parts(&job, model, &shards).await? {
                    Ok(parts) => {
                        job.split = Some(SplitJob::Join { plugins: self.split.clone(), parts });
                        self.start(&job, model).await?.map(Stored::into_reply)
                    }
                    Err(refused) => Some(refused),
                },
                None => self.start(&job, model).await?.map(Stored::into_reply),
            };
            let reply = match started {
                Some(r) => r,
                None => self.wait(&job, model).await?.into_reply(),
            };
            self.forget_objects(&job).await;
            Ok(reply)
        })
    }

    /// The weight shards of a model this watcher splits, one file each in
    /// model order; empty when it is scanned whole: a single file, a folder
    /// with one weight file, or a static scan with no plugin that consents.
    fn shards(&self, model: &Model) -> Vec<String> {
        if self.split.is_empty() { Vec::new() } else { weight_shards(model) }
    }

    /// Sends one part job per shard (those not already sent or answered),
    /// then waits for each and checks it: the same policy, the bytes the claim
    /// holds, a part from every plugin. `Ok(Ok)`: the parts, for the join;
    /// `Ok(Err)`: the refusal that rejects the claim at `dispatch`.
    async fn parts(&self, job: &Job, model: &Model, shards: &[String]) -> Result<Result<Vec<PartRef>, Reply>, String> {
        let of = shards.len();
        let jobs: Vec<Job> = shards
            .iter()
            .enumerate()
            .map(|(n, file)| Job {
                id: part_id(&job.id, n + 1),
                sha256: None,
                pinned_files: None,
                objects: job.objects.as_ref().map(|o| Objects {
                    files: o.files.iter().filter(|f| &f.rel_path == file).cloned().collect(),
                    ..o.clone()
                }),
                split: Some(SplitJob::Part { part: n + 1, of, files: vec![file.clone()], plugins: self.split.clone() }),
                ..job.clone()
            })
            .collect();
        let mut started = Vec::new();
        for j in &jobs {
            started.push(self.start(j, model).await?);
        }
        let checked = self.check_parts(&jobs, shards, model, started).await?;
        if checked.is_err() {
            self.withdraw(&jobs).await;
        }
        Ok(checked)
    }

    /// Waits for each part job's reply and checks it (see [`Dispatcher::parts`]).
    async fn check_parts(
        &self,
        jobs: &[Job],
        shards: &[String],
        model: &Model,
        started: Vec<Option<Stored>>,
    ) -> Result<Result<Vec<PartRef>, Reply>, String> {
        let ours = file_digests(model)?;
        let mut refs = Vec::new();
        for ((j, file), started) in jobs.iter().zip(shards).zip(started) {
            let what = format!("{} ({file})", j.what());
            let (payload, sequence) = match started {
                Some(r) => r,
                None => self.wait(j, model).await?,
            }
            .into_payload();
            let payload = match payload {
                Ok(p) => p,
                Err(Err(l)) => {
                    return Ok(Err(Reply::Refused(format!(
                        "{what}: no worker finished it ({} deliveries, last to {}): {}",
                        l.deliveries, l.worker, l.reason
                    ))));
                }
                Err(Ok(forged)) => return Ok(Err(Reply::Refused(format!("{what}: {forged}")))),
            };
            let p: PartResult = match serde_json::from_slice(&payload) {
                Ok(p) => p,
                Err(e) => return Ok(Err(Reply::Refused(format!("{what}: its result cannot be read: {e}")))),
            };
            let refused = |why: String| {
                Ok(Err(Reply::Refused(format!("{what}: the result from worker {} was refused: {why}", p.worker))))
            };
            if p.id != j.id || p.policy_digest != self.digest {
                return refused(format!(
                    "it is for job {} under policy {}, the job is {} under policy {}",
                    p.id, p.policy_digest, j.id, self.digest
                ));
            }
            let claimed: BTreeMap<String, String> =
                ours.iter().filter(|(f, _)| *f == file).map(|(f, s)| (f.clone(), s.clone())).collect();
            if p.files != claimed {
                return refused(format!(
                    "the worker scanned other bytes ({:?}; the claim holds {:?})",
                    p.files, claimed
                ));
            }
            if p.parts.len() != self.split.len() {
                return refused(format!("it holds {} parts for {} plugins", p.parts.len(), self.split.len()));
            }
            refs.push(PartRef { id: j.id.clone(), sequence, sha256: hex::encode(sha2::Sha256::digest(&payload)) });
        }
        Ok(Ok(refs))
    }

    /// Takes back the part jobs of a refused split scan that no worker has
    /// answered, so none is scanned for nothing. Best effort: a part scanned
    /// anyway only leaves a result no one reads.
    async fn withdraw(&self, jobs: &[Job]) {
        for j in jobs {
            if let Err(e) = self.jobs.purge().filter(job_subject(&j.id)).await {
                tracing::warn!("{}: taking job {} back from {JOBS_STREAM}: {e}", j.what(), j.id);
            }
        }
    }

    /// Sends a job unless its reply or the job itself is already there (a
    /// watcher restarted after sending it). `Some`: the reply, already in.
    async fn start(&self, job: &Job, model: &Model) -> Result<Option<Stored>, String> {
        if let Some(r) = self.stored(&job.id).await? {
            return Ok(Some(r));
        }
        // A watcher restarted while its job was queued or held by a worker
        // waits for that job. Sending it again would have it scanned twice
        // (once the message-id window of two minutes is past), and the copy
        // a worker takes after the verdict finds no claim and ends as a
        // misleading dead letter.
        if self.job_queued(&job.id).await? {
            tracing::info!(
                "{}: job {} is still in the queue on {} (sent before this watcher restarted); waiting for its reply",
                job.what(),
                job.id,
                self.url
            );
            return Ok(None);
        }
        // Not in the queue: never sent, or acked since the first look at the
        // replies (a worker stores the reply before it acks, so it is there now).
        if let Some(r) = self.stored(&job.id).await? {
            return Ok(Some(r));
        }
        if let Some(dead) = self.send(job, model).await? {
            return Ok(Some(Stored::Dead(dead)));
        }
        tracing::info!("{}: job {} sent to the workers on {}", job.what(), job.id, self.url);
        Ok(None)
    }

    /// Waits for a sent job's reply, saying now and then what the queue looks like.
    async fn wait(&self, job: &Job, model: &Model) -> Result<Stored, String> {
        let sent_at = Instant::now();
        let mut notice_at = WAITING_NOTICE;
        let mut looked_at = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(self.interrupted());
            }
            if let Some(r) = self.stored(&job.id).await? {
                return Ok(r);
            }
            // A job neither queued nor answered was lost: its stream was deleted
            // (red team D13). A worker stores the reply before it acks, so the
            // second look at the replies rules out a job just finished.
            if looked_at.elapsed() >= LOST_JOB_CHECK {
                looked_at = Instant::now();
                if !self.job_queued(&job.id).await? {
                    if let Some(r) = self.stored(&job.id).await? {
                        return Ok(r);
                    }
                    tracing::warn!(
                        "{}: job {} is neither in {JOBS_STREAM} nor answered (was the stream deleted?); sending it again",
                        job.what(),
                        job.id
                    );
                    if let Some(dead) = self.send(job, model).await? {
                        return Ok(Stored::Dead(dead));
                    }
                }
            }
            if sent_at.elapsed() >= notice_at {
                tracing::warn!(
                    "{}: no reply to job {} after {} s; {} (`airlock queue --nats {}` shows the queue)",
                    job.what(),
                    job.id,
                    sent_at.elapsed().as_secs(),
                    self.workers_now().await,
                    self.url
                );
                notice_at += WAITING_NOTICE_EVERY;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Puts the model in the bucket (with `--transfer object-store`) and
    /// publishes the job, retrying until the stream has it. `Ok(Some)`: the
    /// model could not be put in the bucket; `Err`: stopped, the claim stays.
    async fn send(&self, job: &Job, model: &Model) -> Result<Option<DeadLetter>, String> {
        if let Err(why) = self.put_objects(job, model).await? {
            return Ok(Some(DeadLetter {
                id: job.id.clone(),
                name: job.name.clone(),
                worker: "the watcher".into(),
                deliveries: 0,
                reason: why,
            }));
        }
        let payload = serde_json::to_vec(job).map_err(|e| e.to_string())?;
        // A job the server cannot take would be published again without end;
        // the signatures that travel in it are the usual reason.
        let max = self.js.client().server_info().max_payload;
        if max > 0 && payload.len() > max {
            return Ok(Some(DeadLetter {
                id: job.id.clone(),
                name: job.name.clone(),
                worker: "the watcher".into(),
                deliveries: 0,
                reason: format!(
                    "the job is {} bytes ({} of them the model's sidecars); the NATS server takes at most {max} per \
                     message (max_payload in its config)",
                    payload.len(),
                    job.sidecars.size()
                ),
            }));
        }
        loop {
            // The claim id is the message id, so a retry within two minutes of
            // a publish that did land is stored once; after that, the look
            // at the queue below keeps it from being sent twice.
            match publish_stored(
                &self.js,
                job_subject(&job.id),
                &job.id,
                false,
                payload.clone(),
                Duration::from_secs(5),
            )
            .await
            {
                Ok(()) => return Ok(None),
                Err(e) => tracing::warn!("{}: {e:#}; the job is sent again unless the server has it", job.name),
            }
            if self.job_queued(&job.id).await? {
                return Ok(None);
            }
        }
    }

    /// Whether the jobs stream holds this claim's job (waiting, or held by a
    /// worker: a work queue drops a job only when it is acked). Asks again
    /// through a lost connection; `Err`: stopped.
    async fn job_queued(&self, id: &str) -> Result<bool, String> {
        let subject = job_subject(id);
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(self.interrupted());
            }
            match last_payload(&self.jobs, &subject).await {
                Ok(found) => return Ok(found.is_some()),
                Err(e) => {
                    tracing::warn!("asking {JOBS_STREAM} for {subject}: {e}; asking again");
                    self.reopen_streams().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Puts the model's files in the bucket (with `--transfer object-store`),
    /// retrying through a lost connection. `Err`: stopped, the claim stays;
    /// `Ok(Err)`: the model could not be put there in `PUT_DEADLINE`.
    async fn put_objects(&self, job: &Job, model: &Model) -> Result<Result<(), String>, String> {
        let (Some(bucket), Some(set)) = (&self.models, &job.objects) else { return Ok(Ok(())) };
        for f in &set.files {
            let Some(file) = model.files.iter().find(|m| m.rel_path == f.rel_path) else {
                return Ok(Err(format!("{}: the job names a file the claim does not hold", f.rel_path)));
            };
            // Put once for a split scan: a shard's part job put it before the join.
            if self.in_bucket(bucket, f).await {
                continue;
            }
            let started = Instant::now();
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(self.interrupted());
                }
                let put = async {
                    let mut src = tokio::fs::File::open(&file.path).await.map_err(|e| e.to_string())?;
                    bucket.put(f.object.as_str(), &mut src).await.map_err(|e| e.to_string())
                };
                match put.await {
                    Ok(info) if info.size as u64 == f.size => break,
                    Ok(info) => {
                        return Ok(Err(format!(
                            "{}: {} bytes went into the Object Store, the claim holds {}",
                            f.rel_path, info.size, f.size
                        )));
                    }
                    Err(e) if started.elapsed() < PUT_DEADLINE => {
                        tracing::warn!("putting {} in {MODELS_BUCKET}: {e}; retrying", f.object);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        return Ok(Err(format!(
                            "{} could not be put in the Object Store bucket {MODELS_BUCKET} on {} in {PUT_DEADLINE:?}: {e}",
                            f.rel_path, self.url
                        )));
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// Whether the bucket already holds this file's bytes (by size and the
    /// Object Store's own SHA-256). A worker checks what it fetches anyway.
    async fn in_bucket(&self, bucket: &object_store::ObjectStore, f: &ObjectFile) -> bool {
        use base64::Engine;
        let Ok(sha) = hex::decode(&f.sha256) else { return false };
        let want = format!("SHA-256={}", base64::engine::general_purpose::URL_SAFE.encode(sha));
        match bucket.info(&f.object).await {
            Ok(info) => !info.deleted && info.size as u64 == f.size && info.digest.as_deref() == Some(want.as_str()),
            Err(_) => false,
        }
    }

    /// Deletes a job's objects once its reply is in; what cannot be deleted
    /// now goes with the bucket's max age.
    async fn forget_objects(&self, job: &Job) {
        let (Some(bucket), Some(set)) = (&self.models, &job.objects) else { return };
        for f in &set.files {
            match bucket.delete(&f.object).await {
                Ok(()) => {}
                Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
                Err(e) => tracing::warn!("deleting {} from {MODELS_BUCKET}: {e}", f.object),
            }
        }
    }

    /// The workers as the jobs consumer sees them, for a waiting notice.
    async fn workers_now(&self) -> String {
        use async_nats::jetstream::context::ConsumerInfoErrorKind;
        match self.jobs.consumer_info(CONSUMER).await {
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                "no worker has connected to this server's queue yet (start `airlock worker`)".into()
            }
            Err(e) => format!("the queue's consumer cannot be read: {e}"),
            Ok(c) => format!(
                "{} job(s) waiting, {} held by workers ({} redelivered), {} idle worker slot(s){}",
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered,
                c.num_waiting,
                if c.num_waiting == 0 && c.num_ack_pending == 0 { ": no worker is asking for jobs now" } else { "" }
            ),
        }
    }

    /// After a failed question to a stream: makes the streams again if
    /// someone deleted them (red team D13), so the jobs they held are found
    /// missing and sent again instead of being asked about forever. On a
    /// lost connection this fails too, and the caller asks again.
    async fn reopen_streams(&self) {
        if let Err(e) = ensure_streams(&self.js).await {
            tracing::warn!("{e:#}");
        }
    }

    fn interrupted(&self) -> String {
        "stopped while the workers had its job; the claim stays in scanning/ and its reply is taken at the next start"
            .into()
    }

    /// The stored reply to a job, if there is one yet: a result (its payload
    /// and stream sequence) or a dead letter. A connection error is not a
    /// reply: it is logged and the caller asks again.
    async fn stored(&self, id: &str) -> Result<Option<Stored>, String> {
        let subject = results_subject(id);
        match self.results.get_last_raw_message_by_subject(&subject).await {
            // Signed by a worker this policy trusts, for this job, or refused (red team D8).
            Ok(m) => {
                return Ok(Some(match signing::verify(&self.trusted, &subject, Some(&m.headers), &m.payload) {
                    Ok(_) => Stored::Result(m.payload, m.sequence),
                    Err(why) => Stored::Forged(format!("{why} (message {} in {RESULTS_STREAM})", m.sequence)),
                }));
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => {
                tracing::warn!("asking {RESULTS_STREAM} for {subject}: {e}");
                self.reopen_streams().await;
                return Ok(None);
            }
        }
        let subject = dead_subject(id);
        match last_payload(&self.results, &subject).await {
            Ok(Some(payload)) => serde_json::from_slice(&payload)
                .map(|l| Some(Stored::Dead(l)))
                .map_err(|e| format!("the reply on {subject} cannot be read: {e}")),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!("asking {RESULTS_STREAM} for {subject}: {e}");
                Ok(None)
            }
        }
    }

    /// The stored reply to a claim's (whole or join) job, if there is one yet.
    async fn reply(&self, id: &str) -> Result<Option<Reply>, String> {
        Ok(self.stored(id).await?.map(Stored::into_reply))
    }
}

/// A reply as stored: a result not yet read, with its stream sequence, or a dead letter.
enum Stored {
    Result(bytes::Bytes, u64),
    Dead(DeadLetter),
    /// A result that fails its signature check: why.
    Forged(String),
}

impl Stored {
    /// As the reply to a whole (or join) job. A result that cannot be read
    /// (junk another client published on the subject) is a refusal: the
    /// model is rejected at `dispatch`, never left waiting in `scanning/`.
    fn into_reply(self) -> Reply {
        match self {
            Stored::Dead(l) => Reply::Dead(l),
            Stored::Forged(why) => Reply::Refused(why),
            Stored::Result(p, seq) => match serde_json::from_slice(&p) {
                Ok(r) => Reply::Result(Box::new(r)),
                Err(e) => Reply::Refused(format!(
                    "the result stored for this job (message {seq} in {RESULTS_STREAM}) cannot be read: {e}"
                )),
            },
        }
    }

    /// The result's payload and sequence, or the dead letter.
    /// `Err(Ok)`: why a result was refused as forged.
    fn into_payload(self) -> (Result<bytes::Bytes, Result<String, DeadLetter>>, u64) {
        match self {
            Stored::Result(p, seq) => (Ok(p), seq),
            Stored::Dead(l) => (Err(Err(l)), 0),
            Stored::Forged(why) => (Err(Ok(why)), 0),
        }
    }
}

// ---------------------------------------------------------------------------
// The queue, as an operator sees it (`airlock queue`).

/// What the JetStream server holds for airlock right now. Read-only: nothing
/// is created, taken or acked.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub server: String,
    /// Jobs in `AIRLOCK_JOBS`: sent by the watcher and not yet acked by a worker.
    pub jobs: u64,
    /// Of those, jobs no worker has taken yet.
    pub waiting: u64,
    /// Jobs a worker holds (scanning, or dead and not yet past the ack wait).
    pub being_scanned: u64,
    /// Jobs held after a redelivery (a worker died, or handed the job back).
    pub redelivered: u64,
    /// Worker slots asking for a job right now (idle scan slots).
    pub idle_worker_slots: u64,
    /// False when no worker has ever connected to this server's queue.
    pub workers_seen: bool,
    /// The jobs in the queue, oldest first (at most `LISTED_JOBS`).
    pub listed_jobs: Vec<QueuedJob>,
    /// Results stored in `AIRLOCK_RESULTS` (kept 30 days).
    pub results: u64,
    /// Dead letters stored in `AIRLOCK_RESULTS`: jobs no worker could finish.
    pub dead_letters: Vec<DeadLetter>,
    /// Models on their way through the Object Store, if the bucket exists.
    pub objects: Option<ObjectsInTransit>,
}

#[derive(Debug, Serialize)]
pub struct QueuedJob {
    pub id: String,
    pub name: String,
    /// What the job scans: the model, or `part 2 of 3 of <name>`.
    pub what: String,
    /// `shared-path` or `object-store`.
    pub transfer: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ObjectsInTransit {
    pub objects: u64,
    pub bytes: u64,
}

/// Jobs listed one by one; the count covers the rest.
const LISTED_JOBS: u64 = 100;

/// Reads the queue's state from the server, with the policy's credentials.
pub fn queue_status(url: &str, policy: &Policy) -> Result<QueueStatus> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Reading the queue changes nothing: an open server is only warned of.
        let client = connect(url, policy.nats.as_ref(), "airlock queue", true).await?;
        let js = jetstream::new(client);
        let missing = |e: &async_nats::jetstream::context::GetStreamError| {
            matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
        };
        let jobs_stream = match js.get_stream(JOBS_STREAM).await {
            Ok(s) => s,
            Err(e) if missing(&e) => anyhow::bail!(
                "the NATS server at {url} has no stream {JOBS_STREAM}: no watcher has dispatched to it yet \
                 (`airlock watch --dispatch {url}` creates it)"
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "reading the stream {JOBS_STREAM} on {url} (may this login use the JetStream API? the watcher's may)"
                )));
            }
        };
        let jobs_info = jobs_stream.get_info().await.with_context(|| format!("reading {JOBS_STREAM}'s state"))?;
        let jobs = jobs_info.state.messages;
        let mut status = QueueStatus {
            server: url.to_string(),
            jobs,
            waiting: jobs,
            being_scanned: 0,
            redelivered: 0,
            idle_worker_slots: 0,
            workers_seen: false,
            listed_jobs: Vec::new(),
            results: 0,
            dead_letters: Vec::new(),
            objects: None,
        };
        match jobs_stream.consumer_info(CONSUMER).await {
            Ok(c) => {
                status.workers_seen = true;
                status.waiting = c.num_pending;
                status.being_scanned = c.num_ack_pending as u64;
                status.redelivered = c.num_redelivered as u64;
                status.idle_worker_slots = c.num_waiting as u64;
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading the consumer {CONSUMER}"))),
        }
        // A work queue deletes acked jobs, so the stream holds exactly the
        // open ones. Asking for the next job from a sequence on skips the
        // gaps acked jobs leave (one request per job listed).
        let mut seq = jobs_info.state.first_sequence;
        while jobs > 0 && (status.listed_jobs.len() as u64) < LISTED_JOBS {
            // Every subject: the stream holds only jobs, and one an older airlock sent on
            // `airlock.jobs` is listed too.
            let m = match jobs_stream.get_first_raw_message_by_subject(">", seq).await {
                Ok(m) => m,
                // No job from `seq` on: the rest were acked since the state was read.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "reading job {seq} in {JOBS_STREAM} (may this login read the stream? the watcher's may)"
                    )));
                }
            };
            seq = m.sequence + 1;
            match serde_json::from_slice::<Job>(&m.payload) {
                Ok(j) => status.listed_jobs.push(QueuedJob {
                    what: j.what(),
                    id: j.id,
                    name: j.name,
                    transfer: if j.objects.is_some() { "object-store" } else { "shared-path" },
                }),
                Err(e) => tracing::warn!("job {} in {JOBS_STREAM} cannot be read: {e}", m.sequence),
            }
        }

        let results = js
            .get_stream(RESULTS_STREAM)
            .await
            .with_context(|| format!("reading the stream {RESULTS_STREAM} on {url}"))?;
        let mut subjects = results
            .info_with_subjects("airlock.>")
            .await
            .with_context(|| format!("reading {RESULTS_STREAM}'s subjects"))?;
        let mut dead = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, count) = s.with_context(|| format!("reading {RESULTS_STREAM}'s subjects"))?;
            if subject.starts_with("airlock.results.") {
                status.results += count as u64;
            } else if subject.starts_with("airlock.dead.") && !subject.contains(HANDED_BACK) {
                dead.push(subject);
            }
        }
        dead.sort();
        for subject in dead {
            let m = results
                .get_last_raw_message_by_subject(&subject)
                .await
                .with_context(|| format!("reading the dead letter on {subject}"))?;
            match serde_json::from_slice::<DeadLetter>(&m.payload) {
                Ok(d) => status.dead_letters.push(d),
                Err(e) => anyhow::bail!("the dead letter on {subject} cannot be read: {e}"),
            }
        }

        if let Ok(bucket) = js.get_object_store(MODELS_BUCKET).await {
            let mut list = bucket.list().await.with_context(|| format!("listing the bucket {MODELS_BUCKET}"))?;
            let mut t = ObjectsInTransit { objects: 0, bytes: 0 };
            while let Some(o) = list.next().await {
                let o = o.with_context(|| format!("listing the bucket {MODELS_BUCKET}"))?;
                t.objects += 1;
                t.bytes += o.size as u64;
            }
            status.objects = Some(t);
        }
        Ok(status)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_claim_ids_and_their_parts_are_job_ids() {
        assert!(is_job_id("1765130000123456789-4242-0"));
        assert!(is_job_id("1765130000123456789-4242-7-part3"));
        for bad in ["a.b", "", "1-2", "1-2-3-4", "1-2-x", "../1-2-3", "1-2-3-part", "1-2-3-partx", "1-2-3.>"] {
            assert!(!is_job_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn result_message_ids_are_not_guessable() {
        let (a, b) = (random_hex(), random_hex());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
