//! One verdict whichever way a scan runs: `airlock scan`, the local watcher,
//! `watch --dispatch` with the shared path, and with the Object Store, must
//! give the same verdict, failed stage and reason for the same bytes and
//! the same sidecars (origin, signatures). A model whose origin or signature
//! stayed behind on the watcher's disk was promoted through the Object Store
//! while every other way rejected it; this suite is what would have said so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::formats::EVIL_PICKLE;
use crate::harness::*;
use crate::lifecycle::Lab;
use crate::scale_out::{Nats, PASSWORD, Proc, nats_policy, wait_exit};

/// (verdict, failed stage, reason) as each way reports it.
type Verdict = (String, Option<String>, Option<String>);

const DENIED: &str = "https://sketchy-site.example/model.gguf";
const ALLOWED: &str = "https://huggingface.co/google/gemma-3-270m/resolve/main/m.gguf";

fn gguf_with(kvs: &[(&str, (u32, Vec<u8>))]) -> Vec<u8> {
    let mut g = Gguf::default();
    g.kvs.extend(kvs.iter().map(|(k, v)| (k.to_string(), v.clone())));
    g.bytes()
}

fn set_origin_xattr(path: &Path, url: &str) {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new("user.xdg.origin.url").unwrap();
    // SAFETY: NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), url.as_ptr().cast(), url.len(), 0) };
    assert_eq!(r, 0, "setxattr on {}: {}", path.display(), std::io::Error::last_os_error());
}

