//! `cargo xtask bench-watch`: what an idle watcher costs and how soon it
//! takes a drop (issue 37). The release build on a temporary root:
//! - idle: the watcher's own CPU time (utime + stime from /proc) over 60 s
//!   with nothing to do, given per hour;
//! - claim latency: a file renamed into `incoming/` (it appears whole), then
//!   the time until the watcher has moved it out, 10 times, with
//!   `--settle-ms 0` (the loop's own reaction) and with the default 2000
//!   (what an operator sees: the settle wait is deliberate).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup::{self, Purpose};

/// A GGUF with no tensors and no metadata: the smallest model a watcher takes.
const TINY_GGUF: [u8; 24] = *b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// User plus system CPU time of a process so far.
fn cpu_of(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends at the last ')'.
    let rest = stat.rsplit_once(')').context("an unreadable /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (utime, stime): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    Ok(Duration::from_secs_f64((utime + stime) / ticks))
}

fn start_watch(airlock: &Path, root: &Path, settle_ms: u32) -> Result<Stopped> {
    let _ = std::fs::remove_dir_all(root);
    let ok = Command::new(airlock).arg("init").env("AIRLOCK_ROOT", root).stdout(Stdio::null()).status()?;
    if !ok.success() {
        bail!("airlock init failed");
    }
    let child = Command::new(airlock)
        .args(["watch", "--settle-ms", &settle_ms.to_string()])
        .env("AIRLOCK_ROOT", root)
        .env("AIRLOCK_CACHE_DIR", root.join("../cache"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Stopped(child))
}

/// Drops `n` files one at a time and returns how long each waited in incoming/.
fn claim_latencies(root: &Path, n: usize) -> Result<Vec<Duration>> {
    let incoming = root.join("quarantine/incoming");
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("drop-{i}.gguf");
        let hidden = incoming.join(format!(".{name}.partial"));
        std::fs::write(&hidden, TINY_GGUF)?;
        let dropped = Instant::now();
        std::fs::rename(&hidden, incoming.join(&name))?;
        while incoming.join(&name).exists() {
            if dropped.elapsed() > Duration::from_secs(60) {
                bail!("{name} was not taken in 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        out.push(dropped.elapsed());
        // Let the verdict finish before the next drop, so each is measured on an idle watcher.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(out)
}

pub fn command() -> Result<()> {
    setup::ensure(Purpose::Test)?;
    let route = crate::toolchain()?;
    crate::build_host(&route)?;
    let airlock = crate::root_dir_bin();
    let work = std::env::temp_dir().join("airlock-bench-watch");
    std::fs::create_dir_all(&work)?;
    println!("machine: {}", crate::machine());

    let root = work.join("idle");
    let w = start_watch(&airlock, &root, 2000)?;
    std::thread::sleep(Duration::from_secs(5));
    let before = cpu_of(w.0.id())?;
    std::thread::sleep(Duration::from_secs(60));
    let idle = cpu_of(w.0.id())? - before;
    drop(w);
    println!(
        "idle watcher: {:.3} s of CPU in 60 s, {:.1} s per hour ({:.3}% of a core)",
        idle.as_secs_f64(),
        idle.as_secs_f64() * 60.0,
        idle.as_secs_f64() / 60.0 * 100.0
    );

    for settle in [0u32, 2000] {
        let root = work.join(format!("claim-{settle}"));
        let _w = start_watch(&airlock, &root, settle)?;
        std::thread::sleep(Duration::from_secs(3));
        let mut t = claim_latencies(&root, 10)?;
        t.sort();
        println!(
            "drop to claim, --settle-ms {settle}: median {:.0} ms, best {:.0} ms, worst {:.0} ms (10 drops)",
            t[t.len() / 2].as_secs_f64() * 1e3,
            t[0].as_secs_f64() * 1e3,
            t[t.len() - 1].as_secs_f64() * 1e3
        );
    }
    Ok(())
}
