//! Stage 2: is every file of the model in an allowed container format, with a
//! header that parses strictly, and nothing else hiding in it? In a folder
//! model: no code a Python loader could import, and sharded weights whose
//! index accounts for every shard and every tensor, exactly.

use std::collections::BTreeMap;

use airlock_sdk::{ChunkReader, File, Finding, Format, Model, Report, Severity, Stage, StageInfo, context, pickle};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_allowed")]
    allowed_formats: Vec<String>,
    #[serde(default = "default_denied")]
    denied_formats: Vec<String>,
    /// What the files of a folder model may be.
    #[serde(default = "default_folder_allowed")]
    folder_allowed_formats: Vec<String>,
    /// Name endings refused in a folder model whatever their content: code a
    /// loader can import (`trust_remote_code` runs a folder's `.py` files).
    #[serde(default = "default_folder_code")]
    folder_denied_suffixes: Vec<String>,
    /// More name endings a folder may carry as text, beside the built-in
    /// text names (docs/folders.md).
    #[serde(default)]
    folder_text_suffixes: Vec<String>,
}

fn default_folder_code() -> Vec<String> {
    [".py", ".pyc", ".pyo", ".pyd", ".pyx", ".pyw", ".so", ".dll", ".dylib"].map(String::from).to_vec()
}

fn default_folder_allowed() -> Vec<String> {
    ["safetensors", "json", "text"].map(String::from).to_vec()
}

fn default_allowed() -> Vec<String> {
    vec!["gguf".into(), "safetensors".into()]
}
fn default_denied() -> Vec<String> {
    ["pickle", "pytorch-zip", "zip"].map(String::from).to_vec()
}

/// Bytes of tail we look at for zip structures: the end-of-central-directory
/// record is 22 bytes plus a comment of at most 65535.
const ZIP_TAIL: u64 = 22 + 65_535;

/// A zip end-of-central-directory record that is consistent with the file's
/// end (its comment runs exactly to EOF and its central directory lies before
/// it). Random tensor bytes practically never satisfy all of that.
fn zip_eocd(file: &File) -> Result<Option<u64>, String> {
    let size = file.size();
    if size < 22 {
        return Ok(None);
    }
    let start = size.saturating_sub(ZIP_TAIL);
    let tail = file.read(start, (size - start) as u32)?;
    for i in (0..=tail.len() - 22).rev() {
        if &tail[i..i + 4] != b"PK\x05\x06" {
            continue;
        }
        let comment_len = u16::from_le_bytes([tail[i + 20], tail[i + 21]]) as usize;
        let cd_size = u32::from_le_bytes(tail[i + 12..i + 16].try_into().unwrap()) as u64;
        let cd_offset = u32::from_le_bytes(tail[i + 16..i + 20].try_into().unwrap()) as u64;
        let at = start + i as u64;
        if i + 22 + comment_len == tail.len() && cd_offset.saturating_add(cd_size) <= at {
            return Ok(Some(at));
        }
    }
    Ok(None)
}

/// Where the declared data ends, when something follows it: from the parsed
/// header, or from a parse error about bytes after the data.
fn appended_at(file: &File) -> Option<u64> {
    if let Some(e) = file.parse_error() {
        return matches!(e.field.as_str(), "trailing bytes" | "trailing padding").then_some(e.offset);
    }
    let data = file.data_offset()?;
    let end = file.tensors().iter().map(|t| t.offset.saturating_add(t.length)).max().unwrap_or(data).max(data);
    (end < file.size()).then_some(end)
}

/// What was appended at `at`, if it is a zip or a pickle (after any zero padding).
fn appended_kind(file: &File, at: u64) -> Option<&'static str> {
    let tail = file.read(at, (file.size() - at).min(1 << 16) as u32).ok()?;
    let start = tail.iter().position(|&b| b != 0)?;
    let tail = &tail[start..];
    if tail.starts_with(b"PK\x03\x04") {
        Some("a zip archive")
    } else if pickle::stream_at_start(tail).is_some_and(|s| !s.code_ops.is_empty() || tail.first() == Some(&0x80)) {
        Some("a pickle stream")
    } else {
        None
    }
}

