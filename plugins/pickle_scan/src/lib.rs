//! Stage 5 (static scan), pickle scan: what a pickle would import, found by
//! walking its opcodes without executing them (the checks modelscan and
//! picklescan make, written anew).
//!
//! It reads raw pickles, every pickle inside a zip checkpoint (PyTorch's
//! `archive/data.pkl`, stored or deflated), a pickle or zip appended after
//! the declared end of a GGUF or safetensors file, and a pickle inside the
//! wrappers a loader opens for it (gzip, bzip2, xz, 7z, tar and zip, nested
//! up to `MAX_WRAPPERS` deep, at most `MAX_PICKLE` bytes unpacked per member
//! and `MAX_UNPACKED` in all, so a decompression bomb is refused, named). GLOBAL, INST and
//! STACK_GLOBAL imports are resolved (STACK_GLOBAL through the strings and
//! memo entries pushed before it), protocols 0 to 5.
//!
//! Pickles are denied at the format gate already; this scan is what lets the
//! rejection report say *why* a file is dangerous, and it guards the `.bin`
//! components of folder models.
//!
//! A pickle need not announce itself: a protocol-0 or 1 stream has no PROTO
//! opcode, and protocol 0 is printable ASCII, so it sniffs as text. Every
//! file that is not a tensor container (text, JSON, unknown bytes) is walked
//! from its first byte too, and a stream that imports a Python callable is
//! reported with its offset, even when it breaks off before STOP (the
//! nullifAI trick: the loader runs the payload before it fails).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use airlock_sdk::pickle::{WalkError, ops};
use airlock_sdk::{File, Finding, Format, Model, Report, Severity, Stage, StageInfo};

/// (module, name or "*", severity, why). First match wins.
const RULES: &[(&str, &str, Severity, &str)] = &[
    ("builtins", "eval", Severity::Critical, "evaluates Python code"),
    ("builtins", "exec", Severity::Critical, "executes Python code"),
    ("builtins", "compile", Severity::Critical, "compiles Python code"),
    ("builtins", "open", Severity::Critical, "opens files"),
    ("builtins", "getattr", Severity::Critical, "reaches any attribute (gadget chains)"),
    ("builtins", "__import__", Severity::Critical, "imports any module"),
    ("builtins", "breakpoint", Severity::Critical, "starts a debugger"),
    ("__builtin__", "*", Severity::Critical, "Python 2 builtins (eval, exec, open, ...)"),
    ("os", "*", Severity::Critical, "runs commands or touches files"),
    ("posix", "*", Severity::Critical, "runs commands or touches files"),
    ("nt", "*", Severity::Critical, "runs commands or touches files"),
    ("subprocess", "*", Severity::Critical, "runs commands"),
    ("socket", "*", Severity::Critical, "opens network connections"),
    ("runpy", "*", Severity::Critical, "runs Python modules"),
    ("pty", "*", Severity::Critical, "spawns a shell"),
    ("shutil", "*", Severity::Critical, "copies or deletes files"),
    ("sys", "*", Severity::Critical, "reaches the interpreter"),
    ("pickle", "*", Severity::Critical, "unpickles nested data"),
    ("_pickle", "*", Severity::Critical, "unpickles nested data"),
    ("marshal", "*", Severity::Critical, "loads code objects"),
    ("webbrowser", "*", Severity::Critical, "opens URLs"),
    ("requests", "*", Severity::Critical, "makes network requests"),
    ("urllib", "*", Severity::Critical, "makes network requests"),
    ("httplib", "*", Severity::Critical, "makes network requests"),
    ("http.client", "*", Severity::Critical, "makes network requests"),
    ("pip", "*", Severity::Critical, "installs packages"),
    ("ctypes", "*", Severity::Critical, "calls native code"),
    ("importlib", "*", Severity::Critical, "imports any module"),
    ("code", "*", Severity::Critical, "runs an interpreter"),
    ("types", "CodeType", Severity::Critical, "builds code objects"),
    ("types", "FunctionType", Severity::Critical, "builds functions"),
    ("functools", "partial", Severity::High, "binds arguments to any callable (gadget chains)"),
    ("operator", "attrgetter", Severity::High, "reaches any attribute (gadget chains)"),
    ("operator", "methodcaller", Severity::High, "calls any method (gadget chains)"),
    ("operator", "itemgetter", Severity::Medium, "reaches items (gadget chains)"),
    ("numpy.testing._private.utils", "runstring", Severity::Critical, "executes Python code"),
    ("torch.hub", "*", Severity::Critical, "downloads and runs code"),
    ("torch._dynamo", "*", Severity::High, "compiles code"),
];

