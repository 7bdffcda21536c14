//! Stage 4: verify the signatures that travel with a model, offline.
//!
//! Three kinds, each against the trusted keys the policy names
//! (`provenance.trusted_keys`; the host reads the key files and hands their
//! bytes over in this plugin's config):
//! - OpenPGP detached signatures (`<file>.asc`, or a binary `<file>.sig`);
//! - cosign key signatures: the base64 DER ECDSA P-256 blob signature that
//!   `cosign sign-blob --key` writes (`<file>.sig`), and sigstore bundles
//!   carrying a key-based message signature or DSSE envelope
//!   (`<file>.sigstore.json`);
//! - OpenSSF model-signing bundles (`<file>.model.sig`, or `model.sig` at a
//!   folder's root): a DSSE envelope whose in-toto statement lists every file
//!   of the model with its sha256.
//!
//! The plugin reads signatures only through the `sidecars` capability and the
//! model only through `read`/`sha256`; it has no filesystem or network.
//! Any signature present must verify: one bad signature fails the stage even
//! when another one is good, because a forged file beside a model is itself a
//! finding. With no signature at all, `require_signature` decides.

mod ecdsa;
mod gpg;
mod sigstore;

use airlock_sdk::{Finding, Model, Report, Severity, Stage, StageInfo, context, sidecars};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    require_signature: bool,
    #[serde(default)]
    trusted_keys: Vec<KeyConfig>,
}

/// One trusted key, as the host passes it: the key file's bytes in base64.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyConfig {
    kind: String,
    name: String,
    data_base64: String,
}

/// The trusted keys, parsed, by kind.
pub(crate) struct Keyring {
    pub gpg: Vec<gpg::TrustedKey>,
    pub cosign: Vec<ecdsa::TrustedKey>,
    pub model_signing: Vec<ecdsa::TrustedKey>,
}

impl Keyring {
    fn load(keys: &[KeyConfig]) -> Result<Keyring, String> {
        use base64::Engine;
        let mut ring = Keyring { gpg: Vec::new(), cosign: Vec::new(), model_signing: Vec::new() };
        for k in keys {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&k.data_base64)
                .map_err(|e| format!("trusted key {:?}: its data is not base64: {e}", k.name))?;
            let fail = |e: String| format!("trusted key {:?} ({}): {e}", k.name, k.kind);
            match k.kind.as_str() {
                "gpg" => ring.gpg.push(gpg::TrustedKey::parse(&k.name, &bytes).map_err(fail)?),
                "cosign" => ring.cosign.push(ecdsa::TrustedKey::parse(&k.name, &bytes).map_err(fail)?),
                "model-signing" => ring.model_signing.push(ecdsa::TrustedKey::parse(&k.name, &bytes).map_err(fail)?),
                other => return Err(format!("trusted key {:?}: unknown kind {other:?}", k.name)),
            }
        }
        Ok(ring)
    }

    fn describe(&self) -> String {
        format!("{} gpg, {} cosign, {} model-signing", self.gpg.len(), self.cosign.len(), self.model_signing.len())
    }
}

/// A signature that verified.
pub(crate) struct Verified {
    /// `gpg`, `cosign`, `cosign-bundle` or `model-signing`.
    pub kind: &'static str,
    /// Who signed, for the summary: the key's policy name and what the signature says.
    pub signer: String,
    /// Everything else worth keeping in the report.
    pub details: serde_json::Value,
}

/// What a sidecar turned out to hold.
enum SidecarKind {
    Gpg,
    CosignBlob,
    Bundle,
}

/// `.sig` is either a binary OpenPGP signature or cosign's base64 text.
fn classify(suffix: &str, bytes: &[u8]) -> SidecarKind {
    match suffix {
        ".asc" => SidecarKind::Gpg,
        ".sigstore.json" | ".model.sig" => SidecarKind::Bundle,
        _ => {
            let text = bytes.trim_ascii();
            if text.first() == Some(&b'{') {
                SidecarKind::Bundle
            } else if !text.is_empty()
                && text.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'\n' | b'\r'))
            {
                SidecarKind::CosignBlob
            } else {
                SidecarKind::Gpg
            }
        }
    }
}

struct Provenance;

impl Stage for Provenance {
    fn describe() -> StageInfo {
        StageInfo::new(
            "provenance",
            env!("CARGO_PKG_VERSION"),
            "verifies GPG, cosign and OpenSSF model-signing signatures against the policy's trusted keys, offline",
        )
    }

