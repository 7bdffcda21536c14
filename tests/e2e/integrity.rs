//! Stage 3: the host's sha256 against pins from --sha256 or the lock file.

use crate::harness::*;

const WRONG: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn a_wrong_sha256_fails_with_expected_and_actual() {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    let actual = sha256_file(&p);
    let s = scan_text(&p, &["--sha256", WRONG]);
    assert_eq!(s.code, 1, "{}", s.stdout);
    assert!(s.stdout.contains("Stage 3/7: integrity_check — FAIL (sha256 mismatch)"), "{}", s.stdout);
    assert!(s.stdout.contains(&format!("[quarantine]   expected: {WRONG}")), "{}", s.stdout);
    assert!(s.stdout.contains(&format!("[quarantine]   actual:   {actual}")), "{}", s.stdout);
    let j = scan_json(&p, &["--sha256", WRONG]);
    assert_rejected(&j, "integrity_check", "sha256 mismatch");
    assert_eq!(j.stage("integrity_check")["details"]["actual"], actual);
}

#[test]
fn the_right_sha256_passes() {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&p, &["--sha256", &sha256_file(&p).to_uppercase()]);
    assert_passed(&s);
    assert!(s.stage("integrity_check")["summary"].as_str().unwrap().contains("matches its pin"));
}

#[test]
fn pins_come_from_the_lock_file_in_the_state_dir() {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("state")).unwrap();
    std::fs::write(root.join("state/models.lock.yaml"), format!("models:\n  m.gguf: {WRONG}\n")).unwrap();
    let s = scan_in(&root, &p, &["--format", "json"], &[]);
    assert_rejected(&s, "integrity_check", "sha256 mismatch");
    std::fs::write(root.join("state/models.lock.yaml"), format!("models:\n  m.gguf: {}\n", sha256_file(&p))).unwrap();
    assert_passed(&scan_in(&root, &p, &["--format", "json"], &[]));
}

#[test]
fn no_pin_passes_and_says_it_would_be_recorded() {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&p, &[]);
    assert_passed(&s);
    assert!(s.stage("integrity_check")["summary"].as_str().unwrap().contains("would be recorded"));
}
