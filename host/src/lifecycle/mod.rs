//! The quarantine lifecycle: claim a model from `incoming/`, scan it, then
//! promote it into `registry/` or reject it into `quarantine/rejected/`.
//!
//! Crash consistency comes from an ordering of atomic renames and fsynced
//! journal files, so that after a `kill -9` anywhere every model is in exactly
//! one of incoming, scanning, registry or rejected:
//!
//! 1. claim: `scanning/.<id>.tmp/claim.json` is written, the folder renamed to
//!    `scanning/<id>/`, then the upload (the model and its sidecars) renamed
//!    into its `upload/` sub-folder. airlock then takes a private copy into
//!    `model/` (see private_copy.rs) and removes the upload; only the copy is
//!    scanned and promoted. The model never shares a folder with the journal
//!    files, so no model name can replace one.
//! 2. decide: the scan's outcome goes to `decision.json` (and, on a pass,
//!    `manifest.json`) inside the claim folder, fsynced.
//! 3. promote: the whole claim folder is renamed to `registry/<name>/`, so
//!    nothing reaches the registry without its pass record and manifest. Pins,
//!    the index and the audit entry follow; `decision.json` is removed last.
//!    A registry folder that still holds `decision.json` is finished on restart.
//! 4. reject: the model is renamed to `rejected/`, the report written, the audit
//!    entry appended, and the claim folder removed. A claim folder whose model is
//!    gone is finished on restart from its `decision.json`.
//!
//! A claim folder that still holds its model goes back through the pipeline on
//! restart; it never goes straight to the registry.

pub mod admit;
pub mod audit;
pub mod listing;
pub mod manifest;
pub mod outbox;
mod private_copy;
pub mod root;
pub mod watch;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::artifact::{self, Model, ReadMode};
use crate::pipeline::{
    Event, FailedAt, HostStep, ModelVerdict, Outcome, Scan, ScanInput, ScanJob, Scanner, StageResult,
};
use crate::policy::{self, Policy, Stage};
pub use audit::{AuditLog, Record};
pub use manifest::Manifest;
pub use root::Root;
use root::{sync_dir, write_atomic};

pub use crate::artifact::SIDECAR_SUFFIXES;

/// Names that are never taken from `incoming/`: partial downloads, dot-files
/// and sidecars.
pub fn is_eligible_name(name: &str) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".partial")
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || SIDECAR_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

/// The claim folder's sub-folder that holds the model airlock scans (its
/// private copy) with its sidecars; it stays the same in `registry/<name>/`.
pub const MODEL_DIR: &str = "model";
/// The claim folder's sub-folder the upload is moved into before it is copied.
const UPLOAD_DIR: &str = "upload";
/// Journal file: the model in `model/` is the upload itself, not a private
/// copy (it held a link or special file, or the copy failed; the file says
/// why). Such a model is scanned, so its verdict names what is wrong, but it
/// is never promoted.
const AS_UPLOADED: &str = "as-uploaded";

/// Where a registry folder (or a claim folder) holds the model: `model/<name>`,
/// or `<name>` beside the manifest in a registry folder promoted before 0.3.
pub fn model_path(dir: &Path, name: &str) -> PathBuf {
    let inside = dir.join(MODEL_DIR).join(name);
    if fs::symlink_metadata(&inside).is_err() && fs::symlink_metadata(dir.join(name)).is_ok() {
        return dir.join(name);
    }
    inside
}

/// The entries an upload of `name` may hold: the model first, then its sidecars.
fn upload_entries(name: &str) -> Vec<String> {
    std::iter::once(name.to_string()).chain(SIDECAR_SUFFIXES.iter().map(|s| format!("{name}{s}"))).collect()
}

/// `scanning/<id>/claim.json`: which model a claim folder holds.
#[derive(Serialize, Deserialize)]
struct Claim {
    id: String,
    name: String,
    claimed_at: String,
}

/// The verdict journaled in the claim folder before the model moves.
#[derive(Clone, Serialize, Deserialize)]
struct Decision {
    promote: bool,
    failed_stage: Option<FailedAt>,
    reason: Option<String>,
    sha256: Option<String>,
    /// The scan outcome, for the report; none when the model was refused before a scan.
    outcome: Option<Outcome>,
}

