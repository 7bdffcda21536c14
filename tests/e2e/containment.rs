//! Hostile plugins built from the SDK are contained: the stage fails with the
//! cause, the host stays up, and the next model is still scanned.

use std::path::{Path, PathBuf};

use crate::harness::*;

/// A policy whose provenance_check stage runs `plugin` with `config` and `extra` entry lines.
fn hostile_policy(dir: &Path, plugin: &str, extra: &str) -> PathBuf {
    let wasm = component(plugin);
    let sha = sha256_file(&wasm);
    policy_dir(dir, |t| {
        provenance_entry(&t, &format!("    - plugin: {}\n      sha256: {sha}\n{extra}", wasm.display()))
    })
}

/// The shipped policy with its provenance_check plugin replaced by `entry` (YAML lines).
fn provenance_entry(policy: &str, entry: &str) -> String {
    let builtin =
        "    - plugin: builtin:provenance\n      grants: [sidecars]\n      limits:\n        timeout_secs: 900\n";
    assert!(policy.contains(builtin), "the shipped policy's provenance entry changed");
    policy.replacen(builtin, entry, 1)
}

fn misbehave(mode: &str, limits: &str) -> (tempfile::TempDir, Scan) {
    let d = tmp();
    let pol = hostile_policy(d.path(), "misbehave", &format!("      config: {{ mode: {mode} }}\n{limits}"));
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    (d, s)
}

#[test]
fn a_well_behaved_third_party_plugin_runs_in_the_chain() {
    let (_d, s) = misbehave("pass", "");
    assert_eq!(s.code, 0, "{}", s.stdout);
    assert_eq!(s.stage("provenance_check")["verdict"], "pass");
    assert_eq!(s.stage("provenance_check")["summary"], "misbehave: behaving");
}

#[test]
fn an_infinite_loop_is_stopped_at_its_deadline() {
    let (_d, s) = misbehave("spin", "      limits: { timeout_secs: 1.5 }\n");
    assert_rejected(&s, "provenance_check", "timed out: the plugin ran past its 1.5s deadline");
    let elapsed = s.stage("provenance_check")["elapsed_ms"].as_u64().unwrap();
    assert!((1500..2500).contains(&elapsed), "stopped after {elapsed} ms; deadline 1500 ms");
}

#[test]
fn a_memory_bomb_hits_its_limit() {
    let (_d, s) = misbehave("memory-bomb", "      limits: { memory_mib: 64 }\n");
    assert_rejected(&s, "provenance_check", "limit hit: memory limit of 64 MiB exceeded");
}

#[test]
fn a_panic_fails_the_stage_with_its_message() {
    let (_d, s) = misbehave("panic", "");
    assert_rejected(&s, "provenance_check", "deliberate panic from the misbehave plugin");
}

#[test]
fn a_100_mb_report_is_refused() {
    let (_d, s) = misbehave("huge-report", "");
    assert_rejected(
        &s,
        "provenance_check",
        "report refused: it is 104857600 bytes, above this plugin's cap of 1048576 bytes",
    );
}

#[test]
fn an_oversized_read_is_refused() {
    let (_d, s) = misbehave("read-flood", "");
    assert_rejected(&s, "provenance_check", "read of 4294967295 bytes refused");
}

#[test]
fn stderr_spam_is_truncated() {
    let (_d, s) = misbehave("stderr-spam", "      limits: { max_log_kib: 4 }\n");
    assert_eq!(s.code, 0, "{}", s.stdout);
    let log: Vec<&str> =
        s.stage("provenance_check")["log"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    let kept: usize = log.iter().map(|l| l.len()).sum();
    assert!(kept < 8 << 10, "kept {kept} bytes of output");
    assert!(log.last().unwrap().contains("more bytes of plugin output dropped"), "{log:?}");
}

#[test]
fn wasi_gives_no_filesystem_and_no_environment() {
    let (_d, s) = misbehave("wasi-escape", "");
    assert_eq!(s.code, 0, "{}", s.stdout);
    assert!(s.stage("provenance_check")["summary"].as_str().unwrap().starts_with("denied:"));
}

#[test]
fn the_whole_file_can_be_read_in_chunks() {
    let (_d, s) = misbehave("read-all", "");
    assert_eq!(s.code, 0, "{}", s.stdout);
    assert!(s.stage("provenance_check")["summary"].as_str().unwrap().starts_with("read "));
}

#[test]
fn an_ungranted_import_is_refused_at_load_time() {
    let d = tmp();
    let pol = hostile_policy(d.path(), "wants_inference", "");
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(
        &s,
        "provenance_check",
        "refused at load time: import \"airlock:stage/inference@0.2.0\" refused: the capability \"inference\" is not granted",
    );
    // With the grant it loads and runs (and fails honestly: llama.cpp cannot load this model).
    let d2 = tmp();
    let pol = hostile_policy(d2.path(), "wants_inference", "      grants: [inference]\n");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "provenance_check", "inference failed: the inference backend could not start");
}

