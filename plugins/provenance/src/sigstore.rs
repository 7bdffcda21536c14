//! Sigstore bundles (v0.1–v0.3 JSON) signed with a key: a message signature
//! (cosign), a DSSE envelope over an in-toto statement (cosign attestations),
//! and OpenSSF model-signing's DSSE statement that lists every file of a model.
//!
//! Keyless bundles (a Fulcio certificate plus Rekor entries) need online trust
//! roots, so they are refused with that reason rather than half-checked.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::Digest;

use crate::ecdsa::{decode_b64, find_message, find_prehash, parse_der, unknown_key};
use crate::{Keyring, Verified, hex, host_sha256, sha256_from_hex, single_file};

const MODEL_SIGNING_PREDICATE: &str = "https://model_signing/signature/v1.0";
const IN_TOTO_PAYLOAD: &str = "application/vnd.in-toto+json";
/// Files at a folder's root that carry its signature, never part of it.
const SIGNATURE_FILES: [&str; 2] = ["model.sig", "model.sigstore.json"];

fn text<'a>(v: &'a Value, what: &str) -> Result<&'a str, String> {
    v.as_str().ok_or_else(|| format!("the bundle has no {what}"))
}

/// DSSE's pre-authentication encoding: what the envelope's signature covers.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

pub(crate) fn verify(model: &airlock_sdk::Model, bytes: &[u8], keys: &Keyring) -> Result<Verified, String> {
    let bundle: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a sigstore bundle: invalid JSON ({e})"))?;
    let media = bundle["mediaType"].as_str().unwrap_or_default();
    if !media.starts_with("application/vnd.dev.sigstore.bundle") {
        return Err(format!("not a sigstore bundle: mediaType is {media:?}"));
    }
    let material = &bundle["verificationMaterial"];
    if !material["certificate"].is_null() || !material["x509CertificateChain"].is_null() {
        return Err("a keyless bundle (Fulcio certificate): verifying it needs the sigstore trust root and \
                    transparency log, which an offline host does not have; sign with a key"
            .into());
    }
    let hint = material["publicKey"]["hint"].as_str().unwrap_or_default().to_string();
    if !bundle["messageSignature"].is_null() {
        return message_signature(model, &bundle["messageSignature"], keys);
    }
    if !bundle["dsseEnvelope"].is_null() {
        return dsse(model, &bundle["dsseEnvelope"], keys, &hint);
    }
    Err("the bundle has neither a messageSignature nor a dsseEnvelope".into())
}

/// cosign `sign-blob --bundle`: a signature over sha256(file), which the bundle also names.
fn message_signature(model: &airlock_sdk::Model, ms: &Value, keys: &Keyring) -> Result<Verified, String> {
    let file = single_file(model, "message-signature bundle")?;
    let digest = host_sha256(&file)?;
    let algorithm = ms["messageDigest"]["algorithm"].as_str().unwrap_or("SHA2_256");
    if algorithm != "SHA2_256" {
        return Err(format!("message digest algorithm {algorithm:?} is not supported (only SHA2_256)"));
    }
    if let Some(named) = ms["messageDigest"]["digest"].as_str() {
        let named = decode_b64("messageDigest.digest", named)?;
        if named != digest {
            return Err(format!(
                "the bundle signs sha256 {}, but the model's sha256 is {}: the model changed",
                hex(&named),
                hex(&digest)
            ));
        }
    }
    let sig = parse_der(
        "messageSignature.signature",
        &decode_b64("messageSignature.signature", text(&ms["signature"], "messageSignature.signature")?)?,
    )?;
    let key = find_prehash(&keys.cosign, &digest, &sig).ok_or_else(|| unknown_key("cosign", &keys.cosign))?;
    Ok(Verified {
        kind: "cosign-bundle",
        signer: format!("cosign key {:?}", key.name),
        details: serde_json::json!({ "key": key.name, "sha256": hex(&digest), "form": "message signature" }),
    })
}