/// What happened to one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    Promoted { name: String },
    Rejected { name: String, failed_stage: FailedAt, reason: String, report: PathBuf },
}

/// `rejected/<name>.report.json`: why a model was refused, with every stage's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The name the model arrived under (the file in rejected/ may carry a claim id).
    pub filename: String,
    pub rejected_at: String,
    pub failed_stage: FailedAt,
    pub reason: String,
    pub sha256: Option<String>,
    pub scan_details: ScanDetails,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScanDetails {
    /// The plugins that ran, with their digests.
    pub scanners: Vec<ReportScanner>,
    pub stages: Vec<StageResult>,
}

/// One plugin as a report names it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportScanner {
    pub stage: Stage,
    pub plugin: String,
    pub plugin_sha256: Option<String>,
    pub version: Option<String>,
    pub name: Option<String>,
}

/// One registry index row.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    pub format: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub promoted_at: String,
    pub fingerprint: String,
    pub merkle_root: String,
}

/// The lifecycle over one data root.
pub struct Quarantine<'a> {
    pub root: Root,
    scanner: &'a Scanner,
    policy: &'a Policy,
    audit: AuditLog,
    /// How scans run: `scanner` here, or the workers (`watch --dispatch`).
    scan: &'a dyn Scan,
}

fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<T> {
    serde_json::from_slice(&fs::read(path)?).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value).map_err(io::Error::other)?)
}

/// Renames `from` to `to` unless `to` exists (rename(2) would replace a file).
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} already exists", to.display())));
    }
    fs::rename(from, to)
}

impl<'a> Quarantine<'a> {
    pub fn new(root: Root, scanner: &'a Scanner, policy: &'a Policy) -> io::Result<Self> {
        root.check()?;
        let audit = AuditLog::new(&root.audit_log());
        audit.repair()?;
        Ok(Quarantine { root, scanner, policy, audit, scan: scanner })
    }

    /// Runs every scan through `scan` (the workers behind a dispatcher) and
    /// decides from its outcomes.
    pub fn with_scan(mut self, scan: &'a dyn Scan) -> Self {
        self.scan = scan;
        self
    }

