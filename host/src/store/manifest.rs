//! A promoted model's manifest: the sha256 of every file, of each file's
//! header region (so a swapped chat template is caught even where tensors are
//! untouched), of every tensor's bytes, a Merkle root over all of them, and a
//! structural fingerprint that ignores the weight values.

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
    pub fingerprint: String,
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
    pub stages: serde_json::Value,
    #[serde(flatten)]
    pub integrity: Integrity,
}

fn merkle_root(leaves: &[String]) -> String {
    // Leaves and nodes are domain-separated so a node can never pose as a leaf.
    let mut level: Vec<[u8; 32]> =
        leaves.iter().map(|l| Sha256::new().chain_update([0u8]).chain_update(l.as_bytes()).finalize().into()).collect();
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
    let mut leaves = Vec::new();
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
        leaves.push(sha256.clone());
        leaves.extend(header_sha256.clone());
        leaves.extend(tensors.iter().map(|t| t.sha256.clone()));
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
    Ok(Integrity { merkle_root: merkle_root(&leaves), fingerprint: fingerprint(model), files })
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
    if recorded.merkle_root != now.merkle_root {
        out.push(format!("merkle root: recorded {}, now {}", recorded.merkle_root, now.merkle_root));
    }
    if recorded.fingerprint != now.fingerprint {
        out.push("structural fingerprint changed".into());
    }
    out
}
