//! `airlock plugin new|build|inspect|pin` and `airlock policy check`: the
//! plugin author's and the policy writer's tools.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::plugin::{Grant, Limits, Plugin, Runtime, WIT_PACKAGE, WIT_VERSIONS, wanted_grants};
use crate::policy::Stage;

/// Loads a component the way a scan would, granting everything the host can
/// grant, so that only imports the host cannot provide at all are refused.
/// `Err(exit code)` when it is refused: the cause is already printed.
fn load(path: &Path, refused: &str) -> Result<Result<(Vec<u8>, Plugin), ExitCode>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let runtime = Runtime::new(None)?;
    Ok(match runtime.load(&bytes, &[Grant::Sidecars, Grant::Inference]) {
        Ok(plugin) => Ok((bytes, plugin)),
        Err(e) => {
            errln!("airlock: error: {}: this host cannot run it{refused}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// The full `airlock:stage` version a plugin's imports name, e.g. `0.2.0`.
fn world_version(p: &Plugin) -> String {
    p.imports
        .iter()
        .find_map(|i| i.strip_prefix(WIT_PACKAGE).and_then(|r| r.split_once('@')).map(|(_, v)| v.to_string()))
        .unwrap_or_else(|| format!("{}.{}", p.wit_version.0, p.wit_version.1))
}

fn served() -> String {
    WIT_VERSIONS.iter().map(|(a, b)| format!("{a}.{b}")).collect::<Vec<_>>().join(", ")
}

/// What an import is, for a person reading `inspect`.
fn import_role(import: &str) -> String {
    if let Some(g) = wanted_grants(&[import.to_string()]).first() {
        return format!("capability: needs the `{}` grant", g.interface());
    }
    if import.starts_with(WIT_PACKAGE) {
        "baseline (every stage may import it)".into()
    } else {
        "WASI, linked deny-all (no files, no network, no environment)".into()
    }
}

/// `split-stage` for a plugin that exports `split`, `stage` otherwise.
fn world_name(plugin: &Plugin) -> &'static str {
    if plugin.splits() { "split-stage" } else { "stage" }
}

pub fn inspect(path: &Path, json: bool) -> Result<ExitCode> {
    let (bytes, plugin) = match load(path, "")? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let grants: Vec<&str> = wanted_grants(&plugin.imports).iter().map(|g| g.interface()).collect();
    if json {
        let v = serde_json::json!({
            "path": path.display().to_string(),
            "size": bytes.len(),
            "sha256": sha256_hex(&bytes),
            "world": format!("{WIT_PACKAGE}/{}@{}", world_name(&plugin), world_version(&plugin)),
            "splits": plugin.splits(),
            "wit_version": world_version(&plugin),
            "describe": plugin.info,
            "imports": plugin.imports,
            "exports": plugin.exports,
            "grants": grants,
        });
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("file:     {}", path.display());
    outln!("size:     {} bytes", bytes.len());
    outln!("sha256:   {}", sha256_hex(&bytes));
    outln!(
        "world:    {WIT_PACKAGE}/{}@{} (this host serves {WIT_PACKAGE} {})",
        world_name(&plugin),
        world_version(&plugin),
        served()
    );
    outln!("stage:    {} {} — {}", plugin.info.name, plugin.info.version, plugin.info.description);
    outln!("grants:   {}", if grants.is_empty() { "none needed".into() } else { grants.join(", ") });
    outln!(
        "split:    {}",
        if plugin.splits() {
            "yes: exports split, so a sharded model's files can be read in parts and joined"
        } else {
            "no: always runs on the whole model"
        }
    );
    outln!("imports:");
    for i in &plugin.imports {
        outln!("  {i:<40} {}", import_role(i));
    }
    outln!("exports:");
    for e in &plugin.exports {
        outln!("  {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The default limits, as the policy writes them.
fn limit_lines(l: &Limits, indent: &str) -> String {
    format!(
        "{indent}memory_mib: {}\n{indent}timeout_secs: {}\n{indent}max_read_mib: {}\n{indent}max_report_kib: {}\n\
         {indent}max_log_kib: {}\n{indent}# max_total_read_mib: unset = 4 x the model's size + 64 MiB\n",
        l.memory_bytes >> 20,
        l.timeout.as_secs(),
        l.max_read_bytes >> 20,
        l.max_report_bytes >> 10,
        l.max_log_bytes >> 10,
    )
}

pub fn pin(path: &Path, stage: Stage, formats: &[String]) -> Result<ExitCode> {
    let (bytes, plugin) = match load(path, ", so it cannot be pinned")? {
        Ok(loaded) => loaded,
        Err(code) => return Ok(code),
    };
    let abs = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let grants: Vec<&str> = wanted_grants(&plugin.imports).iter().map(|g| g.interface()).collect();
    let mut out = format!(
        "# {} {} ({WIT_PACKAGE}@{}, {} bytes): paste under chain.{} in policy.yaml\n",
        plugin.info.name,
        plugin.info.version,
        world_version(&plugin),
        bytes.len(),
        stage.name()
    );
    out.push_str(&format!("    - plugin: {}\n", yaml_str(&abs.display().to_string())));
    out.push_str(&format!("      sha256: {}\n", sha256_hex(&bytes)));
    out.push_str(&format!("      grants: [{}]\n", grants.join(", ")));
    if !formats.is_empty() {
        out.push_str(&format!("      formats: [{}]\n", formats.join(", ")));
    }
    out.push_str("      limits:\n");
    out.push_str(&limit_lines(&Limits::default(), "        "));
    out.push_str("      config: {}\n");
    std::io::stdout().write_all(out.as_bytes()).map_err(super::stdout_error)?;
    Ok(ExitCode::SUCCESS)
}

/// A YAML scalar: plain when safe, else double-quoted.
fn yaml_str(s: &str) -> String {
    let plain = s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c));
    if plain { s.to_string() } else { serde_json::to_string(s).expect("a string serialises") }
}

/// `airlock policy check`: loads every plugin of the policy and checks its pin
/// and that its grants are exactly what it imports. Prints one line per plugin.
pub fn policy_check(policy: &crate::policy::Policy, plugin_dir: &Path, cache_dir: PathBuf) -> Result<ExitCode> {
    let runtime = Runtime::new(Some(cache_dir))?;
    let mut problems = 0;
    outln!("policy: {}", policy.origin);
    for (stage, entries) in &policy.chain {
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("chain.{}[{i}] {}", stage.name(), entry.source.label());
            match check_entry(&runtime, entry, plugin_dir) {
                Ok(line) => outln!("ok       {at}: {line}"),
                Err(why) => {
                    problems += 1;
                    outln!("PROBLEM  {at}: {why}");
                }
            }
        }
    }
    let off: Vec<&str> = Stage::ALL.iter().filter(|s| !policy.chain.contains_key(s)).map(|s| s.name()).collect();
    if !off.is_empty() {
        outln!("disabled stages: {}", off.join(", "));
    }
    if problems > 0 {
        outln!("{problems} problem(s) found");
        return Ok(ExitCode::from(1));
    }
    outln!("the policy is valid");
    Ok(ExitCode::SUCCESS)
}

fn check_entry(runtime: &Runtime, entry: &crate::policy::ChainEntry, plugin_dir: &Path) -> Result<String, String> {
    let plugin = crate::pipeline::load_entry(runtime, entry, plugin_dir)?.1?;
    let extra: Vec<&str> = crate::pipeline::unused_grants(entry, &plugin).iter().map(|g| g.interface()).collect();
    if !extra.is_empty() {
        return Err(format!(
            "granted {} but does not import it; remove the grant (a plugin gets exactly what it imports)",
            extra.join(", ")
        ));
    }
    let wanted = wanted_grants(&plugin.imports);
    let names: Vec<&str> = wanted.iter().map(|g| g.interface()).collect();
    Ok(format!(
        "{} {} ({WIT_PACKAGE}@{}.{}), grants [{}]",
        plugin.info.name,
        plugin.info.version,
        plugin.wit_version.0,
        plugin.wit_version.1,
        names.join(", ")
    ))
}

// ---------------------------------------------------------------- build

pub fn build(dir: &Path) -> Result<ExitCode> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("cannot find the plugin crate {}", dir.display()))?;
    if !dir.join("Cargo.toml").is_file() {
        bail!("{} has no Cargo.toml: pass the plugin crate's folder", dir.display());
    }
    let route = airlock_wasm_toolchain::detect().map_err(anyhow::Error::msg)?;
    errln!("airlock: building {} with {}", dir.display(), route.describe());
    let target_dir = dir.join("target");
    let status =
        route.cargo_build(&dir, &target_dir).status().context("cannot start cargo (is a Rust toolchain installed?)")?;
    if !status.success() {
        bail!("cargo build for {} failed ({status}); see the errors above", airlock_wasm_toolchain::TARGET);
    }
    let name = lib_name(&dir)?;
    let wasm = route.components_dir(&target_dir).join(format!("{name}.wasm"));
    let bytes = std::fs::read(&wasm)
        .with_context(|| format!("the build finished but {} is missing (is the crate a `cdylib`?)", wasm.display()))?;
    if !airlock_wasm_toolchain::is_component(&bytes) {
        bail!(
            "{} is a core wasm module, not a component; build for {}",
            wasm.display(),
            airlock_wasm_toolchain::TARGET
        );
    }
    errln!("airlock: built {} ({} bytes, sha256 {})", wasm.display(), bytes.len(), sha256_hex(&bytes));
    // The path alone on stdout, for scripts: `airlock plugin pin "$(airlock plugin build .)"`.
    outln!("{}", wasm.display());
    Ok(ExitCode::SUCCESS)
}

/// The crate's library name (its component's file stem), from `cargo metadata`.
fn lib_name(dir: &Path) -> Result<String> {
    let out = Command::new("cargo")
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(dir)
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed in {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata printed no JSON")?;
    let manifest = dir.join("Cargo.toml");
    let pkg = v["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest.as_path())))
        .context("cargo metadata does not list the crate")?;
    pkg["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"))))
        .and_then(|t| t["name"].as_str())
        .map(|n| n.replace('-', "_"))
        .context("the crate has no `cdylib` library target; set `[lib] crate-type = [\"cdylib\"]`")
}

// ---------------------------------------------------------------- new

/// The SDK the scaffold depends on: `--sdk`, `$AIRLOCK_SDK`, or the source
/// tree this binary was built from, if it is still there.
fn sdk_path(flag: Option<&Path>) -> Result<PathBuf> {
    let candidate = match flag {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("AIRLOCK_SDK") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"),
        },
    };
    let manifest = candidate.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|_| {
        anyhow::anyhow!(
            "cannot find the airlock SDK at {} (pass --sdk DIR or set AIRLOCK_SDK to the `sdk/` folder of an airlock \
             checkout of this version, {})",
            candidate.display(),
            env!("CARGO_PKG_VERSION")
        )
    })?;
    if !text.contains("name = \"airlock-sdk\"") {
        bail!("{} is not the airlock-sdk crate", manifest.display());
    }
    Ok(std::fs::canonicalize(&candidate)?)
}

