//! Opening models: read-only byte sources, content sniffing, strict GGUF and
//! safetensors header parsing, and the background sha256.
//!
//! Opening never fails because a file is malformed: a header that does not
//! parse becomes a [`ParseError`] on the file, and the format gate reports it.
//! Opening fails only when the model cannot be read at all (missing, a
//! symlink, a special file, an I/O error).

mod cores;
pub mod fuzzing;
mod gguf;
mod hash;
mod layout;
mod reader;
mod safetensors;
mod sidecars;
mod sigbus;
mod sniff;
mod source;

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

pub use layout::{FolderLayout, folder_layout, missing_shards, shards_inside};
pub use sidecars::{
    MAX_ORIGIN, MAX_SIGNATURE, ORIGIN_XATTR, Origin, OriginSource, SIDECAR_SUFFIXES, SidecarFile, Sidecars,
    sidecar_path,
};
pub use source::{ByteSource, FileBytes, ReadMode, Stream};

/// A container format, sniffed from content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Gguf,
    Safetensors,
    Pickle,
    PytorchZip,
    Zip,
    Numpy,
    Onnx,
    Json,
    Text,
    Unknown,
}

impl Format {
    /// Every format with its name in policies and reports: the one table on
    /// the host side. The names are the WIT `format` enum's cases, in order
    /// (`format_names_are_the_wit_enum_cases` checks it).
    pub const ALL: [(Format, &'static str); 10] = [
        (Format::Gguf, "gguf"),
        (Format::Safetensors, "safetensors"),
        (Format::Pickle, "pickle"),
        (Format::PytorchZip, "pytorch-zip"),
        (Format::Zip, "zip"),
        (Format::Numpy, "numpy"),
        (Format::Onnx, "onnx"),
        (Format::Json, "json"),
        (Format::Text, "text"),
        (Format::Unknown, "unknown"),
    ];

    /// The name used in policies and reports.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(f, _)| *f == self).map(|(_, n)| *n).expect("every format is in Format::ALL")
    }

    /// All names, for validating policies.
    pub const NAMES: [&'static str; 10] = {
        let mut names = [""; 10];
        let mut i = 0;
        while i < names.len() {
            names[i] = Self::ALL[i].1;
            i += 1;
        }
        names
    };
}

/// An element type (mirrors the WIT `dtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Dtype {
    F64,
    F32,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Boolean,
    F8e4m3,
    F8e5m2,
    Q40,
    Q41,
    Q50,
    Q51,
    Q80,
    Q81,
    Q2k,
    Q3k,
    Q4k,
    Q5k,
    Q6k,
    Q8k,
    Iq2xxs,
    Iq2xs,
    Iq3xxs,
    Iq1s,
    Iq4nl,
    Iq3s,
    Iq2s,
    Iq4xs,
    Iq1m,
    Tq10,
    Tq20,
    Mxfp4,
    Other,
}

/// One tensor as the header declares it; `offset` is absolute in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub dtype_name: String,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub length: u64,
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Text(String),
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Texts(Texts),
    Ints(Vec<i64>),
    Uints(Vec<u64>),
    Floats(Vec<f64>),
    Bools(Vec<bool>),
}

/// A list of strings stored back to back: a tokenizer's 262k tokens are two
/// allocations rather than 262k, which halves the time to parse its header.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Texts {
    bytes: String,
    /// Where each string ends in `bytes`.
    ends: Vec<usize>,
}

impl Texts {
    /// Strings read back to back (`ends` says where each one ends), checked
    /// as UTF-8 in one pass rather than one call per string. Each string must
    /// be valid on its own, so the one pass also needs every end on a
    /// character boundary (a character split across two strings is valid in
    /// the whole but in neither). Otherwise each string is checked alone and
    /// an invalid one is kept lossily.
    pub fn from_utf8_parts(raw: Vec<u8>, ends: Vec<usize>) -> Texts {
        // simdutf8 makes std's check with AVX2: gemma's mostly non-ASCII
        // 262k-token vocabulary took about 6 ms with std, under 1 with this.
        if simdutf8::basic::from_utf8(&raw).is_err() {
            return Texts::lossy(&raw, &ends);
        }
        // SAFETY: `raw` was just checked to be valid UTF-8.
        let bytes = unsafe { String::from_utf8_unchecked(raw) };
        if ends.iter().all(|&e| bytes.is_char_boundary(e)) {
            Texts { bytes, ends }
        } else {
            Texts::lossy(bytes.as_bytes(), &ends)
        }
    }

