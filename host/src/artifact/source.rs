//! Where a file's bytes come from: `pread` on an open descriptor, or a
//! read-only memory map.
//!
//! A map of a file that someone truncates under us raises SIGBUS on access, so
//! the map is only for files airlock owns (claimed by rename into its own
//! directories). Paths given on the command line are read with `pread`, which
//! turns the same race into a short read and a clean error.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// How to read an opened file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// `pread` through the descriptor: safe against concurrent truncation.
    #[default]
    Pread,
    /// A read-only `mmap`: only for files nothing else can change.
    Mmap,
}

/// The bytes of one opened file.
pub struct ByteSource {
    file: File,
    map: Option<std::sync::Arc<memmap2::Mmap>>,
    size: u64,
}

impl ByteSource {
    /// Wraps an open file whose size was taken from `fstat` at open time.
    pub fn new(file: File, size: u64, mode: ReadMode) -> io::Result<Self> {
        let map = match mode {
            ReadMode::Mmap if size > 0 => {
                // SAFETY: the map is read-only and private to this process. The
                // caller only asks for it on files airlock has claimed by
                // rename into its own directory, where nothing else writes or
                // truncates them; every access below is bounds-checked against
                // the size recorded at open.
                Some(std::sync::Arc::new(unsafe { memmap2::MmapOptions::new().len(size as usize).map(&file)? }))
            }
            _ => None,
        };
        Ok(ByteSource { file, map, size })
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
        if let Some(map) = &self.map {
            let start = offset as usize;
            buf.copy_from_slice(&map[start..start + want]);
            return Ok(want);
        }
        let mut done = 0;
        while done < want {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank during the scan: no bytes at offset {} (size at open: {})",
                            offset + done as u64,
                            self.size
                        ),
                    ));
                }
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
        if let Some(map) = &self.map {
            let start = offset as usize;
            return Ok(map[start..start + want].to_vec());
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
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file shrank during the scan: no bytes at offset {} (size at open: {})",
                            offset + done as u64,
                            self.size
                        ),
                    ));
                }
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
    /// memory, is the only one. From a descriptor it is `read_vec`.
    pub fn read_bytes(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        match &self.map {
            Some(map) => {
                let start = offset.min(self.size) as usize;
                let end = start + (self.size as usize - start).min(len);
                Ok(bytes::Bytes::from_owner(MapRange { map: map.clone(), start, end }))
            }
            None => self.read_vec(offset, len).map(bytes::Bytes::from),
        }
    }

    /// The mapped bytes of `[offset, offset + len)`, when the file is mapped.
    pub fn mapped(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let map = self.map.as_ref()?;
        let end = offset.checked_add(len).filter(|&e| e <= self.size)?;
        Some(&map[offset as usize..end as usize])
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
    map: std::sync::Arc<memmap2::Mmap>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapRange {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }
}
