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

impl Job {
    /// The model, or which part of it, for log lines.
    pub(super) fn what(&self) -> String {
        match &self.split {
            Some(SplitJob::Part { part, of, .. }) => format!("part {part} of {of} of {}", self.name),
            _ => self.name.clone(),
        }
    }
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

// This file: the wire (subjects, jobs, results) and the NATS plumbing both ends share.
mod dispatch; // the watcher's side: jobs out, replies checked (the `Scan` behind `watch --dispatch`)
mod queue; // `airlock queue`: what the server holds, read-only
mod signing; // results signed by workers, checked against the policy's trusted keys
mod worker; // `airlock worker`: jobs in, bytes fetched or found, scans, signed results out
pub use dispatch::*;
pub use queue::*;
pub use signing::Signer;
pub use worker::*;

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
