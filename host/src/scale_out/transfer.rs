//! The bytes of an object-store job: streamed from the bucket into the
//! worker's scratch folder, each file checked against the job's size and
//! sha256 before anything scans it, and removed when the job is done.

use super::*;

/// A job's copy of a model in the worker's scratch folder, removed when dropped.
pub(super) struct Scratch {
    dir: PathBuf,
    /// The model: `<dir>/<name>`, a file or a folder.
    pub(super) model: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing the scratch copy {}: {e}", self.dir.display());
        }
    }
}

/// One normal path component (a model's name, a claim id): never `..`, `/` or empty.
pub(super) fn one_component<'a>(what: &str, s: &'a str) -> Result<&'a str, String> {
    let mut c = Path::new(s).components();
    match (c.next(), c.next()) {
        (Some(Component::Normal(n)), None) if n == s => Ok(s),
        _ => Err(format!("the job's {what} {s:?} is not a plain name")),
    }
}

/// A path inside a model: only normal components.
pub(super) fn inside_model(rel: &str) -> Result<&Path, String> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(format!("the job names the file {rel:?}, which is not a path inside a model"));
    }
    Ok(p)
}

/// Streams a job's objects into `<scratch>/<id>.<delivery>/<name>`, checking
/// each file's size and sha256 against the job, within the policy's folder limits.
pub(super) async fn fetch(
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
pub(super) async fn download(bucket: &object_store::ObjectStore, f: &ObjectFile, dest: &Path) -> Result<(), String> {
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
