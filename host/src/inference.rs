//! The `inference` capability: runs the model under scan for a plugin that
//! holds the grant (the behavioral stage).
//!
//! Two backends, chosen by the policy's `inference.backend`:
//!
//! * `worker` (default): `airlock-infer-worker`, a separate process that
//!   embeds llama.cpp and shuts itself in (rlimits, network namespace,
//!   Landlock, seccomp) before it loads the model. JSON lines over pipes.
//! * `openai`: an OpenAI-compatible server the operator already runs
//!   (llama-server, vLLM), loopback only unless the policy allows remote.
//!
//! Every failure (the worker cannot start, dies, times out, the server is
//! unreachable) is an error returned to the plugin, which fails its stage:
//! inference that did not run never passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::artifact::Model;

/// The policy's `inference` section.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    #[serde(default)]
    pub backend: BackendKind,
    /// Context length in tokens (prompt plus answer).
    #[serde(default = "default_context")]
    pub context: u32,
    /// Threads for llama.cpp.
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// The worker's address-space limit beyond the (mapped) model file.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// The worker binary; default: `airlock-infer-worker` beside `airlock`.
    #[serde(default)]
    pub worker: Option<PathBuf>,
    #[serde(default)]
    pub openai: Option<OpenAiConfig>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Worker,
    Openai,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// The `model` field sent with each request.
    #[serde(default = "default_openai_model")]
    pub model: String,
    /// Allow a base URL that is not loopback.
    #[serde(default)]
    pub allow_remote: bool,
}

fn default_context() -> u32 {
    1024
}
fn default_threads() -> u32 {
    2
}
fn default_memory_mib() -> u64 {
    4096
}
fn default_openai_model() -> String {
    "default".into()
}

impl Default for InferenceConfig {
    fn default() -> Self {
        InferenceConfig {
            backend: BackendKind::Worker,
            context: default_context(),
            threads: default_threads(),
            memory_mib: default_memory_mib(),
            worker: None,
            openai: None,
        }
    }
}

impl InferenceConfig {
    /// Checks what can be checked before any model arrives.
    pub fn validate(&self) -> Result<(), String> {
        if self.context < 64 || self.context > 131072 {
            return Err(format!("inference.context {} must be between 64 and 131072", self.context));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(format!("inference.threads {} must be between 1 and 256", self.threads));
        }
        if self.backend == BackendKind::Openai {
            let o = self.openai.as_ref().ok_or("inference.backend is openai but inference.openai is missing")?;
            let rest = o
                .base_url
                .strip_prefix("http://")
                .or_else(|| o.base_url.strip_prefix("https://"))
                .ok_or_else(|| format!("inference.openai.base_url {:?} is not an http(s) URL", o.base_url))?;
            let host = rest.split(['/', '?']).next().unwrap_or("");
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            let name = if host.starts_with('[') {
                host.split(']').next().unwrap_or("").trim_start_matches('[')
            } else {
                host.split(':').next().unwrap_or("")
            };
            let loopback = name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback && !o.allow_remote {
                return Err(format!(
                    "inference.openai.base_url {:?} is not loopback; set inference.openai.allow_remote: true to send prompts there",
                    o.base_url
                ));
            }
        }
        Ok(())
    }
}

/// One generation request, as the plugin made it.
pub struct Request<'a> {
    pub prompt: &'a str,
    /// A system message, placed by the chat template (or sent as a system turn).
    pub system: Option<&'a str>,
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
}

/// One backend, started for one model and one stage run.
pub enum Session {
    Worker(Worker),
    OpenAi(OpenAi),
}

/// What the session did, for the report.
#[derive(Default, Serialize)]
struct Stats {
    requests: u32,
    prompt_tokens: u64,
    tokens: u64,
    generate_ms: u64,
    /// llama.cpp's own timing of token generation (worker only).
    llama_eval_ms: f64,
    llama_eval_tokens: u64,
    llama_prompt_ms: f64,
    llama_prompt_tokens: u64,
}

impl Session {
    /// Starts the configured backend for `model`, waiting until `deadline` at most.
    pub fn start(cfg: &InferenceConfig, model: &Model, deadline: Instant) -> Result<Session, String> {
        match cfg.backend {
            BackendKind::Worker => Worker::start(cfg, model, deadline).map(Session::Worker),
            BackendKind::Openai => {
                let o = cfg.openai.clone().ok_or("inference.openai is not configured")?;
                Ok(Session::OpenAi(OpenAi { cfg: o, stats: Stats::default() }))
            }
        }
    }

    pub fn generate(&mut self, req: &Request, deadline: Instant) -> Result<String, String> {
        match self {
            Session::Worker(w) => w.generate(req, deadline),
            Session::OpenAi(o) => o.generate(req, deadline),
        }
    }

    /// Ends the session and describes it (sandbox, peak memory, speed).
    pub fn finish(self) -> serde_json::Value {
        match self {
            Session::Worker(w) => w.finish(),
            Session::OpenAi(o) => {
                json!({ "backend": "openai", "base_url": o.cfg.base_url, "stats": speed(&o.stats) })
            }
        }
    }
}

