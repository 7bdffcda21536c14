//! `airlock-infer-worker`: runs one quarantined GGUF model with llama.cpp for
//! the behavioral stage, inside a sandbox, and talks JSON lines.
//!
//! The host starts one worker per model and stage run. Before llama.cpp
//! touches anything, the worker shuts itself in:
//!
//! * **rlimits**: address space (`--memory-mib`) and CPU seconds (`--cpu-secs`);
//! * **network namespace**: `unshare(CLONE_NEWNET)` (in a new user namespace
//!   when not privileged), so there is no interface to reach;
//! * **Landlock**: the model file may be read; nothing else may be read,
//!   written or executed, and TCP bind/connect are denied (ABI 4+);
//! * **seccomp**: `socket`, `socketpair` and `connect` fail with EACCES.
//!
//! Every thread llama.cpp starts inherits all four. A layer the kernel cannot
//! apply is reported in the `ready` line (and so in the stage's report), never
//! silently skipped.
//!
//! Protocol: one `{"ready": ...}` or `{"error": ...}` line after loading; then
//! per request line `{"prompt", "system"?, "max_tokens", "temperature"}` one
//! `{"text", "prompt_tokens", "tokens", "ms"}` or `{"error"}` line. EOF on
//! stdin ends the worker. `--probe-read FILE` / `--probe-socket` run a probe
//! instead of a model, for the sandbox tests.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use serde::{Deserialize, Serialize};

struct Args {
    model: Option<PathBuf>,
    ctx: u32,
    threads: i32,
    memory_mib: u64,
    cpu_secs: u64,
    probe_read: Option<PathBuf>,
    probe_socket: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        model: None,
        ctx: 1024,
        threads: 2,
        memory_mib: 4096,
        cpu_secs: 1800,
        probe_read: None,
        probe_socket: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_string_lossy().into_owned();
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(PathBuf::from(value()?)),
            "--ctx" => a.ctx = value()?.to_string_lossy().parse().context("--ctx")?,
            "--threads" => a.threads = value()?.to_string_lossy().parse().context("--threads")?,
            "--memory-mib" => a.memory_mib = value()?.to_string_lossy().parse().context("--memory-mib")?,
            "--cpu-secs" => a.cpu_secs = value()?.to_string_lossy().parse().context("--cpu-secs")?,
            "--probe-read" => a.probe_read = Some(PathBuf::from(value()?)),
            "--probe-socket" => a.probe_socket = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

/// Which sandbox layers are in force, as reported to the host.
#[derive(Serialize, Default)]
struct Sandbox {
    rlimits: String,
    netns: String,
    landlock: String,
    seccomp: String,
}

impl Sandbox {
    fn complete(&self) -> bool {
        [&self.rlimits, &self.netns, &self.landlock, &self.seccomp].iter().all(|s| s.starts_with("on"))
    }
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> std::io::Result<()> {
    let lim = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: a valid rlimit for a valid resource.
    if unsafe { libc::setrlimit(resource, &lim) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn rlimits(a: &Args) -> String {
    let mem = a.memory_mib.saturating_mul(1 << 20);
    match set_rlimit(libc::RLIMIT_AS, mem).and_then(|_| set_rlimit(libc::RLIMIT_CPU, a.cpu_secs)) {
        Ok(()) => format!("on (address space {} MiB, CPU {} s)", a.memory_mib, a.cpu_secs),
        Err(e) => format!("off: setrlimit failed: {e}"),
    }
}

fn netns() -> String {
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return "on (new network namespace)".into();
    }
    let privileged = std::io::Error::last_os_error();
    // Unprivileged: a user namespace first, which grants CAP_SYS_ADMIN inside it.
    // SAFETY: as above; the process is still single-threaded here.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0 {
        return "on (new user and network namespace)".into();
    }
    format!("off: unshare failed: {privileged}; with a user namespace: {}", std::io::Error::last_os_error())
}

fn landlock(model: Option<&Path>) -> String {
    use landlock::{ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr};
    let abi = ABI::V5;
    let result = (|| -> Result<landlock::RestrictionStatus> {
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .create()?;
        if let Some(m) = model {
            ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(m)?, AccessFs::ReadFile))?;
        }
        Ok(ruleset.restrict_self()?)
    })();
    match result {
        Ok(s) => match s.ruleset {
            landlock::RulesetStatus::FullyEnforced => "on (read the model file only; no TCP)".into(),
            landlock::RulesetStatus::PartiallyEnforced => "on, partially (this kernel's Landlock ABI is older)".into(),
            landlock::RulesetStatus::NotEnforced => "off: the kernel does not enforce Landlock".into(),
        },
        Err(e) => format!("off: {e:#}"),
    }
}