/// Names that claim to be weights, with the formats such a file may be.
/// `.bin`, `.pt` and the like are any weights container (a GGUF named
/// `ggml-model.bin` is common); the rest name one format. Formats airlock
/// cannot read (HDF5, msgpack, TFLite) list none, so such a file is refused.
const WEIGHT_NAMES: &[(&str, &[Format])] = &[
    (".safetensors", &[Format::Safetensors]),
    (".gguf", &[Format::Gguf]),
    (".onnx", &[Format::Onnx]),
    (".npy", &[Format::Numpy]),
    (".npz", &[Format::Zip]),
    (".keras", &[Format::Zip]),
    (".pkl", &[Format::Pickle]),
    (".pickle", &[Format::Pickle]),
    (".joblib", &[Format::Pickle]),
    (".bin", ANY_WEIGHTS),
    (".pt", ANY_WEIGHTS),
    (".pth", ANY_WEIGHTS),
    (".ckpt", ANY_WEIGHTS),
    (".h5", &[]),
    (".hdf5", &[]),
    (".msgpack", &[]),
    (".tflite", &[]),
    (".pb", &[]),
    (".mlmodel", &[]),
];

const ANY_WEIGHTS: &[Format] =
    &[Format::Safetensors, Format::Gguf, Format::Pickle, Format::PytorchZip, Format::Zip, Format::Numpy, Format::Onnx];

/// The formats a file's name claims it is, if it is named as weights.
fn named_as_weights(path: &str) -> Option<(&'static str, &'static [Format])> {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    WEIGHT_NAMES.iter().find(|(suffix, _)| name.ends_with(suffix)).map(|(s, f)| (*s, *f))
}

/// Names a model folder carries as plain text: docs, licences, vocabularies,
/// chat templates, git and Hugging Face download metadata (docs/folders.md).
/// Bytes that read as text under any other name are refused: a protocol-0
/// pickle is printable ASCII, and `torch.load` does not care about the name.
fn is_text_name(path: &str, extra: &[String]) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    const EXACT: &[&str] = &[
        "readme",
        "license",
        "licence",
        "notice",
        "copying",
        "authors",
        "citation",
        "usage",
        "use_policy",
        ".gitattributes",
        ".gitignore",
        "merges.txt",
        "vocab.txt",
        "sha256sums",
        "sha512sums",
        "md5sums",
        "checksums",
    ];
    const SUFFIXES: &[&str] =
        &[".md", ".txt", ".rst", ".jinja", ".j2", ".yaml", ".yml", ".cff", ".csv", ".tsv", ".tiktoken", ".json"];
    let hf_download_metadata = path.starts_with(".cache/huggingface/") && name.ends_with(".metadata");
    EXACT.contains(&name.as_str())
        || name.starts_with("license")
        || name.starts_with("licence")
        || name.starts_with("readme")
        || SUFFIXES.iter().any(|s| name.ends_with(s))
        || hf_download_metadata
        || extra.iter().any(|s| name.ends_with(&s.to_ascii_lowercase()))
}