/// Imports a plain PyTorch or NumPy checkpoint makes.
const SAFE: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "*"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "float16"),
    ("torch", "bfloat16"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("builtins", "set"),
    ("builtins", "slice"),
    ("builtins", "tuple"),
    ("builtins", "list"),
    ("builtins", "dict"),
];

fn matches(rule: (&str, &str), module: &str, name: &str) -> bool {
    let (m, n) = rule;
    (module == m || module.starts_with(&format!("{m}."))) && (n == "*" || n == name)
}

fn judge(module: &str, name: &str) -> Option<(Severity, String)> {
    if let Some(&(_, _, sev, why)) = RULES.iter().find(|r| matches((r.0, r.1), module, name)) {
        return Some((sev, why.to_string()));
    }
    if SAFE.iter().any(|&r| matches(r, module, name)) {
        return None;
    }
    Some((Severity::Low, "not on the list of imports a plain checkpoint makes".into()))
}

/// The memo slot of a PUT/GET opcode: one byte (BINPUT, BINGET), four bytes
/// (LONG_BINPUT, LONG_BINGET) or decimal text (PUT, GET).
fn memo_index(op: &airlock_sdk::pickle::Op) -> u64 {
    match op.arg {
        [b] if matches!(op.code, b'q' | b'h') => u64::from(*b),
        [a, b, c, d] if matches!(op.code, b'r' | b'j') => u64::from(u32::from_le_bytes([*a, *b, *c, *d])),
        text => String::from_utf8_lossy(text).trim().parse().unwrap_or(u64::MAX),
    }
}

/// One import a pickle would perform.
struct Import {
    module: String,
    name: String,
    offset: usize,
}

/// Resolves the imports of one pickle stream; stops at STOP or at the first
/// byte that is not an opcode. `Err` carries the imports found before a
/// malformed stream, and why it ended.
/// How many imports the walker finds, and whether it stopped early; the entry
/// point of the fuzz target in `fuzz/` (native, outside the sandbox).
pub fn count_imports(bytes: &[u8]) -> (usize, bool) {
    let (found, stopped) = imports(bytes);
    (found.len(), stopped.is_some())
}

fn imports(bytes: &[u8]) -> (Vec<Import>, Option<String>) {
    let mut found = Vec::new();
    let mut strings: Vec<Option<String>> = Vec::new();
    let mut memo: HashMap<u64, String> = HashMap::new();
    let mut last: Option<String> = None;
    let text = |arg: &[u8]| String::from_utf8_lossy(arg).into_owned();
    for op in ops(bytes) {
        let op = match op {
            Ok(op) => op,
            Err(WalkError::BadOpcode { offset, byte }) => {
                return (found, Some(format!("byte 0x{byte:02x} at offset {offset} is not a pickle opcode")));
            }
            Err(WalkError::Truncated { offset }) => return (found, Some(format!("truncated at offset {offset}"))),
        };
        let push = |s: Option<String>, strings: &mut Vec<Option<String>>| {
            strings.push(s.clone());
            s
        };
        last = match op.code {
            // GLOBAL and INST: "module\nname".
            b'c' | b'i' => {
                let s = text(op.arg);
                let (m, n) = s.split_once('\n').unwrap_or((&s, ""));
                found.push(Import { module: m.to_string(), name: n.to_string(), offset: op.offset });
                None
            }
            // STACK_GLOBAL: module and name are the two strings pushed last.
            0x93 => {
                let n = strings.pop().flatten();
                let m = strings.pop().flatten();
                found.push(Import {
                    module: m.unwrap_or_else(|| "<computed>".into()),
                    name: n.unwrap_or_else(|| "<computed>".into()),
                    offset: op.offset,
                });
                None
            }
            // String pushes: SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, UNICODE, STRING forms.
            0x8c | b'X' | 0x8d | b'V' | b'U' | b'T' => push(Some(text(op.arg)), &mut strings),
            b'S' => push(Some(text(op.arg).trim_matches(|c| c == '\'' || c == '"').to_string()), &mut strings),
            // Memo: store what was pushed last, fetch it back later.
            0x94 => {
                if let Some(s) = &last {
                    memo.insert(memo.len() as u64, s.clone());
                }
                last
            }
            b'q' | b'r' | b'p' => {
                if let Some(s) = &last {
                    memo.insert(memo_index(&op), s.clone());
                }
                last
            }
            b'h' | b'j' | b'g' => push(memo.get(&memo_index(&op)).cloned(), &mut strings),
            0x80 | 0x95 | b'.' => last,
            _ => {
                strings.push(None);
                None
            }
        };
    }
    (found, None)
}

