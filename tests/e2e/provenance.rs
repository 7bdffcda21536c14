//! Stage 4: signatures made by the real tools (gpg, openssl as cosign does
//! it, OpenSSF model_signing from PyPI), verified inside the provenance plugin.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::harness::*;

/// Runs a tool and returns its stdout; a failure stops the test with its stderr.
#[track_caller]
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A throwaway GnuPG home. The agent it starts is stopped on drop.
struct Gpg {
    home: PathBuf,
}

impl Gpg {
    fn new(dir: &Path) -> Gpg {
        let home = dir.join("gnupg");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        Gpg { home }
    }
    fn cmd(&self, faked_time: Option<&str>) -> Command {
        let mut c = Command::new("gpg");
        c.arg("--homedir").arg(&self.home).args([
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        if let Some(t) = faked_time {
            c.arg("--faked-system-time").arg(t);
        }
        c
    }
    /// A new key for `email`; returns its fingerprint.
    fn key(&self, email: &str, algo: &str, usage: &str, expire: &str, faked_time: Option<&str>) -> String {
        run(self.cmd(faked_time).args(["--quick-gen-key", &format!("Publisher <{email}>"), algo, usage, expire]));
        let listing = String::from_utf8(run(self.cmd(None).args(["--with-colons", "--list-keys", email]))).unwrap();
        listing.lines().find_map(|l| l.strip_prefix("fpr:")).unwrap().trim_matches(':').to_string()
    }
    fn export(&self, email: &str, to: &Path) {
        run(self.cmd(None).args(["--armor", "--output"]).arg(to).args(["--export", email]));
    }
    fn sign(&self, email: &str, file: &Path, out: &Path, armor: bool, faked_time: Option<&str>) {
        let mut c = self.cmd(faked_time);
        if armor {
            c.arg("--armor");
        }
        run(c.args(["--local-user", email, "--output"]).arg(out).arg("--detach-sign").arg(file));
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf").arg("--homedir").arg(&self.home).args(["--kill", "all"]).status();
    }
}

/// An ECDSA P-256 key pair made by openssl: (private PEM, public PEM).
fn ec_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    run(Command::new("openssl").args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"]).arg(&key));
    run(Command::new("openssl").args(["ec", "-pubout", "-in"]).arg(&key).arg("-out").arg(&public));
    (key, public)
}

/// A DER ECDSA-SHA256 signature over `data`, by openssl.
fn openssl_sign(key: &Path, data: &[u8]) -> Vec<u8> {
    let tmp = tmp();
    let input = write(tmp.path(), "data", data);
    run(Command::new("openssl").args(["dgst", "-sha256", "-sign"]).arg(key).arg(&input))
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A sigstore v0.3 bundle whose DSSE envelope carries `statement`, signed by
/// openssl over DSSE's pre-authentication encoding.
fn dsse_bundle(key: &Path, statement: &str) -> String {
    let ty = "application/vnd.in-toto+json";
    let pae = format!("DSSEv1 {} {ty} {} {statement}", ty.len(), statement.len());
    serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": { "publicKey": { "hint": "" }, "tlogEntries": [] },
        "dsseEnvelope": { "payload": b64(statement.as_bytes()), "payloadType": ty,
                          "signatures": [{ "sig": b64(&openssl_sign(key, pae.as_bytes())), "keyid": "" }] },
    })
    .to_string()
}

/// What `cosign sign-blob --key` writes: the base64 of the DER signature over the file.
fn cosign_sign_blob(key: &Path, file: &Path) -> String {
    b64(&openssl_sign(key, &std::fs::read(file).unwrap()))
}

/// `model_signing sign key`, from the PyPI package that `cargo xtask test` installs.
fn model_signing_sign(key: &Path, model: &Path, signature: &Path, ignore: &[&Path]) {
    let dir = std::env::var_os("AIRLOCK_TEST_MODEL_SIGNING").expect(
        "AIRLOCK_TEST_MODEL_SIGNING is not set: run the tests through `cargo xtask test`, which installs \
         model-signing from PyPI and points this variable at it",
    );
    let mut c = Command::new("python3");
    c.env("PYTHONPATH", dir).args(["-m", "model_signing", "sign", "key", "--private_key"]).arg(key);
    c.arg("--signature").arg(signature);
    for p in ignore {
        c.arg("--ignore-paths").arg(p);
    }
    run(c.arg(model));
}

/// A policy folder whose provenance section trusts `keys` (kind, path, name).
fn provenance_policy(dir: &Path, require: bool, keys: &[(&str, &Path, &str)]) -> PathBuf {
    let list: String = keys
        .iter()
        .map(|(kind, path, name)| format!("\n    - {{kind: {kind}, path: {}, name: {name}}}", path.display()))
        .collect();
    policy_dir(dir, |t| {
        let t = t.replacen("  require_signature: false", &format!("  require_signature: {require}"), 1);
        if keys.is_empty() { t } else { t.replacen("  trusted_keys: []", &format!("  trusted_keys:{list}"), 1) }
    })
}

fn scan_with(model: &Path, policy: &Path) -> Scan {
    scan_json(model, &["--policy", policy.to_str().unwrap()])
}

fn provenance(s: &Scan) -> &Value {
    s.stage("provenance_check")
}

/// The model every test signs: a small, clean GGUF.
fn model(dir: &Path) -> PathBuf {
    Gguf::default().write(dir, "m.gguf")
}

/// Flips one bit in the model's last (tensor data) byte.
fn tamper(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    *b.last_mut().unwrap() ^= 1;
    std::fs::write(path, b).unwrap();
}

#[track_caller]
fn assert_provenance_fails(s: &Scan, needles: &[&str]) {
    assert_rejected(s, "provenance_check", "signature verification failed: ");
    let reason = s.one()["reason"].as_str().unwrap().to_string();
    let all = format!("{reason}\n{}", provenance(s)["details"]);
    for n in needles {
        assert!(all.contains(n), "{n:?} not in {all}");
    }
}

#[test]
fn gpg_signatures_from_eddsa_rsa_and_ecdsa_keys_verify() {
    for (algo, armor) in [("ed25519", true), ("rsa3072", false), ("nistp256", true)] {
        let d = tmp();
        let gpg = Gpg::new(d.path());
        let fpr = gpg.key("pub@example.org", algo, "sign", "1y", None);
        let key = d.path().join("publisher.asc");
        gpg.export("pub@example.org", &key);
        let m = model(d.path());
        let suffix = if armor { "asc" } else { "sig" };
        gpg.sign("pub@example.org", &m, &d.path().join(format!("m.gguf.{suffix}")), armor, None);
        let s = scan_with(&m, &provenance_policy(d.path(), false, &[("gpg", &key, "publisher")]));
        assert_passed(&s);
        let p = provenance(&s);
        let summary = p["summary"].as_str().unwrap();
        assert!(summary.contains("Publisher <pub@example.org>") && summary.contains(&fpr), "{algo}: {summary}");
        assert_eq!(p["details"]["verified"][0]["details"]["fingerprint"], fpr.as_str(), "{algo}");
        assert_eq!(p["details"]["verified"][0]["file"], format!("m.gguf.{suffix}"));
    }
}

#[test]
fn a_tampered_model_fails_every_signature_kind() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    gpg.key("pub@example.org", "ed25519", "sign", "1y", None);
    let gpg_key = d.path().join("publisher.asc");
    gpg.export("pub@example.org", &gpg_key);
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let m = model(d.path());
    gpg.sign("pub@example.org", &m, &d.path().join("m.gguf.asc"), true, None);
    std::fs::write(d.path().join("m.gguf.sig"), cosign_sign_blob(&ec, &m)).unwrap();
    model_signing_sign(&ec, &m, &d.path().join("m.gguf.model.sig"), &[]);
    let pol = provenance_policy(
        d.path(),
        false,
        &[("gpg", &gpg_key, "publisher"), ("cosign", &ec_pub, "ci"), ("model-signing", &ec_pub, "ml")],
    );
    let s = scan_with(&m, &pol);
    assert_passed(&s);
    assert_eq!(provenance(&s)["details"]["verified"].as_array().unwrap().len(), 3, "{}", provenance(&s));

