//! ECDSA P-256 keys (cosign, model-signing) and cosign's blob signature.

use p256::ecdsa::signature::Verifier;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey, LineEnding};
use sha2::Digest;

use crate::{Verified, hex, host_sha256, single_file};

/// A trusted P-256 public key from the policy.
pub(crate) struct TrustedKey {
    pub name: String,
    pub key: VerifyingKey,
    /// sha256 of the key's canonical PEM: model-signing's bundle `hint`.
    pub pem_sha256: String,
}

impl TrustedKey {
    pub fn parse(name: &str, bytes: &[u8]) -> Result<TrustedKey, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not a PEM file (not UTF-8)".to_string())?;
        let key = VerifyingKey::from_public_key_pem(text.trim()).map_err(|e| {
            format!("not a PEM ECDSA P-256 public key ({e}); other curves and key types are not supported")
        })?;
        let pem = key.to_public_key_pem(LineEnding::LF).map_err(|e| format!("cannot re-encode the key: {e}"))?;
        Ok(TrustedKey { name: name.to_string(), key, pem_sha256: hex(&sha2::Sha256::digest(pem.as_bytes())) })
    }
}

pub(crate) fn decode_b64(what: &str, text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).map_err(|e| format!("{what} is not valid base64: {e}"))
}

pub(crate) fn parse_der(what: &str, der: &[u8]) -> Result<Signature, String> {
    Signature::from_der(der).map_err(|e| format!("{what} is not a DER ECDSA P-256 signature: {e}"))
}

/// The first trusted key under which `sig` is a signature over the sha256 `digest`.
pub(crate) fn find_prehash<'a>(keys: &'a [TrustedKey], digest: &[u8; 32], sig: &Signature) -> Option<&'a TrustedKey> {
    keys.iter().find(|k| k.key.verify_prehash(digest, sig).is_ok())
}

/// The first trusted key under which `sig` is an ECDSA-SHA256 signature over `message`.
pub(crate) fn find_message<'a>(keys: &'a [TrustedKey], message: &[u8], sig: &Signature) -> Option<&'a TrustedKey> {
    keys.iter().find(|k| k.key.verify(message, sig).is_ok())
}

pub(crate) fn unknown_key(kind: &str, keys: &[TrustedKey]) -> String {
    if keys.is_empty() {
        format!("signed by an unknown key: the policy trusts no {kind} key")
    } else {
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        format!(
            "the signature does not verify with any trusted {kind} key ({}): an unknown key, or the model or signature changed",
            names.join(", ")
        )
    }
}

/// `cosign sign-blob --key`: base64 of a DER ECDSA signature over sha256(file).
pub(crate) fn verify_blob(model: &airlock_sdk::Model, bytes: &[u8], keys: &[TrustedKey]) -> Result<Verified, String> {
    let file = single_file(model, "cosign blob")?;
    let text = std::str::from_utf8(bytes).map_err(|_| "the cosign signature is not text".to_string())?;
    let sig = parse_der("the cosign signature", &decode_b64("the cosign signature", text)?)?;
    let digest = host_sha256(&file)?;
    let key = find_prehash(keys, &digest, &sig).ok_or_else(|| unknown_key("cosign", keys))?;
    Ok(Verified {
        kind: "cosign",
        signer: format!("cosign key {:?}", key.name),
        details: serde_json::json!({ "key": key.name, "sha256": hex(&digest) }),
    })
}