/// Where a pickle came from, for findings.
struct Origin {
    location: String,
    /// Offset of the pickle's first byte in the model file, when known (raw or appended).
    base: Option<u64>,
}

fn scan_pickle(bytes: &[u8], origin: &Origin, findings: &mut Vec<Finding>) -> usize {
    let (found, broken) = imports(bytes);
    for imp in &found {
        if let Some((sev, why)) = judge(&imp.module, &imp.name) {
            let rule = if sev == Severity::Low { "pickle.unknown-import" } else { "pickle.dangerous-import" };
            let mut f = Finding::new(
                rule,
                sev,
                format!("imports {}.{} ({why}) at pickle offset {}", imp.module, imp.name, imp.offset),
            )
            .at(origin.location.clone());
            if let Some(b) = origin.base {
                f = f.offset(b + imp.offset as u64);
            }
            findings.push(f);
        }
    }
    if let Some(why) = broken {
        findings.push(
            Finding::new("pickle.malformed", Severity::Medium, format!("the pickle stream is malformed: {why}"))
                .at(origin.location.clone()),
        );
    }
    found.len()
}

/// `Read + Seek` over a byte range of a model file, through the host's read().
struct RangeReader<'a> {
    file: &'a File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.len.saturating_sub(self.pos)).min(buf.len() as u64).min(1 << 20) as u32;
        if want == 0 {
            return Ok(0);
        }
        let bytes = self.file.read(self.start + self.pos, want).map_err(std::io::Error::other)?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.pos += bytes.len() as u64;
        Ok(bytes.len())
    }
}

