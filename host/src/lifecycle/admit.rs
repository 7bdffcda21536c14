//! `airlock admit`: how a model enters `incoming/` whole. A file or a model
//! folder is copied under a hidden `.partial` name with its origin and
//! signature sidecars, then renamed into place, so the watcher never claims
//! half a model or a model whose signature has not arrived. A Hugging Face
//! cache snapshot is admitted by the blobs its links name, each checked
//! against the hash in its name.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::Root;
use super::root::{sync_dir, write_atomic};

/// Which sidecar suffix a signature file travels under: its own suffix, with
/// model-signing's default names (`model.sig`, `model.sigstore.json`) mapped.
fn signature_suffix(path: &Path) -> Result<&'static str> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let suffix = match name.as_str() {
        "model.sig" => Some(".model.sig"),
        "model.sigstore.json" => Some(".sigstore.json"),
        _ => [".model.sig", ".sigstore.json", ".asc", ".sig"].into_iter().find(|s| name.ends_with(s)),
    };
    suffix.with_context(|| {
        format!("{}: a signature file must end in .asc, .sig, .sigstore.json or .model.sig", path.display())
    })
}

/// Copies `from` to `to` through a hidden `.partial` name, fsynced.
fn copy_in(root: &Root, from: &Path, to_name: &str) -> Result<()> {
    let tmp = root.incoming().join(format!(".{to_name}.partial"));
    fs::copy(from, &tmp).with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, root.incoming().join(to_name))?;
    Ok(())
}

/// Copies a model folder, fsyncing every file and folder. Only regular files
/// and folders: a link or a special file stops the copy, named, since the
/// quarantine would refuse the folder for it anyway. In a Hugging Face cache
/// snapshot, a link into the repository's `blobs/` is copied as the blob it
/// names, once the blob matches the hash its name records.
fn copy_tree(from: &Path, to: &Path, snapshot: Option<&HfSnapshot>) -> Result<()> {
    fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries: Vec<_> =
        fs::read_dir(from).with_context(|| from.display().to_string())?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let (src, dest) = (e.path(), to.join(e.file_name()));
        let ft = fs::symlink_metadata(&src).with_context(|| src.display().to_string())?.file_type();
        if ft.is_dir() {
            copy_tree(&src, &dest, snapshot)?;
        } else if ft.is_file() {
            fs::copy(&src, &dest).with_context(|| format!("copying {}", src.display()))?;
            fs::File::open(&dest)?.sync_all()?;
        } else if let (true, Some(snap)) = (ft.is_symlink(), snapshot) {
            snap.copy_blob(&src, &dest)?;
        } else {
            bail!("{}: a link or special file; model folders hold only regular files and folders", src.display());
        }
    }
    sync_dir(to)?;
    Ok(())
}

/// A Hugging Face hub cache snapshot, `models--ORG--NAME/snapshots/REV/`,
/// whose files are links into `models--ORG--NAME/blobs/`.
struct HfSnapshot {
    /// The repository's `blobs/`, links resolved.
    blobs: PathBuf,
    /// `ORG--NAME`: the name the model is admitted under.
    name: String,
}

impl HfSnapshot {
    fn of(path: &Path) -> Option<HfSnapshot> {
        let canon = fs::canonicalize(path).ok()?;
        let snapshots = canon.parent()?;
        if snapshots.file_name()? != "snapshots" {
            return None;
        }
        let repo = snapshots.parent()?;
        let name = repo.file_name()?.to_str()?.strip_prefix("models--")?.to_string();
        let blobs = fs::canonicalize(repo.join("blobs")).ok()?;
        Some(HfSnapshot { blobs, name })
    }

