//! Stage 2: is every file of the model in an allowed container format, with a
//! header that parses strictly, and nothing else hiding in it?

use airlock_sdk::{File, Finding, Format, Model, Report, Severity, Stage, StageInfo, context, pickle};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_allowed")]
    allowed_formats: Vec<String>,
    #[serde(default = "default_denied")]
    denied_formats: Vec<String>,
    /// What the files of a folder model (diffusers) may be.
    #[serde(default = "default_folder_allowed")]
    folder_allowed_formats: Vec<String>,
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

/// Checks one file. `Err` is the rejection reason plus its finding.
fn check(file: &File, allowed: &[String], denied: &[String]) -> Result<(), (String, Finding)> {
    let path = file.path();
    let format = file.format();
    let name = format.name();
    let reject =
        |rule: &str, reason: String| (reason.clone(), Finding::new(rule, Severity::Critical, reason).at(path.clone()));

    if denied.iter().any(|d| d == name) {
        return Err(reject("format.denied", format!("{path}: format \"{name}\" is denied by policy")));
    }
    if !allowed.iter().any(|a| a == name) {
        return Err(reject(
            "format.not-allowed",
            format!("{path}: format \"{name}\" is not allowed by policy (allowed: {})", allowed.join(", ")),
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
    if let Some(err) = file.parse_error() {
        return Err(reject("format.parse-error", format!("{path}: {name} header is invalid: {err}")));
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
        let allowed = if model.kind() == "folder" { &config.folder_allowed_formats } else { &config.allowed_formats };
        let mut formats: Vec<&'static str> = Vec::new();
        for file in &files {
            if let Err((reason, finding)) = check(file, allowed, &config.denied_formats) {
                // A single-file model's path is the model itself: keep the reason short.
                let reason = if files.len() == 1 {
                    reason.strip_prefix(&format!("{}: ", file.path())).map(str::to_owned).unwrap_or(reason)
                } else {
                    reason
                };
                return Report::fail(reason).finding(finding);
            }
            let name = file.format().name();
            if !formats.contains(&name) {
                formats.push(name);
            }
        }
        Report::pass(formats.join(", "))
    }
}

airlock_sdk::export_stage!(FormatGate);
