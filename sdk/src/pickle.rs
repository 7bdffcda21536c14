//! A pickle opcode walker: decodes the opcode stream without executing it.
//!
//! Used to tell whether bytes form a pickle (format gate polyglot checks) and,
//! by scanners, to see which globals a pickle would import.

/// How an opcode's argument is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgKind {
    None,
    Fixed(usize),
    /// Text up to and including a newline.
    Line,
    /// Two newline-terminated lines (GLOBAL, INST).
    TwoLines,
    /// A little-endian length of this many bytes, then that many bytes.
    Counted(usize),
}

fn arg_kind(op: u8) -> Option<ArgKind> {
    use ArgKind::*;
    Some(match op {
        b'(' | b'.' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'R' | b'a' | b'b' | b'd' | b'}' | b'e' | b'l' | b']'
        | b'o' | b's' | b't' | b')' | b'u' => None,
        0x81 | 0x85..=0x89 | 0x8f..=0x94 | 0x97 | 0x98 => None,
        b'F' | b'I' | b'L' | b'P' | b'S' | b'V' | b'g' | b'p' => Line,
        b'c' | b'i' => TwoLines,
        b'J' | b'j' | b'r' => Fixed(4),
        b'K' | b'h' | b'q' | 0x80 | 0x82 => Fixed(1),
        b'M' | 0x83 => Fixed(2),
        0x84 => Fixed(4),
        b'G' | 0x95 => Fixed(8),
        b'T' | b'X' | b'B' | 0x8b => Counted(4),
        b'U' | b'C' | 0x8a | 0x8c => Counted(1),
        0x8d | 0x8e | 0x96 => Counted(8),
        _ => return Option::None,
    })
}

/// Opcodes that import or call: what makes a pickle able to run code.
pub fn is_code_opcode(op: u8) -> bool {
    matches!(op, b'c' | b'i' | b'R' | b'o' | 0x81 | 0x92 | 0x93 | b'b')
}

/// One decoded opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op<'a> {
    /// Offset of the opcode byte.
    pub offset: usize,
    /// The opcode byte.
    pub code: u8,
    /// The raw argument bytes (without the length prefix for counted args).
    pub arg: &'a [u8],
}

/// Why the bytes stopped being a pickle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A byte that is no pickle opcode.
    BadOpcode { offset: usize, byte: u8 },
    /// The stream ended inside an opcode or before STOP.
    Truncated { offset: usize },
}

/// Walks opcodes from the start of `bytes` up to and including STOP.
pub struct Ops<'a> {
    bytes: &'a [u8],
    pos: usize,
    done: bool,
}

/// Walks the pickle opcodes in `bytes`.
pub fn ops(bytes: &[u8]) -> Ops<'_> {
    Ops { bytes, pos: 0, done: false }
}

impl<'a> Iterator for Ops<'a> {
    type Item = Result<Op<'a>, WalkError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let offset = self.pos;
        let Some(&code) = self.bytes.get(offset) else {
            self.done = true;
            return Some(Err(WalkError::Truncated { offset }));
        };
        let Some(kind) = arg_kind(code) else {
            self.done = true;
            return Some(Err(WalkError::BadOpcode { offset, byte: code }));
        };
        let rest = &self.bytes[offset + 1..];
        let line = |from: usize| rest[from..].iter().position(|&b| b == b'\n').map(|i| from + i + 1);
        let (arg, used) = match kind {
            ArgKind::None => (Some(&rest[..0]), 0),
            ArgKind::Fixed(n) => (rest.get(..n), n),
            ArgKind::Line => match line(0) {
                Some(end) => (Some(&rest[..end - 1]), end),
                None => (None, 0),
            },
            ArgKind::TwoLines => match line(0).and_then(line) {
                Some(end) => (Some(&rest[..end - 1]), end),
                None => (None, 0),
            },
            ArgKind::Counted(w) => match rest.get(..w) {
                Some(len_bytes) => {
                    let mut le = [0u8; 8];
                    le[..w].copy_from_slice(len_bytes);
                    let len = u64::from_le_bytes(le);
                    match usize::try_from(len).ok().and_then(|l| l.checked_add(w)) {
                        Some(end) if end <= rest.len() => (Some(&rest[w..end]), end),
                        _ => (None, 0),
                    }
                }
                None => (None, 0),
            },
        };
        let Some(arg) = arg else {
            self.done = true;
            return Some(Err(WalkError::Truncated { offset }));
        };
        self.pos = offset + 1 + used;
        if code == b'.' {
            self.done = true;
        }
        Some(Ok(Op { offset, code, arg }))
    }
}

/// What a complete pickle stream at the start of some bytes looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    /// Offset just past STOP.
    pub end: usize,
    /// Opcodes that import or call (GLOBAL, REDUCE, ...), with their offsets.
    pub code_ops: Vec<(usize, u8)>,
}

/// If `bytes` start with a complete pickle stream (opcodes up to STOP), describes it.
pub fn stream_at_start(bytes: &[u8]) -> Option<Stream> {
    let mut code_ops = Vec::new();
    for op in ops(bytes) {
        let op = op.ok()?;
        if is_code_opcode(op.code) {
            code_ops.push((op.offset, op.code));
        }
        if op.code == b'.' {
            return Some(Stream { end: op.offset + 1, code_ops });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_a_protocol_2_global_reduce() {
        // pickle.dumps of os.system("id") with protocol 2, written by hand.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.";
        let s = stream_at_start(p).expect("a complete stream");
        assert_eq!(s.end, p.len());
        assert_eq!(s.code_ops.iter().map(|o| o.1).collect::<Vec<_>>(), vec![b'c', b'R']);
    }

    #[test]
    fn gguf_magic_is_not_a_pickle() {
        assert!(stream_at_start(b"GGUF\x03\x00\x00\x00\x01\x00\x00\x00").is_none());
    }

    #[test]
    fn truncated_counted_argument() {
        assert_eq!(ops(b"X\xff\xff\xff\x7f").next(), Some(Err(WalkError::Truncated { offset: 0 })));
    }
}
