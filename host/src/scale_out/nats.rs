//! The NATS plumbing both ends share: ids, the login (and the refusal of an
//! open server), the streams and the bucket, and publishing with the
//! stream's acknowledgement.

use super::*;

/// A claim id as the watcher makes them (`<nanos>-<pid>-<n>`), or a part's (`<claim id>-part<n>`).
pub(super) fn is_job_id(id: &str) -> bool {
    let claim = id.rsplit_once("-part").filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let claim = claim.map_or(id, |(c, _)| c);
    let parts: Vec<&str> = claim.split('-').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.len() <= 40 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// 16 bytes from the kernel's random source, in hex.
pub(super) fn random_hex() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if let Err(e) = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        // Still unique (time and pid), only no longer secret; said in the log.
        tracing::warn!("reading /dev/urandom: {e}; the result's message id is predictable");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    hex::encode(b)
}

pub(super) fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}/{}", host.trim(), std::process::id())
}

/// Connects with the policy's credentials. A server that also lets a client
/// in without credentials is refused unless `insecure` (`--insecure-nats`):
/// anyone who reaches it could publish a forged result or read every job
/// (red team D8).
pub(super) async fn connect(
    url: &str,
    auth: Option<&NatsAuth>,
    name: &str,
    insecure: bool,
) -> Result<async_nats::Client> {
    let open = match auth {
        // Connected below without credentials: if that works, the server is open.
        None => true,
        Some(_) => async_nats::ConnectOptions::new()
            .name(format!("{name} (checking that the server asks for credentials)"))
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .is_ok(),
    };
    let client = connect_with(url, auth, name).await?;
    if open {
        let why = format!(
            "the NATS server at {url} lets in clients without credentials, so anyone who reaches it can read every              job and publish a forged result"
        );
        if !insecure {
            bail!(
                "{why}. Give the server an authorization block and the policy a `nats:` section                  (docs/scale-out.md, \"Credentials\"), or pass --insecure-nats to accept the risk"
            );
        }
        tracing::warn!("--insecure-nats: {why}");
    }
    Ok(client)
}

pub(super) async fn connect_with(url: &str, auth: Option<&NatsAuth>, name: &str) -> Result<async_nats::Client> {
    let options = match auth {
        None => async_nats::ConnectOptions::new(),
        Some(NatsAuth::UserPassword { user, password_file }) => {
            let pass = std::fs::read_to_string(password_file)
                .with_context(|| format!("reading the NATS password file {}", password_file.display()))?;
            async_nats::ConnectOptions::with_user_and_password(user.clone(), pass.trim_end().to_string())
        }
        Some(NatsAuth::Nkey { seed_file }) => {
            let seed = std::fs::read_to_string(seed_file)
                .with_context(|| format!("reading the NATS nkey seed file {}", seed_file.display()))?;
            async_nats::ConnectOptions::with_nkey(seed.trim().to_string())
        }
    };
    let how = match auth {
        None => "without credentials (the policy has no `nats:` section)",
        Some(NatsAuth::UserPassword { .. }) => "with the policy's user and password",
        Some(NatsAuth::Nkey { .. }) => "with the policy's nkey",
    };
    // The server reports a refused subject (a permissions violation) only
    // as an asynchronous error; the request itself just times out. Logging
    // it names the subject the login may not use.
    let server = url.to_string();
    let options = options.event_callback(move |event| {
        let server = server.clone();
        async move {
            match event {
                async_nats::Event::ServerError(e) => tracing::error!("the NATS server at {server} says: {e}"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to the NATS server at {server}; reconnecting")
                }
                _ => {}
            }
        }
    });
    options
        .name(name)
        .custom_inbox_prefix(INBOX_PREFIX)
        .connect(url)
        .await
        .with_context(|| format!("connecting to the NATS server at {url} {how}"))
}

/// Opens the stream, or creates it if it is missing. A worker and a watcher
/// started together (both units at boot) can both find it missing; the
/// server then refuses the slower create with "subjects overlap with an
/// existing stream", though the configurations are the same. The second try
/// opens the stream the other one made; a real conflict fails again.
pub(super) async fn open_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, jetstream::context::CreateStreamError> {
    match js.get_or_create_stream(config.clone()).await {
        Ok(s) => Ok(s),
        Err(e) => {
            tracing::info!("creating the stream {}: {e}; opening it again", config.name);
            tokio::time::sleep(Duration::from_millis(500)).await;
            js.get_or_create_stream(config).await
        }
    }
}

