//! The whole-file sha256, computed natively once per file on a background
//! thread (sha2 uses SHA-NI where the CPU has it) and shared by every stage.
//! It starts when the file is opened, so it overlaps header parsing and the
//! first stages.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::source::{ByteSource, Stream};

/// Measured on the gemma GGUF (253 MB, warm cache): 128 KiB reads hash in
/// ~220 ms, 1–4 MiB reads in ~310–360 ms. A buffer that fits in L2 is still
/// cached when the hash reads what `pread` just copied into it.
const CHUNK: usize = 128 << 10;

enum State {
    Running(JoinHandle<Result<String, String>>),
    Done(Result<String, String>),
}

/// A sha256 being computed or already known.
pub struct HashCell(Mutex<State>);

impl HashCell {
    /// Starts hashing `source` on a new thread.
    pub fn start(source: Arc<ByteSource>) -> Self {
        let handle = std::thread::Builder::new()
            .name("airlock-sha256".into())
            .spawn(move || hash(&source))
            .map(State::Running)
            .unwrap_or_else(|e| State::Done(Err(format!("cannot start the hashing thread: {e}"))));
        HashCell(Mutex::new(handle))
    }

    /// The lowercase hex digest; waits for the thread the first time.
    pub fn get(&self) -> Result<String, String> {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Running(_) = &*state {
            let State::Running(handle) = std::mem::replace(&mut *state, State::Done(Err(String::new()))) else {
                unreachable!()
            };
            let result = handle.join().unwrap_or_else(|_| Err("the hashing thread panicked".into()));
            *state = State::Done(result);
        }
        match &*state {
            State::Done(r) => r.clone(),
            State::Running(_) => unreachable!(),
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
