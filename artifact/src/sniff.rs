//! Format sniffing from content, never from the file name.

use super::Format;
use super::source::ByteSource;

/// How much of the head and tail the sniffer reads.
const HEAD: usize = 64 << 10;
const TAIL: u64 = 1 << 20;
/// JSON is only recognised for files small enough to parse whole.
const MAX_JSON: u64 = 16 << 20;

pub fn sniff(src: &ByteSource) -> std::io::Result<Format> {
    let size = src.size();
    let mut head = vec![0u8; HEAD.min(size as usize)];
    let n = src.read_at(0, &mut head)?;
    head.truncate(n);

    if head.starts_with(b"GGUF") {
        return Ok(Format::Gguf);
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        // PyTorch's zip checkpoints hold `<name>/data.pkl`; the central directory is at the tail.
        let tail_start = size.saturating_sub(TAIL);
        let tail = src.read_exact_at(tail_start, (size - tail_start) as usize)?;
        let has_pkl = |b: &[u8]| b.windows(8).any(|w| w == b"data.pkl");
        return Ok(if has_pkl(&tail) || has_pkl(&head) { Format::PytorchZip } else { Format::Zip });
    }
    if head.starts_with(b"\x93NUMPY") {
        return Ok(Format::Numpy);
    }
    // safetensors: a u64 length below 2^32 (so never ASCII text), then JSON
    // whose first non-blank byte is '{' (the parser insists on it at byte 8
    // and names the offender when it is not there).
    if head.len() >= 9
        && head[4..8] == [0, 0, 0, 0]
        && head[8..].iter().take(64).find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
    {
        return Ok(Format::Safetensors);
    }
    // Pickle protocol 2+ starts with PROTO. Protocol 0/1 pickles have no
    // magic; they sniff as text or unknown (never allowed by default), and
    // the format gate walks the opcodes of every file's head to catch them.
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(Format::Pickle);
    }
    let first = head.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{' | b'[')) && size <= MAX_JSON {
        let all = src.read_exact_at(0, size as usize)?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(&all).is_ok() {
            return Ok(Format::Json);
        }
    }
    if !head.is_empty() && !head.contains(&0) {
        let valid = match std::str::from_utf8(&head) {
            Ok(_) => true,
            // A multi-byte character cut at the end of the sniffed head is fine.
            Err(e) => e.error_len().is_none() && head.len() == HEAD,
        };
        if valid {
            return Ok(Format::Text);
        }
    }
    Ok(Format::Unknown)
}
