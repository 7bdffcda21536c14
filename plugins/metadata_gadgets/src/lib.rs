//! Stage 5 (static scan): code-execution gadgets and insane values in model
//! metadata: GGUF key/values, safetensors `__metadata__`, and JSON files of a
//! folder model (config.json, generation_config.json, tokenizer_config.json,
//! processor configs, modules.json, ...), which are parsed and walked: a
//! gadget is a key, matched whole, not a word that happens to be in a text.
//!
//! Gadgets are configuration keys that make a loader import or run code
//! (Hydra's `_target_`, transformers' `auto_map` and `trust_remote_code`,
//! diffusers' `custom_pipeline`) and Python import paths of dangerous
//! callables. Any of them fails the stage, as does a structural value no real
//! model has.

use aho_corasick::AhoCorasick;
use airlock_sdk::{
    ChunkReader, File, Finding, Format, MetaValue, Model, PackedTexts, Report, Severity, Stage, StageInfo, context,
};
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

/// Keys of a JSON config whose presence alone makes a loader import code
/// (transformers' remote code and custom pipelines, Hydra/NeMo targets).
/// `trust_remote_code` counts unless it is `false`; the attention keys are
/// judged by value (`attention_kernel`).
const JSON_GADGET_KEYS: [(&str, &str); 5] = [
    ("_target_", "meta.gadget.hydra-target"),
    ("auto_map", "meta.gadget.auto-map"),
    ("trust_remote_code", "meta.gadget.trust-remote-code"),
    ("custom_pipeline", "meta.gadget.custom-pipeline"),
    ("custom_pipelines", "meta.gadget.custom-pipeline"),
];

/// Config keys naming the attention implementation. transformers also takes
/// a Hub repository here (`kernels-community/flash-attn`) and loads its
/// compiled kernels: code from outside the model.
const ATTENTION_KEYS: [&str; 3] = ["attn_implementation", "_attn_implementation", "_attn_implementation_internal"];

/// The attention implementations transformers ships; anything else is fetched.
const KNOWN_ATTENTION: [&str; 9] = [
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "paged_attention",
    "sdpa_paged",
    "eager_paged",
    "flash_paged",
];

/// Endings of URLs that point at code or archives of code.
const CODE_URL_ENDINGS: [&str; 12] =
    [".py", ".pyc", ".so", ".sh", ".whl", ".zip", ".tar.gz", ".tgz", ".exe", ".dll", ".js", ".ipynb"];

/// JSON files that are token lists (token -> id), not configuration: their
/// keys are vocabulary, which can spell anything.
const VOCABULARY_FILES: [&str; 2] = ["vocab.json", "added_tokens.json"];

/// Where the tokens are in `tokenizer.json`: data, not configuration.
const TOKENIZER_DATA: [&[&str]; 3] = [&["model", "vocab"], &["model", "merges"], &["added_tokens"]];