    /// Copies the blob the link `link` names to `dest`, checking it against
    /// its name: a sha256 (files stored with Git LFS) or a git blob sha1 (small
    /// files). A link that leaves `blobs/`, or a blob whose bytes do not match
    /// its name, stops the admission.
    fn copy_blob(&self, link: &Path, dest: &Path) -> Result<()> {
        use sha2::Digest;
        let blob = fs::canonicalize(link).with_context(|| format!("{}: a broken link", link.display()))?;
        if blob.parent() != Some(self.blobs.as_path()) || !fs::symlink_metadata(&blob)?.is_file() {
            bail!(
                "{}: links to {}, which is not a file of the cache's {}",
                link.display(),
                blob.display(),
                self.blobs.display()
            );
        }
        let hash = blob.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let is_hex = |n: usize| hash.len() == n && hash.bytes().all(|b| b.is_ascii_hexdigit());
        let bytes = fs::read(&blob).with_context(|| blob.display().to_string())?;
        let actual = if is_hex(64) {
            hex::encode(sha2::Sha256::digest(&bytes))
        } else if is_hex(40) {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            hex::encode(h.finalize())
        } else {
            bail!("{}: links to the blob {hash:?}, whose name is no hash the cache records", link.display());
        };
        if actual != hash.to_ascii_lowercase() {
            bail!(
                "{}: the blob {hash} holds other bytes (their hash is {actual}); the cache is damaged or was altered",
                link.display()
            );
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        Ok(())
    }
}

/// Copies a model (a file, or a model folder) into incoming/ under a `.partial` name, fsyncs it, writes
/// its origin and signature sidecars, then renames it into place: the watcher
/// never sees half a file, nor a model whose signature has not arrived.
/// Returns the name the model was admitted under.
pub fn admit(root: &Root, path: &Path, origin: Option<&str>, signatures: &[PathBuf]) -> Result<String> {
    root.check()?;
    let meta = fs::symlink_metadata(path).with_context(|| path.display().to_string())?;
    let folder = meta.is_dir();
    let snapshot = if folder { HfSnapshot::of(path) } else { None };
    if folder && snapshot.is_none() && crate::artifact::folder_layout(path).is_none() {
        bail!(
            "{}: a folder is admitted only as a model: model_index.json (diffusers), or config.json and weights (transformers)",
            path.display()
        );
    }
    if !meta.is_file() && !folder {
        bail!("{}: only regular files and model folders can be admitted (not links or devices)", path.display());
    }
    let name = match &snapshot {
        Some(snap) => snap.name.clone(),
        None => path.file_name().context("the path has no file name")?.to_string_lossy().into_owned(),
    };
    if !super::is_eligible_name(&name) {
        bail!(
            "{name}: dot-files, .partial/.tmp/.part names and sidecar names (.origin, .asc, .sig, .sigstore.json) are never taken from incoming/ as models"
        );
    }
    let dest = root.incoming().join(&name);
    if fs::symlink_metadata(&dest).is_ok() {
        bail!("{} already exists", dest.display());
    }
    let mut suffixes = Vec::new();
    for sig in signatures {
        let meta = fs::symlink_metadata(sig).with_context(|| sig.display().to_string())?;
        if !meta.is_file() {
            bail!("{}: a signature must be a regular file", sig.display());
        }
        let suffix = signature_suffix(sig)?;
        if suffixes.contains(&suffix) {
            bail!("two signatures would both be stored as {name}{suffix}");
        }
        let dest = root.incoming().join(format!("{name}{suffix}"));
        if fs::symlink_metadata(&dest).is_ok() {
            bail!("{} already exists", dest.display());
        }
        suffixes.push(suffix);
    }
    let tmp = root.incoming().join(format!(".{name}.partial"));
    if folder {
        let copied = copy_tree(path, &tmp, snapshot.as_ref()).and_then(|()| {
            // A snapshot's layout is known only once its links are blobs.
            if crate::artifact::folder_layout(&tmp).is_none() {
                bail!(
                    "{}: a folder is admitted only as a model: model_index.json (diffusers), or config.json and \
                     weights (transformers)",
                    path.display()
                );
            }
            Ok(())
        });
        if copied.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        copied?;
    } else {
        fs::copy(path, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
        fs::File::open(&tmp)?.sync_all()?;
    }
    for (sig, suffix) in signatures.iter().zip(&suffixes) {
        copy_in(root, sig, &format!("{name}{suffix}"))?;
    }
    if let Some(url) = origin {
        write_atomic(&root.incoming().join(format!("{name}.origin")), format!("{url}\n").as_bytes())?;
    }
    fs::rename(&tmp, &dest)?;
    sync_dir(&root.incoming())?;
    Ok(name)
}
