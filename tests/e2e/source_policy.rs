//! Stage 1: origins against the allowlist, parsed, never by string prefix.

use crate::harness::*;

fn model() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    (d, p)
}

#[test]
fn allowlist_tricks_are_refused() {
    let (_d, p) = model();
    let cases = [
        ("https://huggingface.co.evil.example/google/gemma/x.gguf", "is not on the source allowlist"),
        ("https://huggingface.co@evil.example/google/gemma/x.gguf", "carries userinfo"),
        ("https://user:pw@huggingface.co/google/gemma/x.gguf", "carries userinfo"),
        ("http://huggingface.co/google/gemma/x.gguf", "scheme \"http\" is not https"),
        ("https://huggingface.co/googlebad/x.gguf", "is not on the source allowlist"),
        ("https://huggingface.co/google/../evil/x.gguf", "is not on the source allowlist"),
        ("https://huggingface.co:8443/google/x.gguf", "is not on the source allowlist"),
        ("huggingface.co/google/x.gguf", "not a valid URL"),
    ];
    for (origin, needle) in cases {
        let s = scan_json(&p, &["--origin", origin]);
        assert_rejected(&s, "source_policy", needle);
    }
}

#[test]
fn an_allowed_https_origin_passes() {
    let (_d, p) = model();
    let s = scan_json(&p, &["--origin", "https://huggingface.co/google/gemma-3-270m/resolve/main/x.gguf"]);
    assert_passed(&s);
    let st = s.stage("source_policy");
    assert!(st["summary"].as_str().unwrap().contains("matches allowlist entry \"google-gemma\""), "{st}");
    assert_eq!(st["details"]["source"], "flag");
}

#[test]
fn origin_from_a_sidecar_file() {
    let (d, p) = model();
    std::fs::write(d.path().join("m.gguf.origin"), "https://huggingface.co/ggml-org/models/x.gguf\n").unwrap();
    let s = scan_json(&p, &[]);
    assert_passed(&s);
    assert_eq!(s.stage("source_policy")["details"]["source"], "sidecar");
    std::fs::write(d.path().join("m.gguf.origin"), "https://evil.example/x.gguf\n").unwrap();
    assert_rejected(&scan_json(&p, &[]), "source_policy", "(from sidecar) is not on the source allowlist");
}

#[test]
fn origin_from_the_xattr_curl_and_wget_write() {
    let (_d, p) = model();
    xattr::set(&p, "user.xdg.origin.url", b"https://huggingface.co/sentence-transformers/x").unwrap();
    let s = scan_json(&p, &[]);
    assert_passed(&s);
    assert_eq!(s.stage("source_policy")["details"]["source"], "xattr");
    xattr::set(&p, "user.xdg.origin.url", b"https://huggingface.co.evil.example/sentence-transformers/x").unwrap();
    assert_rejected(&scan_json(&p, &[]), "source_policy", "(from xattr) is not on the source allowlist");
}

#[test]
fn require_source_decides_when_there_is_no_origin() {
    let (d, p) = model();
    let s = scan_json(&p, &[]);
    assert_eq!(s.stage("source_policy")["summary"], "no recorded origin; allowed by policy");
    let pol = policy_dir(d.path(), |t| t.replace("require_source: false", "require_source: true"));
    let s = scan_json(&p, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "source_policy", "no recorded origin, and quarantine.require_source is true");
}