    fn run(model: &Model) -> Report {
        let cfg: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let keys = match Keyring::load(&cfg.trusted_keys) {
            Ok(k) => k,
            Err(e) => return Report::fail(format!("policy error: {e}")),
        };
        let folder = model.kind() == "folder";
        // For a folder the host maps `.model.sig` to `model.sig` and
        // `.sigstore.json` to `model.sigstore.json` at its root.
        let suffixes: &[&str] =
            if folder { &[".model.sig", ".sigstore.json"] } else { &[".asc", ".sig", ".sigstore.json", ".model.sig"] };
        let mut present = Vec::new();
        for suffix in suffixes {
            match sidecars::sidecar(suffix) {
                Ok(Some(bytes)) => present.push((*suffix, bytes)),
                Ok(None) => {}
                Err(e) => return Report::fail(format!("signature verification failed: cannot read {suffix}: {e}")),
            }
        }
        if present.is_empty() {
            let looked = suffixes.join(", ");
            return if cfg.require_signature {
                Report::fail(format!("no signature found (looked for {looked}); provenance.require_signature is true"))
            } else {
                Report::pass("no signature; not required by policy")
                    .details(serde_json::json!({ "signatures": [], "looked_for": suffixes }))
            };
        }

        let mut verified = Vec::new();
        let mut failures = Vec::new();
        for (suffix, bytes) in &present {
            let sidecar = sidecar_name(model, suffix, folder);
            let outcome = match classify(suffix, bytes) {
                SidecarKind::Gpg => gpg::verify(model, bytes, &keys.gpg),
                SidecarKind::CosignBlob => ecdsa::verify_blob(model, bytes, &keys.cosign),
                SidecarKind::Bundle => sigstore::verify(model, bytes, &keys),
            };
            match outcome {
                Ok(v) => verified.push((sidecar, v)),
                Err(e) => failures.push((sidecar, e)),
            }
        }

        let details = serde_json::json!({
            "trusted_keys": keys.describe(),
            "verified": verified.iter().map(|(s, v)| serde_json::json!({
                "file": s, "kind": v.kind, "signer": v.signer, "details": v.details,
            })).collect::<Vec<_>>(),
            "failed": failures.iter().map(|(s, e)| serde_json::json!({ "file": s, "reason": e })).collect::<Vec<_>>(),
        });
        if let Some((first_file, first_reason)) = failures.first() {
            let findings = failures.iter().map(|(s, e)| {
                Finding::new("provenance.signature-invalid", Severity::Critical, e.clone()).at(s.clone())
            });
            return Report::fail(format!("signature verification failed: {first_file}: {first_reason}"))
                .findings(findings)
                .details(details);
        }
        let signers: Vec<String> = verified.iter().map(|(_, v)| format!("{} ({})", v.signer, v.kind)).collect();
        let findings = verified.iter().map(|(s, v)| {
            Finding::new("provenance.signature-valid", Severity::Info, format!("{}: {}", v.kind, v.signer))
                .at(s.clone())
        });
        Report::pass(format!("signed by {}", signers.join("; "))).findings(findings).details(details)
    }
}

/// The sidecar's file name, for messages.
fn sidecar_name(model: &Model, suffix: &str, folder: bool) -> String {
    if folder {
        match suffix {
            ".sigstore.json" => "model.sigstore.json".into(),
            _ => "model.sig".into(),
        }
    } else {
        format!("{}{suffix}", model.name())
    }
}

/// 64 hex digits as the 32 bytes of a sha256.
pub(crate) fn sha256_from_hex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The sha256 the host computed for a file, as bytes.
pub(crate) fn host_sha256(file: &airlock_sdk::File) -> Result<[u8; 32], String> {
    let hex = file.sha256().map_err(|e| format!("{}: the host could not hash it: {e}", file.path()))?;
    sha256_from_hex(&hex).ok_or_else(|| format!("{}: the host's sha256 {hex:?} is not 64 hex digits", file.path()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The single file a detached signature can cover.
pub(crate) fn single_file(model: &Model, kind: &str) -> Result<airlock_sdk::File, String> {
    let mut files = model.files();
    if model.kind() != "file" || files.len() != 1 {
        return Err(format!(
            "a {kind} signature covers one file; this model is a folder (sign it with model-signing instead)"
        ));
    }
    Ok(files.remove(0))
}

airlock_sdk::export_stage!(Provenance);
