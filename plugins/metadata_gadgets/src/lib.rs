//! Stage 5 (static scan): code-execution gadgets and insane values in model
//! metadata: GGUF key/values, safetensors `__metadata__`, and JSON files of a
//! folder model.
//!
//! Gadgets are configuration keys that make a loader import or run code
//! (Hydra's `_target_`, transformers' `auto_map` and `trust_remote_code`,
//! diffusers' `custom_pipeline`) and Python import paths of dangerous
//! callables. Any of them fails the stage, as does a structural value no real
//! model has.

use airlock_sdk::{ChunkReader, File, Finding, Format, MetaValue, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Longest scalar string value accepted.
    #[serde(default = "default_max_string")]
    max_string_bytes: usize,
    /// Longest element of a string array (tokens, merges) accepted.
    #[serde(default = "default_max_element")]
    max_array_element_bytes: usize,
    /// Largest `*.block_count` accepted.
    #[serde(default = "default_max_blocks")]
    max_block_count: u64,
}

fn default_max_string() -> usize {
    1 << 20
}
fn default_max_element() -> usize {
    64 << 10
}
fn default_max_blocks() -> u64 {
    512
}

/// Keys that make a loader import or execute code. (needle, rule)
const GADGET_KEYS: [(&str, &str); 4] = [
    ("_target_", "meta.gadget.hydra-target"),
    ("auto_map", "meta.gadget.auto-map"),
    ("trust_remote_code", "meta.gadget.trust-remote-code"),
    ("custom_pipeline", "meta.gadget.custom-pipeline"),
];

/// Import paths of callables that run commands or code, as they appear in
/// pickles, Hydra targets and `auto_map` entries.
const DANGEROUS_IMPORTS: [&str; 24] = [
    "os.system",
    "os.popen",
    "os.exec",
    "os.spawn",
    "posix.system",
    "nt.system",
    "subprocess.Popen",
    "subprocess.run",
    "subprocess.call",
    "subprocess.check_output",
    "builtins.exec",
    "builtins.eval",
    "builtins.compile",
    "builtins.__import__",
    "__builtin__.eval",
    "__builtin__.exec",
    "runpy.run_",
    "pty.spawn",
    "socket.socket",
    "webbrowser.open",
    "ctypes.CDLL",
    "importlib.import_module",
    "shutil.rmtree",
    "pickle.loads",
];

struct Scan<'a> {
    config: &'a Config,
    findings: Vec<Finding>,
    values: usize,
}

