//! What travels beside a model: its recorded origin and its signatures.
//!
//! They are read once, when the model is opened, into one value that the
//! scan, the plugin host, the manifest and scale-out all take from the
//! [`crate::Model`]. Nothing else reads them from disk, so a model scanned on
//! another machine (a worker's scratch copy) is judged with exactly the
//! sidecars the watcher claimed.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::ModelKind;

/// Files that travel beside a model as `<name><suffix>`: its recorded origin
/// and its signatures. They move with it into quarantine, the registry or
/// rejected/, and are never taken as models of their own.
pub const SIDECAR_SUFFIXES: [&str; 5] = [".origin", ".asc", ".sig", ".sigstore.json", ".model.sig"];

/// The largest `.origin` sidecar read; a larger one is passed on as unreadable.
pub const MAX_ORIGIN: u64 = 8 << 10;
/// The largest signature sidecar read.
pub const MAX_SIGNATURE: u64 = 4 << 20;
/// The extended attribute wget, curl and browsers record a download's URL in.
pub const ORIGIN_XATTR: &str = "user.xdg.origin.url";

/// Where a recorded origin came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OriginSource {
    /// `airlock scan --origin`.
    Flag,
    /// The `<name>.origin` file.
    Sidecar,
    /// The `user.xdg.origin.url` extended attribute.
    Xattr,
}

impl OriginSource {
    pub fn name(self) -> &'static str {
        match self {
            OriginSource::Flag => "flag",
            OriginSource::Sidecar => "sidecar",
            OriginSource::Xattr => "xattr",
        }
    }
}

/// A model's recorded origin. An unreadable or odd sidecar is kept as text
/// that says so; the source stage refuses what is not a clean https URL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub url: String,
    pub source: OriginSource,
}

/// One sidecar file: its bytes, or why they cannot be used (a link, a
/// special file, too large, unreadable). Bytes travel as hex in a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SidecarFile {
    Bytes(#[serde(with = "hex_bytes")] Vec<u8>),
    Unusable(String),
}

/// What travels with a model, as read when it was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecars {
    /// `<name>.origin`, else the origin xattr.
    pub origin: Option<Origin>,
    /// Every sidecar file present, by the suffix a plugin asks for it under
    /// (`.origin`, `.asc`, `.sig`, `.sigstore.json`, `.model.sig`).
    pub files: BTreeMap<String, SidecarFile>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// Where the sidecar a plugin asks for by `suffix` lives for the model at
/// `path`. A file's sidecars sit beside it; a folder's origin sits beside it
/// and its signatures at its root under model-signing's names (a folder has
/// no `.asc`).
pub fn sidecar_path(path: &Path, kind: ModelKind, suffix: &str) -> Option<PathBuf> {
    let beside = || {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    match (kind, suffix) {
        (_, ".origin") | (ModelKind::File, _) => Some(beside()),
        (ModelKind::Folder, ".sig" | ".model.sig") => Some(path.join("model.sig")),
        (ModelKind::Folder, ".sigstore.json") => Some(path.join("model.sigstore.json")),
        (ModelKind::Folder, _) => None,
    }
}

/// Reads one sidecar without following a link or blocking on a FIFO.
/// `None`: there is none.
fn read_bounded(path: &Path, max: u64) -> Option<SidecarFile> {
    let opened = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Some(SidecarFile::Unusable(format!(
                "{} is a symlink; airlock never follows links",
                path.display()
            )));
        }
        Err(e) => return Some(SidecarFile::Unusable(format!("{}: {e}", path.display()))),
    };
    let unusable = || SidecarFile::Unusable(format!("{} is not a regular file of at most {max} bytes", path.display()));
    match file.metadata() {
        Ok(m) if m.is_file() && m.len() <= max => {}
        Ok(_) => return Some(unusable()),
        Err(e) => return Some(SidecarFile::Unusable(format!("{}: {e}", path.display()))),
    }
    let mut bytes = Vec::new();
    match file.take(max + 1).read_to_end(&mut bytes) {
        Ok(_) if bytes.len() as u64 <= max => Some(SidecarFile::Bytes(bytes)),
        Ok(_) => Some(unusable()),
        Err(e) => Some(SidecarFile::Unusable(format!("{}: {e}", path.display()))),
    }
}

