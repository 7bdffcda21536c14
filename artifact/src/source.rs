//! Where a file's bytes come from: a read-only memory map (the default), or
//! `pread` on an open descriptor.
//!
//! A map saves the kernel's copy on every read: the plugins' reads are then
//! one copy, straight from the page cache into guest memory. A map of a file
//! someone truncates under us would raise SIGBUS; [`super::sigbus`] turns that
//! into zero pages plus a mark that every reader checks, so a truncation is a
//! clean error, as a short `pread` is.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::sigbus;

/// How to read an opened file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// A read-only `mmap`, guarded against truncation.
    #[default]
    Mmap,
    /// `pread` through the descriptor (`--pread`): for filesystems where maps misbehave.
    Pread,
}

/// A map and its SIGBUS registration. The guard is declared first so that it
/// is dropped (unregistered) before the map is unmapped.
struct Mapped {
    guard: sigbus::Guard,
    map: memmap2::Mmap,
}

/// The bytes of one opened file.
pub struct ByteSource {
    file: File,
    map: Option<Arc<Mapped>>,
    size: u64,
    streams: Mutex<Streams>,
}

/// The map is given back in steps of this many bytes (a multiple of the page size).
const RELEASE_STEP: u64 = 8 << 20;
/// The most of the map kept behind the fastest reader. Readers drift apart
/// (gemma's two full-read plugins, on one core, by up to 55 MB); a reader
/// that falls further behind maps its pages again from the page cache, which
/// costs minor faults, not reads, and keeps peak RSS bounded whatever the spread.
const RELEASE_WINDOW: u64 = 32 << 20;

/// The readers that stream through a mapped file, so that the map's
/// page-table entries can be given back behind the slowest of them while the
/// scan runs. Otherwise they are all torn down when the map is dropped: on one
/// core, after every other thread is done (about 18 ms for 253 MB held in
/// 4 KiB pages). Giving a range back never changes what is read: a page read
/// again is mapped again from the page cache.
#[derive(Default)]
struct Streams {
    /// Each registered reader's current offset; `None` once it is done.
    at: Vec<Option<u64>>,
    /// Set once every reader to wait for is registered.
    armed: bool,
    /// Everything below this offset was given back (a reader still behind it
    /// maps pages there again, and gives them back as it passes them).
    released: u64,
}

/// One reader streaming through a mapped file: it reports where it reads,
/// and unregisters when dropped.
pub struct Stream {
    source: Arc<ByteSource>,
    slot: usize,
}

impl Stream {
    /// The reader is about to read from `offset` on; it is done with what lies before.
    pub fn at(&self, offset: u64) {
        self.source.moved(self.slot, Some(offset));
    }

    /// As `at`, for a static-scan plugin's thread: it also keeps off the
    /// hash's core while the hash runs (see [`super::cores`]); dropping the
    /// stream gives it every core back.
    pub fn plugin_at(&self, offset: u64) {
        super::cores::keep_off_hash_core();
        self.at(offset);
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("slot", &self.slot).finish()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // The plugin's thread that kept off the hash's core in `plugin_at`
        // gets its cores back (nothing to do on any other thread).
        super::cores::back_to_all_cores();
        self.source.moved(self.slot, None);
    }
}

fn shrank(offset: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the file shrank during the scan: no bytes at offset {offset} (size at open: {size})"),
    )
}

impl ByteSource {
    /// Wraps an open file whose size was taken from `fstat` at open time.
    pub fn new(file: File, size: u64, mode: ReadMode) -> io::Result<Self> {
        let mut map = None;
        if mode == ReadMode::Mmap && size > 0 && usize::try_from(size).is_ok() {
            // SAFETY: the map is read-only and private. Another process may
            // still truncate the file; the guard registered next turns the
            // SIGBUS that would raise into zero pages and a mark every reader
            // checks (see `intact`). Every access is bounds-checked against
            // the size recorded at open.
            let m = unsafe { memmap2::MmapOptions::new().len(size as usize).map(&file)? };
            // No free guard slot: read this file with pread rather than unguarded.
            if let Some(guard) = sigbus::Guard::register(m.as_ptr(), m.len()) {
                map = Some(Arc::new(Mapped { guard, map: m }));
            }
        }
        Ok(ByteSource { file, map, size, streams: Mutex::default() })
    }