    tamper(&m);
    let s = scan_with(&m, &pol);
    assert_provenance_fails(
        &s,
        &[
            "m.gguf.asc: the OpenPGP signature by Publisher <pub@example.org>",
            "the model or the signature changed",
            "does not verify with any trusted cosign key (ci)",
            "m.gguf: sha256 is",
            "but the signature says",
        ],
    );
    assert_eq!(provenance(&s)["details"]["failed"].as_array().unwrap().len(), 3);
    let rules: Vec<&str> =
        provenance(&s)["findings"].as_array().unwrap().iter().map(|f| f["rule"].as_str().unwrap()).collect();
    assert_eq!(rules, ["provenance.signature-invalid"; 3]);
}

#[test]
fn signatures_from_untrusted_keys_fail() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    gpg.key("trusted@example.org", "ed25519", "sign", "1y", None);
    let other_fpr = gpg.key("other@example.org", "ed25519", "sign", "1y", None);
    let trusted = d.path().join("trusted.asc");
    gpg.export("trusted@example.org", &trusted);
    let (_, ci_pub) = ec_key(d.path(), "ci");
    let (stranger, _) = ec_key(d.path(), "stranger");
    let m = model(d.path());
    let pol = provenance_policy(
        d.path(),
        false,
        &[("gpg", &trusted, "trusted"), ("cosign", &ci_pub, "ci"), ("model-signing", &ci_pub, "ml")],
    );

    let asc = d.path().join("m.gguf.asc");
    gpg.sign("other@example.org", &m, &asc, true, None);
    assert_provenance_fails(&scan_with(&m, &pol), &["signed by an unknown key (fingerprint", &other_fpr]);
    std::fs::remove_file(&asc).unwrap();

    let sig = d.path().join("m.gguf.sig");
    std::fs::write(&sig, cosign_sign_blob(&stranger, &m)).unwrap();
    assert_provenance_fails(
        &scan_with(&m, &pol),
        &["m.gguf.sig: the signature does not verify with any trusted cosign key"],
    );
    std::fs::remove_file(&sig).unwrap();

    model_signing_sign(&stranger, &m, &d.path().join("m.gguf.model.sig"), &[]);
    assert_provenance_fails(
        &scan_with(&m, &pol),
        &["m.gguf.model.sig: the signature does not verify with any trusted model-signing key (ml)", "names a key"],
    );
    // With no key of that kind trusted at all, the message says so.
    let none = provenance_policy(&d.path().join("none"), false, &[]);
    assert_provenance_fails(&scan_with(&m, &none), &["the policy trusts no model-signing key"]);
}

