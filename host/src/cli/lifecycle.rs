//! The lifecycle commands: admit, watch, list, show, verify, audit.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{PREFIX, Progress, one_line};
use crate::artifact::{Model, ReadMode};
use crate::store::{self, AuditLog, Disposition, Manifest, Quarantine, Root, manifest};

/// Which sidecar suffix a signature file travels under: its own suffix, with
/// model-signing's default names (`model.sig`, `model.sigstore.json`) mapped.
fn signature_suffix(path: &Path) -> Result<&'static str> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let suffix = match name.as_str() {
        "model.sig" => Some(".model.sig"),
        "model.sigstore.json" => Some(".sigstore.json"),
        _ => [".model.sig", ".sigstore.json", ".asc", ".sig"].into_iter().find(|s| name.ends_with(s)),
    };
    suffix.with_context(|| {
        format!("{}: a signature file must end in .asc, .sig, .sigstore.json or .model.sig", path.display())
    })
}

/// Copies `from` to `to` through a hidden `.partial` name, fsynced.
fn copy_in(root: &Root, from: &Path, to_name: &str) -> Result<()> {
    let tmp = root.incoming().join(format!(".{to_name}.partial"));
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, root.incoming().join(to_name))?;
    Ok(())
}

/// Copies a model folder, fsyncing every file and folder. Only regular files
/// and folders: a link or a special file stops the copy, named, since the
/// quarantine would refuse the folder for it anyway. In a Hugging Face cache
/// snapshot, a link into the repository's `blobs/` is copied as the blob it
/// names, once the blob matches the hash its name records.
fn copy_tree(from: &Path, to: &Path, snapshot: Option<&HfSnapshot>) -> Result<()> {
    fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries: Vec<_> =
        fs::read_dir(from).with_context(|| from.display().to_string())?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dest) = (e.path(), to.join(e.file_name()));
        let ft = fs::symlink_metadata(&src).with_context(|| src.display().to_string())?.file_type();
        if ft.is_dir() {
            copy_tree(&src, &dest, snapshot)?;
        } else if ft.is_file() {
            fs::copy(&src, &dest).with_context(|| format!("copying {}", src.display()))?;
            fs::File::open(&dest)?.sync_all()?;
        } else if let (true, Some(snap)) = (ft.is_symlink(), snapshot) {
            snap.copy_blob(&src, &dest)?;
        } else {
            bail!("{}: a link or special file; model folders hold only regular files and folders", src.display());
        }
    }
    store::root::sync_dir(to)?;
    Ok(())
}

/// A Hugging Face hub cache snapshot, `models--ORG--NAME/snapshots/REV/`,
/// whose files are links into `models--ORG--NAME/blobs/`.
struct HfSnapshot {
    /// The repository's `blobs/`, links resolved.
    blobs: std::path::PathBuf,
    /// `ORG--NAME`: the name the model is admitted under.
    name: String,
}

impl HfSnapshot {
    fn of(path: &Path) -> Option<HfSnapshot> {
        let canon = fs::canonicalize(path).ok()?;
        let snapshots = canon.parent()?;
        if snapshots.file_name()? != "snapshots" {
            return None;
        }
        let repo = snapshots.parent()?;
        let name = repo.file_name()?.to_str()?.strip_prefix("models--")?.to_string();
        let blobs = fs::canonicalize(repo.join("blobs")).ok()?;
        Some(HfSnapshot { blobs, name })
    }