impl Seek for RangeReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let next = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = next.ok_or_else(|| std::io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

/// Largest pickle read into memory, raw or decompressed.
const MAX_PICKLE: u64 = 64 << 20;

fn read_range(file: &File, start: u64, len: u64) -> Result<Vec<u8>, String> {
    if len > MAX_PICKLE {
        return Err(format!("{len} bytes of pickle at offset {start}, above the {MAX_PICKLE}-byte limit"));
    }
    let mut out = Vec::with_capacity(len as usize);
    for piece in airlock_sdk::ChunkReader::range(file, start, len) {
        out.extend(piece?.1);
    }
    Ok(out)
}

fn scan_zip(file: &File, start: u64, len: u64, origin: &Origin, findings: &mut Vec<Finding>) -> Result<usize, String> {
    let reader = RangeReader { file, start, len, pos: 0 };
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| format!("{}: not a readable zip: {e}", origin.location))?;
    let mut pickles = 0;
    let mut budget = MAX_UNPACKED;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("{}: zip entry {i}: {e}", origin.location))?;
        let name = entry.name().map(|n| n.to_string()).unwrap_or_else(|_| format!("entry {i}"));
        let looks_pickled = name.ends_with(".pkl") || name.ends_with("data.pkl") || name.ends_with(".pickle");
        // Any entry starting with a PROTO opcode is a pickle too, whatever its
        // name. One in a wrapper (`weights.bin.xz`) is opened when its name
        // says so too: a checkpoint's raw storages (`archive/data/0`) can
        // start with any bytes, and no loader opens them as archives.
        let mut head = Vec::new();
        entry
            .by_ref()
            .take(512)
            .read_to_end(&mut head)
            .map_err(|e| format!("{}: entry {name}: {e}", origin.location))?;
        let proto = head.len() >= 2 && head[0] == 0x80 && head[1] <= 5;
        let lower = name.to_ascii_lowercase();
        let wrapped = wrapper_of(&head).is_some() && WRAPPER_SUFFIXES.iter().any(|s| lower.ends_with(s));
        if !(looks_pickled || proto || wrapped) {
            continue;
        }
        if entry.size() > MAX_PICKLE {
            return Err(format!(
                "{}: entry {name} is {} bytes, above the {MAX_PICKLE}-byte limit",
                origin.location,
                entry.size()
            ));
        }
        let mut bytes = head;
        entry
            .by_ref()
            .take(MAX_PICKLE)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: entry {name}: {e}", origin.location))?;
        let location = format!("{} (zip entry {name})", origin.location);
        if wrapped {
            pickles += scan_unpacked(&bytes, location, 0, &mut budget, findings)?;
        } else {
            scan_pickle(&bytes, &Origin { location, base: None }, findings);
            pickles += 1;
        }
    }
    Ok(pickles)
}

fn scan_file(file: &File, findings: &mut Vec<Finding>) -> Result<usize, String> {
    let path = file.path();
    let origin = |location: String, base: Option<u64>| Origin { location, base };
    match file.format() {
        Format::Pickle => {
            let bytes = read_range(file, 0, file.size())?;
            scan_pickle(&bytes, &origin(path.clone(), Some(0)), findings);
            Ok(1)
        }
        Format::PytorchZip | Format::Zip => scan_zip(file, 0, file.size(), &origin(path.clone(), Some(0)), findings),
        Format::Gguf | Format::Safetensors => {
            // Bytes after the declared end: the parser names where they start.
            let Some(err) = file.parse_error().filter(|e| e.field == "trailing bytes") else { return Ok(0) };
            let (start, len) = (err.offset, file.size().saturating_sub(err.offset));
            let head = file.read(start, 4.min(len as u32)).unwrap_or_default();
            if head.first() == Some(&0x80) {
                let bytes = read_range(file, start, len)?;
                let loc = format!("{path}: bytes appended at offset {start}");
                scan_pickle(&bytes, &origin(loc, Some(start)), findings);
                Ok(1)
            } else if head.starts_with(b"PK\x03\x04") {
                let loc = format!("{path}: zip appended at offset {start}");
                scan_zip(file, start, len, &origin(loc, Some(start)), findings)
            } else {
                Ok(0)
            }
        }
        Format::Unknown if wrapper_of(&file.read(0, 512).unwrap_or_default()).is_some() => {
            let bytes = read_range(file, 0, file.size())?;
            let mut budget = MAX_UNPACKED;
            scan_unpacked(&bytes, path.clone(), 0, &mut budget, findings)
        }
        Format::Text | Format::Json | Format::Unknown => {
            let head = read_range(file, 0, file.size().min(MAX_DISGUISED))?;
            let (found, _) = imports(&head);
            // A text that happens to start with `c` or `i` "imports" its first
            // line; a pickle imports Python names.
            if !found.iter().any(|i| is_python_name(&i.module) && is_python_name(&i.name)) {
                return Ok(0);
            }
            let loc = format!("{path} (reads as {}, but is a pickle stream)", file.format().name());
            scan_pickle(&head, &origin(loc, Some(0)), findings);
            Ok(1)
        }
        _ => Ok(0),
    }
}