    /// Registers a reader at offset 0; `None` when the file is not mapped.
    pub fn stream(self: &Arc<Self>) -> Option<Stream> {
        self.map.as_ref()?;
        let mut s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        s.at.push(Some(0));
        Some(Stream { source: Arc::clone(self), slot: s.at.len() - 1 })
    }

    /// Lets the map be given back behind the registered readers (see
    /// [`Streams`]); called once all of them are registered.
    pub fn release_behind_streams(&self) {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).armed = true;
    }

    fn moved(&self, slot: usize, at: Option<u64>) {
        let Some(m) = &self.map else { return };
        let ranges = {
            let mut s = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            let before = std::mem::replace(&mut s.at[slot], at);
            if !s.armed {
                return;
            }
            let mut ranges = [(0, 0); 2];
            // A reader behind the mark maps what it reads there again: it
            // gives that back step by step as it passes. (Steps, not pages:
            // each call stops every thread of the process for a TLB flush.)
            if let (Some(from), Some(to)) = (before, at) {
                let (from, to) = (from / RELEASE_STEP * RELEASE_STEP, to.min(s.released) / RELEASE_STEP * RELEASE_STEP);
                if from < to {
                    ranges[0] = (from, to);
                }
            }
            // Behind the slowest reader, or the window behind the fastest;
            // with every reader done, the rest goes too.
            let to = match (s.at.iter().flatten().min(), s.at.iter().flatten().max()) {
                (Some(&low), Some(&high)) => low.max(high.saturating_sub(RELEASE_WINDOW)) / RELEASE_STEP * RELEASE_STEP,
                _ => self.size,
            };
            if to > s.released {
                // Claimed here, given back outside the lock.
                ranges[1] = (std::mem::replace(&mut s.released, to), to);
            }
            ranges
        };
        for (from, to) in ranges.into_iter().filter(|(f, t)| f < t) {
            // SAFETY: DONTNEED on a read-only shared file map only drops
            // page-table entries; the next access maps the page-cache page
            // again, so every slice of the map stays valid and reads the same
            // bytes. `from` is a multiple of RELEASE_STEP (so of the page size)
            // and `to` is at most the map's length.
            let _ = unsafe {
                m.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from as usize, (to - from) as usize)
            };
        }
    }

    /// Fails if a read of the map ever went past the end of the file: it was
    /// truncated under the scan, and what was read there were zeros, not the file.
    pub fn intact(&self) -> io::Result<()> {
        match &self.map {
            Some(m) if m.guard.hit() => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file shrank during the scan (size at open: {} bytes)", self.size),
            )),
            _ => Ok(()),
        }
    }

    /// The file's size at open time.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Fills `buf` from `offset`. Returns how many bytes were read: fewer than
    /// `buf.len()` only at the end of the file (as recorded at open).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let want = (self.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..want];
        if let Some(m) = &self.map {
            let start = offset as usize;
            buf.copy_from_slice(&m.map[start..start + want]);
            self.intact()?;
            return Ok(want);
        }
        let mut done = 0;
        while done < want {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(shrank(offset + done as u64, self.size)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(want)
    }

    /// Reads up to `len` bytes at `offset` into a new vector (short at end of
    /// file). Unlike `read_at` on a zeroed buffer, the bytes are written once:
    /// this is the path every plugin read takes, so it is one copy, not two.
    pub fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let want = self.size.saturating_sub(offset).min(len as u64) as usize;
        if let Some(m) = &self.map {
            let start = offset as usize;
            let v = m.map[start..start + want].to_vec();
            self.intact()?;
            return Ok(v);
        }
        let mut buf: Vec<u8> = Vec::with_capacity(want);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        while buf.len() < want {
            let done = buf.len();
            // SAFETY: pread writes at most `want - done` bytes into the spare
            // capacity starting at `done`, which is allocated and unaliased;
            // `set_len` only covers the bytes the kernel reported written.
            let n = unsafe {
                libc::pread(fd, buf.as_mut_ptr().add(done).cast(), want - done, (offset + done as u64) as libc::off_t)
            };
            match n {
                0 => return Err(shrank(offset + done as u64, self.size)),
                n if n > 0 => unsafe { buf.set_len(done + n as usize) },
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(buf)
    }

    /// Up to `len` bytes at `offset` as shared bytes. From a map this is
    /// zero-copy: the guest's copy, made while lowering the result into its
    /// memory, is the only one. A truncation during that copy shows in
    /// `intact`, which the pipeline checks before it trusts a verdict.
    pub fn read_bytes(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        match &self.map {
            Some(m) => {
                self.intact()?;
                let start = offset.min(self.size) as usize;
                let end = start + (self.size as usize - start).min(len);
                Ok(bytes::Bytes::from_owner(MapRange { map: m.clone(), start, end }))
            }
            None => self.read_vec(offset, len).map(bytes::Bytes::from),
        }
    }

    /// The mapped bytes of `[offset, offset + len)`, when the file is mapped.
    /// Call `intact` after using them.
    pub fn mapped(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let m = self.map.as_ref()?;
        let end = offset.checked_add(len).filter(|&e| e <= self.size)?;
        Some(&m.map[offset as usize..end as usize])
    }

    /// Reads exactly `len` bytes at `offset`, or fails naming the range.
    pub fn read_exact_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = self.read_at(offset, &mut buf)?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("wanted {len} bytes at offset {offset}, the file ends after {n}"),
            ));
        }
        Ok(buf)
    }

    /// The underlying descriptor (for `fstat` re-checks).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// A range of a shared map, owned by `bytes::Bytes`.