    /// Copies the blob the link `link` names to `dest`, checking it against
    /// its name: a sha256 (files stored with Git LFS) or a git blob sha1 (small
    /// files). A link that leaves `blobs/`, or a blob whose bytes do not match
    /// its name, stops the admission.
    fn copy_blob(&self, link: &Path, dest: &Path) -> Result<()> {
        use sha2::Digest;
        let blob = fs::canonicalize(link).with_context(|| format!("{}: a broken link", link.display()))?;
        if blob.parent() != Some(self.blobs.as_path()) || !fs::symlink_metadata(&blob)?.is_file() {
            bail!(
                "{}: links to {}, which is not a file of the cache's {}",
                link.display(),
                blob.display(),
                self.blobs.display()
            );
        }
        let hash = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let is_hex = |n: usize| hash.len() == n && hash.bytes().all(|b| b.is_ascii_hexdigit());
        let bytes = fs::read(&blob).with_context(|| blob.display().to_string())?;
        let actual = if is_hex(64) {
            hex::encode(sha2::Sha256::digest(&bytes))
        } else if is_hex(40) {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            hex::encode(h.finalize())
        } else {
            bail!("{}: links to the blob {hash:?}, whose name is no hash the cache records", link.display());
        };
        if actual != hash.to_ascii_lowercase() {
            bail!(
                "{}: the blob {hash} holds other bytes (their hash is {actual}); the cache is damaged or was altered",
                link.display()
            );
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(())
    }
}

/// Copies a model (a file, or a model folder) into incoming/ under a `.partial` name, fsyncs it, writes
/// its origin and signature sidecars, then renames it into place: the watcher
/// never sees half a file, nor a model whose signature has not arrived.
pub fn admit(root: &Root, path: &Path, origin: Option<&str>, signatures: &[std::path::PathBuf]) -> Result<ExitCode> {
    root.check()?;
    let meta = fs::symlink_metadata(path).with_context(|| path.display().to_string())?;
    let folder = meta.is_dir();
    let snapshot = if folder { HfSnapshot::of(path) } else { None };
    if folder && snapshot.is_none() && crate::artifact::folder_layout(path).is_none() {
        bail!(
            "{}: a folder is admitted only as a model: model_index.json (diffusers), or config.json and weights (transformers)",
            path.display()
        );
    }
    if !meta.is_file() && !folder {
        bail!("{}: only regular files and model folders can be admitted (not links or devices)", path.display());
    }
    let name = match &snapshot {
        Some(snap) => snap.name.clone(),
        None => path.file_name().context("the path has no file name")?.to_string_lossy().into_owned(),
    };
    if !store::is_eligible_name(&name) {
        bail!(
            "{name}: dot-files, .partial/.tmp/.part names and sidecar names (.origin, .asc, .sig, .sigstore.json) are never taken from incoming/ as models"
        );
    }
    let dest = root.incoming().join(&name);
    if fs::symlink_metadata(&dest).is_ok() {
        bail!("{} already exists", dest.display());
    }
    let mut suffixes = Vec::new();
    for sig in signatures {
        let meta = fs::symlink_metadata(sig).with_context(|| sig.display().to_string())?;
        if !meta.is_file() {
            bail!("{}: a signature must be a regular file", sig.display());
        }
        let suffix = signature_suffix(sig)?;
        if suffixes.contains(&suffix) {
            bail!("two signatures would both be stored as {name}{suffix}");
        }
        let dest = root.incoming().join(format!("{name}{suffix}"));
        if fs::symlink_metadata(&dest).is_ok() {
            bail!("{} already exists", dest.display());
        }
        suffixes.push(suffix);
    }
    let tmp = root.incoming().join(format!(".{name}.partial"));
    if folder {
        let copied = copy_tree(path, &tmp, snapshot.as_ref()).and_then(|()| {
            // A snapshot's layout is known only once its links are blobs.
            if crate::artifact::folder_layout(&tmp).is_none() {
                bail!(
                    "{}: a folder is admitted only as a model: model_index.json (diffusers), or config.json and \
                     weights (transformers)",
                    path.display()
                );
            }
            Ok(())
        });
        if copied.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        copied?;
    } else {
        fs::copy(path, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
        fs::File::open(&tmp)?.sync_all()?;
    }
    for (sig, suffix) in signatures.iter().zip(&suffixes) {
        copy_in(root, sig, &format!("{name}{suffix}"))?;
    }
    if let Some(url) = origin {
        store::root::write_atomic(&root.incoming().join(format!("{name}.origin")), format!("{url}\n").as_bytes())?;
    }
    fs::rename(&tmp, &dest)?;
    store::root::sync_dir(&root.incoming())?;
    outln!("{name}: admitted to {}", root.incoming().display());
    Ok(ExitCode::SUCCESS)
}

fn report(d: &Result<Disposition, String>) {
    let mut out = std::io::stdout().lock();
    let _ = match d {
        Ok(Disposition::Promoted { name }) => {
            let name = one_line(name);
            writeln!(out, "{PREFIX} PROMOTED: {name} → registry/{name}")
        }
        Ok(Disposition::Rejected { name, failed_stage, reason, report }) => writeln!(
            out,
            "{PREFIX} REJECTED: {} — {failed_stage}: {} (report: {})",
            one_line(name),
            one_line(reason),
            one_line(&report.display().to_string())
        ),
        Err(e) => writeln!(out, "{PREFIX} ERROR: {}", one_line(e)),
    };
    let _ = out.flush();
}

/// Holds an exclusive lock on `state/watch.lock` for the life of the watcher:
/// two watchers on one root would race each other's claims and audit entries.
struct RootLock(#[allow(dead_code)] fs::File);

fn lock_root(root: &Root) -> Result<RootLock> {
    let path = root.state().join("watch.lock");
    let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
    // flock(2), exclusive, without waiting; released when the file is closed.
    match f.try_lock() {
        Ok(()) => Ok(RootLock(f)),
        Err(fs::TryLockError::WouldBlock) => bail!("another `airlock watch` holds {} for this root", path.display()),
        Err(fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Watches incoming/ (store::watch does the work) until SIGTERM or SIGINT,
/// or, with `once`, until what was waiting is done.
pub fn watch(q: &Quarantine, once: bool, settle: Duration, jobs: usize) -> Result<ExitCode> {
    let _lock = lock_root(&q.root)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    // With several models in flight their lines interleave: no progress bar then.
    let progress = Progress::new(jobs == 1);
    if !once {
        errln!("airlock: watching {} ({jobs} at a time)", q.root.incoming().display());
    }
    let options = store::watch::Options { once, settle, jobs };
    store::watch::run(q, &options, &stop, &|e| progress.event(&e), &|d| {
        progress.clear();
        report(d);
    })
    .context("watching incoming/")?;
    Ok(ExitCode::SUCCESS)
}

pub fn list(root: &Root, json: bool) -> Result<ExitCode> {
    let index = store::read_index(root)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&index)?).map_err(super::stdout_error)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{:<40} {:<12} {:>12}  {:<64}  PROMOTED_AT", "NAME", "FORMAT", "SIZE", "SHA256")
        .map_err(super::stdout_error)?;
    for e in index {
        writeln!(
            out,
            "{:<40} {:<12} {:>12}  {:<64}  {}",
            e.name,
            e.format,
            e.size,
            e.sha256.as_deref().unwrap_or("-"),
            e.promoted_at
        )
        .map_err(super::stdout_error)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn manifest_of(root: &Root, name: &str) -> Result<(std::path::PathBuf, Manifest)> {
    if name.contains('/') || name.starts_with('.') {
        bail!("{name:?} is not a model name");
    }
    let dir = root.registry().join(name);
    let path = dir.join("manifest.json");
    let m: Manifest =
        serde_json::from_slice(&fs::read(&path).with_context(|| format!("{name} is not in the registry"))?)
            .with_context(|| path.display().to_string())?;
    Ok((dir, m))
}

pub fn show(root: &Root, name: &str) -> Result<ExitCode> {
    let (dir, _) = manifest_of(root, name)?;
    let text = fs::read_to_string(dir.join("manifest.json"))?;
    outln!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Re-hashes the registry copy and compares it with the manifest.
pub fn verify(root: &Root, name: &str) -> Result<ExitCode> {
    let (dir, m) = manifest_of(root, name)?;
    // The model (file or folder) sits in its registry folder's model/ under its own name.
    let target = store::model_path(&dir, &m.name);
    // What was promoted passed the policy's folder limits; verify re-reads it whole.
    let unbounded =
        crate::artifact::FolderLimits { max_files: usize::MAX, max_depth: usize::MAX, max_total_gib: u64::MAX };
    let model = Model::open(&target, ReadMode::default(), &unbounded)?;
    let now = manifest::integrity(&model).map_err(anyhow::Error::msg)?;
    let mut diffs = manifest::differences(&m.integrity, &now);
    // A link or special file added to a folder is no file of the manifest, but
    // a loader would follow or open it: it is a difference too.
    diffs.extend(
        model
            .surroundings
            .iter()
            .map(|s| format!("{}: a {} ({}) that is not in the manifest", s.path, s.kind, s.detail)),
    );
    // Beside the model in model/ only its own sidecars may sit.
    if let Some(holder) = target.parent().filter(|p| p.file_name().is_some_and(|n| n == store::MODEL_DIR)) {
        let expected: Vec<String> = std::iter::once(m.name.clone())
            .chain(crate::artifact::SIDECAR_SUFFIXES.iter().map(|s| format!("{}{s}", m.name)))
            .collect();
        for e in fs::read_dir(holder)?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if !expected.contains(&n) {
                diffs.push(format!("{}/{n}: not part of the promoted model", store::MODEL_DIR));
            }
        }
    }
    if diffs.is_empty() {
        outln!("{name}: OK ({} files, merkle root {})", now.files.len(), now.merkle_root);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{name}: DOES NOT MATCH its manifest");
    for d in diffs {
        outln!("  {d}");
    }
    Ok(ExitCode::from(1))
}

pub fn audit(root: &Root, verify: bool) -> Result<ExitCode> {
    let log = AuditLog::new(&root.audit_log());
    if verify {
        return Ok(match log.verify() {
            Ok(n) => {
                outln!("audit log OK: {n} entries, hash chain intact");
                ExitCode::SUCCESS
            }
            Err(e) => {
                outln!("audit log BROKEN: {e}");
                ExitCode::from(1)
            }
        });
    }
    let mut out = std::io::stdout().lock();
    for e in log.entries()? {
        writeln!(out, "{}", serde_json::to_string(&e)?).map_err(super::stdout_error)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `airlock queue`: the scale-out queue, as text or one JSON object.
pub fn print_queue(s: &crate::scale_out::QueueStatus, json: bool) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(s)?).map_err(super::stdout_error)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!("queue on {}\n", s.server);
    text += &format!("jobs waiting        {}\n", s.waiting);
    text += &format!("jobs being scanned  {}", s.being_scanned);
    if s.redelivered > 0 {
        text += &format!(" ({} redelivered)", s.redelivered);
    }
    text += "\n";
    if s.workers_seen {
        text += &format!("idle worker slots   {}\n", s.idle_worker_slots);
    } else {
        text += "idle worker slots   0 (no worker has connected to this queue yet)\n";
    }
    for j in &s.listed_jobs {
        text += &format!("  job {}  {}  ({})\n", j.id, j.what, j.transfer);
    }
    if s.jobs > s.listed_jobs.len() as u64 {
        text += &format!("  ... and {} more\n", s.jobs - s.listed_jobs.len() as u64);
    }
    text += &format!("results stored      {} (kept 30 days)\n", s.results);
    text += &format!("dead letters        {}\n", s.dead_letters.len());
    for d in &s.dead_letters {
        text += &format!("  job {} {} after {} deliveries ({}): {}\n", d.id, d.name, d.deliveries, d.worker, d.reason);
    }
    match &s.objects {
        Some(o) => {
            text += &format!(
                "models in transit   {} objects, {} bytes in {}",
                o.objects,
                o.bytes,
                crate::scale_out::MODELS_BUCKET
            )
        }
        None => text += "models in transit   none (no Object Store bucket: shared-path transfer)",
    }
    writeln!(out, "{text}").map_err(super::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}