impl Scan<'_> {
    fn flag(&mut self, rule: &str, severity: Severity, message: String, location: String) {
        // One finding per rule and location is enough for a report.
        if !self.findings.iter().any(|f| f.rule == rule && f.location.as_deref() == Some(&location)) {
            self.findings.push(Finding::new(rule, severity, message).at(location));
        }
    }

    /// Gadget keys and dangerous import paths in a key or a string value.
    fn text(&mut self, text: &str, location: &str) {
        self.values += 1;
        // Every needle holds a '_' or a '.', and most tokens hold neither: skip them fast.
        if !text.bytes().any(|b| b == b'_' || b == b'.') {
            return;
        }
        for (needle, rule) in GADGET_KEYS {
            if text.contains(needle) {
                self.flag(
                    rule,
                    Severity::Critical,
                    format!("`{needle}` makes a loader import or run code"),
                    location.into(),
                );
            }
        }
        for path in DANGEROUS_IMPORTS {
            if text.contains(path) {
                self.flag(
                    "meta.gadget.python-import",
                    Severity::Critical,
                    format!("names the Python callable `{path}`"),
                    location.into(),
                );
            }
        }
    }

    fn texts<'s>(&mut self, key: &str, list: impl Iterator<Item = &'s str>, location: &str) {
        let byte_tokens = key == "tokenizer.ggml.tokens";
        for (i, s) in list.enumerate() {
            if s.len() > self.config.max_array_element_bytes {
                self.flag(
                    "meta.value.string-too-long",
                    Severity::Critical,
                    format!(
                        "element {i} is {} bytes; at most {} are accepted",
                        s.len(),
                        self.config.max_array_element_bytes
                    ),
                    location.into(),
                );
            }
            // llama.cpp turns `<0xHH>` tokens into bytes; anything but two hex digits there is malformed.
            if byte_tokens
                && s.starts_with("<0x")
                && s.ends_with('>')
                && !(s.len() == 6 && s.as_bytes()[3..5].iter().all(u8::is_ascii_hexdigit))
            {
                self.flag(
                    "meta.value.byte-token",
                    Severity::Critical,
                    format!("token {i} {s:?} looks like a byte token but is not <0xHH> with two hex digits"),
                    location.into(),
                );
            }
            self.text(s, location);
        }
    }

    fn gguf_value(&mut self, key: &str, value: &MetaValue, location: &str) {
        self.text(key, location);
        match value {
            MetaValue::Text(s) => {
                if s.len() > self.config.max_string_bytes {
                    self.flag(
                        "meta.value.string-too-long",
                        Severity::Critical,
                        format!("{} bytes; at most {} are accepted", s.len(), self.config.max_string_bytes),
                        location.into(),
                    );
                }
                self.text(s, location);
            }
            MetaValue::Texts(list) => self.texts(key, list.iter().map(String::as_str), location),
            MetaValue::Uint(n) if key.ends_with(".block_count") && *n > self.config.max_block_count => {
                self.flag(
                    "meta.value.block-count",
                    Severity::Critical,
                    format!("{n} blocks; at most {} are accepted", self.config.max_block_count),
                    location.into(),
                );
            }
            MetaValue::Int(n)
                if key.ends_with(".block_count") && (*n < 0 || *n as u64 > self.config.max_block_count) =>
            {
                self.flag(
                    "meta.value.block-count",
                    Severity::Critical,
                    format!("{n} blocks; at most {} are accepted", self.config.max_block_count),
                    location.into(),
                );
            }
            _ => {}
        }
    }

    fn file(&mut self, file: &File) -> Result<(), String> {
        let path = file.path();
        match file.format() {
            Format::Gguf | Format::Safetensors => {
                for key in file.metadata_keys() {
                    let location = if file.format() == Format::Safetensors {
                        format!("{path}: __metadata__[{key:?}]")
                    } else {
                        format!("{path}: {key}")
                    };
                    // Vocabularies are large string arrays: take them packed.
                    if let Some(packed) = file.metadata_packed_texts(&key) {
                        self.text(&key, &location);
                        self.texts(&key, packed.iter(), &location);
                        continue;
                    }
                    let Some(value) = file.metadata(&key) else { continue };
                    self.gguf_value(&key, &value, &location);
                }
            }
            Format::Json => {
                let text = ChunkReader::file(file).collect_bytes()?;
                self.text(&String::from_utf8_lossy(&text), &path);
            }
            _ => {}
        }
        Ok(())
    }
}

struct MetadataGadgets;

impl Stage for MetadataGadgets {
    fn describe() -> StageInfo {
        StageInfo::new(
            "metadata_gadgets",
            env!("CARGO_PKG_VERSION"),
            "flags code-execution gadgets and insane values in model metadata and configs",
        )
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let mut scan = Scan { config: &config, findings: Vec::new(), values: 0 };
        for file in model.files() {
            if let Err(e) = scan.file(&file) {
                return Report::fail(format!("{}: cannot read: {e}", file.path()));
            }
        }
        let critical = scan.findings.iter().filter(|f| f.severity == Severity::Critical).count();
        if critical > 0 {
            let first = &scan.findings[0];
            let reason = format!(
                "{critical} metadata gadget(s) or insane value(s); first: {} at {}",
                first.rule,
                first.location.as_deref().unwrap_or("?")
            );
            return Report::fail(reason).findings(scan.findings).cap_findings(200);
        }
        Report::pass(format!("{} metadata values checked, no gadgets", scan.values))
            .findings(scan.findings)
            .cap_findings(200)
    }
}

airlock_sdk::export_stage!(MetadataGadgets);