pub fn new(name: &str, dir: Option<&Path>, sdk: Option<&Path>) -> Result<ExitCode> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid {
        bail!("plugin name {name:?}: use 1-64 lowercase letters, digits, `_` or `-`, starting with a letter");
    }
    let dest = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(name));
    if dest.exists() {
        bail!("{} already exists; choose another --dir or remove it", dest.display());
    }
    let sdk = sdk_path(sdk)?;
    let ident = name.replace('-', "_");
    let type_name: String =
        ident.split('_').filter(|w| !w.is_empty()).map(|w| w[..1].to_ascii_uppercase() + &w[1..]).collect();
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{ident}}", &ident)
            .replace("{{Type}}", &type_name)
            .replace("{{sdk}}", &sdk.display().to_string())
            .replace("{{sdk_version}}", SDK_VERSION)
            .replace("{{wit}}", &format!("{WIT_PACKAGE}@{}.{}", WIT_VERSIONS[0].0, WIT_VERSIONS[0].1))
    };
    let files: [(&str, &str); 6] = [
        ("Cargo.toml", SCAFFOLD_CARGO),
        (".cargo/config.toml", SCAFFOLD_CONFIG),
        (".gitignore", "/target\n"),
        ("src/lib.rs", SCAFFOLD_LIB),
        ("tests/scan.rs", SCAFFOLD_TEST),
        ("README.md", SCAFFOLD_README),
    ];
    // The SDK's lockfile: the scaffold starts from the dependency versions airlock was tested with.
    if let Ok(lock) = std::fs::read(sdk.join("Cargo.lock")) {
        std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
        std::fs::write(dest.join("Cargo.lock"), lock).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    for (rel, text) in files {
        let p = dest.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&p, fill(text)).with_context(|| format!("cannot write {}", p.display()))?;
    }
    outln!("created {} (plugin `{name}`, SDK at {})", dest.display(), sdk.display());
    outln!("next:  airlock plugin build {}", dest.display());
    outln!("       cd {} && cargo test   # builds, pins and scans crafted models", dest.display());
    Ok(ExitCode::SUCCESS)
}

