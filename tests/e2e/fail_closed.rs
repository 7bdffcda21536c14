//! Fail closed on every byte: a pickle that reads as text, a folder with no
//! weights, the leftovers of `hf download`, and a watcher that rests when
//! nothing arrives.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::lifecycle::Lab;

/// The nullifAI shape: a protocol-0 pickle (no magic, every byte printable)
/// that calls posix.system and then breaks off before STOP.
const NULLIFAI: &[u8] = b"cposix\nsystem\n(S'touch /tmp/airlock-pwned'\ntR(S'broken off here";

/// A transformers folder as a fine-tune ships it, around `weights`.
fn transformers_folder(dir: &Path, name: &str, weights: &[(&str, &[u8])]) -> std::path::PathBuf {
    let f = dir.join(name);
    std::fs::create_dir_all(&f).unwrap();
    write(&f, "config.json", br#"{"model_type":"bert","architectures":["BertModel"]}"#);
    write(&f, "generation_config.json", br#"{"max_length":32}"#);
    write(&f, "README.md", b"# A model\n\nFine-tuned.\n");
    write(&f, "LICENSE", b"Apache License\nVersion 2.0\n");
    write(&f, "vocab.txt", b"[PAD]\n[UNK]\nhello\n");
    for (n, b) in weights {
        write(&f, n, b);
    }
    f
}

/// The red team's false pass: `pytorch_model.bin` is a protocol-0 pickle that
/// sniffs as text. The gate refuses it for its name, naming both kinds, and
/// pickle_scan names the callable and the offset.
#[test]
fn a_pickle_that_reads_as_text_in_a_folder_is_rejected() {
    let d = tmp();
    let f = transformers_folder(d.path(), "nullifai", &[("pytorch_model.bin", NULLIFAI)]);
    let s = scan_json(&f, &[]);
    assert_rejected(&s, "format_gate", "pytorch_model.bin: named as");
    let reason = s.one()["reason"].as_str().unwrap();
    assert!(reason.contains("but its content is text"), "{reason}");
    let p = plugin_result(&s, "pickle_scan");
    assert_eq!(p["verdict"], "fail", "{p:#}");
    let f0 = &p["findings"][0];
    assert_eq!(f0["rule"], "pickle.dangerous-import", "{p:#}");
    assert!(f0["message"].as_str().unwrap().contains("posix.system"), "{f0}");
    assert!(f0["location"].as_str().unwrap().starts_with("pytorch_model.bin"), "{f0}");
    assert_eq!(f0["offset"], 0, "{f0}");
    // The static scan ran beside the gate; the report and the log say so,
    // so its FAIL does not read as a second verdict.
    assert!(p["still_ran"].as_str().unwrap_or("").contains("the chain stopped at format_gate"), "{p:#}");
    let text = scan_text(&f, &[]);
    assert!(text.stdout.contains("(still ran after the chain stopped at format_gate"), "{}", text.stdout);

    // Beside real weights it is refused all the same; and text under a name
    // that is not a text name is refused even when it holds no pickle.
    let f = transformers_folder(
        d.path(),
        "beside",
        &[("model.safetensors", &safetensors(ST_HEADER, &[1; 24])), ("pytorch_model.bin", NULLIFAI)],
    );
    assert_rejected(&scan_json(&f, &[]), "format_gate", "pytorch_model.bin: named as");
    let f = transformers_folder(
        d.path(),
        "odd-text",
        &[("model.safetensors", &safetensors(ST_HEADER, &[1; 24])), ("weights.dat", b"just some words\n")],
    );
    assert_rejected(&scan_json(&f, &[]), "format_gate", "weights.dat: its content is text, but its name");
}

/// Real `pickle.dumps` output of every protocol (0 to 5), whole and cut off
/// before STOP: pickle_scan names posix.system in each, whatever the file
/// sniffs as, and the gate refuses each file.
#[test]
fn pickles_of_every_protocol_whole_or_truncated_are_named_by_pickle_scan() {
    let d = tmp();
    let script = "import os, pickle, sys\n\
        class P:\n\
        \x20   def __reduce__(self):\n\
        \x20       return (os.system, ('id',))\n\
        for proto in range(6):\n\
        \x20   b = pickle.dumps(P(), protocol=proto)\n\
        \x20   open(os.path.join(sys.argv[1], f'p{proto}.txt'), 'wb').write(b)\n\
        \x20   open(os.path.join(sys.argv[1], f't{proto}.txt'), 'wb').write(b[:-3])\n";
    let ok = Command::new("python3").args(["-c", script]).arg(d.path()).status().unwrap();
    assert!(ok.success());
    for proto in 0..6 {
        for kind in ["p", "t"] {
            let path = d.path().join(format!("{kind}{proto}.txt"));
            let s = scan_json(&path, &[]);
            assert_eq!(s.one()["failed_stage"], "format_gate", "{}: {:#}", path.display(), s.one());
            let p = plugin_result(&s, "pickle_scan");
            let named = p["findings"].as_array().unwrap().iter().any(|f| {
                f["rule"] == "pickle.dangerous-import" && f["message"].as_str().unwrap().contains("posix.system")
            });
            assert!(named, "{}: pickle_scan did not name posix.system: {p:#}", path.display());
        }
    }
}

/// Real `pickle.dumps` output inside the wrappers a loader opens, written by
/// Python's own gzip, bz2, lzma, tarfile and zipfile modules (7z, which
/// Python cannot write, is covered by pickle_scan's unit tests): each file is
/// refused at the gate, and pickle_scan names posix.system and the wrapper
/// it was found in, through a `.tar.gz` too.
#[test]
fn pickles_inside_compressed_files_and_archives_are_named_by_pickle_scan() {
    let d = tmp();
    let script = "import bz2, gzip, io, lzma, os, pickle, sys, tarfile, zipfile\n\
        class P:\n\
        \x20   def __reduce__(self):\n\
        \x20       return (os.system, ('id',))\n\
        out = sys.argv[1]\n\
        for proto in (0, 2, 5):\n\
        \x20   b = pickle.dumps(P(), protocol=proto)\n\
        \x20   open(os.path.join(out, f'm{proto}.pkl.gz'), 'wb').write(gzip.compress(b))\n\
        \x20   open(os.path.join(out, f'm{proto}.pkl.bz2'), 'wb').write(bz2.compress(b))\n\
        \x20   open(os.path.join(out, f'm{proto}.pkl.xz'), 'wb').write(lzma.compress(b))\n\
        \x20   with tarfile.open(os.path.join(out, f'm{proto}.tar.gz'), 'w:gz') as t:\n\
        \x20       i = tarfile.TarInfo('ckpt/data.pkl'); i.size = len(b); t.addfile(i, io.BytesIO(b))\n\
        \x20   with zipfile.ZipFile(os.path.join(out, f'm{proto}.zip'), 'w', zipfile.ZIP_DEFLATED) as z:\n\
        \x20       z.writestr('weights.bin.xz', lzma.compress(b))\n";
    let ok = Command::new("python3").args(["-c", script]).arg(d.path()).status().unwrap();
    assert!(ok.success());
    let cases = [
        ("pkl.gz", "(gzip stream)"),
        ("pkl.bz2", "(bzip2 stream)"),
        ("pkl.xz", "(xz stream)"),
        ("tar.gz", "(gzip stream) (tar member ckpt/data.pkl)"),
        ("zip", "(zip entry weights.bin.xz) (xz stream)"),
    ];
    for proto in [0, 2, 5] {
        for (ext, within) in cases {
            let name = format!("m{proto}.{ext}");
            let s = scan_json(&d.path().join(&name), &[]);
            assert_eq!(s.one()["failed_stage"], "format_gate", "{name}: {:#}", s.one());
            let p = plugin_result(&s, "pickle_scan");
            assert_eq!(p["verdict"], "fail", "{name}: {p:#}");
            let hit = p["findings"].as_array().unwrap().iter().find(|f| f["rule"] == "pickle.dangerous-import");
            let hit = hit.unwrap_or_else(|| panic!("{name}: no dangerous import named: {p:#}"));
            assert!(hit["message"].as_str().unwrap().contains("posix.system"), "{name}: {hit}");
            let at = hit["location"].as_str().unwrap();
            assert_eq!(at, format!("{name} {within}"), "{name}");
        }
    }
}

#[test]
fn a_folder_without_weights_is_rejected_at_the_format_gate() {
    let d = tmp();
    let f = transformers_folder(d.path(), "hollow", &[]);
    assert_rejected(&scan_json(&f, &[]), "format_gate", "the model folder holds no weights");
    // A safetensors file with no tensor is no weights either.
    let f = transformers_folder(d.path(), "empty-st", &[("model.safetensors", &safetensors("{}", &[]))]);
    assert_rejected(&scan_json(&f, &[]), "format_gate", "the model folder holds no weights");
}

/// Issue 37: weights that number their layers must cover every layer the
/// config names. The real all-MiniLM-L6-v2 (6 layers) passes; the same
/// weights under a config that says 8, or with two layers' tensors taken
/// out, are rejected at the format gate naming the missing layers.
#[test]
fn weights_must_cover_the_layers_the_config_names() {
    let d = tmp();
    let base = crate::hf_folders::minilm(d.path());
    assert_passed(&scan_json(&base, &[]));
    let more = d.path().join("eight");
    crate::hf_folders::copy_folder(&base, &more);
    let cfg = more.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(v["num_hidden_layers"], 6);
    v["num_hidden_layers"] = 8.into();
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    assert_rejected(
        &scan_json(&more, &[]),
        "format_gate",
        "tensors for only 6 of those layers: none for layer(s) 6, 7",
    );

    // Layers 2 and 3 taken out of the weights (the header rewritten without them).
    let cut = d.path().join("cut");
    crate::hf_folders::copy_folder(&base, &cut);
    let (header, data) = crate::hf_folders::read_safetensors(&cut.join("model.safetensors"));
    let kept: Vec<(String, serde_json::Value, serde_json::Value, Vec<u8>)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__" && !k.contains(".layer.2.") && !k.contains(".layer.3."))
        .map(|(k, t)| {
            let [a, b] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
            (k.clone(), t["dtype"].clone(), t["shape"].clone(), data[a..b].to_vec())
        })
        .collect();
    let refs: Vec<(String, serde_json::Value, serde_json::Value, &[u8])> =
        kept.iter().map(|(k, d, s, b)| (k.clone(), d.clone(), s.clone(), b.as_slice())).collect();
    crate::hf_folders::write_safetensors(&cut.join("model.safetensors"), &refs);
    assert_rejected(&scan_json(&cut, &[]), "format_gate", "none for layer(s) 2, 3");
}

/// `hf download --local-dir` leaves `.cache/huggingface/`: empty `.lock`
/// files and small `.metadata` files. They are accepted, and recorded in the
/// manifest; an empty file named as weights is still refused.
#[test]
fn hf_download_leftovers_are_accepted_and_recorded() {
    let lab = Lab::new();
    let d = tmp();
    let f = transformers_folder(d.path(), "downloaded", &[("model.safetensors", &safetensors(ST_HEADER, &[1; 24]))]);
    let cache = f.join(".cache/huggingface/download");
    std::fs::create_dir_all(&cache).unwrap();
    write(&f.join(".cache/huggingface"), ".gitignore", b"*\n");
    for n in ["config.json", "model.safetensors", "vocab.txt"] {
        write(&cache, &format!("{n}.lock"), b"");
        write(&cache, &format!("{n}.metadata"), b"0123456789abcdef0123456789abcdef01234567\n\"etag\"\n1733580000.0\n");
    }
    assert_passed(&scan_json(&f, &[]));
    std::fs::rename(&f, lab.incoming().join("downloaded")).unwrap();
    let out = lab.watch_once();
    let m = lab.manifest("downloaded");
    let files: Vec<&str> = m["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert!(files.contains(&".cache/huggingface/download/model.safetensors.lock"), "{files:?}\n{out}");
    assert!(files.contains(&".cache/huggingface/download/model.safetensors.metadata"), "{files:?}");

    let f = transformers_folder(
        d.path(),
        "empty-weights",
        &[("model.safetensors", &safetensors(ST_HEADER, &[1; 24])), ("pytorch_model.bin", b"")],
    );
    assert_rejected(&scan_json(&f, &[]), "format_gate", "pytorch_model.bin: named as");
}

/// An idle watcher is idle: its own listing of incoming/ must not wake it
/// (inotify open/access/close-nowrite events). Over 30 s with nothing
/// arriving it uses under 0.3 s of CPU.
#[test]
fn an_idle_watcher_uses_almost_no_cpu() {
    let lab = Lab::new();
    // A folder waiting in incoming/ is listed and read on every wake-up.
    let waiting = lab.incoming().join("arriving");
    std::fs::create_dir(&waiting).unwrap();
    write(&waiting, "notes.txt", b"not a model yet\n");
    let mut child = lab.cmd(&["watch", "--settle-ms", "500"]).spawn().unwrap();
    let pid = child.id();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = after.split_whitespace().skip(11).take(2).map(|x| x.parse().unwrap()).collect();
        // utime + stime, in clock ticks.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f[0] + f[1]) as f64 / ticks
    };
    // Start-up (plugin cache, recovery) is not idling.
    std::thread::sleep(Duration::from_secs(3));
    let before = cpu();
    std::thread::sleep(Duration::from_secs(30));
    let used = cpu() - before;
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    child.wait().unwrap();
    assert!(used < 0.3, "the idle watcher used {used:.2} s of CPU in 30 s");
}
