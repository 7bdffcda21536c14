//! OpenPGP detached signatures (what `gpg --detach-sign` writes), checked
//! against the policy's keyring: the issuer must be a trusted key or one of
//! its subkeys, that key must be valid now (not revoked, not expired) and
//! allowed to sign, and the signature must cover the file's bytes.
//!
//! The file is hashed inside the plugin, streamed through `read`: an OpenPGP
//! signature hashes the data together with its own trailer, so the host's
//! plain sha256 cannot stand in for it.

use std::io::{Cursor, Read};

use airlock_sdk::ChunkReader;
use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{KeyFlags, Signature, SignatureType};
use pgp::types::{KeyDetails, Timestamp};

use crate::{Verified, hex, single_file};

pub(crate) struct TrustedKey {
    pub name: String,
    pub key: SignedPublicKey,
}

impl TrustedKey {
    pub fn parse(name: &str, bytes: &[u8]) -> Result<TrustedKey, String> {
        let (key, _) = SignedPublicKey::from_reader_single(Cursor::new(bytes))
            .map_err(|e| format!("not an OpenPGP public key (armored or binary): {e}"))?;
        key.verify_bindings().map_err(|e| format!("the key's self-signatures do not verify: {e}"))?;
        Ok(TrustedKey { name: name.to_string(), key })
    }

    fn user_id(&self) -> String {
        self.key
            .details
            .users
            .first()
            .map(|u| String::from_utf8_lossy(u.id.id()).into_owned())
            .unwrap_or_else(|| "(no user id)".into())
    }
}

/// Streams a file through `read` in chunks, as `std::io::Read`.
struct FileReader<'a> {
    chunks: ChunkReader<'a>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            match self.chunks.next() {
                None => return Ok(0),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                Some(Ok((_, bytes))) => {
                    self.buf = bytes;
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A day, `YYYY-MM-DD`, for messages.
fn date(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_string()
}

/// The newest of `sigs` (by creation time) that satisfies `keep`.
fn newest<'a>(sigs: impl Iterator<Item = &'a Signature>, keep: impl Fn(&Signature) -> bool) -> Option<&'a Signature> {
    sigs.filter(|s| keep(s)).max_by_key(|s| s.created().map(Timestamp::as_secs).unwrap_or(0))
}

/// When a key made at `created` expires under `binding`, if it does.
fn expiry(created: Timestamp, binding: Option<&Signature>) -> Option<u64> {
    let secs = binding?.key_expiration_time()?.as_secs();
    (secs > 0).then(|| u64::from(created.as_secs()) + u64::from(secs))
}

fn no_flags(flags: &KeyFlags) -> bool {
    !(flags.sign() || flags.certify() || flags.encrypt_comms() || flags.encrypt_storage() || flags.authentication())
}