const SDK_VERSION: &str = "0.2";

const SCAFFOLD_CARGO: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
publish = false

# A stage is a WebAssembly component: build it with `airlock plugin build .`.
[lib]
crate-type = ["cdylib"]

[dependencies]
# The SDK by path: it is not on crates.io, and the path pins the exact SDK
# ({{sdk_version}}.x, {{wit}}) of the airlock you build with.
airlock-sdk = { path = "{{sdk}}" }
serde = { version = "1", features = ["derive"] }

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = "debuginfo"

# Its own workspace, even when created inside another one.
[workspace]
"#;

const SCAFFOLD_CONFIG: &str = r#"[target.wasm32-wasip2]
# Explicit 128-bit SIMD: wasm kernels reach native speed only with it.
rustflags = ["-C", "target-feature=+simd128"]
"#;

const SCAFFOLD_LIB: &str = r#"//! {{name}}: an airlock stage. It fails a model that has no tensors, or more
//! than the policy's `max_tensors`, and reports how many it found.

use airlock_sdk::{Finding, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;

/// This plugin's `config:` mapping from the policy.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    max_tensors: Option<usize>,
}

struct {{Type}};

impl Stage for {{Type}} {
    fn describe() -> StageInfo {
        StageInfo::new("{{ident}}", env!("CARGO_PKG_VERSION"), "fails models without tensors or with too many")
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let mut count = 0;
        for file in model.files() {
            count += file.tensors().len();
        }
        if count == 0 {
            return Report::fail("the model has no tensors")
                .finding(Finding::new("{{ident}}.no-tensors", Severity::Critical, "no tensor table"));
        }
        if let Some(max) = config.max_tensors
            && count > max
        {
            return Report::fail(format!("{count} tensors, more than max_tensors {max}"));
        }
        Report::pass(format!("{count} tensors"))
    }
}