    /// Entries in `incoming/` that may be taken, in name order. A folder waits
    /// until it is a model folder (`model_index.json`, or `config.json` and
    /// weights); the watcher also waits for every shard its index names.
    pub fn waiting(&self) -> io::Result<Vec<String>> {
        let incoming = self.root.incoming();
        self.rename_non_utf8_names(&incoming)?;
        let mut names: Vec<String> = fs::read_dir(&incoming)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_eligible_name(n))
            .filter(|n| {
                let p = incoming.join(n);
                !fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) || artifact::folder_layout(&p).is_some()
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// A name that is not UTF-8 cannot be claimed, reported or shown, and once
    /// stayed in `incoming/` for good (red team D17). It is renamed in place
    /// to the same name with each byte that is not UTF-8 written `%XX`, and
    /// then taken like any other.
    fn rename_non_utf8_names(&self, incoming: &Path) -> io::Result<()> {
        use std::fmt::Write;
        use std::os::unix::ffi::OsStrExt;
        for e in fs::read_dir(incoming)?.filter_map(|e| e.ok()) {
            let raw = e.file_name();
            if raw.to_str().is_some() {
                continue;
            }
            let mut fixed = String::new();
            for chunk in raw.as_bytes().utf8_chunks() {
                fixed.push_str(chunk.valid());
                for b in chunk.invalid() {
                    let _ = write!(fixed, "%{b:02X}");
                }
            }
            match rename_new(&incoming.join(&raw), &incoming.join(&fixed)) {
                Ok(()) => tracing::warn!("{:?} in incoming/ is not UTF-8; renamed to {fixed:?}", raw),
                Err(err) => {
                    tracing::warn!("{:?} in incoming/ is not UTF-8 and cannot be renamed to {fixed:?}: {err}", raw)
                }
            }
        }
        Ok(())
    }

    /// Finishes or redoes what a crash interrupted. Claim folders with their
    /// model go back through the pipeline; half-promoted or half-rejected ones
    /// are finished from their journal.
    pub fn recover(&self, on_event: &mut dyn FnMut(Event)) -> Vec<Result<Disposition, String>> {
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(self.root.scanning()) {
            let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            dirs.sort();
            for dir in dirs {
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with('.') {
                    // A claim that never completed (its model is still in
                    // incoming/) or a finished one being removed.
                    let _ = fs::remove_dir_all(&dir);
                    continue;
                }
                tracing::warn!("recovering interrupted work in {}", dir.display());
                out.push(self.process_claimed(&dir, on_event).map_err(|e| format!("{}: {e}", dir.display())));
            }
        }
        if let Ok(entries) = fs::read_dir(self.root.registry()) {
            for e in entries.filter_map(|e| e.ok()) {
                let dir = e.path();
                if dir.join("decision.json").exists() {
                    tracing::warn!("finishing the interrupted promotion of {}", dir.display());
                    out.push(self.finish_promotion(&dir).map_err(|e| format!("{}: {e}", dir.display())));
                }
            }
        }
        out
    }

    /// Claims `incoming/<name>` and takes it through the pipeline.
    pub fn take(&self, name: &str, on_event: &mut dyn FnMut(Event)) -> Result<Disposition, String> {
        let dir = self.claim(name).map_err(|e| format!("{name}: cannot claim: {e}"))?;
        self.process_claimed(&dir, on_event).map_err(|e| format!("{name}: {e}"))
    }

    fn claim(&self, name: &str) -> io::Result<PathBuf> {
        let id = new_id();
        let tmp = self.root.scanning().join(format!(".{id}.tmp"));
        let dir = self.root.scanning().join(&id);
        fs::create_dir(&tmp)?;
        let made = (|| {
            fs::create_dir(tmp.join(UPLOAD_DIR))?;
            write_json(
                &tmp.join("claim.json"),
                &Claim { id: id.clone(), name: name.into(), claimed_at: audit::now_rfc3339() },
            )
        })();
        if let Err(e) = made {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dir)?;
        // The rename moves the entry itself: a symlink is moved, never followed.
        // The model goes first; if it or a sidecar cannot move, what moved goes
        // back and the claim folder is removed, so a failed claim leaves nothing
        // behind and the model waits in incoming/ (the watcher backs off).
        let upload = dir.join(UPLOAD_DIR);
        let mut moved: Vec<String> = Vec::new();
        for (i, entry) in upload_entries(name).iter().enumerate() {
            let src = self.root.incoming().join(entry);
            if i > 0 && fs::symlink_metadata(&src).is_err() {
                continue;
            }
            if let Err(e) = fs::rename(&src, upload.join(entry)) {
                for back in moved.iter().rev() {
                    let _ = rename_new(&upload.join(back), &self.root.incoming().join(back));
                }
                let _ = self.remove_claim_dir(&dir);
                return Err(io::Error::new(e.kind(), format!("moving {entry} out of incoming/: {e}")));
            }
            moved.push(entry.clone());
        }
        sync_dir(&self.root.incoming())?;
        sync_dir(&upload)?;
        sync_dir(&dir)?;
        sync_dir(&self.root.scanning())?;
        if let Err(e) = self.take_private_copy(&dir, name) {
            // Nothing judged yet: the upload goes back to incoming/ and the
            // claim folder goes, as for a failed move (the watcher backs off).
            if fs::symlink_metadata(dir.join(MODEL_DIR)).is_err() {
                for back in moved.iter().rev() {
                    let _ = rename_new(&upload.join(back), &self.root.incoming().join(back));
                }
                if moved.iter().all(|m| fs::symlink_metadata(upload.join(m)).is_err()) {
                    let _ = self.remove_claim_dir(&dir);
                }
            }
            return Err(e);
        }
        Ok(dir)
    }

    /// Copies the upload (model and sidecars) into `model/` as airlock's own
    /// bytes, then removes the upload. An upload that cannot be copied (a
    /// link, a special or hardlinked file, over the folder limits) is moved
    /// into `model/` as it is, with `as-uploaded` saying why: it is scanned so
    /// its report names the problem, and never promoted. A copy this machine
    /// fails (a full disk, an I/O error) is an `Err`: the claim is given back.
    /// Idempotent: recovery calls it again for a claim a crash interrupted.
    fn take_private_copy(&self, dir: &Path, name: &str) -> io::Result<()> {
        let (upload, model) = (dir.join(UPLOAD_DIR), dir.join(MODEL_DIR));
        // A copy a crash cut short is started again.
        let partial = dir.join(format!(".{MODEL_DIR}.copy"));
        match fs::remove_dir_all(&partial) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir(&partial)?;
        let mut uncopied = None;
        for (i, entry) in upload_entries(name).iter().enumerate() {
            let src = upload.join(entry);
            if i > 0 && fs::symlink_metadata(&src).is_err() {
                continue;
            }
            match private_copy::copy(&src, &partial.join(entry), &self.policy.folder_limits) {
                Ok(()) => {}
                Err(private_copy::Uncopied::Refused(why)) => {
                    uncopied = Some(why);
                    break;
                }
                // A full disk or an I/O error is this machine's, not the model's:
                // the caller gives the claim back rather than reject a clean model.
                Err(private_copy::Uncopied::Io(why)) => {
                    let _ = fs::remove_dir_all(&partial);
                    return Err(io::Error::other(format!("taking a private copy: {why}")));
                }
            }
        }
        match uncopied {
            None => {
                sync_dir(&partial)?;
                fs::rename(&partial, &model)?;
            }
            Some(why) => {
                fs::remove_dir_all(&partial)?;
                write_atomic(&dir.join(AS_UPLOADED), why.as_bytes())?;
                sync_dir(&upload)?;
                fs::rename(&upload, &model)?;
            }
        }
        sync_dir(dir)?;
        match fs::remove_dir_all(&upload) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Why an entry must be rejected without being opened, if it must.
    fn unclaimable(path: &Path) -> io::Result<Option<String>> {
        let meta = fs::symlink_metadata(path)?;
        let ft = meta.file_type();
        Ok(if ft.is_symlink() {
            let target = fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
            Some(format!("is a symlink (to {target}); airlock never follows links"))
        } else if ft.is_file() && meta.nlink() > 1 {
            Some(format!("is a hardlinked file ({} links): another name could change it under the scan", meta.nlink()))
        } else if ft.is_dir() {
            artifact::folder_layout(path).is_none().then(|| {
                "is a folder with neither model_index.json (a diffusers model) nor config.json and weights \
                 (a transformers model)"
                    .to_string()
            })
        } else if !ft.is_file() {
            Some("is not a regular file (a device, FIFO or socket)".to_string())
        } else {
            None
        })
    }

    fn process_claimed(&self, dir: &Path, on_event: &mut dyn FnMut(Event)) -> io::Result<Disposition> {
        let claim: Claim = match read_json(&dir.join("claim.json")) {
            Ok(c) => c,
            Err(_) => {
                // Claimed folder without a journal cannot happen by our ordering; keep it for a person.
                return Err(io::Error::other("claim.json is missing or unreadable; left in place for inspection"));
            }
        };
        // A journal is airlock's own, but every name read back is checked:
        // one plain component, never a path that could leave the claim folder.
        if !listing::is_plain_name(&claim.name) || !listing::is_plain_name(&claim.id) {
            return Err(io::Error::other(format!(
                "claim.json names {:?} (claim {:?}), which is not a plain name; left in place for inspection",
                claim.name, claim.id
            )));
        }
        // A claim a crash interrupted between the move and the copy, or
        // before the upload was removed: the upload never stays beside the copy.
        if fs::symlink_metadata(dir.join(UPLOAD_DIR)).is_ok() {
            if fs::symlink_metadata(dir.join(MODEL_DIR)).is_ok() {
                fs::remove_dir_all(dir.join(UPLOAD_DIR))?;
            } else if fs::symlink_metadata(dir.join(UPLOAD_DIR).join(&claim.name)).is_ok() {
                self.take_private_copy(dir, &claim.name)?;
            }
        }
        let model_path = dir.join(MODEL_DIR).join(&claim.name);
        if fs::symlink_metadata(&model_path).is_err() {
            // The model already left: finish the decision recorded before it moved.
            return match read_json::<Decision>(&dir.join("decision.json")) {
                Ok(d) if !d.promote => {
                    let _commit = self.root.commit_lock()?;
                    self.finish_rejection(dir, &claim, &d)
                }
                // A journal this build cannot read (another version wrote it): the
                // model left under it, so guessing could lose its rejection.
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io::Error::other(format!("decision.json cannot be read ({e}); left in place for inspection")))
                }
                _ => {
                    // Claimed folder made, model never moved in: it is still in incoming/.
                    self.remove_claim_dir(dir)?;
                    Err(io::Error::other("the claim never completed; the model stays in incoming/"))
                }
            };
        }
        let decision = self.decide(dir, &claim, &model_path, on_event)?;
        write_json(&dir.join("decision.json"), &decision)?;
        if decision.promote { self.promote(dir, &claim) } else { self.reject(dir, &claim, &decision) }
    }