pub(crate) fn verify(model: &airlock_sdk::Model, bytes: &[u8], keys: &[TrustedKey]) -> Result<Verified, String> {
    let file = single_file(model, "GPG")?;
    let (detached, _) = DetachedSignature::from_reader_single(Cursor::new(bytes))
        .map_err(|e| format!("not an OpenPGP signature (armored or binary): {e}"))?;
    let sig = &detached.signature;
    match sig.typ() {
        Some(SignatureType::Binary) => {}
        // Text mode hashes canonical line endings, so LF↔CRLF edits to the
        // model's bytes would still verify: it cannot pin a binary file.
        Some(SignatureType::Text) => {
            return Err("a text-mode signature (gpg --textmode) hashes canonical line endings, so it does not \
                        pin a model's bytes; sign in binary mode"
                .into());
        }
        other => return Err(format!("an OpenPGP signature of type {other:?}, not a signature over a document")),
    }
    match sig.hash_alg() {
        Some(HashAlgorithm::Md5 | HashAlgorithm::Sha1 | HashAlgorithm::Ripemd160 | HashAlgorithm::None) | None => {
            let name = sig.hash_alg().map(|h| h.to_string()).unwrap_or_else(|| "an unknown hash".into());
            return Err(format!(
                "the signature uses {name}, which is not collision-resistant; sign with SHA-256 or stronger"
            ));
        }
        Some(_) => {}
    }
    let fingerprints = sig.issuer_fingerprint();
    let key_ids = sig.issuer_key_id();
    let issuer = fingerprints
        .first()
        .map(|f| format!("fingerprint {f:X}"))
        .or_else(|| key_ids.first().map(|k| format!("key id {}", hex(k.as_ref()).to_uppercase())))
        .unwrap_or_else(|| "no issuer named".into());
    let is_issuer = |k: &dyn KeyDetails| {
        fingerprints.iter().any(|f| **f == k.fingerprint()) || key_ids.iter().any(|i| **i == k.legacy_key_id())
    };

    let now = now();
    for tk in keys {
        let primary = &tk.key.primary_key;
        let sub = tk.key.public_subkeys.iter().find(|s| is_issuer(&s.key));
        if !is_issuer(primary) && sub.is_none() {
            continue;
        }
        let fp = format!("{:X}", primary.fingerprint());
        let who = format!("{} <{fp}> ({:?} in the policy)", tk.user_id(), tk.name);
        // Revocation, expiry and capability come from the key's own self-signatures.
        if let Some(r) = tk.key.details.revocation_signatures.first() {
            let why =
                r.revocation_reason_string().map(|s| format!(": {}", String::from_utf8_lossy(s))).unwrap_or_default();
            return Err(format!("the key {who} is revoked{why}"));
        }
        let self_sig = newest(
            tk.key
                .details
                .users
                .iter()
                .flat_map(|u| u.signatures.iter())
                .chain(tk.key.details.direct_signatures.iter()),
            |s| s.is_certification() || s.typ() == Some(SignatureType::Key),
        );
        if let Some(exp) = expiry(primary.created_at(), self_sig)
            && exp <= now
        {
            return Err(format!("the key {who} expired on {}", date(exp)));
        }
        let can_sign = match sub {
            Some(s) => {
                if s.signatures.iter().any(|b| b.typ() == Some(SignatureType::SubkeyRevocation)) {
                    return Err(format!("the signing subkey {:X} of {who} is revoked", s.key.fingerprint()));
                }
                let binding = newest(s.signatures.iter(), |b| b.typ() == Some(SignatureType::SubkeyBinding));
                if let Some(exp) = expiry(s.key.created_at(), binding)
                    && exp <= now
                {
                    return Err(format!(
                        "the signing subkey {:X} of {who} expired on {}",
                        s.key.fingerprint(),
                        date(exp)
                    ));
                }
                binding.is_some_and(|b| b.key_flags().sign())
            }
            None => {
                // A primary key with no flags at all predates key flags and may sign.
                let flags = self_sig.map(Signature::key_flags).unwrap_or_default();
                flags.sign() || no_flags(&flags)
            }
        };
        if !can_sign {
            return Err(format!("the key that made this signature ({issuer}, of {who}) is not allowed to sign"));
        }
        if let (Some(created), Some(exp)) = (sig.created(), sig.signature_expiration_time())
            && exp.as_secs() > 0
            && u64::from(created.as_secs()) + u64::from(exp.as_secs()) <= now
        {
            return Err(format!(
                "the signature expired on {}",
                date(u64::from(created.as_secs()) + u64::from(exp.as_secs()))
            ));
        }
        let reader = FileReader { chunks: ChunkReader::file(&file), buf: Vec::new(), pos: 0 };
        let verified = match sub {
            Some(s) => sig.verify(&s.key, reader),
            None => sig.verify(primary, reader),
        };
        verified.map_err(|e| {
            // rpgp's message ends with the cause ("invalid signed hash value"); the rest is its internals.
            let text = e.to_string();
            let cause = text.rsplit(": ").next().unwrap_or(&text).trim();
            format!(
                "the OpenPGP signature by {who} does not match the file: the model or the signature changed ({cause})"
            )
        })?;
        let created = sig.created().map(|t| date(u64::from(t.as_secs()))).unwrap_or_default();
        return Ok(Verified {
            kind: "gpg",
            signer: format!("{} <{fp}>", tk.user_id()),
            details: serde_json::json!({
                "key": tk.name,
                "fingerprint": fp,
                "user_id": tk.user_id(),
                "signed_on": created,
                "hash": sig.hash_alg().map(|h| format!("{h:?}")).unwrap_or_default(),
            }),
        });
    }
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    Err(if names.is_empty() {
        format!("signed by an unknown key ({issuer}): the policy trusts no gpg key")
    } else {
        format!("signed by an unknown key ({issuer}): not among the trusted gpg keys ({})", names.join(", "))
    })
}
