//! Crash-safe file writes, shared by the plugin cache and the quarantine store,
//! and the one reader of secret files (serve's token, a worker's signing key).

use std::fs;
use std::io;
use std::path::Path;

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

/// Reads a secret file, as ssh treats a private key: a regular file (a FIFO
/// would hang the read), closed to group and others, at most `max_bytes`.
/// `what` names it in every error (`--token-file`, `the signing key`).
pub fn read_secret(path: &Path, what: &str, max_bytes: u64) -> anyhow::Result<String> {
    use anyhow::{Context, bail};
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {}: not a regular file", path.display());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!(
            "{what} {}: readable by group or others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    if meta.len() > max_bytes {
        bail!("{what} {}: {} bytes; it holds one line", path.display(), meta.len());
    }
    fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))
}