fn seccomp() -> String {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
    let arch = match std::env::consts::ARCH {
        "x86_64" => seccompiler::TargetArch::x86_64,
        "aarch64" => seccompiler::TargetArch::aarch64,
        other => return format!("off: no seccomp filter for {other}"),
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        [libc::SYS_socket, libc::SYS_socketpair, libc::SYS_connect].into_iter().map(|n| (n, Vec::new())).collect();
    let result = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32), arch)
        .map_err(|e| e.to_string())
        .and_then(|f| BpfProgram::try_from(f).map_err(|e| e.to_string()))
        .and_then(|p| seccompiler::apply_filter(&p).map_err(|e| e.to_string()));
    match result {
        Ok(()) => "on (socket, socketpair, connect denied)".into(),
        Err(e) => format!("off: {e}"),
    }
}

fn sandbox(a: &Args, model: Option<&Path>) -> Sandbox {
    let mut s = Sandbox { rlimits: rlimits(a), netns: netns(), ..Sandbox::default() };
    s.landlock = landlock(model);
    s.seccomp = seccomp();
    s
}

#[derive(Deserialize)]
struct Request {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
    max_tokens: u32,
    #[serde(default)]
    temperature: f32,
}

fn send(out: &mut impl Write, v: serde_json::Value) -> Result<()> {
    writeln!(out, "{v}")?;
    out.flush()?;
    Ok(())
}

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            let mut out = std::io::stdout().lock();
            let _ = send(&mut out, serde_json::json!({ "error": format!("{e:#}") }));
            1
        }
    };
    std::process::exit(code);
}

fn run() -> Result<()> {
    let a = args()?;
    let mut out = std::io::stdout().lock();

    // Probes for the sandbox tests: the same sandbox, then one forbidden act.
    if a.probe_read.is_some() || a.probe_socket {
        let s = sandbox(&a, a.model.as_deref());
        let read = a.probe_read.as_ref().map(|p| match std::fs::read(p) {
            Ok(b) => format!("read {} bytes", b.len()),
            Err(e) => format!("refused: {e}"),
        });
        let socket = a.probe_socket.then(|| match std::net::TcpStream::connect("127.0.0.1:9") {
            Ok(_) => "connected".to_string(),
            Err(e) => format!("refused: {e}"),
        });
        return send(&mut out, serde_json::json!({ "sandbox": s, "read": read, "socket": socket }));
    }

    let model_path = a.model.clone().context("--model is required")?;
    let s = sandbox(&a, Some(&model_path));

    let mut backend = LlamaBackend::init().context("initialising llama.cpp")?;
    backend.void_logs();
    let params = LlamaModelParams::default();
    let model = LlamaModel::load_from_file(&backend, &model_path, &params)
        .map_err(|e| anyhow!("llama.cpp cannot load {}: {e}", model_path.display()))?;
    let arch = model.meta_val_str("general.architecture").unwrap_or_default();
    // The model's own template; without one, llama.cpp's built-in template for
    // its family (named after the architecture), else ChatML. Reported either way.
    let (template, template_source) = match model.chat_template(None) {
        Ok(t) => (t, "the model's tokenizer.chat_template".to_string()),
        Err(_) => {
            let family = ["gemma", "llama3", "phi3", "mistral", "qwen", "deepseek"]
                .into_iter()
                .find(|f| arch.starts_with(f.trim_end_matches(char::is_numeric)))
                .map(|f| if f == "qwen" { "chatml" } else { f })
                .unwrap_or("chatml");
            (LlamaChatTemplate::new(family)?, format!("none in the model; llama.cpp's built-in {family:?} template"))
        }
    };
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(a.ctx))
        .with_n_batch(a.ctx)
        .with_n_threads(a.threads)
        .with_n_threads_batch(a.threads)
        .with_no_perf(false); // keep llama.cpp's own timings: the report compares our speed with them
    let mut ctx = model.new_context(&backend, ctx_params).context("creating the llama.cpp context")?;
    send(
        &mut out,
        serde_json::json!({ "ready": {
            "architecture": arch,
            "template": template_source,
            "context": a.ctx,
            "sandbox": s,
            "sandbox_complete": s.complete(),
        }}),
    )?;

    let stdin = std::io::stdin().lock();
    for line in stdin.lines() {
        let line = line?;
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&mut out, serde_json::json!({ "error": format!("bad request: {e}") }))?;
                continue;
            }
        };
        let reply = match generate(&model, &mut ctx, &template, &req, a.ctx) {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
        };
        send(&mut out, reply)?;
    }
    Ok(())
}