#[test]
fn an_expired_gpg_key_fails() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    // Made and used in January 2020 with a one-day lifetime: valid then, expired now.
    gpg.key("old@example.org", "ed25519", "sign", "1d", Some("20200101T000000!"));
    let key = d.path().join("old.asc");
    gpg.export("old@example.org", &key);
    let m = model(d.path());
    gpg.sign("old@example.org", &m, &d.path().join("m.gguf.asc"), true, Some("20200101T120000!"));
    let s = scan_with(&m, &provenance_policy(d.path(), false, &[("gpg", &key, "old")]));
    assert_provenance_fails(&s, &["expired on 2020-01-02"]);
}

#[test]
fn a_revoked_gpg_key_fails() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    let fpr = gpg.key("gone@example.org", "ed25519", "sign", "1y", None);
    let m = model(d.path());
    gpg.sign("gone@example.org", &m, &d.path().join("m.gguf.asc"), true, None);
    // gpg stores a revocation certificate for every new key; importing it revokes the key.
    let rev = std::fs::read_to_string(gpg.home.join(format!("openpgp-revocs.d/{fpr}.rev"))).unwrap();
    let rev_file = write(d.path(), "rev.asc", rev.replace(":-----BEGIN", "-----BEGIN").as_bytes());
    run(gpg.cmd(None).arg("--import").arg(&rev_file));
    let key = d.path().join("gone.asc");
    gpg.export("gone@example.org", &key);
    let s = scan_with(&m, &provenance_policy(d.path(), false, &[("gpg", &key, "gone")]));
    assert_provenance_fails(&s, &["is revoked"]);
}