/// Checks one file. `Err` is the rejection reason plus its finding.
fn check(file: &File, config: &Config, folder: bool) -> Result<(), (String, Finding)> {
    let allowed = if folder { &config.folder_allowed_formats } else { &config.allowed_formats };
    let denied = &config.denied_formats;
    let path = file.path();
    let format = file.format();
    let name = format.name();
    let reject =
        |rule: &str, reason: String| (reason.clone(), Finding::new(rule, Severity::Critical, reason).at(path.clone()));
    let weights = named_as_weights(&path);
    // Tool leftovers: an empty file (a download tool's `.lock`) carries no
    // bytes to load. One named as weights is refused below, named as such.
    if folder && file.size() == 0 && weights.is_none() {
        return Ok(());
    }

    // The name and the content must agree: a loader picks its reader by
    // name. In a folder it is checked first when the content is no weights
    // container at all (text, JSON, unknown or empty bytes under a weights
    // name); otherwise the policy's format lists speak first.
    let mismatch = || -> Option<(String, Finding)> {
        let (suffix, formats) = weights?;
        if formats.contains(&format) {
            return None;
        }
        let claimed = if formats.is_empty() {
            format!("a {suffix} weights file, a format airlock cannot read")
        } else {
            format!("{} weights", formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(" or "))
        };
        let content = if file.size() == 0 { "empty (0 bytes)".to_string() } else { name.to_string() };
        Some(reject(
            "format.name-mismatch",
            format!("{path}: named as {claimed} ({suffix}), but its content is {content}"),
        ))
    };
    if folder
        && !ANY_WEIGHTS.contains(&format)
        && let Some(refused) = mismatch()
    {
        return Err(refused);
    }
    if denied.iter().any(|d| d == name) {
        return Err(reject("format.denied", format!("{path}: format \"{name}\" is denied by policy")));
    }
    if !allowed.iter().any(|a| a == name) {
        return Err(reject(
            "format.not-allowed",
            format!("{path}: format \"{name}\" is not allowed by policy (allowed: {})", allowed.join(", ")),
        ));
    }
    if folder && format == Format::Text && !is_text_name(&path, &config.folder_text_suffixes) {
        return Err(reject(
            "format.text-name",
            format!(
                "{path}: its content is text, but its name is not one a model folder carries as text (README, \
                 LICENSE, *.md, *.txt, vocab.txt, merges.txt, *.jinja, ...); text under another name can be a \
                 protocol-0 pickle"
            ),
        ));
    }
    // Polyglots: a zip directory at the tail makes the file a zip too.
    match zip_eocd(file) {
        Ok(Some(at)) => {
            return Err(reject(
                "format.polyglot.zip",
                format!(
                    "{path}: polyglot: a zip end-of-central-directory record at offset {at} makes this {name} file a zip archive too"
                ),
            ));
        }
        Ok(None) => {}
        Err(e) => return Err(reject("format.read-error", format!("{path}: cannot read: {e}"))),
    }
    // Polyglots: a pickle or zip stream appended after the declared data.
    if let Some(at) = appended_at(file)
        && let Some(what) = appended_kind(file, at)
    {
        return Err(reject(
            "format.polyglot.appended",
            format!("{path}: polyglot: {what} is appended after the data at offset {at}"),
        ));
    }
    // Polyglots: a pickle stream that parses from byte 0 (with imports or calls).
    if format != Format::Pickle
        && let Ok(head) = file.read(0, 1 << 16)
        && pickle::stream_at_start(&head).is_some_and(|s| !s.code_ops.is_empty())
    {
        return Err(reject(
            "format.polyglot.pickle",
            format!("{path}: polyglot: the first bytes also form a pickle stream that imports or calls"),
        ));
    }
    // After the polyglot checks, whose reasons say more: a container of
    // another kind under a weights name (a GGUF named .safetensors).
    if let Some(refused) = mismatch() {
        return Err(refused);
    }
    if let Some(err) = file.parse_error() {
        return Err(reject("format.parse-error", format!("{path}: {name} header is invalid: {err}")));
    }
    Ok(())
}

/// Largest shard index read: a 1000-shard model's is a few MB.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// A rejection: the reason, and the finding that carries it.
type Refusal = (String, Finding);

fn refuse(rule: &str, location: &str, reason: String) -> Refusal {
    (reason.clone(), Finding::new(rule, Severity::Critical, reason).at(location.to_string()))
}

/// `name` joined to the folder `dir` ("" for the root), if `name` is a plain
/// relative path that stays inside: no `..`, `.`, empty part, backslash or leading `/`.
fn inside(dir: &str, name: &str) -> Option<String> {
    let plain = !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    plain.then(|| if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") })
}

/// The largest `config.json` read for its layer count; a real one is a few KiB.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Path segments that number a model's layers in tensor names (`model.layers.3.`,
/// `encoder.layer.3.`, GPT-2's `h.3.`, `blocks.3.`, T5's `block.3.`, GGUF's `blk.3.`).
const LAYER_SEGMENTS: [&str; 6] = ["layers", "layer", "h", "blocks", "block", "blk"];

/// The weights must cover the layers the root `config.json` names
/// (`num_hidden_layers`, `n_layer` or `num_layers`): a folder whose weight
/// files number their layers but lack some of them would load with those
/// layers left at random values, or be padded out by tensors the gate never
/// saw. Weights that number no layers at all (ALBERT shares one) are not
/// judged here, nor is a config this check cannot read (metadata_gadgets
/// judges that).
fn check_config_layers(files: &[File]) -> Result<(), Refusal> {
    let Some(config) = files.iter().find(|f| f.path() == "config.json") else { return Ok(()) };
    if config.size() > MAX_CONFIG_BYTES {
        return Ok(());
    }
    let Ok(bytes) = ChunkReader::file(config).collect_bytes() else { return Ok(()) };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return Ok(()) };
    let Some((key, layers)) = ["num_hidden_layers", "n_layer", "num_layers"]
        .into_iter()
        .find_map(|k| json.get(k).and_then(|v| v.as_u64()).map(|n| (k, n)))
    else {
        return Ok(());
    };
    let mut numbered: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    for f in files.iter().filter(|f| matches!(f.format(), Format::Safetensors | Format::Gguf)) {
        for t in f.tensors() {
            let parts: Vec<&str> = t.name.split('.').collect();
            for w in parts.windows(2) {
                if LAYER_SEGMENTS.contains(&w[0])
                    && let Ok(i) = w[1].parse::<u64>()
                {
                    numbered.insert(i);
                }
            }
        }
    }
    if numbered.is_empty() {
        return Ok(());
    }
    // Walks only as far as the fifth gap: bounded by the tensors, whatever the config says.
    let mut missing = Vec::new();
    let mut i = 0;
    while i < layers && missing.len() < 5 {
        if !numbered.contains(&i) {
            missing.push(i);
        }
        i += 1;
    }
    if missing.is_empty() {
        return Ok(());
    }
    let present = numbered.range(..layers).count() as u64;
    let more = (layers - present).saturating_sub(missing.len() as u64);
    let reason = format!(
        "config.json says {key}: {layers}, but the weights hold tensors for only {present} of those layers: none \
         for layer(s) {}{}",
        missing.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    );
    Err(refuse("format.layers-missing", "config.json", reason))
}