/// A container or compressor a loader opens around a pickle: `torch.load`
/// and joblib take gzip, bzip2 and xz files, and checkpoints travel as tar
/// and 7z archives.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wrapper {
    Gzip,
    Bzip2,
    Xz,
    SevenZ,
    Tar,
    Zip,
}

impl Wrapper {
    fn name(self) -> &'static str {
        match self {
            Wrapper::Gzip => "gzip",
            Wrapper::Bzip2 => "bzip2",
            Wrapper::Xz => "xz",
            Wrapper::SevenZ => "7z",
            Wrapper::Tar => "tar",
            Wrapper::Zip => "zip",
        }
    }
}

/// Names of wrapped files inside a zip (see `scan_zip`).
const WRAPPER_SUFFIXES: [&str; 9] = [".gz", ".tgz", ".bz2", ".xz", ".txz", ".7z", ".tar", ".zip", ".z"];

/// Wrappers inside wrappers, at most (a `.tar.gz` is two).
const MAX_WRAPPERS: u32 = 4;
/// Bytes unpacked from one file's wrappers, in all.
const MAX_UNPACKED: u64 = 256 << 20;

/// The wrapper `head` (a file's or a member's first bytes) starts with, by its magic.
fn wrapper_of(head: &[u8]) -> Option<Wrapper> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Wrapper::Gzip)
    } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        Some(Wrapper::Bzip2)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Wrapper::Xz)
    } else if head.starts_with(&[b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c]) {
        Some(Wrapper::SevenZ)
    } else if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        Some(Wrapper::Zip)
    } else if head.get(257..262) == Some(b"ustar") {
        Some(Wrapper::Tar)
    } else {
        None
    }
}

/// Reads what `from` unpacks to, within the per-member bound and what is
/// left of the file's budget; more is an error naming `what`.
fn unpack(from: impl Read, what: &str, budget: &mut u64) -> Result<Vec<u8>, String> {
    let cap = MAX_PICKLE.min(*budget);
    let mut out = Vec::new();
    from.take(cap + 1).read_to_end(&mut out).map_err(|e| format!("{what}: cannot unpack: {e}"))?;
    if out.len() as u64 > cap {
        return Err(format!(
            "{what}: unpacks to more than {cap} bytes (a member is read up to {MAX_PICKLE} bytes, a file's \
             wrappers up to {MAX_UNPACKED} in all): a decompression bomb, or too large to look into"
        ));
    }
    *budget -= out.len() as u64;
    Ok(out)
}

/// Unpacked bytes at `location`: another wrapper is opened (up to
/// `MAX_WRAPPERS` deep); a pickle, announced or disguised as protocol 0/1
/// text, is walked. Returns the pickles found.
fn scan_unpacked(
    bytes: &[u8],
    location: String,
    depth: u32,
    budget: &mut u64,
    findings: &mut Vec<Finding>,
) -> Result<usize, String> {
    if let Some(w) = wrapper_of(bytes) {
        if depth >= MAX_WRAPPERS {
            return Err(format!(
                "{location}: wrappers nested deeper than {MAX_WRAPPERS}; a loader's reading of it cannot be checked"
            ));
        }
        return scan_wrapped(bytes, w, &location, depth + 1, budget, findings);
    }
    let announced = bytes.first() == Some(&0x80) && bytes.get(1).is_some_and(|p| *p <= 5);
    let disguised = !announced && {
        let (found, _) = imports(&bytes[..bytes.len().min(MAX_DISGUISED as usize)]);
        found.iter().any(|i| is_python_name(&i.module) && is_python_name(&i.name))
    };
    if announced || disguised {
        scan_pickle(bytes, &Origin { location, base: None }, findings);
        return Ok(1);
    }
    Ok(0)
}