#[test]
fn a_key_whose_sign_capability_was_withdrawn_fails() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    let fpr = gpg.key("signer@example.org", "ed25519", "sign", "1y", None);
    let m = model(d.path());
    gpg.sign("signer@example.org", &m, &d.path().join("m.gguf.asc"), true, None);
    // Then, a minute later, the owner switches the key to certify-only (a newer self-signature).
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
    let mut edit = gpg.cmd(Some(&later.to_string()));
    edit.args(["--expert", "--command-fd", "0", "--edit-key", &fpr]).stdin(Stdio::piped()).stdout(Stdio::null());
    let mut child = edit.stderr(Stdio::null()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"change-usage\nS\nC\nQ\nsave\n").unwrap();
    assert!(child.wait().unwrap().success());
    let key = d.path().join("signer.asc");
    gpg.export("signer@example.org", &key);
    let s = scan_with(&m, &provenance_policy(d.path(), false, &[("gpg", &key, "signer")]));
    assert_provenance_fails(&s, &["is not allowed to sign"]);
}

#[test]
fn text_mode_and_sha1_gpg_signatures_fail() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    gpg.key("pub@example.org", "rsa3072", "sign", "1y", None);
    let key = d.path().join("publisher.asc");
    gpg.export("pub@example.org", &key);
    let m = model(d.path());
    let pol = provenance_policy(d.path(), false, &[("gpg", &key, "publisher")]);
    let asc = d.path().join("m.gguf.asc");
    for (extra, needle) in [
        (&["--textmode"][..], "text-mode signature"),
        (&["--digest-algo", "SHA1"][..], "uses SHA1, which is not collision-resistant"),
    ] {
        run(gpg
            .cmd(None)
            .args(extra)
            .args(["--armor", "--local-user", "pub@example.org", "--output"])
            .arg(&asc)
            .arg("--detach-sign")
            .arg(&m));
        assert_provenance_fails(&scan_with(&m, &pol), &[needle]);
    }
}

