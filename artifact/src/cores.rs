//! A core of its own for the whole-file hash while the static scan streams.
//!
//! The hash is the longest single job of a scan (SHA-NI on one thread), and
//! it runs beside the plugins that stream through the model. On two cores,
//! three busy threads split 2 + 1 wherever the scheduler happens to put them;
//! when the one alone is a plugin, the hash ends up sharing a core, and the
//! last job to finish then runs alone with the other core idle (seen on
//! gemma: 50–65 ms with one core idle at the end). So the hashing thread is
//! pinned to the core it starts on, and every static-scan plugin keeps off that
//! core while the hash runs and takes every core back as soon as it is done.
//! On one core, or with a second hash already holding a core, nothing is pinned.

use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

/// The core the running hash holds, or -1.
static HASH_CORE: AtomicI32 = AtomicI32::new(-1);

/// The threads keeping off it, with their affinity before. The hash gives
/// them their cores back itself when it ends: otherwise its core would idle
/// until each of them reads again and the scheduler next balances (about
/// 20 ms, seen on gemma).
static KEPT_OFF_THREADS: Mutex<Vec<(libc::pid_t, libc::cpu_set_t)>> = Mutex::new(Vec::new());

fn kept_off_threads() -> std::sync::MutexGuard<'static, Vec<(libc::pid_t, libc::cpu_set_t)>> {
    KEPT_OFF_THREADS.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The affinity this thread had before it kept off the hash's core.
    static KEPT_OFF: Cell<Option<libc::cpu_set_t>> = const { Cell::new(None) };
}

fn affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: `set` is a plain bit set, written by the kernel for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: as above; a failure leaves the affinity as it was, which is harmless.
    unsafe {
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set);
    }
}

fn count(set: &libc::cpu_set_t) -> i32 {
    // SAFETY: reads the bit set only.
    unsafe { libc::CPU_COUNT(set) }
}

/// The hashing thread's hold on its core; dropping it lets the readers back.
pub struct HashCore {
    before: libc::cpu_set_t,
}

/// Called on the hashing thread: pins it to the core it runs on. `None`
/// when fewer than two cores are allowed or another hash holds one.
pub fn reserve_for_hash() -> Option<HashCore> {
    let before = affinity()?;
    // SAFETY: sched_getcpu has no preconditions.
    let core = unsafe { libc::sched_getcpu() };
    // SAFETY: CPU_ISSET reads the bit set only; `core` is checked to be in range first.
    if count(&before) < 2
        || core < 0
        || core as usize >= libc::CPU_SETSIZE as usize
        || !unsafe { libc::CPU_ISSET(core as usize, &before) }
    {
        return None;
    }
    HASH_CORE.compare_exchange(-1, core, Ordering::AcqRel, Ordering::Acquire).ok()?;
    // SAFETY: builds a bit set with one bit.
    let only = unsafe {
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core as usize, &mut only);
        only
    };
    set_affinity(&only);
    Some(HashCore { before })
}

impl Drop for HashCore {
    fn drop(&mut self) {
        HASH_CORE.store(-1, Ordering::Release);
        for (tid, before) in kept_off_threads().drain(..) {
            // SAFETY: `tid` is a thread of this process still in its run (it
            // removes itself before it ends); a failure changes nothing.
            unsafe {
                libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &before);
            }
        }
        set_affinity(&self.before);
    }
}

/// Called by a static-scan plugin's thread before each read: keeps it
/// off the hash's core while the hash runs, and gives it back its cores after.
pub fn keep_off_hash_core() {
    let core = HASH_CORE.load(Ordering::Acquire);
    match KEPT_OFF.get() {
        None if core >= 0 => {
            let Some(before) = affinity() else { return };
            let mut others = before;
            // SAFETY: `core` is a valid index (it was checked by `reserve_for_hash`).
            let held = unsafe { libc::CPU_ISSET(core as usize, &others) };
            if !held {
                return;
            }
            // SAFETY: as above.
            unsafe { libc::CPU_CLR(core as usize, &mut others) };
            if count(&others) == 0 {
                return;
            }
            set_affinity(&others);
            KEPT_OFF.set(Some(before));
            // SAFETY: gettid has no preconditions.
            kept_off_threads().push((unsafe { libc::gettid() }, before));
        }
        Some(_) if core < 0 => back_to_all_cores(),
        _ => {}
    }
}

/// Called when a streaming reader is done: gives the thread back its cores.
pub fn back_to_all_cores() {
    if let Some(before) = KEPT_OFF.take() {
        set_affinity(&before);
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        kept_off_threads().retain(|(tid, _)| *tid != me);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hashing thread gets one core; a reader keeps off it while the hash
    /// runs and gets every core back after, at its next read.
    #[test]
    fn a_reader_keeps_off_the_hash_core_only_while_the_hash_runs() {
        let all = affinity().unwrap();
        if count(&all) < 2 {
            assert!(std::thread::spawn(|| reserve_for_hash().is_none()).join().unwrap());
            return;
        }
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let hash = std::thread::spawn(move || {
            let core = reserve_for_hash().expect("a core for the hash");
            assert_eq!(count(&affinity().unwrap()), 1, "the hash is pinned to one core");
            assert!(reserve_for_hash().is_none(), "a second hash does not take another core");
            held_tx.send(HASH_CORE.load(Ordering::Acquire)).unwrap();
            done_rx.recv().unwrap();
            drop(core);
        });
        let core = held_rx.recv().unwrap();
        keep_off_hash_core();
        let now = affinity().unwrap();
        // SAFETY: reads the bit set only.
        assert!(!unsafe { libc::CPU_ISSET(core as usize, &now) }, "the reader keeps off core {core}");
        assert_eq!(count(&now), count(&all) - 1);
        done_tx.send(()).unwrap();
        hash.join().unwrap();
        assert_eq!(count(&affinity().unwrap()), count(&all), "the hash gives the reader its cores back as it ends");
        keep_off_hash_core();
        assert_eq!(count(&affinity().unwrap()), count(&all), "and the reader stays on every core");
        assert!(KEPT_OFF.get().is_none() && kept_off_threads().is_empty());
    }
}
