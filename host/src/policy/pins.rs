//! Pins: `state/models.lock.yaml`, read and written here only. A model's
//! sha256 (a file) or its files' sha256s (a folder) are recorded on its first
//! promotion; the integrity stage checks every later scan of that name
//! against them.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{PolicyError, UniqueMap, is_sha256, line_of, parse_yaml, read};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PinsFile {
    /// File models: name -> sha256. (Unquoted hex that YAML would read as a
    /// number still arrives as text, because the target is a string.)
    #[serde(default)]
    models: UniqueMap<String, String>,
    /// Folder models: name -> (path -> sha256).
    #[serde(default)]
    folders: UniqueMap<String, UniqueMap<String, String>>,
}

/// A model's pin in `models.lock.yaml`: one sha256 for a file model (under
/// `models`), one per file, by path in the folder, for a folder model (under `folders`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    File(String),
    Folder(BTreeMap<String, String>),
}

/// Pins: model name → sha256, from `models.lock.yaml`.
pub fn load_pins(path: &Path) -> Result<BTreeMap<String, Pin>, PolicyError> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let file = path.display().to_string();
    let text = read(path)?;
    let pins: PinsFile = parse_yaml(&file, &text)?;
    let invalid = |key: String, message: String| PolicyError::Invalid {
        line: line_of(&text, &key),
        file: file.clone(),
        key,
        message,
    };
    let mut out = BTreeMap::new();
    for (name, sha) in pins.models.0 {
        if !is_sha256(&sha) {
            return Err(invalid(format!("models.{name}"), format!("{sha:?} is not 64 hex digits")));
        }
        out.insert(name, Pin::File(sha));
    }
    for (name, files) in pins.folders.0 {
        if let Some((p, sha)) = files.0.iter().find(|(_, sha)| !is_sha256(sha)) {
            return Err(invalid(format!("folders.{name}.{p}"), format!("{sha:?} is not 64 hex digits")));
        }
        if out.contains_key(&name) {
            return Err(invalid(format!("folders.{name}"), format!("{name} is pinned under models too")));
        }
        out.insert(name, Pin::Folder(files.0));
    }
    Ok(out)
}

/// Records `pin` for `name` unless the name is pinned already (a pin is never
/// replaced: a changed model must fail integrity, not re-pin itself).
pub fn record_pin(path: &Path, name: &str, pin: Pin) -> io::Result<()> {
    let mut pins = load_pins(path).map_err(io::Error::other)?;
    if pins.contains_key(name) {
        return Ok(());
    }
    pins.insert(name.to_string(), pin);
    crate::fsutil::write_atomic(path, pins_yaml(&pins).as_bytes())
}

fn pins_yaml(pins: &BTreeMap<String, Pin>) -> String {
    #[derive(Serialize)]
    struct Pins<'a> {
        models: BTreeMap<&'a str, &'a str>,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        folders: BTreeMap<&'a str, &'a BTreeMap<String, String>>,
    }
    let mut out = Pins { models: BTreeMap::new(), folders: BTreeMap::new() };
    for (name, pin) in pins {
        match pin {
            Pin::File(sha) => {
                out.models.insert(name, sha);
            }
            Pin::Folder(files) => {
                out.folders.insert(name, files);
            }
        }
    }
    format!(
        "# Pins, recorded on first promotion: models: name -> sha256 (a file); folders: name -> path -> sha256.\n{}",
        serde_norway::to_string(&out).unwrap_or_default()
    )
}