#[test]
fn garbage_and_truncated_signature_files_fail() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    gpg.key("pub@example.org", "ed25519", "sign", "1y", None);
    let key = d.path().join("publisher.asc");
    gpg.export("pub@example.org", &key);
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let m = model(d.path());
    let pol = provenance_policy(
        d.path(),
        false,
        &[("gpg", &key, "publisher"), ("cosign", &ec_pub, "ci"), ("model-signing", &ec_pub, "ml")],
    );
    let good_asc = d.path().join("good.asc");
    gpg.sign("pub@example.org", &m, &good_asc, true, None);
    let asc = std::fs::read(&good_asc).unwrap();
    let cosign = cosign_sign_blob(&ec, &m);
    let bundle_path = d.path().join("good.model.sig");
    model_signing_sign(&ec, &m, &bundle_path, &[]);
    let bundle = std::fs::read(&bundle_path).unwrap();

    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("m.gguf.asc", b"this is not a signature\n".to_vec(), "not an OpenPGP signature"),
        ("m.gguf.asc", asc[..asc.len() / 2].to_vec(), "not an OpenPGP signature"),
        ("m.gguf.sig", cosign.as_bytes()[..cosign.len() / 2].to_vec(), "m.gguf.sig: "),
        ("m.gguf.sig", vec![0xff; 64], "not an OpenPGP signature"),
        ("m.gguf.model.sig", bundle[..bundle.len() / 2].to_vec(), "not a sigstore bundle: invalid JSON"),
        ("m.gguf.sigstore.json", b"{}".to_vec(), "not a sigstore bundle: mediaType"),
    ];
    for (name, bytes, needle) in cases {
        let p = write(d.path(), name, &bytes);
        let s = scan_with(&m, &pol);
        assert_provenance_fails(&s, &[needle]);
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn require_signature_decides_only_when_there_is_none() {
    let d = tmp();
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let m = model(d.path());
    let keys = [("cosign", ec_pub.as_path(), "ci")];
    let optional = provenance_policy(&d.path().join("optional"), false, &keys);
    let required = provenance_policy(&d.path().join("required"), true, &keys);

    let s = scan_with(&m, &optional);
    assert_passed(&s);
    assert_eq!(provenance(&s)["summary"], "no signature; not required by policy");
    let s = scan_with(&m, &required);
    assert_rejected(&s, "provenance_check", "no signature found");
    assert!(s.one()["reason"].as_str().unwrap().contains("provenance.require_signature is true"));

    std::fs::write(d.path().join("m.gguf.sig"), cosign_sign_blob(&ec, &m)).unwrap();
    for pol in [&optional, &required] {
        let s = scan_with(&m, pol);
        assert_passed(&s);
        assert_eq!(provenance(&s)["summary"], "signed by cosign key \"ci\" (cosign)");
    }
}

#[test]
fn sigstore_bundles_with_a_key_based_message_signature_or_dsse_verify() {
    let d = tmp();
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let m = model(d.path());
    let pol = provenance_policy(d.path(), false, &[("cosign", &ec_pub, "ci")]);
    let bytes = std::fs::read(&m).unwrap();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes);
    let bundle = d.path().join("m.gguf.sigstore.json");

    let message = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": { "publicKey": { "hint": "" }, "tlogEntries": [] },
        "messageSignature": {
            "messageDigest": { "algorithm": "SHA2_256", "digest": b64(&digest) },
            "signature": b64(&openssl_sign(&ec, &bytes)),
        },
    });
    std::fs::write(&bundle, message.to_string()).unwrap();
    let s = scan_with(&m, &pol);
    assert_passed(&s);
    assert_eq!(provenance(&s)["details"]["verified"][0]["details"]["form"], "message signature");

    let dsse = |sha: &str| {
        let statement = serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{ "name": "m.gguf", "digest": { "sha256": sha } }],
            "predicateType": "https://cosign.sigstore.dev/attestation/v1",
            "predicate": {},
        })
        .to_string();
        dsse_bundle(&ec, &statement)
    };
    std::fs::write(&bundle, dsse(&hex::encode(digest))).unwrap();
    let s = scan_with(&m, &pol);
    assert_passed(&s);
    assert_eq!(provenance(&s)["details"]["verified"][0]["details"]["form"], "DSSE");
    // Validly signed, but about other bytes.
    std::fs::write(&bundle, dsse(&"0".repeat(64))).unwrap();
    assert_provenance_fails(&scan_with(&m, &pol), &["no subject of the signed statement has the model's sha256"]);
    // A keyless bundle cannot be checked offline, and says so.
    std::fs::write(
        &bundle,
        r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"certificate":{"rawBytes":"AA=="}},"messageSignature":{}}"#,
    )
    .unwrap();
    assert_provenance_fails(&scan_with(&m, &pol), &["a keyless bundle"]);
}

