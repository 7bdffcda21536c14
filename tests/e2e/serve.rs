//! `airlock serve`: every page rendered by headless Chromium (Debian's
//! `chromium`, found through AIRLOCK_TEST_CHROMIUM) with assertions on the DOM
//! it built and a screenshot of each page under
//! `target/tmp/serve-screenshots/`; the JSON API and the rescan action over
//! plain HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::harness::*;
use crate::lifecycle::Lab;

const TOKEN: &str = "correct-horse-battery-staple-42";
/// A file name that is also HTML: the pages must show it as text.
const HTML_NAME: &str = "<img src=x onerror=alert(1)>.gguf";

/// A running `airlock serve`, stopped at drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(lab: &Lab, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Server::spawn(lab.cmd(&args))
    }

    /// Starts a prepared `airlock serve` command and reads the port it printed.
    fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line
            .split("http://127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("serve did not print its address: {line:?}"));
        Server { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One HTTP/1.1 request with `Connection: close`; (status, headers, body).
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, head, body) = self.request("GET", path, &[], "");
        assert_eq!(status, 200, "{path}: {head}\n{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium() -> PathBuf {
    std::env::var_os("AIRLOCK_TEST_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| {
        panic!("AIRLOCK_TEST_CHROMIUM is not set: run the tests through `cargo xtask test`, which installs chromium")
    })
}

