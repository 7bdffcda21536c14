//! Compiled-component cache.
//!
//! Key: sha256 of the component bytes plus the engine's compatibility hash, so
//! a different wasmtime or different engine settings never reuse an artifact.
//! Deserializing is unsafe (the bytes become executable code), so the sha256
//! of the deserialized image (wasmtime's own read-only copy, exactly what will
//! execute) is checked against the one recorded when the file was written,
//! before anything in it runs. A mismatch is logged and the entry recompiled.

use std::fs;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::artifact::FileBytes;
use crate::store::root::write_atomic;

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
        let file = FileBytes::open(&art).ok()?;
        // SAFETY: the bytes were written by `Component::serialize` with an
        // engine of the same compatibility hash (it is in the file name).
        // Deserializing copies them into memory wasmtime then makes read-only;
        // nothing runs before that copy is checked below, so a corrupt or
        // tampered file is dropped unused.
        let component = match unsafe { Component::deserialize(engine, file.bytes()) } {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot use cache file {}: {e:#}; recompiling", art.display());
                return None;
            }
        };
        let truncated = file.intact().is_err();
        drop(file);
        // Hash the copy that will execute, not the file it came from: the file
        // could change after it was copied.
        let range = component.image_range();
        // SAFETY: the image is owned by `component`, alive and read-only here.
        let image = unsafe { std::slice::from_raw_parts(range.start, range.end as usize - range.start as usize) };
        let actual = hex::encode(Sha256::digest(image));
        if truncated || expected.trim() != actual {
            tracing::warn!(
                "compiled-component cache file {} does not match its recorded sha256 (corrupt or tampered); recompiling",
                art.display()
            );
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
