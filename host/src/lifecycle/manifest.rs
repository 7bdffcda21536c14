//! A promoted model's manifest: the sha256 of every file, of each file's
//! header region (so a swapped chat template is caught even where tensors are
//! untouched), of every tensor's bytes, a Merkle root over all of them, and a
//! structural fingerprint that ignores the weight values.
//!
//! The Merkle root is RFC 6962's Merkle Tree Hash (leaves `SHA-256(0x00 ‖ d)`,
//! nodes `SHA-256(0x01 ‖ left ‖ right)`, split at the largest power of two
//! below the size, no node duplicated), so any certificate-transparency
//! tooling can check an inclusion proof against it. Each leaf's data names
//! what it hashes (`["tensor", file, tensor, sha256]`), so two tensors cannot
//! trade places without changing the root.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifact::{MetaValue, Model};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorDigest {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileDigest {
    pub path: String,
    pub format: String,
    pub size: u64,
    pub sha256: String,
    /// Bytes `[0, header_len)`: the container header and its metadata.
    pub header_len: u64,
    pub header_sha256: Option<String>,
    pub tensors: Vec<TensorDigest>,
}

/// The integrity part of a manifest; `verify` recomputes exactly this.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Integrity {
    pub files: Vec<FileDigest>,
    pub merkle_root: String,
    /// How `merkle_root` was computed. Manifests written before the field
    /// existed used the first scheme, and `verify` recomputes them with it.
    #[serde(default = "legacy_scheme")]
    pub merkle_scheme: String,
    pub fingerprint: String,
}

/// RFC 6962 over leaves that name what they hash.
pub const MERKLE_SCHEME: &str = "rfc6962-sha256-named-leaves";

/// airlock 0.2's first root: unnamed digests, the last node of an odd level paired with itself.
const LEGACY_SCHEME: &str = "airlock-0.2-duplicated-odd";

fn legacy_scheme() -> String {
    LEGACY_SCHEME.into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub kind: String,
    pub promoted_at: String,
    pub origin: Option<String>,
    pub policy: String,
    pub disabled_stages: Vec<String>,
    /// The stage results, as in `airlock scan --format json`.
    pub stages: Vec<crate::pipeline::StageResult>,
    #[serde(flatten)]
    pub integrity: Integrity,
}

/// RFC 6962's hash of a leaf's data.
fn leaf_hash(data: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update([0u8]).chain_update(data).finalize().into()
}

/// RFC 6962's Merkle Tree Hash over leaf hashes: the empty tree is SHA-256
/// of nothing; a larger one splits at the largest power of two below its size.
fn tree_hash(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = 1 << (usize::BITS - 1 - (n - 1).leading_zeros());
            let (left, right) = (tree_hash(&leaves[..k]), tree_hash(&leaves[k..]));
            Sha256::new().chain_update([1u8]).chain_update(left).chain_update(right).finalize().into()
        }
    }
}

/// The leaves in manifest order: each file, its header region, its tensors.
fn named_leaves(files: &[FileDigest]) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    let leaf = |parts: &[&str]| leaf_hash(&serde_json::to_vec(parts).expect("strings serialise"));
    for f in files {
        out.push(leaf(&["file", &f.path, &f.sha256]));
        if let Some(h) = &f.header_sha256 {
            out.push(leaf(&["header", &f.path, h]));
        }
        out.extend(f.tensors.iter().map(|t| leaf(&["tensor", &f.path, &t.name, &t.sha256])));
    }
    out
}

/// The first scheme, kept so manifests written with it still verify.
fn legacy_root(files: &[FileDigest]) -> String {
    let digests = files.iter().flat_map(|f| {
        std::iter::once(&f.sha256).chain(f.header_sha256.iter()).chain(f.tensors.iter().map(|t| &t.sha256))
    });
    let mut level: Vec<[u8; 32]> =
        digests.map(|d| Sha256::new().chain_update([0u8]).chain_update(d.as_bytes()).finalize().into()).collect();
    if level.is_empty() {
        return hex::encode(Sha256::digest(b""));
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                let right = p.get(1).unwrap_or(&p[0]);
                Sha256::new().chain_update([1u8]).chain_update(p[0]).chain_update(right).finalize().into()
            })
            .collect();
    }
    hex::encode(level[0])
}

/// The root of `files` under `scheme`.
pub fn merkle_root(files: &[FileDigest], scheme: &str) -> Result<String, String> {
    match scheme {
        MERKLE_SCHEME => Ok(hex::encode(tree_hash(&named_leaves(files)))),
        LEGACY_SCHEME => Ok(legacy_root(files)),
        other => Err(format!("unknown merkle scheme {other:?}")),
    }
}

/// A hash over the architecture, tensor names, shapes and dtypes: two models
/// with the same structure and different weights share it.
fn fingerprint(model: &Model) -> String {
    let mut h = Sha256::new();
    for f in &model.files {
        h.update(format!("file\t{}\t{}\n", f.rel_path, f.format.name()));
        let Some(header) = f.parsed() else { continue };
        if let Some((_, MetaValue::Text(arch))) = header.metadata.iter().find(|(k, _)| k == "general.architecture") {
            h.update(format!("arch\t{arch}\n"));
        }
        for t in &header.tensors {
            let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
            h.update(format!("tensor\t{}\t{}\t{}\n", t.name, t.dtype_name, shape.join("x")));
        }
    }
    hex::encode(h.finalize())
}

