//! Compiled-component cache.
//!
//! Key: sha256 of the component bytes plus the engine's compatibility hash, so
//! a different wasmtime or different engine settings never reuse an artifact.
//! Deserializing is unsafe (the bytes become executable code), so the sha256
//! of the deserialized image (exactly what will execute) is checked against
//! the one recorded when the file was written, before anything in it runs. A
//! mismatch is logged and the entry recompiled. The image is the file mapped
//! in place when only this user can write it and its directory, and a
//! read-only copy otherwise.

use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::artifact::FileBytes;
use crate::fsutil::write_atomic;

/// Feeds `Hash` output into sha256 (std's hashers are not stable across builds).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0 // unused: the digest is taken with `finalize`
    }
}

pub fn engine_hash(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(h.0.finalize())
}

pub struct Cache {
    dir: PathBuf,
    engine_hash: String,
}

impl Cache {
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        Cache { dir, engine_hash: engine_hash(engine) }
    }

    fn paths(&self, component_sha256: &str) -> (PathBuf, PathBuf) {
        let base = format!("{component_sha256}-{}", &self.engine_hash[..16]);
        (self.dir.join(format!("{base}.cwasm")), self.dir.join(format!("{base}.cwasm.sha256")))
    }

    /// A cached compilation, if present and intact.
    pub fn get(&self, engine: &Engine, component_sha256: &str) -> Option<Component> {
        let (art, sum) = self.paths(component_sha256);
        let expected = fs::read_to_string(&sum).ok()?;
        // SAFETY (both calls): the bytes were written by `Component::serialize`
        // with an engine of the same compatibility hash (it is in the file
        // name), and nothing in them runs before the image is checked below,
        // so a corrupt or tampered file is dropped unused.
        let loaded = if only_we_can_change(&art) {
            // Mapped in place (no copy): once checked, no one but this user
            // (who could change the process itself) can write the file. A
            // rewrite by another airlock replaces it by rename, which leaves
            // this map on the old file.
            unsafe { Component::deserialize_file(engine, &art) }
        } else {
            // Copied into memory wasmtime then makes read-only.
            FileBytes::open(&art).map_err(wasmtime::Error::from).and_then(|file| {
                let c = unsafe { Component::deserialize(engine, file.bytes()) }?;
                file.intact()?;
                Ok(c)
            })
        };
        let component = match loaded {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot use cache file {}: {e:#}; recompiling", art.display());
                return None;
            }
        };
        // Hash the image that will execute, not the file it came from.
        let range = component.image_range();
        // SAFETY: the image is owned by `component`, alive and read-only here.
        let image = unsafe { std::slice::from_raw_parts(range.start, range.end as usize - range.start as usize) };
        if expected.trim() != hex::encode(Sha256::digest(image)) {
            tracing::warn!(
                "compiled-component cache file {} does not match its recorded sha256 (corrupt or tampered); recompiling",
                art.display()
            );
            drop(component);
            let _ = fs::remove_file(&art);
            return None;
        }
        Some(component)
    }

    /// Stores a compilation. Failure to write is logged, never fatal.
    pub fn put(&self, component_sha256: &str, component: &Component) {
        if let Err(e) = self.try_put(component_sha256, component) {
            tracing::warn!("cannot write the compiled-component cache in {}: {e:#}", self.dir.display());
        }
    }

    fn try_put(&self, component_sha256: &str, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        fs::create_dir_all(&self.dir)?;
        let (art, sum) = self.paths(component_sha256);
        write_atomic(&art, &bytes)?;
        write_atomic(&sum, hex::encode(Sha256::digest(&bytes)).as_bytes())?;
        Ok(())
    }
}

/// Whether only this process's user can change `path`: a regular file, not a
/// link, owned by the effective user and writable by no group or other user,
/// in a directory that is the same.
fn only_we_can_change(path: &Path) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let ours = |m: &fs::Metadata| m.uid() == euid && m.mode() & 0o022 == 0;
    let file = fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && ours(&m));
    let dir = path.parent().and_then(|d| fs::symlink_metadata(d).ok()).is_some_and(|m| m.is_dir() && ours(&m));
    file && dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Only a file no one else can write, in a directory no one else can
    /// write, is run in place; anything else is copied first.
    #[test]
    fn only_a_file_no_one_else_can_write_is_mapped_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let set = |p: &Path, mode: u32| fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
        set(dir.path(), 0o755);
        let art = dir.path().join("x.cwasm");
        fs::write(&art, b"compiled").unwrap();
        set(&art, 0o644);
        assert!(only_we_can_change(&art));
        set(&art, 0o664);
        assert!(!only_we_can_change(&art), "group-writable file");
        set(&art, 0o644);
        set(dir.path(), 0o777);
        assert!(!only_we_can_change(&art), "world-writable directory");
        set(dir.path(), 0o755);
        let link = dir.path().join("link.cwasm");
        std::os::unix::fs::symlink(&art, &link).unwrap();
        assert!(!only_we_can_change(&link), "a link");
        assert!(!only_we_can_change(&dir.path().join("missing.cwasm")));
    }
}
