//! The claim's private copy of a model.
//!
//! A rename alone leaves the claimed bytes on the uploader's inode: whoever
//! wrote the file can still change it by path or through an fd kept open,
//! during the scan or after promotion. So the claim copies the model into a
//! new file that airlock creates (`O_EXCL`, then read-only), in a folder only
//! airlock can write, and scans and promotes that copy. A folder's listing is
//! fixed by the copy: anything added to the upload afterwards is not part of
//! the model.
//!
//! The copy is a reflink (`FICLONE`) where the filesystem shares extents, else
//! an in-kernel `copy_file_range` (std's `io::copy` between files), bounded by
//! the size the file had when it was opened, so a writer that keeps appending
//! cannot make the copy endless. The origin a download tool recorded in the
//! `user.xdg.origin.url` attribute goes with the bytes: without it the copy
//! would lose the origin the source stage judges.

use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::artifact::{FolderLimits, ORIGIN_XATTR};

/// `_IOW(0x94, 9, int)`: share the source's extents (btrfs, XFS, bcachefs).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Why a model was not copied.
#[derive(Debug)]
pub enum Uncopied {
    /// The upload itself cannot be copied (a link, a special or hardlinked
    /// file, over the folder limits): it is scanned as uploaded, never promoted.
    Refused(String),
    /// This machine failed (a full disk, an I/O error): the claim is given
    /// back and taken again later, so a clean model is not rejected for it.
    Io(String),
}

/// An I/O error while copying, named.
fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Uncopied {
    move |e| Uncopied::Io(format!("{what}: {e}"))
}

/// Copies the file or model folder at `from` to the new name `to`, as
/// airlock's own read-only bytes. `Err`: why it was not copied; nothing is
/// left at `to` then.
pub fn copy(from: &Path, to: &Path, limits: &FolderLimits) -> Result<(), Uncopied> {
    let meta = fs::symlink_metadata(from).map_err(io_err(from.display()))?;
    let done = if meta.is_dir() {
        let mut budget = Budget { files: 0, bytes: 0, limits };
        copy_tree(from, to, 0, &mut budget).and_then(|()| match xattr::get(from, ORIGIN_XATTR) {
            Ok(Some(v)) => xattr::set(to, ORIGIN_XATTR, &v).map_err(io_err(to.display())),
            _ => Ok(()),
        })
    } else {
        copy_file(from, to).map(|_| ())
    };
    if done.is_err() {
        let _ = if meta.is_dir() { fs::remove_dir_all(to) } else { fs::remove_file(to) };
    }
    done
}

struct Budget<'a> {
    files: usize,
    bytes: u64,
    limits: &'a FolderLimits,
}

fn copy_tree(from: &Path, to: &Path, depth: usize, budget: &mut Budget) -> Result<(), Uncopied> {
    if depth > budget.limits.max_depth {
        return Err(Uncopied::Refused(format!(
            "{}: nested deeper than {} levels",
            from.display(),
            budget.limits.max_depth
        )));
    }
    fs::create_dir(to).map_err(io_err(format!("creating {}", to.display())))?;
    let mut entries: Vec<_> =
        fs::read_dir(from).and_then(|rd| rd.collect::<io::Result<Vec<_>>>()).map_err(io_err(from.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dest) = (e.path(), to.join(e.file_name()));
        let ft = fs::symlink_metadata(&src).map_err(io_err(src.display()))?.file_type();
        if ft.is_dir() {
            copy_tree(&src, &dest, depth + 1, budget)?;
        } else {
            budget.files += 1;
            if budget.files > budget.limits.max_files {
                return Err(Uncopied::Refused(format!("holds more than {} files", budget.limits.max_files)));
            }
            budget.bytes = budget.bytes.saturating_add(copy_file(&src, &dest)?);
            if budget.bytes > budget.limits.max_total_gib.saturating_mul(1 << 30) {
                return Err(Uncopied::Refused(format!("holds more than {} GiB", budget.limits.max_total_gib)));
            }
        }
    }
    fs::File::open(to).and_then(|d| d.sync_all()).map_err(io_err(to.display()))
}

