//! The watch loop: takes models from incoming/ once they have settled and
//! runs each through the quarantine, up to `jobs` at a time. The caller owns
//! the root lock, the signals and the printing.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::{Disposition, Quarantine};
use crate::pipeline::Event;

/// How the loop runs.
pub struct Options {
    /// Take what is waiting, then return.
    pub once: bool,
    /// How long an entry's size and mtime must stay unchanged before it is taken.
    pub settle: Duration,
    /// How many models are scanned at once.
    pub jobs: usize,
}

/// How often a registry announcement that failed is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// A name whose claim failed (it could not be moved out of incoming/, the
/// disk was full) is tried again after this, doubling each time up to
/// `BACKOFF_MAX`, never in a tight loop.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Whether an inotify event can mean a new or changed entry. Reads, opens
/// and closes without a write (airlock's own listing of incoming/ raises
/// them) must not wake the loop, or each listing wakes it for the next.
fn is_change(ev: &notify::Result<notify::Event>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match ev {
        Ok(e) => match e.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        // An error (a queue overflow) may hide a change: look again.
        Err(_) => true,
    }
}

/// Size and newest mtime of an entry (a folder: its whole tree), without following links.
fn snapshot(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = fs::symlink_metadata(path).ok()?;
    let mut size = meta.len();
    let mut mtime = meta.modified().ok()?;
    if meta.is_dir() {
        for e in fs::read_dir(path).ok()?.filter_map(|e| e.ok()) {
            let (s, m) = snapshot(&e.path())?;
            size += s;
            mtime = mtime.max(m);
        }
    }
    Some((size, mtime))
}

/// Finishes what a crash interrupted, then watches incoming/ with inotify
/// (polling if inotify is unavailable) until `stop` is set, or with `once`
/// until nothing is waiting. `on_event` sees each scan's progress and
/// `on_done` each model's disposition, from the scanning threads.
pub fn run(
    q: &Quarantine,
    options: &Options,
    stop: &AtomicBool,
    on_event: &(dyn Fn(Event) + Sync),
    on_done: &(dyn Fn(&Result<Disposition, String>) + Sync),
) -> io::Result<()> {
    let Options { once, settle, jobs } = *options;
    for d in q.recover(&mut |e| on_event(e)) {
        on_done(&d);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let _watcher = {
        use notify::Watcher;
        let made = notify::recommended_watcher(move |ev| {
            if is_change(&ev) {
                let _ = tx.send(ev);
            }
        })
        .and_then(|mut w| w.watch(&q.root.incoming(), notify::RecursiveMode::Recursive).map(|_| w));
        match made {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("inotify is unavailable ({e}); falling back to polling incoming/ every second");
                None
            }
        }
    };

    // Announcements a previous run could not deliver.
    let outbox_left = Mutex::new(q.flush_outbox());
    let last_flush = Mutex::new(Instant::now());

    let in_flight: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    // name -> (not before, failed claims in a row)
    let backoff: Mutex<HashMap<String, (Instant, u32)>> = Mutex::new(HashMap::new());
    let (work_tx, work_rx) = std::sync::mpsc::channel::<String>();
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|scope| -> io::Result<()> {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(name) = next else { break };
                    let d = q.take(&name, &mut |e| on_event(e));
                    on_done(&d);
                    {
                        let mut b = backoff.lock().unwrap_or_else(|p| p.into_inner());
                        if d.is_err() && q.root.incoming().join(&name).symlink_metadata().is_ok() {
                            let n = b.get(&name).map_or(0, |e| e.1);
                            let wait = BACKOFF_FIRST.saturating_mul(1 << n.min(16)).min(BACKOFF_MAX);
                            tracing::warn!("{name}: its claim failed; trying again in {wait:?}");
                            b.insert(name.clone(), (Instant::now() + wait, n + 1));
                        } else {
                            b.remove(&name);
                        }
                    }
                    if matches!(d, Ok(Disposition::Promoted { .. })) {
                        *outbox_left.lock().unwrap_or_else(|p| p.into_inner()) = q.flush_outbox();
                        *last_flush.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    }
                    in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                }
            });
        }
        // name -> (size, mtime, since when unchanged, shards missing at this size and mtime)
        let mut seen: HashMap<String, (u64, SystemTime, Instant, bool)> = HashMap::new();
        let result = (|| -> io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let waiting = q.waiting()?;
                seen.retain(|n, _| waiting.contains(n));
                let mut pending = false;
                for name in waiting {
                    if in_flight.lock().unwrap_or_else(|p| p.into_inner()).contains(&name) {
                        continue;
                    }
                    if backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&name)
                        .is_some_and(|b| b.0 > Instant::now())
                    {
                        continue;
                    }
                    let path = q.root.incoming().join(&name);
                    let Some((size, mtime)) = snapshot(&path) else { continue };
                    let entry = seen.entry(name.clone()).or_insert((size, mtime, Instant::now(), false));
                    if (entry.0, entry.1) != (size, mtime) {
                        *entry = (size, mtime, Instant::now(), false);
                    }
                    if entry.2.elapsed() < settle {
                        pending = true;
                        continue;
                    }
                    // A folder whose index names shards that are not there is
                    // still arriving. The index is read once per state of the
                    // tree, not on every wake-up, and such a folder does not
                    // keep `--once` waiting.
                    if entry.3 {
                        continue;
                    }
                    if !crate::artifact::missing_shards(&path).is_empty() {
                        entry.3 = true;
                        continue;
                    }
                    seen.remove(&name);
                    in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
                    let _ = work_tx.send(name);
                }
                let busy = !in_flight.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
                if once && !pending && !busy {
                    break;
                }
                if *outbox_left.lock().unwrap_or_else(|p| p.into_inner()) > 0
                    && last_flush.lock().unwrap_or_else(|p| p.into_inner()).elapsed() > RETRY
                {
                    *outbox_left.lock().unwrap_or_else(|p| p.into_inner()) = q.flush_outbox();
                    *last_flush.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                }
                // Wake on the next filesystem event, or in time to re-check the settle window.
                let _ = rx.recv_timeout(settle.clamp(Duration::from_millis(50), Duration::from_secs(1)));
                while rx.try_recv().is_ok() {}
            }
            Ok(())
        })();
        // Stop handing out work; the workers finish their current model and exit.
        drop(work_tx);
        result
    })
}
