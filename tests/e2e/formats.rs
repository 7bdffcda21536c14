//! Format sniffing from content, denied formats and polyglots.

use std::process::Command;

use crate::harness::*;

/// pickle.dumps of a REDUCE of posix.system("id"), protocol 4, written by hand.
pub const EVIL_PICKLE: &[u8] =
    b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";

#[test]
fn a_pickle_named_gguf_fails_at_the_format_gate() {
    let d = tmp();
    let s = scan_json(&write(d.path(), "model.gguf", EVIL_PICKLE), &[]);
    assert_rejected(&s, "format_gate", "format \"pickle\" is denied by policy");
    assert_eq!(s.one()["format"][0], "pickle");
    assert_eq!(s.stage("integrity_check")["verdict"], "skip");
    assert!(s.stage("integrity_check")["summary"].as_str().unwrap().starts_with("not reached"));
}

#[test]
fn a_pytorch_zip_named_safetensors_fails() {
    let d = tmp();
    let p = d.path().join("model.safetensors");
    // The layout torch.save writes: <name>/data.pkl, <name>/data/0, <name>/version.
    let script = "import sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
        \x20   z.writestr('archive/data.pkl', bytes.fromhex(sys.argv[2]))\n\
        \x20   z.writestr('archive/data/0', bytes(16))\n\
        \x20   z.writestr('archive/version', '3\\n')\n";
    let ok = Command::new("python3").args(["-c", script]).arg(&p).arg(hex::encode(EVIL_PICKLE)).status().unwrap();
    assert!(ok.success());
    let s = scan_json(&p, &[]);
    assert_rejected(&s, "format_gate", "format \"pytorch-zip\" is denied by policy");
}

#[test]
fn a_plain_zip_is_denied_and_unknown_bytes_are_not_allowed() {
    let d = tmp();
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend([0u8; 60]);
    assert_rejected(
        &scan_json(&write(d.path(), "m.gguf", &zip), &[]),
        "format_gate",
        "format \"zip\" is denied by policy",
    );
    let s = scan_json(&write(d.path(), "m.bin", &[0xffu8, 0xfe, 0x00, 0x01, 0x02]), &[]);
    assert_rejected(&s, "format_gate", "format \"unknown\" is not allowed by policy (allowed: gguf, safetensors)");
}

#[test]
fn a_protocol_0_pickle_is_caught_by_its_opcodes() {
    // No PROTO opcode, so no magic: it sniffs as text. Even where a policy
    // allows text (tokenizer files), the gate walks its opcodes and refuses it.
    let d = tmp();
    let p = write(d.path(), "m.gguf", b"cposix\nsystem\n(S'id'\ntR.");
    assert_rejected(&scan_json(&p, &[]), "format_gate", "format \"text\" is not allowed");
    let pol = policy_dir(d.path(), |t| t.replace("[gguf, safetensors]", "[gguf, safetensors, text]"));
    let s = scan_json(&p, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "format_gate", "polyglot: the first bytes also form a pickle stream that imports or calls");
}

#[test]
fn a_zip_appended_to_a_gguf_is_a_polyglot() {
    let d = tmp();
    let mut bytes = Gguf::default().bytes();
    let pad = bytes.len().next_multiple_of(32) - bytes.len();
    bytes.extend(vec![0; pad]);
    bytes.extend(b"PK\x03\x04\x14\x00\x00\x00\x00\x00");
    bytes.extend([0u8; 40]);
    let s = scan_json(&write(d.path(), "poly.gguf", &bytes), &[]);
    assert_rejected(&s, "format_gate", "polyglot: a zip archive is appended after the data");
}

#[test]
fn a_pickle_appended_to_safetensors_is_a_polyglot() {
    let d = tmp();
    let mut bytes = safetensors(ST_HEADER, &[1; 24]);
    bytes.extend(EVIL_PICKLE);
    let s = scan_json(&write(d.path(), "poly.safetensors", &bytes), &[]);
    assert_rejected(&s, "format_gate", "polyglot: a pickle stream is appended after the data");
}

#[test]
fn a_zip_directory_hidden_in_tensor_data_is_a_polyglot() {
    // A structurally valid GGUF whose last tensor ends with a zip
    // end-of-central-directory record: zip readers would open it.
    let mut g = Gguf::default();
    g.tensors[1].dims = vec![8, 1];
    let mut bytes = g.bytes();
    let n = bytes.len();
    let mut eocd = b"PK\x05\x06".to_vec();
    eocd.extend([0u8; 18]);
    bytes[n - 22..].copy_from_slice(&eocd);
    let d = tmp();
    let s = scan_json(&write(d.path(), "hidden.gguf", &bytes), &[]);
    assert_rejected(&s, "format_gate", "polyglot: a zip end-of-central-directory record");
}

#[test]
fn policy_can_allow_more_formats() {
    let d = tmp();
    let pol = policy_dir(d.path(), |t| {
        t.replace("allowed_formats: [gguf, safetensors]", "allowed_formats: [gguf, safetensors, json]")
    });
    let json = write(d.path(), "config.json", br#"{"architectures": ["Bert"]}"#);
    let s = scan_json(&json, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 0, "{}", s.stdout);
    assert_eq!(s.stage("format_gate")["summary"], "json");
}
