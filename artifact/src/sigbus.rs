//! Makes read-only file maps safe against a file truncated under them.
//!
//! Reading a page of a map that lies past the file's new end raises SIGBUS,
//! which would kill the host (and every scan in it). Each map is registered
//! here; the SIGBUS handler swaps the rest of a registered map for zero pages,
//! marks it as hit and lets the read go on. Every reader checks the mark after
//! it copied or hashed, so the truncation becomes a clean error naming the
//! file, and the scan fails closed. A SIGBUS outside every registered map goes
//! on to the handler that was there before (wasmtime's, or the default, which
//! ends the process as it would have without this module).

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// At most this many maps are guarded at once; a file opened beyond that is
/// read with `pread` instead (same bytes, one more copy).
const SLOTS: usize = 1024;

struct Slot {
    /// First byte of the map; 0 when the slot is free.
    start: AtomicUsize,
    /// One past the last byte.
    end: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise TABLE
const FREE: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), hit: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The handler that was installed before ours, as a raw `sigaction`.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// One registered map; unregisters on drop (before the map is unmapped).
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `[start, start + len)`. `None` when no handler could be
    /// installed or every slot is taken: the caller must not map then.
    pub fn register(start: *const u8, len: usize) -> Option<Guard> {
        install();
        if !INSTALLED.load(Ordering::Acquire) || len == 0 {
            return None;
        }
        let start = start as usize;
        for (i, slot) in TABLE.iter().enumerate() {
            // Claim the slot through `end` (0 = free), publish `start` last: the
            // handler ignores a slot until `start` is set.
            if slot.end.compare_exchange(0, start + len, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                slot.hit.store(false, Ordering::Release);
                slot.start.store(start, Ordering::Release);
                return Some(Guard { slot: i });
            }
        }
        None
    }

    /// Whether a read of this map ever went past the end of the file.
    pub fn hit(&self) -> bool {
        TABLE[self.slot].hit.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        slot.start.store(0, Ordering::Release);
        slot.end.store(0, Ordering::Release);
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf and sigaction are called with valid arguments; the
        // previous action is written to PREVIOUS before our handler can run
        // (it is installed by the same call, and nothing maps before `register`).
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            // Write PREVIOUS first with the current action, so a SIGBUS right
            // after the swap already finds where to chain.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return;
            }
            PREVIOUS = Some(old);
            if libc::sigaction(libc::SIGBUS, &new, &mut old) != 0 {
                return;
            }
            PREVIOUS = Some(old);
            INSTALLED.store(true, Ordering::Release);
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &TABLE {
        let start = slot.start.load(Ordering::Acquire);
        let end = slot.end.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= end {
            continue;
        }
        // Replace everything from the faulting page to the end of the map with
        // zero pages (mmap is a plain system call, safe in a handler); the
        // faulting instruction then reads zeros and the reader sees `hit`.
        let from = addr & !(page - 1);
        let len = (end - from).div_ceil(page) * page;
        // SAFETY: [from, from + len) lies inside a live map registered by its
        // owner, which unregisters before unmapping; MAP_FIXED replaces those
        // pages of it only.
        let r = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r != libc::MAP_FAILED {
            slot.hit.store(true, Ordering::Release);
            return;
        }
    }
    // Not one of our maps: hand it on.
    // SAFETY: PREVIOUS was written before this handler was installed and is
    // never written again.
    let previous = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Back to the default action; returning re-runs the faulting
            // instruction, which now ends the process as SIGBUS always did.
            // SAFETY: a zeroed sigaction with SIG_DFL is a valid action.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}
