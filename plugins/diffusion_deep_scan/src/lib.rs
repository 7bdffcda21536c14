//! Stage 7, diffusion deep scan: a diffusers folder checked as a whole.
//!
//! A folder with `model_index.json` at its root is a diffusion model; anything
//! else is `SKIP (not a diffusion model)`. For a diffusion model:
//!
//! * `model_index.json` parses within bounds (64 KiB, nesting 32), and its
//!   `_class_name` is a known pipeline class;
//! * every component it names is a known (library, class), exists as a folder
//!   with the config its kind needs, and holds its weights as valid
//!   safetensors whose tensor names fit the kind (a UNet has `down_blocks.*`,
//!   a VAE `encoder.*`/`decoder.*`, a CLIP text encoder `text_model.*`);
//! * no folder, and no weight file, exists that the index does not name;
//! * no `.py` file anywhere, and no `custom_pipeline`, `auto_map`,
//!   `trust_remote_code: true` or remote URL in any JSON config;
//! * the scheduler has a known `_class_name`, sane numbers (0 < beta_start <
//!   beta_end < 1, a positive step count) and no string field that is a URL,
//!   a path or code;
//! * a shipped `SHA256SUMS` must list every other file with the sha256 the
//!   host computed; without one, the folder's pins (checked by integrity_check)
//!   apply, and without those the hashes are recorded on promotion;
//! * any symlink, hardlink, special file or escape fails the stage.
//!
//! Every failure names the file. All problems are reported, not just the first.

use std::collections::{BTreeMap, BTreeSet};

use airlock_sdk::{ChunkReader, File, Finding, Format, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Pipeline classes accepted in addition to the built-in list.
    #[serde(default)]
    extra_pipelines: Vec<String>,
    /// Component classes accepted in addition to the built-in list, as `library.Class`.
    #[serde(default)]
    extra_components: Vec<String>,
}

const MAX_INDEX: u64 = 64 << 10;
const MAX_CONFIG: u64 = 1 << 20;
const MAX_DEPTH: usize = 32;

const PIPELINES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionUpscalePipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusion3Pipeline",
    "LatentConsistencyModelPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "FluxPipeline",
    "DDPMPipeline",
    "DDIMPipeline",
];

/// What a component is, which decides the config it needs and its tensor names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Unet,
    Vae,
    TextEncoder,
    T5Encoder,
    Transformer,
    Scheduler,
    Tokenizer,
    ImageProcessor,
    SafetyChecker,
}

/// Known (library, class) pairs.
const COMPONENTS: &[(&str, &str, Kind)] = &[
    ("diffusers", "UNet2DConditionModel", Kind::Unet),
    ("diffusers", "UNet2DModel", Kind::Unet),
    ("diffusers", "AutoencoderKL", Kind::Vae),
    ("diffusers", "AutoencoderTiny", Kind::Vae),
    ("diffusers", "VQModel", Kind::Vae),
    ("diffusers", "SD3Transformer2DModel", Kind::Transformer),
    ("diffusers", "FluxTransformer2DModel", Kind::Transformer),
    ("diffusers", "PixArtTransformer2DModel", Kind::Transformer),
    ("diffusers", "Transformer2DModel", Kind::Transformer),
    ("transformers", "CLIPTextModel", Kind::TextEncoder),
    ("transformers", "CLIPTextModelWithProjection", Kind::TextEncoder),
    ("transformers", "T5EncoderModel", Kind::T5Encoder),
    ("transformers", "CLIPTokenizer", Kind::Tokenizer),
    ("transformers", "CLIPTokenizerFast", Kind::Tokenizer),
    ("transformers", "T5Tokenizer", Kind::Tokenizer),
    ("transformers", "T5TokenizerFast", Kind::Tokenizer),
    ("transformers", "CLIPImageProcessor", Kind::ImageProcessor),
    ("transformers", "CLIPFeatureExtractor", Kind::ImageProcessor),
    ("stable_diffusion", "StableDiffusionSafetyChecker", Kind::SafetyChecker),
];

const SCHEDULERS: &[&str] = &[
    "PNDMScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
    "FlowMatchEulerDiscreteScheduler",
];