fn browser(args: &[String]) -> std::process::Output {
    // A profile per run: parallel tests must not share Chromium's profile lock.
    let profile = tmp();
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .args(["--no-first-run", "--disable-background-networking", "--disable-extensions", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", chromium().display()));
    assert!(out.status.success(), "chromium {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The DOM Chromium built from the page.
fn dom(url: &str) -> String {
    String::from_utf8(browser(&["--dump-dom".into(), url.into()]).stdout).unwrap()
}

/// A full-page screenshot kept for people to look at; checked to be a real, non-trivial PNG.
fn screenshot(url: &str, name: &str) -> PathBuf {
    screenshot_tall(url, name, 1000)
}

fn screenshot_tall(url: &str, name: &str, height: u32) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    browser(&[format!("--window-size=1280,{height}"), format!("--screenshot={}", path.display()), url.into()]);
    let png = std::fs::read(&path).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{}: not a real screenshot", path.display());
    println!("screenshot of {url}: {}", path.display());
    path
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// A data root with a promoted real model, two rejections (one named like an
/// HTML element), one model waiting and one claim being scanned.
fn lab_with_history() -> Lab {
    let lab = Lab::new();
    std::fs::copy(&models().minilm, lab.incoming().join("minilm.safetensors")).unwrap();
    lab.drop_file("evil.gguf", crate::formats::EVIL_PICKLE);
    lab.drop_file(HTML_NAME, crate::formats::EVIL_PICKLE);
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: minilm.safetensors") && out.contains("REJECTED: evil.gguf"), "{out}");
    lab.drop_file("waiting.gguf", b"not yet taken");
    // A claim as a running watcher leaves it mid-scan, written by hand so the page is not a race.
    let claim = lab.root.join("quarantine/scanning/7-8-9");
    std::fs::create_dir(&claim).unwrap();
    std::fs::write(
        claim.join("claim.json"),
        r#"{"id":"7-8-9","name":"in-flight.gguf","claimed_at":"2026-12-04T10:00:00Z"}"#,
    )
    .unwrap();
    lab
}

fn token_file(lab: &Lab) -> PathBuf {
    let path = lab.root.join("state/ui.token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn every_page_renders_in_chromium_with_the_data_root_in_it() {
    let lab = lab_with_history();
    let token = token_file(&lab);
    let server = Server::start(&lab, &["--token-file", token.to_str().unwrap()]);
    let manifest = lab.manifest("minilm.safetensors");

    // Registry: one row per promoted model, linking to its page.
    let page = dom(&server.url("/"));
    screenshot(&server.url("/"), "registry");
    assert_eq!(count(&page, "<tr data-name="), 1, "{page}");
    assert!(page.contains(r#"<tr data-name="minilm.safetensors">"#), "{page}");
    assert!(page.contains(r#"href="/models/minilm.safetensors""#), "{page}");
    assert!(page.contains(manifest["files"][0]["sha256"].as_str().unwrap()), "{page}");

    // Model page: every stage, the signer, the files, and the per-tensor manifest with search.
    let url = server.url("/models/minilm.safetensors");
    let page = dom(&url);
    screenshot(&url, "model");
    let stages = manifest["stages"].as_array().unwrap();
    assert_eq!(count(&page, "<tr data-stage="), stages.len(), "{page}");
    for s in stages {
        let (stage, verdict) = (s["stage"].as_str().unwrap(), s["verdict"].as_str().unwrap());
        let row = format!(r#"<tr data-stage="{stage}" data-verdict="{verdict}">"#);
        assert!(page.contains(&row), "{row} missing: {page}");
    }
    assert!(page.contains("unsigned (stage 4 PASS"), "{page}");
    let tensors = manifest["files"][0]["tensors"].as_array().unwrap();
    assert_eq!(count(&page, "<tr data-tensor="), tensors.len());
    assert!(page.contains(&format!("{} of {} tensors", tensors.len(), tensors.len())), "{page}");
    let url = server.url("/models/minilm.safetensors?q=ATTENTION.self.query");
    let page = dom(&url);
    screenshot_tall(&url, "model-search", 2000);
    let matching =
        tensors.iter().filter(|t| t["name"].as_str().unwrap().to_lowercase().contains("attention.self.query")).count();
    assert!(matching > 0);
    assert_eq!(count(&page, "<tr data-tensor="), matching, "{page}");

    // Rejected: both, the HTML-like name shown as text, never as an element.
    let page = dom(&server.url("/rejected"));
    screenshot(&server.url("/rejected"), "rejected");
    assert_eq!(count(&page, "<tr data-name="), 2, "{page}");
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;.gguf"), "{page}");
    assert!(!page.contains(r#"<img src="x""#), "a file name became an element: {page}");

    // A report: where and why, every stage, the findings, and the rescan form.
    let url = server.url("/rejected/evil.gguf");
    let page = dom(&url);
    screenshot(&url, "report");
    assert!(page.contains(r#"<dd id="failed-stage">format_gate</dd>"#), "{page}");
    assert!(page.contains(r#"<tr data-rule="format.denied">"#), "{page}");
    assert!(page.contains(r#"<form method="post" action="/rejected/evil.gguf/rescan" id="rescan">"#), "{page}");

    // Queue: the waiting file and the claim in flight.
    let page = dom(&server.url("/queue"));
    screenshot(&server.url("/queue"), "queue");
    assert!(page.contains(r#"<tr data-name="waiting.gguf">"#), "{page}");
    assert!(page.contains(r#"<tr data-name="in-flight.gguf">"#), "{page}");

    // Audit: verified, newest first.
    let entries = lab.audit();
    let page = dom(&server.url("/audit"));
    screenshot(&server.url("/audit"), "audit");
    assert!(page.contains(r#"id="chain-status" data-ok="true""#), "{page}");
    assert!(page.contains(&format!("Chain verified: {} entries", entries.len())), "{page}");
    let first_row = page.find("<tr data-seq=").unwrap();
    assert!(page[first_row..].starts_with(&format!(r#"<tr data-seq="{}""#, entries.len())), "{page}");

    // An edited entry: the page says the chain is broken, and where.
    let log = lab.root.join("state/audit.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    std::fs::write(&log, format!("{}\n{rest}", first.replacen(r#""model":""#, r#""model":"x"#, 1))).unwrap();
    let page = dom(&server.url("/audit"));
    screenshot(&server.url("/audit"), "audit-broken");
    assert!(page.contains(r#"id="chain-status" data-ok="false""#), "{page}");
    assert!(page.contains("Chain BROKEN: line 2"), "{page}");
}

#[test]
fn the_json_api_serves_what_the_cli_and_the_files_hold() {
    let lab = lab_with_history();
    let server = Server::start(&lab, &[]);
    let (code, list) = lab.run(&["list", "--format", "json"]);
    assert_eq!(code, 0, "{list}");
    let registry = server.get_json("/api/registry");
    let names: Vec<&str> = registry.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["minilm.safetensors"]);
    assert!(list.contains(&registry[0]["sha256"].as_str().unwrap()[..16]), "{list}");
    assert_eq!(server.get_json("/api/models/minilm.safetensors"), lab.manifest("minilm.safetensors"));
    assert_eq!(server.get_json("/api/rejected/evil.gguf"), lab.report("evil.gguf"));
    let rejected = server.get_json("/api/rejected");
    assert_eq!(rejected.as_array().unwrap().len(), 2, "{rejected}");
    let queue = server.get_json("/api/queue");
    assert_eq!(queue["incoming"][0]["name"], "waiting.gguf", "{queue}");
    assert_eq!(queue["scanning"][0]["name"], "in-flight.gguf", "{queue}");
    let audit = server.get_json("/api/audit");
    assert_eq!(audit["chain"]["ok"], true, "{audit}");
    assert_eq!(audit["entries"].as_array().unwrap().len(), lab.audit().len());

    // Names that are not one plain component never reach the file system.
    for path in ["/api/models/..%2Fstate", "/api/rejected/..%2F..%2Fregistry%2Findex", "/api/models/.hidden"] {
        let (status, _, body) = server.request("GET", path, &[], "");
        assert_eq!(status, 400, "{path}: {body}");
    }
    let (status, _, body) = server.request("GET", "/api/models/absent", &[], "");
    assert_eq!((status, body.contains("not found")), (404, true), "{body}");
    // A link planted in the registry is not followed: no such model (red team D22: once a 500).
    std::os::unix::fs::symlink("/etc", lab.registry().join("planted")).unwrap();
    let (status, _, body) = server.request("GET", "/api/models/planted", &[], "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("is not a folder"), "{body}");
    // Another Host on a loopback listener (DNS rebinding) is refused.
    let (status, _, _) = server.request("GET", "/api/registry", &[("Host", "attacker.example:80")], "");
    assert_eq!(status, 421);
    // Read-only without a token file.
    let (status, _, body) = server.request("POST", "/api/rejected/evil.gguf/rescan", &[], "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");
    let page = dom(&server.url("/rejected/evil.gguf"));
    assert!(page.contains(r#"id="read-only""#) && !page.contains(r#"id="rescan""#), "{page}");
}

#[test]
fn rescan_needs_the_token_and_every_rescan_is_audited() {
    let lab = lab_with_history();
    let token = token_file(&lab);
    let server = Server::start(&lab, &["--token-file", token.to_str().unwrap()]);
    let before = lab.audit().len();
    let path = "/api/rejected/evil.gguf/rescan";
    for auth in [None, Some("Bearer wrong-token-of-some-length"), Some("Basic Y29ycmVjdA==")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        let (status, head, body) = server.request("POST", path, &headers, "");
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert!(head.to_lowercase().contains("www-authenticate: bearer"), "{head}");
    }
    assert_eq!(lab.audit().len(), before, "a refused request wrote to the audit log");
    assert!(lab.rejected().join("evil.gguf").is_file());

    let bearer = format!("Bearer {TOKEN}");
    let (status, _, body) = server.request("POST", path, &[("Authorization", &bearer)], "");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let audit = lab.audit();
    let last = audit.last().unwrap();
    assert_eq!((last["event"].as_str(), last["actor"].as_str()), (Some("rescan"), Some("web")), "{last}");
    assert_eq!(answer["audit_seq"], last["seq"]);
    assert!(lab.incoming().join("evil.gguf").is_file() && !lab.rejected().join("evil.gguf").exists());
    // Gone from rejected/: a second rescan finds nothing.
    let (status, _, _) = server.request("POST", path, &[("Authorization", &bearer)], "");
    assert_eq!(status, 404);

    // The page's form: the token in the body; a wrong one is refused, the right one redirects to the queue.
    let form_path =
        format!("/rejected/{}/rescan", HTML_NAME.replace('<', "%3C").replace('>', "%3E").replace(' ', "%20"));
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, _) = server.request("POST", &form_path, &form, "token=nope");
    assert_eq!(status, 401);
    let (status, head, _) = server.request("POST", &form_path, &form, &format!("token={TOKEN}"));
    assert_eq!(status, 303, "{head}");
    assert!(head.to_lowercase().contains("location: /queue"), "{head}");
    assert!(lab.incoming().join(HTML_NAME).is_file());
    assert_eq!(lab.audit().len(), before + 2);
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_token_file_others_can_read_is_refused() {
    let lab = Lab::new();
    let token = token_file(&lab);
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = lab.run(&["serve", "--listen", "127.0.0.1:0", "--token-file", token.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("readable by group or others") && out.contains("chmod 600"), "{out}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&token, "short\n").unwrap();
    let (code, out) = lab.run(&["serve", "--listen", "127.0.0.1:0", "--token-file", token.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("at least 16 characters"), "{out}");
    // D20: 16 bytes of emoji are 4 characters; one letter repeated is no secret; a FIFO would hang start-up.
    for (text, expect) in [("🔑🔑🔑🔑\n", "at least 16 characters"), ("aaaaaaaaaaaaaaaaaaaa\n", "repeats 1 character")]
    {
        std::fs::write(&token, text).unwrap();
        let (code, out) = lab.run(&["serve", "--listen", "127.0.0.1:0", "--token-file", token.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}: {out}");
        assert!(out.contains(expect), "{text}: {out}");
    }
    let fifo = lab.root.join("token.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (code, out) = lab.run(&["serve", "--listen", "127.0.0.1:0", "--token-file", fifo.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a regular file"), "{out}");
}

/// Red team D7 and D19: 600 connections, half silent and half trickling a
/// header line at a time, must not keep a normal request waiting, even when
/// serve starts under a soft limit of 150 open files (serve raises it, and
/// at its cap of 512 it closes the oldest connection). The server closes a
/// silent connection once its header timeout (10 s) passes, and the 421
/// answer carries the same security headers as every other one.
#[test]
fn idle_and_trickling_connections_do_not_starve_the_ui() {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    let lab = lab_with_history();
    let mut cmd = lab.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    // SAFETY: setrlimit is async-signal-safe and touches only this child.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 150;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = Server::spawn(cmd);

    let started = Instant::now();
    let mut crowd = Vec::new();
    for i in 0..600 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /api/registry HTTP/1.1\r\nX-Slow: 1\r\n").unwrap();
        }
        crowd.push(s);
    }
    for s in crowd.iter_mut().skip(1).step_by(2) {
        s.write_all(b"X-Slower: 2\r\n").unwrap();
    }

    let asked = Instant::now();
    let (status, head, body) = server.request("GET", "/api/registry", &[], "");
    let waited = asked.elapsed();
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(waited < Duration::from_secs(1), "a normal request waited {waited:?} behind 600 idle connections");

    // The newest silent connection is closed by the server's header timeout, not left open.
    let last_silent = &mut crowd[598];
    last_silent.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 512];
    let read = last_silent.read(&mut buf);
    let closed_after = started.elapsed();
    assert!(
        matches!(read, Ok(0))
            || matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(read, Ok(n) if String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408")),
        "a silent connection was not closed: {read:?} after {closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(25), "a silent connection stayed open {closed_after:?}");

    // D22: a name that is not a model folder, or too long for the file system, is the client's mistake.
    assert!(lab.root.join("registry/index.json").is_file());
    let (status, _, body) = server.request("GET", "/models/index.json", &[], "");
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = server.request("GET", &format!("/api/models/{}", "a".repeat(5000)), &[], "");
    assert_eq!(status, 400, "{body}");

    // D19: the DNS-rebinding refusal carries the security headers too.
    let (status, head, _) = server.request("GET", "/", &[("Host", "evil.example")], "");
    assert_eq!(status, 421, "{head}");
    let lower = head.to_ascii_lowercase();
    for h in ["content-security-policy:", "x-content-type-options: nosniff", "cache-control: no-store"] {
        assert!(lower.contains(h), "421 lacks {h}: {head}");
    }
}

/// Red team D17 and D18: a model named like a report is listed among the
/// rejected (it has a report of its own), a sidecar without its model is
/// shown in the queue, and a report itself, a sidecar or a path can never be
/// "rescanned" into incoming/ as a model, by the web action or the CLI.
#[test]
fn only_rejected_models_are_listed_and_rescanned() {
    let lab = Lab::new();
    lab.drop_file("hidden.report.json", b"{\"not\": \"a model\"}");
    lab.drop_file("evil.gguf", crate::formats::EVIL_PICKLE);
    std::fs::write(lab.incoming().join("evil.gguf.sig"), b"not a signature").unwrap();
    let out = lab.watch_once();
    assert!(out.contains("REJECTED: hidden.report.json") && out.contains("REJECTED: evil.gguf"), "{out}");
    let token = token_file(&lab);
    let server = Server::start(&lab, &["--token-file", token.to_str().unwrap()]);

    let listed = server.get_json("/api/rejected");
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"hidden.report.json") && names.contains(&"evil.gguf"), "{listed}");
    assert_eq!(names.len(), 2, "reports or sidecars listed as models: {listed}");
    // A sidecar whose model has not arrived is shown as waiting for it, not hidden.
    std::fs::write(lab.incoming().join("lonely.gguf.sig"), b"a signature ahead of its model").unwrap();
    let queue = server.get_json("/api/queue");
    assert_eq!(queue["sidecars_without_model"], serde_json::json!(["lonely.gguf.sig"]), "{queue}");
    assert_eq!(queue["incoming"], serde_json::json!([]), "{queue}");
    std::fs::remove_file(lab.incoming().join("lonely.gguf.sig")).unwrap();

    let bearer = format!("Bearer {TOKEN}");
    for name in ["evil.gguf.report.json", "evil.gguf.sig"] {
        let (status, _, body) =
            server.request("POST", &format!("/api/rejected/{name}/rescan"), &[("Authorization", &bearer)], "");
        assert!((400..500).contains(&status), "{name}: {status} {body}");
        assert!(lab.rejected().join(name).is_file(), "{name} left rejected/");
    }
    for name in ["evil.gguf.report.json", "../../registry/x", "../rejected/evil.gguf"] {
        let (code, out) = lab.run(&["rescan", name]);
        assert_eq!(code, 2, "{name}: {out}");
    }
    let waiting: Vec<_> = std::fs::read_dir(lab.incoming()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(waiting.is_empty(), "moved into incoming/: {waiting:?}");

    // The model named like a report goes back under its own name.
    let (status, _, body) =
        server.request("POST", "/api/rejected/hidden.report.json/rescan", &[("Authorization", &bearer)], "");
    assert_eq!(status, 200, "{body}");
    assert!(lab.incoming().join("hidden.report.json").is_file());
    let (code, out) = lab.run(&["audit", "--verify"]);
    assert_eq!(code, 0, "{out}");
}
