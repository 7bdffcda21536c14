//! The whole-file sha256, computed natively once per file on a background
//! thread (sha2 uses SHA-NI where the CPU has it) and shared by every stage.
//! It is queued when the file is opened, so it overlaps header parsing and
//! the first stages; a pool with one thread per core works through the queue.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use super::source::{ByteSource, Stream};

/// Measured on the gemma GGUF (253 MB, warm cache): 128 KiB reads hash in
/// ~220 ms, 1–4 MiB reads in ~310–360 ms. A buffer that fits in L2 is still
/// cached when the hash reads what `pread` just copied into it.
const CHUNK: usize = 128 << 10;

enum State {
    /// Waiting for a hashing thread.
    Queued(Arc<ByteSource>),
    Running,
    Done(Result<String, String>),
}

struct Job {
    state: Mutex<State>,
    done: Condvar,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, result: Result<String, String>) {
        *self.lock() = State::Done(result);
        self.done.notify_all();
    }
}

/// A sha256 being computed or already known.
pub struct HashCell(Arc<Job>);

/// Files waiting to be hashed, and how many hashing threads run. Every file
/// of every model scanned at once shares them: a folder of 1,000 shards, or
/// `watch --jobs 8`, never runs more hashing threads than there are cores.
struct Pool {
    queue: VecDeque<Arc<Job>>,
    threads: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { queue: VecDeque::new(), threads: 0 });

fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// At most one hashing thread per CPU this process may use.
fn max_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A hashing thread: hashes queued files until the queue is empty.
fn hash_queued() {
    loop {
        let job = {
            let mut pool = pool();
            match pool.queue.pop_front() {
                Some(job) => job,
                None => {
                    // Under the lock: a file queued after this sees one thread fewer and starts one.
                    pool.threads -= 1;
                    return;
                }
            }
        };
        let source = match std::mem::replace(&mut *job.lock(), State::Running) {
            State::Queued(source) => source,
            other => {
                *job.lock() = other;
                continue;
            }
        };
        // A panic must not leave the job running for ever: its waiters would hang.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hash(&source)))
            .unwrap_or_else(|_| Err("the hashing thread panicked".into()));
        job.finish(result);
    }
}

impl HashCell {
    /// Queues `source` for hashing; a hashing thread starts if fewer than
    /// `max_threads` run.
    pub fn start(source: Arc<ByteSource>) -> Self {
        let job = Arc::new(Job { state: Mutex::new(State::Queued(source)), done: Condvar::new() });
        let mut pool = pool();
        pool.queue.push_back(job.clone());
        if pool.threads < max_threads() {
            match std::thread::Builder::new().name("airlock-sha256".into()).spawn(hash_queued) {
                Ok(_) => pool.threads += 1,
                // With no thread at all, nobody would ever take the job: fail it, never hang.
                Err(e) if pool.threads == 0 => {
                    pool.queue.retain(|j| !Arc::ptr_eq(j, &job));
                    drop(pool);
                    job.finish(Err(format!("cannot start a hashing thread: {e}")));
                }
                Err(_) => {}
            }
        }
        HashCell(job)
    }

    /// The lowercase hex digest; waits for it the first time.
    pub fn get(&self) -> Result<String, String> {
        let mut state = self.0.lock();
        loop {
            if let State::Done(r) = &*state {
                return r.clone();
            }
            state = self.0.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the hashing thread hashes between two reports of where it is.
const STREAM_STEP: usize = 8 << 20;

fn hash(source: &Arc<ByteSource>) -> Result<String, String> {
    // A mapped file is streamed beside the static-scan plugins: the hash
    // reports where it is (so the map is given back behind every reader) and
    // holds a core of its own while it runs.
    let stream = source.stream();
    let core = stream.as_ref().and_then(|_| super::cores::reserve_for_hash());
    let digest = hash_reporting(source, 0, source.size(), stream.as_ref());
    drop((stream, core));
    digest
}

/// The lowercase hex sha256 of `[offset, offset + len)`.
pub fn hash_range(source: &ByteSource, offset: u64, len: u64) -> Result<String, String> {
    hash_reporting(source, offset, len, None)
}

/// As `hash_range`; a mapped range is hashed in place, telling `stream`
/// where it is every STREAM_STEP bytes, and anything else is read in
/// L2-sized chunks.
fn hash_reporting(source: &ByteSource, offset: u64, len: u64, stream: Option<&Stream>) -> Result<String, String> {
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= source.size())
        .ok_or_else(|| format!("range [{offset}, +{len}) is past the end of the file ({} bytes)", source.size()))?;
    let mut hasher = Sha256::new();
    if let Some(bytes) = source.mapped(offset, len) {
        for (i, chunk) in bytes.chunks(STREAM_STEP).enumerate() {
            if let Some(stream) = stream {
                stream.at(offset + (i * STREAM_STEP) as u64);
            }
            hasher.update(chunk);
        }
        source.intact().map_err(|e| e.to_string())?;
        return Ok(hex::encode(hasher.finalize()));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut at = offset;
    while at < end {
        let want = (end - at).min(CHUNK as u64) as usize;
        let n = source.read_at(at, &mut buf[..want]).map_err(|e| format!("read failed at offset {at}: {e}"))?;
        if n != want {
            return Err(format!("short read at offset {at}: wanted {want} bytes, got {n}"));
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReadMode;

    /// Many files at once, as a folder of shards: every digest right, and
    /// never more hashing threads than cores.
    #[test]
    fn many_files_are_hashed_by_at_most_one_thread_per_core() {
        let dir = tempfile::tempdir().unwrap();
        let mut cells = Vec::new();
        let mut expected = Vec::new();
        for i in 0..64u32 {
            let path = dir.path().join(format!("shard-{i}"));
            let bytes: Vec<u8> = (0..(200_000 + i * 997)).map(|j| (j * 31 + i) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            expected.push(hex::encode(Sha256::digest(&bytes)));
            let file = std::fs::File::open(&path).unwrap();
            let mode = if i % 2 == 0 { ReadMode::Mmap } else { ReadMode::Pread };
            let source = Arc::new(ByteSource::new(file, bytes.len() as u64, mode).unwrap());
            cells.push(HashCell::start(source));
            assert!(pool().threads <= max_threads(), "{} hashing threads", pool().threads);
        }
        for (cell, want) in cells.iter().zip(&expected) {
            assert_eq!(&cell.get().unwrap(), want);
            // A second get is the stored result.
            assert_eq!(&cell.get().unwrap(), want);
        }
    }
}