/// A `*.safetensors.index.json`: its `weight_map` names only shards inside
/// the folder, each of them exists and is safetensors, every tensor it maps
/// is in the shard it names, no tensor is in two shards or missing from the
/// map, and no weight file beside the index goes unnamed.
fn check_index(index: &File, files: &[File]) -> Result<(), Refusal> {
    let path = index.path();
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    if index.size() > MAX_INDEX_BYTES {
        return Err(refuse(
            "format.index.too-large",
            &path,
            format!("{path}: {} bytes is larger than any real shard index ({MAX_INDEX_BYTES} at most)", index.size()),
        ));
    }
    let bytes = ChunkReader::file(index)
        .collect_bytes()
        .map_err(|e| refuse("format.read-error", &path, format!("{path}: cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| refuse("format.index.unparseable", &path, format!("{path}: not valid JSON: {e}")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(refuse("format.index.unparseable", &path, format!("{path}: no \"weight_map\" object")));
    };
    // The shards, by their path in the model, with the tensors the map puts there.
    let mut shards: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(refuse(
                "format.index.unparseable",
                &path,
                format!("{path}: weight_map[{tensor:?}] is not a file name"),
            ));
        };
        let Some(at) = inside(&dir, shard) else {
            return Err(refuse(
                "format.index.path",
                &path,
                format!("{path}: weight_map[{tensor:?}] names {shard:?}, which is not a plain path inside the folder"),
            ));
        };
        shards.entry(at).or_default().push(tensor);
    }
    // Each path is a host call: asked once per file, not once per shard and file.
    let by_path: BTreeMap<String, &File> = files.iter().map(|f| (f.path(), f)).collect();
    // Where each tensor really is, over every named shard.
    let mut found: BTreeMap<String, &str> = BTreeMap::new();
    for (at, mapped) in &shards {
        let Some(file) = by_path.get(at) else {
            return Err(refuse(
                "format.index.missing-shard",
                &path,
                format!("{path}: names the shard {at}, which is not in the folder (or is a link, never followed)"),
            ));
        };
        if file.format() != Format::Safetensors {
            return Err(refuse(
                "format.index.not-safetensors",
                at,
                format!("{at}: named as a shard by {path}, but it is {}", file.format().name()),
            ));
        }
        for t in file.tensors() {
            if let Some(other) = found.insert(t.name.clone(), at) {
                return Err(refuse(
                    "format.index.tensor-duplicated",
                    at,
                    format!(
                        "{at}: tensor {:?} is also in {other}: which one a loader takes is up to the loader",
                        t.name
                    ),
                ));
            }
        }
        for tensor in mapped {
            if found.get(*tensor) != Some(&at.as_str()) {
                return Err(refuse(
                    "format.index.tensor-missing",
                    at,
                    format!("{path}: maps tensor {tensor:?} to {at}, which does not hold it"),
                ));
            }
        }
    }
    if let Some((tensor, at)) = found.iter().find(|(t, _)| !map.contains_key(t.as_str())) {
        return Err(refuse(
            "format.index.tensor-unlisted",
            at,
            format!("{at}: tensor {tensor:?} is not in {path}: weights the index does not account for"),
        ));
    }
    // Weight files beside the index that it does not name.
    for (fp, f) in &by_path {
        let beside = fp.rsplit_once('/').map_or("", |(d, _)| d) == dir;
        if beside && f.format() == Format::Safetensors && !shards.contains_key(fp) {
            return Err(refuse(
                "format.index.unlisted-shard",
                fp,
                format!("{fp}: a weight file beside {path} that the index does not name"),
            ));
        }
    }
    Ok(())
}

