//! `cargo xtask bench-scale-out`: throughput of `watch --dispatch` with one
//! worker against two, on 20 copies of the real gemma, through a nats-server
//! on loopback. The release build; the figure goes in docs/scale-out.md.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup::{self, Purpose};

const COPIES: usize = 20;

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

pub fn command() -> Result<()> {
    setup::ensure(Purpose::Test)?;
    let route = crate::toolchain()?;
    crate::build_host(&route)?;
    let models = crate::models(&["gemma"])?;
    let gemma = crate::path_of(&models, "gemma")?.to_path_buf();
    let airlock = crate::root_dir_bin();
    let nats_bin = setup::which("nats-server").context("nats-server is not installed after set-up")?;
    let work = std::env::temp_dir().join("airlock-bench-scale-out");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let server = Command::new(&nats_bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(work.join("jetstream"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _server = Killed(vec![server]);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("nats-server did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let cache = work.join("plugin-cache");
    // The shipped policy, with a worker key the watcher trusts (results are signed).
    let policy = work.join("policy");
    std::fs::create_dir_all(&policy)?;
    let repo = crate::root();
    std::fs::copy(repo.join("policy/sources.allowlist.yaml"), policy.join("sources.allowlist.yaml"))?;
    let out = Command::new(&airlock).arg("worker-key").arg(policy.join("worker.nk")).output()?;
    if !out.status.success() {
        bail!("airlock worker-key: {}", String::from_utf8_lossy(&out.stderr));
    }
    let public = String::from_utf8(out.stdout)?.trim().to_string();
    let text = std::fs::read_to_string(repo.join("policy/policy.yaml"))?;
    std::fs::write(
        policy.join("policy.yaml"),
        format!("{text}\nscale_out:\n  signing_key_file: worker.nk\n  trusted_workers: [{public}]\n"),
    )?;
    // `objects`: the models travel in the Object Store instead of being read at their path.
    let run = |workers: usize, objects: bool| -> Result<Duration> {
        let root = work.join(format!("root-{workers}-{objects}"));
        let _ = std::fs::remove_dir_all(&root);
        let cmd = |args: &[&str]| {
            let mut c = Command::new(&airlock);
            c.args(args).env("AIRLOCK_ROOT", &root).env("AIRLOCK_CACHE_DIR", &cache).env("AIRLOCK_POLICY", &policy);
            c
        };
        crate::time(&mut cmd(&["init"]))?;
        for i in 0..COPIES {
            std::fs::copy(&gemma, root.join(format!("quarantine/incoming/gemma-{i:02}.gguf")))?;
        }
        let mut pool = Vec::new();
        for _ in 0..workers {
            // A loopback server without credentials, for the bench only: both ends must say so.
            pool.push(
                cmd(&["worker", "--nats", &url, "--insecure-nats"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        let _pool = Killed(pool);
        // Enough in flight that every worker always has a job; no workers: the
        // watcher scans itself, the baseline.
        let mut args = vec!["watch", "--once", "--settle-ms", "0", "--jobs", "4"];
        if workers > 0 {
            args.extend(["--dispatch", url.as_str(), "--insecure-nats"]);
        }
        if objects {
            args.extend(["--transfer", "object-store"]);
        }
        let took = crate::time(&mut cmd(&args))?;
        let promoted =
            std::fs::read_dir(root.join("registry"))?.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir())).count();
        if promoted != COPIES {
            bail!("{promoted} of {COPIES} copies were promoted with {workers} worker(s)");
        }
        Ok(took)
    };
    // A first round warms the page cache and the compiled-plugin cache.
    run(1, false)?;
    let local = run(0, false)?;
    let one = run(1, false)?;
    let two = run(2, false)?;
    let one_objects = run(1, true)?;
    let two_objects = run(2, true)?;
    let per_min = |d: Duration| COPIES as f64 / d.as_secs_f64() * 60.0;
    println!("machine: {}", crate::machine());
    println!("{COPIES} copies of {} through `watch --dispatch` on loopback NATS:", gemma.display());
    println!(
        "  no dispatch (watch --jobs 4 scans itself): {:>6.1} s  ({:.0} models/min)",
        local.as_secs_f64(),
        per_min(local)
    );
    println!("  1 worker:  {:>6.1} s  ({:.0} models/min)", one.as_secs_f64(), per_min(one));
    println!("  2 workers: {:>6.1} s  ({:.0} models/min)", two.as_secs_f64(), per_min(two));
    println!("ratio 2 workers / 1 worker throughput: {:.2}x", one.as_secs_f64() / two.as_secs_f64());
    println!("models through the Object Store (--transfer object-store):");
    println!("  1 worker:  {:>6.1} s  ({:.0} models/min)", one_objects.as_secs_f64(), per_min(one_objects));
    println!("  2 workers: {:>6.1} s  ({:.0} models/min)", two_objects.as_secs_f64(), per_min(two_objects));
    println!("ratio 2 workers / 1 worker throughput: {:.2}x", one_objects.as_secs_f64() / two_objects.as_secs_f64());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