/// A two-shard transformers folder of crafted safetensors with its index;
/// `wrong` maps tensor `a` to the shard that does not hold it.
fn sharded_folder(dir: &Path, name: &str, wrong: bool) {
    let f = dir.join(name);
    std::fs::create_dir_all(&f).unwrap();
    write(&f, "config.json", br#"{"model_type":"bert","architectures":["BertModel"]}"#);
    let one = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let two = r#"{"b":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    write(&f, "model-00001-of-00002.safetensors", &safetensors(one, &[1; 16]));
    write(&f, "model-00002-of-00002.safetensors", &safetensors(two, &[2; 16]));
    let a = if wrong { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" };
    let index = json!({"metadata": {}, "weight_map": {"a": a, "b": "model-00002-of-00002.safetensors"}});
    write(&f, "model.safetensors.index.json", index.to_string().as_bytes());
}

fn folder(dir: &Path, name: &str, extra: &[(&str, &[u8])]) -> PathBuf {
    let f = dir.join(name);
    std::fs::create_dir_all(&f).unwrap();
    write(&f, "config.json", br#"{"model_type":"bert","architectures":["BertModel"]}"#);
    write(&f, "model.safetensors", &safetensors(ST_HEADER, &[1; 24]));
    for (n, b) in extra {
        write(&f, n, b);
    }
    f
}

/// Writes every case into `dir` (models and their sidecars); returns the
/// model names, and the pins a root must hold for the pin-mismatch case.
fn cases(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let clean = Gguf::default().bytes();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("clean.gguf", clean.clone()),
        ("allowed-origin.gguf", clean.clone()),
        ("denied-origin.gguf", clean.clone()),
        ("xattr-origin.gguf", clean.clone()),
        ("bad-asc.gguf", clean.clone()),
        ("bad-sig.gguf", clean.clone()),
        ("bad-sigstore.gguf", clean.clone()),
        ("pin-mismatch.gguf", clean.clone()),
        ("truncated.gguf", Gguf { truncate: Some(100), ..Gguf::default() }.bytes()),
        ("empty.gguf", Vec::new()),
        ("pickle.gguf", EVIL_PICKLE.to_vec()),
        (
            "template-gadget.gguf",
            gguf_with(&[(
                "tokenizer.chat_template",
                kv_str("{{ cycler.__init__.__globals__.os.popen('id').read() }}"),
            )]),
        ),
        ("huge-count.gguf", Gguf { tensor_count: Some(1 << 40), ..Gguf::default() }.bytes()),
        ("clean.safetensors", safetensors(ST_HEADER, &[1; 24])),
        (
            "overlap.safetensors",
            safetensors(
                r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#,
                &[1; 24],
            ),
        ),
        ("config.json", br#"{"model_type":"bert"}"#.to_vec()),
    ];
    let mut names = Vec::new();
    for (n, b) in &files {
        write(dir, n, b);
        names.push(n.to_string());
    }
    write(dir, "allowed-origin.gguf.origin", format!("{ALLOWED}\n").as_bytes());
    write(dir, "denied-origin.gguf.origin", format!("{DENIED}\n").as_bytes());
    set_origin_xattr(&dir.join("xattr-origin.gguf"), DENIED);
    write(dir, "bad-asc.gguf.asc", b"-----BEGIN PGP SIGNATURE-----\nnot a signature\n-----END PGP SIGNATURE-----\n");
    write(dir, "bad-sig.gguf.sig", b"\x89not an OpenPGP packet");
    write(
        dir,
        "bad-sigstore.gguf.sigstore.json",
        br#"{"mediaType":"application/vnd.dev.sigstore.bundle+json;version=0.1"}"#,
    );

    folder(dir, "clean-folder", &[]);
    folder(dir, "denied-folder", &[]);
    write(dir, "denied-folder.origin", format!("{DENIED}\n").as_bytes());
    folder(
        dir,
        "gadget-folder",
        &[("config.json", br#"{"model_type":"bert","auto_map":{"AutoModel":"evil.Model"},"trust_remote_code":true}"#)],
    );
    folder(
        dir,
        "template-folder",
        &[("tokenizer_config.json", br#"{"chat_template":"{{ cycler.__init__.__globals__.os.popen('id').read() }}"}"#)],
    );
    folder(
        dir,
        "signed-folder",
        &[("model.sig", br#"{"mediaType":"application/vnd.dev.sigstore.bundle+json;version=0.2"}"#)],
    );
    let linked = folder(dir, "link-folder", &[]);
    std::os::unix::fs::symlink("/etc/hostname", linked.join("tokenizer.json")).unwrap();
    folder(dir, "nullifai-folder", &[("pytorch_model.bin", b"cposix\nsystem\n(S'id'\ntR(S'cut")]);
    sharded_folder(dir, "sharded-folder", false);
    sharded_folder(dir, "misindexed-folder", true);
    for n in [
        "clean-folder",
        "denied-folder",
        "gadget-folder",
        "template-folder",
        "signed-folder",
        "link-folder",
        "nullifai-folder",
        "sharded-folder",
        "misindexed-folder",
    ] {
        names.push(n.into());
    }
    names.sort();
    names
}

/// A pin that the clean bytes of `pin-mismatch.gguf` do not match.
fn pin_mismatch(root: &Path) {
    let pins = format!("models:\n  pin-mismatch.gguf: \"{}\"\n", "ab".repeat(32));
    std::fs::write(root.join("state/models.lock.yaml"), pins).unwrap();
}

/// Moves every case (sidecars with their model) into the lab's incoming/.
fn drop_all(staged: &Path, lab: &Lab) {
    for e in std::fs::read_dir(staged).unwrap() {
        let e = e.unwrap();
        std::fs::rename(e.path(), lab.incoming().join(e.file_name())).unwrap();
    }
}

/// What a lab's lifecycle decided for each name.
fn decided(lab: &Lab, names: &[String]) -> BTreeMap<String, Verdict> {
    names
        .iter()
        .map(|n| {
            let v = if lab.registry().join(n).join("manifest.json").is_file() {
                ("pass".to_string(), None, None)
            } else {
                let path = lab.rejected().join(format!("{n}.report.json"));
                let r: Value = serde_json::from_slice(
                    &std::fs::read(&path).unwrap_or_else(|e| panic!("{n}: neither promoted nor rejected ({e})")),
                )
                .unwrap();
                (
                    "fail".to_string(),
                    Some(r["failed_stage"].as_str().unwrap().to_string()),
                    Some(r["reason"].as_str().unwrap().to_string()),
                )
            };
            (n.clone(), v)
        })
        .collect()
}

#[test]
fn scan_watch_and_both_dispatch_transfers_give_one_verdict_per_model() {
    let d = tmp();
    let policy = nats_policy(d.path(), Some(PASSWORD));
    let pol = policy.to_str().unwrap().to_string();

    // 1. `airlock scan`, each model where it lies, beside its sidecars.
    let scan_lab = Lab::new();
    pin_mismatch(&scan_lab.root);
    let staged = d.path().join("scan");
    let names = cases(&staged);
    assert!(names.len() >= 20, "{names:?}");
    let mut by_scan = BTreeMap::new();
    for n in &names {
        let s = scan_in(&scan_lab.root, &staged.join(n), &["--format", "json", "--policy", &pol], &[]);
        let o = s.one();
        let v = (
            o["verdict"].as_str().unwrap().to_string(),
            o["failed_stage"].as_str().map(String::from),
            o["reason"].as_str().map(String::from),
        );
        by_scan.insert(n.clone(), v);
    }

    // 2. The local watcher.
    let local = Lab::new();
    pin_mismatch(&local.root);
    let staged = d.path().join("local");
    cases(&staged);
    drop_all(&staged, &local);
    let (code, out) = local.run(&["watch", "--once", "--settle-ms", "0", "--policy", &pol]);
    assert_eq!(code, 0, "{out}");
    let by_watch = decided(&local, &names);

    // 3 and 4. One worker behind a NATS server, then each transfer.
    let nats = Nats::start(d.path());
    let scratch = d.path().join("scratch");
    let labs = [("shared-path", Lab::new()), ("object-store", Lab::new())];
    // The worker runs with the shared-path watcher's --root: it reads shared-path
    // models only in that root's claim folders. Object Store jobs need no root.
    let w = {
        let mut c =
            labs[0].1.cmd(&["worker", "--nats", &nats.url(), "--scratch", scratch.to_str().unwrap(), "--policy", &pol]);
        c.env("AIRLOCK_LOG", "warn");
        Proc::spawn(c)
    };
    let mut by_transfer = Vec::new();
    for (transfer, lab) in &labs {
        let transfer = *transfer;
        pin_mismatch(&lab.root);
        let staged = d.path().join(transfer);
        cases(&staged);
        drop_all(&staged, lab);
        let url = nats.url();
        let mut c = lab.cmd(&[
            "watch",
            "--once",
            "--settle-ms",
            "0",
            "--transfer",
            transfer,
            "--dispatch",
            &url,
            "--policy",
            &pol,
        ]);
        c.env("AIRLOCK_LOG", "warn");
        let mut watcher = Proc::spawn(c);
        let status = wait_exit(&mut watcher, Duration::from_secs(300));
        assert!(status.success(), "{transfer}: {status:?}\n{}\nworker:\n{}", watcher.log(), w.log());
        by_transfer.push((transfer, decided(lab, &names)));
        if transfer == "object-store" {
            // The origin is recorded whichever way the bytes travelled.
            assert_eq!(lab.manifest("allowed-origin.gguf")["origin"], ALLOWED);
        }
    }
    assert_eq!(local.manifest("allowed-origin.gguf")["origin"], ALLOWED);

    let mut differ = Vec::new();
    for n in &names {
        let want = &by_scan[n];
        for (how, got) in [("watch", &by_watch)].into_iter().chain(by_transfer.iter().map(|(t, m)| (*t, m))) {
            if &got[n] != want {
                differ.push(format!("{n}: scan says {want:?}, {how} says {:?}", got[n]));
            }
        }
    }
    assert!(differ.is_empty(), "the ways a scan runs disagree:\n{}", differ.join("\n"));

    // And the verdicts are the ones each case was made for.
    let expect = |n: &str, stage: Option<&str>| {
        let v = &by_scan[n];
        assert_eq!(v.1.as_deref(), stage, "{n}: {v:?}");
    };
    for n in ["clean.gguf", "allowed-origin.gguf", "clean.safetensors", "clean-folder", "sharded-folder"] {
        expect(n, None);
    }
    for n in ["denied-origin.gguf", "xattr-origin.gguf", "denied-folder"] {
        expect(n, Some("source_policy"));
    }
    for n in ["bad-asc.gguf", "bad-sig.gguf", "bad-sigstore.gguf", "signed-folder"] {
        expect(n, Some("provenance_check"));
    }
    expect("pin-mismatch.gguf", Some("integrity_check"));
    for n in [
        "truncated.gguf",
        "empty.gguf",
        "pickle.gguf",
        "huge-count.gguf",
        "overlap.safetensors",
        "config.json",
        "link-folder",
        "misindexed-folder",
        "nullifai-folder",
    ] {
        expect(n, Some("format_gate"));
    }
    for n in ["template-gadget.gguf", "gadget-folder", "template-folder"] {
        expect(n, Some("static_scan"));
    }
    let (_, wlog) = w.terminate();
    assert!(!wlog.contains("panicked"), "{wlog}");
}

/// `airlock policy digest` for the policy folder `dir`.
fn digest(lab: &Lab, dir: &Path) -> String {
    let (code, out) = lab.run(&["policy", "digest", "--policy", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let d = out.trim().to_string();
    assert!(d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()), "{out}");
    d
}

/// A P-256 public key in PEM, made with openssl.
fn cosign_key(path: &Path) {
    let key = Command::new("openssl").args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"]).output().unwrap();
    assert!(key.status.success());
    let mut c = Command::new("openssl")
        .args(["ec", "-pubout", "-out"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(&key.stdout).unwrap();
    assert!(c.wait().unwrap().success());
}

/// The digest is over content, not paths: the same policy, key and
/// third-party plugin in two folders agree; each change that can change a
/// verdict (a threshold, a grant, a limit, the allowlist, a key, the
/// plugin's bytes) changes it.
#[test]
fn the_policy_digest_ignores_paths_and_sees_every_verdict_change() {
    let lab = Lab::new();
    let d = tmp();
    let key = d.path().join("ci.pub");
    cosign_key(&key);
    let plugin = std::fs::read(component("stage_v0_1")).unwrap();
    let make = |name: &str, edit: &dyn Fn(String) -> String, key: &Path, plugin: &[u8]| -> PathBuf {
        let dir = d.path().join(name);
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::copy(key, dir.join("keys/ci.pub")).unwrap();
        std::fs::create_dir_all(dir.join("plugins")).unwrap();
        std::fs::write(dir.join("plugins/third.wasm"), plugin).unwrap();
        let sha = sha256_bytes(plugin);
        policy_dir(&dir, |t| {
            edit(
                t.replace(
                    "  trusted_keys: []",
                    "  trusted_keys:\n    - { kind: cosign, path: ../keys/ci.pub, name: ci }",
                )
                .replace(
                    "  static_scan:\n",
                    &format!("  static_scan:\n    - plugin: ../plugins/third.wasm\n      sha256: {sha}\n"),
                ),
            )
        })
    };
    let same = |t: String| t;
    let a = digest(&lab, &make("a", &same, &key, &plugin));
    let b = digest(&lab, &make("elsewhere/b", &same, &key, &plugin));
    assert_eq!(a, b, "identical policies in two folders disagree");
    // Each worker has its own signing key: the scale_out keys are no part of the verdict.
    let keyed = make("keyed", &same, &key, &plugin);
    crate::scale_out::sign_results(&keyed);
    assert_eq!(digest(&lab, &keyed), a, "a worker's signing key changed the policy digest");

    let other_key = d.path().join("other.pub");
    cosign_key(&other_key);
    // A custom section appended to the component: still a valid component, other bytes.
    let mut other_plugin = plugin.clone();
    other_plugin.extend([0x00, 0x03, 0x01, b'x', b'y']);
    let threshold = |t: String| t.replace("max_string_bytes: 1048576", "max_string_bytes: 1048575");
    let grant = |t: String| t.replacen("      grants: [sidecars]\n", "", 1);
    let limit = |t: String| t.replace("timeout_secs: 60 ", "timeout_secs: 61 ");
    let variants: Vec<(&str, PathBuf)> = vec![
        ("threshold", make("threshold", &threshold, &key, &plugin)),
        ("grant", make("grant", &grant, &key, &plugin)),
        ("limit", make("limit", &limit, &key, &plugin)),
        ("key", make("key", &same, &other_key, &plugin)),
        ("plugin bytes", make("plugin", &same, &key, &other_plugin)),
        ("allowlist", {
            let p = make("allowlist", &same, &key, &plugin);
            let mut allow = std::fs::read_to_string(p.join("sources.allowlist.yaml")).unwrap();
            allow.push_str("  - name: extra\n    url_prefix: https://example.org/models/\n");
            std::fs::write(p.join("sources.allowlist.yaml"), allow).unwrap();
            p
        }),
    ];
    for (what, p) in variants {
        let text = std::fs::read_to_string(p.join("policy.yaml")).unwrap();
        assert_ne!(text.len(), 0);
        assert_ne!(digest(&lab, &p), a, "changing the {what} left the digest as it was");
    }
}
