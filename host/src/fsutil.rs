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
/// crash see the old content or the new, never half. tempfile picks a name no
/// other thread or process uses, and removes it if any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // A dot-name ending in .tmp: the listings skip it if a crash leaves it.
    // Mode 0666 goes to open(2), so the umask applies as it does to
    // File::create (tempfile's own default, 0600, would hide manifests).
    use std::os::unix::fs::PermissionsExt;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
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

#[cfg(test)]
mod tests {
    use super::write_atomic;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_whole_leaves_no_temp_and_keeps_the_usual_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new content").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new content");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["manifest.json"], "no temporary file is left");
        // Readable as a file made by File::create is (the umask decides), not 0600.
        let reference = dir.path().join("reference");
        fs::File::create(&reference).unwrap();
        let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
    }

    #[test]
    fn write_atomic_into_a_missing_folder_fails_and_names_nothing_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone").join("x.json");
        assert!(write_atomic(&path, b"x").is_err());
        assert!(!path.exists());
    }
}
