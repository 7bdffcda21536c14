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

    /// The commit lock: an exclusive flock(2) on `state/commit.lock`, held
    /// while a model moves into `registry/` or `rejected/` and its record is
    /// written, and while `rescan` moves one back. It is a file lock, not a
    /// mutex, because `rescan` runs in its own process (the CLI, `serve`)
    /// beside the watcher: without it a rescan could take a model whose
    /// rejection was half written, and the next rejection would find the old
    /// report and have to pick a suffixed name. flock locks taken through
    /// separate opens exclude each other within one process too, so it also
    /// serialises the watcher's own threads. Released when the file is dropped.
    pub fn commit_lock(&self) -> io::Result<fs::File> {
        let path = self.state().join("commit.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        file.lock().map_err(|e| io::Error::new(e.kind(), format!("locking {}: {e}", path.display())))?;
        Ok(file)
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

/// An exclusive lock on `state/watch.lock`, held for the life of a watcher:
/// two watchers on one root would race each other's claims and audit entries.
/// flock(2), released when the file is closed (and so when the process dies).
pub struct WatchLock(#[allow(dead_code)] fs::File);

impl Root {
    /// Takes the watch lock without waiting; another watcher holding it is an error naming the file.
    pub fn lock_watch(&self) -> io::Result<WatchLock> {
        let path = self.state().join("watch.lock");
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)?;
        match f.try_lock() {
            Ok(()) => Ok(WatchLock(f)),
            Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("another `airlock watch` holds {} for this root", path.display()),
            )),
            Err(fs::TryLockError::Error(e)) => {
                Err(io::Error::new(e.kind(), format!("locking {}: {e}", path.display())))
            }
        }
    }
}
