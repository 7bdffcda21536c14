//! The data root and its folders.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// `<root>/quarantine/{incoming,scanning,rejected}`, `<root>/registry`, `<root>/state`.
#[derive(Clone, Debug)]
pub struct Root {
    pub path: PathBuf,
}

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Root {
        Root { path: path.into() }
    }
    pub fn incoming(&self) -> PathBuf {
        self.path.join("quarantine/incoming")
    }
    pub fn scanning(&self) -> PathBuf {
        self.path.join("quarantine/scanning")
    }
    pub fn rejected(&self) -> PathBuf {
        self.path.join("quarantine/rejected")
    }
    pub fn registry(&self) -> PathBuf {
        self.path.join("registry")
    }
    pub fn state(&self) -> PathBuf {
        self.path.join("state")
    }
    pub fn pins(&self) -> PathBuf {
        self.state().join("models.lock.yaml")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.state().join("audit.jsonl")
    }
    pub fn plugin_cache(&self) -> PathBuf {
        self.state().join("plugin-cache")
    }
    pub fn index(&self) -> PathBuf {
        self.registry().join("index.json")
    }

    /// Creates every folder. `incoming/` is group-writable (operators and download
    /// tools drop models there); everything else is the service's alone.
    pub fn init(&self) -> io::Result<()> {
        let dirs: [(PathBuf, u32); 7] = [
            (self.path.clone(), 0o755),
            (self.path.join("quarantine"), 0o755),
            (self.incoming(), 0o770),
            (self.scanning(), 0o700),
            (self.rejected(), 0o750),
            (self.registry(), 0o755),
            (self.state(), 0o700),
        ];
        for (dir, mode) in dirs {
            fs::create_dir_all(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    /// Fails, naming the folder, unless `init` has been run.
    pub fn check(&self) -> io::Result<()> {
        for d in [self.incoming(), self.scanning(), self.rejected(), self.registry(), self.state()] {
            if !d.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} does not exist: run `airlock init --root {}`", d.display(), self.path.display()),
                ));
            }
        }
        Ok(())
    }
}

pub use crate::fsutil::{sync_dir, write_atomic};