struct MapRange {
    map: Arc<Mapped>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapRange {
    fn as_ref(&self) -> &[u8] {
        &self.map.map[self.start..self.end]
    }
}

/// A whole small file (a plugin, a compiled plugin) to hash and load: mapped
/// when it can be, so hashing it costs no copy into freshly zeroed pages, and
/// read otherwise. Check `intact` after using the bytes: a file truncated
/// under the map reads as zeros there.
pub struct FileBytes {
    source: ByteSource,
    /// The bytes, when the file could not be mapped.
    read: Option<Vec<u8>>,
}

impl FileBytes {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let source = ByteSource::new(file, size, ReadMode::Mmap)?;
        let read = match source.mapped(0, size) {
            Some(_) => None,
            None => {
                let len = usize::try_from(size).map_err(|_| io::Error::other(format!("{size} bytes is too big")))?;
                Some(source.read_exact_at(0, len)?)
            }
        };
        Ok(FileBytes { source, read })
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.read {
            Some(v) => v,
            None => self.source.mapped(0, self.source.size()).unwrap_or_default(),
        }
    }

    /// Fails if the file was truncated while mapped.
    pub fn intact(&self) -> io::Result<()> {
        self.source.intact()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A mapped file truncated under the scan gives errors, not a SIGBUS that
    /// kills the host, and the truncation stays visible through `intact`.
    #[test]
    fn a_map_truncated_under_a_read_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        let size = 1 << 20;
        std::fs::File::create(&path).unwrap().write_all(&vec![7u8; size]).unwrap();
        let file = File::open(&path).unwrap();
        let src = ByteSource::new(file, size as u64, ReadMode::Mmap).unwrap();
        assert!(src.mapped(0, 1).is_some(), "the file should be mapped");
        assert_eq!(src.read_vec(0, 16).unwrap(), vec![7u8; 16]);
        src.intact().unwrap();

        // wasmtime installs its own SIGBUS handler when an engine is made, after
        // ours here (as in `airlock scan`, which opens the model first): ours
        // must still be reached through its chain.
        let _engine = wasmtime::Engine::default();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        // Inside what is left: still the file's bytes.
        assert_eq!(src.read_vec(0, 16).unwrap(), vec![7u8; 16]);
        // Past the new end: the copy runs into the guard, and the read fails.
        let err = src.read_vec(512 << 10, 4096).unwrap_err();
        assert!(err.to_string().contains("shrank during the scan"), "{err}");
        // The zero-copy path and the hash refuse from now on as well.
        assert!(src.read_bytes(0, 16).is_err());
        assert!(src.intact().is_err());
        let hash = super::super::hash::hash_range(&src, 0, size as u64).unwrap_err();
        assert!(hash.contains("shrank"), "{hash}");
    }

