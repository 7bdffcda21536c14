//! The quarantine lifecycle: claim, promote with a manifest, reject with a
//! report, verify, rescan, the audit chain, and crash consistency.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use airlock::pipeline::{FailedAt, StageVerdict};
use airlock::policy::Stage;
use serde_json::Value;

use crate::harness::*;

/// Unmounts a test's tmpfs when dropped.
pub(crate) struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A data root in a scratch folder, driven through the CLI (shared with the folder tests).
pub(crate) struct Lab {
    _dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
}

impl Lab {
    pub(crate) fn new() -> Lab {
        let dir = tmp();
        let root = dir.path().join("root");
        let lab = Lab { _dir: dir, root };
        assert!(lab.cmd(&["init"]).status().unwrap().success());
        lab
    }
    /// A data root on a tmpfs of `size_kib` (mounted here, so root is needed,
    /// as in CI), for full-disk tests. The mount goes when the guard drops,
    /// which must be before the lab.
    pub(crate) fn on_tmpfs(size_kib: u64) -> (Lab, Unmount) {
        let dir = tmp();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs for the full-disk test needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let guard = Unmount(root.clone());
        let lab = Lab { _dir: dir, root };
        assert!(lab.cmd(&["init"]).status().unwrap().success());
        (lab, guard)
    }
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = airlock(&self.root);
        c.args(args);
        c
    }
    pub(crate) fn run(&self, args: &[&str]) -> (i32, String) {
        let out = self.cmd(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
    pub(crate) fn incoming(&self) -> PathBuf {
        self.root.join("quarantine/incoming")
    }
    pub(crate) fn rejected(&self) -> PathBuf {
        self.root.join("quarantine/rejected")
    }
    pub(crate) fn registry(&self) -> PathBuf {
        self.root.join("registry")
    }
    pub(crate) fn drop_file(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.incoming().join(name), bytes).unwrap();
    }
    pub(crate) fn watch_once(&self) -> String {
        let (code, out) = self.run(&["watch", "--once", "--settle-ms", "0"]);
        assert_eq!(code, 0, "{out}");
        out
    }
    pub(crate) fn report(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.rejected().join(format!("{name}.report.json"))).unwrap()).unwrap()
    }
    pub(crate) fn manifest(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.registry().join(name).join("manifest.json")).unwrap()).unwrap()
    }
    pub(crate) fn audit(&self) -> Vec<Value> {
        let (code, out) = self.run(&["audit"]);
        assert_eq!(code, 0);
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

fn gguf_with_template(template: &str) -> Vec<u8> {
    let mut g = Gguf::default();
    g.kvs.push(("tokenizer.chat_template".into(), kv_str(template)));
    g.bytes()
}

#[test]
fn a_real_gguf_is_admitted_promoted_and_verified() {
    let lab = Lab::new();
    let origin = "https://huggingface.co/google/gemma-3-270m/resolve/main/gemma-3-270m-q4_k_m.gguf";
    let (code, out) = lab.run(&["admit", models().gemma.to_str().unwrap(), "--origin", origin]);
    assert_eq!(code, 0, "{out}");
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: gemma-3-270m-q4_k_m.gguf"), "{out}");
    let name = "gemma-3-270m-q4_k_m.gguf";
    assert!(lab.registry().join(name).join("model").join(name).is_file());
    let m = lab.manifest(name);
    assert_eq!(m["files"][0]["sha256"], "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818");
    assert!(m["files"][0]["tensors"].as_array().unwrap().len() > 100);
    assert_eq!(m["origin"], origin);
    assert_eq!(m["stages"][1]["plugin"], "builtin:format_gate");
    assert_eq!(m["stages"][1]["plugin_info"]["version"], "0.1.0");
    assert!(m["fingerprint"].as_str().unwrap().len() == 64 && m["merkle_root"].as_str().unwrap().len() == 64);
    let typed: airlock::lifecycle::Manifest = serde_json::from_value(m.clone()).unwrap();
    assert!(typed.stages.iter().all(|s| s.verdict != StageVerdict::Fail), "{m}");
    assert_eq!(typed.stages[4].stage, Stage::StaticScan);
    let pins = std::fs::read_to_string(lab.root.join("state/models.lock.yaml")).unwrap();
    assert!(
        pins.contains(&format!("{name}: a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")),
        "{pins}"
    );
    let (code, list) = lab.run(&["list"]);
    assert_eq!(code, 0);
    assert!(list.contains(name) && list.contains("gguf") && list.contains("253113024"), "{list}");
    let (code, out) = lab.run(&["verify", name]);
    assert_eq!(code, 0, "{out}");
    let audit = lab.audit();
    assert_eq!(audit.last().unwrap()["event"], "promoted");
    assert_eq!(audit.last().unwrap()["disabled_stages"], serde_json::json!(["behavioral_test"]));

    // A flipped byte inside one tensor of the registry copy is caught and named.
    let copy = lab.registry().join(name).join("model").join(name);
    let tensor = &m["files"][0]["tensors"][5];
    let at = tensor["offset"].as_u64().unwrap() + tensor["length"].as_u64().unwrap() / 2;
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[at as usize] ^= 0x01;
    std::fs::write(&copy, bytes).unwrap();
    let (code, out) = lab.run(&["verify", name]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("tensor {} changed", tensor["name"].as_str().unwrap())), "{out}");
}

