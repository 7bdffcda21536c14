//! The third-party plugin platform: scaffold, build, inspect, pin, policy
//! check, chains by format, and compatibility with older `airlock:stage` minors.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::*;

pub(crate) fn airlock_cmd(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = airlock(root).args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().expect("killed by a signal"), text(&out.stdout), text(&out.stderr))
}

/// The shipped policy with `entry` (YAML lines, 4-space list items) added to the static scan chain.
fn with_static_entry(dir: &Path, entry: &str) -> PathBuf {
    policy_dir(dir, |t| {
        assert!(t.contains("\n  static_scan:\n"), "the shipped policy has a static_scan chain");
        t.replacen("\n  static_scan:\n", &format!("\n  static_scan:\n{entry}"), 1)
    })
}

/// The result of the static-scan plugin whose describe() name is `name`.
fn by_name<'a>(s: &'a Scan, name: &str) -> &'a Value {
    stage_results(s, "static_scan")
        .into_iter()
        .find(|r| r["plugin_info"]["name"] == name)
        .unwrap_or_else(|| panic!("no static_scan result from {name}: {:#}", s.one()))
}

#[test]
fn new_build_pin_paste_scan_round_trip() {
    let d = tmp();
    let root = d.path();
    let crate_dir = root.join("rt-guard");
    let sdk = repo().join("sdk");
    let (code, out, err) = airlock_cmd(
        root,
        &["plugin", "new", "rt-guard", "--dir", crate_dir.to_str().unwrap(), "--sdk", sdk.to_str().unwrap()],
    );
    assert_eq!(code, 0, "plugin new: {out}{err}");
    for f in ["Cargo.toml", "src/lib.rs", "tests/scan.rs", "README.md", ".cargo/config.toml"] {
        assert!(crate_dir.join(f).is_file(), "the scaffold has no {f}");
    }
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains(&format!("airlock-sdk = {{ path = \"{}\" }}", sdk.canonicalize().unwrap().display())));

    let (code, wasm, err) = airlock_cmd(root, &["plugin", "build", crate_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "plugin build: {err}");
    let wasm = PathBuf::from(wasm.trim());
    assert_eq!(wasm.file_name().unwrap(), "rt_guard.wasm");

    let (code, entry, err) = airlock_cmd(root, &["plugin", "pin", wasm.to_str().unwrap()]);
    assert_eq!(code, 0, "plugin pin: {err}");
    assert!(entry.contains(&format!("sha256: {}", sha256_file(&wasm))), "{entry}");
    assert!(entry.contains("grants: []"), "{entry}");

    // Paste it, as printed, into the shipped policy; the policy checks clean.
    let pol = with_static_entry(root, &entry);
    let plugin_dir = components();
    let (code, out, _) = airlock_cmd(
        root,
        &["policy", "check", "--policy", pol.to_str().unwrap(), "--plugin-dir", plugin_dir.to_str().unwrap()],
    );
    assert_eq!(code, 0, "policy check:\n{out}");
    assert!(out.contains("rt_guard 0.1.0 (airlock:stage@0.2)"), "{out}");

    let model = Gguf::default().write(root, "two.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    let r = by_name(&s, "rt_guard");
    assert_eq!(r["verdict"], "pass", "{r:#}");
    assert_eq!(r["summary"], "2 tensors");
    assert_eq!(r["plugin_sha256"], sha256_file(&wasm).as_str());

    let empty = Gguf { tensors: Vec::new(), ..Gguf::default() }.write(root, "empty.gguf");
    let s = scan_json(&empty, &["--policy", pol.to_str().unwrap()]);
    let r = by_name(&s, "rt_guard");
    assert_eq!(r["verdict"], "fail", "{r:#}");
    assert_eq!(r["summary"], "the model has no tensors");
    assert_eq!(s.one()["verdict"], "fail");

    // The scaffold's own test does the same round trip with `cargo test`.
    let out = Command::new("cargo")
        .args(["test", "--quiet"])
        .current_dir(&crate_dir)
        .env("AIRLOCK_BIN", env!("CARGO_BIN_EXE_airlock"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the scaffold's cargo test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inspect_shows_world_imports_exports_and_describe() {
    let d = tmp();
    let wasm = component("provenance");
    let (code, out, err) = airlock_cmd(d.path(), &["plugin", "inspect", "--format", "json", wasm.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sha256"], sha256_file(&wasm).as_str());
    assert_eq!(v["size"], std::fs::metadata(&wasm).unwrap().len());
    assert_eq!(v["world"], "airlock:stage/stage@0.2.0");
    assert_eq!(v["splits"], false);
    assert_eq!(v["describe"]["name"], "provenance");
    assert_eq!(v["grants"], serde_json::json!(["sidecars"]));
    let imports: Vec<&str> = v["imports"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    assert!(imports.contains(&"airlock:stage/sidecars@0.2.0"), "{imports:?}");
    assert!(imports.contains(&"airlock:stage/artifact@0.2.0"), "{imports:?}");
    assert!(imports.iter().all(|i| !i.starts_with("wasi:sockets")), "{imports:?}");
    assert_eq!(v["exports"], serde_json::json!(["describe: func", "run: func"]));

    let (code, out, _) = airlock_cmd(d.path(), &["plugin", "inspect", wasm.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("capability: needs the `sidecars` grant"), "{out}");
}

#[test]
fn inspect_exits_2_naming_an_import_the_host_cannot_provide() {
    let d = tmp();
    let (code, _, err) = airlock_cmd(d.path(), &["plugin", "inspect", component("wants_network").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("import \"wasi:sockets/") && err.contains("network access is never granted"), "{err}");

    let core = write(d.path(), "core.wasm", b"\0asm\x01\x00\x00\x00");
    let (code, _, err) = airlock_cmd(d.path(), &["plugin", "inspect", core.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("not a WebAssembly component"), "{err}");
}

/// A copy of a component whose `airlock:stage` imports claim version `to` (same length as 0.2.0).
fn retarget(dir: &Path, name: &str, to: &str) -> PathBuf {
    let mut bytes = std::fs::read(component(name)).unwrap();
    let (from, to) = ("@0.2.0".as_bytes(), format!("@{to}").into_bytes());
    assert_eq!(from.len(), to.len());
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(&to);
            hits += 1;
        }
        i += 1;
    }
    assert!(hits > 0);
    write(dir, &format!("{name}-retargeted.wasm"), &bytes)
}

#[test]
fn a_plugin_built_against_the_older_minor_still_runs() {
    let d = tmp();
    let old = component("stage_v0_1");
    let (code, out, err) = airlock_cmd(d.path(), &["plugin", "inspect", "--format", "json", old.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["world"], "airlock:stage/stage@0.1.0");

    let pol =
        with_static_entry(d.path(), &format!("    - plugin: {}\n      sha256: {}\n", old.display(), sha256_file(&old)));
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    let r = by_name(&s, "stage_v0_1");
    assert_eq!(r["verdict"], "pass", "{r:#}");
    assert_eq!(r["summary"], "0.1 plugin: magic \"GGUF\", 2 tensors, architecture llama, format Format::Gguf");
    let findings: Vec<&str> =
        r["findings"].as_array().unwrap().iter().map(|f| f["location"].as_str().unwrap()).collect();
    assert_eq!(findings, ["token_embd.weight", "output.weight"]);
    assert_eq!(r["findings"][0]["message"], "token_embd.weight Dtype::F32 [8, 4]");
}

#[test]
fn an_unknown_minor_or_major_is_refused_naming_both_versions() {
    let d = tmp();
    for version in ["0.9.0", "1.2.0"] {
        let wasm = retarget(d.path(), "misbehave", version);
        let (code, _, err) = airlock_cmd(d.path(), &["plugin", "inspect", wasm.to_str().unwrap()]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("built for airlock:stage@{version}"))
                && err.contains("provides airlock:stage@0.2.x and @0.1.x"),
            "{err}"
        );
    }
}

#[test]
fn policy_check_finds_bad_pins_missing_files_and_wrong_grants() {
    let d = tmp();
    let plugin_dir = components();
    let mis = component("misbehave");
    let inf = component("wants_inference");
    let cases = [
        // (entry, what the problem line must say)
        (format!("    - plugin: {}\n      sha256: {}\n", mis.display(), "ab".repeat(32)), "does not match its pin"),
        (format!("    - plugin: {}/nope.wasm\n      sha256: {}\n", d.path().display(), "ab".repeat(32)), "cannot read"),
        (
            format!("    - plugin: {}\n      sha256: {}\n      grants: [sidecars]\n", mis.display(), sha256_file(&mis)),
            "granted sidecars but does not import it",
        ),
        (
            format!("    - plugin: {}\n      sha256: {}\n", inf.display(), sha256_file(&inf)),
            "the capability \"inference\" is not granted",
        ),
    ];
    for (i, (entry, needle)) in cases.iter().enumerate() {
        let dir = d.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pol = with_static_entry(&dir, entry);
        let (code, out, _) = airlock_cmd(
            d.path(),
            &["policy", "check", "--policy", pol.to_str().unwrap(), "--plugin-dir", plugin_dir.to_str().unwrap()],
        );
        assert_eq!(code, 1, "case {i}:\n{out}");
        let problem = out.lines().find(|l| l.starts_with("PROBLEM")).unwrap_or_else(|| panic!("case {i}:\n{out}"));
        assert!(problem.contains("chain.static_scan[0]") && problem.contains(needle), "case {i}: {problem}");
        if i == 2 {
            // A scan runs an over-granted plugin (it cannot call what it does not import) and warns.
            let model = Gguf::default().write(&dir, "m.gguf");
            let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
            assert!(s.stderr.contains("is granted sidecars but does not import it"), "{}", s.stderr);
        }
    }
    // A policy that does not parse is a problem too, named by file and key.
    let dir = d.path().join("broken");
    let pol = policy_dir(&dir, |t| t.replacen("  require_source: false", "  require_source: maybe", 1));
    let (code, out, _) = airlock_cmd(d.path(), &["policy", "check", "--policy", pol.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("policy.yaml") && out.contains("require_source"), "{out}");
}

/// `policy check` compiles into the cache the scans use: after it the cache
/// holds one compiled entry per plugin of the policy, and a second check loads
/// every one of them from there, leaving the cache as it was.
#[test]
fn policy_check_compiles_into_the_scans_plugin_cache() {
    let d = tmp();
    let cache = d.path().join("cache");
    let pol = policy_dir(&d.path().join("shipped"), |t| t);
    let check = || {
        let (code, out, _) = airlock_cmd(
            d.path(),
            &["policy", "check", "--policy", pol.to_str().unwrap(), "--cache-dir", cache.to_str().unwrap()],
        );
        assert_eq!(code, 0, "{out}");
        out
    };
    let compiled = || {
        let mut v: Vec<(String, std::time::SystemTime)> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().modified().unwrap()))
            .collect();
        v.sort();
        v
    };
    let out = check();
    // One line per entry, e.g. "ok       chain.static_scan[0] builtin:weights: ...".
    let mut plugins: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("ok"))
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(|p| p.trim_end_matches(':'))
        .collect();
    plugins.sort();
    plugins.dedup();
    assert!(plugins.len() >= 5, "{out}");
    let first = compiled();
    assert_eq!(first.len(), plugins.len(), "one compiled entry per plugin {plugins:?}: {first:?}");
    check();
    assert_eq!(compiled(), first, "the second check loads from the cache and rewrites nothing");
}

#[test]
fn a_plugin_runs_only_on_the_formats_its_entry_names() {
    let d = tmp();
    let mis = component("misbehave");
    let entry = |formats: &str| {
        format!(
            "    - plugin: {}\n      sha256: {}\n      formats: [{formats}]\n      config: {{ mode: pass }}\n",
            mis.display(),
            sha256_file(&mis)
        )
    };
    let gguf = Gguf::default().write(d.path(), "m.gguf");
    let st = write(d.path(), "m.safetensors", &safetensors(ST_HEADER, &[0u8; 24]));

    let dir = d.path().join("gguf-only");
    let pol = with_static_entry(&dir, &entry("gguf"));
    let s = scan_json(&gguf, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(by_name(&s, "misbehave")["verdict"], "pass");
    let s = scan_json(&st, &["--policy", pol.to_str().unwrap()]);
    let r = by_name(&s, "misbehave");
    assert_eq!(r["verdict"], "skip", "{r:#}");
    assert!(r["summary"].as_str().unwrap().contains("on gguf only; this model is safetensors"), "{r:#}");

    let dir = d.path().join("unknown");
    let pol = with_static_entry(&dir, &entry("ggml"));
    let s = scan_json(&gguf, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 2);
    assert!(
        s.stderr.contains("chain.static_scan[0].formats") && s.stderr.contains("unknown format \"ggml\""),
        "{}",
        s.stderr
    );
}

#[test]
fn each_entry_gets_its_own_config_as_json() {
    let d = tmp();
    let mis = component("misbehave");
    // Two entries of the same component with different configs behave differently.
    let entry = |mode: &str| {
        format!(
            "    - plugin: {}\n      sha256: {}\n      config: {{ mode: {mode} }}\n",
            mis.display(),
            sha256_file(&mis)
        )
    };
    let pol = with_static_entry(d.path(), &format!("{}{}", entry("pass"), entry("remember")));
    let model = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
    let summaries: Vec<&str> = stage_results(&s, "static_scan")
        .into_iter()
        .filter(|r| r["plugin_info"]["name"] == "misbehave")
        .map(|r| r["summary"].as_str().unwrap())
        .collect();
    assert_eq!(summaries, ["misbehave: behaving", "run 1 in this instance"]);
}