/// Creates the two streams if they are missing (file storage: they outlive a server restart).
pub(super) async fn ensure_streams(js: &jetstream::Context) -> Result<(stream::Stream, stream::Stream)> {
    let jobs = open_or_create_stream(js, stream::Config {
            name: JOBS_STREAM.into(),
            subjects: vec![JOBS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .with_context(|| {
            format!(
                "creating or opening the JetStream stream {JOBS_STREAM} (is the server run with -js? may this login \
                 use it? a worker's login with the AIRLOCK_WORKER permissions cannot create it: start the watcher first)"
            )
        })?;
    let results = open_or_create_stream(
        js,
        stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec!["airlock.results.*".into(), "airlock.dead.*".into()],
            storage: stream::StorageType::File,
            max_age: RESULTS_MAX_AGE,
            // Bounded (red team D15): a flood of junk ages out the oldest
            // messages instead of filling the disk. A result lost that way is
            // found missing by its waiting watcher, which sends the job again.
            max_bytes: RESULTS_MAX_BYTES,
            max_messages_per_subject: 64,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("creating or opening the JetStream stream {RESULTS_STREAM}"))?;
    Ok((jobs, results))
}

/// A jobs stream made by an earlier airlock took every job on the one
/// subject `airlock.jobs`; jobs now go on `airlock.jobs.<claim id>`. The
/// watcher (whose login may update streams) adds the subject; jobs already in
/// the stream stay there and workers still take them.
pub(super) async fn take_jobs_by_claim(js: &jetstream::Context, jobs: &stream::Stream) -> Result<()> {
    // The configuration as ensure_streams just read or made it.
    let mut config = jobs.cached_info().config.clone();
    if config.subjects.iter().any(|s| s == JOBS_SUBJECTS) {
        return Ok(());
    }
    tracing::warn!("the stream {JOBS_STREAM} takes jobs on {:?}; adding {JOBS_SUBJECTS}", config.subjects);
    config.subjects.push(JOBS_SUBJECTS.into());
    js.update_stream(&config).await.with_context(|| format!("adding the subject {JOBS_SUBJECTS} to {JOBS_STREAM}"))?;
    Ok(())
}

/// Publishes and waits for the stream's acknowledgement, retrying through a
/// lost connection (a server restart) until `deadline`. The message id makes
/// a retry of a publish that did land a no-op. For an id that must be
/// this message's own (`own_id`, a result's), finding it taken on the first
/// try is an error: another client published under it.
pub(super) async fn publish_stored(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    own_id: bool,
    payload: Vec<u8>,
    deadline: Duration,
) -> Result<()> {
    publish_signed(js, subject, msg_id, own_id, payload, None, deadline).await
}

/// [`publish_stored`], with headers (a result's signature).
pub(super) async fn publish_signed(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    own_id: bool,
    payload: Vec<u8>,
    headers: Option<async_nats::HeaderMap>,
    deadline: Duration,
) -> Result<()> {
    let started = Instant::now();
    let payload = bytes::Bytes::from(payload);
    let mut first = true;
    loop {
        let attempt = async {
            let mut publish = jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(msg_id);
            if let Some(h) = &headers {
                for (name, values) in h.iter() {
                    for v in values {
                        publish = publish.header(name.clone(), v.clone());
                    }
                }
            }
            let ack = js.send_publish(subject.clone(), publish).await?.await?;
            Ok::<_, async_nats::Error>(ack.duplicate)
        };
        match attempt.await {
            // The first try found the id taken: another client published under
            // it, and the server dropped this message as its duplicate.
            Ok(true) if first && own_id => {
                return Err(anyhow::anyhow!(
                    "publishing to {subject}: the server already held a message with id {msg_id} and dropped this \
                     one as a duplicate"
                ));
            }
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() < deadline => {
                first = false;
                tracing::warn!("publishing to {subject}: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("publishing to {subject}: {e}")),
        }
    }
}

/// Opens the models bucket, creating it if it is missing (file storage).
pub(super) async fn models_bucket(js: &jetstream::Context) -> Result<object_store::ObjectStore> {
    if let Ok(b) = js.get_object_store(MODELS_BUCKET).await {
        return Ok(b);
    }
    js.create_object_store(object_store::Config {
        bucket: MODELS_BUCKET.into(),
        description: Some("models on their way from the airlock watcher to its workers".into()),
        max_age: MODELS_MAX_AGE,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .with_context(|| format!("creating the JetStream Object Store bucket {MODELS_BUCKET}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_claim_ids_and_their_parts_are_job_ids() {
        assert!(is_job_id("1765130000123456789-4242-0"));
        assert!(is_job_id("1765130000123456789-4242-7-part3"));
        for bad in ["a.b", "", "1-2", "1-2-3-4", "1-2-x", "../1-2-3", "1-2-3-part", "1-2-3-partx", "1-2-3.>"] {
            assert!(!is_job_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn result_message_ids_are_not_guessable() {
        let (a, b) = (random_hex(), random_hex());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
