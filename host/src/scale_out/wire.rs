//! The wire: stream and subject names, and what travels on them (jobs,
//! split jobs, results, dead letters), as both ends read and write them.

use super::*;

pub const JOBS_STREAM: &str = "AIRLOCK_JOBS";
/// Each job is published on `airlock.jobs.<claim id>`, so a restarted
/// watcher can ask the stream whether its job is still there (queued or held
/// by a worker) instead of sending it a second time.
pub(super) const JOBS_SUBJECTS: &str = "airlock.jobs.*";
pub const RESULTS_STREAM: &str = "AIRLOCK_RESULTS";
/// The durable pull consumer every worker shares.
pub const CONSUMER: &str = "airlock-workers";
/// airlock's own reply subjects. Jobs reach a worker as replies to its pull
/// requests; under the common `_INBOX.>` permission any other login could
/// read them (red team D14). The shipped permission sets allow this prefix
/// to airlock's logins only.
pub const INBOX_PREFIX: &str = "_AIRLOCK_INBOX";
/// A job not acked (or kept alive by progress) for this long goes to another worker.
pub(super) const ACK_WAIT: Duration = Duration::from_secs(20);
/// How often a worker tells the server it is still on a job.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(4);
/// How long a worker tries to store why it hands a job back: well inside
/// ACK_WAIT, so the job is not redelivered while the note is on its way.
pub(super) const NOTE_DEADLINE: Duration = Duration::from_secs(10);
/// Scans tried for one job; any later delivery only files the dead letter.
/// The consumer itself does not cap deliveries: a delivery can be lost (to a
/// worker killed with a pull request pending), and a capped consumer that lost
/// its last one would hold the job forever with no letter for the watcher.
pub const MAX_SCANS: i64 = 3;
/// Results are kept this long for inspection (`nats stream view AIRLOCK_RESULTS`).
/// The most the results stream holds; the oldest messages go first.
pub(super) const RESULTS_MAX_BYTES: i64 = 1 << 30;
pub(super) const RESULTS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The Object Store bucket models travel in with `--transfer object-store`.
pub const MODELS_BUCKET: &str = "airlock-models";
/// The watcher deletes a model's objects once it has the reply; this bounds
/// what a watcher that died first leaves behind.
pub(super) const MODELS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the workers get a model's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transfer {
    /// Workers read the claim folder at the same path (NFS, CephFS, a shared disk).
    SharedPath,
    /// The watcher puts every file in the `airlock-models` Object Store bucket;
    /// workers stream them into a scratch folder, checked against the job's sha256s.
    ObjectStore,
}

pub(super) fn job_subject(id: &str) -> String {
    format!("airlock.jobs.{id}")
}

pub(super) fn results_subject(id: &str) -> String {
    format!("airlock.results.{id}")
}

pub(super) fn dead_subject(id: &str) -> String {
    format!("airlock.dead.{id}")
}

/// Where a worker that hands delivery `delivery` of a job back says why (one
/// token, so the `airlock.dead.*` subject filter and permission cover it). Job
/// ids are digits and dashes: no job's dead subject holds this. One subject per
/// delivery: the dead letter quotes the latest note by its delivery number, not
/// by which message the server reports last on a shared subject.
pub(super) fn handed_back_subject(id: &str, delivery: i64) -> String {
    format!("airlock.dead.{id}{HANDED_BACK}_{delivery}")
}

pub(super) const HANDED_BACK: &str = "_handed_back";

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
    pub(super) fn of(s: &crate::artifact::Surrounding) -> SurroundingRef {
        SurroundingRef { kind: s.kind.to_string(), path: s.path.clone(), detail: s.detail.clone() }
    }

    pub(super) fn to_surrounding(&self) -> crate::artifact::Surrounding {
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
pub(super) fn part_id(claim: &str, n: usize) -> String {
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