#[test]
fn model_signing_statements_must_list_exactly_the_models_files() {
    let d = tmp();
    let (ec, ec_pub) = ec_key(d.path(), "ml");
    // A folder model, not a complete diffusers one: stage 7 is off for this test.
    let folder = d.path().join("tiny");
    std::fs::create_dir_all(folder.join("unet")).unwrap();
    std::fs::write(folder.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline"}"#).unwrap();
    std::fs::write(folder.join("unet/config.json"), r#"{"sample_size": 8}"#).unwrap();
    let st = safetensors(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, &[0x3f; 24]);
    std::fs::write(folder.join("unet/model.safetensors"), st).unwrap();
    let pol = policy_dir(d.path(), |t| {
        t.replacen("diffusion_deep_scan: true", "diffusion_deep_scan: false", 1).replacen(
            "  trusted_keys: []",
            &format!("  trusted_keys:\n    - {{kind: model-signing, path: {}, name: ml}}", ec_pub.display()),
            1,
        )
    });
    let sig = folder.join("model.sig");

    model_signing_sign(&ec, &folder, &sig, &[]);
    let s = scan_with(&folder, &pol);
    assert_passed(&s);
    let files = &provenance(&s)["details"]["verified"][0]["details"]["files"];
    assert_eq!(files.as_object().unwrap().len(), 3, "{files}");

    // Signed while one file was left out: the statement omits it.
    model_signing_sign(&ec, &folder, &sig, &[&folder.join("unet/config.json")]);
    assert_provenance_fails(&scan_with(&folder, &pol), &["unet/config.json is not listed in the signed statement"]);

    // Signed with an extra file that is gone now.
    std::fs::write(folder.join("extra.json"), "{}").unwrap();
    model_signing_sign(&ec, &folder, &sig, &[]);
    std::fs::remove_file(folder.join("extra.json")).unwrap();
    assert_provenance_fails(&scan_with(&folder, &pol), &["lists extra.json, which the model does not have"]);
}

#[test]
fn sharded_model_signing_statements_are_reported_as_unsupported() {
    let d = tmp();
    let (ec, ec_pub) = ec_key(d.path(), "ml");
    let m = model(d.path());
    let pol = provenance_policy(d.path(), false, &[("model-signing", &ec_pub, "ml")]);
    // model_signing 1.1.1's CLI signs whole files only, so the sharded
    // statement is written here and signed by openssl over its DSSE encoding.
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{ "name": "m.gguf", "digest": { "sha256": "0".repeat(64) } }],
        "predicateType": "https://model_signing/signature/v1.0",
        "predicate": {
            "serialization": { "method": "shards", "hash_type": "sha256", "shard_size": 1000000 },
            "resources": [{ "name": "m.gguf:0:1000", "algorithm": "sha256", "digest": "0".repeat(64) }],
        },
    })
    .to_string();
    std::fs::write(d.path().join("m.gguf.model.sig"), dsse_bundle(&ec, &statement)).unwrap();
    assert_provenance_fails(&scan_with(&m, &pol), &["sharded digests", "does not support"]);
}

