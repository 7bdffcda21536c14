//! A sharded folder scanned in parts: which files are its shards, a part
//! job's scan of one shard, and a join's inputs read back as the watcher
//! checked them.

use super::*;

/// Runs `part` of each job plugin over the shard's files of the model at
/// `path`; returns the shard's sha256s and one part (or refusal) per plugin.
pub(super) type Parts = (BTreeMap<String, String>, Vec<Result<String, String>>);
pub(super) fn part_job(
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
pub(super) struct Joined {
    pub(super) parts: BTreeMap<usize, crate::pipeline::Joined>,
    pub(super) files: BTreeMap<String, (String, String)>,
    pub(super) workers: Vec<String>,
}

/// A folder's weight files (safetensors or GGUF) in model order when it has
/// two or more: the shards a split scan makes one part of each. Empty for a
/// single file or a folder with one weight file.
pub(super) fn weight_shards(model: &Model) -> Vec<String> {
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
pub(super) async fn read_parts(
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