fn generate(
    model: &LlamaModel,
    ctx: &mut llama_cpp_2::context::LlamaContext,
    template: &LlamaChatTemplate,
    req: &Request,
    n_ctx: u32,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let mut chat = Vec::new();
    if let Some(sys) = &req.system {
        chat.push(LlamaChatMessage::new("system".into(), sys.clone())?);
    }
    chat.push(LlamaChatMessage::new("user".into(), req.prompt.clone())?);
    let prompt = model.apply_chat_template(template, &chat, true).context("applying the chat template")?;
    let tokens = model.vocab().tokenize(prompt.as_bytes(), true, true);
    let budget = n_ctx as usize;
    if tokens.len() + req.max_tokens as usize > budget {
        bail!(
            "the prompt is {} tokens; with {} to generate it exceeds the context of {budget}",
            tokens.len(),
            req.max_tokens
        );
    }
    ctx.clear_kv_cache();
    ctx.reset_timings();
    let mut batch = LlamaBatch::new(budget, 1);
    let last = tokens.len() as i32 - 1;
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i as i32 == last)?;
    }
    ctx.decode(&mut batch).context("evaluating the prompt")?;
    // Greedy unless the caller asks for a temperature (seeded, so still repeatable).
    let mut sampler = if req.temperature > 0.0 {
        LlamaSampler::chain_simple([LlamaSampler::temp(req.temperature), LlamaSampler::dist(0)])
    } else {
        LlamaSampler::greedy()
    };
    let vocab = model.vocab();
    let mut text = Vec::new();
    let mut n_pos = tokens.len() as i32;
    let mut generated = 0u32;
    while generated < req.max_tokens {
        let token = sampler.sample(ctx, batch.n_tokens() - 1);
        sampler.accept(token);
        if vocab.is_eog(token) {
            break;
        }
        text.extend(vocab.token_to_piece(token, false, None));
        generated += 1;
        batch.clear();
        batch.add(token, n_pos, &[0], true)?;
        n_pos += 1;
        ctx.decode(&mut batch).context("generating")?;
    }
    // llama.cpp's own counters: its prompt and generation speed, without our overhead.
    let t = ctx.timings();
    Ok(serde_json::json!({
        "text": String::from_utf8_lossy(&text),
        "prompt_tokens": tokens.len(),
        "tokens": generated,
        "ms": started.elapsed().as_millis() as u64,
        "llama_eval_ms": t.t_eval_ms(),
        "llama_eval_tokens": t.n_eval(),
        "llama_prompt_ms": t.t_p_eval_ms(),
        "llama_prompt_tokens": t.n_p_eval(),
    }))
}
