//! Reading a file or tensor in bounded chunks.

use crate::{File, TensorInfo};

/// The chunk size the host handles best (1 to 8 MiB chunks measured the same).
pub const DEFAULT_CHUNK: u32 = 1 << 20;

/// Iterates over `[offset, offset + len)` of a file in chunks of at most `chunk` bytes.
/// Each item is the chunk's absolute offset and its bytes. A host error or an
/// unexpected end of file ends the iteration with an `Err`.
pub struct ChunkReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    chunk: u32,
    failed: bool,
}

impl<'a> ChunkReader<'a> {
    /// The whole file.
    pub fn file(file: &'a File) -> Self {
        Self::range(file, 0, file.size())
    }
    /// One tensor's data.
    pub fn tensor(file: &'a File, tensor: &TensorInfo) -> Self {
        Self::range(file, tensor.offset, tensor.length)
    }
    /// Any byte range; `len` is clamped so the end never overflows.
    pub fn range(file: &'a File, offset: u64, len: u64) -> Self {
        ChunkReader { file, pos: offset, end: offset.saturating_add(len), chunk: DEFAULT_CHUNK, failed: false }
    }
    /// Uses chunks of `chunk` bytes (at least 1).
    pub fn chunk_size(mut self, chunk: u32) -> Self {
        self.chunk = chunk.max(1);
        self
    }
    /// All the bytes of the range in one buffer: for small files (configs,
    /// templates) that are parsed whole. Check the size before calling it.
    pub fn collect_bytes(self) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        for piece in self {
            bytes.extend(piece?.1);
        }
        Ok(bytes)
    }
}

impl Iterator for ChunkReader<'_> {
    type Item = Result<(u64, Vec<u8>), String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.end {
            return None;
        }
        let want = (self.end - self.pos).min(u64::from(self.chunk)) as u32;
        match self.file.read(self.pos, want) {
            Ok(bytes) if bytes.len() == want as usize => {
                let at = self.pos;
                self.pos += u64::from(want);
                Some(Ok((at, bytes)))
            }
            Ok(bytes) => {
                self.failed = true;
                Some(Err(format!(
                    "short read at offset {}: wanted {want} bytes, got {} (file ends early)",
                    self.pos,
                    bytes.len()
                )))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
