//! The worker: takes jobs, fetches or finds the bytes, scans them, signs and stores the result.

use super::*;

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
pub(super) async fn open_consumer(js: &jetstream::Context) -> Result<jetstream::consumer::Consumer<pull::Config>> {
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
pub(super) fn make_scratch(dir: &Path) -> Result<()> {
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
pub(super) fn inside_claims(job: &Job, claims: &Path) -> Result<(), String> {
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
pub(super) struct Trust {
    signer: Arc<Signer>,
    trusted: Arc<Vec<String>>,
    claims: Arc<PathBuf>,
}

/// One delivery of a job: scan it, store the result, then ack.
pub(super) async fn handle(
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

/// Who did a job, for its result.
pub(super) struct Done {
    me: String,
    delivery: i64,
    digest: String,
}

/// Does a job (a whole scan, a part or a join) and encodes its result; also
/// says what it found, for the log line.
pub(super) fn work(
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
pub(super) type Scanned = (BTreeMap<String, String>, BTreeMap<String, String>, Outcome);
pub(super) fn scan_job(scanner: &Scanner, job: &Job, path: &Path, joined: &Joined) -> Result<Scanned, String> {
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
pub(super) fn open_job_model(scanner: &Scanner, job: &Job, path: &Path) -> Result<Arc<Model>, String> {
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

/// A worker-side failure: the job goes back for another worker, or, on its
/// last scan, to the dead-letter subject with the reason.
pub(super) async fn retry_or_dead(
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
pub(super) async fn last_payload(
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
pub(super) async fn last_hand_back(js: &jetstream::Context, id: &str) -> Result<Option<DeadLetter>> {
    let results = js.get_stream(RESULTS_STREAM).await.with_context(|| format!("opening {RESULTS_STREAM}"))?;
    for subject in (1..MAX_SCANS).rev().map(|d| handed_back_subject(id, d)) {
        let payload = last_payload(&results, &subject).await.with_context(|| format!("reading {subject}"))?;
        if let Some(p) = payload {
            return serde_json::from_slice(&p).map(Some).with_context(|| format!("reading {subject}"));
        }
    }
    Ok(None)
}

pub(super) async fn dead_letter(
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
