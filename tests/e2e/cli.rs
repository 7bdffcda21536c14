//! The command line: help, exit codes, policy errors, unreadable inputs, the cache.

use crate::harness::*;

#[test]
fn help_explains_every_flag() {
    let d = tmp();
    let out = airlock(d.path()).args(["scan", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--policy", "--origin", "--sha256", "--format", "--root", "--plugin-dir", "--cache-dir", "--pread"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let d = tmp();
    let out = airlock(d.path()).args(["scan"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let p = Gguf::default().write(d.path(), "m.gguf");
    let out = airlock(d.path()).args(["scan", "--sha256", "nothex"]).arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not 64 hex digits"));
}

#[test]
fn a_bad_policy_names_the_file_the_line_and_the_key() {
    let d = tmp();
    let pol = policy_dir(d.path(), |t| {
        let edited = t.replace("    behavioral_test: false\n", "    behavioral_test: false\n    statik_scan: true\n");
        assert_ne!(edited, t, "the shipped policy changed shape");
        edited
    });
    let p = Gguf::default().write(d.path(), "m.gguf");
    let s = scan_json(&p, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 2);
    let file = pol.join("policy.yaml").display().to_string();
    assert!(s.stderr.contains(&file), "{}", s.stderr);
    assert!(s.stderr.contains("line "), "{}", s.stderr);
    assert!(s.stderr.contains("statik_scan"), "{}", s.stderr);
}

#[test]
fn symlinks_and_special_files_are_errors_not_passes() {
    let d = tmp();
    let real = Gguf::default().write(d.path(), "real.gguf");
    let link = d.path().join("link.gguf");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let s = scan_json(&link, &[]);
    assert_eq!(s.code, 2);
    assert!(s.stderr.contains("is a symlink"), "{}", s.stderr);
    assert_eq!(s.one()["verdict"], "error");
    let s = scan_json(std::path::Path::new("/dev/null"), &[]);
    assert_eq!(s.code, 2);
    assert!(s.stderr.contains("character device"), "{}", s.stderr);
    let s = scan_json(&d.path().join("missing.gguf"), &[]);
    assert_eq!(s.code, 2);
}

/// `airlock scan m.gguf | head`: the reader is gone before the verdict is
/// written. The scan ends quietly with the status of a SIGPIPE death (141),
/// not with an error report or a panic, even with stderr closed as well.
#[test]
fn a_closed_output_pipe_ends_the_scan_quietly() {
    let d = tmp();
    let p = Gguf::default().write(d.path(), "m.gguf");
    for close_stderr in [false, true] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut c = airlock(d.path());
        c.arg("scan").arg(&p).stdout(writer);
        let out = if close_stderr {
            let (r2, w2) = std::io::pipe().unwrap();
            drop(r2);
            c.stderr(w2).output().unwrap()
        } else {
            c.output().unwrap()
        };
        assert_eq!(
            out.status.code(),
            Some(141),
            "stderr closed: {close_stderr}; {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn an_empty_file_is_rejected() {
    let d = tmp();
    let s = scan_json(&write(d.path(), "empty.gguf", b""), &[]);
    assert_rejected(&s, "format_gate", "format \"unknown\" is not allowed");
}

#[test]
fn a_tampered_cache_entry_is_recompiled_not_loaded() {
    let d = tmp();
    let cache = d.path().join("cache");
    let p = Gguf::default().write(d.path(), "m.gguf");
    let run = || {
        airlock(d.path()).env("AIRLOCK_CACHE_DIR", &cache).args(["scan", "--format", "json"]).arg(&p).output().unwrap()
    };
    assert_eq!(run().status.code(), Some(0));
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 11, "one compiled entry per plugin of the default policy");
    // A private cache directory is mapped in place; a group-writable one is
    // copied first. Tampering is caught either way.
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o700, 0o775] {
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode)).unwrap();
        for e in &entries {
            let mut bytes = std::fs::read(e).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(e, bytes).unwrap();
        }
        let out = run();
        assert_eq!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        // Each entry is refused: by its hash, or earlier, if the flipped byte
        // broke what wasmtime parses.
        let refused =
            err.matches("does not match its recorded sha256").count() + err.matches("cannot use cache file").count();
        assert_eq!(refused, entries.len(), "mode {mode:o}: {err}");
        assert!(err.contains("does not match its recorded sha256"), "mode {mode:o}: {err}");
        // Recompiled and cached again: the next run loads every entry cleanly.
        let out = run();
        assert_eq!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("recompiling"), "mode {mode:o}: {err}");
    }
}
