//! Entry points for the fuzz targets in `fuzz/` and their regression tests:
//! each takes untrusted bytes the way a model file delivers them and must
//! return (an error is fine) without a panic, a hang or an unbounded
//! allocation.

use std::io::Write;

use super::{ByteSource, ReadMode};

/// The bytes as an open file, the only way the parsers read: an anonymous
/// in-memory file, so no fuzz iteration touches the disk.
fn source(bytes: &[u8], mode: ReadMode) -> ByteSource {
    // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"airlock-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(bytes).expect("writing to a memfd");
    ByteSource::new(file, bytes.len() as u64, mode).expect("wrapping a memfd")
}

/// The strict GGUF parser, over a map and over pread (the two read paths).
pub fn gguf(bytes: &[u8]) -> Result<(), String> {
    let a = super::gguf::parse(&source(bytes, ReadMode::Mmap)).map(|_| ()).map_err(|e| e.to_string());
    let b = super::gguf::parse(&source(bytes, ReadMode::Pread)).map(|_| ()).map_err(|e| e.to_string());
    assert_eq!(a, b, "the map and pread read paths disagree");
    a
}

/// The strict safetensors parser, over a map and over pread.
pub fn safetensors(bytes: &[u8]) -> Result<(), String> {
    let a = super::safetensors::parse(&source(bytes, ReadMode::Mmap)).map(|_| ()).map_err(|e| e.to_string());
    let b = super::safetensors::parse(&source(bytes, ReadMode::Pread)).map(|_| ()).map_err(|e| e.to_string());
    assert_eq!(a, b, "the map and pread read paths disagree");
    a
}

/// The content sniffer that names a file's format before any parser runs.
pub fn sniff(bytes: &[u8]) -> Result<&'static str, String> {
    super::sniff::sniff(&source(bytes, ReadMode::Pread)).map(|f| f.name()).map_err(|e| e.to_string())
}

/// The watcher's reading of a shard index (which shards to wait for).
pub fn shard_index(bytes: &[u8]) -> Vec<String> {
    super::shards_inside(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs the fuzzers found or that the parsers must refuse cheaply:
    /// every file in `fuzz/regressions/TARGET/` is replayed here.
    fn regressions(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries.map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect()
    }

    fn gguf_with_counts(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn lying_gguf_lengths_are_refused_without_allocating_them() {
        let huge = 1u64 << 62;
        let mut key_len = huge.to_le_bytes().to_vec();
        key_len.extend_from_slice(b"k");
        let cases = [
            gguf_with_counts(huge, 0, &[]),
            gguf_with_counts(0, huge, &[]),
            gguf_with_counts(0, 1, &key_len),
            gguf_with_counts(0, 0, &[]),
            b"GGUF".to_vec(),
        ];
        for (i, c) in cases.iter().chain(regressions("gguf").iter()).enumerate() {
            let _ = sniff(c);
            if i < 3 {
                let e = gguf(c).unwrap_err();
                assert!(!e.is_empty());
            } else {
                let _ = gguf(c);
            }
        }
    }

    #[test]
    fn lying_safetensors_lengths_are_refused_without_allocating_them() {
        let mut huge = (1u64 << 62).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let header = br#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#;
        let mut shape = (header.len() as u64).to_le_bytes().to_vec();
        shape.extend_from_slice(header);
        shape.extend_from_slice(&[0; 8]);
        for c in [huge, shape].iter() {
            assert!(safetensors(c).is_err());
        }
        for c in regressions("safetensors") {
            let _ = safetensors(&c);
        }
    }

    #[test]
    fn shard_indexes_name_only_paths_inside_the_folder() {
        let index = br#"{"weight_map":{"a":"x.safetensors","b":"../y","c":"/etc/passwd","d":"sub/z","e":"x.safetensors","f":""}}"#;
        assert_eq!(shard_index(index), ["x.safetensors", "sub/z"]);
        for c in regressions("folder_json") {
            for s in shard_index(&c) {
                assert!(!s.starts_with('/') && !s.split('/').any(|c| c == ".."), "{s:?}");
            }
        }
    }
}
