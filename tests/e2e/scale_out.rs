//! Scale-out on NATS JetStream: `airlock worker`s take the scans, `watch
//! --dispatch` keeps the lifecycle. A real `nats-server -js` on loopback,
//! with user/password auth; workers are killed, the server is restarted.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::lifecycle::Lab;

pub(crate) const PASSWORD: &str = "correct-horse-battery";

fn nats_server_bin() -> PathBuf {
    let p = std::env::var_os("AIRLOCK_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/sbin/nats-server".into());
    assert!(
        p.exists(),
        "{} is missing: the scale-out tests need Debian's nats-server (`cargo xtask test` installs it)",
        p.display()
    );
    p
}

/// A nats-server with JetStream on a loopback port, its store in `dir`.
pub(crate) struct Nats {
    child: Option<Child>,
    conf: PathBuf,
    port: u16,
    /// The seed of a second user, who logs in with an nkey.
    nkey_seed: String,
}

impl Nats {
    pub(crate) fn start(dir: &Path) -> Nats {
        let user = nkeys::KeyPair::new_user();
        let users =
            format!("users: [ {{ user: airlock, password: \"{PASSWORD}\" }}, {{ nkey: {} }} ]", user.public_key());
        Nats::start_with(dir, "", &users, user.seed().unwrap())
    }

    /// A server whose configuration starts with `head` (an `include`) and
    /// whose `authorization` block holds `users`.
    fn start_with(dir: &Path, head: &str, users: &str, nkey_seed: String) -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.join("nats.conf");
        let store = dir.join("jetstream");
        // No users: a server that lets anyone in.
        let auth = if users.is_empty() { String::new() } else { format!("authorization {{ {users} }}\n") };
        std::fs::write(
            &conf,
            format!("{head}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\n{auth}", store.display()),
        )
        .unwrap();
        let mut n = Nats { child: None, conf, port, nkey_seed };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "nats-server did not listen on {} in 30 s", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            c.wait().unwrap();
        }
    }

    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A child process whose stderr is collected line by line.
pub(crate) struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Proc { child, lines }
    }

    pub(crate) fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (at most `limit`, a hang guard) for a line containing `needle`; returns it.
    fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(start.elapsed() < limit, "no line with {needle:?} in {limit:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn terminate(mut self) -> (std::process::ExitStatus, String) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }
}

/// A test that fails mid-way leaves no worker or watcher running behind it.
impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The default policy with the NATS credentials (`password: None` leaves the
/// section out) and the test workers' signing key, trusted.
pub(crate) fn nats_policy(dir: &Path, password: Option<&str>) -> PathBuf {
    let policy = policy_dir(dir, |t| match password {
        Some(_) => format!("{t}\nnats:\n  user: airlock\n  password_file: nats.pass\n"),
        None => t,
    });
    if let Some(p) = password {
        std::fs::write(policy.join("nats.pass"), format!("{p}\n")).unwrap();
    }
    sign_results(&policy);
    policy
}

/// The key the test workers sign results with: one per test process, so a
/// watcher's and a worker's policy folders made apart still agree on it.
pub(crate) fn worker_key() -> &'static nkeys::KeyPair {
    static KEY: std::sync::OnceLock<nkeys::KeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(nkeys::KeyPair::new_user)
}

/// Adds `scale_out:` to the policy folder `policy`: the worker signs with
/// [`worker_key`] (its seed in `worker.nk`, mode 600) and the watcher trusts it.
pub(crate) fn sign_results(policy: &Path) {
    let seed = policy.join("worker.nk");
    std::fs::write(&seed, format!("{}\n", worker_key().seed().unwrap())).unwrap();
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o600)).unwrap();
    let yaml = policy.join("policy.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    let section =
        format!("\nscale_out:\n  signing_key_file: worker.nk\n  trusted_workers: [{}]\n", worker_key().public_key());
    std::fs::write(&yaml, text + &section).unwrap();
}

fn worker(lab: &Lab, nats: &Nats, policy: &Path) -> Proc {
    let mut c = lab.cmd(&["worker", "--nats", &nats.url(), "--policy", policy.to_str().unwrap()]);
    c.env("AIRLOCK_LOG", "warn");
    Proc::spawn(c)
}

/// Waits until worker `w` takes jobs, then stops it with SIGTERM: it must exit 0.
fn stop_when_taking_jobs(w: Proc) {
    w.wait_for("taking jobs from AIRLOCK_JOBS", Duration::from_secs(60));
    let (status, log) = w.terminate();
    assert!(status.success(), "{status:?}\n{log}");
}

/// `airlock queue --format json` under `policy`'s login.
fn queue(lab: &Lab, nats: &Nats, policy: &Path) -> serde_json::Value {
    let (code, out) =
        lab.run(&["queue", "--nats", &nats.url(), "--policy", policy.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in:\n{out}")))
        .unwrap()
}

/// The real gemma in incoming/ as `name`: copied under a hidden name, then
/// renamed, so the watcher never sees half a file.
fn drop_gemma(lab: &Lab, name: &str) {
    let partial = lab.incoming().join(format!(".{name}.partial"));
    std::fs::copy(&models().gemma, &partial).unwrap();
    std::fs::rename(&partial, lab.incoming().join(name)).unwrap();
}

/// Models settled: in the registry with a manifest, or rejected with a report.
fn settled(lab: &Lab, names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| {
            lab.registry().join(n).join("manifest.json").is_file()
                || lab.rejected().join(format!("{n}.report.json")).is_file()
        })
        .count()
}

/// Three workers on twenty models (three real gemma copies among them): the first
/// worker is killed with SIGKILL in the middle of a gemma scan, the server is
/// restarted once, and still every model ends in exactly one place, once.
#[test]
fn workers_killed_and_a_server_restart_lose_nothing_and_scan_to_one_verdict() {
    let lab = Lab::new();
    let d = tmp();
    let mut nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));

    let mut names = Vec::new();
    for i in 0..3 {
        let name = format!("a-gemma-{i}.gguf");
        drop_gemma(&lab, &name);
        names.push(name);
    }
    let evil = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";
    for i in 0..8 {
        let name = format!("bad-{i}.gguf");
        lab.drop_file(&name, evil);
        names.push(name);
    }
    for i in 0..9 {
        let name = format!("clean-{i}.gguf");
        Gguf::default().write(&lab.incoming(), &name);
        names.push(name);
    }

    let first = worker(&lab, &nats, &policy);
    let watcher = {
        let mut c = lab.cmd(&[
            "watch",
            "--settle-ms",
            "0",
            "--jobs",
            "4",
            "--dispatch",
            &nats.url(),
            "--policy",
            policy.to_str().unwrap(),
        ]);
        c.env("AIRLOCK_LOG", "warn");
        Proc::spawn(c)
    };
    // Killed the moment it starts on a real model: the scan of 253 MB is under way.
    let line = first.wait_for("scanning a-gemma-", Duration::from_secs(300));
    let mut first = first;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed = line.split("scanning ").nth(1).unwrap().split(' ').next().unwrap().to_string();

    let second = worker(&lab, &nats, &policy);
    let third = worker(&lab, &nats, &policy);
    // The server goes down once while work is in flight, and comes back with its streams.
    let start = Instant::now();
    while settled(&lab, &names) < 5 {
        assert!(start.elapsed() < Duration::from_secs(300), "5 models did not settle in 300 s:\n{}", watcher.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    nats.restart();
    let start = Instant::now();
    while settled(&lab, &names) < names.len() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "{} of {} models settled in 600 s\nwatcher:\n{}\nworker 2:\n{}\nworker 3:\n{}",
            settled(&lab, &names),
            names.len(),
            watcher.log(),
            second.log(),
            third.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, watch_log) = watcher.terminate();
    assert!(status.success(), "{status:?}\n{watch_log}");
    let (s2, log2) = second.terminate();
    let (s3, log3) = third.terminate();
    assert!(s2.success() && s3.success(), "{s2:?} {s3:?}\n{log2}\n{log3}");

    // The killed worker's job went to another worker, as a second delivery.
    let workers = format!("{log2}\n{log3}");
    assert!(
        workers.lines().any(|l| l.contains(&format!("scanning {killed} (job")) && !l.contains("delivery 1)")),
        "{killed} was not redelivered after the kill:\n{workers}"
    );
    // Every model in exactly one place, with its record; nothing left in scanning/ or incoming/.
    assert_eq!(std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().count(), 0);
    for n in &names {
        let promoted = lab.registry().join(n).join("manifest.json").is_file();
        let rejected = lab.rejected().join(n).exists();
        assert!(!lab.incoming().join(n).exists(), "{n} is still in incoming/");
        assert!(promoted != rejected, "{n}: promoted {promoted}, rejected {rejected}");
        if n.starts_with("bad-") {
            let report = lab.report(n);
            assert!(rejected, "{n} was promoted");
            assert_ne!(report["failed_stage"], "dispatch", "{report}");
        } else {
            assert!(promoted, "{n} was rejected: {}", lab.report(n));
            let manifest = lab.manifest(n);
            // The workers' stage results are the manifest's.
            let stages = manifest["stages"].as_array().unwrap();
            assert!(stages.iter().any(|s| s["stage"] == "static_scan" && s["verdict"] == "pass"), "{manifest}");
        }
    }
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
    // One verdict per model: a redelivered job was scanned again, but decided once.
    let audit = lab.audit();
    for n in &names {
        let verdicts = audit
            .iter()
            .filter(|e| e["model"] == n.as_str() && (e["event"] == "promoted" || e["event"] == "rejected"))
            .count();
        assert_eq!(verdicts, 1, "{n} has {verdicts} verdicts in the audit log");
    }
}

