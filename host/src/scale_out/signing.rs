//! Authenticated results (red team D8). A worker signs every result it
//! stores with its own nkey (ed25519); the dispatching watcher accepts a
//! result only when it is signed by a key its policy lists
//! (`scale_out.trusted_workers`), over that job's results subject and the
//! exact payload. A result copied to another job's subject, changed by a
//! byte, unsigned, or signed by a key the watcher does not list, is refused.

use std::path::Path;

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use base64::Engine;

use crate::policy::{NatsAuth, Policy};

/// The header naming the public key that signed a result.
pub const SIGNER_HEADER: &str = "Airlock-Signer";
/// The header holding the signature, base64.
pub const SIGNATURE_HEADER: &str = "Airlock-Signature";

/// What is signed: a domain tag, the subject and the payload, so a signature
/// means "this worker stored this result for this job" and nothing else.
fn signed_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + subject.len() + payload.len());
    b.extend_from_slice(b"airlock-result-v1\0");
    b.extend_from_slice(subject.as_bytes());
    b.push(0);
    b.extend_from_slice(payload);
    b
}

/// A worker's signing key.
pub struct Signer {
    key: nkeys::KeyPair,
    public: String,
}

/// Shows the public key only: the seed never reaches a log.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("public", &self.public).finish_non_exhaustive()
    }
}

impl Signer {
    /// The key the policy names: `scale_out.signing_key_file`, else the
    /// seed the worker logs in with (`nats.nkey_file`). A worker with
    /// neither cannot start: its results would all be refused.
    pub fn from_policy(policy: &Policy) -> Result<Signer> {
        let path = match (&policy.scale_out.signing_key_file, &policy.nats) {
            (Some(p), _) => p.clone(),
            (None, Some(NatsAuth::Nkey { seed_file })) => seed_file.clone(),
            (None, _) => bail!(
                "the policy gives this worker no key to sign its results with: set scale_out.signing_key_file \
                 (`airlock worker-key FILE` makes one) or log in with nats.nkey_file, and list its public key in \
                 the watcher's scale_out.trusted_workers (docs/scale-out.md, \"Signed results\")"
            ),
        };
        Signer::from_file(&path)
    }

    /// Reads an nkey seed file, which must be closed to group and others.
    pub fn from_file(path: &Path) -> Result<Signer> {
        let seed = crate::fsutil::read_secret(path, "the signing key", 4096)?;
        let key = nkeys::KeyPair::from_seed(seed.trim())
            .map_err(|e| anyhow::anyhow!("the signing key {}: not an nkey seed: {e}", path.display()))?;
        let public = key.public_key();
        if !public.starts_with('U') {
            bail!("the signing key {}: a user nkey seed (SU...) is needed, this one is for {public}", path.display());
        }
        Ok(Signer { key, public })
    }

    /// A new user key written to `path` (mode 600, never over an existing file).
    pub fn create(path: &Path) -> Result<Signer> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = nkeys::KeyPair::new_user();
        let seed = key.seed().map_err(|e| anyhow::anyhow!("making a key: {e}"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(format!("{seed}\n").as_bytes()).and_then(|()| f.sync_all())?;
        let public = key.public_key();
        Ok(Signer { key, public })
    }

    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The two headers that sign `payload` stored on `subject`.
    pub fn headers(&self, subject: &str, payload: &[u8]) -> Result<HeaderMap> {
        let sig = self.key.sign(&signed_bytes(subject, payload)).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        let mut h = HeaderMap::new();
        h.insert(SIGNER_HEADER, self.public.as_str());
        h.insert(SIGNATURE_HEADER, base64::engine::general_purpose::STANDARD.encode(sig).as_str());
        Ok(h)
    }
}

/// Checks that `payload`, stored on `subject` with `headers`, is signed by
/// one of `trusted`. `Ok`: the signer's public key; `Err`: why it is refused.
pub fn verify(
    trusted: &[String],
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<String, String> {
    let get = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
    let Some(signer) = get(SIGNER_HEADER) else {
        return Err(format!("the result on {subject} is unsigned (no {SIGNER_HEADER} header)"));
    };
    if !trusted.contains(&signer) {
        return Err(format!(
            "the result on {subject} is signed by {signer}, which is not in this policy's scale_out.trusted_workers"
        ));
    }
    let sig = get(SIGNATURE_HEADER)
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .ok_or_else(|| format!("the result on {subject} has no readable {SIGNATURE_HEADER} header"))?;
    let key = nkeys::KeyPair::from_public_key(&signer).map_err(|e| format!("the signer {signer}: {e}"))?;
    key.verify(&signed_bytes(subject, payload), &sig).map_err(|_| {
        format!("the result on {subject} does not match its signature by {signer} (changed, or signed for another job)")
    })?;
    Ok(signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (tempfile::TempDir, Signer) {
        let d = tempfile::tempdir().unwrap();
        let s = Signer::create(&d.path().join("w.nk")).unwrap();
        (d, s)
    }

    #[test]
    fn a_signed_result_verifies_only_unchanged_on_its_own_subject_and_by_a_trusted_key() {
        let (_d, s) = signer();
        let trusted = vec![s.public_key().to_string()];
        let h = s.headers("airlock.results.1-2-3", b"{\"verdict\":\"fail\"}").unwrap();
        assert_eq!(verify(&trusted, "airlock.results.1-2-3", Some(&h), b"{\"verdict\":\"fail\"}").unwrap(), trusted[0]);
        let e = verify(&trusted, "airlock.results.1-2-3", Some(&h), b"{\"verdict\":\"pass\"}").unwrap_err();
        assert!(e.contains("does not match its signature"), "{e}");
        let e = verify(&trusted, "airlock.results.4-5-6", Some(&h), b"{\"verdict\":\"fail\"}").unwrap_err();
        assert!(e.contains("does not match its signature"), "{e}");
        let e = verify(&trusted, "airlock.results.1-2-3", None, b"x").unwrap_err();
        assert!(e.contains("unsigned"), "{e}");
        let (_d2, other) = signer();
        let e = verify(&[other.public_key().to_string()], "airlock.results.1-2-3", Some(&h), b"{\"verdict\":\"fail\"}")
            .unwrap_err();
        assert!(e.contains("not in this policy's scale_out.trusted_workers"), "{e}");
    }

    #[test]
    fn a_key_file_others_can_read_or_that_is_not_a_user_seed_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("w.nk");
        let s = Signer::create(&path).unwrap();
        assert_eq!(Signer::from_file(&path).unwrap().public_key(), s.public_key());
        assert!(Signer::create(&path).is_err(), "a key was written over");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Signer::from_file(&path).unwrap_err().to_string().contains("chmod 600"));
        let server = d.path().join("s.nk");
        std::fs::write(&server, nkeys::KeyPair::new_server().seed().unwrap()).unwrap();
        std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Signer::from_file(&server).unwrap_err().to_string().contains("a user nkey seed"));
    }
}