/// Scans two crafted models in one `airlock scan` run; checks the exit code, returns both JSON lines.
fn scan_two(dir: &Path, pol: &Path, code: i32) -> Vec<serde_json::Value> {
    let a = Gguf::default().write(dir, "a.gguf");
    let b = Gguf::default().write(dir, "b.gguf");
    let out = airlock(dir)
        .args(["scan", "--format", "json", "--policy", pol.to_str().unwrap()])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    lines
}

#[test]
fn the_host_stays_up_and_scans_the_next_model() {
    let d = tmp();
    let pol = hostile_policy(d.path(), "misbehave", "      config: { mode: panic }\n");
    let lines = scan_two(d.path(), &pol, 1);
    for l in lines {
        assert_eq!(l["failed_stage"], "provenance_check");
    }
}

#[test]
fn a_third_party_plugin_must_match_its_pin() {
    let d = tmp();
    let wasm = component("misbehave");
    let pol = policy_dir(d.path(), |t| {
        provenance_entry(&t, &format!("    - plugin: {}\n      sha256: {}\n", wasm.display(), "ab".repeat(32)))
    });
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 2);
    assert!(s.stderr.contains("does not match its pin"), "{}", s.stderr);
}

#[test]
fn built_in_stages_are_components_not_core_modules() {
    for name in ["source_policy", "format_gate", "integrity_check"] {
        let bytes = std::fs::read(component(name)).unwrap();
        assert_eq!(&bytes[..4], b"\0asm", "{name}");
        assert_eq!(&bytes[4..8], &[0x0d, 0x00, 0x01, 0x00], "{name}: component-model preamble (layer 1)");
    }
}

#[test]
fn a_core_module_is_refused() {
    let d = tmp();
    let core = write(d.path(), "core.wasm", b"\0asm\x01\x00\x00\x00");
    let sha = sha256_file(&core);
    let pol = policy_dir(d.path(), |t| {
        provenance_entry(&t, &format!("    - plugin: {}\n      sha256: {sha}\n", core.display()))
    });
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "provenance_check", "not a WebAssembly component");
}

/// A GGUF of about `mib` MiB (one F32 tensor).
fn big_gguf(dir: &Path, mib: u64) -> PathBuf {
    let g = Gguf { tensors: vec![f32_tensor("token_embd.weight", &[1024, mib * 256])], ..Gguf::default() };
    g.write(dir, "big.gguf")
}

#[test]
fn a_flood_of_reads_is_stopped_at_the_read_budget() {
    let d = tmp();
    let pol = hostile_policy(
        d.path(),
        "misbehave",
        "      config: { mode: read-loop }\n      limits: { max_total_read_mib: 3 }\n",
    );
    let model = big_gguf(d.path(), 1);
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "provenance_check", "limit hit: read limit of 3145728 bytes exceeded");
}

#[test]
fn the_default_read_budget_is_four_passes_over_the_model() {
    let d = tmp();
    let pol = hostile_policy(d.path(), "misbehave", "      config: { mode: read-loop }\n");
    let model = big_gguf(d.path(), 1);
    let size = std::fs::metadata(&model).unwrap().len();
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    let budget = 4 * size + (64 << 20);
    assert_rejected(&s, "provenance_check", &format!("limit hit: read limit of {budget} bytes exceeded"));
}

#[test]
fn a_plugin_sees_its_read_budget_shrink() {
    let (d, s) = misbehave("read-budget", "      limits: { max_total_read_mib: 1 }\n");
    assert_eq!(s.code, 0, "{}", s.stdout);
    let size = std::fs::metadata(d.path().join("m.gguf")).unwrap().len();
    let n = size.min(4096);
    let want = format!("budget 1048576 then {} after reading {n}", (1 << 20) - n);
    assert_eq!(s.stage("provenance_check")["summary"], want.as_str());
}

#[test]
fn each_model_gets_a_fresh_instance() {
    // The plugin counts its runs in a static; a reused instance would say "run 2".
    let d = tmp();
    let pol = hostile_policy(d.path(), "misbehave", "      config: { mode: remember }\n");
    let lines = scan_two(d.path(), &pol, 0);
    for l in &lines {
        let st = l["stages"].as_array().unwrap().iter().find(|s| s["stage"] == "provenance_check").unwrap();
        assert_eq!(st["summary"], "run 1 in this instance", "{}", l["model"]);
    }
}

#[test]
fn a_plugin_that_opens_a_socket_is_refused_before_it_runs() {
    let d = tmp();
    let pol = hostile_policy(d.path(), "wants_network", "");
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "provenance_check", "refused at load time: import \"wasi:sockets/");
    assert!(
        s.stage("provenance_check")["summary"].as_str().unwrap().contains("network access is never granted"),
        "{}",
        s.stage("provenance_check")
    );
}
