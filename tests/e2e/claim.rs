//! The claim is airlock's: a model never shares a folder with the watcher's
//! journal files, and the bytes scanned and promoted are a private copy the
//! uploader cannot reach. Each test is a red-team finding (D1, D2, D3, D4,
//! D5) as an attacker with write access to `incoming/` would try it.

use std::io::{Seek, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use serde_json::json;

use crate::harness::*;
use crate::lifecycle::Lab;

fn gadget_gguf() -> Vec<u8> {
    let mut g = Gguf::default();
    g.kvs.push(("tokenizer.chat_template".into(), kv_str("{{ cycler.__init__.__globals__.os.popen('id').read() }}")));
    g.bytes()
}

#[track_caller]
fn assert_chain_whole_and_nothing_scanning(lab: &Lab) {
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
    let left: Vec<_> =
        std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "claim folders left behind: {left:?}");
}

/// D1: a drop named `claim.json` whose content names a path outside the root
/// once made the watcher rename that path and write a report beside it.
#[test]
fn a_drop_named_claim_json_cannot_steer_the_watcher() {
    let lab = Lab::new();
    let d = tmp();
    let victim = d.path().join("secret.txt");
    std::fs::write(&victim, "precious\n").unwrap();
    let planted = json!({"id": "pwned", "name": victim, "claimed_at": "x"}).to_string();
    lab.drop_file("claim.json", planted.as_bytes());
    let out = lab.watch_once();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "{out}");
    let beside: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside.len(), 1, "files appeared beside the victim: {beside:?}\n{out}");
    // The drop is a model like any other: a lone JSON file fails the format gate, and its bytes are kept.
    assert_eq!(lab.report("claim.json")["failed_stage"], "format_gate", "{out}");
    assert_eq!(std::fs::read(lab.rejected().join("claim.json")).unwrap(), planted.as_bytes());
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// D2, D3: models named like the journal files (and the claim's own
/// sub-folders) keep their bytes, promoted or rejected; a folder named
/// `claim.json` is claimed once and leaves no orphan claim folders.
#[test]
fn models_named_like_journal_files_keep_their_bytes() {
    let lab = Lab::new();
    let clean = Gguf::default().bytes();
    let st = safetensors(ST_HEADER, &[1; 24]);
    let evil = gadget_gguf();
    let promoted: Vec<(&str, &[u8])> = vec![
        ("decision.json", &clean),
        ("manifest.json", &st),
        ("model", &clean),
        ("upload", &clean),
        ("as-uploaded", &clean),
    ];
    for (n, b) in &promoted {
        lab.drop_file(n, b);
    }
    lab.drop_file("rejected-as", &evil);
    let staged = tmp();
    let folder = staged.path().join("claim.json");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "config.json", br#"{"model_type":"bert"}"#);
    write(&folder, "model.safetensors", &st);
    std::fs::rename(&folder, lab.incoming().join("claim.json")).unwrap();

    let out = lab.watch_once();
    for (n, b) in &promoted {
        let copy = lab.registry().join(n).join("model").join(n);
        assert_eq!(std::fs::read(&copy).unwrap_or_default(), *b, "{n}: the promoted bytes are not the model's\n{out}");
        let (code, v) = lab.run(&["verify", n]);
        assert_eq!(code, 0, "{n}: {v}");
    }
    assert!(lab.registry().join("claim.json/model/claim.json/model.safetensors").is_file(), "{out}");
    assert_eq!(std::fs::read(lab.rejected().join("rejected-as")).unwrap(), evil, "the rejected model lost its bytes");
    assert_eq!(lab.report("rejected-as")["failed_stage"], "static_scan");
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// D4: the uploader keeps a write fd across the claim and writes malicious
/// bytes through it after promotion; the registry copy is airlock's own,
/// read-only inode and does not change.
#[test]
fn the_uploader_keeps_no_hold_on_the_promoted_bytes() {
    let lab = Lab::new();
    let clean = Gguf::default().bytes();
    let mut fd = std::fs::File::create(lab.incoming().join("fd.gguf")).unwrap();
    fd.write_all(&clean).unwrap();
    fd.sync_all().unwrap();
    // A folder whose uploader keeps a handle on it, to add files after the claim.
    let staged = tmp();
    let folder = staged.path().join("grows");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "config.json", br#"{"model_type":"bert"}"#);
    write(&folder, "model.safetensors", &safetensors(ST_HEADER, &[1; 24]));
    let handle = std::fs::File::open(&folder).unwrap();
    std::fs::rename(&folder, lab.incoming().join("grows")).unwrap();

    let out = lab.watch_once();
    let copy = lab.registry().join("fd.gguf/model/fd.gguf");
    assert!(copy.is_file(), "{out}");
    fd.rewind().unwrap();
    fd.write_all(&gadget_gguf()).unwrap();
    fd.sync_all().unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), clean, "a write through the uploader's fd reached the registry");
    let meta = std::fs::metadata(&copy).unwrap();
    assert_ne!(meta.ino(), fd.metadata().unwrap().ino());
    assert_eq!(meta.permissions().mode() & 0o222, 0, "the registry copy is writable");
    let (code, v) = lab.run(&["verify", "fd.gguf"]);
    assert_eq!(code, 0, "{v}");

    // The folder's listing was fixed at claim: the uploader's handle now names
    // a folder that is gone, and nothing it adds reaches the registry.
    use std::os::fd::AsRawFd;
    let name = std::ffi::CString::new("evil.py").unwrap();
    // SAFETY: a valid directory fd and a NUL-terminated name.
    let made = unsafe { libc::openat(handle.as_raw_fd(), name.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) };
    if made >= 0 {
        unsafe { libc::close(made) };
    }
    let reg = lab.registry().join("grows/model/grows");
    assert!(reg.join("model.safetensors").is_file(), "{out}");
    assert!(!reg.join("evil.py").exists(), "a file added after the claim is in the registry");
    let (code, v) = lab.run(&["verify", "grows"]);
    assert_eq!(code, 0, "{v}");
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// What the uploader (`nobody`) does in `an_unprivileged_uploader_cannot_reach_the_claimed_bytes`:
/// drops a model through an fd it keeps, and a folder whose handle it keeps;
/// says "ready"; waits for a line; then tries every way at the promoted bytes
/// and prints, as JSON, what each try came to.
const UPLOADER: &str = r#"
import json, os, sys
incoming, registry, scanning, clean, evil = sys.argv[1:6]
fd = os.open(os.path.join(incoming, "fd.gguf"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
os.write(fd, open(clean, "rb").read())
os.fsync(fd)
staged = os.path.join(incoming, ".grows.partial")
os.mkdir(staged)
for name, data in [("config.json", b'{"model_type":"bert"}'), ("model.safetensors", open(sys.argv[6], "rb").read())]:
    with open(os.path.join(staged, name), "wb") as f:
        f.write(data)
folder = os.open(staged, os.O_RDONLY | os.O_DIRECTORY)
os.rename(staged, os.path.join(incoming, "grows"))
print("ready", flush=True)
sys.stdin.readline()

tries = {}
def attempt(name, action):
    try:
        action()
        tries[name] = "done"
    except PermissionError:
        tries[name] = "denied"
    except OSError as e:
        tries[name] = "errno %d" % e.errno

copy = os.path.join(registry, "fd.gguf", "model", "fd.gguf")
def through_fd():
    os.lseek(fd, 0, 0)
    os.write(fd, open(evil, "rb").read())
    os.fsync(fd)
attempt("write through the kept fd", through_fd)
attempt("write the registry copy", lambda: open(copy, "r+b").write(b"GGUF"))
attempt("chmod the registry copy", lambda: os.chmod(copy, 0o666))
attempt("unlink the registry copy", lambda: os.unlink(copy))
attempt("add a file beside it", lambda: open(os.path.join(os.path.dirname(copy), "evil.py"), "x").close())
attempt("rename the registry folder", lambda: os.rename(os.path.join(registry, "fd.gguf"), os.path.join(registry, "x")))
attempt("add a file through the kept folder", lambda: os.close(os.open("evil.py", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=folder)))
attempt("list the claim folders", lambda: os.listdir(scanning))
print(json.dumps(tries), flush=True)
"#;

/// D4 as it happens in a deployment: the uploader is another user, not the
/// service. Run as root (CI is), the test drops privileges to `nobody` for
/// the uploader, as a second, unprivileged user with write access to
/// `incoming/` through its group. Root ignores permission bits, so only an
/// uploader without privilege shows that the promoted copy, its folder and
/// the claim folders are closed to it; the kept fd and folder handle reach
/// only the upload's own inodes, which airlock no longer uses.
#[test]
fn an_unprivileged_uploader_cannot_reach_the_claimed_bytes() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test becomes `nobody` to upload, so it needs root (CI runs as root)"
    );
    const NOBODY: u32 = 65534;
    let lab = Lab::new();
    // The uploaders' group may write incoming/ (0770), as `airlock init` makes it; the rest is the service's.
    std::os::unix::fs::chown(lab.incoming(), None, Some(NOBODY)).unwrap();
    // The lab's scratch folder is 0700; the uploader must reach the root inside it.
    std::fs::set_permissions(lab.root.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let staged = tmp();
    std::fs::set_permissions(staged.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let clean = Gguf::default().bytes();
    let clean_file = write(staged.path(), "clean.gguf", &clean);
    let evil_file = write(staged.path(), "evil.gguf", &gadget_gguf());
    let weights = write(staged.path(), "model.safetensors", &safetensors(ST_HEADER, &[1; 24]));
    for f in [&clean_file, &evil_file, &weights] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    let mut uploader = Command::new("python3")
        .arg("-c")
        .arg(UPLOADER)
        .args([lab.incoming(), lab.registry(), lab.root.join("quarantine/scanning"), clean_file, evil_file, weights])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs the uploader");
    let mut lines = BufReader::new(uploader.stdout.take().unwrap()).lines();
    let ready = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    if ready != "ready" {
        let out = uploader.wait_with_output().unwrap();
        panic!("the uploader did not get ready: {ready:?} {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(std::fs::metadata(lab.incoming().join("fd.gguf")).unwrap().uid(), NOBODY);

    let out = lab.watch_once();
    let copy = lab.registry().join("fd.gguf/model/fd.gguf");
    assert!(copy.is_file(), "{out}");
    assert!(lab.registry().join("grows/model/grows/model.safetensors").is_file(), "{out}");
    assert_eq!(std::fs::metadata(&copy).unwrap().uid(), 0, "the registry copy is the service's");

    uploader.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let line = lines.next().map(|l| l.unwrap()).unwrap_or_default();
    let status = uploader.wait().unwrap();
    let tries: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?} ({status})"));
    // The uploader's own inode is still its to write: that is the hold the private copy cuts.
    assert_eq!(tries["write through the kept fd"], "done", "{tries}");
    for denied in [
        "write the registry copy",
        "chmod the registry copy",
        "unlink the registry copy",
        "add a file beside it",
        "rename the registry folder",
        "list the claim folders",
    ] {
        assert_eq!(tries[denied], "denied", "{denied}: {tries}");
    }
    // The claimed folder is gone: its handle names a removed folder, which takes no new file.
    assert_ne!(tries["add a file through the kept folder"], "done", "{tries}");

    assert_eq!(std::fs::read(&copy).unwrap(), clean, "the uploader changed the promoted bytes");
    assert!(!lab.registry().join("grows/model/grows/evil.py").exists());
    for name in ["fd.gguf", "grows"] {
        let (code, v) = lab.run(&["verify", name]);
        assert_eq!(code, 0, "{name}: {v}");
    }
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// D5: `verify` sees a link, a FIFO and an extra file added to a promoted model.
#[test]
fn verify_sees_links_special_files_and_extra_files() {
    let lab = Lab::new();
    let staged = tmp();
    let folder = staged.path().join("lnk");
    std::fs::create_dir(&folder).unwrap();
    write(&folder, "config.json", br#"{"model_type":"bert"}"#);
    write(&folder, "model.safetensors", &safetensors(ST_HEADER, &[1; 24]));
    std::fs::rename(&folder, lab.incoming().join("lnk")).unwrap();
    lab.drop_file("one.gguf", &Gguf::default().bytes());
    let out = lab.watch_once();
    let reg = lab.registry().join("lnk/model/lnk");
    assert!(reg.is_dir(), "{out}");
    std::os::unix::fs::symlink("/etc/hostname", reg.join("tokenizer.json")).unwrap();
    let fifo = std::ffi::CString::new(reg.join("vocab.txt").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let (code, v) = lab.run(&["verify", "lnk"]);
    assert_eq!(code, 1, "{v}");
    assert!(v.contains("tokenizer.json: a symlink") && v.contains("vocab.txt: a special-file"), "{v}");

    write(&lab.registry().join("one.gguf/model"), "evil.py", b"import os");
    let (code, v) = lab.run(&["verify", "one.gguf"]);
    assert_eq!(code, 1, "{v}");
    assert!(v.contains("model/evil.py: not part of the promoted model"), "{v}");
}

/// D16: a name that holds a newline and a log line of its own, and one with
/// an escape sequence, cannot forge a line of the watcher's log.
#[test]
fn a_name_cannot_forge_a_log_line() {
    let lab = Lab::new();
    let forged = "x\n[quarantine] PROMOTED: evil.gguf";
    lab.drop_file(forged, b"not a model");
    lab.drop_file("red\x1b[31m.gguf", b"not a model either");
    let out = lab.watch_once();
    assert!(!out.lines().any(|l| l.starts_with("[quarantine] PROMOTED: evil.gguf")), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");
    assert!(out.contains("x\\n[quarantine] PROMOTED: evil.gguf"), "{out}");
    assert!(std::fs::symlink_metadata(lab.rejected().join(forged)).is_ok(), "{out}");
}

/// D17: a name that is not UTF-8 once stayed in incoming/ for good, unseen.
/// It is renamed with `%XX` for each such byte and judged like any other.
#[test]
fn a_name_that_is_not_utf8_is_renamed_and_judged() {
    use std::os::unix::ffi::OsStrExt;
    let lab = Lab::new();
    let raw = std::ffi::OsStr::from_bytes(b"bad\xffutf8.gguf");
    std::fs::write(lab.incoming().join(raw), Gguf::default().bytes()).unwrap();
    lab.drop_file("evil\u{fffd}.gguf", crate::formats::EVIL_PICKLE);
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: bad%FFutf8.gguf"), "{out}");
    assert!(out.contains("REJECTED: evil\u{fffd}.gguf"), "{out}");
    let left: Vec<_> = std::fs::read_dir(lab.incoming()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left in incoming/: {left:?}\n{out}");
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// Red team rows 12 and 13 on a real full disk (a 4 MiB tmpfs holds the
/// data root): while nothing can be written, the models wait in incoming/
/// with their bytes, no claim or `.tmp` folder is left behind, and the audit
/// chain stays whole. Once space returns, the next run judges both models:
/// the clean one is promoted (a copy the disk refused is not held against it).
#[test]
fn a_full_disk_loses_no_model_and_leaves_the_audit_chain_whole() {
    let (lab, _unmount) = Lab::on_tmpfs(4096);
    // One model judged first, so the audit log has lines to keep whole.
    lab.drop_file("first.gguf", &Gguf::default().bytes());
    let out = lab.watch_once();
    assert!(lab.registry().join("first.gguf").is_dir(), "{out}");
    // A clean model of 24 pages: its claim journal fits in what is left below, its copy does not.
    let mut g = Gguf::default();
    g.kvs.push(("general.description".into(), kv_str(&"a clean model's long description. ".repeat(2800))));
    let clean = g.bytes();
    assert!(clean.len() > 90_000, "{}", clean.len());
    lab.drop_file("clean.gguf", &clean);
    lab.drop_file("evil.gguf", crate::formats::EVIL_PICKLE);

    // Fill every page, then free three: room for the claim's journal and a
    // note, never for the copy, so the copy fails on the full disk.
    let slack = lab.root.join("state/slack");
    std::fs::write(&slack, vec![1u8; 3 * 4096]).unwrap();
    let filler = lab.root.join("state/filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    std::fs::remove_file(&slack).unwrap();
    for _ in 0..2 {
        let (_, out) = lab.run(&["watch", "--once", "--settle-ms", "0"]);
        // The disk, not the model, failed the copy: the claim is given back whole.
        assert_eq!(std::fs::read(lab.incoming().join("clean.gguf")).ok(), Some(clean.clone()), "{out}");
        // The small one may have been judged in the room left; its bytes are kept wherever it is.
        let evil = std::fs::read(lab.incoming().join("evil.gguf"))
            .ok()
            .or_else(|| find_bytes(&lab, "evil.gguf"))
            .or_else(|| std::fs::read(lab.rejected().join("evil.gguf")).ok());
        assert_eq!(evil.as_deref(), Some(crate::formats::EVIL_PICKLE), "evil.gguf was lost on a full disk:\n{out}");
        let left: Vec<_> =
            std::fs::read_dir(lab.root.join("quarantine/scanning")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".tmp")), "leaked: {left:?}\n{out}");
        let (code, out) = lab.run(&["audit", "--verify"]);
        assert_eq!(code, 0, "the audit chain broke on a full disk: {out}");
    }

    std::fs::remove_file(&filler).unwrap();
    let (_, out) = lab.run(&["watch", "--once", "--settle-ms", "0"]);
    assert!(lab.registry().join("clean.gguf").is_dir(), "a clean model was held against a full disk:\n{out}");
    assert!(lab.report("evil.gguf")["failed_stage"].is_string(), "{out}");
    assert_eq!(std::fs::read(lab.rejected().join("evil.gguf")).unwrap(), crate::formats::EVIL_PICKLE);
    assert_chain_whole_and_nothing_scanning(&lab);
}

/// A model's bytes wherever the lifecycle holds them: a claim folder's upload or model copy.
fn find_bytes(lab: &Lab, name: &str) -> Option<Vec<u8>> {
    for claim in std::fs::read_dir(lab.root.join("quarantine/scanning")).ok()?.flatten() {
        for sub in ["upload", "model"] {
            if let Ok(b) = std::fs::read(claim.path().join(sub).join(name)) {
                return Some(b);
            }
        }
    }
    None
}