airlock_sdk::export_stage!({{Type}});
"#;

const SCAFFOLD_TEST: &str = r#"//! Builds the plugin with `airlock plugin build`, pins it with `airlock plugin
//! pin`, puts it in a policy and scans crafted GGUF files with `airlock scan`.
//! Needs the `airlock` binary: `$AIRLOCK_BIN`, else `airlock` on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

fn airlock() -> Command {
    Command::new(std::env::var_os("AIRLOCK_BIN").unwrap_or_else(|| "airlock".into()))
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("cannot run airlock: set AIRLOCK_BIN or put airlock on PATH");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().expect("killed by a signal"), text(&out.stdout), text(&out.stderr))
}

/// A GGUF v3 file with `tensors` F32 tensors of 4 elements each.
fn gguf(tensors: usize) -> Vec<u8> {
    let mut o = b"GGUF".to_vec();
    o.extend(3u32.to_le_bytes());
    o.extend((tensors as u64).to_le_bytes());
    o.extend(1u64.to_le_bytes());
    let key = "general.architecture";
    o.extend((key.len() as u64).to_le_bytes());
    o.extend(key.as_bytes());
    o.extend(8u32.to_le_bytes()); // string
    o.extend(5u64.to_le_bytes());
    o.extend(b"llama");
    for i in 0..tensors {
        let name = format!("blk.{i}.weight");
        o.extend((name.len() as u64).to_le_bytes());
        o.extend(name.as_bytes());
        o.extend(1u32.to_le_bytes()); // dims
        o.extend(4u64.to_le_bytes());
        o.extend(0u32.to_le_bytes()); // F32
        o.extend((i as u64 * 32).to_le_bytes());
    }
    while o.len() % 32 != 0 {
        o.push(0);
    }
    for i in 0..tensors {
        o.extend([1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()));
        if i + 1 < tensors {
            o.extend([0u8; 16]);
        }
    }
    o
}