    fn lossy(raw: &[u8], ends: &[usize]) -> Texts {
        let mut t = Texts::default();
        let mut start = 0;
        for &end in ends {
            let b = raw.get(start..end).unwrap_or_default();
            t.push(&String::from_utf8_lossy(b));
            start = end;
        }
        t
    }

    pub fn push(&mut self, s: &str) {
        self.bytes.push_str(s);
        self.ends.push(self.bytes.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Every string's bytes, back to back.
    pub fn joined(&self) -> &str {
        &self.bytes
    }

    /// Where each string ends in [`Texts::joined`].
    pub fn ends(&self) -> &[usize] {
        &self.ends
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        // Each end falls on a char boundary: it is where a pushed &str ended.
        starts.zip(&self.ends).map(|(a, &b)| &self.bytes[a..b])
    }
}

/// A parsed container header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub version: Option<u32>,
    pub alignment: Option<u64>,
    /// Absolute offset of the first data byte.
    pub data_offset: Option<u64>,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
}

/// Why a container header did not parse: where, in which field, and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at offset {offset}, {field}: {message}")]
pub struct ParseError {
    pub offset: u64,
    pub field: String,
    pub message: String,
}

impl ParseError {
    pub fn new(offset: u64, field: &str, message: impl Into<String>) -> Self {
        ParseError { offset, field: field.to_string(), message: message.into() }
    }
}

/// Why a model could not be opened at all.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: is a symlink; airlock never follows links (pass the real path)")]
    Symlink { path: PathBuf },
    #[error("{path}: is not a regular file or folder ({kind})")]
    Special { path: PathBuf, kind: &'static str },
    #[error("{path}: folder holds more than {limit} files")]
    TooManyFiles { path: PathBuf, limit: usize },
    #[error("{path}: folder is nested deeper than {limit} levels")]
    TooDeep { path: PathBuf, limit: usize },
    #[error("{path}: folder holds more than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io { path: path.to_path_buf(), source }
}

fn kind_name(ft: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_dir() {
        "directory"
    } else {
        "regular file"
    }
}

/// One regular file of a model, opened read-only.
pub struct ModelFile {
    /// Path relative to the model root (the file name for a single file).
    pub rel_path: String,
    /// Where it was opened.
    pub path: PathBuf,
    pub format: Format,
    /// The parsed header, or why it did not parse. `None` for formats without a tensor table.
    pub header: Option<Result<Header, ParseError>>,
    source: Arc<ByteSource>,
    sha256: hash::HashCell,
    mtime: Option<SystemTime>,
    ino: u64,
}

impl ModelFile {
    fn open(path: &Path, rel_path: String, mode: ReadMode) -> Result<Self, OpenError> {
        // O_NOFOLLOW: a link swapped in after the caller's lstat is refused, not followed.
        // O_NONBLOCK: a FIFO swapped in cannot block the open.
        let file =
            fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(
                |e| {
                    if e.raw_os_error() == Some(libc::ELOOP) {
                        OpenError::Symlink { path: path.to_path_buf() }
                    } else {
                        OpenError::Io { path: path.to_path_buf(), source: e }
                    }
                },
            )?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.file_type().is_file() {
            return Err(OpenError::Special { path: path.to_path_buf(), kind: kind_name(&meta.file_type()) });
        }
        let source = Arc::new(ByteSource::new(file, meta.len(), mode).map_err(io_err(path))?);
        let sha256 = hash::HashCell::start(source.clone());
        let format = sniff::sniff(&source).map_err(io_err(path))?;
        let header = match format {
            Format::Gguf => Some(gguf::parse(&source)),
            Format::Safetensors => Some(safetensors::parse(&source)),
            _ => None,
        };
        Ok(ModelFile {
            rel_path,
            path: path.to_path_buf(),
            format,
            header,
            source,
            sha256,
            mtime: meta.modified().ok(),
            ino: meta.ino(),
        })
    }

    pub fn size(&self) -> u64 {
        self.source.size()
    }