    /// The same truncation through pread: a short read, named as such.
    #[test]
    fn pread_of_a_truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        std::fs::File::create(&path).unwrap().write_all(&vec![7u8; 65536]).unwrap();
        let src = ByteSource::new(File::open(&path).unwrap(), 65536, ReadMode::Pread).unwrap();
        assert!(src.mapped(0, 1).is_none());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
        let err = src.read_vec(0, 4096).unwrap_err();
        assert!(err.to_string().contains("shrank during the scan"), "{err}");
    }

    /// A plugin file is mapped, not copied; an empty one is empty; one cut
    /// short after it was opened is caught by `intact`, not read as garbage.
    #[test]
    fn file_bytes_are_the_file_and_a_truncation_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugin.wasm");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = FileBytes::open(&path).unwrap();
        assert!(f.read.is_none(), "the file should be mapped");
        assert_eq!(f.bytes(), &data[..]);
        f.intact().unwrap();

        let empty = dir.path().join("empty.wasm");
        std::fs::write(&empty, b"").unwrap();
        let e = FileBytes::open(&empty).unwrap();
        assert!(e.bytes().is_empty());
        e.intact().unwrap();

        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let tail = f.bytes()[200_000..].iter().map(|&b| u64::from(b)).sum::<u64>();
        assert_eq!(tail, 0, "past the new end the map reads zeros");
        assert!(f.intact().is_err());
        assert!(FileBytes::open(&dir.path().join("missing.wasm")).is_err());
    }

    /// The map is given back behind the slowest registered reader (or the
    /// window behind the fastest), in whole steps, only once armed, and wholly
    /// when every reader is done; the bytes read afterwards are still the file's.
    #[test]
    fn the_map_is_given_back_behind_the_slowest_reader_and_still_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        let size = 3 * RELEASE_STEP as usize + 12345;
        let data: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let src = Arc::new(ByteSource::new(File::open(&path).unwrap(), size as u64, ReadMode::Mmap).unwrap());
        let released = || src.streams.lock().unwrap().released;
        let (fast, slow) = (src.stream().unwrap(), src.stream().unwrap());
        fast.at(2 * RELEASE_STEP + 5);
        slow.at(RELEASE_STEP + 7);
        assert_eq!(released(), 0, "nothing goes before the readers are all registered");
        src.release_behind_streams();
        slow.at(RELEASE_STEP + 8);
        assert_eq!(released(), RELEASE_STEP, "behind the slowest, in whole steps");
        assert_eq!(src.read_vec(100, 1000).unwrap(), &data[100..1100], "a released range reads the file again");
        drop(fast);
        slow.at(2 * RELEASE_STEP + 1);
        assert_eq!(released(), 2 * RELEASE_STEP, "a reader that is done no longer holds it back");
        drop(slow);
        assert_eq!(released(), size as u64, "with every reader done, all of it");
        assert_eq!(src.mapped(0, size as u64).unwrap(), &data[..]);
        src.intact().unwrap();

        // A reader far behind holds back no more than the window behind the fastest.
        let size = 8 * RELEASE_STEP as usize;
        std::fs::write(&path, vec![9u8; size]).unwrap();
        let src = Arc::new(ByteSource::new(File::open(&path).unwrap(), size as u64, ReadMode::Mmap).unwrap());
        let released = || src.streams.lock().unwrap().released;
        let (fast, slow) = (src.stream().unwrap(), src.stream().unwrap());
        src.release_behind_streams();
        slow.at(5);
        fast.at(RELEASE_WINDOW + 2 * RELEASE_STEP + 3);
        assert_eq!(released(), 2 * RELEASE_STEP, "the window behind the fastest, in whole steps");
        assert_eq!(src.read_vec(5, 4096).unwrap(), vec![9u8; 4096], "the slow reader still reads the file");
        // Passing a step behind the mark, it gives back what it mapped again; the bytes stay the file's.
        slow.at(RELEASE_STEP + 1);
        assert_eq!(released(), 2 * RELEASE_STEP);
        assert_eq!(src.read_vec(0, size).unwrap(), vec![9u8; size]);
        drop((fast, slow));
        // A file read with pread has no map to give back.
        let pread = Arc::new(ByteSource::new(File::open(&path).unwrap(), size as u64, ReadMode::Pread).unwrap());
        assert!(pread.stream().is_none());
    }
}