    fn reject_decision(failed_stage: FailedAt, reason: String, outcome: Option<Outcome>) -> Decision {
        Decision { promote: false, failed_stage: Some(failed_stage), reason: Some(reason), sha256: None, outcome }
    }

    /// Scans the claimed model and, on a pass, writes its manifest.
    fn decide(&self, dir: &Path, claim: &Claim, path: &Path, on_event: &mut dyn FnMut(Event)) -> io::Result<Decision> {
        if let Some(why) = Self::unclaimable(path)? {
            return Ok(Self::reject_decision(FailedAt::Host(HostStep::Claim), format!("{} {why}", claim.name), None));
        }
        let model = match Model::open(path, ReadMode::default(), &self.policy.folder_limits) {
            Ok(m) => Arc::new(m),
            Err(e) => return Ok(Self::reject_decision(FailedAt::Host(HostStep::Claim), e.to_string(), None)),
        };
        let pins = policy::load_pins(&self.root.pins()).map_err(io::Error::other)?;
        // The pins as they are now: one recorded since the watcher started applies.
        let (sha256, pinned_files) = match pins.get(&claim.name) {
            Some(policy::Pin::File(sha)) => (Some(sha.clone()), None),
            Some(policy::Pin::Folder(files)) => (None, Some(files.clone())),
            None => (None, Some(Default::default())),
        };
        let input = ScanInput { origin: None, sha256, pinned_files, read_mode: ReadMode::default() };
        let job = ScanJob { id: &claim.id, name: &claim.name };
        let outcome = match self.scan.scan_claim(&job, &model, path, &input, on_event).map_err(io::Error::other)? {
            Ok(o) => o,
            Err(reason) => return Ok(Self::reject_decision(FailedAt::Host(HostStep::Dispatch), reason, None)),
        };
        if outcome.verdict == ModelVerdict::Pass
            && let Ok(why) = fs::read_to_string(dir.join(AS_UPLOADED))
        {
            let mut d = Self::reject_decision(
                FailedAt::Host(HostStep::Claim),
                format!(
                    "{}: airlock could not take a private copy at claim ({why}); a model whose bytes the uploader \
                     still holds is never promoted",
                    claim.name
                ),
                None,
            );
            d.sha256 = outcome.sha256.clone();
            d.outcome = Some(outcome);
            return Ok(d);
        }
        if outcome.verdict != ModelVerdict::Pass {
            // A failed verdict always names where; fail closed if it ever did not.
            let at = outcome.failed_stage.unwrap_or(FailedAt::Host(HostStep::Host));
            let mut d = Self::reject_decision(at, outcome.reason.clone().unwrap_or_default(), None);
            d.sha256 = outcome.sha256.clone();
            d.outcome = Some(outcome);
            return Ok(d);
        }
        if fs::symlink_metadata(self.root.registry().join(&claim.name)).is_ok() {
            let mut d = Self::reject_decision(
                FailedAt::Host(HostStep::Registry),
                format!("a model named {:?} is already in the registry; remove it or rename the new file", claim.name),
                None,
            );
            d.sha256 = outcome.sha256.clone();
            d.outcome = Some(outcome);
            return Ok(d);
        }
        // The scan and the manifest must describe the same bytes: a model that
        // changed (or could not be re-read) since it was opened is rejected.
        let integrity = match manifest::integrity(&model).and_then(|i| model.check_unchanged().map(|_| i)) {
            Ok(i) => i,
            Err(e) => {
                let mut d = Self::reject_decision(FailedAt::Host(HostStep::Host), e, None);
                d.sha256 = outcome.sha256.clone();
                d.outcome = Some(outcome);
                return Ok(d);
            }
        };
        let manifest = Manifest {
            name: claim.name.clone(),
            kind: model.kind.name().into(),
            promoted_at: audit::now_rfc3339(),
            // The host's own reading, not a plugin's report of it: a third-party
            // source-policy plugin need not echo the origin back.
            origin: outcome.origin.clone(),
            policy: self.policy.origin.clone(),
            disabled_stages: self.scanner.disabled_stages(),
            stages: outcome.stages.clone(),
            integrity,
        };
        write_json(&dir.join("manifest.json"), &manifest)?;
        Ok(Decision {
            promote: true,
            failed_stage: None,
            reason: None,
            sha256: outcome.sha256.clone(),
            outcome: Some(outcome),
        })
    }