/// Only the static scan runs, with this plugin alone, pasted from `airlock plugin pin`.
fn policy(dir: &Path, entry: &str) -> PathBuf {
    let p = dir.join("policy");
    std::fs::create_dir_all(&p).unwrap();
    let text = format!(
        "quarantine:\n  stages:\n    source_policy: false\n    format_gate: false\n    integrity_check: false\n    \
         provenance_check: false\n    static_scan: true\n    behavioral_test: false\n    diffusion_deep_scan: false\n\
         chain:\n  static_scan:\n{entry}"
    );
    std::fs::write(p.join("policy.yaml"), text).unwrap();
    p
}

#[test]
fn builds_pins_and_scans() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, wasm, err) = run(airlock().args(["plugin", "build"]).arg(root));
    assert_eq!(code, 0, "airlock plugin build failed:\n{err}");
    let (code, entry, err) = run(airlock().args(["plugin", "pin", wasm.trim()]));
    assert_eq!(code, 0, "airlock plugin pin failed:\n{err}");

    let tmp = std::env::temp_dir().join(format!("{{ident}}-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let pol = policy(&tmp, &entry);
    let scan = |tensors: usize| {
        let model = tmp.join(format!("m{tensors}.gguf"));
        std::fs::write(&model, gguf(tensors)).unwrap();
        run(airlock()
            .args(["scan", "--root"])
            .arg(tmp.join("root"))
            .arg("--cache-dir")
            .arg(tmp.join("cache"))
            .arg("--policy")
            .arg(&pol)
            .arg(&model))
    };
    let (code, out, err) = scan(3);
    assert_eq!(code, 0, "a model with 3 tensors should pass:\n{out}\n{err}");
    assert!(out.contains("3 tensors"), "{out}");
    let (code, out, err) = scan(0);
    assert_eq!(code, 1, "a model without tensors should be rejected:\n{out}\n{err}");
    assert!(out.contains("the model has no tensors"), "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}
"#;

const SCAFFOLD_README: &str = r#"# {{name}}

An airlock stage plugin, built against `airlock-sdk` {{sdk_version}}.x ({{wit}}).

```sh
airlock plugin build .                       # -> target/wasm32-wasip2/release/{{ident}}.wasm
airlock plugin inspect target/wasm32-wasip2/release/{{ident}}.wasm
airlock plugin pin target/wasm32-wasip2/release/{{ident}}.wasm   # the policy entry to paste
cargo test                                   # build, pin, and scan crafted models (needs airlock on PATH or AIRLOCK_BIN)
```

Paste the entry `airlock plugin pin` prints under `chain.static_scan` (or
another stage) in `policy.yaml`, then check the policy with
`airlock policy check --policy DIR`. Every rebuild changes the sha256: pin again.

`src/lib.rs` is the stage. `context::config::<T>()` gives the entry's
`config:` mapping; `File::tensors()`, `File::metadata(key)` and
`ChunkReader` give the model, read-only. A plugin has no files, no network
and no clock beyond what WASI's deny-all linking gives; calling
`sidecars::sidecar` or `inference::generate` needs that grant in the policy.
"#;