fn speed(s: &Stats) -> serde_json::Value {
    let rate = |n: f64, ms: f64| if ms > 0.0 { (n * 1000.0 / ms * 10.0).round() / 10.0 } else { 0.0 };
    let mut v = json!({
        "requests": s.requests,
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.tokens,
        "generate_ms": s.generate_ms,
        // Generated tokens over the wall time of the requests (prompt evaluation included).
        "tokens_per_second": rate(s.tokens as f64, s.generate_ms as f64),
    });
    if s.llama_eval_tokens > 0 {
        // What llama.cpp itself measures for the same runs: generation alone, prompt evaluation alone.
        v["llama_cpp_generation_tokens_per_second"] = rate(s.llama_eval_tokens as f64, s.llama_eval_ms).into();
        v["llama_cpp_prompt_tokens_per_second"] = rate(s.llama_prompt_tokens as f64, s.llama_prompt_ms).into();
    }
    v
}

/// The sandboxed llama.cpp worker.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ready: serde_json::Value,
    stats: Stats,
    failed: Option<String>,
    /// Set once `finish` has reaped the process through `wait4`.
    reaped: bool,
}

/// A worker dropped without `finish` (it failed to start) is killed and
/// reaped, so a long-running watcher collects no zombies.
impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const STDERR_KEEP: usize = 8 << 10;
/// Longest reply line accepted from the worker.
const MAX_LINE: usize = 1 << 20;

fn worker_exe(cfg: &InferenceConfig) -> Result<PathBuf, String> {
    if let Some(p) = &cfg.worker {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("AIRLOCK_INFER_WORKER") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the airlock binary: {e}"))?;
    Ok(exe.with_file_name("airlock-infer-worker"))
}

impl Worker {
    fn start(cfg: &InferenceConfig, model: &Model, deadline: Instant) -> Result<Worker, String> {
        let [file] = model.files.as_slice() else {
            return Err("the inference worker runs single-file GGUF models only".into());
        };
        let exe = worker_exe(cfg)?;
        let cpu_secs = deadline.saturating_duration_since(Instant::now()).as_secs().max(1) * u64::from(cfg.threads) + 5;
        // llama.cpp maps the model: the address-space limit is the model plus `memory_mib`.
        let memory_mib = cfg.memory_mib.saturating_add(file.size().div_ceil(1 << 20));
        let mut child = Command::new(&exe)
            .arg("--model")
            .arg(&file.path)
            .args(["--ctx", &cfg.context.to_string(), "--threads", &cfg.threads.to_string()])
            .args(["--memory-mib", &memory_mib.to_string(), "--cpu-secs", &cpu_secs.to_string()])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the inference worker {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let keep = stderr.clone();
            let mut err = child.stderr.take().expect("piped");
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut k = keep.lock().unwrap_or_else(|p| p.into_inner());
                    k.extend_from_slice(&buf[..n]);
                    let over = k.len().saturating_sub(STDERR_KEEP);
                    k.drain(..over);
                }
            });
        }
        let stdin = child.stdin.take();
        let mut w = Worker {
            child,
            stdin,
            lines,
            stderr,
            ready: json!(null),
            stats: Stats::default(),
            failed: None,
            reaped: false,
        };
        let first = w.reply(deadline, "loading the model")?;
        match first.get("ready") {
            Some(r) => w.ready = r.clone(),
            None => return Err(w.fail(format!("the worker could not load the model: {}", error_of(&first)))),
        }
        Ok(w)
    }

    /// Kills the worker and remembers why; returns the cause.
    fn fail(&mut self, cause: String) -> String {
        let _ = self.child.kill();
        let tail = String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner())).trim().to_string();
        let cause = if tail.is_empty() {
            cause
        } else {
            format!("{cause} (worker stderr: {})", tail.lines().last().unwrap_or_default())
        };
        self.failed = Some(cause.clone());
        cause
    }

    fn reply(&mut self, deadline: Instant, doing: &str) -> Result<serde_json::Value, String> {
        if let Some(f) = &self.failed {
            return Err(format!("the inference worker already failed: {f}"));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => serde_json::from_str(&line)
                .map_err(|e| self.fail(format!("the inference worker sent a malformed line while {doing}: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                Err(self.fail(format!("the inference worker timed out while {doing} (stage deadline reached)")))
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Give the exit status a moment to be there.
                let status = wait_briefly(&mut self.child);
                Err(self.fail(format!("the inference worker died while {doing}: {status}")))
            }
        }
    }

    fn generate(&mut self, req: &Request, deadline: Instant) -> Result<String, String> {
        let line = json!({
            "prompt": req.prompt,
            "system": req.system,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        });
        let sent = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}").and_then(|_| stdin.flush()),
            None => Err(std::io::Error::other("stdin closed")),
        };
        if let Err(e) = sent {
            let status = wait_briefly(&mut self.child);
            return Err(self.fail(format!("cannot send a prompt to the inference worker ({e}): {status}")));
        }
        let v = self.reply(deadline, "generating")?;
        if let Some(text) = v.get("text").and_then(|t| t.as_str()) {
            self.stats.requests += 1;
            self.stats.prompt_tokens += v.get("prompt_tokens").and_then(|n| n.as_u64()).unwrap_or(0);
            self.stats.tokens += v.get("tokens").and_then(|n| n.as_u64()).unwrap_or(0);
            self.stats.generate_ms += v.get("ms").and_then(|n| n.as_u64()).unwrap_or(0);
            let f = |k: &str| v.get(k).and_then(|n| n.as_f64()).unwrap_or(0.0);
            self.stats.llama_eval_ms += f("llama_eval_ms");
            self.stats.llama_eval_tokens += f("llama_eval_tokens") as u64;
            self.stats.llama_prompt_ms += f("llama_prompt_ms");
            self.stats.llama_prompt_tokens += f("llama_prompt_tokens") as u64;
            return Ok(text.to_string());
        }
        Err(format!("the inference worker refused the prompt: {}", error_of(&v)))
    }

    fn finish(mut self) -> serde_json::Value {
        drop(self.stdin.take()); // EOF: the worker exits
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = self.child.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: rusage is plain data, written by wait4.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waits for our own child; WNOHANG never blocks.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                self.reaped = true;
                break;
            }
            if r < 0 {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        json!({
            "backend": "worker",
            "ready": self.ready,
            "peak_rss_mib": (usage.ru_maxrss as f64 / 1024.0 * 10.0).round() / 10.0,
            "cpu_seconds": ((usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) as f64
                + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) as f64 / 1e6)
                .round(),
            "stats": speed(&self.stats),
            "failed": self.failed,
        })
    }
}