    fn promote(&self, dir: &Path, claim: &Claim) -> io::Result<Disposition> {
        // The short commit steps (renames into registry/ and rejected/, pins,
        // index, audit) run one at a time, across threads and processes; the
        // scans and manifests run outside the lock.
        let _commit = self.root.commit_lock()?;
        let dest = self.root.registry().join(&claim.name);
        if fs::symlink_metadata(&dest).is_ok() {
            // Another model of the same name was promoted while this one was scanned.
            let mut d: Decision = read_json(&dir.join("decision.json"))?;
            d.promote = false;
            d.failed_stage = Some(FailedAt::Host(HostStep::Registry));
            d.reason = Some(format!(
                "a model named {:?} is already in the registry; remove it or rename the new file",
                claim.name
            ));
            write_json(&dir.join("decision.json"), &d)?;
            let _ = fs::remove_file(dir.join("manifest.json"));
            return self.reject_locked(dir, claim, &d);
        }
        sync_dir(dir)?;
        rename_new(dir, &dest)?;
        sync_dir(&self.root.registry())?;
        sync_dir(&self.root.scanning())?;
        self.finish_promotion(&dest)
    }

    /// Pins, index and audit for a model already in `registry/<name>/`; idempotent.
    fn finish_promotion(&self, dir: &Path) -> io::Result<Disposition> {
        let manifest: Manifest = read_json(&dir.join("manifest.json"))?;
        let decision: Decision = read_json(&dir.join("decision.json"))?;
        let pin = if manifest.kind == "file" {
            manifest.integrity.files.first().map(|f| policy::Pin::File(f.sha256.clone()))
        } else {
            Some(policy::Pin::Folder(
                manifest.integrity.files.iter().map(|f| (f.path.clone(), f.sha256.clone())).collect(),
            ))
        };
        if let Some(pin) = pin {
            self.record_pin(&manifest.name, pin)?;
        }
        let mut index = self.index()?;
        index.retain(|e| e.name != manifest.name);
        index.push(IndexEntry {
            name: manifest.name.clone(),
            format: manifest.integrity.files.iter().map(|f| f.format.as_str()).collect::<Vec<_>>().join(","),
            size: manifest.integrity.files.iter().map(|f| f.size).sum(),
            sha256: decision.sha256.clone(),
            promoted_at: manifest.promoted_at.clone(),
            fingerprint: manifest.integrity.fingerprint.clone(),
            merkle_root: manifest.integrity.merkle_root.clone(),
        });
        index.sort_by(|a, b| a.name.cmp(&b.name));
        write_json(&self.root.index(), &index)?;
        if self.policy.registry.is_some() {
            let body = serde_json::json!({
                "name": manifest.name,
                "sha256": decision.sha256,
                "metadata": { "kind": manifest.kind, "origin": manifest.origin, "promoted_at": manifest.promoted_at },
                "scan_results": manifest.stages,
                "scanners": { "airlock": env!("CARGO_PKG_VERSION"), "policy": manifest.policy,
                              "disabled_stages": manifest.disabled_stages },
                "integrity": manifest.integrity,
            });
            outbox::enqueue(&self.root.state(), &manifest.name, &body)?;
        }
        self.audit.append(Record {
            level: "INFO",
            event: "promoted",
            model: manifest.name.clone(),
            sha256: decision.sha256,
            disabled_stages: manifest.disabled_stages.clone(),
            ..Record::default()
        })?;
        fs::remove_file(dir.join("decision.json"))?;
        sync_dir(dir)?;
        Ok(Disposition::Promoted { name: manifest.name })
    }