#[test]
fn a_real_safetensors_model_is_promoted() {
    let lab = Lab::new();
    std::fs::copy(&models().minilm, lab.incoming().join("minilm.safetensors")).unwrap();
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: minilm.safetensors"), "{out}");
    assert_eq!(lab.run(&["verify", "minilm.safetensors"]).0, 0);
}

#[test]
fn verify_catches_a_changed_chat_template() {
    let lab = Lab::new();
    lab.drop_file("chat.gguf", &gguf_with_template("{{ messages[0].content }}"));
    assert!(lab.watch_once().contains("PROMOTED: chat.gguf"));
    // Same length, so every tensor offset and byte stays where it was.
    let evil = gguf_with_template("{{ messages[9].content }}");
    std::fs::write(lab.registry().join("chat.gguf/model/chat.gguf"), evil).unwrap();
    let (code, out) = lab.run(&["verify", "chat.gguf"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("header and metadata region changed"), "{out}");
    assert!(!out.contains("tensor token_embd.weight changed"), "{out}");
}

#[test]
fn a_malicious_drop_is_rejected_with_a_report() {
    let lab = Lab::new();
    lab.drop_file("evil.gguf", crate::formats::EVIL_PICKLE);
    let out = lab.watch_once();
    assert!(out.contains("REJECTED: evil.gguf — format_gate"), "{out}");
    assert!(lab.rejected().join("evil.gguf").is_file());
    let r = lab.report("evil.gguf");
    assert_eq!(r["filename"], "evil.gguf");
    assert_eq!(r["failed_stage"], "format_gate");
    assert_eq!(r["reason"], "format \"pickle\" is denied by policy");
    assert!(r["rejected_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(r["scan_details"]["scanners"][1]["plugin"], "builtin:format_gate");
    assert_eq!(r["scan_details"]["scanners"][1]["version"], "0.1.0");
    let last = lab.audit().pop().unwrap();
    assert_eq!((last["level"].as_str(), last["event"].as_str()), (Some("CRITICAL"), Some("rejected")));
    assert!(std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().next().is_none());
    // The stored report reads back into the library's types, verdicts as enums.
    let typed: airlock::lifecycle::Report = serde_json::from_value(r).unwrap();
    assert_eq!(typed.failed_stage, FailedAt::Stage(Stage::FormatGate));
    let verdicts: Vec<_> = typed.scan_details.stages.iter().map(|s| (s.stage, s.verdict)).collect();
    assert_eq!(verdicts[1], (Stage::FormatGate, StageVerdict::Fail));
    // Stages after the failure are not reached, except the static scan, which
    // runs from the start and keeps its findings: pickle_scan names the pickle.
    assert!(verdicts[2..].iter().all(|(s, v)| *v == StageVerdict::Skip || *s == Stage::StaticScan), "{verdicts:?}");
    assert!(verdicts.contains(&(Stage::StaticScan, StageVerdict::Fail)), "{verdicts:?}");
}

#[test]
fn links_and_special_files_are_rejected_without_being_read() {
    let lab = Lab::new();
    let outside = lab.root.join("outside.gguf");
    std::fs::write(&outside, Gguf::default().bytes()).unwrap();
    std::os::unix::fs::symlink(&outside, lab.incoming().join("link.gguf")).unwrap();
    std::fs::hard_link(&outside, lab.incoming().join("hard.gguf")).unwrap();
    assert!(Command::new("mkfifo").arg(lab.incoming().join("pipe.gguf")).status().unwrap().success());
    let out = lab.watch_once();
    for (name, why) in
        [("link.gguf", "is a symlink"), ("hard.gguf", "hardlinked file"), ("pipe.gguf", "not a regular file")]
    {
        let r = lab.report(name);
        assert_eq!(r["failed_stage"], "claim", "{name}: {r}");
        assert!(r["reason"].as_str().unwrap().contains(why), "{name}: {r}");
    }
    assert!(std::fs::symlink_metadata(lab.rejected().join("link.gguf")).unwrap().file_type().is_symlink(), "{out}");
    assert_eq!(std::fs::read(&outside).unwrap(), Gguf::default().bytes());
}

#[test]
fn partial_and_dot_files_are_never_taken() {
    let lab = Lab::new();
    for n in ["m.gguf.partial", "m.gguf.part", "m.gguf.tmp", ".hidden.gguf"] {
        lab.drop_file(n, &Gguf::default().bytes());
    }
    lab.watch_once();
    assert_eq!(std::fs::read_dir(lab.incoming()).unwrap().count(), 4);
    assert!(lab.audit().is_empty());
}

#[test]
fn a_folder_waits_until_its_model_index_arrives() {
    let lab = Lab::new();
    let folder = lab.incoming().join("sd-model");
    std::fs::create_dir_all(folder.join("unet")).unwrap();
    std::fs::write(folder.join("unet/diffusion_pytorch_model.safetensors"), safetensors(ST_HEADER, &[1; 24])).unwrap();
    lab.watch_once();
    assert!(folder.is_dir(), "a folder without model_index.json was taken");
    std::fs::write(folder.join("model_index.json"), br#"{"_class_name": "StableDiffusionPipeline"}"#).unwrap();
    let out = lab.watch_once();
    assert!(!folder.exists(), "{out}");
    assert!(out.contains("sd-model"), "{out}");
}

#[test]
fn several_models_at_once() {
    let lab = Lab::new();
    for i in 0..4 {
        let mut g = Gguf::default();
        g.kvs.push(("general.description".into(), kv_str(&format!("model {i}"))));
        lab.drop_file(&format!("m{i}.gguf"), &g.bytes());
        lab.drop_file(&format!("evil{i}.gguf"), crate::formats::EVIL_PICKLE);
    }
    let (code, out) = lab.run(&["watch", "--once", "--settle-ms", "0", "--jobs", "3"]);
    assert_eq!(code, 0, "{out}");
    for i in 0..4 {
        assert!(lab.registry().join(format!("m{i}.gguf/manifest.json")).is_file(), "{out}");
        assert!(lab.rejected().join(format!("evil{i}.gguf.report.json")).is_file(), "{out}");
    }
    assert_eq!(lab.run(&["audit", "--verify"]).0, 0);
    assert_eq!(lab.audit().len(), 8);
    let (_, list) = lab.run(&["list", "--format", "json"]);
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap().as_array().unwrap().len(), 4);
}

#[test]
fn one_watcher_per_root() {
    let lab = Lab::new();
    let mut first = lab.cmd(&["watch"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until the first watcher is up (it prints once it holds the lock and watches).
    let mut err = std::io::BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("watching"), "{line}");
    let (code, out) = lab.run(&["watch", "--once"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("another `airlock watch` holds"), "{out}");
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn a_model_that_changes_during_the_scan_is_rejected() {
    let lab = Lab::new();
    let wasm = component("misbehave");
    let sha = sha256_file(&wasm);
    // A slow stage 4 plugin in place of the built-in one, to widen the window.
    let pol = policy_dir(lab.root.parent().unwrap(), |t| {
        t.replacen(
            "    - plugin: builtin:provenance\n      grants: [sidecars]\n      limits:\n        timeout_secs: 900\n",
            &format!("    - plugin: {}\n      sha256: {sha}\n      config: {{ mode: slow-pass }}\n", wasm.display()),
            1,
        )
    });
    lab.drop_file("m.gguf", &Gguf::default().bytes());
    let child = lab
        .cmd(&["watch", "--once", "--settle-ms", "0", "--policy", pol.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Find the claimed copy, let the scan get going, then grow the file under it (as root can,
    // read-only or not): the scan must notice.
    let scanning = lab.root.join("quarantine/scanning");
    let start = Instant::now();
    let claimed = loop {
        let found = std::fs::read_dir(&scanning)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("model").join("m.gguf"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the model was never claimed");
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(400));
    use std::io::Write;
    std::fs::OpenOptions::new().append(true).open(&claimed).unwrap().write_all(&[0u8; 4096]).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let r = lab.report("m.gguf");
    assert_eq!(r["failed_stage"], "host", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("changed during the scan"), "{r}");
    assert!(!lab.registry().join("m.gguf").exists());
}

#[test]
fn a_name_clash_in_the_registry_is_rejected_and_explained() {
    let lab = Lab::new();
    lab.drop_file("m.gguf", &Gguf::default().bytes());
    assert!(lab.watch_once().contains("PROMOTED: m.gguf"));
    // The same bytes again (different bytes under a promoted name fail their pin first).
    lab.drop_file("m.gguf", &Gguf::default().bytes());
    let out = lab.watch_once();
    assert!(out.contains("REJECTED: m.gguf — registry"), "{out}");
    assert!(lab.report("m.gguf")["reason"].as_str().unwrap().contains("already in the registry"));
    assert!(lab.registry().join("m.gguf/model/m.gguf").is_file());
    // A different model under a promoted name fails the pin recorded on first sight.
    let mut other = Gguf::default();
    other.kvs.push(("general.description".into(), kv_str("another model, same name")));
    std::fs::remove_file(lab.rejected().join("m.gguf.report.json")).unwrap();
    std::fs::remove_file(lab.rejected().join("m.gguf")).unwrap();
    lab.drop_file("m.gguf", &other.bytes());
    assert!(lab.watch_once().contains("REJECTED: m.gguf — integrity_check: sha256 mismatch"));
}

#[test]
fn rescan_round_trips() {
    let lab = Lab::new();
    let bytes = Gguf::default().bytes();
    // Pinned to the wrong hash: rejected by the integrity stage.
    let wrong = "1".repeat(64);
    std::fs::write(lab.root.join("state/models.lock.yaml"), format!("models:\n  m.gguf: {wrong}\n")).unwrap();
    lab.drop_file("m.gguf", &bytes);
    assert!(lab.watch_once().contains("REJECTED: m.gguf — integrity_check"));
    // Fix the pin, send the model back, and it is promoted.
    let right = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    std::fs::write(lab.root.join("state/models.lock.yaml"), format!("models:\n  m.gguf: {right}\n")).unwrap();
    let (code, out) = lab.run(&["rescan", "m.gguf"]);
    assert_eq!(code, 0, "{out}");
    assert!(lab.incoming().join("m.gguf").is_file() && !lab.rejected().join("m.gguf.report.json").exists());
    assert!(lab.watch_once().contains("PROMOTED: m.gguf"));
    let events: Vec<String> = lab.audit().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(events, ["rejected", "rescan", "promoted"]);
}

#[test]
fn the_audit_chain_catches_edits_drops_and_reorders() {
    let lab = Lab::new();
    for n in ["a.gguf", "b.gguf", "c.gguf"] {
        lab.drop_file(n, crate::formats::EVIL_PICKLE);
    }
    lab.watch_once();
    assert_eq!(lab.run(&["audit", "--verify"]).0, 0);
    let log = lab.root.join("state/audit.jsonl");
    let good = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(lines.len(), 3);
    let broken = |text: String| {
        std::fs::write(&log, text).unwrap();
        let (code, out) = lab.run(&["audit", "--verify"]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("BROKEN"), "{out}");
    };
    broken(good.replacen("format \\\"pickle\\\" is denied", "format \\\"pickle\\\" is allowed", 1));
    broken(format!("{}\n{}\n", lines[0], lines[2]));
    broken(format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2]));
    broken(format!("{}\n{}\n", lines[0], lines[1]));
    std::fs::write(&log, good).unwrap();
    assert_eq!(lab.run(&["audit", "--verify"]).0, 0);
}

#[test]
fn the_watcher_takes_a_drop_and_stops_on_sigterm() {
    let lab = Lab::new();
    let mut child =
        lab.cmd(&["watch", "--settle-ms", "300"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Written in two steps: the watcher must wait for the file to settle.
    let bytes = Gguf::default().bytes();
    let path = lab.incoming().join("late.gguf");
    std::fs::write(&path, &bytes[..40]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    std::fs::write(&path, &bytes).unwrap();
    let start = Instant::now();
    while !lab.registry().join("late.gguf/manifest.json").exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the watcher did not promote the drop");
        assert!(!lab.rejected().join("late.gguf.report.json").exists(), "{}", lab.report("late.gguf"));
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The manifest's origin is the one the host resolved, not whatever the
/// source-policy plugin chose to report: here a plugin that reports none runs that stage.
#[test]
fn the_manifest_records_the_origin_the_host_resolved_whatever_plugin_judges_it() {
    let lab = Lab::new();
    let d = tmp();
    let policy = policy_dir(d.path(), |t| {
        let changed = t.replacen("    - plugin: builtin:source_policy\n", "    - plugin: builtin:integrity_check\n", 1);
        assert_ne!(changed, t, "the default chain's source_policy entry moved");
        changed
    });
    let origin = "https://huggingface.co/org/repo/resolve/main/m.gguf";
    let model = Gguf::default().write(d.path(), "m.gguf");
    let (code, out) = lab.run(&["admit", model.to_str().unwrap(), "--origin", origin]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = lab.run(&["watch", "--once", "--settle-ms", "0", "--policy", policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PROMOTED: m.gguf"), "{out}");
    let manifest = lab.manifest("m.gguf");
    assert_eq!(manifest["stages"][0]["plugin"], "builtin:integrity_check", "{manifest}");
    assert_eq!(manifest["origin"], origin);
}

/// `rescan` appends to the audit log from its own process while the watcher
/// appends from its threads: every append holds the log's lock, so the chain
/// and the sequence stay whole.
#[test]
fn rescans_beside_a_running_watcher_keep_the_audit_chain_whole() {
    let lab = Lab::new();
    let evil = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";
    let names: Vec<String> = (0..8).map(|i| format!("bad-{i}.gguf")).collect();
    for n in &names {
        lab.drop_file(n, evil);
    }
    lab.watch_once();
    let mut child = lab
        .cmd(&["watch", "--settle-ms", "0", "--jobs", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Rescan every rejected model, over and over, while the watcher rejects them again.
    // The deadline is on progress, not on pace: the test runs beside two hundred
    // others on two cores, so only a stall (no rescan for two minutes) is a failure.
    let mut rescans = 0;
    let mut last_progress = Instant::now();
    while rescans < 32 {
        assert!(
            last_progress.elapsed() < Duration::from_secs(120),
            "no rescan went through for 120 s (after {rescans}): the watcher or rescan is stuck"
        );
        for n in &names {
            if lab.rejected().join(n).exists() && lab.run(&["rescan", n]).0 == 0 {
                rescans += 1;
                last_progress = Instant::now();
            }
        }
    }
    // Let the watcher finish what is waiting, then stop it.
    let settling = Instant::now();
    let settled =
        |n: &String| lab.rejected().join(n).exists() && lab.rejected().join(format!("{n}.report.json")).exists();
    while !names.iter().all(settled) {
        if settling.elapsed() > Duration::from_secs(180) {
            let listing: Vec<_> = std::fs::read_dir(lab.rejected()).unwrap().map(|e| e.unwrap().file_name()).collect();
            panic!("the watcher did not settle; rejected/ holds {listing:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Each re-rejection found its name free: a rescan never took a model whose
    // report was not yet written (which would leave that report behind and push
    // the next rejection to a suffixed name).
    let mut listing: Vec<String> =
        std::fs::read_dir(lab.rejected()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    listing.sort();
    let mut expected: Vec<String> = names.iter().flat_map(|n| [n.clone(), format!("{n}.report.json")]).collect();
    expected.sort();
    assert_eq!(listing, expected);
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
    let entries = lab.audit();
    let rescan_entries = entries.iter().filter(|e| e["event"] == "rescan").count();
    assert_eq!(rescan_entries, rescans);
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>());
}

/// Every model is in exactly one place; the registry holds only complete records.
fn check_invariants(lab: &Lab, names: &[&str]) {
    let scanning: Vec<_> =
        std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().map(|e| e.unwrap().path()).collect();
    let listing: Vec<_> = scanning.iter().map(|d| (d, std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0))).collect();
    assert!(scanning.is_empty(), "scanning/ not empty after recovery: {listing:?}");
    for n in names {
        let places = [
            lab.incoming().join(n).exists(),
            lab.registry().join(n).join("model").join(n).exists(),
            lab.rejected().join(n).exists(),
        ];
        assert_eq!(places.iter().filter(|p| **p).count(), 1, "{n} is in {places:?} (incoming, registry, rejected)");
        if places[1] {
            let dir = lab.registry().join(n);
            assert!(
                dir.join("manifest.json").is_file() && !dir.join("decision.json").exists(),
                "{n}: incomplete record"
            );
        }
        if places[2] {
            assert!(lab.rejected().join(format!("{n}.report.json")).is_file(), "{n}: rejected without a report");
        }
    }
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

/// Two journal states a kill can leave, written out by hand so that the test
/// does not depend on timing: a claim folder renamed for removal, and a
/// rejection whose model already moved to a suffixed name in rejected/.
#[test]
fn interrupted_removals_and_suffixed_rejections_are_finished_on_restart() {
    let lab = Lab::new();
    let scanning = lab.root.join("quarantine/scanning");
    let doomed = scanning.join(".1-2-3.done");
    std::fs::create_dir(&doomed).unwrap();
    std::fs::write(doomed.join("decision.json"), "{}").unwrap();
    // An earlier rejection holds the plain name; this one was moved as x.gguf.<id>.
    lab.drop_file("x.gguf", b"earlier");
    std::fs::rename(lab.incoming().join("x.gguf"), lab.rejected().join("x.gguf")).unwrap();
    let id = "4-5-6";
    let claim = scanning.join(id);
    std::fs::create_dir(&claim).unwrap();
    std::fs::write(
        claim.join("claim.json"),
        format!(r#"{{"id":"{id}","name":"x.gguf","claimed_at":"2026-01-01T00:00:00Z"}}"#),
    )
    .unwrap();
    std::fs::write(
        claim.join("decision.json"),
        r#"{"promote":false,"failed_stage":"format_gate","reason":"crafted","sha256":null,"outcome":null}"#,
    )
    .unwrap();
    std::fs::write(claim.join("rejected-as"), format!("x.gguf.{id}")).unwrap();
    std::fs::write(lab.rejected().join(format!("x.gguf.{id}")), b"moved before the kill").unwrap();

    lab.watch_once();
    let left: Vec<_> = std::fs::read_dir(&scanning).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "scanning/ still holds {left:?}");
    let report = lab.report(&format!("x.gguf.{id}"));
    assert_eq!(report["failed_stage"], "format_gate");
    assert_eq!(report["reason"], "crafted");
    assert!(!lab.rejected().join("x.gguf.report.json").exists(), "the report went to the wrong name");
    let events: Vec<String> = lab.audit().iter().map(|e| e["event"].as_str().unwrap().to_string()).collect();
    assert_eq!(events, ["rejected"]);
}

#[test]
fn kill_9_at_random_points_loses_nothing() {
    // A small xorshift, seeded from the clock; the seed is printed for replay.
    let mut seed = std::env::var("AIRLOCK_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("kill test seed: {seed}");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let names = ["a.gguf", "b.gguf", "c.safetensors", "evil.gguf"];
    for round in 0..30 {
        let lab = Lab::new();
        lab.drop_file("a.gguf", &Gguf::default().bytes());
        lab.drop_file("b.gguf", &gguf_with_template("{{ x }}"));
        lab.drop_file("c.safetensors", &safetensors(ST_HEADER, &[1; 24]));
        lab.drop_file("evil.gguf", crate::formats::EVIL_PICKLE);
        // Odd rounds scan two models at once, to exercise the commit lock too.
        let jobs = if round % 2 == 1 { "2" } else { "1" };
        let mut child = lab
            .cmd(&["watch", "--settle-ms", "0", "--jobs", jobs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = Duration::from_micros(next() % 600_000);
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Restart: recovery, then whatever is still waiting.
        let out = lab.watch_once();
        check_invariants(&lab, &names);
        assert!(
            names.iter().all(|n| !lab.incoming().join(n).exists()),
            "round {round} (killed after {delay:?}): something stayed in incoming/\n{out}"
        );
        for n in ["a.gguf", "b.gguf", "c.safetensors"] {
            assert!(
                lab.registry().join(n).join("model").join(n).exists(),
                "round {round}: {n} was not promoted\n{out}"
            );
        }
        assert!(lab.rejected().join("evil.gguf").exists(), "round {round}");
    }
}

/// One recorded request: the request line, the headers and the body.
type Request = (String, Vec<String>, String);

/// A minimal HTTP/1.1 server on loopback that records each request and answers 200.
struct Loopback {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
}

impl Loopback {
    fn start(listener: std::net::TcpListener) -> Loopback {
        use std::io::{BufRead, BufReader, Read, Write};
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(16) {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end().to_string();
                    if h.is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    headers.push(h);
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                seen.lock().unwrap().push((line.trim_end().to_string(), headers, String::from_utf8(body).unwrap()));
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}").unwrap();
            }
        });
        Loopback { port, requests }
    }
}

fn registry_policy(lab: &Lab, port: u16) -> PathBuf {
    let dir = lab.root.parent().unwrap().to_path_buf();
    std::fs::write(dir.join("registry.token"), "s3cret-token\n").unwrap();
    policy_dir(&dir, |t| {
        format!(
            "{t}\nregistry:\n  url: http://127.0.0.1:{port}\n  token_file: {}\n",
            dir.join("registry.token").display()
        )
    })
}

#[test]
fn promotion_is_announced_to_the_registry_on_loopback() {
    let lab = Lab::new();
    let server = Loopback::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let pol = registry_policy(&lab, server.port);
    lab.drop_file("m.gguf", &Gguf::default().bytes());
    let (code, out) = lab.run(&["watch", "--once", "--settle-ms", "0", "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let reqs = server.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1, "{out}");
    let (line, headers, body) = &reqs[0];
    assert_eq!(line, "POST /v1/model/promote HTTP/1.1");
    assert!(
        headers.iter().any(|h| h == "authorization: Bearer s3cret-token" || h == "Authorization: Bearer s3cret-token"),
        "{headers:?}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["name"], "m.gguf");
    assert_eq!(body["sha256"], sha256_file(&lab.registry().join("m.gguf/model/m.gguf")));
    assert_eq!(body["integrity"]["merkle_root"], lab.manifest("m.gguf")["merkle_root"]);
    assert_eq!(body["scan_results"][2]["stage"], "integrity_check");
    assert_eq!(std::fs::read_dir(lab.root.join("state/outbox")).unwrap().count(), 0);
}

#[test]
fn a_failed_announcement_is_kept_and_retried() {
    let lab = Lab::new();
    // A port with nothing listening yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pol = registry_policy(&lab, port);
    lab.drop_file("m.gguf", &Gguf::default().bytes());
    let (code, out) = lab.run(&["watch", "--once", "--settle-ms", "0", "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("PROMOTED: m.gguf"), "the model stays promoted locally: {out}");
    assert!(out.contains("will be retried"), "{out}");
    assert_eq!(std::fs::read_dir(lab.root.join("state/outbox")).unwrap().count(), 1);
    // The registry comes up; the next run delivers the queued announcement.
    let server = Loopback::start(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
    let (code, out) = lab.run(&["watch", "--once", "--settle-ms", "0", "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(server.requests.lock().unwrap().len(), 1);
    assert_eq!(std::fs::read_dir(lab.root.join("state/outbox")).unwrap().count(), 0);
}