/// Keys of a config that count layers, checked like GGUF's `*.block_count`.
const LAYER_KEYS: [&str; 4] = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

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
    /// Every needle of both lists: the gadget keys first, then the import paths.
    needles: AhoCorasick,
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
    /// Bytes, not text: every needle is ASCII, so a match in bytes is a match
    /// in the text, and no UTF-8 check is needed first.
    fn text(&mut self, text: &[u8], location: &str) {
        self.values += 1;
        // Every needle holds a '_' or a '.', and most tokens hold neither: skip them fast.
        if memchr::memchr2(b'_', b'.', text).is_some() {
            self.needles_in(text, location);
        }
    }

    fn needles_in(&mut self, text: &[u8], location: &str) {
        let mut hits = Vec::new();
        for m in self.needles.find_overlapping_iter(text) {
            let id = m.pattern().as_usize();
            if !hits.contains(&id) {
                hits.push(id);
            }
        }
        // Reported in list order, as the needles are listed.
        hits.sort_unstable();
        for id in hits {
            match GADGET_KEYS.get(id) {
                Some((needle, rule)) => self.flag(
                    rule,
                    Severity::Critical,
                    format!("`{needle}` makes a loader import or run code"),
                    location.into(),
                ),
                None => {
                    let path = DANGEROUS_IMPORTS[id - GADGET_KEYS.len()];
                    self.flag(
                        "meta.gadget.python-import",
                        Severity::Critical,
                        format!("names the Python callable `{path}`"),
                        location.into(),
                    )
                }
            }
        }
    }

    /// A string array. `may_hold_needle(i)` is false for elements known to
    /// hold no '_' and no '.', which no needle can then be in.
    fn texts<'s>(
        &mut self,
        key: &str,
        list: impl Iterator<Item = &'s [u8]>,
        may_hold_needle: impl Fn(usize) -> bool,
        location: &str,
    ) {
        let byte_tokens = key == "tokenizer.ggml.tokens";
        for (i, s) in list.enumerate() {
            self.values += 1;
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
                && s.starts_with(b"<0x")
                && s.ends_with(b">")
                && !(s.len() == 6 && s[3..5].iter().all(u8::is_ascii_hexdigit))
            {
                self.flag(
                    "meta.value.byte-token",
                    Severity::Critical,
                    format!(
                        "token {i} {:?} looks like a byte token but is not <0xHH> with two hex digits",
                        String::from_utf8_lossy(s)
                    ),
                    location.into(),
                );
            }
            if may_hold_needle(i) {
                self.needles_in(s, location);
            }
        }
    }

    fn gguf_value(&mut self, key: &str, value: &MetaValue, location: &str) {
        self.text(key.as_bytes(), location);
        match value {
            MetaValue::Text(s) => {
                self.string_length(s.len(), location);
                self.text(s.as_bytes(), location);
            }
            MetaValue::Texts(list) => {
                let list = list.iter().map(String::as_bytes);
                self.texts(key, list, |_| true, location)
            }
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

    /// Only the dangerous import paths, for JSON keys and values: gadget keys
    /// in JSON are matched whole (`json_key`), never as a substring of a text.
    fn imports_in(&mut self, text: &str, location: &str) {
        self.values += 1;
        if !text.contains('.') {
            return;
        }
        // The scan's one matcher; only the import paths count here, and only
        // at an identifier's start: `photos.system` names no `os.system`.
        let mut hits: Vec<usize> = self
            .needles
            .find_overlapping_iter(text)
            .filter_map(|m| {
                let import = m.pattern().as_usize().checked_sub(GADGET_KEYS.len())?;
                let before = text[..m.start()].chars().next_back();
                before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')).then_some(import)
            })
            .collect();
        // Reported in list order, as the needles are listed.
        hits.sort_unstable();
        hits.dedup();
        for path in hits.into_iter().map(|i| DANGEROUS_IMPORTS[i]) {
            self.flag(
                "meta.gadget.python-import",
                Severity::Critical,
                format!("names the Python callable `{path}`"),
                location.into(),
            );
        }
    }

    fn json_key(&mut self, key: &str, value: &serde_json::Value, location: &str) {
        if let Some((_, rule)) = JSON_GADGET_KEYS.iter().find(|(k, _)| *k == key)
            && !(key == "trust_remote_code" && value == &serde_json::Value::Bool(false))
        {
            self.flag(rule, Severity::Critical, format!("`{key}` makes a loader import or run code"), location.into());
        }
        if ATTENTION_KEYS.contains(&key)
            && let Some(kernel) = value.as_str()
            && !KNOWN_ATTENTION.contains(&kernel)
        {
            self.flag(
                "meta.gadget.attention-kernel",
                Severity::Critical,
                format!("attention implementation {kernel:?} is not one transformers ships: a loader fetches and loads it as code"),
                location.into(),
            );
        }
        if LAYER_KEYS.contains(&key)
            && let Some(n) = value.as_i64().map(i128::from).or(value.as_u64().map(i128::from))
            && (n < 0 || n > i128::from(self.config.max_block_count))
        {
            self.flag(
                "meta.value.block-count",
                Severity::Critical,
                format!("{n} layers; at most {} are accepted", self.config.max_block_count),
                location.into(),
            );
        }
    }

    /// A scalar string longer than any real metadata value.
    fn string_length(&mut self, len: usize, location: &str) {
        if len > self.config.max_string_bytes {
            self.flag(
                "meta.value.string-too-long",
                Severity::Critical,
                format!("{len} bytes; at most {} are accepted", self.config.max_string_bytes),
                location.into(),
            );
        }
    }

    fn json_string(&mut self, s: &str, location: &str) {
        self.string_length(s.len(), location);
        self.imports_in(s, location);
        let lower = s.trim().to_ascii_lowercase();
        if lower.contains("://") && !lower.contains(char::is_whitespace) {
            let path = lower.split(['?', '#']).next().unwrap_or(&lower);
            if CODE_URL_ENDINGS.iter().any(|e| path.ends_with(e)) {
                self.flag(
                    "meta.gadget.remote-code-url",
                    Severity::Critical,
                    format!("a URL to code: {s:?}"),
                    location.into(),
                );
            } else {
                self.flag("meta.value.url", Severity::Low, format!("a URL: {s:?}"), location.into());
            }
        }
    }

    /// Walks a parsed JSON config; `at` is the key path, for locations.
    fn json(&mut self, value: &serde_json::Value, file: &str, at: &mut Vec<String>, skip: &[&[&str]]) {
        if skip.iter().any(|s| s.len() == at.len() && s.iter().zip(at.iter()).all(|(a, b)| a == b)) {
            return;
        }
        let location =
            |at: &[String]| if at.is_empty() { file.to_string() } else { format!("{file}: {}", at.join(".")) };
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    at.push(k.clone());
                    let loc = location(at);
                    self.imports_in(k, &loc);
                    self.json_key(k, v, &loc);
                    self.json(v, file, at, skip);
                    at.pop();
                }
            }
            serde_json::Value::Array(list) => {
                for (i, v) in list.iter().enumerate() {
                    at.push(i.to_string());
                    self.json(v, file, at, skip);
                    at.pop();
                }
            }
            serde_json::Value::String(s) => self.json_string(s, &location(at)),
            _ => self.values += 1,
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
                        self.text(key.as_bytes(), &location);
                        let may_hold = may_hold_needle(&packed);
                        self.texts(&key, packed.iter_bytes(), |i| may_hold[i], &location);
                        continue;
                    }
                    let Some(value) = file.metadata(&key) else { continue };
                    self.gguf_value(&key, &value, &location);
                }
            }
            Format::Json => {
                let name = path.rsplit('/').next().unwrap_or(&path);
                if VOCABULARY_FILES.contains(&name) {
                    return Ok(());
                }
                let text = ChunkReader::file(file).collect_bytes()?;
                match serde_json::from_slice::<serde_json::Value>(&text) {
                    Ok(value) => {
                        let skip: &[&[&str]] = if name == "tokenizer.json" { &TOKENIZER_DATA } else { &[] };
                        self.json(&value, &path, &mut Vec::new(), skip);
                    }
                    // Sniffed as JSON, read by no parser the same way: what a loader makes of it is unknown.
                    Err(e) => self.flag(
                        "meta.json.unparseable",
                        Severity::Critical,
                        format!("not valid JSON ({e}); a loader's reading of it cannot be checked"),
                        path.clone(),
                    ),
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Which elements of a packed string array hold a '_' or a '.': one SIMD
/// pass over the whole buffer (a 262k-token vocabulary is about 2 MB) rather
/// than a search per element. Ends that do not rise (a host bug) mark every
/// element, so nothing goes unsearched.
fn may_hold_needle(packed: &PackedTexts) -> Vec<bool> {
    let ends = &packed.ends;
    let rising = ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|&e| e as usize <= packed.bytes.len());
    if !rising {
        return vec![true; ends.len()];
    }
    let mut marks = vec![false; ends.len()];
    let mut element = 0;
    for at in memchr::memchr2_iter(b'_', b'.', &packed.bytes) {
        while element < ends.len() && ends[element] as usize <= at {
            element += 1;
        }
        match marks.get_mut(element) {
            Some(m) => *m = true,
            None => break, // past the last end: bytes that belong to no element
        }
    }
    marks
}

/// One matcher over every needle: the gadget keys first, then the import paths.
fn matcher() -> Result<AhoCorasick, aho_corasick::BuildError> {
    AhoCorasick::new(GADGET_KEYS.iter().map(|(needle, _)| *needle).chain(DANGEROUS_IMPORTS))
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
        let needles = match matcher() {
            Ok(n) => n,
            Err(e) => return Report::fail(format!("cannot build the needle matcher: {e}")),
        };
        let mut scan = Scan { config: &config, needles, findings: Vec::new(), values: 0 };
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scan_json(config: &Config, name: &str, value: serde_json::Value) -> Vec<(String, String)> {
        let mut scan = Scan { config, needles: matcher().unwrap(), findings: Vec::new(), values: 0 };
        let skip: &[&[&str]] = if name == "tokenizer.json" { &TOKENIZER_DATA } else { &[] };
        scan.json(&value, name, &mut Vec::new(), skip);
        scan.findings.into_iter().map(|f| (f.rule, f.location.unwrap_or_default())).collect()
    }

    fn defaults() -> Config {
        serde_json::from_str("{}").unwrap()
    }

    fn rules(found: &[(String, String)]) -> Vec<&str> {
        found.iter().map(|(r, _)| r.as_str()).collect()
    }

    #[test]
    fn a_clean_config_has_no_findings() {
        let config = json!({
            "architectures": ["BertModel"], "num_hidden_layers": 6, "attn_implementation": "sdpa",
            "trust_remote_code": false, "model_type": "bert", "torch_dtype": "float32",
            "photos.system": "a key that only ends like an import path"
        });
        assert_eq!(scan_json(&defaults(), "config.json", config), vec![]);
    }

    #[test]
    fn gadget_keys_are_matched_whole_with_their_key_path() {
        let found = scan_json(
            &defaults(),
            "config.json",
            json!({"auto_map": {"AutoModel": "m.M"}, "nested": {"_target_": "x"}, "trust_remote_code": true}),
        );
        assert!(found.contains(&("meta.gadget.auto-map".into(), "config.json: auto_map".into())), "{found:?}");
        assert!(found.contains(&("meta.gadget.hydra-target".into(), "config.json: nested._target_".into())));
        assert!(found.contains(&("meta.gadget.trust-remote-code".into(), "config.json: trust_remote_code".into())));
        // A key that merely contains a gadget's name is not one.
        assert_eq!(scan_json(&defaults(), "config.json", json!({"my_auto_map_notes": 1})), vec![]);
    }

    #[test]
    fn import_paths_count_only_at_an_identifier_start() {
        let found = scan_json(&defaults(), "config.json", json!({"hook": "os.system", "x": "photos.system"}));
        assert_eq!(found, vec![("meta.gadget.python-import".into(), "config.json: hook".into())]);
    }

    #[test]
    fn fetched_attention_kernels_and_code_urls_fail_plain_urls_are_low() {
        let found = scan_json(
            &defaults(),
            "config.json",
            json!({"attn_implementation": "kernels-community/flash-attn",
                   "loader": "https://example.com/run.py?x=1", "homepage": "https://example.com/model"}),
        );
        let mut got = rules(&found);
        got.sort_unstable();
        assert_eq!(got, ["meta.gadget.attention-kernel", "meta.gadget.remote-code-url", "meta.value.url"], "{found:?}");
        let low = found.iter().find(|(r, _)| r == "meta.value.url").unwrap();
        assert_eq!(low.1, "config.json: homepage");
    }

    #[test]
    fn insane_layer_counts_fail_in_json_and_gguf() {
        let found = scan_json(&defaults(), "config.json", json!({"num_hidden_layers": 100000}));
        assert_eq!(rules(&found), ["meta.value.block-count"]);
        let found = scan_json(&defaults(), "config.json", json!({"n_layer": -1}));
        assert_eq!(rules(&found), ["meta.value.block-count"]);

        let config = defaults();
        let mut scan = Scan { config: &config, needles: matcher().unwrap(), findings: Vec::new(), values: 0 };
        scan.gguf_value("llama.block_count", &MetaValue::Int(-3), "m.gguf: llama.block_count");
        scan.gguf_value("gemma3.block_count", &MetaValue::Uint(18), "m.gguf: gemma3.block_count");
        assert_eq!(scan.findings.len(), 1);
        assert_eq!(scan.findings[0].location.as_deref(), Some("m.gguf: llama.block_count"));
    }

    #[test]
    fn tokenizer_vocabulary_is_data_but_its_config_is_not() {
        let vocab = json!({"model": {"vocab": {"os.system": 5, "auto_map": 6}, "type": "BPE"},
                           "added_tokens": [{"content": "_target_"}]});
        assert_eq!(scan_json(&defaults(), "tokenizer.json", vocab.clone()), vec![]);
        // The same text outside the token lists is judged.
        assert_eq!(
            rules(&scan_json(&defaults(), "tokenizer.json", json!({"post_processor": {"hook": "os.system"}}))),
            ["meta.gadget.python-import"]
        );
        // In another file the same shape is configuration.
        assert!(!scan_json(&defaults(), "config.json", vocab).is_empty());
    }

    #[test]
    fn byte_tokens_must_be_two_hex_digits_and_long_elements_fail() {
        let config: Config = serde_json::from_str(r#"{"max_array_element_bytes": 8}"#).unwrap();
        let mut scan = Scan { config: &config, needles: matcher().unwrap(), findings: Vec::new(), values: 0 };
        let tokens: Vec<&[u8]> = vec![b"<0x0A>", b"<0x-1>", b"<0xZZ>", b"0123456789", b"hello"];
        scan.texts("tokenizer.ggml.tokens", tokens.into_iter(), |_| true, "m.gguf: tokenizer.ggml.tokens");
        let messages: Vec<_> = scan.findings.iter().map(|f| (f.rule.as_str(), f.message.clone())).collect();
        // One finding per rule and location: the first malformed token is named.
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].0 == "meta.value.byte-token" && messages[0].1.contains("token 1 \"<0x-1>\""),
            "{messages:?}"
        );
        assert_eq!(messages[1].0, "meta.value.string-too-long");
    }

    #[test]
    fn may_hold_needle_marks_the_elements_with_a_dot_or_underscore() {
        let words = ["abc", "os.system", "x", "a_b", ""];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for w in words {
            bytes.extend_from_slice(w.as_bytes());
            ends.push(bytes.len() as u32);
        }
        let packed = PackedTexts { bytes: bytes.clone(), ends: ends.clone() };
        assert_eq!(may_hold_needle(&packed), [false, true, false, true, false]);
        // Ends that fall back (a host bug) search every element.
        let broken = PackedTexts { bytes, ends: vec![5, 3, 20] };
        assert_eq!(may_hold_needle(&broken), [true, true, true]);
    }
}
