//! A sequential, buffered reader over a [`ByteSource`] for header parsing.
//! Every read is bounded by the bytes left in the file, and every failure
//! names the offset and the field being read.

use super::ParseError;
use super::source::ByteSource;

const BUF: usize = 1 << 20;

pub struct Reader<'a> {
    src: &'a ByteSource,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a ByteSource, pos: u64) -> Self {
        Reader { src, pos, buf: Vec::new(), buf_start: pos }
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn remaining(&self) -> u64 {
        self.src.size().saturating_sub(self.pos)
    }

    /// Takes `n` bytes, or fails with a parse error naming `field`.
    pub fn take(&mut self, n: u64, field: &str) -> Result<Vec<u8>, ParseError> {
        if n > self.remaining() {
            return Err(ParseError::new(
                self.pos,
                field,
                format!("needs {n} bytes but only {} remain in the file", self.remaining()),
            ));
        }
        let n = n as usize;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let in_buf = self.pos >= self.buf_start && self.pos < self.buf_start + self.buf.len() as u64;
            if !in_buf {
                self.fill(field)?;
            }
            let at = (self.pos - self.buf_start) as usize;
            let k = (n - out.len()).min(self.buf.len() - at);
            out.extend_from_slice(&self.buf[at..at + k]);
            self.pos += k as u64;
        }
        Ok(out)
    }

    fn fill(&mut self, field: &str) -> Result<(), ParseError> {
        let want = self.remaining().min(BUF as u64) as usize;
        self.buf.resize(want, 0);
        let n = self
            .src
            .read_at(self.pos, &mut self.buf)
            .map_err(|e| ParseError::new(self.pos, field, format!("read failed: {e}")))?;
        if n == 0 {
            return Err(ParseError::new(self.pos, field, "unexpected end of file"));
        }
        self.buf.truncate(n);
        self.buf_start = self.pos;
        Ok(())
    }

    /// Passes the next `n` bytes to `f`: a slice of the read buffer when they
    /// lie in it, so strings and numeric arrays are read without an allocation each.
    pub fn with_bytes<T>(&mut self, n: u64, field: &str, f: impl FnOnce(&[u8]) -> T) -> Result<T, ParseError> {
        if self.pos >= self.buf_start {
            let at = (self.pos - self.buf_start) as usize;
            let avail = self.buf.len().saturating_sub(at);
            if n <= avail as u64 {
                let n = n as usize;
                self.pos += n as u64;
                return Ok(f(&self.buf[at..at + n]));
            }
        }
        let v = self.take(n, field)?;
        Ok(f(&v))
    }

    /// Takes `N` bytes into an array: no allocation, so the millions of
    /// integers in a tokenizer's metadata cost only a copy each.
    pub fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], ParseError> {
        let at = self.pos.wrapping_sub(self.buf_start) as usize;
        if self.pos >= self.buf_start && at + N <= self.buf.len() {
            self.pos += N as u64;
            return Ok(self.buf[at..at + N].try_into().expect("N bytes"));
        }
        let v = self.take(N as u64, field)?;
        Ok(v.try_into().expect("take returns exactly N bytes"))
    }

    pub fn u8(&mut self, field: &str) -> Result<u8, ParseError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub fn u16(&mut self, field: &str) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
}
