//! Read-only views of a data root for people: what waits in incoming/, what is
//! being scanned, what was rejected and why, and one promoted model's manifest.
//! `airlock serve` shows these; nothing here moves or writes a file.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

use super::{Claim, Manifest, Report, Root, SIDECAR_SUFFIXES, is_eligible_name, read_json};

/// An entry in incoming/ that the watcher will take.
#[derive(Clone, Debug, Serialize)]
pub struct Waiting {
    pub name: String,
    /// `file`, `folder`, or `other` (a link or special file, which will be rejected).
    pub kind: &'static str,
    /// Bytes of a file; for a folder, of the files directly in it.
    pub size: u64,
    pub modified: Option<String>,
}

/// A model claimed by a watcher and not yet decided.
#[derive(Clone, Debug, Serialize)]
pub struct InScan {
    pub claim: String,
    pub name: String,
    pub claimed_at: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Queue {
    pub incoming: Vec<Waiting>,
    pub scanning: Vec<InScan>,
    /// Sidecars in incoming/ (`x.gguf.sig`, `x.gguf.origin`) whose model is
    /// not there: never taken on their own, they wait for it (red team D17).
    pub sidecars_without_model: Vec<String>,
}

/// A model in rejected/, with its report when it can be read.
#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    /// Its name in rejected/ (the arrival name, or that name with a claim id).
    pub name: String,
    pub report: Option<Report>,
    /// Why the report could not be read, if it could not.
    pub report_error: Option<String>,
}

/// Whether `name` can only mean one entry directly inside a folder: a
/// request naming `..`, a path or a dot-file is refused before any lookup.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

fn modified(meta: &fs::Metadata) -> Option<String> {
    meta.modified().ok().map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn sorted_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    names.sort();
    Ok(names)
}

pub fn queue(root: &Root) -> io::Result<Queue> {
    let mut q = Queue::default();
    for name in sorted_names(&root.incoming())? {
        if !is_eligible_name(&name) {
            let model = SIDECAR_SUFFIXES.iter().find_map(|s| name.strip_suffix(s));
            if let Some(model) = model.filter(|m| !m.is_empty() && !m.starts_with('.'))
                && fs::symlink_metadata(root.incoming().join(model)).is_err()
            {
                q.sidecars_without_model.push(name);
            }
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(root.incoming().join(&name)) else { continue };
        let (kind, size) = if meta.is_file() {
            ("file", meta.len())
        } else if meta.is_dir() {
            let size = fs::read_dir(root.incoming().join(&name))
                .map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
                .unwrap_or(0);
            ("folder", size)
        } else {
            ("other", 0)
        };
        q.incoming.push(Waiting { name, kind, size, modified: modified(&meta) });
    }
    for id in sorted_names(&root.scanning())? {
        if id.starts_with('.') {
            continue; // being created or removed
        }
        if let Ok(c) = read_json::<Claim>(&root.scanning().join(&id).join("claim.json")) {
            q.scanning.push(InScan { claim: c.id, name: c.name, claimed_at: c.claimed_at });
        }
    }
    Ok(q)
}

pub fn rejected(root: &Root) -> io::Result<Vec<Rejected>> {
    let mut out = Vec::new();
    for name in sorted_names(&root.rejected())? {
        if name.starts_with('.') {
            continue;
        }
        if !is_rejected_model(root, &name) {
            continue;
        }
        let (report, report_error) = match report(root, &name) {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        out.push(Rejected { name, report, report_error });
    }
    Ok(out)
}

/// Whether `rejected/<name>` is a rejected model rather than what travels with
/// one. A name shaped like a report or sidecar is a model only when it has a
/// report of its own (red team D17: a model named `hidden.report.json`).
pub fn is_rejected_model(root: &Root, name: &str) -> bool {
    let attached = name.ends_with(".report.json") || SIDECAR_SUFFIXES.iter().any(|s| name.ends_with(s));
    is_plain_name(name)
        && (!attached || fs::symlink_metadata(root.rejected().join(format!("{name}.report.json"))).is_ok())
}

/// Reads a JSON record only if it is a regular file: a link planted in the
/// data root is not followed out of it.
fn read_regular<T: serde::de::DeserializeOwned>(path: &Path) -> io::Result<T> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is not a regular file", path.display())));
    }
    read_json(path)
}

/// `rejected/<name>.report.json`.
pub fn report(root: &Root, name: &str) -> io::Result<Report> {
    if !is_plain_name(name) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a plain name")));
    }
    read_regular(&root.rejected().join(format!("{name}.report.json")))
}

/// `registry/<name>/manifest.json`.
pub fn manifest(root: &Root, name: &str) -> io::Result<Manifest> {
    if !is_plain_name(name) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a plain name")));
    }
    let dir = root.registry().join(name);
    if !fs::symlink_metadata(&dir)?.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} is not a folder", dir.display())));
    }
    read_regular(&dir.join("manifest.json"))
}