#[test]
fn a_key_that_cannot_be_read_or_parsed_stops_airlock_at_start_up() {
    let d = tmp();
    let m = model(d.path());
    let missing = d.path().join("missing.asc");
    let pol = provenance_policy(&d.path().join("a"), false, &[("gpg", &missing, "gone")]);
    let s = scan_with(&m, &pol);
    assert_eq!(s.code, 2, "{}{}", s.stdout, s.stderr);
    assert!(s.stderr.contains("provenance.trusted_keys[0].path") && s.stderr.contains("missing.asc"), "{}", s.stderr);
    let garbage = write(d.path(), "garbage.pub", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n");
    let pol = provenance_policy(&d.path().join("b"), false, &[("cosign", &garbage, "ci")]);
    let s = scan_with(&m, &pol);
    assert_eq!(s.code, 2, "{}{}", s.stdout, s.stderr);
    assert!(
        s.stderr.contains("cosign key \"ci\"") && s.stderr.contains("not a PEM ECDSA P-256 public key"),
        "{}",
        s.stderr
    );
}

#[test]
fn the_plugin_needs_the_sidecars_grant_and_nothing_else() {
    let d = tmp();
    let m = model(d.path());
    // Without its grant the component is refused, naming the import.
    let pol = policy_dir(d.path(), |t| t.replacen("      grants: [sidecars]\n", "", 1));
    let s = scan_with(&m, &pol);
    assert_ne!(s.code, 0);
    let all = format!("{}{}", s.stdout, s.stderr);
    assert!(all.contains("airlock:stage/sidecars") && all.contains("not granted"), "{all}");
    // With only that grant it loads and runs: it imports no other capability.
    let s = scan_with(&m, &provenance_policy(&d.path().join("b"), false, &[]));
    assert_passed(&s);
    assert_eq!(provenance(&s)["plugin"], "builtin:provenance");
}

#[test]
fn through_the_watcher_signatures_travel_with_the_model() {
    let d = tmp();
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let pol = provenance_policy(d.path(), true, &[("cosign", &ec_pub, "ci")]);
    let root = d.path().join("root");
    let cmd = |args: &[&str]| {
        let mut c = airlock(&root);
        c.env("AIRLOCK_POLICY", &pol).args(args);
        c
    };
    assert!(cmd(&["init"]).status().unwrap().success());
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let good = model(&src);
    let sig = write(&src, "ci.sig", cosign_sign_blob(&ec, &good).as_bytes());
    run(&mut cmd(&["admit", good.to_str().unwrap(), "--signature", sig.to_str().unwrap()]));
    assert!(root.join("quarantine/incoming/m.gguf.sig").is_file());

    let bad =
        Gguf { kvs: vec![("general.architecture".into(), kv_str("llama"))], ..Gguf::default() }.write(&src, "b.gguf");
    let bad_sig = write(&src, "b.gguf.sig", cosign_sign_blob(&ec, &bad).as_bytes());
    tamper(&bad);
    run(&mut cmd(&["admit", bad.to_str().unwrap(), "--signature", bad_sig.to_str().unwrap()]));
    let unsigned = Gguf::default().write(&src, "u.gguf");
    run(&mut cmd(&["admit", unsigned.to_str().unwrap()]));

    let out = String::from_utf8(run(&mut cmd(&["watch", "--once", "--settle-ms", "0"]))).unwrap();
    assert!(out.contains("PROMOTED: m.gguf"), "{out}");
    assert!(out.contains("REJECTED: b.gguf — provenance_check: signature verification failed: b.gguf.sig"), "{out}");
    assert!(out.contains("REJECTED: u.gguf — provenance_check: no signature found"), "{out}");
    // The signature stays with the model, in the registry and in rejected/.
    assert!(root.join("registry/m.gguf/model/m.gguf.sig").is_file());
    assert!(root.join("quarantine/rejected/b.gguf.sig").is_file());
    let report: Value =
        serde_json::from_slice(&std::fs::read(root.join("quarantine/rejected/b.gguf.report.json")).unwrap()).unwrap();
    assert_eq!(report["failed_stage"], "provenance_check");
    let incoming: Vec<_> = std::fs::read_dir(root.join("quarantine/incoming")).unwrap().collect();
    assert!(incoming.is_empty(), "{incoming:?}");
}

/// Every case of the acceptance list, dropped into incoming/ and taken by the watcher.
#[test]
fn every_case_through_the_watcher() {
    let d = tmp();
    let gpg = Gpg::new(d.path());
    gpg.key("pub@example.org", "ed25519", "sign", "1y", None);
    gpg.key("other@example.org", "ed25519", "sign", "1y", None);
    gpg.key("old@example.org", "ed25519", "sign", "1d", Some("20200101T000000!"));
    let gpg_key = d.path().join("keyring.asc");
    gpg.export("pub@example.org", &gpg_key);
    let old_key = d.path().join("old.asc");
    gpg.export("old@example.org", &old_key);
    let (ec, ec_pub) = ec_key(d.path(), "ci");
    let pol = policy_dir(d.path(), |t| {
        t.replacen("allowed_formats: [gguf, safetensors]", "allowed_formats: [gguf, safetensors, json]", 1)
            .replacen("  require_signature: false", "  require_signature: true", 1)
            .replacen(
                "  trusted_keys: []",
                &format!(
                    "  trusted_keys:\n    - {{kind: gpg, path: {}, name: publisher}}\n    - {{kind: gpg, path: {}, name: old}}\n    - {{kind: cosign, path: {}, name: ci}}\n    - {{kind: model-signing, path: {}, name: ml}}",
                    gpg_key.display(),
                    old_key.display(),
                    ec_pub.display(),
                    ec_pub.display()
                ),
                1,
            )
    });
    let root = d.path().join("root");
    let cmd = |args: &[&str]| {
        let mut c = airlock(&root);
        c.env("AIRLOCK_POLICY", &pol).args(args);
        c
    };
    assert!(cmd(&["init"]).status().unwrap().success());
    let incoming = root.join("quarantine/incoming");
    // Each model differs in its name metadata, so no signature fits another.
    let drop = |name: &str| {
        let g = Gguf {
            kvs: vec![("general.architecture".into(), kv_str("llama")), ("general.name".into(), kv_str(name))],
            ..Gguf::default()
        };
        g.write(&incoming, name)
    };
    let sig = |m: &Path, suffix: &str| incoming.join(format!("{}{suffix}", m.file_name().unwrap().to_str().unwrap()));

    let m = drop("gpg-valid.gguf");
    gpg.sign("pub@example.org", &m, &sig(&m, ".asc"), true, None);
    let m = drop("gpg-tampered.gguf");
    gpg.sign("pub@example.org", &m, &sig(&m, ".asc"), true, None);
    tamper(&m);
    let m = drop("gpg-untrusted.gguf");
    gpg.sign("other@example.org", &m, &sig(&m, ".asc"), true, None);
    let m = drop("gpg-expired.gguf");
    gpg.sign("old@example.org", &m, &sig(&m, ".asc"), true, Some("20200101T120000!"));
    let m = drop("garbage.gguf");
    std::fs::write(sig(&m, ".asc"), b"-----BEGIN PGP SIGNATURE-----\n\ngarbage\n").unwrap();
    let m = drop("cosign-valid.gguf");
    std::fs::write(sig(&m, ".sig"), cosign_sign_blob(&ec, &m)).unwrap();
    let m = drop("ms-valid.gguf");
    model_signing_sign(&ec, &m, &sig(&m, ".model.sig"), &[]);
    drop("unsigned.gguf");
    // A folder whose model-signing statement omits one of its files.
    let staging = d.path().join("staging/omits");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline"}"#).unwrap();
    std::fs::write(staging.join("extra.json"), "{}").unwrap();
    // A model has weights (the format gate refuses a folder without).
    std::fs::write(staging.join("model.safetensors"), safetensors(ST_HEADER, &[1; 24])).unwrap();
    model_signing_sign(&ec, &staging, &staging.join("model.sig"), &[&staging.join("extra.json")]);
    std::fs::rename(&staging, incoming.join("omits")).unwrap();

    let out = String::from_utf8(run(&mut cmd(&["watch", "--once", "--settle-ms", "0"]))).unwrap();
    let line = |name: &str| {
        out.lines()
            .find(|l| l.contains(&format!(": {name} ")))
            .unwrap_or_else(|| panic!("{name} not in:\n{out}"))
            .to_string()
    };
    for name in ["gpg-valid.gguf", "cosign-valid.gguf", "ms-valid.gguf"] {
        assert!(line(name).contains("PROMOTED"), "{out}");
    }
    let rejected = [
        (
            "gpg-tampered.gguf",
            "signature verification failed: gpg-tampered.gguf.asc: the OpenPGP signature by Publisher",
        ),
        ("gpg-untrusted.gguf", "signature verification failed: gpg-untrusted.gguf.asc: signed by an unknown key"),
        ("gpg-expired.gguf", "expired on 2020-01-02"),
        ("garbage.gguf", "signature verification failed: garbage.gguf.asc: not an OpenPGP signature"),
        ("unsigned.gguf", "provenance_check: no signature found"),
        ("omits", "signature verification failed: model.sig: extra.json is not listed in the signed statement"),
    ];
    for (name, needle) in rejected {
        let l = line(name);
        assert!(l.contains("REJECTED") && l.contains("provenance_check") && l.contains(needle), "{name}: {l}");
        let report: Value = serde_json::from_slice(
            &std::fs::read(root.join(format!("quarantine/rejected/{name}.report.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["failed_stage"], "provenance_check", "{name}");
    }
}