fn wait_briefly(child: &mut Child) -> String {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(s)) => {
                use std::os::unix::process::ExitStatusExt;
                return match s.signal() {
                    Some(sig) => format!("killed by signal {sig}"),
                    None => format!("exited with {s}"),
                };
            }
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return "still running, killed".into(),
            Err(e) => return format!("cannot wait for it: {e}"),
        }
    }
}

fn error_of(v: &serde_json::Value) -> String {
    v.get("error").and_then(|e| e.as_str()).map(str::to_string).unwrap_or_else(|| v.to_string())
}

/// An OpenAI-compatible chat-completions server.
pub struct OpenAi {
    cfg: OpenAiConfig,
    stats: Stats,
}

impl OpenAi {
    fn generate(&mut self, req: &Request, deadline: Instant) -> Result<String, String> {
        let mut messages = Vec::new();
        if let Some(s) = req.system {
            messages.push(json!({ "role": "system", "content": s }));
        }
        messages.push(json!({ "role": "user", "content": req.prompt }));
        let body = json!({
            "model": self.cfg.model,
            "messages": messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        });
        let url = format!("{}/chat/completions", self.cfg.base_url.trim_end_matches('/'));
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Err("the stage deadline passed before the request".into());
        }
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(wait)).build().into();
        let started = Instant::now();
        let mut resp =
            agent.post(&url).send_json(&body).map_err(|e| format!("the inference backend {url} failed: {e}"))?;
        let v: serde_json::Value = resp
            .body_mut()
            .with_config()
            .limit(MAX_LINE as u64)
            .read_json()
            .map_err(|e| format!("the inference backend {url} sent no valid JSON: {e}"))?;
        let text = v
            .pointer("/choices/0/message/content")
            .and_then(|t| t.as_str())
            .ok_or_else(|| format!("the inference backend {url} sent no choices[0].message.content"))?;
        self.stats.requests += 1;
        self.stats.generate_ms += started.elapsed().as_millis() as u64;
        self.stats.prompt_tokens += v.pointer("/usage/prompt_tokens").and_then(|n| n.as_u64()).unwrap_or(0);
        self.stats.tokens += v.pointer("/usage/completion_tokens").and_then(|n| n.as_u64()).unwrap_or(0);
        Ok(text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn openai(url: &str, allow_remote: bool) -> InferenceConfig {
        InferenceConfig {
            backend: BackendKind::Openai,
            openai: Some(OpenAiConfig { base_url: url.into(), model: "m".into(), allow_remote }),
            ..InferenceConfig::default()
        }
    }

    #[test]
    fn only_loopback_servers_get_prompts_unless_allowed() {
        for ok in ["http://127.0.0.1:8080/v1", "http://localhost/v1", "http://[::1]:9000/v1", "https://127.0.0.2/v1"] {
            assert!(openai(ok, false).validate().is_ok(), "{ok}");
        }
        for remote in ["http://10.0.0.1/v1", "http://example.com/v1", "http://127.0.0.1@example.com/v1"] {
            let e = openai(remote, false).validate().unwrap_err();
            assert!(e.contains("not loopback"), "{remote}: {e}");
            assert!(openai(remote, true).validate().is_ok(), "{remote}");
        }
        assert!(openai("ftp://127.0.0.1/", false).validate().unwrap_err().contains("not an http(s) URL"));
        let missing = InferenceConfig { backend: BackendKind::Openai, ..InferenceConfig::default() };
        assert!(missing.validate().unwrap_err().contains("inference.openai is missing"));
    }
}