    /// The parsed header, if it parsed.
    pub fn parsed(&self) -> Option<&Header> {
        self.header.as_ref().and_then(|h| h.as_ref().ok())
    }

    /// Why the header did not parse, if it did not.
    pub fn parse_error(&self) -> Option<&ParseError> {
        self.header.as_ref().and_then(|h| h.as_ref().err())
    }

    /// Registers a reader that streams through the file (see [`ByteSource::stream`]).
    pub fn stream(&self) -> Option<Stream> {
        self.source.stream()
    }

    /// Lets the file's map be given back behind its registered readers.
    pub fn release_behind_streams(&self) {
        self.source.release_behind_streams();
    }

    /// Up to `len` bytes at `offset`, zero-copy when the file is mapped.
    pub fn read_bytes(&self, offset: u64, len: usize) -> std::io::Result<bytes::Bytes> {
        self.source.read_bytes(offset, len)
    }

    /// The lowercase hex sha256 of the whole file (computed once, in the background).
    pub fn sha256(&self) -> Result<String, String> {
        self.sha256.get()
    }

    /// The lowercase hex sha256 of one byte range (a header region, a tensor).
    pub fn sha256_range(&self, offset: u64, len: u64) -> Result<String, String> {
        hash::hash_range(&self.source, offset, len)
    }

    /// Fails if the file changed since it was opened (size, mtime or identity).
    pub fn check_unchanged(&self) -> Result<(), String> {
        self.source.intact().map_err(|e| format!("{}: {e}", self.path.display()))?;
        let meta = self.source.file().metadata().map_err(|e| format!("{}: cannot stat: {e}", self.path.display()))?;
        if meta.len() != self.size() || meta.modified().ok() != self.mtime || meta.ino() != self.ino {
            return Err(format!(
                "{}: the file changed during the scan (size {} → {})",
                self.path.display(),
                self.size(),
                meta.len()
            ));
        }
        Ok(())
    }
}

/// Something near the model that the host saw and did not follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Surrounding {
    pub kind: &'static str,
    pub path: String,
    pub detail: String,
}

/// A model: one file, or a folder of files.
pub struct Model {
    pub name: String,
    pub kind: ModelKind,
    pub root: PathBuf,
    pub files: Vec<Arc<ModelFile>>,
    pub surroundings: Vec<Surrounding>,
    /// Its origin and signatures, read when it was opened.
    pub sidecars: Sidecars,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    File,
    Folder,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::File => "file",
            ModelKind::Folder => "folder",
        }
    }
}

/// Limits on walking a folder model (the policy's `folders` section).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FolderLimits {
    /// Regular files, at most.
    #[serde(default = "default_max_files")]
    pub max_files: usize,
    /// Nested folders below the model's root, at most.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// All files together, at most, in GiB.
    #[serde(default = "default_max_total_gib")]
    pub max_total_gib: u64,
}

fn default_max_files() -> usize {
    10_000
}
fn default_max_depth() -> usize {
    32
}
fn default_max_total_gib() -> u64 {
    512
}

impl Default for FolderLimits {
    fn default() -> Self {
        FolderLimits {
            max_files: default_max_files(),
            max_depth: default_max_depth(),
            max_total_gib: default_max_total_gib(),
        }
    }
}

impl Model {
    /// Opens a single file or a folder, never following links.
    pub fn open(path: &Path, mode: ReadMode, limits: &FolderLimits) -> Result<Model, OpenError> {
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        let name =
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(OpenError::Symlink { path: path.to_path_buf() });
        }
        if ft.is_file() {
            let file = ModelFile::open(path, name.clone(), mode)?;
            return Ok(Model {
                name,
                kind: ModelKind::File,
                root: path.to_path_buf(),
                files: vec![Arc::new(file)],
                surroundings: Vec::new(),
                sidecars: Sidecars::read(path, ModelKind::File),
            });
        }
        if !ft.is_dir() {
            return Err(OpenError::Special { path: path.to_path_buf(), kind: kind_name(&ft) });
        }
        let mut files = Vec::new();
        let mut surroundings = Vec::new();
        let mut total = 0u64;
        walk(path, path, 0, mode, limits, &mut total, &mut files, &mut surroundings)?;
        files.sort_by(|a: &Arc<ModelFile>, b| a.rel_path.cmp(&b.rel_path));
        let sidecars = Sidecars::read(path, ModelKind::Folder);
        Ok(Model { name, kind: ModelKind::Folder, root: path.to_path_buf(), files, surroundings, sidecars })
    }

    /// Fails if any file changed since it was opened.
    pub fn check_unchanged(&self) -> Result<(), String> {
        self.files.iter().try_for_each(|f| f.check_unchanged())
    }
}