impl Kind {
    /// The config file a component folder of this kind must hold.
    fn config(self) -> &'static str {
        match self {
            Kind::Scheduler => "scheduler_config.json",
            Kind::Tokenizer => "tokenizer_config.json",
            Kind::ImageProcessor => "preprocessor_config.json",
            _ => "config.json",
        }
    }

    fn has_weights(self) -> bool {
        !matches!(self, Kind::Scheduler | Kind::Tokenizer | Kind::ImageProcessor)
    }

    /// Tensor-name prefixes a component of this kind is made of (`None`: not checked).
    fn tensor_prefixes(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Kind::Unet => &[
                "conv_in.",
                "conv_out.",
                "conv_norm_out.",
                "time_embedding.",
                "down_blocks.",
                "up_blocks.",
                "mid_block.",
                "add_embedding.",
                "class_embedding.",
                "encoder_hid_proj.",
            ],
            Kind::Vae => &["encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize."],
            Kind::TextEncoder => &["text_model.", "text_projection."],
            Kind::T5Encoder => &["encoder.", "shared."],
            Kind::SafetyChecker => &["vision_model.", "visual_projection.", "concept_embeds", "special_care_embeds"],
            _ => return None,
        })
    }
}

/// Files that may sit at the root beside the components.
fn root_file_allowed(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(name, "model_index.json" | "SHA256SUMS" | ".gitattributes" | "model.sig" | "model.sigstore.json")
        || lower.ends_with(".md")
        || lower.starts_with("license")
        || lower.ends_with(".png")
        || lower.ends_with(".jpg")
}

const WEIGHT_SUFFIXES: &[&str] =
    &[".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".onnx", ".msgpack", ".h5", ".gguf", ".npz"];

fn is_weight(path: &str, file: &File) -> bool {
    let lower = path.to_ascii_lowercase();
    WEIGHT_SUFFIXES.iter().any(|s| lower.ends_with(s))
        || matches!(
            file.format(),
            Format::Safetensors | Format::Gguf | Format::Pickle | Format::PytorchZip | Format::Numpy | Format::Onnx
        )
}

struct Scan {
    findings: Vec<Finding>,
}

impl Scan {
    fn fail(&mut self, rule: &str, at: &str, message: String) {
        self.findings.push(Finding::new(rule, Severity::Critical, message).at(at.to_string()));
    }
    fn info(&mut self, rule: &str, at: &str, message: String) {
        self.findings.push(Finding::new(rule, Severity::Info, message).at(at.to_string()));
    }
    fn failed(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Critical).count()
    }
}

fn read_all(file: &File, max: u64) -> Result<Vec<u8>, String> {
    if file.size() > max {
        return Err(format!("{} bytes, above the limit of {max}", file.size()));
    }
    ChunkReader::file(file).collect_bytes()
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn parse_json(file: &File, max: u64) -> Result<Value, String> {
    let bytes = read_all(file, max)?;
    // serde_json stops at 128 levels itself; the tighter bound is ours.
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if depth(&v) > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    Ok(v)
}

fn is_url(s: &str) -> bool {
    let l = s.trim().to_ascii_lowercase();
    ["http://", "https://", "ftp://", "file://", "s3://", "gs://", "hf://", "git+", "ssh://"]
        .iter()
        .any(|p| l.starts_with(p))
}

/// Loader gadgets and remote URLs anywhere in a JSON config.
fn check_json_values(scan: &mut Scan, path: &str, v: &Value, key_path: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let here = if key_path.is_empty() { k.clone() } else { format!("{key_path}.{k}") };
                match k.as_str() {
                    "custom_pipeline" => scan.fail(
                        "diffusion.custom-pipeline",
                        path,
                        format!("{path}: {here}: custom_pipeline makes diffusers download and run pipeline code ({x})"),
                    ),
                    "auto_map" => scan.fail(
                        "diffusion.auto-map",
                        path,
                        format!("{path}: {here}: auto_map makes the loader import code shipped with the model"),
                    ),
                    "trust_remote_code" if x != &Value::Bool(false) => scan.fail(
                        "diffusion.trust-remote-code",
                        path,
                        format!("{path}: {here}: trust_remote_code is {x}"),
                    ),
                    _ => {}
                }
                check_json_values(scan, path, x, &here);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_json_values(scan, path, x, &format!("{key_path}[{i}]"));
            }
        }
        Value::String(s) if is_url(s) => {
            scan.fail("diffusion.remote-url", path, format!("{path}: {key_path}: a remote URL {s:?}"));
        }
        _ => {}
    }
}

