//! The provenance stage's trusted keys: parsed natively when the policy
//! loads, so a broken key stops airlock at start-up instead of failing every model.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The signature schemes a trusted key can be for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum KeyKind {
    #[serde(rename = "gpg")]
    Gpg,
    #[serde(rename = "cosign")]
    Cosign,
    #[serde(rename = "model-signing")]
    ModelSigning,
}

impl KeyKind {
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Gpg => "gpg",
            KeyKind::Cosign => "cosign",
            KeyKind::ModelSigning => "model-signing",
        }
    }
}

/// A trusted key, read and parsed at start-up.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub kind: KeyKind,
    pub name: String,
    pub path: PathBuf,
    /// The key file's bytes, handed to provenance plugins in their config.
    pub bytes: Vec<u8>,
}

/// Reads and parses one trusted key. Parsing here, natively, turns a broken
/// key into a policy error at start-up instead of a failure on every model.
pub(super) fn load_key(kind: KeyKind, name: &str, path: &Path) -> Result<TrustedKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed = match kind {
        KeyKind::Gpg => {
            use pgp::composed::{Deserializable, SignedPublicKey};
            SignedPublicKey::from_reader_single(std::io::Cursor::new(&bytes))
                .map_err(|e| format!("not an OpenPGP public key (armored or binary): {e}"))
                .and_then(|(k, _)| {
                    k.verify_bindings().map_err(|e| format!("the key's self-signatures do not verify: {e}"))
                })
        }
        KeyKind::Cosign | KeyKind::ModelSigning => {
            use p256::pkcs8::DecodePublicKey;
            std::str::from_utf8(&bytes)
                .map_err(|_| "not a PEM file (not UTF-8)".to_string())
                .and_then(|t| {
                    p256::ecdsa::VerifyingKey::from_public_key_pem(t.trim()).map_err(|e| {
                        format!("not a PEM ECDSA P-256 public key ({e}); other curves and key types are not supported")
                    })
                })
                .map(|_| ())
        }
    };
    parsed.map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(TrustedKey { kind, name: name.to_string(), path: path.to_path_buf(), bytes })
}
