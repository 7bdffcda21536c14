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
use crate::lifecycle::{self, AuditLog, Disposition, Manifest, Quarantine, Root, manifest};

/// `airlock admit`: the lifecycle copies the model in; this prints where.
pub fn admit(root: &Root, path: &Path, origin: Option<&str>, signatures: &[std::path::PathBuf]) -> Result<ExitCode> {
    let name = lifecycle::admit::admit(root, path, origin, signatures)?;
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

/// Watches incoming/ (lifecycle::watch does the work) until SIGTERM or SIGINT,
/// or, with `once`, until what was waiting is done.
pub fn watch(q: &Quarantine, once: bool, settle: Duration, jobs: usize) -> Result<ExitCode> {
    let _lock = q.root.lock_watch()?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    // With several models in flight their lines interleave: no progress bar then.
    let progress = Progress::new(jobs == 1);
    if !once {
        errln!("airlock: watching {} ({jobs} at a time)", q.root.incoming().display());
    }
    let options = lifecycle::watch::Options { once, settle, jobs };
    lifecycle::watch::run(q, &options, &stop, &|e| progress.event(&e), &|d| {
        progress.clear();
        report(d);
    })
    .context("watching incoming/")?;
    Ok(ExitCode::SUCCESS)
}

pub fn list(root: &Root, json: bool) -> Result<ExitCode> {
    let index = lifecycle::read_index(root)?;
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
    let target = lifecycle::model_path(&dir, &m.name);
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
    if let Some(holder) = target.parent().filter(|p| p.file_name().is_some_and(|n| n == lifecycle::MODEL_DIR)) {
        let expected: Vec<String> = std::iter::once(m.name.clone())
            .chain(crate::artifact::SIDECAR_SUFFIXES.iter().map(|s| format!("{}{s}", m.name)))
            .collect();
        for e in fs::read_dir(holder)?.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if !expected.contains(&n) {
                diffs.push(format!("{}/{n}: not part of the promoted model", lifecycle::MODEL_DIR));
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
