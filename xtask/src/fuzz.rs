//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets
//! in `fuzz/` for a bounded time each, from seed corpora made of the real
//! models and crafted files, and prints executions and coverage per target.
//!
//! The toolchain is the project's stable one with `RUSTC_BOOTSTRAP=1`, which
//! lets it take the `-Z sanitizer` flag cargo-fuzz passes: no nightly
//! download, so it runs wherever the tests run. A crash stops the run and
//! names the input; copied into `fuzz/regressions/TARGET/`, it is replayed by
//! `cargo xtask test` from then on (`artifact::fuzzing` tests, and the
//! plugins' native tests).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{models, path_of, root, run};

/// The targets, and the longest input each is fed.
const TARGETS: [(&str, usize); 5] = [
    ("gguf", 256 << 10),
    ("safetensors", 256 << 10),
    ("pickle", 64 << 10),
    ("folder_json", 64 << 10),
    ("template", 64 << 10),
];

const CARGO_FUZZ: &str = "0.13.2";

pub fn command(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut chosen: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().context("--seconds needs a number")?;
                seconds = v.parse().with_context(|| format!("--seconds {v}"))?;
            }
            t if TARGETS.iter().any(|(n, _)| *n == t) => chosen.push(t.to_string()),
            other => bail!("unknown argument {other:?}; targets: {:?}", TARGETS.map(|t| t.0)),
        }
    }
    let targets: Vec<(&str, usize)> =
        TARGETS.into_iter().filter(|(n, _)| chosen.is_empty() || chosen.iter().any(|c| c == n)).collect();

    crate::setup::ensure(crate::setup::Purpose::Worker)?; // libFuzzer is C++: g++ and clang
    ensure_cargo_fuzz()?;
    let root = root();
    let corpora = root.join("target/fuzz-corpus");
    seed(&corpora)?;
    run(fuzz_cmd(&root).args(["build", "-s", "address"])).context("building the fuzz targets")?;

    let mut rows = Vec::new();
    for (target, max_len) in targets {
        let corpus = corpora.join(target);
        let artifacts = root.join("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let regressions = root.join("fuzz/regressions").join(target);
        let mut cmd = fuzz_cmd(&root);
        cmd.args(["run", "-s", "address", target]).arg(&corpus);
        if regressions.is_dir() {
            cmd.arg(&regressions);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            // No input may make a parser allocate without bound or take long.
            .arg("-malloc_limit_mb=1024")
            .arg("-rss_limit_mb=2048")
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        println!("xtask: fuzzing {target} for {seconds} s");
        let out = cmd.output().with_context(|| format!("running the {target} fuzzer"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        std::fs::write(artifacts.join("last-run.log"), log.as_bytes())?;
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "the {target} fuzzer failed ({}):\n{}\nthe input is in {}; copy it to fuzz/regressions/{target}/ \
                 and fix the parser",
                out.status,
                tail.join("\n"),
                artifacts.display()
            );
        }
        rows.push(Stats::parse(target, &log, count_files(&corpus)));
    }
    println!("\n| target | seconds | executions | exec/s | coverage (edges) | features | corpus |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {seconds} | {} | {} | {} | {} | {} |",
            r.target,
            r.execs,
            r.execs / seconds.max(1),
            r.cov,
            r.ft,
            r.corpus
        );
    }
    Ok(())
}

/// What libFuzzer reported at the end of a run.
struct Stats {
    target: String,
    execs: u64,
    cov: u64,
    ft: u64,
    corpus: usize,
}

impl Stats {
    fn parse(target: &str, log: &str, corpus: usize) -> Stats {
        let stat =
            |key: &str| log.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        // The last status line: "#123456 DONE cov: 1234 ft: 5678 corp: ...".
        let field = |name: &str| {
            log.lines()
                .rev()
                .find(|l| l.starts_with('#') && l.contains(" cov: "))
                .and_then(|l| l.split(name).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Stats {
            target: target.into(),
            execs: stat("stat::number_of_executed_units:"),
            cov: field(" cov: "),
            ft: field(" ft: "),
            corpus,
        }
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.count()).unwrap_or(0)
}

fn fuzz_cmd(root: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.arg("fuzz").current_dir(root).env("RUSTC_BOOTSTRAP", "1").env("CARGO_TARGET_DIR", root.join("target/fuzz"));
    c
}

fn ensure_cargo_fuzz() -> Result<()> {
    let ok = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        println!("xtask: installing cargo-fuzz {CARGO_FUZZ} from crates.io");
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ]))?;
    }
    Ok(())
}