/// The server refuses a worker without the policy's credentials, or with a wrong
/// password, and says so; with the password, or with an nkey, it connects.
#[test]
fn a_worker_without_the_credentials_is_refused_by_the_server() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    for (dir, password) in [("none", None), ("wrong", Some("not-the-password"))] {
        let sub = d.path().join(dir);
        std::fs::create_dir(&sub).unwrap();
        let policy = nats_policy(&sub, password);
        let out = lab.cmd(&["worker", "--nats", &nats.url(), "--policy", policy.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{dir}: {err}");
        assert!(err.contains("authorization violation"), "{dir}: {err}");
        assert!(err.contains(&nats.url()), "{dir}: {err}");
    }
    let policy = nats_policy(d.path(), Some(PASSWORD));
    stop_when_taking_jobs(worker(&lab, &nats, &policy));
    // The nkey user: the seed file named by the policy.
    let nk = d.path().join("nkey");
    let policy = policy_dir(&nk, |t| format!("{t}\nnats:\n  nkey_file: user.nk\n"));
    std::fs::write(policy.join("user.nk"), &nats.nkey_seed).unwrap();
    std::fs::set_permissions(policy.join("user.nk"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // No scale_out.signing_key_file: the worker signs its results with the seed it logs in with.
    let w = worker(&lab, &nats, &policy);
    let public = nkeys::KeyPair::from_seed(&nats.nkey_seed).unwrap().public_key();
    w.wait_for(&format!("signing results as {public}"), Duration::from_secs(60));
    stop_when_taking_jobs(w);
}

/// Red team D8: a server that lets clients in without credentials lets anyone
/// forge a result. The worker and the dispatching watcher refuse it, with or
/// without credentials of their own, unless `--insecure-nats` is given, and
/// then they warn.
#[test]
fn an_open_nats_server_is_refused_without_insecure_nats() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start_with(d.path(), "", "", String::new());
    let open = nats_policy(&d.path().join("open"), None);
    // Credentials the open server ignores do not make it safe.
    let with_creds = nats_policy(&d.path().join("creds"), Some(PASSWORD));
    let url = nats.url();
    for policy in [&open, &with_creds] {
        let p = policy.to_str().unwrap();
        let worker_args = vec!["worker", "--nats", &url, "--policy", p];
        let watch_args = vec!["watch", "--once", "--settle-ms", "0", "--policy", p, "--dispatch", &url];
        for args in [worker_args, watch_args] {
            // Spawned with a limit: a worker that wrongly accepts the server would run on.
            let mut p = Proc::spawn(lab.cmd(&args));
            let status = wait_exit(&mut p, Duration::from_secs(60));
            let line = p.wait_for("lets in clients without credentials", Duration::from_secs(5));
            assert_eq!(status.code(), Some(2), "{args:?}: {}", p.log());
            assert!(line.contains("--insecure-nats"), "{line}");
        }
    }
    let mut c = lab.cmd(&["worker", "--nats", &nats.url(), "--policy", open.to_str().unwrap(), "--insecure-nats"]);
    c.env("AIRLOCK_LOG", "warn");
    let w = Proc::spawn(c);
    w.wait_for("--insecure-nats: the NATS server", Duration::from_secs(60));
    stop_when_taking_jobs(w);
}

/// Red team D13: an intruder deletes both streams. A running worker makes
/// them and its consumer again instead of looping on "consumer deleted", and
/// a watcher whose queued job vanished with the stream sends it again
/// instead of asking after it forever. Both models are judged.
#[test]
fn deleted_streams_are_made_again_and_lost_jobs_sent_again() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let delete_streams = || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let js = test_client(&nats).await;
            for s in ["AIRLOCK_JOBS", "AIRLOCK_RESULTS"] {
                js.delete_stream(s).await.unwrap_or_else(|e| panic!("deleting {s}: {e}"));
            }
        });
    };

    // The worker's side: its consumer is gone under it.
    let w = worker(&lab, &nats, &policy);
    w.wait_for("taking jobs from AIRLOCK_JOBS", Duration::from_secs(60));
    delete_streams();
    Gguf::default().write(&lab.incoming(), "first.gguf");
    let mut watcher = dispatch_once(&lab, &nats, &policy);
    assert!(wait_exit(&mut watcher, Duration::from_secs(120)).success(), "{}\n{}", watcher.log(), w.log());
    assert!(lab.root.join("registry/first.gguf").is_dir(), "{}\n{}", watcher.log(), w.log());
    let (status, log) = w.terminate();
    assert!(status.success(), "{log}");

    // The watcher's side: its job is queued, no worker yet, and the streams go.
    Gguf::default().write(&lab.incoming(), "second.gguf");
    let mut watcher = dispatch_once(&lab, &nats, &policy);
    let start = Instant::now();
    while queue(&lab, &nats, &policy)["jobs"].as_u64().unwrap_or(0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "no job queued:\n{}", watcher.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    delete_streams();
    let w = worker(&lab, &nats, &policy);
    assert!(wait_exit(&mut watcher, Duration::from_secs(120)).success(), "{}\n{}", watcher.log(), w.log());
    assert!(lab.root.join("registry/second.gguf").is_dir(), "{}\n{}", watcher.log(), w.log());
    assert!(watcher.log().contains("sending it again"), "{}", watcher.log());
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// Red team D12: a job on the queue that names a path outside the worker's
/// claim folders (`/etc/passwd`, or a model beside the data root) is
/// dead-lettered at once, naming the path, and never scanned: no result
/// holding its digest is stored.
#[test]
fn a_worker_reads_shared_path_jobs_only_in_claim_folders() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    // A genuine job as the template, sent by a watcher that is stopped before any worker runs.
    Gguf::default().write(&lab.incoming(), "genuine.gguf");
    let mut c = dispatch_once_cmd(&lab, &nats, &policy);
    c.env("AIRLOCK_LOG", "info");
    let first = Proc::spawn(c);
    first.wait_for("sent to the workers", Duration::from_secs(120));
    first.terminate();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    Gguf::default().write(&outside, "genuine.gguf");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let forged: Vec<(String, std::path::PathBuf)> = vec![
        ("90-1-1".into(), "/etc/passwd".into()),
        ("90-1-2".into(), outside.join("genuine.gguf")),
        ("90-1-3".into(), lab.root.join("quarantine/scanning/../../outside-link/genuine.gguf")),
    ];
    std::os::unix::fs::symlink(&outside, lab.root.join("outside-link")).unwrap();
    rt.block_on(async {
        let js = test_client(&nats).await;
        let jobs = js.get_stream("AIRLOCK_JOBS").await.unwrap();
        let m = jobs.get_first_raw_message_by_subject("airlock.jobs.*", 1).await.unwrap();
        let genuine: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        for (id, path) in &forged {
            let mut job = genuine.clone();
            job["id"] = id.as_str().into();
            job["path"] = path.to_str().unwrap().into();
            if path.ends_with("passwd") {
                job["name"] = "passwd".into();
            }
            js.publish(format!("airlock.jobs.{id}"), serde_json::to_vec(&job).unwrap().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let w = worker(&lab, &nats, &policy);
    let start = Instant::now();
    loop {
        let q = queue(&lab, &nats, &policy);
        if q["dead_letters"].as_array().unwrap().len() == forged.len() {
            for (id, path) in &forged {
                let letters = q["dead_letters"].as_array().unwrap();
                let letter = letters.iter().find(|l| l["id"] == id.as_str()).unwrap_or_else(|| panic!("{id}: {q}"));
                let reason = letter["reason"].as_str().unwrap();
                assert!(reason.contains(path.to_str().unwrap()) && reason.contains("claim folders under"), "{q}");
                assert_eq!(letter["deliveries"], 1, "dead-lettered at the first delivery: {q}");
            }
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{q}\n{}", w.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, wlog) = w.terminate();
    for (id, _) in &forged {
        assert!(!wlog.contains(&format!("scanning genuine.gguf (job {id}")), "{wlog}");
        assert!(!wlog.contains(&format!("scanning passwd (job {id}")), "{wlog}");
    }
    let stored = rt.block_on(async {
        let js = test_client(&nats).await;
        let results = js.get_stream("AIRLOCK_RESULTS").await.unwrap();
        let mut any = Vec::new();
        for (id, _) in &forged {
            if results.get_last_raw_message_by_subject(&format!("airlock.results.{id}")).await.is_ok() {
                any.push(id.clone());
            }
        }
        any
    });
    assert!(stored.is_empty(), "results stored for forged jobs: {stored:?}");
}

/// Workers and a watcher started at the same moment on a new server all find
/// or make the streams and the model is scanned. Two creates that reach the
/// server together can have the slower one refused with "subjects overlap"
/// (CI saw it once, failing the watcher); the host then looks again. That
/// window is inside the server and too narrow to hit at will, so this test
/// checks the simultaneous start, not that the race was hit.
#[test]
fn workers_and_a_watcher_started_together_on_a_new_server_all_open_the_streams() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    Gguf::default().write(&lab.incoming(), "m.gguf");
    let workers: Vec<Proc> = (0..4).map(|_| worker(&lab, &nats, &policy)).collect();
    let mut watch = dispatch_once(&lab, &nats, &policy);
    let status = wait_exit(&mut watch, Duration::from_secs(300));
    let logs = || workers.iter().map(|w| w.log()).collect::<Vec<_>>().join("\n");
    assert!(status.success(), "{status:?}\n{}\nworkers:\n{}", watch.log(), logs());
    assert!(lab.registry().join("m.gguf/manifest.json").is_file(), "{}", watch.log());
    workers.into_iter().for_each(stop_when_taking_jobs);
}

/// The jobs consumer of an older airlock capped deliveries at MAX_SCANS + 1, so a
/// lost last delivery stranded its job; a worker started on that server lifts the cap.
#[test]
fn a_worker_lifts_the_delivery_cap_an_older_airlock_left_on_the_consumer() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};

    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    stop_when_taking_jobs(worker(&lab, &nats, &policy));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let max_deliver = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let js = test_client(&nats).await;
            js.get_stream("AIRLOCK_JOBS")
                .await
                .unwrap()
                .consumer_info("airlock-workers")
                .await
                .unwrap()
                .config
                .max_deliver
        })
    };
    assert_eq!(max_deliver(&rt), -1);
    // The consumer as airlock 0.2.0 made it.
    rt.block_on(async {
        let js = test_client(&nats).await;
        let stream = js.get_stream("AIRLOCK_JOBS").await.unwrap();
        let old = pull::Config {
            durable_name: Some("airlock-workers".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(20),
            max_deliver: 4,
            ..Default::default()
        };
        let _: async_nats::jetstream::consumer::Consumer<pull::Config> = stream.create_consumer(old).await.unwrap();
    });
    assert_eq!(max_deliver(&rt), 4);
    let w = worker(&lab, &nats, &policy);
    w.wait_for("taking jobs from AIRLOCK_JOBS", Duration::from_secs(60));
    assert_eq!(max_deliver(&rt), -1, "the worker left the old cap:\n{}", w.log());
    assert!(w.terminate().0.success());
}

/// A worker that runs another policy refuses the job; after the last try the job
/// goes to the dead-letter subject and the watcher rejects the model at
/// `dispatch`, naming both policy digests.
#[test]
fn a_worker_with_another_policy_refuses_the_job_and_the_model_is_rejected_at_dispatch() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let watcher_policy = nats_policy(&d.path().join("w"), Some(PASSWORD));
    let other = other_policy(&d.path().join("o"));
    Gguf::default().write(&lab.incoming(), "m.gguf");
    // Before any watcher or worker, the server holds no queue: `airlock queue` says so.
    let (code, out) = lab.run(&["queue", "--nats", &nats.url(), "--policy", watcher_policy.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no stream AIRLOCK_JOBS") && out.contains("no watcher has dispatched"), "{out}");
    let w = worker(&lab, &nats, &other);
    let (code, out) = lab.run(&[
        "watch",
        "--once",
        "--settle-ms",
        "0",
        "--dispatch",
        &nats.url(),
        "--policy",
        watcher_policy.to_str().unwrap(),
    ]);
    let (_, wlog) = w.terminate();
    assert_eq!(code, 0, "{out}\n{wlog}");
    let report = lab.report("m.gguf");
    assert_eq!(report["failed_stage"], "dispatch", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("no worker finished the scan") && reason.contains("runs policy"), "{reason}");
    // The dead letter stays on the server, and `airlock queue` lists it with its reason.
    let q = queue(&lab, &nats, &watcher_policy);
    assert_eq!((q["jobs"].as_u64(), q["results"].as_u64()), (Some(0), Some(0)), "{q}");
    assert_eq!(q["workers_seen"], true, "{q}");
    let dead = q["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{q}");
    // Delivery 3 files it; a later one when a delivery was lost in transit (a pull request that
    // expired as the job was sent), and then the letter quotes delivery 2's hand-back.
    assert!(dead[0]["deliveries"].as_i64().unwrap() >= 3, "{q}");
    assert_eq!(dead[0]["name"], "m.gguf", "{q}");
    assert!(dead[0]["reason"].as_str().unwrap().contains("runs policy"), "{q}");
    let (code, text) = lab.run(&["queue", "--nats", &nats.url(), "--policy", watcher_policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("dead letters        1") && text.contains("runs policy"), "{text}");
}

/// `watch --once --dispatch` under `policy`.
fn dispatch_once_cmd(lab: &Lab, nats: &Nats, policy: &Path) -> Command {
    let url = nats.url();
    lab.cmd(&["watch", "--once", "--settle-ms", "0", "--dispatch", &url, "--policy", policy.to_str().unwrap()])
}

/// `watch --once --dispatch` under `policy`, in the background.
fn dispatch_once(lab: &Lab, nats: &Nats, policy: &Path) -> Proc {
    Proc::spawn(dispatch_once_cmd(lab, nats, policy))
}

/// Makes the jobs stream before any watcher, on `subjects`, with a one-second
/// message-id window, so a test can step past the window in a second.
fn jobs_stream_with_a_short_window(nats: &Nats, subjects: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use async_nats::jetstream::stream;
        test_client(nats)
            .await
            .create_stream(stream::Config {
                name: "AIRLOCK_JOBS".into(),
                subjects: vec![subjects.into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(1),
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

/// A watcher stopped while its job waits in the queue, and started again after
/// the server's message-id window (two minutes by default) has passed, waits
/// for that job instead of sending it again: one job in the queue, one scan,
/// one verdict and no stray dead letter. The test makes the jobs stream itself,
/// as an older airlock made it (every job on `airlock.jobs`), with a one-second
/// window, so "after the window" takes a second; the watcher adds the
/// per-claim subjects.
#[test]
fn a_restarted_watcher_waits_for_its_queued_job_and_does_not_send_it_again() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    jobs_stream_with_a_short_window(&nats, "airlock.jobs");
    Gguf::default().write(&lab.incoming(), "m.gguf");
    let watch = || {
        let mut c = dispatch_once_cmd(&lab, &nats, &policy);
        // The job's "sent" and "still in the queue" lines are info.
        c.env("AIRLOCK_LOG", "info");
        Proc::spawn(c)
    };

    // No worker yet: the job waits; the watcher is stopped and the claim stays.
    let first = watch();
    first.wait_for("m.gguf: job", Duration::from_secs(120));
    let (_, first_log) = first.terminate();
    assert!(first_log.contains("takes jobs on [\"airlock.jobs\"]; adding airlock.jobs.*"), "{first_log}");
    assert_eq!(std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().count(), 1, "{first_log}");
    assert_eq!(queue(&lab, &nats, &policy)["jobs"], 1, "{first_log}");
    std::thread::sleep(Duration::from_millis(1500));

    let mut second = watch();
    let line = second.wait_for("m.gguf: job", Duration::from_secs(120));
    assert!(line.contains("is still in the queue"), "{}", second.log());
    assert_eq!(queue(&lab, &nats, &policy)["jobs"], 1, "{}", second.log());

    let w = worker(&lab, &nats, &policy);
    let status = wait_exit(&mut second, Duration::from_secs(300));
    assert!(status.success(), "{status:?}\n{}\nworker:\n{}", second.log(), w.log());
    assert!(lab.registry().join("m.gguf/manifest.json").is_file(), "{}", second.log());
    // Past the worker's 2 s pull and 2 s hand-back delay: a second copy would
    // have reached it by now.
    std::thread::sleep(Duration::from_secs(5));
    let (_, wlog) = w.terminate();
    assert_eq!(wlog.matches("scanning m.gguf").count(), 1, "{wlog}");
    let q = queue(&lab, &nats, &policy);
    assert_eq!(q["jobs"], 0, "{q}\n{wlog}");
    assert_eq!(q["dead_letters"], serde_json::json!([]), "{q}\n{wlog}");
    let verdicts = lab.audit().iter().filter(|e| e["model"] == "m.gguf" && e["event"] == "promoted").count();
    assert_eq!(verdicts, 1);
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// A worker stopped with SIGTERM in the middle of a scan finishes it, stores the
/// result and exits 0: the model is promoted from that one scan, and the job is
/// neither handed back nor delivered again.
#[test]
fn a_worker_stopped_with_sigterm_finishes_the_scan_in_hand() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    drop_gemma(&lab, "gemma.gguf");

    let mut w = worker(&lab, &nats, &policy);
    let mut watch = dispatch_once(&lab, &nats, &policy);
    w.wait_for("scanning gemma.gguf", Duration::from_secs(300));
    unsafe { libc::kill(w.child.id() as i32, libc::SIGTERM) };
    // The verdict line follows the scan: not there yet, so the signal came mid-scan.
    let at_signal = w.log();
    assert!(!at_signal.contains("gemma.gguf PASS"), "the scan ended before the signal:\n{at_signal}");
    let status = wait_exit(&mut w, Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(100));
    let wlog = w.log();
    assert!(status.success(), "{status:?}\n{wlog}");
    let verdict = wlog.find("gemma.gguf PASS").unwrap_or_else(|| panic!("no verdict:\n{wlog}"));
    let stopped = wlog.find(": stopped").unwrap_or_else(|| panic!("no stop line:\n{wlog}"));
    assert!(verdict < stopped, "{wlog}");
    assert_eq!(wlog.matches("scanning gemma.gguf").count(), 1, "{wlog}");
    assert!(!wlog.contains("handed back"), "{wlog}");

    let status = wait_exit(&mut watch, Duration::from_secs(300));
    assert!(status.success(), "{status:?}\n{}", watch.log());
    assert!(lab.registry().join("gemma.gguf/manifest.json").is_file(), "{}", watch.log());
    let q = queue(&lab, &nats, &policy);
    assert_eq!(q["jobs"], 0, "{q}");
    assert_eq!(q["dead_letters"], serde_json::json!([]), "{q}");
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// A policy that differs from the default in one verdict-deciding setting, with the NATS login.
fn other_policy(dir: &Path) -> PathBuf {
    let other = policy_dir(dir, |t| {
        let changed = t.replacen("require_source: false", "require_source: true", 1);
        assert_ne!(changed, t, "the default policy's require_source moved");
        format!("{changed}\nnats:\n  user: airlock\n  password_file: nats.pass\n")
    });
    std::fs::write(other.join("nats.pass"), PASSWORD).unwrap();
    sign_results(&other);
    other
}

/// Deliveries lost after a worker handed the job back (a worker killed with its
/// pull request pending, a pull that expires as the job is sent) neither strand
/// the job nor lose the reason: a worker refuses deliveries 1 and 2 and is
/// killed; the test takes the next two deliveries and drops them; a second
/// worker gets the one after, past the scans, and files the dead letter, which
/// quotes the last hand-back. With a consumer capped at MAX_SCANS + 1
/// deliveries the job would sit in the queue forever and the watcher with it.
#[test]
fn lost_deliveries_after_a_hand_back_still_end_in_a_dead_letter_with_its_reason() {
    use async_nats::jetstream::{self, consumer::pull};
    use futures_util::StreamExt;

    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let watcher_policy = nats_policy(&d.path().join("w"), Some(PASSWORD));
    let other = other_policy(&d.path().join("o"));
    Gguf::default().write(&lab.incoming(), "m.gguf");
    let mut first = worker(&lab, &nats, &other);
    let mut watcher = dispatch_once(&lab, &nats, &watcher_policy);
    // Killed right after its second hand-back: the job is back in 2 s, not before.
    let start = Instant::now();
    while first.lines.lock().unwrap().iter().filter(|l| l.contains("handed back")).count() < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "no two hand-backs:\n{}", first.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let first_log = first.log();
    assert!(first_log.contains("runs policy"), "{first_log}");
    // The dead letter must quote the latest hand-back whose note was stored.
    let noted = (1..=2)
        .rev()
        .find(|d| {
            first_log.contains(&format!("delivery {d}: worker"))
                && !first_log.contains(&format!("delivery {d}: the reason for handing it back is not stored"))
        })
        .unwrap_or_else(|| panic!("the first worker stored no hand-back note:\n{first_log}"));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let taken = rt.block_on(async {
        let js = test_client(&nats).await;
        let consumer: jetstream::consumer::Consumer<pull::Config> =
            js.get_stream("AIRLOCK_JOBS").await.unwrap().get_consumer("airlock-workers").await.unwrap();
        let mut taken = Vec::new();
        let start = Instant::now();
        while taken.len() < 2 {
            assert!(start.elapsed() < Duration::from_secs(120), "the job did not come back: {taken:?}");
            let mut batch = consumer.batch().max_messages(1).expires(Duration::from_secs(25)).messages().await.unwrap();
            if let Some(m) = batch.next().await {
                // Not acked, not naked: lost, as far as the server knows, until the ack wait.
                taken.push(m.unwrap().info().unwrap().delivered);
            }
        }
        taken
    });
    assert!(taken[0] >= 3 && taken[1] > taken[0], "{taken:?}");
    let second = worker(&lab, &nats, &other);
    let status = wait_exit(&mut watcher, Duration::from_secs(120));
    let (_, second_log) = second.terminate();
    assert!(status.success(), "{status:?}\n{}\n{second_log}", watcher.log());
    assert!(!lab.registry().join("m.gguf").exists());
    let report = lab.report("m.gguf");
    assert_eq!(report["failed_stage"], "dispatch", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("deliveries of this job ended without a verdict")
            && reason.contains(&format!("the last hand-back, delivery {noted} to worker"))
            && reason.contains("runs policy"),
        "{reason}\nfirst worker:\n{first_log}\nsecond worker:\n{second_log}"
    );
    // One dead letter, filed past the deliveries the test took; the hand-back note is not listed as one.
    let q = queue(&lab, &nats, &watcher_policy);
    let dead = q["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{q}");
    assert!(dead[0]["deliveries"].as_i64().unwrap() > taken[1], "{q}");
    assert_eq!(q["jobs"].as_u64(), Some(0), "{q}");
}

/// A forged reply is refused: one under the watcher's policy digest that
/// reports other bytes' sha256, and one for the right bytes under another
/// digest. A test process plays the worker: it takes the job from the queue,
/// answers it with a real scan's outcome, and acks it. The model is rejected at
/// `dispatch`, naming the forger.
/// Takes the first job the watcher publishes, as a consumer of its own
/// (the test plays a worker), once the watcher has made the stream.
async fn take_a_job_as_forger(js: &async_nats::jetstream::Context) -> async_nats::jetstream::Message {
    use async_nats::jetstream::{self, consumer::pull};
    use futures_util::StreamExt;
    let start = Instant::now();
    let stream = loop {
        match js.get_stream("AIRLOCK_JOBS").await {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(120), "no AIRLOCK_JOBS stream: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            "forger",
            pull::Config {
                durable_name: Some("forger".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    loop {
        assert!(start.elapsed() < Duration::from_secs(120), "no job was published");
        let mut batch = consumer.fetch().max_messages(1).expires(Duration::from_secs(2)).messages().await.unwrap();
        if let Some(m) = batch.next().await {
            break m.unwrap();
        }
    }
}

#[test]
fn results_for_other_bytes_or_under_another_policy_are_refused() {
    // bytes, policy: the watcher's own checks. no-stages: a pass with zero
    // stage results (red team D9). junk: bytes that are no result at all
    // (D11), which once left the model in scanning/ for good. Those are
    // signed with the trusted key (a trusted worker gone wrong). unsigned:
    // the red team's forged pass (D8), a perfect one, without a signature;
    // untrusted: signed by a key the watcher does not list; replayed: a
    // trusted signature made for another job's subject.
    for case in ["bytes", "policy", "no-stages", "junk", "unsigned", "untrusted", "replayed"] {
        let lab = Lab::new();
        let d = tmp();
        let nats = Nats::start(d.path());
        let policy = nats_policy(d.path(), Some(PASSWORD));
        let model = Gguf::default().write(d.path(), "m.gguf");
        // A real outcome, a pass, for the forged reply to carry.
        let scan = scan_json(&model, &[]);
        assert_eq!(scan.code, 0);
        let outcome = scan.one().clone();
        let sha = sha256_file(&model);
        std::fs::copy(&model, lab.incoming().join("m.gguf")).unwrap();
        let mut watcher = dispatch_once(&lab, &nats, &policy);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let js = test_client(&nats).await;
            let msg = take_a_job_as_forger(&js).await;
            let job: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            let (digest, files) = match case {
                "bytes" => (job["policy_digest"].clone(), serde_json::json!({ "m.gguf": "0".repeat(64) })),
                "policy" => (serde_json::json!("f".repeat(64)), serde_json::json!({ "m.gguf": sha })),
                _ => (job["policy_digest"].clone(), serde_json::json!({ "m.gguf": sha })),
            };
            let mut outcome = outcome.clone();
            if case == "no-stages" {
                outcome["stages"] = serde_json::json!([]);
            }
            let id = job["id"].as_str().unwrap().to_string();
            let forged = serde_json::json!({
                "id": id, "worker": "forger", "delivery": 1,
                "policy_digest": digest, "files": files, "sidecars": {}, "outcome": outcome,
            });
            let payload = match case {
                "junk" => b"this is not json {".to_vec(),
                _ => serde_json::to_vec(&forged).unwrap(),
            };
            let subject = format!("airlock.results.{id}");
            let other = nkeys::KeyPair::new_user();
            let headers = match case {
                "unsigned" => async_nats::HeaderMap::new(),
                "untrusted" => signed_result(&other, &subject, &payload),
                "replayed" => signed_result(worker_key(), "airlock.results.1-2-3", &payload),
                _ => signed_result(worker_key(), &subject, &payload),
            };
            js.publish_with_headers(subject, headers, payload.into()).await.unwrap().await.unwrap();
            msg.ack().await.unwrap();
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = watcher.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the watcher did not finish:\n{}", watcher.log());
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status:?}\n{}", watcher.log());
        assert!(!lab.registry().join("m.gguf").exists(), "{case}: the forged result promoted the model");
        let report = lab.report("m.gguf");
        assert_eq!(report["failed_stage"], "dispatch", "{case}: {report}");
        let reason = report["reason"].as_str().unwrap();
        let expected = match case {
            "bytes" => "scanned other bytes (m.gguf: worker forger read",
            "policy" => "forger was refused: it is for job",
            "no-stages" => "the pass from worker forger was refused: it carries no result of source_policy",
            "junk" => "cannot be read",
            "unsigned" => "is unsigned (no Airlock-Signer header)",
            "untrusted" => "which is not in this policy's scale_out.trusted_workers",
            _ => "does not match its signature",
        };
        assert!(reason.contains(expected), "{case}: {reason}");
    }
}

/// The headers a worker holding `key` signs a result stored on `subject` with
/// (docs/scale-out.md, "Signed results", gives the format).
pub(crate) fn signed_result(key: &nkeys::KeyPair, subject: &str, payload: &[u8]) -> async_nats::HeaderMap {
    use base64::Engine;
    let mut signed = b"airlock-result-v1\0".to_vec();
    signed.extend_from_slice(subject.as_bytes());
    signed.push(0);
    signed.extend_from_slice(payload);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Airlock-Signer", key.public_key().as_str());
    h.insert(
        "Airlock-Signature",
        base64::engine::general_purpose::STANDARD.encode(key.sign(&signed).unwrap()).as_str(),
    );
    h
}

/// The watcher's side of `--transfer object-store`, as a command.
fn object_store_watch(lab: &Lab, nats: &Nats, policy: &Path, once: bool) -> Proc {
    let mut args = vec!["watch", "--settle-ms", "0", "--jobs", "2", "--transfer", "object-store"];
    if once {
        args.push("--once");
    }
    let url = nats.url();
    args.extend(["--dispatch", &url, "--policy", policy.to_str().unwrap()]);
    let mut c = lab.cmd(&args);
    c.env("AIRLOCK_LOG", "warn");
    Proc::spawn(c)
}

pub(crate) fn wait_exit(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "did not finish in {limit:?}:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A JetStream client logged in as the test's user.
async fn test_client(nats: &Nats) -> async_nats::jetstream::Context {
    let client = async_nats::ConnectOptions::with_user_and_password("airlock".into(), PASSWORD.into())
        .connect(nats.url())
        .await
        .unwrap();
    async_nats::jetstream::new(client)
}

/// The names of the objects left in the models bucket.
fn objects_left(nats: &Nats) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use futures_util::StreamExt;
        let js = test_client(nats).await;
        let bucket = js.get_object_store("airlock-models").await.unwrap();
        let mut list = bucket.list().await.unwrap();
        let mut names = Vec::new();
        while let Some(o) = list.next().await {
            names.push(o.unwrap().name);
        }
        names
    })
}

/// With `--transfer object-store` the job names no path a worker could read:
/// the watcher puts the files in the bucket and the worker streams them into
/// its scratch folder. A real GGUF, the real MiniLM folder resharded into three
/// shards, and a truncated file each reach their usual verdict; the scratch
/// copies and the objects are gone afterwards.
#[test]
fn models_travel_through_the_object_store_to_a_worker_with_no_shared_storage() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let staged = d.path().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    let folder = crate::hf_folders::minilm(&staged);
    crate::hf_folders::reshard(&folder);
    std::fs::rename(&folder, lab.incoming().join("all-MiniLM-L6-v2")).unwrap();
    std::fs::copy(&models().gemma, staged.join("gemma.gguf")).unwrap();
    std::fs::rename(staged.join("gemma.gguf"), lab.incoming().join("gemma.gguf")).unwrap();
    Gguf { truncate: Some(100), ..Gguf::default() }.write(&lab.incoming(), "short.gguf");

    let scratch = d.path().join("scratch");
    let mut c = lab.cmd(&[
        "worker",
        "--nats",
        &nats.url(),
        "--scratch",
        scratch.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    c.env("AIRLOCK_LOG", "warn");
    let w = Proc::spawn(c);
    let mut watcher = object_store_watch(&lab, &nats, &policy, true);
    let status = wait_exit(&mut watcher, Duration::from_secs(600));
    let (_, wlog) = w.terminate();
    assert!(status.success(), "{status:?}\n{}\nworker:\n{wlog}", watcher.log());

    for (name, files) in [("gemma.gguf", 1), ("all-MiniLM-L6-v2", 0)] {
        let manifest = lab.manifest(name);
        let stages = manifest["stages"].as_array().unwrap();
        assert!(stages.iter().any(|s| s["stage"] == "static_scan" && s["verdict"] == "pass"), "{manifest}");
        let line = wlog
            .lines()
            .find(|l| l.contains(&format!("fetched {name} ")))
            .unwrap_or_else(|| panic!("the worker did not fetch {name} from the bucket:\n{wlog}"));
        if files == 1 {
            assert!(line.contains("(1 file, 253113024 bytes)"), "{line}");
        } else {
            // The three shards, their index and the tokenizer and config files.
            let n: usize = line.split('(').nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
            assert!(n >= 5, "{line}");
        }
    }
    // The folder went as one part job per shard, each fetching only its shard, then the join.
    for part in 1..=3 {
        let fetched = format!("fetched part {part} of 3 of all-MiniLM-L6-v2 (1 file, ");
        assert!(wlog.contains(&fetched), "{fetched:?}:\n{wlog}");
    }
    let (code, out) = lab.run(&["verify", "all-MiniLM-L6-v2"]);
    assert_eq!(code, 0, "{out}");
    let report = lab.report("short.gguf");
    assert_eq!(report["failed_stage"], "format_gate", "{report}");
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "scratch copies were left behind");
    assert_eq!(objects_left(&nats), Vec::<String>::new(), "objects were left in the bucket");
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// Bytes in the bucket that are not the ones the watcher claimed (another
/// client overwrote the object) are refused by every worker that fetches
/// them; the job is dead-lettered and the model rejected at `dispatch`,
/// naming the file and both sha256s.
#[test]
fn an_object_that_is_not_the_claimed_bytes_is_refused_by_the_worker() {
    use async_nats::jetstream;

    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let model = Gguf::default().write(&lab.incoming(), "m.gguf");
    let sha = sha256_file(&model);
    // No worker yet: the job waits in the queue while the test swaps the object.
    let mut watcher = object_store_watch(&lab, &nats, &policy, true);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let js = test_client(&nats).await;
        let start = Instant::now();
        let job: serde_json::Value = loop {
            assert!(start.elapsed() < Duration::from_secs(120), "no job was published:\n{}", watcher.log());
            if let Ok(s) = js.get_stream("AIRLOCK_JOBS").await
                && let Ok(m) = s.get_raw_message(1).await
            {
                break serde_json::from_slice(&m.payload).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(job["path"], "m.gguf", "an object-store job names no path on the watcher's disk: {job}");
        let object = job["objects"]["files"][0]["object"].as_str().unwrap().to_string();
        assert_eq!(job["objects"]["files"][0]["sha256"], sha.as_str(), "{job}");
        let bucket = js.get_object_store("airlock-models").await.unwrap();
        let mut other = Gguf::default().bytes();
        let last = other.len() - 1;
        other[last] ^= 1;
        bucket.put(object.as_str(), &mut other.as_slice()).await.unwrap();
        let _: jetstream::object_store::ObjectInfo = bucket.info(object.as_str()).await.unwrap();
    });
    // The job waits with its object in the bucket; `airlock queue` shows both.
    let q = queue(&lab, &nats, &policy);
    assert_eq!(
        (q["jobs"].as_u64(), q["waiting"].as_u64(), q["being_scanned"].as_u64()),
        (Some(1), Some(1), Some(0)),
        "{q}"
    );
    assert_eq!(q["workers_seen"], false, "{q}");
    assert_eq!(q["listed_jobs"][0]["name"], "m.gguf", "{q}");
    assert_eq!(q["listed_jobs"][0]["transfer"], "object-store", "{q}");
    assert_eq!(q["objects"]["objects"].as_u64(), Some(1), "{q}");
    assert_eq!(q["objects"]["bytes"].as_u64(), Some(Gguf::default().bytes().len() as u64), "{q}");
    // A watcher with no workers says so after 30 s rather than waiting in silence.
    let notice = watcher.wait_for("no reply to job", Duration::from_secs(120));
    assert!(
        notice.contains("m.gguf")
            && notice.contains("no worker has connected to this server's queue yet")
            && notice.contains("airlock queue --nats"),
        "{notice}"
    );
    let w = worker(&lab, &nats, &policy);
    let status = wait_exit(&mut watcher, Duration::from_secs(300));
    let (_, wlog) = w.terminate();
    assert!(status.success(), "{status:?}\n{}\nworker:\n{wlog}", watcher.log());
    assert!(!lab.registry().join("m.gguf").exists(), "the swapped bytes were promoted");
    let report = lab.report("m.gguf");
    assert_eq!(report["failed_stage"], "dispatch", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("no worker finished the scan") && reason.contains("m.gguf"), "{reason}");
    assert!(reason.contains("are not the job's") && reason.contains(&sha), "{reason}");
    assert_eq!(objects_left(&nats), Vec::<String>::new(), "objects were left in the bucket");
}

/// A policy folder whose `nats:` section logs in as `user`.
fn nats_policy_as(dir: &Path, user: &str, password: &str) -> PathBuf {
    let policy = policy_dir(dir, |t| format!("{t}\nnats:\n  user: {user}\n  password_file: nats.pass\n"));
    std::fs::write(policy.join("nats.pass"), password).unwrap();
    sign_results(&policy);
    policy
}

/// Whether a JetStream publish as `user` was stored (a denied subject gets no ack).
async fn stored_as(nats: &Nats, user: &str, password: &str, subject: String, payload: Vec<u8>) -> bool {
    let client = airlock_login(user, password).connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    match js.publish(subject, payload.into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

/// A login's options as airlock's own clients use them: the airlock logins
/// (`watch`, `worker`) take replies on airlock's inbox prefix, any other on `_INBOX`.
fn airlock_login(user: &str, password: &str) -> async_nats::ConnectOptions {
    let o = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into());
    if matches!(user, "watch" | "worker") { o.custom_inbox_prefix("_AIRLOCK_INBOX") } else { o }
}

/// The permission sets in dist/nats/airlock-permissions.conf are enough for a
/// watcher and a worker to run the lifecycle through the Object Store, and no
/// more: a worker cannot send a job or swap a model's object, and a login
/// without the sets (another application on the same server) cannot answer a
/// job with a forged pass. A worker started first is told to start the watcher.
#[test]
fn the_documented_nats_permissions_run_the_lifecycle_and_keep_others_from_answering() {
    let lab = Lab::new();
    let d = tmp();
    std::fs::copy(repo().join("dist/nats/airlock-permissions.conf"), d.path().join("airlock-permissions.conf"))
        .unwrap();
    let users = "users: [
        { user: watch, password: \"watch-password-1\", permissions: $AIRLOCK_WATCHER }
        { user: worker, password: \"worker-password-1\", permissions: $AIRLOCK_WORKER }
        { user: other, password: \"other-password-1\", permissions: { publish: { allow: [\"app.>\"] }, subscribe: { allow: [\"_INBOX.>\", \"app.>\"] } } }
    ]";
    let nats = Nats::start_with(d.path(), "include \"airlock-permissions.conf\"", users, String::new());
    // Red team D14: another application with the usual `_INBOX.>` permission
    // listens for the whole run; it must hear nothing of airlock's traffic.
    let overheard = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let (url, overheard) = (nats.url(), overheard.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use futures_util::StreamExt;
                let client = airlock_login("other", "other-password-1").connect(url).await.unwrap();
                let mut sub = client.subscribe("_INBOX.>").await.unwrap();
                client.flush().await.unwrap();
                ready_tx.send(()).unwrap();
                while let Some(m) = sub.next().await {
                    overheard.lock().unwrap().push(String::from_utf8_lossy(&m.payload).into_owned());
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    }

    let watch_policy = nats_policy_as(&d.path().join("w"), "watch", "watch-password-1");
    let worker_policy = nats_policy_as(&d.path().join("k"), "worker", "worker-password-1");
    // A worker started before the watcher cannot create the streams: it
    // exits naming the refused subject and what to do.
    let out =
        lab.cmd(&["worker", "--nats", &nats.url(), "--policy", worker_policy.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Permissions Violation") && err.contains("$JS.API.STREAM.CREATE.AIRLOCK_JOBS"), "{err}");
    assert!(err.contains("start the watcher first"), "{err}");
    let evil = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";
    lab.drop_file("bad.gguf", evil);
    Gguf::default().write(&lab.incoming(), "clean.gguf");
    let mut watcher = object_store_watch(&lab, &nats, &watch_policy, true);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = airlock_login("watch", "watch-password-1").connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let start = Instant::now();
        let (bad, clean): (serde_json::Value, serde_json::Value) = loop {
            assert!(start.elapsed() < Duration::from_secs(120), "no jobs were published:\n{}", watcher.log());
            if let Ok(s) = js.get_stream("AIRLOCK_JOBS").await
                && let (Ok(a), Ok(b)) = (s.get_raw_message(1).await, s.get_raw_message(2).await)
            {
                let a: serde_json::Value = serde_json::from_slice(&a.payload).unwrap();
                let b: serde_json::Value = serde_json::from_slice(&b.payload).unwrap();
                break if a["name"] == "bad.gguf" { (a, b) } else { (b, a) };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Another application forges a pass for the bad model: the server drops it.
        let id = bad["id"].as_str().unwrap();
        let outcome = scan_json(&Gguf::default().write(d.path(), "forge.gguf"), &[]).one().clone();
        assert_eq!(outcome["verdict"], "pass");
        let forged = serde_json::json!({
            "id": id, "worker": "other", "delivery": 1, "policy_digest": bad["policy_digest"],
            "files": { "bad.gguf": bad["objects"]["files"][0]["sha256"] }, "sidecars": {}, "outcome": outcome,
        });
        let payload = serde_json::to_vec(&forged).unwrap();
        assert!(
            !stored_as(&nats, "other", "other-password-1", format!("airlock.results.{id}"), payload).await,
            "a login without the airlock sets stored a result"
        );
        // A worker's login can neither send a job nor replace a model's bytes.
        assert!(
            !stored_as(
                &nats,
                "worker",
                "worker-password-1",
                format!("airlock.jobs.{}", clean["id"].as_str().unwrap()),
                clean.to_string().into_bytes()
            )
            .await,
            "a worker's login sent a job"
        );
        let client = airlock_login("worker", "worker-password-1").connect(nats.url()).await.unwrap();
        let wjs = async_nats::jetstream::new(client);
        let bucket = wjs.get_object_store("airlock-models").await.unwrap();
        let object = clean["objects"]["files"][0]["object"].as_str().unwrap();
        let swapped = tokio::time::timeout(Duration::from_secs(30), bucket.put(object, &mut &b"other bytes"[..])).await;
        assert!(!matches!(swapped, Ok(Ok(_))), "a worker's login replaced {object}");
    });
    // `airlock queue` lists the waiting jobs under the watcher's login; a
    // worker's login may not read them and is told so.
    let q = queue(&lab, &nats, &watch_policy);
    let mut names: Vec<_> = q["listed_jobs"].as_array().unwrap().iter().map(|j| j["name"].to_string()).collect();
    names.sort();
    assert_eq!(names, ["\"bad.gguf\"", "\"clean.gguf\""], "{q}");
    let (code, out) = lab.run(&["queue", "--nats", &nats.url(), "--policy", worker_policy.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("$JS.API.STREAM.MSG.GET.AIRLOCK_JOBS") && out.contains("the watcher's may"), "{out}");
    let scratch = d.path().join("scratch");
    let mut c = lab.cmd(&[
        "worker",
        "--nats",
        &nats.url(),
        "--scratch",
        scratch.to_str().unwrap(),
        "--policy",
        worker_policy.to_str().unwrap(),
    ]);
    c.env("AIRLOCK_LOG", "warn");
    let w = Proc::spawn(c);
    let status = wait_exit(&mut watcher, Duration::from_secs(300));
    let (_, wlog) = w.terminate();
    assert!(status.success(), "{status:?}\n{}\nworker:\n{wlog}", watcher.log());
    assert!(lab.manifest("clean.gguf")["stages"].is_array(), "clean.gguf was not promoted:\n{wlog}");
    assert!(!lab.registry().join("bad.gguf").exists(), "the forged pass promoted bad.gguf");
    let report = lab.report("bad.gguf");
    assert_eq!(report["failed_stage"], "format_gate", "{report}");
    let heard = overheard.lock().unwrap();
    assert!(
        !heard.iter().any(|m| m.contains("clean.gguf") || m.contains("bad.gguf")),
        "another login read airlock's traffic on _INBOX.>: {heard:?}"
    );
}

/// The `builtin:weights` result among a manifest's or report's stages.
fn weights_stage(stages: &serde_json::Value) -> &serde_json::Value {
    stages.as_array().unwrap().iter().find(|s| s["plugin"] == "builtin:weights").unwrap_or_else(|| panic!("{stages}"))
}

/// A sharded folder goes to the workers as one part job per weight shard and
/// a join: the real MiniLM in three shards is promoted, and the same folder
/// with its top layer planted in the last shard (which scanned alone passes)
/// is rejected at the static scan with every planted matrix named, the
/// verdict a whole scan on one machine gives. Each part is scanned once. The
/// bytes go through the Object Store, and watcher and workers log in with the
/// documented permission sets.
#[test]
fn a_sharded_folder_is_scanned_in_parts_by_the_workers_and_joined() {
    let lab = Lab::new();
    let d = tmp();
    std::fs::copy(repo().join("dist/nats/airlock-permissions.conf"), d.path().join("airlock-permissions.conf"))
        .unwrap();
    let users = "users: [
        { user: watch, password: \"watch-password-2\", permissions: $AIRLOCK_WATCHER }
        { user: worker, password: \"worker-password-2\", permissions: $AIRLOCK_WORKER }
    ]";
    let nats = Nats::start_with(d.path(), "include \"airlock-permissions.conf\"", users, String::new());
    let watch_policy = nats_policy_as(&d.path().join("w"), "watch", "watch-password-2");
    let worker_policy = nats_policy_as(&d.path().join("k"), "worker", "worker-password-2");
    let staged = d.path().join("staged");
    std::fs::create_dir_all(staged.join("planted")).unwrap();
    let clean = crate::hf_folders::minilm(&staged);
    crate::hf_folders::reshard(&clean);
    let planted = crate::hf_folders::minilm(&staged.join("planted"));
    let index = crate::hf_folders::reshard(&planted);
    let (last, matrices) = crate::split::plant_top_layer(&planted, &index);
    // The verdict one machine gives, scanning the planted folder whole.
    let local = scan_json(&planted, &[]);
    let local_weights = weights_stage(&local.one()["stages"]).clone();
    assert_eq!(local_weights["verdict"], "fail", "{local_weights}");
    std::fs::rename(&clean, lab.incoming().join("clean-minilm")).unwrap();
    std::fs::rename(&planted, lab.incoming().join("planted-minilm")).unwrap();

    // The watcher first: a worker's login may not create the streams.
    let mut watcher = object_store_watch(&lab, &nats, &watch_policy, true);
    watcher.wait_for("scans go to the workers", Duration::from_secs(120));
    let workers: Vec<Proc> = ["s1", "s2"]
        .iter()
        .map(|s| {
            let scratch = d.path().join(s);
            let mut c = lab.cmd(&["worker", "--nats", &nats.url(), "--scratch", scratch.to_str().unwrap()]);
            c.args(["--policy", worker_policy.to_str().unwrap()]).env("AIRLOCK_LOG", "warn");
            Proc::spawn(c)
        })
        .collect();
    let status = wait_exit(&mut watcher, Duration::from_secs(900));
    let wlog: String = workers.into_iter().map(|w| w.terminate().1).collect();
    assert!(status.success(), "{status:?}\n{}\nworkers:\n{wlog}", watcher.log());
    // Each part job fetched its own shard only.
    for name in ["clean-minilm", "planted-minilm"] {
        for part in 1..=3 {
            let fetched = format!("fetched part {part} of 3 of {name} (1 file, ");
            assert_eq!(wlog.matches(&fetched).count(), 1, "{fetched:?} once:\n{wlog}");
        }
    }
    // A part result travels as one NATS message (at most 1 MiB by default).
    let sizes: Vec<u64> = wlog
        .lines()
        .filter(|l| l.contains(" of 3 of ") && l.contains(" done ("))
        .filter_map(|l| l.split("result ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    eprintln!("part results (weights and entropy, one MiniLM shard each): {sizes:?} bytes");
    assert_eq!(sizes.len(), 6, "{wlog}");

    for name in ["clean-minilm", "planted-minilm"] {
        for part in 1..=3 {
            let done = format!("part {part} of 3 of {name} done");
            assert_eq!(wlog.matches(&done).count(), 1, "{done:?} once:\n{wlog}");
        }
    }
    assert_eq!(wlog.matches("clean-minilm PASS").count(), 1, "{wlog}");
    assert_eq!(wlog.matches("planted-minilm FAIL").count(), 1, "{wlog}");

    let manifest = lab.manifest("clean-minilm");
    let w = weights_stage(&manifest["stages"]);
    assert_eq!(w["verdict"], "pass", "{w}");
    let log = w["log"].to_string();
    assert!(log.contains("joined from 3 parts") && log.contains("parts by "), "{log}");

    let report = lab.report("planted-minilm");
    assert_eq!(report["failed_stage"], "static_scan", "{report}");
    let w = weights_stage(&report["scan_details"]["stages"]);
    assert!(w["log"].to_string().contains("joined from 3 parts"), "{w}");
    let outliers: Vec<&str> = w["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule"] == "weights.role-outlier")
        .filter_map(|f| f["location"].as_str())
        .collect();
    assert!(
        matrices.iter().all(|m| outliers.iter().any(|o| o.ends_with(&format!("{last}: {m}")))),
        "every planted matrix is named: {outliers:?}"
    );
    assert_eq!(w["summary"], local_weights["summary"], "joined by the workers, or whole on one machine");
    assert_eq!(w["findings"], local_weights["findings"]);
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// A part result for other bytes than the shard the watcher claimed is
/// refused, and the folder is rejected at `dispatch`, naming the part and the
/// worker, with no join sent.
#[test]
fn a_part_result_for_other_bytes_is_refused() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let folder = crate::hf_folders::minilm(d.path());
    crate::hf_folders::reshard(&folder);
    std::fs::rename(&folder, lab.incoming().join("minilm")).unwrap();
    let mut watcher = dispatch_once(&lab, &nats, &policy);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let claim = rt.block_on(async {
        let js = test_client(&nats).await;
        let msg = take_a_job_as_forger(&js).await;
        let job: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        assert!(id.ends_with("-part1"), "the first job is part 1: {job}");
        assert_eq!(job["split"]["part"]["files"], serde_json::json!(["model-00001-of-00003.safetensors"]), "{job}");
        let forged = serde_json::json!({
            "id": id, "worker": "forger", "delivery": 1, "policy_digest": job["policy_digest"],
            "files": { "model-00001-of-00003.safetensors": "0".repeat(64) },
            "parts": [ { "Ok": "{}" } ],
        });
        // Signed with the trusted key: a trusted worker gone wrong, so the bytes check is what refuses it.
        let subject = format!("airlock.results.{id}");
        let payload = serde_json::to_vec(&forged).unwrap();
        let headers = signed_result(worker_key(), &subject, &payload);
        js.publish_with_headers(subject, headers, payload.into()).await.unwrap().await.unwrap();
        msg.ack().await.unwrap();
        id.trim_end_matches("-part1").to_string()
    });
    let status = wait_exit(&mut watcher, Duration::from_secs(120));
    assert!(status.success(), "{status:?}\n{}", watcher.log());
    assert!(!lab.registry().join("minilm").exists(), "the forged part promoted the model");
    let report = lab.report("minilm");
    assert_eq!(report["failed_stage"], "dispatch", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("part 1 of 3 of minilm (model-00001-of-00003.safetensors)")
            && reason.contains("forger")
            && reason.contains("scanned other bytes"),
        "{reason}"
    );
    // Parts 2 and 3, still waiting when part 1 was refused, were taken back.
    assert_eq!(queue(&lab, &nats, &policy)["jobs"], 0, "{}", watcher.log());
    // The claim's own job (the join) was never sent.
    let js_has_join = rt.block_on(async {
        let js = test_client(&nats).await;
        let jobs = js.get_stream("AIRLOCK_JOBS").await.unwrap();
        jobs.get_last_raw_message_by_subject(&format!("airlock.jobs.{claim}")).await.is_ok()
    });
    assert!(!js_has_join, "a join was sent for a refused part");
}

/// A join job that names fewer parts than the model has weight shards (sent
/// by a login that may send jobs, or by a watcher bug) would judge the missing
/// shard unseen: here the planted layer is in shard 3, and a join over parts 1
/// and 2 alone passes it. The worker refuses such a join before any plugin
/// runs, hands it back each time, and files a dead letter naming the shard;
/// no result is stored for the claim.
#[test]
fn a_join_over_fewer_parts_than_weight_shards_is_refused_by_the_worker() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let folder = crate::hf_folders::minilm(d.path());
    let index = crate::hf_folders::reshard(&folder);
    let (last, _) = crate::split::plant_top_layer(&folder, &index);
    std::fs::rename(&folder, lab.incoming().join("minilm")).unwrap();

    // The watcher sends the three part jobs and is stopped before any is
    // answered, so it never sends its own join.
    let mut c = dispatch_once_cmd(&lab, &nats, &policy);
    c.env("AIRLOCK_LOG", "info");
    let first = Proc::spawn(c);
    first.wait_for("part 3 of 3 of minilm: job", Duration::from_secs(120));
    let (_, watcher_log) = first.terminate();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let part1: serde_json::Value = rt.block_on(async {
        let js = test_client(&nats).await;
        let jobs = js.get_stream("AIRLOCK_JOBS").await.unwrap();
        let m = jobs.get_first_raw_message_by_subject("airlock.jobs.*", 1).await.unwrap();
        serde_json::from_slice(&m.payload).unwrap()
    });
    let claim = part1["id"].as_str().unwrap().strip_suffix("-part1").unwrap_or_else(|| panic!("{part1}")).to_string();

    let w = worker(&lab, &nats, &policy);
    for part in 1..=3 {
        w.wait_for(&format!("part {part} of 3 of minilm done"), Duration::from_secs(300));
    }

    // The forged join: parts 1 and 2, exactly as stored, and not part 3.
    let no_result = rt.block_on(async {
        let js = test_client(&nats).await;
        let results = js.get_stream("AIRLOCK_RESULTS").await.unwrap();
        let mut refs = Vec::new();
        for part in 1..=2 {
            let id = format!("{claim}-part{part}");
            let m = results.get_last_raw_message_by_subject(&format!("airlock.results.{id}")).await.unwrap();
            refs.push(serde_json::json!({ "id": id, "sequence": m.sequence, "sha256": sha256_bytes(&m.payload) }));
        }
        let mut join = part1.clone();
        join["id"] = claim.clone().into();
        join["split"] = serde_json::json!({ "join": { "plugins": part1["split"]["part"]["plugins"], "parts": refs } });
        js.publish(format!("airlock.jobs.{claim}"), serde_json::to_vec(&join).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
        // Three deliveries, each handed back, then the dead letter; or a
        // stored result, which fails the test below.
        let start = Instant::now();
        loop {
            let stored = |subject: String| {
                let results = &results;
                async move { results.get_last_raw_message_by_subject(&subject).await.is_ok() }
            };
            if stored(format!("airlock.results.{claim}")).await {
                break false;
            }
            if stored(format!("airlock.dead.{claim}")).await {
                break true;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "neither a dead letter nor a result for the forged join"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (_, wlog) = w.terminate();
    assert!(no_result, "the worker stored a result for a join that never saw {last}\nworker:\n{wlog}");
    let q = queue(&lab, &nats, &policy);
    let dead = q["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{q}");
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("no part for [\"{last}\"]")) && reason.contains("exactly one part per shard"),
        "{reason}\nwatcher:\n{watcher_log}\nworker:\n{wlog}"
    );
    assert_eq!(wlog.matches("scanning minilm ").count(), 3, "three deliveries, each refused:\n{wlog}");
    assert!(!wlog.contains("minilm PASS") && !wlog.contains("minilm FAIL"), "{wlog}");
}

/// A split scan survives its watcher: stopped while the part jobs wait, the
/// parts scanned while no watcher runs, a second watcher sends none of them
/// again (past the server's duplicate window, which the test makes one
/// second) and sends only the join. Each part and the join are scanned once.
#[test]
fn a_restarted_watcher_keeps_the_parts_of_a_split_scan_and_sends_only_the_join() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    jobs_stream_with_a_short_window(&nats, "airlock.jobs.*");
    let folder = crate::hf_folders::minilm(d.path());
    crate::hf_folders::reshard(&folder);
    std::fs::rename(&folder, lab.incoming().join("minilm")).unwrap();
    let watch = || {
        let mut c = dispatch_once_cmd(&lab, &nats, &policy);
        c.env("AIRLOCK_LOG", "info");
        Proc::spawn(c)
    };

    let first = watch();
    first.wait_for("part 3 of 3 of minilm: job", Duration::from_secs(120));
    let (_, first_log) = first.terminate();
    let q = queue(&lab, &nats, &policy);
    assert_eq!(q["jobs"], 3, "{first_log}");
    // `airlock queue` says which part each job is.
    let listed: Vec<_> = q["listed_jobs"].as_array().unwrap().iter().map(|j| j["what"].clone()).collect();
    assert_eq!(listed, ["part 1 of 3 of minilm", "part 2 of 3 of minilm", "part 3 of 3 of minilm"], "{q}");

    // The parts are scanned with no watcher running.
    std::thread::sleep(Duration::from_millis(1500));
    let w = worker(&lab, &nats, &policy);
    for part in 1..=3 {
        w.wait_for(&format!("part {part} of 3 of minilm done"), Duration::from_secs(300));
    }
    let (_, parts_log) = w.terminate();
    assert_eq!(queue(&lab, &nats, &policy)["jobs"], 0, "{parts_log}");
    std::thread::sleep(Duration::from_millis(1500));

    let mut second = watch();
    second.wait_for("minilm: job", Duration::from_secs(120));
    let w = worker(&lab, &nats, &policy);
    let status = wait_exit(&mut second, Duration::from_secs(300));
    let (_, join_log) = w.terminate();
    let second_log = second.log();
    assert!(status.success(), "{status:?}\n{second_log}\nworker:\n{join_log}");
    assert!(lab.registry().join("minilm/manifest.json").is_file(), "{second_log}");
    assert!(!second_log.contains("of 3 of minilm: job"), "a part was sent again:\n{second_log}");
    assert!(second_log.contains("minilm: job") && second_log.contains("sent to the workers"), "{second_log}");
    for part in 1..=3 {
        assert_eq!(parts_log.matches(&format!("scanning part {part} of 3 of minilm ")).count(), 1, "{parts_log}");
    }
    assert!(!join_log.contains("scanning part"), "{join_log}");
    assert_eq!(join_log.matches("scanning minilm ").count(), 1, "{join_log}");
    let w = weights_stage(&lab.manifest("minilm")["stages"]).clone();
    assert!(w["log"].to_string().contains("joined from 3 parts"), "{w}");
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// A part result larger than the server takes in one message is not a silent
/// loss or an endless retry: each worker hands the part back saying how big
/// it is and what the server allows, and after three scans the folder is
/// rejected at `dispatch` with that reason. (The test's server takes 8 KiB;
/// a MiniLM shard's parts are about 19 KB.)
#[test]
fn a_part_result_the_server_cannot_take_rejects_the_folder_naming_max_payload() {
    let lab = Lab::new();
    let d = tmp();
    let users = format!("users: [ {{ user: airlock, password: \"{PASSWORD}\" }} ]");
    let nats = Nats::start_with(d.path(), "max_payload: 8192", &users, String::new());
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let folder = crate::hf_folders::minilm(d.path());
    crate::hf_folders::reshard(&folder);
    std::fs::rename(&folder, lab.incoming().join("minilm")).unwrap();
    let mut watcher = dispatch_once(&lab, &nats, &policy);
    watcher.wait_for("scans go to the workers", Duration::from_secs(120));
    let w = worker(&lab, &nats, &policy);
    let status = wait_exit(&mut watcher, Duration::from_secs(300));
    let (_, wlog) = w.terminate();
    assert!(status.success(), "{status:?}\n{}\nworker:\n{wlog}", watcher.log());
    assert!(!lab.registry().join("minilm").exists());
    let report = lab.report("minilm");
    assert_eq!(report["failed_stage"], "dispatch", "{report}");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("part 1 of 3 of minilm")
            && reason.contains("the NATS server takes at most 8192 per message (max_payload"),
        "{reason}"
    );
    let q = queue(&lab, &nats, &policy);
    assert_eq!(q["jobs"], 0, "the other parts were taken back: {q}");
}

/// A plugin that cannot make its part (here `weights`, given a 1 MiB read
/// budget) fails its static-scan entry in the join, as it fails a whole scan
/// on one machine, with the same cause; the other stages still report, and
/// the model is rejected at `static_scan`, not at `dispatch`.
#[test]
fn a_part_a_plugin_cannot_make_fails_the_plugin_as_a_whole_scan_would() {
    let lab = Lab::new();
    let d = tmp();
    let nats = Nats::start(d.path());
    let policy = policy_dir(d.path(), |t| {
        let t = t.replace(
            "    - plugin: builtin:weights\n",
            "    - plugin: builtin:weights\n      limits: { max_total_read_mib: 1 }\n",
        );
        format!("{t}\nnats:\n  user: airlock\n  password_file: nats.pass\n")
    });
    std::fs::write(policy.join("nats.pass"), format!("{PASSWORD}\n")).unwrap();
    sign_results(&policy);
    let staged = d.path().join("staged");
    std::fs::create_dir_all(&staged).unwrap();
    let folder = crate::hf_folders::minilm(&staged);
    crate::hf_folders::reshard(&folder);
    let local = scan_json(&folder, &["--policy", policy.to_str().unwrap()]);
    let local_weights = weights_stage(&local.one()["stages"]).clone();
    assert_eq!(local_weights["verdict"], "fail", "{local_weights}");
    let local_summary = local_weights["summary"].as_str().unwrap();
    let cause = local_summary.strip_prefix("plugin builtin:weights ").unwrap_or_else(|| panic!("{local_summary}"));
    assert!(cause.contains("read limit of 1048576 bytes exceeded"), "{local_summary}");
    std::fs::rename(&folder, lab.incoming().join("minilm")).unwrap();

    let w = worker(&lab, &nats, &policy);
    let mut watcher = dispatch_once(&lab, &nats, &policy);
    let status = wait_exit(&mut watcher, Duration::from_secs(300));
    let (_, wlog) = w.terminate();
    assert!(status.success(), "{status:?}\n{}\nworker:\n{wlog}", watcher.log());
    assert_eq!(wlog.matches("of 3 of minilm done, 1 plugin(s) refused").count(), 3, "{wlog}");
    let report = lab.report("minilm");
    assert_eq!(report["failed_stage"], "static_scan", "{report}");
    let w = weights_stage(&report["scan_details"]["stages"]);
    assert_eq!(w["verdict"], "fail", "{w}");
    let summary = w["summary"].as_str().unwrap();
    assert!(summary.starts_with("plugin builtin:weights failed on part 1 of 3 (job "), "{summary}");
    assert!(summary.ends_with(&format!(": {cause}")), "the cause a whole scan gives:\n{summary}\n{local_summary}");
    // The other static-scan plugins, entropy (joined) among them, still report.
    let entropy =
        report["scan_details"]["stages"].as_array().unwrap().iter().find(|s| s["plugin"] == "builtin:entropy").unwrap();
    assert_eq!(entropy["verdict"], "pass", "{entropy}");
    assert!(entropy["log"].to_string().contains("joined from 3 parts"), "{entropy}");
}