/// Opens wrapper `w` and scans what it holds: one stream for a compressor,
/// every regular member for an archive (named in the location).
fn scan_wrapped(
    bytes: &[u8],
    w: Wrapper,
    location: &str,
    depth: u32,
    budget: &mut u64,
    findings: &mut Vec<Finding>,
) -> Result<usize, String> {
    let here = |inner: &str| format!("{location} ({} {inner})", w.name());
    let stream = |from: &mut dyn Read, budget: &mut u64, findings: &mut Vec<Finding>| {
        let inner = unpack(from, &here("stream"), budget)?;
        scan_unpacked(&inner, here("stream"), depth, budget, findings)
    };
    match w {
        Wrapper::Gzip => stream(&mut flate2::read::MultiGzDecoder::new(bytes), budget, findings),
        Wrapper::Bzip2 => stream(&mut bzip2::read::MultiBzDecoder::new(bytes), budget, findings),
        Wrapper::Xz => stream(&mut lzma_rust2::XzReader::new(bytes, true), budget, findings),
        Wrapper::Tar => {
            let mut archive = tar::Archive::new(bytes);
            let mut pickles = 0;
            let entries = archive.entries().map_err(|e| format!("{location}: not a readable tar: {e}"))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| format!("{location}: a tar member: {e}"))?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                let inner = unpack(&mut entry, &here(&format!("member {name}")), budget)?;
                pickles += scan_unpacked(&inner, here(&format!("member {name}")), depth, budget, findings)?;
            }
            Ok(pickles)
        }
        Wrapper::Zip => {
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
                .map_err(|e| format!("{location}: not a readable zip: {e}"))?;
            let mut pickles = 0;
            for i in 0..zip.len() {
                let mut entry = zip.by_index(i).map_err(|e| format!("{location}: zip entry {i}: {e}"))?;
                if !entry.is_file() {
                    continue;
                }
                let name = entry.name().map(|n| n.to_string()).unwrap_or_else(|_| format!("{i}"));
                let inner = unpack(&mut entry, &here(&format!("entry {name}")), budget)?;
                pickles += scan_unpacked(&inner, here(&format!("entry {name}")), depth, budget, findings)?;
            }
            Ok(pickles)
        }
        Wrapper::SevenZ => {
            let mut archive =
                sevenz_rust2::ArchiveReader::new(std::io::Cursor::new(bytes), sevenz_rust2::Password::empty())
                    .map_err(|e| format!("{location}: not a readable 7z: {e}"))?;
            let mut pickles = 0;
            let mut failed = None;
            let walked = archive.for_each_entries(|entry, reader| {
                if entry.is_directory() {
                    return Ok(true);
                }
                let at = here(&format!("member {}", entry.name()));
                let result =
                    unpack(reader, &at, budget).and_then(|inner| scan_unpacked(&inner, at, depth, budget, findings));
                match result {
                    Ok(n) => {
                        pickles += n;
                        Ok(true)
                    }
                    Err(e) => {
                        failed = Some(e);
                        Ok(false)
                    }
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            walked.map_err(|e| format!("{location}: not a readable 7z: {e}"))?;
            Ok(pickles)
        }
    }
}

/// How much of a file that is not a tensor container is walked for a pickle.
const MAX_DISGUISED: u64 = 1 << 20;

/// A dotted Python name (`posix`, `os.path`, `system`).
fn is_python_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            let mut c = part.chars();
            c.next().is_some_and(|f| f == '_' || f.is_ascii_alphabetic())
                && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nullifAI shape: protocol 0, every byte printable, an import of
    /// posix.system and a REDUCE, then the stream breaks off without STOP.
    #[test]
    fn a_truncated_protocol_0_stream_still_names_its_import() {
        let (found, broken) = imports(b"cposix\nsystem\n(S'id'\ntR(garbage");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].module.as_str(), found[0].name.as_str(), found[0].offset), ("posix", "system", 0));
        assert!(broken.is_some());
        assert!(judge("posix", "system").is_some_and(|(s, _)| s == Severity::Critical));
    }

    /// Every input the fuzzer ever broke the walker with (fuzz/regressions/pickle/,
    /// none so far) is walked again without the fuzzer.
    #[test]
    fn fuzz_regressions_walk_without_panicking() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/pickle");
        for e in std::fs::read_dir(&dir).into_iter().flatten() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            let _ = count_imports(&bytes);
        }
    }

    /// `pickle.dumps` of an object whose `__reduce__` returns `(os.system,
    /// ("id",))`, protocols 0 to 5, as CPython 3.11 writes them (on Linux,
    /// `os.system` pickles as `posix.system`).
    const REAL_PICKLES: [&[u8]; 6] = [
        b"cposix\nsystem\np0\n(Vid\np1\ntp2\nRp3\n.",
        b"cposix\nsystem\nq\x00(X\x02\x00\x00\x00idq\x01tq\x02Rq\x03.",
        b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",
        b"\x80\x03cposix\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",
        b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.",
        b"\x80\x05\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.",
    ];

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(bytes).unwrap();
        w.finish().unwrap()
    }

    fn wrap(w: Wrapper, name: &str, bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match w {
            Wrapper::Gzip => gzip(bytes),
            Wrapper::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
                e.write_all(bytes).unwrap();
                e.finish().unwrap()
            }
            Wrapper::Xz => {
                let mut e = lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(6)).unwrap();
                e.write_all(bytes).unwrap();
                e.finish().unwrap()
            }
            Wrapper::Tar => {
                let mut b = tar::Builder::new(Vec::new());
                let mut readme = tar::Header::new_gnu();
                readme.set_size(6);
                readme.set_cksum();
                b.append_data(&mut readme, "README", &b"hello\n"[..]).unwrap();
                let mut h = tar::Header::new_ustar();
                h.set_size(bytes.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, name, bytes).unwrap();
                b.into_inner().unwrap()
            }
            Wrapper::Zip => {
                let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
                let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
                z.start_file(name, opts).unwrap();
                z.write_all(bytes).unwrap();
                z.finish().unwrap().into_inner()
            }
            Wrapper::SevenZ => {
                let mut z = sevenz_rust2::ArchiveWriter::new(std::io::Cursor::new(Vec::new())).unwrap();
                z.push_archive_entry(sevenz_rust2::ArchiveEntry::new_file(name), Some(bytes)).unwrap();
                z.finish().unwrap().into_inner()
            }
        }
    }

    const WRAPPERS: [Wrapper; 6] =
        [Wrapper::Gzip, Wrapper::Bzip2, Wrapper::Xz, Wrapper::Tar, Wrapper::Zip, Wrapper::SevenZ];

    fn scan(bytes: &[u8]) -> (Result<usize, String>, Vec<Finding>) {
        let mut findings = Vec::new();
        let mut budget = MAX_UNPACKED;
        let result = scan_unpacked(bytes, "model.bin".into(), 0, &mut budget, &mut findings);
        (result, findings)
    }

    #[test]
    fn every_protocol_in_every_wrapper_names_its_import_and_the_wrapper() {
        for w in WRAPPERS {
            for (protocol, pickle) in REAL_PICKLES.iter().enumerate() {
                let wrapped = wrap(w, "archive/data.pkl", pickle);
                assert_eq!(wrapper_of(&wrapped), Some(w), "{w:?} is recognised by its magic");
                let (result, findings) = scan(&wrapped);
                assert_eq!(result, Ok(1), "{w:?} protocol {protocol}");
                let hit = findings.iter().find(|f| f.rule == "pickle.dangerous-import");
                let hit = hit.unwrap_or_else(|| panic!("{w:?} protocol {protocol}: {:?}", findings.len()));
                assert!(hit.message.contains("posix.system"), "{}", hit.message);
                let at = hit.location.clone().unwrap_or_default();
                assert!(at.starts_with(&format!("model.bin ({}", w.name())), "{w:?}: {at}");
            }
        }
    }

    #[test]
    fn wrappers_nest_and_say_where_the_pickle_was() {
        let tar_gz = gzip(&wrap(Wrapper::Tar, "ckpt/model.pkl", REAL_PICKLES[4]));
        let (result, findings) = scan(&tar_gz);
        assert_eq!(result, Ok(1));
        assert_eq!(
            findings[0].location.as_deref(),
            Some("model.bin (gzip stream) (tar member ckpt/model.pkl)"),
            "{:?}",
            findings[0].message
        );
        // A 7z holding a zip holding the nullifAI shape: protocol 0, broken off before STOP.
        let nullifai = b"cposix\nsystem\n(S'id'\ntR(garbage";
        let nested = wrap(Wrapper::SevenZ, "inner.zip", &wrap(Wrapper::Zip, "x.bin", nullifai));
        let (result, findings) = scan(&nested);
        assert_eq!(result, Ok(1));
        assert!(findings.iter().any(|f| f.rule == "pickle.dangerous-import"));
        assert!(findings.iter().any(|f| f.rule == "pickle.malformed"));
    }

    #[test]
    fn archives_of_plain_files_hold_no_pickle() {
        for w in WRAPPERS {
            let (result, findings) = scan(&wrap(w, "notes.txt", b"copyright 2024 The Authors\nAll rights reserved.\n"));
            assert_eq!(result, Ok(0), "{w:?}");
            assert!(findings.is_empty(), "{w:?}");
        }
    }

    #[test]
    fn bombs_deep_nesting_and_broken_wrappers_are_errors_not_passes() {
        let bomb = gzip(&vec![0u8; (MAX_PICKLE + 1) as usize]);
        let err = scan(&bomb).0.unwrap_err();
        assert!(err.contains("decompression bomb") && err.starts_with("model.bin (gzip stream)"), "{err}");

        let mut deep = REAL_PICKLES[2].to_vec();
        for _ in 0..=MAX_WRAPPERS {
            deep = gzip(&deep);
        }
        let err = scan(&deep).0.unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");

        let mut cut = wrap(Wrapper::Xz, "x", REAL_PICKLES[5]);
        cut.truncate(cut.len() / 2);
        assert!(scan(&cut).0.is_err(), "a truncated xz stream is an error");
        let mut cut = wrap(Wrapper::SevenZ, "x.pkl", REAL_PICKLES[5]);
        cut.truncate(cut.len() - 8);
        assert!(scan(&cut).0.is_err(), "a truncated 7z is an error");
    }

    #[test]
    fn prose_that_starts_with_an_opcode_letter_is_no_import() {
        let (found, _) = imports(b"copyright 2024 The Authors\nAll rights reserved.\n");
        assert!(found.iter().all(|i| !(is_python_name(&i.module) && is_python_name(&i.name))));
        assert!(is_python_name("os.path") && !is_python_name("opyright 2024 The Authors") && !is_python_name(""));
    }
}

