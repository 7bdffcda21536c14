//! The watcher's side: sends claims as jobs, waits for their replies and checks them.

use super::*;

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
pub(super) const PUT_DEADLINE: Duration = Duration::from_secs(60);

/// A job with no reply this long gets a warning that says what the queue
/// looks like (no worker connected, none asking, one holding it), so a
/// watcher with no workers does not look like a hung one; then every
/// `WAITING_NOTICE_EVERY`.
/// How often a waiting watcher checks that its job is still queued.
pub(super) const LOST_JOB_CHECK: Duration = Duration::from_secs(5);
pub(super) const WAITING_NOTICE: Duration = Duration::from_secs(30);
pub(super) const WAITING_NOTICE_EVERY: Duration = Duration::from_secs(300);

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
pub(super) enum Stored {
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