    fn reject(&self, dir: &Path, claim: &Claim, decision: &Decision) -> io::Result<Disposition> {
        let _commit = self.root.commit_lock()?;
        self.reject_locked(dir, claim, decision)
    }

    fn reject_locked(&self, dir: &Path, claim: &Claim, decision: &Decision) -> io::Result<Disposition> {
        let dest = self.rejected_name(claim);
        // Journal the name first: once the model has left, recovery finishes
        // the rejection under this name (it may carry the claim id).
        write_atomic(&dir.join("rejected-as"), dest.as_bytes())?;
        let model = dir.join(MODEL_DIR);
        rename_new(&model.join(&claim.name), &self.root.rejected().join(&dest))?;
        for suffix in SIDECAR_SUFFIXES {
            let sidecar = model.join(format!("{}{suffix}", claim.name));
            if fs::symlink_metadata(&sidecar).is_ok() {
                let _ = rename_new(&sidecar, &self.root.rejected().join(format!("{dest}{suffix}")));
            }
        }
        sync_dir(&self.root.rejected())?;
        self.finish_rejection(dir, claim, decision)
    }

    /// A free name in `rejected/`: the model's own, or suffixed with its claim id.
    fn rejected_name(&self, claim: &Claim) -> String {
        let plain = self.root.rejected().join(&claim.name);
        let report = self.root.rejected().join(format!("{}.report.json", claim.name));
        if fs::symlink_metadata(&plain).is_err() && !report.exists() {
            claim.name.clone()
        } else {
            format!("{}.{}", claim.name, claim.id)
        }
    }