#[allow(clippy::too_many_arguments)] // one recursive walk; a struct for its state would only rename them
fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    mode: ReadMode,
    limits: &FolderLimits,
    total: &mut u64,
    files: &mut Vec<Arc<ModelFile>>,
    surroundings: &mut Vec<Surrounding>,
) -> Result<(), OpenError> {
    if depth > limits.max_depth {
        return Err(OpenError::TooDeep { path: root.to_path_buf(), limit: limits.max_depth });
    }
    let mut entries: Vec<_> = fs::read_dir(dir).map_err(io_err(dir))?.collect::<Result<_, _>>().map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default();
            surroundings.push(Surrounding { kind: "symlink", path: rel, detail: target });
        } else if ft.is_dir() {
            walk(root, &path, depth + 1, mode, limits, total, files, surroundings)?;
        } else if ft.is_file() {
            if files.len() >= limits.max_files {
                return Err(OpenError::TooManyFiles { path: root.to_path_buf(), limit: limits.max_files });
            }
            *total = total.saturating_add(meta.len());
            let max_bytes = limits.max_total_gib.saturating_mul(1 << 30);
            if *total > max_bytes {
                return Err(OpenError::TooLarge { path: root.to_path_buf(), limit: max_bytes });
            }
            if meta.nlink() > 1 {
                surroundings.push(Surrounding {
                    kind: "hardlink",
                    path: rel.clone(),
                    detail: format!("{} links", meta.nlink()),
                });
            }
            files.push(Arc::new(ModelFile::open(&path, rel, mode)?));
        } else {
            surroundings.push(Surrounding { kind: "special-file", path: rel, detail: kind_name(&ft).into() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod texts_tests {
    use super::Texts;

    fn parts(strings: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let (mut raw, mut ends) = (Vec::new(), Vec::new());
        for s in strings {
            raw.extend_from_slice(s);
            ends.push(raw.len());
        }
        (raw, ends)
    }

    #[test]
    fn valid_strings_are_kept_and_invalid_ones_lossily() {
        let (raw, ends) = parts(&[b"a", b"", "h\u{e9}llo".as_bytes(), "\u{2581}the".as_bytes()]);
        let t = Texts::from_utf8_parts(raw, ends);
        assert_eq!(t.iter().collect::<Vec<_>>(), ["a", "", "h\u{e9}llo", "\u{2581}the"]);

        let (raw, ends) = parts(&[b"ok", b"bad\xff", b"fine"]);
        let t = Texts::from_utf8_parts(raw, ends);
        assert_eq!(t.iter().collect::<Vec<_>>(), ["ok", "bad\u{fffd}", "fine"]);
    }

    /// "é" is 0xC3 0xA9: split over two strings, the whole is valid UTF-8 but
    /// neither string is.
    #[test]
    fn a_character_split_across_two_strings_is_invalid_in_both() {
        let (raw, ends) = parts(&[b"x\xc3", b"\xa9y"]);
        assert!(std::str::from_utf8(&raw).is_ok());
        let t = Texts::from_utf8_parts(raw, ends);
        assert_eq!(t.iter().collect::<Vec<_>>(), ["x\u{fffd}", "\u{fffd}y"]);
    }
}

#[cfg(test)]
mod format_tests {
    use super::Format;

    /// The case names of the WIT `format` enum, the contract plugins see.
    fn wit_format_cases() -> Vec<String> {
        let wit = include_str!("../../wit/stage.wit");
        let body = wit.split("enum format {").nth(1).expect("the WIT has `enum format`");
        let body = &body[..body.find('}').expect("the enum closes")];
        body.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .map(|l| l.trim_end_matches(',').to_string())
            .collect()
    }

    #[test]
    fn format_names_are_the_wit_enum_cases() {
        assert_eq!(Format::NAMES.to_vec(), wit_format_cases());
        for (format, name) in Format::ALL {
            assert_eq!(format.name(), name);
        }
    }
}