/// The origin xattr of the entry itself (xattr's `get` never follows a link).
fn xattr_origin(path: &Path) -> Option<String> {
    let bytes = xattr::get(path, ORIGIN_XATTR).ok()??;
    if bytes.len() as u64 > MAX_ORIGIN {
        return Some(format!("<the {ORIGIN_XATTR} attribute is larger than {MAX_ORIGIN} bytes>"));
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

impl Sidecars {
    /// Reads what travels beside the model at `path`, within the size bounds.
    pub fn read(path: &Path, kind: ModelKind) -> Sidecars {
        let mut files = BTreeMap::new();
        // A folder's `.sig` and `.model.sig` are one file: read it once.
        let mut read: BTreeMap<PathBuf, Option<SidecarFile>> = BTreeMap::new();
        for suffix in SIDECAR_SUFFIXES {
            let Some(p) = sidecar_path(path, kind, suffix) else { continue };
            let max = if suffix == ".origin" { MAX_ORIGIN } else { MAX_SIGNATURE };
            if let Some(f) = read.entry(p).or_insert_with_key(|p| read_bounded(p, max)) {
                files.insert(suffix.to_string(), f.clone());
            }
        }
        let origin = match files.get(".origin") {
            Some(SidecarFile::Bytes(b)) => {
                let text = String::from_utf8_lossy(b);
                let text = text.strip_suffix('\n').unwrap_or(&text).trim_end_matches('\r');
                Some(Origin { url: text.to_string(), source: OriginSource::Sidecar })
            }
            Some(SidecarFile::Unusable(why)) => Some(Origin { url: format!("<{why}>"), source: OriginSource::Sidecar }),
            None => xattr_origin(path).map(|url| Origin { url, source: OriginSource::Xattr }),
        };
        Sidecars { origin, files }
    }

    /// The sha256 of each sidecar (and of the origin, under `origin:<source>`),
    /// so two readings of the same model can be compared in a result.
    pub fn digests(&self) -> BTreeMap<String, String> {
        let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
        let mut out: BTreeMap<String, String> = self
            .files
            .iter()
            .map(|(suffix, f)| {
                let d = match f {
                    SidecarFile::Bytes(b) => sha(b),
                    SidecarFile::Unusable(why) => format!("unusable: {why}"),
                };
                (suffix.clone(), d)
            })
            .collect();
        if let Some(o) = &self.origin {
            out.insert(format!("origin:{}", o.source.name()), sha(o.url.as_bytes()));
        }
        out
    }

    /// The sidecar a plugin asks for: `Ok(None)` when there is none.
    pub fn file(&self, suffix: &str) -> Result<Option<&[u8]>, String> {
        match self.files.get(suffix) {
            None => Ok(None),
            Some(SidecarFile::Bytes(b)) => Ok(Some(b)),
            Some(SidecarFile::Unusable(why)) => Err(format!("sidecar {suffix}: {why}")),
        }
    }

    /// Total bytes held, for bounding a job message.
    pub fn size(&self) -> usize {
        self.files.values().map(|f| if let SidecarFile::Bytes(b) = f { b.len() } else { 0 }).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_sidecars_and_a_folders_are_read_from_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.gguf");
        fs::write(&m, b"x").unwrap();
        fs::write(dir.path().join("m.gguf.origin"), b"https://example.org/m.gguf\n").unwrap();
        fs::write(dir.path().join("m.gguf.asc"), b"sig").unwrap();
        let s = Sidecars::read(&m, ModelKind::File);
        assert_eq!(s.origin, Some(Origin { url: "https://example.org/m.gguf".into(), source: OriginSource::Sidecar }));
        assert_eq!(s.file(".asc"), Ok(Some(&b"sig"[..])));
        assert_eq!(s.file(".sig"), Ok(None));

        let f = dir.path().join("folder");
        fs::create_dir(&f).unwrap();
        fs::write(f.join("model.sig"), b"bundle").unwrap();
        let s = Sidecars::read(&f, ModelKind::Folder);
        assert_eq!(s.origin, None);
        assert_eq!(s.file(".model.sig"), Ok(Some(&b"bundle"[..])));
        assert_eq!(s.file(".sig"), Ok(Some(&b"bundle"[..])));
        assert_eq!(s.file(".asc"), Ok(None));
    }

    #[test]
    fn links_and_oversized_sidecars_are_unusable_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("m.gguf");
        fs::write(&m, b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("m.gguf.origin")).unwrap();
        fs::write(dir.path().join("m.gguf.sig"), vec![0u8; MAX_SIGNATURE as usize + 1]).unwrap();
        let s = Sidecars::read(&m, ModelKind::File);
        let origin = s.origin.clone().unwrap();
        assert!(origin.url.contains("symlink"), "{origin:?}");
        assert!(s.file(".sig").unwrap_err().contains("at most"), "{:?}", s.file(".sig"));
        // The value survives a job message unchanged.
        let back: Sidecars = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.digests(), s.digests());
    }
}