    /// Report, audit, and the claim folder's removal; idempotent.
    fn finish_rejection(&self, dir: &Path, claim: &Claim, d: &Decision) -> io::Result<Disposition> {
        let dest = match fs::read_to_string(dir.join("rejected-as")) {
            Ok(d) if listing::is_plain_name(&d) => d,
            Ok(d) => {
                return Err(io::Error::other(format!(
                    "rejected-as names {d:?}, which is not a plain name; left in place for inspection"
                )));
            }
            Err(_) => claim.name.clone(),
        };
        let failed_stage = d.failed_stage.unwrap_or(FailedAt::Host(HostStep::Host));
        let reason = d.reason.clone().unwrap_or_default();
        let report_path = self.root.rejected().join(format!("{dest}.report.json"));
        let stages = d.outcome.as_ref().map(|o| o.stages.clone()).unwrap_or_default();
        let scanners = stages
            .iter()
            .filter_map(|s| {
                Some(ReportScanner {
                    stage: s.stage,
                    plugin: s.plugin.clone()?,
                    plugin_sha256: s.plugin_sha256.clone(),
                    version: s.plugin_info.as_ref().map(|i| i.version.clone()),
                    name: s.plugin_info.as_ref().map(|i| i.name.clone()),
                })
            })
            .collect();
        let report = Report {
            filename: claim.name.clone(),
            rejected_at: audit::now_rfc3339(),
            failed_stage,
            reason: reason.clone(),
            sha256: d.sha256.clone(),
            scan_details: ScanDetails { scanners, stages },
        };
        write_json(&report_path, &report)?;
        self.audit.append(Record {
            level: "CRITICAL",
            event: "rejected",
            model: claim.name.clone(),
            sha256: d.sha256.clone(),
            failed_stage: Some(failed_stage.to_string()),
            reason: Some(reason.clone()),
            disabled_stages: self.scanner.disabled_stages(),
            ..Record::default()
        })?;
        self.remove_claim_dir(dir)?;
        Ok(Disposition::Rejected { name: claim.name.clone(), failed_stage, reason, report: report_path })
    }