/// One regular file, never through a link; returns its size.
fn copy_file(from: &Path, to: &Path) -> Result<u64, Uncopied> {
    let src = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(from).map_err(
        |e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Uncopied::Refused(format!("{} is a symlink", from.display()))
            } else {
                Uncopied::Io(format!("{}: {e}", from.display()))
            }
        },
    )?;
    let meta = src.metadata().map_err(io_err(from.display()))?;
    if !meta.is_file() {
        return Err(Uncopied::Refused(format!("{} is not a regular file", from.display())));
    }
    if meta.nlink() > 1 {
        return Err(Uncopied::Refused(format!("{} is a hardlinked file ({} links)", from.display(), meta.nlink())));
    }
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .map_err(io_err(format!("creating {}", to.display())))?;
    // SAFETY: both descriptors are open for the duration of the call.
    let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) } == 0;
    let size = if cloned {
        dst.metadata().map_err(io_err(to.display()))?.len()
    } else {
        io::copy(&mut (&src).take(meta.len()), &mut dst).map_err(io_err(format!("copying {}", from.display())))?
    };
    {
        use xattr::FileExt;
        if let Ok(Some(v)) = src.get_xattr(ORIGIN_XATTR) {
            dst.set_xattr(ORIGIN_XATTR, &v).map_err(io_err(to.display()))?;
        }
    }
    dst.sync_all().map_err(io_err(to.display()))?;
    dst.set_permissions(fs::Permissions::from_mode(0o444)).map_err(io_err(to.display()))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_is_a_new_read_only_inode_that_a_writer_of_the_upload_cannot_reach() {
        let dir = tempfile::tempdir().unwrap();
        let up = dir.path().join("up.gguf");
        fs::write(&up, b"clean bytes").unwrap();
        let mut writer = fs::OpenOptions::new().write(true).open(&up).unwrap();
        let copy_path = dir.path().join("copy.gguf");
        copy(&up, &copy_path, &FolderLimits::default()).unwrap();
        use std::io::Write;
        writer.write_all(b"EVIL").unwrap();
        assert_eq!(fs::read(&copy_path).unwrap(), b"clean bytes");
        let m = fs::metadata(&copy_path).unwrap();
        assert_ne!(m.ino(), fs::metadata(&up).unwrap().ino());
        assert_eq!(m.permissions().mode() & 0o777, 0o444);
    }

    #[test]
    fn links_hardlinks_and_limits_are_not_copied_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("m");
        fs::create_dir(&folder).unwrap();
        fs::write(folder.join("config.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", folder.join("tokenizer.json")).unwrap();
        let to = dir.path().join("copy");
        let why = copy(&folder, &to, &FolderLimits::default()).unwrap_err();
        assert!(matches!(&why, Uncopied::Refused(w) if w.contains("symlink")), "{why:?}");
        assert!(!to.exists());

        fs::remove_file(folder.join("tokenizer.json")).unwrap();
        fs::hard_link(folder.join("config.json"), dir.path().join("other")).unwrap();
        let why = copy(&folder, &to, &FolderLimits::default()).unwrap_err();
        assert!(matches!(&why, Uncopied::Refused(w) if w.contains("hardlinked")), "{why:?}");
        fs::remove_file(dir.path().join("other")).unwrap();

        fs::write(folder.join("b.json"), b"{}").unwrap();
        let small = FolderLimits { max_files: 1, ..FolderLimits::default() };
        let why = copy(&folder, &to, &small).unwrap_err();
        assert!(matches!(&why, Uncopied::Refused(w) if w.contains("more than 1 files")), "{why:?}");
        assert!(!to.exists());
        copy(&folder, &to, &FolderLimits::default()).unwrap();
        assert_eq!(fs::read(to.join("b.json")).unwrap(), b"{}");
    }
}