struct PickleScan;

impl Stage for PickleScan {
    fn describe() -> StageInfo {
        StageInfo::new(
            "pickle_scan",
            env!("CARGO_PKG_VERSION"),
            "walks pickle opcodes (raw, in zip checkpoints, appended to other formats, inside gzip/bzip2/xz/7z/tar wrappers) and names dangerous imports",
        )
    }

    fn run(model: &Model) -> Report {
        let mut findings = Vec::new();
        let mut pickles = 0;
        for file in model.files() {
            match scan_file(&file, &mut findings) {
                Ok(n) => pickles += n,
                Err(e) => return Report::fail(format!("cannot scan for pickles: {e}")).findings(findings),
            }
        }
        if pickles == 0 {
            return Report::pass("no pickle content");
        }

        let bad: Vec<&Finding> =
            findings.iter().filter(|f| matches!(f.severity, Severity::Critical | Severity::High)).collect();
        if let Some(first) = bad.first() {
            let reason = format!(
                "{} dangerous import(s) in {pickles} pickle(s); first: {}: {}",
                bad.len(),
                first.location.as_deref().unwrap_or("?"),
                first.message
            );
            // A pickle can name thousands of imports; the report keeps the worst 200.
            return Report::fail(reason).findings(findings).cap_findings(200);
        }
        Report::pass(format!("{pickles} pickle(s), no dangerous imports")).findings(findings).cap_findings(200)
    }
}

airlock_sdk::export_stage!(PickleScan);