/// Code a loader can import, by name: in a folder, whatever its content.
fn check_code_names(files: &[File], denied_suffixes: &[String]) -> Result<(), Refusal> {
    for f in files {
        let path = f.path();
        let name = path.rsplit('/').next().unwrap_or(&path);
        if let Some(suffix) = denied_suffixes.iter().find(|s| name.ends_with(s.as_str())) {
            return Err(refuse(
                "format.code-file",
                &path,
                format!("{path}: a {suffix} file in a model folder is code a loader can import; models carry no code"),
            ));
        }
    }
    Ok(())
}

struct FormatGate;

impl Stage for FormatGate {
    fn describe() -> StageInfo {
        StageInfo::new(
            "format_gate",
            env!("CARGO_PKG_VERSION"),
            "allows only policy-approved container formats with strictly valid headers, and refuses polyglots",
        )
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let files = model.files();
        if files.is_empty() {
            return Report::fail("the model has no regular files");
        }
        // A folder's links and special files are never followed by the host; a
        // model that contains them is refused here, naming the entry.
        if let Some(s) = model.surroundings().first() {
            let reason = format!(
                "{}: the model folder holds a {}{}; links and special files are not accepted in models",
                s.path,
                s.kind,
                if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) }
            );
            let finding =
                Finding::new(format!("format.{}", s.kind), Severity::Critical, reason.clone()).at(s.path.clone());
            return Report::fail(reason).finding(finding);
        }
        let folder = model.kind() == "folder";
        if folder && let Err((reason, finding)) = check_code_names(&files, &config.folder_denied_suffixes) {
            return Report::fail(reason).finding(finding);
        }
        let mut formats: Vec<&'static str> = Vec::new();
        for file in &files {
            if let Err((reason, finding)) = check(file, &config, folder) {
                // A single-file model's path is the model itself: keep the reason short.
                let reason = if files.len() == 1 {
                    reason.strip_prefix(&format!("{}: ", file.path())).map(str::to_owned).unwrap_or(reason)
                } else {
                    reason
                };
                return Report::fail(reason).finding(finding);
            }
            let name = if folder && file.size() == 0 { "empty" } else { file.format().name() };
            if !formats.contains(&name) {
                formats.push(name);
            }
        }
        // A model has weights: a folder whose weight files hold no tensor is
        // a config and a tokenizer around nothing (or around a payload the
        // gate refused to call weights).
        if folder {
            let tensors: usize = files
                .iter()
                .filter(|f| matches!(f.format(), Format::Safetensors | Format::Gguf))
                .map(|f| f.tensors().len())
                .sum();
            if tensors == 0 {
                let reason = "the model folder holds no weights: no safetensors or GGUF file with a tensor".to_string();
                let finding = Finding::new("format.no-weights", Severity::Critical, reason.clone());
                return Report::fail(reason).finding(finding);
            }
        }
        // Each shard has passed the strict gate above; now the index that joins them.
        let indexes: Vec<&File> = files.iter().filter(|f| f.path().ends_with(".safetensors.index.json")).collect();
        for index in &indexes {
            if let Err((reason, finding)) = check_index(index, &files) {
                return Report::fail(reason).finding(finding);
            }
        }
        // After the index: a missing shard is named as such, not as the layers it held.
        if folder && let Err((reason, finding)) = check_config_layers(&files) {
            return Report::fail(reason).finding(finding);
        }
        let shards = indexes.len();
        let indexed = if shards > 0 {
            format!("; {shards} shard index(es) account for every shard and tensor")
        } else {
            String::new()
        };
        Report::pass(format!("{}{indexed}", formats.join(", ")))
    }
}

airlock_sdk::export_stage!(FormatGate);