/// The scheduler's class and numbers.
fn check_scheduler(scan: &mut Scan, path: &str, v: &Value) {
    let Some(o) = v.as_object() else {
        return scan.fail("diffusion.scheduler", path, format!("{path}: not a JSON object"));
    };
    match o.get("_class_name").and_then(Value::as_str) {
        Some(c) if SCHEDULERS.contains(&c) => {}
        other => scan.fail("diffusion.scheduler.class", path, format!("{path}: unknown scheduler class {other:?}")),
    }
    let num = |k: &str| o.get(k).and_then(Value::as_f64);
    if let (Some(a), Some(b)) = (num("beta_start"), num("beta_end"))
        && !(0.0 < a && a < b && b < 1.0)
    {
        scan.fail(
            "diffusion.scheduler.betas",
            path,
            format!("{path}: beta_start {a} and beta_end {b} are not 0 < start < end < 1"),
        );
    }
    for k in ["num_train_timesteps", "steps_offset", "solver_order", "original_inference_steps"] {
        if let Some(x) = o.get(k) {
            let ok = match k {
                "steps_offset" => x.as_u64().is_some_and(|n| n <= 1000),
                _ => x.as_u64().is_some_and(|n| (1..=100_000).contains(&n)),
            };
            if !ok {
                scan.fail("diffusion.scheduler.steps", path, format!("{path}: {k} is {x}, not a sane step count"));
            }
        }
    }
    for (k, x) in o {
        if let Value::String(s) = x {
            // Every scheduler string is a short identifier (linear, epsilon,
            // leading, 0.30.0): a slash, colon, space or bracket is a path, a
            // URL or code.
            let plain = !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'+'));
            if !plain {
                scan.fail("diffusion.scheduler.string", path, format!("{path}: {k} is {s:?}: not a plain identifier"));
            }
        } else if matches!(x, Value::Object(_)) {
            scan.fail(
                "diffusion.scheduler.nested",
                path,
                format!("{path}: {k} is an object; scheduler settings are flat"),
            );
        }
    }
}

/// `SHA256SUMS`: `<hex>  <path>` (or `<hex> *<path>`) per line.
fn parse_sums(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut sums = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hex, path) = line
            .split_once(' ')
            .map(|(h, p)| (h, p.trim_start().trim_start_matches('*')))
            .ok_or_else(|| format!("line {}: not `<sha256>  <path>`", i + 1))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("line {}: {hex:?} is not a sha256", i + 1));
        }
        let path = path.trim_start_matches("./").to_string();
        if sums.insert(path.clone(), hex.to_ascii_lowercase()).is_some() {
            return Err(format!("line {}: {path} is listed twice", i + 1));
        }
    }
    Ok(sums)
}