/// Hashes every file, header region and tensor of an opened model.
pub fn integrity(model: &Model) -> Result<Integrity, String> {
    let mut files = Vec::new();
    for f in &model.files {
        let sha256 = f.sha256()?;
        let io = |e: String| format!("{}: {e}", f.rel_path);
        let (header_len, header_sha256, tensors) = match f.parsed() {
            Some(h) => {
                let header_len = h.data_offset.unwrap_or(0);
                let header_sha = f.sha256_range(0, header_len).map_err(io)?;
                let mut tensors = Vec::with_capacity(h.tensors.len());
                for t in &h.tensors {
                    tensors.push(TensorDigest {
                        name: t.name.clone(),
                        dtype: t.dtype_name.clone(),
                        shape: t.shape.clone(),
                        offset: t.offset,
                        length: t.length,
                        sha256: f.sha256_range(t.offset, t.length).map_err(io)?,
                    });
                }
                (header_len, Some(header_sha), tensors)
            }
            None => (0, None, Vec::new()),
        };
        files.push(FileDigest {
            path: f.rel_path.clone(),
            format: f.format.name().into(),
            size: f.size(),
            sha256,
            header_len,
            header_sha256,
            tensors,
        });
    }
    Ok(Integrity {
        merkle_root: merkle_root(&files, MERKLE_SCHEME)?,
        merkle_scheme: MERKLE_SCHEME.into(),
        fingerprint: fingerprint(model),
        files,
    })
}

/// Every difference between a recorded and a recomputed integrity record.
pub fn differences(recorded: &Integrity, now: &Integrity) -> Vec<String> {
    let mut out = Vec::new();
    if recorded.files.len() != now.files.len() {
        out.push(format!("file count: recorded {}, now {}", recorded.files.len(), now.files.len()));
    }
    for (r, n) in recorded.files.iter().zip(&now.files) {
        if r.path != n.path {
            out.push(format!("file {}: now named {}", r.path, n.path));
            continue;
        }
        if r.sha256 != n.sha256 {
            out.push(format!("{}: file sha256 changed\n  recorded: {}\n  now:      {}", r.path, r.sha256, n.sha256));
        }
        if r.header_sha256 != n.header_sha256 {
            out.push(format!("{}: header and metadata region changed (e.g. a chat template)", r.path));
        }
        for (rt, nt) in r.tensors.iter().zip(&n.tensors) {
            if rt != nt {
                out.push(format!("{}: tensor {} changed", r.path, rt.name));
            }
        }
        if r.tensors.len() != n.tensors.len() {
            out.push(format!("{}: tensor count: recorded {}, now {}", r.path, r.tensors.len(), n.tensors.len()));
        }
    }
    // The root of what is there now, under the scheme the manifest was written with.
    match merkle_root(&now.files, &recorded.merkle_scheme) {
        Ok(root) if root == recorded.merkle_root => {}
        Ok(root) => out.push(format!("merkle root: recorded {}, now {root}", recorded.merkle_root)),
        Err(e) => out.push(format!("merkle root: {e}")),
    }
    if recorded.fingerprint != now.fingerprint {
        out.push("structural fingerprint changed".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The Certificate Transparency reference leaves and the root of every
    /// tree size from 0 to 8 (transparency-dev/merkle's test data).
    #[test]
    fn tree_hash_is_rfc_6962() {
        let leaves =
            ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"];
        let roots = [
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let hashes: Vec<[u8; 32]> = leaves.iter().map(|l| leaf_hash(&unhex(l))).collect();
        for (n, root) in roots.iter().enumerate() {
            assert_eq!(hex::encode(tree_hash(&hashes[..n])), *root, "tree of {n} leaves");
        }
    }

    fn file(path: &str, tensors: &[(&str, &str)]) -> FileDigest {
        FileDigest {
            path: path.into(),
            format: "safetensors".into(),
            size: 1,
            sha256: format!("{path}-sha"),
            header_len: 8,
            header_sha256: Some(format!("{path}-header")),
            tensors: tensors
                .iter()
                .map(|(name, sha)| TensorDigest {
                    name: (*name).into(),
                    dtype: "F32".into(),
                    shape: vec![1],
                    offset: 0,
                    length: 4,
                    sha256: (*sha).into(),
                })
                .collect(),
        }
    }

    /// Two tensors that trade names (or contents) change the root; the
    /// first scheme, which hashed digests alone, could not tell.
    #[test]
    fn leaves_bind_names_so_swapped_tensors_change_the_root() {
        let a = [file("m.safetensors", &[("a", "1111"), ("b", "2222")])];
        let swapped = [file("m.safetensors", &[("b", "1111"), ("a", "2222")])];
        let root = |f: &[FileDigest], s| merkle_root(f, s).unwrap();
        assert_ne!(root(&a, MERKLE_SCHEME), root(&swapped, MERKLE_SCHEME));
        assert_eq!(root(&a, LEGACY_SCHEME), root(&swapped, LEGACY_SCHEME));
        assert!(merkle_root(&a, "sha1-whatever").is_err());
    }

    /// A manifest written before `merkle_scheme` existed reads as the first
    /// scheme and still verifies against an unchanged model.
    #[test]
    fn old_manifests_verify_with_the_scheme_they_were_written_with() {
        let files = vec![file("m.gguf", &[("t", "3333")])];
        let old = serde_json::json!({"files": files, "merkle_root": legacy_root(&files), "fingerprint": "f"});
        let recorded: Integrity = serde_json::from_value(old).unwrap();
        assert_eq!(recorded.merkle_scheme, LEGACY_SCHEME);
        let now = Integrity {
            files: files.clone(),
            merkle_root: merkle_root(&files, MERKLE_SCHEME).unwrap(),
            merkle_scheme: MERKLE_SCHEME.into(),
            fingerprint: "f".into(),
        };
        assert!(differences(&recorded, &now).is_empty(), "{:?}", differences(&recorded, &now));
        let mut changed = now.clone();
        changed.files[0].tensors[0].sha256 = "4444".into();
        assert!(differences(&recorded, &changed).iter().any(|d| d.contains("merkle root")));
    }
}