    /// Removes a finished claim folder. remove_dir_all deletes entry by entry,
    /// so a kill midway could leave a folder without its claim.json, which
    /// recovery must not guess about; the folder is first renamed to a dot-name
    /// in one atomic step, and recovery deletes dot-names it finds.
    fn remove_claim_dir(&self, dir: &Path) -> io::Result<()> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let doomed = self.root.scanning().join(format!(".{name}.done"));
        fs::rename(dir, &doomed)?;
        sync_dir(&self.root.scanning())?;
        fs::remove_dir_all(&doomed)?;
        sync_dir(&self.root.scanning())
    }

    fn record_pin(&self, name: &str, pin: policy::Pin) -> io::Result<()> {
        policy::record_pin(&self.root.pins(), name, pin)
    }

    /// The registry index (empty when none was written yet).
    pub fn index(&self) -> io::Result<Vec<IndexEntry>> {
        read_index(&self.root)
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Sends queued registry announcements; returns how many are still waiting.
    pub fn flush_outbox(&self) -> usize {
        match &self.policy.registry {
            Some(r) => outbox::flush(&self.root.state(), r),
            None => 0,
        }
    }
}

pub fn read_index(root: &Root) -> io::Result<Vec<IndexEntry>> {
    match read_json(&root.index()) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Moves a rejected model back to `incoming/` and drops its report, so the
/// watcher takes it again. The audit log records the rescan and who asked
/// for it; the entry is returned.
pub fn rescan(root: &Root, name: &str, actor: &str) -> Result<audit::Entry, String> {
    // Held to the end: a watcher's rejection of this name is either finished
    // (model and report both in rejected/) or not begun.
    // Only a rejected model goes back: never a report, a sidecar or a path (red team D18).
    if !listing::is_plain_name(name) {
        return Err(format!("{name:?} is not a plain name in rejected/"));
    }
    if !listing::is_rejected_model(root, name) {
        return Err(format!("{name}: a report or sidecar, not a rejected model"));
    }
    let _commit = root.commit_lock().map_err(|e| e.to_string())?;
    let src = root.rejected().join(name);
    let meta = fs::symlink_metadata(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(format!("{}: not a regular file or folder", src.display()));
    }
    let original = match read_json::<Report>(&root.rejected().join(format!("{name}.report.json"))) {
        Ok(r) if listing::is_plain_name(&r.filename) => r.filename,
        Ok(r) => return Err(format!("{name}.report.json names {:?}, which is not a plain name", r.filename)),
        Err(_) => name.to_string(),
    };
    let dest = root.incoming().join(&original);
    // The old report goes first, set aside: a watcher may take the model the
    // moment it appears in incoming/ and reject it again before this function
    // returns; with the old report still in place it would have to pick a
    // suffixed name in rejected/. The report comes back if the move fails.
    let report = root.rejected().join(format!("{name}.report.json"));
    let set_aside = root.rejected().join(format!(".{name}.report.json.rescan"));
    let had_report = fs::rename(&report, &set_aside).is_ok();
    let restore = |e: std::io::Error| {
        if had_report {
            let _ = fs::rename(&set_aside, &report);
        }
        e.to_string()
    };
    // Sidecars before the model, for the same reason.
    for suffix in SIDECAR_SUFFIXES {
        let sidecar = root.rejected().join(format!("{name}{suffix}"));
        if fs::symlink_metadata(&sidecar).is_ok() {
            rename_new(&sidecar, &root.incoming().join(format!("{original}{suffix}"))).map_err(restore)?;
        }
    }
    rename_new(&src, &dest).map_err(restore)?;
    let _ = fs::remove_file(&set_aside);
    AuditLog::new(&root.audit_log())
        .append(Record {
            level: "INFO",
            event: "rescan",
            model: original,
            actor: Some(actor.into()),
            ..Record::default()
        })
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A rescan waits while the commit lock is held (by a watcher writing a
    /// rejection, here by the test) and moves the model only once it is free.
    #[test]
    fn rescan_waits_for_a_commit_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        root.init().unwrap();
        fs::write(root.rejected().join("m.gguf"), b"x").unwrap();
        let held = root.commit_lock().unwrap();
        let rescan = {
            let root = root.clone();
            std::thread::spawn(move || rescan(&root, "m.gguf", "test"))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert!(root.rejected().join("m.gguf").exists(), "rescan moved the model while a commit held the lock");
        assert!(!root.incoming().join("m.gguf").exists());
        drop(held);
        rescan.join().unwrap().unwrap();
        assert!(root.incoming().join("m.gguf").exists());
        assert!(!root.rejected().join("m.gguf").exists());
    }
}