fn run(model: &Model, cfg: &Config) -> Result<Report, String> {
    let files = model.files();
    let index = files.iter().find(|f| f.path() == "model_index.json");
    let Some(index) = index.filter(|_| model.kind() == "folder") else {
        return Ok(Report::skip("not a diffusion model (no model_index.json at the root of a folder)"));
    };
    let mut scan = Scan { findings: Vec::new() };

    for s in model.surroundings() {
        scan.fail(
            &format!("diffusion.{}", s.kind),
            &s.path,
            format!(
                "{} {}{}",
                s.kind,
                s.path,
                if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) }
            ),
        );
    }

    let index_json = match parse_json(index, MAX_INDEX) {
        Ok(v) => v,
        Err(e) => return Ok(Report::fail(format!("model_index.json: {e}"))),
    };
    let Some(idx) = index_json.as_object() else {
        return Ok(Report::fail("model_index.json is not a JSON object"));
    };
    match idx.get("_class_name").and_then(Value::as_str) {
        Some(c) if PIPELINES.contains(&c) || cfg.extra_pipelines.iter().any(|x| x == c) => {}
        other => scan.fail(
            "diffusion.pipeline.class",
            "model_index.json",
            format!("_class_name {other:?} is not a known pipeline class"),
        ),
    }

    // The components the index names.
    let mut components: BTreeMap<String, Kind> = BTreeMap::new();
    let mut unused: BTreeSet<String> = BTreeSet::new();
    for (name, v) in idx {
        if name.starts_with('_') {
            continue;
        }
        let pair = v.as_array().map(|a| (a.first().and_then(Value::as_str), a.get(1).and_then(Value::as_str)));
        match pair {
            Some((None, None)) if v.as_array().is_some_and(|a| a.len() == 2 && a.iter().all(Value::is_null)) => {
                unused.insert(name.clone());
            }
            Some((Some(lib), Some(class))) => {
                let known = COMPONENTS.iter().find(|(l, c, _)| *l == lib && *c == class).map(|(_, _, k)| *k);
                let kind = known.or_else(|| {
                    let full = format!("{lib}.{class}");
                    cfg.extra_components.contains(&full).then(|| {
                        if class.contains("Scheduler") {
                            Kind::Scheduler
                        } else if class.contains("Tokenizer") {
                            Kind::Tokenizer
                        } else {
                            Kind::Transformer
                        }
                    })
                });
                let kind = match (kind, lib, class) {
                    (Some(k), ..) => k,
                    (None, "diffusers", c) if SCHEDULERS.contains(&c) => Kind::Scheduler,
                    _ => {
                        scan.fail(
                            "diffusion.component.class",
                            "model_index.json",
                            format!("{name}: ({lib}, {class}) is not a known component class"),
                        );
                        continue;
                    }
                };
                if name.contains('/') || name.contains('\\') || name == "." || name == ".." {
                    scan.fail(
                        "diffusion.component.name",
                        "model_index.json",
                        format!("component name {name:?} is a path"),
                    );
                    continue;
                }
                components.insert(name.clone(), kind);
            }
            _ => scan.fail(
                "diffusion.component.entry",
                "model_index.json",
                format!("{name}: {v} is not a [library, class] pair"),
            ),
        }
    }

    // Every file: where it is, what it is.
    let sums_file = files.iter().find(|f| f.path() == "SHA256SUMS");
    let mut seen_folders: BTreeSet<String> = BTreeSet::new();
    for f in &files {
        let path = f.path();
        if path.to_ascii_lowercase().ends_with(".py") {
            scan.fail("diffusion.python-file", &path, format!("{path}: Python code shipped with the model"));
        }
        match path.split_once('/') {
            None => {
                if is_weight(&path, f) {
                    scan.fail(
                        "diffusion.extra-weights",
                        &path,
                        format!("{path}: a weight file at the root, not named by model_index.json"),
                    );
                } else if !root_file_allowed(&path) && f.format() != Format::Json {
                    scan.info("diffusion.extra-file", &path, format!("{path}: a file the index does not explain"));
                }
            }
            Some((folder, rest)) => {
                seen_folders.insert(folder.to_string());
                match components.get(folder) {
                    None => scan.fail(
                        if is_weight(&path, f) { "diffusion.extra-weights" } else { "diffusion.extra-component" },
                        &path,
                        format!("{path}: folder {folder}/ is not a component named by model_index.json"),
                    ),
                    Some(kind) if is_weight(&path, f) => {
                        if !kind.has_weights() {
                            scan.fail(
                                "diffusion.extra-weights",
                                &path,
                                format!("{path}: a {kind:?} component holds no weights"),
                            );
                        } else if f.format() != Format::Safetensors || rest.contains('/') {
                            scan.fail(
                                "diffusion.weights.format",
                                &path,
                                format!(
                                    "{path}: component weights must be safetensors at the component's top level ({})",
                                    f.format().name()
                                ),
                            );
                        } else if let Some(e) = f.parse_error() {
                            scan.fail(
                                "diffusion.weights.invalid",
                                &path,
                                format!(
                                    "{path}: invalid safetensors: {} at offset {}: {}",
                                    e.field, e.offset, e.message
                                ),
                            );
                        } else if let Some(prefixes) = kind.tensor_prefixes() {
                            let tensors = f.tensors();
                            if tensors.is_empty() {
                                scan.fail("diffusion.weights.empty", &path, format!("{path}: no tensors"));
                            }
                            if let Some(t) = tensors.iter().find(|t| !prefixes.iter().any(|p| t.name.starts_with(p))) {
                                scan.fail(
                                    "diffusion.weights.names",
                                    &path,
                                    format!(
                                        "{path}: tensor {:?} does not belong in a {kind:?} ({})",
                                        t.name,
                                        prefixes.join(", ")
                                    ),
                                );
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        if f.format() == Format::Json {
            match parse_json(f, MAX_CONFIG) {
                Ok(v) => check_json_values(&mut scan, &path, &v, ""),
                Err(e) => scan.fail("diffusion.config.invalid", &path, format!("{path}: {e}")),
            }
        }
    }

    // Every named component is there, with its config (and weights, if it has any).
    for (name, kind) in &components {
        if !seen_folders.contains(name) {
            scan.fail(
                "diffusion.component.missing",
                "model_index.json",
                format!("{name}: named by model_index.json but {name}/ does not exist"),
            );
            continue;
        }
        let config_path = format!("{name}/{}", kind.config());
        match files.iter().find(|f| f.path() == config_path) {
            None => scan.fail("diffusion.component.config", name, format!("{name}/ has no {}", kind.config())),
            Some(f) if *kind == Kind::Scheduler => match parse_json(f, MAX_CONFIG) {
                Ok(v) => check_scheduler(&mut scan, &config_path, &v),
                Err(e) => scan.fail("diffusion.config.invalid", &config_path, format!("{config_path}: {e}")),
            },
            Some(_) => {}
        }
        let prefix = format!("{name}/");
        if kind.has_weights()
            && !files.iter().any(|f| f.path().starts_with(&prefix) && f.format() == Format::Safetensors)
        {
            scan.fail("diffusion.component.weights", name, format!("{name}/ has no safetensors weights"));
        }
    }
    for name in &unused {
        if seen_folders.contains(name) {
            scan.fail(
                "diffusion.extra-component",
                name,
                format!("{name}/ exists but model_index.json sets it to [null, null]"),
            );
        }
    }

    // Checksums: a shipped SHA256SUMS must cover every other file exactly.
    let mut checksums = "none shipped; the sha256 of every file is recorded in the manifest on promotion".to_string();
    if let Some(sf) = sums_file {
        match read_all(sf, MAX_CONFIG)
            .and_then(|b| String::from_utf8(b).map_err(|e| format!("not UTF-8: {e}")))
            .and_then(|t| parse_sums(&t))
        {
            Err(e) => scan.fail("diffusion.checksums.invalid", "SHA256SUMS", format!("SHA256SUMS: {e}")),
            Ok(sums) => {
                let mut matched = 0;
                for f in files.iter().filter(|f| f.path() != "SHA256SUMS") {
                    let path = f.path();
                    let actual = f.sha256().map_err(|e| format!("{path}: cannot hash: {e}"))?;
                    match sums.get(&path) {
                        None => scan.fail("diffusion.checksums.unlisted", &path, format!("{path} is not listed in SHA256SUMS")),
                        Some(expected) if *expected != actual => scan.fail(
                            "diffusion.checksums.mismatch",
                            &path,
                            format!("{path}: sha256 mismatch against SHA256SUMS\n  expected: {expected}\n  actual:   {actual}"),
                        ),
                        Some(_) => matched += 1,
                    }
                }
                for path in sums.keys() {
                    if !files.iter().any(|f| f.path() == *path) {
                        scan.fail(
                            "diffusion.checksums.missing",
                            path,
                            format!("SHA256SUMS lists {path}, which the folder does not have"),
                        );
                    }
                }
                checksums = format!("{matched} files match SHA256SUMS");
            }
        }
    }

    if sums_file.is_none() && !context::pinned_files().is_empty() {
        // The integrity stage compared every file with its pin before this one ran.
        checksums = format!("{} files pinned in models.lock.yaml (checked by integrity_check)", files.len());
    }

    let failed = scan.failed();
    let details = serde_json::json!({
        "pipeline": idx.get("_class_name"),
        "components": components.iter().map(|(n, k)| (n.clone(), format!("{k:?}"))).collect::<BTreeMap<_, _>>(),
        "checksums": checksums,
    });
    let report = if failed == 0 {
        Report::pass(format!(
            "{} pipeline, {} components checked; {checksums}",
            idx.get("_class_name").and_then(Value::as_str).unwrap_or("?"),
            components.len()
        ))
    } else {
        let first = scan.findings.iter().find(|f| f.severity == Severity::Critical).expect("failed > 0");
        Report::fail(format!("{failed} problem(s); first: {}", first.message))
    };
    Ok(report.findings(scan.findings).details(details).cap_findings(200))
}

struct DiffusionDeepScan;

impl Stage for DiffusionDeepScan {
    fn describe() -> StageInfo {
        StageInfo::new(
            "diffusion_deep_scan",
            env!("CARGO_PKG_VERSION"),
            "checks a diffusers folder: index, components, configs, scheduler, weights, checksums and folder tricks",
        )
    }

    fn run(model: &Model) -> Report {
        let cfg: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        run(model, &cfg).unwrap_or_else(Report::fail)
    }
}

airlock_sdk::export_stage!(DiffusionDeepScan);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(scan: &Scan) -> Vec<&str> {
        let mut r: Vec<&str> = scan.findings.iter().map(|f| f.rule.as_str()).collect();
        r.sort_unstable();
        r
    }

    #[test]
    fn loader_gadgets_and_urls_are_found_at_any_depth() {
        let mut scan = Scan { findings: Vec::new() };
        let v = json!({
            "_class_name": "StableDiffusionPipeline",
            "custom_pipeline": "lpw_stable_diffusion",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "extra": {"list": [1, "hf://someone/else"], "auto_map": {"x": "y"}},
            "trust_remote_code": false,
        });
        check_json_values(&mut scan, "model_index.json", &v, "");
        assert_eq!(rules(&scan), ["diffusion.auto-map", "diffusion.custom-pipeline", "diffusion.remote-url"]);
        let url = scan.findings.iter().find(|f| f.rule == "diffusion.remote-url").unwrap();
        assert!(url.message.contains("extra.list[1]"), "{}", url.message);
        assert_eq!(scan.failed(), 3);

        let mut scan = Scan { findings: Vec::new() };
        check_json_values(&mut scan, "unet/config.json", &json!({"trust_remote_code": "yes"}), "");
        assert_eq!(rules(&scan), ["diffusion.trust-remote-code"]);
    }

    #[test]
    fn a_real_scheduler_config_passes() {
        // The shape of Stable Diffusion 1.5's scheduler/scheduler_config.json.
        let v = json!({
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false
        });
        let mut scan = Scan { findings: Vec::new() };
        check_scheduler(&mut scan, "scheduler/scheduler_config.json", &v);
        assert_eq!(rules(&scan), Vec::<&str>::new());
    }

    #[test]
    fn scheduler_class_numbers_and_strings_are_judged() {
        let v = json!({
            "_class_name": "EvilScheduler", "beta_start": 0.5, "beta_end": 0.1,
            "num_train_timesteps": 0, "steps_offset": 5000,
            "timestep_spacing": "../../etc/passwd", "prediction_type": {"nested": 1}
        });
        let mut scan = Scan { findings: Vec::new() };
        check_scheduler(&mut scan, "scheduler/scheduler_config.json", &v);
        assert_eq!(
            rules(&scan),
            [
                "diffusion.scheduler.betas",
                "diffusion.scheduler.class",
                "diffusion.scheduler.nested",
                "diffusion.scheduler.steps",
                "diffusion.scheduler.steps",
                "diffusion.scheduler.string",
            ]
        );
        let mut scan = Scan { findings: Vec::new() };
        check_scheduler(&mut scan, "s.json", &json!([1, 2]));
        assert_eq!(rules(&scan), ["diffusion.scheduler"]);
    }

    #[test]
    fn sha256sums_lines_parse_strictly() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let sums = parse_sums(&format!("# comment\n{a}  unet/x.safetensors\n{b} *./vae/config.json\n\n")).unwrap();
        assert_eq!(sums.get("unet/x.safetensors"), Some(&a));
        assert_eq!(sums.get("vae/config.json"), Some(&b.to_ascii_lowercase()));
        assert!(parse_sums(&format!("{a}  x\n{a}  ./x\n")).unwrap_err().contains("listed twice"));
        assert!(parse_sums("abc  x\n").unwrap_err().contains("not a sha256"));
        assert!(parse_sums(&a).unwrap_err().contains("line 1"));
    }

    #[test]
    fn only_docs_images_and_signatures_sit_at_the_root() {
        for ok in ["model_index.json", "README.md", "LICENSE.txt", "sample.PNG", "model.sig", "SHA256SUMS"] {
            assert!(root_file_allowed(ok), "{ok}");
        }
        for bad in ["pipeline.py", "weights.bin", "notes.txt.exe", "model_index.json.bak"] {
            assert!(!root_file_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn urls_are_recognised_by_scheme_only() {
        assert!(is_url(" HTTPS://x"));
        assert!(is_url("git+ssh://x"));
        assert!(!is_url("scaled_linear"));
        assert!(!is_url("see https://x")); // prose, not a value a loader fetches
    }
}
