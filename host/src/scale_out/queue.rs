//! The queue, as an operator sees it (`airlock queue`).

use super::*;

/// What the JetStream server holds for airlock right now. Read-only: nothing
/// is created, taken or acked.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub server: String,
    /// Jobs in `AIRLOCK_JOBS`: sent by the watcher and not yet acked by a worker.
    pub jobs: u64,
    /// Of those, jobs no worker has taken yet.
    pub waiting: u64,
    /// Jobs a worker holds (scanning, or dead and not yet past the ack wait).
    pub being_scanned: u64,
    /// Jobs held after a redelivery (a worker died, or handed the job back).
    pub redelivered: u64,
    /// Worker slots asking for a job right now (idle scan slots).
    pub idle_worker_slots: u64,
    /// False when no worker has ever connected to this server's queue.
    pub workers_seen: bool,
    /// The jobs in the queue, oldest first (at most `LISTED_JOBS`).
    pub listed_jobs: Vec<QueuedJob>,
    /// Results stored in `AIRLOCK_RESULTS` (kept 30 days).
    pub results: u64,
    /// Dead letters stored in `AIRLOCK_RESULTS`: jobs no worker could finish.
    pub dead_letters: Vec<DeadLetter>,
    /// Models on their way through the Object Store, if the bucket exists.
    pub objects: Option<ObjectsInTransit>,
}

#[derive(Debug, Serialize)]
pub struct QueuedJob {
    pub id: String,
    pub name: String,
    /// What the job scans: the model, or `part 2 of 3 of <name>`.
    pub what: String,
    /// `shared-path` or `object-store`.
    pub transfer: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ObjectsInTransit {
    pub objects: u64,
    pub bytes: u64,
}

/// Jobs listed one by one; the count covers the rest.
pub(super) const LISTED_JOBS: u64 = 100;

/// Reads the queue's state from the server, with the policy's credentials.
pub fn queue_status(url: &str, policy: &Policy) -> Result<QueueStatus> {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        // Reading the queue changes nothing: an open server is only warned of.
        let client = connect(url, policy.nats.as_ref(), "airlock queue", true).await?;
        let js = jetstream::new(client);
        let missing = |e: &async_nats::jetstream::context::GetStreamError| {
            matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND)
        };
        let jobs_stream = match js.get_stream(JOBS_STREAM).await {
            Ok(s) => s,
            Err(e) if missing(&e) => anyhow::bail!(
                "the NATS server at {url} has no stream {JOBS_STREAM}: no watcher has dispatched to it yet \
                 (`airlock watch --dispatch {url}` creates it)"
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "reading the stream {JOBS_STREAM} on {url} (may this login use the JetStream API? the watcher's may)"
                )));
            }
        };
        let jobs_info = jobs_stream.get_info().await.with_context(|| format!("reading {JOBS_STREAM}'s state"))?;
        let jobs = jobs_info.state.messages;
        let mut status = QueueStatus {
            server: url.to_string(),
            jobs,
            waiting: jobs,
            being_scanned: 0,
            redelivered: 0,
            idle_worker_slots: 0,
            workers_seen: false,
            listed_jobs: Vec::new(),
            results: 0,
            dead_letters: Vec::new(),
            objects: None,
        };
        match jobs_stream.consumer_info(CONSUMER).await {
            Ok(c) => {
                status.workers_seen = true;
                status.waiting = c.num_pending;
                status.being_scanned = c.num_ack_pending as u64;
                status.redelivered = c.num_redelivered as u64;
                status.idle_worker_slots = c.num_waiting as u64;
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading the consumer {CONSUMER}"))),
        }
        // A work queue deletes acked jobs, so the stream holds exactly the
        // open ones. Asking for the next job from a sequence on skips the
        // gaps acked jobs leave (one request per job listed).
        let mut seq = jobs_info.state.first_sequence;
        while jobs > 0 && (status.listed_jobs.len() as u64) < LISTED_JOBS {
            // Every subject: the stream holds only jobs, and one an older airlock sent on
            // `airlock.jobs` is listed too.
            let m = match jobs_stream.get_first_raw_message_by_subject(">", seq).await {
                Ok(m) => m,
                // No job from `seq` on: the rest were acked since the state was read.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "reading job {seq} in {JOBS_STREAM} (may this login read the stream? the watcher's may)"
                    )));
                }
            };
            seq = m.sequence + 1;
            match serde_json::from_slice::<Job>(&m.payload) {
                Ok(j) => status.listed_jobs.push(QueuedJob {
                    what: j.what(),
                    id: j.id,
                    name: j.name,
                    transfer: if j.objects.is_some() { "object-store" } else { "shared-path" },
                }),
                Err(e) => tracing::warn!("job {} in {JOBS_STREAM} cannot be read: {e}", m.sequence),
            }
        }

        let results = js
            .get_stream(RESULTS_STREAM)
            .await
            .with_context(|| format!("reading the stream {RESULTS_STREAM} on {url}"))?;
        let mut subjects = results
            .info_with_subjects("airlock.>")
            .await
            .with_context(|| format!("reading {RESULTS_STREAM}'s subjects"))?;
        let mut dead = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, count) = s.with_context(|| format!("reading {RESULTS_STREAM}'s subjects"))?;
            if subject.starts_with("airlock.results.") {
                status.results += count as u64;
            } else if subject.starts_with("airlock.dead.") && !subject.contains(HANDED_BACK) {
                dead.push(subject);
            }
        }
        dead.sort();
        for subject in dead {
            let m = results
                .get_last_raw_message_by_subject(&subject)
                .await
                .with_context(|| format!("reading the dead letter on {subject}"))?;
            match serde_json::from_slice::<DeadLetter>(&m.payload) {
                Ok(d) => status.dead_letters.push(d),
                Err(e) => anyhow::bail!("the dead letter on {subject} cannot be read: {e}"),
            }
        }

        if let Ok(bucket) = js.get_object_store(MODELS_BUCKET).await {
            let mut list = bucket.list().await.with_context(|| format!("listing the bucket {MODELS_BUCKET}"))?;
            let mut t = ObjectsInTransit { objects: 0, bytes: 0 };
            while let Some(o) = list.next().await {
                let o = o.with_context(|| format!("listing the bucket {MODELS_BUCKET}"))?;
                t.objects += 1;
                t.bytes += o.size as u64;
            }
            status.objects = Some(t);
        }
        Ok(status)
    })
}