fn dsse(model: &airlock_sdk::Model, env: &Value, keys: &Keyring, hint: &str) -> Result<Verified, String> {
    let payload_type = text(&env["payloadType"], "dsseEnvelope.payloadType")?;
    if payload_type != IN_TOTO_PAYLOAD {
        return Err(format!("DSSE payload type {payload_type:?} is not {IN_TOTO_PAYLOAD:?}"));
    }
    let payload = decode_b64("dsseEnvelope.payload", text(&env["payload"], "dsseEnvelope.payload")?)?;
    let statement: Value =
        serde_json::from_slice(&payload).map_err(|e| format!("the DSSE payload is not a JSON statement: {e}"))?;
    let model_signing = statement["predicateType"].as_str() == Some(MODEL_SIGNING_PREDICATE);
    let (ring, kind) = if model_signing { (&keys.model_signing, "model-signing") } else { (&keys.cosign, "cosign") };
    let sigs = env["signatures"].as_array().filter(|s| !s.is_empty()).ok_or("the DSSE envelope has no signatures")?;
    let message = pae(payload_type, &payload);
    let mut signer = None;
    for s in sigs {
        let sig =
            parse_der("a DSSE signature", &decode_b64("a DSSE signature", text(&s["sig"], "signatures[].sig")?)?)?;
        if let Some(k) = find_message(ring, &message, &sig) {
            signer = Some(k);
            break;
        }
    }
    let Some(key) = signer else {
        // model-signing names its key by the sha256 of its PEM: say which one it meant.
        return Err(match ring.iter().find(|k| !hint.is_empty() && k.pem_sha256.eq_ignore_ascii_case(hint)) {
            Some(k) => format!(
                "the DSSE signature does not verify with the key the bundle names ({:?}): the statement or \
                 signature was changed",
                k.name
            ),
            None if !hint.is_empty() => {
                format!("{} (the bundle names a key whose PEM has sha256 {hint})", unknown_key(kind, ring))
            }
            None => unknown_key(kind, ring),
        });
    };
    if model_signing {
        let checked = model_signing_statement(model, &statement)?;
        return Ok(Verified {
            kind: "model-signing",
            signer: format!("model-signing key {:?}", key.name),
            details: serde_json::json!({ "key": key.name, "files": checked }),
        });
    }
    // A cosign attestation: some subject must name this file's sha256.
    let file = single_file(model, "DSSE")?;
    let digest = hex(&host_sha256(&file)?);
    let subjects = statement["subject"].as_array().cloned().unwrap_or_default();
    if !subjects.iter().any(|s| s["digest"]["sha256"].as_str() == Some(digest.as_str())) {
        return Err(format!("no subject of the signed statement has the model's sha256 {digest}: the model changed"));
    }
    Ok(Verified {
        kind: "cosign-bundle",
        signer: format!("cosign key {:?}", key.name),
        details: serde_json::json!({ "key": key.name, "sha256": digest, "form": "DSSE" }),
    })
}

/// Checks a model-signing statement against the model: every file listed with
/// the sha256 the host computed, nothing missing, nothing extra. Returns the
/// file → digest map that was checked.
fn model_signing_statement(model: &airlock_sdk::Model, statement: &Value) -> Result<BTreeMap<String, String>, String> {
    let predicate = &statement["predicate"];
    let ser = &predicate["serialization"];
    match ser["method"].as_str() {
        Some("files") => {}
        Some("shards") => {
            return Err("the statement lists sharded digests (serialization method \"shards\"), which airlock \
                        does not support; sign with the \"files\" method"
                .into());
        }
        other => return Err(format!("unsupported serialization method {other:?} (only \"files\")")),
    }
    if let Some(h) = ser["hash_type"].as_str()
        && h != "sha256"
    {
        return Err(format!("the statement hashes files with {h:?}; only sha256 is supported"));
    }
    let resources = predicate["resources"].as_array().ok_or("the statement lists no resources")?;
    let mut listed = BTreeMap::new();
    let mut root = sha2::Sha256::new();
    for r in resources {
        let name = text(&r["name"], "resources[].name")?;
        let algorithm = r["algorithm"].as_str().unwrap_or("sha256");
        if algorithm != "sha256" {
            return Err(format!("{name}: digest algorithm {algorithm:?} is not supported (only sha256)"));
        }
        let digest = text(&r["digest"], "resources[].digest")?.to_ascii_lowercase();
        let raw = sha256_from_hex(&digest).ok_or_else(|| format!("{name}: digest {digest:?} is not a sha256"))?;
        root.update(raw);
        if listed.insert(name.to_string(), digest).is_some() {
            return Err(format!("the statement lists {name} twice"));
        }
    }
    // The subject's digest binds the resource list (sha256 over the digests, in order).
    let subject = statement["subject"].as_array().and_then(|s| s.first()).ok_or("the statement has no subject")?;
    let want = text(&subject["digest"]["sha256"], "subject[0].digest.sha256")?;
    let got = hex(&root.finalize());
    if !want.eq_ignore_ascii_case(&got) {
        return Err(format!("the statement's resources hash to {got}, but its subject says {want}"));
    }

    let files = model.files();
    let folder = model.kind() == "folder";
    let mut checked = BTreeMap::new();
    let mut problems = Vec::new();
    for f in &files {
        let path = f.path();
        if folder && SIGNATURE_FILES.contains(&path.as_str()) {
            continue;
        }
        // model_signing names a single signed file ".".
        let entry = listed.remove(&path).or_else(|| if folder { None } else { listed.remove(".") });
        let actual = hex(&host_sha256(f)?);
        match entry {
            None => problems.push(format!("{path} is not listed in the signed statement")),
            Some(d) if d != actual => {
                problems.push(format!("{path}: sha256 is {actual}, but the signature says {d}: the file changed"))
            }
            Some(_) => {
                checked.insert(path, actual);
            }
        }
    }
    for name in listed.keys() {
        problems.push(format!("the signed statement lists {name}, which the model does not have"));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(checked)
}