/// Writes the seed inputs: heads of the real models, the real chat templates
/// and configs, pickles Python writes, and small valid files made here.
fn seed(corpora: &Path) -> Result<()> {
    let m: BTreeMap<String, PathBuf> = models(&["gemma", "minilm", "minilm_folder", "templates"])?;
    let dir = |t: &str| -> Result<PathBuf> {
        let d = corpora.join(t);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let head = |path: &Path, n: usize| -> Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(path)?.take(n as u64).read_to_end(&mut buf)?;
        Ok(buf)
    };

    let gguf = dir("gguf")?;
    std::fs::write(gguf.join("seed-gemma-head"), head(path_of(&m, "gemma")?, 256 << 10)?)?;
    std::fs::write(gguf.join("seed-minimal"), minimal_gguf())?;

    let st = dir("safetensors")?;
    let minilm = path_of(&m, "minilm")?;
    let len = u64::from_le_bytes(head(minilm, 8)?.try_into().map_err(|_| anyhow::anyhow!("minilm is too short"))?);
    std::fs::write(st.join("seed-minilm-head"), head(minilm, (8 + len as usize + 4096).min(256 << 10))?)?;
    let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#;
    let mut small = (header.len() as u64).to_le_bytes().to_vec();
    small.extend_from_slice(header);
    small.extend_from_slice(&[0u8; 8]);
    std::fs::write(st.join("seed-minimal"), small)?;

    let pickle = dir("pickle")?;
    run(Command::new("python3").arg("-c").arg(PICKLE_SEEDS).arg(&pickle))?;

    let json = dir("folder_json")?;
    for e in std::fs::read_dir(path_of(&m, "minilm_folder")?)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") && p.metadata()?.len() <= 64 << 10 {
            std::fs::copy(&p, json.join(format!("seed-{}", p.file_name().unwrap().to_string_lossy())))?;
        }
    }
    std::fs::write(
        json.join("seed-index"),
        r#"{"metadata":{"total_size":16},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"sub/model-00002-of-00002.safetensors","c":"../x"}}"#,
    )?;

    let template = dir("template")?;
    for e in std::fs::read_dir(path_of(&m, "templates")?)? {
        let p = e?.path();
        if p.is_file() && p.metadata()?.len() <= 64 << 10 {
            std::fs::copy(&p, template.join(format!("seed-{}", p.file_name().unwrap().to_string_lossy())))?;
        }
    }
    Ok(())
}

/// Pickles of every protocol, with and without imports, and one whose
/// `__reduce__` names `os.system` (written only, never loaded).
const PICKLE_SEEDS: &str = r#"
import os, pickle, sys, collections
out = sys.argv[1]
class Evil:
    def __reduce__(self):
        return (os.system, ("id",))
values = [None, 1, 2**70, 1.5, "text", b"bytes", [1, [2, (3,)]], {"k": {1, 2}}, collections.OrderedDict(a=1), Evil()]
for proto in range(0, 6):
    for i, v in enumerate(values):
        with open(os.path.join(out, f"seed-p{proto}-{i}"), "wb") as f:
            f.write(pickle.dumps(v, protocol=proto))
"#;

/// A valid GGUF v3: two metadata keys (a string and an array) and one F32
/// tensor, aligned to 32 bytes.
fn minimal_gguf() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&2u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend_from_slice(&(t.len() as u64).to_le_bytes());
        b.extend_from_slice(t.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    s(&mut b, "llama");
    s(&mut b, "tokenizer.ggml.scores");
    b.extend_from_slice(&9u32.to_le_bytes()); // array
    b.extend_from_slice(&6u32.to_le_bytes()); // of f32
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&1.0f32.to_le_bytes());
    b.extend_from_slice(&2.0f32.to_le_bytes());
    s(&mut b, "w");
    b.extend_from_slice(&1u32.to_le_bytes()); // dims
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // F32
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(&[0u8; 16]);
    b
}
