//! The data root and its folders.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// fsyncs a folder, so renames into or out of it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes a file through a temporary name, fsync and rename: readers and a
/// crash see the old content or the new, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}
