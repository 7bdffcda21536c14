//! Folder models and stage 7: a tiny diffusers folder the tests write
//! themselves passes; each crafted variant fails at the stage that owns the
//! problem, and the report names the file.

use std::path::{Path, PathBuf};

use crate::harness::*;
use crate::lifecycle::Lab;

/// f32 values that look like weights (no NaN, spread, deterministic).
fn weights(n: usize, seed: f32) -> Vec<u8> {
    (0..n).flat_map(|i| ((i as f32 * 0.37 + seed).sin() * 0.05).to_le_bytes()).collect()
}

/// A safetensors file of `names`, each a 4×8 f32 tensor.
fn st(names: &[&str]) -> Vec<u8> {
    let mut header = String::from("{");
    let mut data = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let start = data.len();
        data.extend(weights(32, i as f32));
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(r#""{n}":{{"dtype":"F32","shape":[4,8],"data_offsets":[{start},{}]}}"#, data.len()));
    }
    header.push('}');
    safetensors(&header, &data)
}

const INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.30.0",
  "feature_extractor": [null, null],
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

const SCHEDULER: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.30.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "timestep_spacing": "leading"
}"#;

/// Writes a clean tiny diffusers folder at `dir/name` and returns it.
fn tiny_diffusers(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(name);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model_index.json", INDEX.into()),
        (
            "unet/config.json",
            br#"{"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4}"#.to_vec(),
        ),
        (
            "unet/diffusion_pytorch_model.safetensors",
            st(&["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "up_blocks.0.attentions.0.proj_in.weight"]),
        ),
        ("vae/config.json", br#"{"_class_name": "AutoencoderKL", "latent_channels": 4}"#.to_vec()),
        ("vae/diffusion_pytorch_model.safetensors", st(&["encoder.conv_in.weight", "decoder.conv_out.weight"])),
        ("text_encoder/config.json", br#"{"architectures": ["CLIPTextModel"], "hidden_size": 8}"#.to_vec()),
        ("text_encoder/model.safetensors", st(&["text_model.embeddings.token_embedding.weight"])),
        ("tokenizer/tokenizer_config.json", br#"{"model_max_length": 77, "do_lower_case": true}"#.to_vec()),
        ("tokenizer/vocab.json", br#"{"a</w>": 0, "b</w>": 1, "<|endoftext|>": 2}"#.to_vec()),
        ("tokenizer/merges.txt", b"#version: 0.2\na b\n".to_vec()),
        ("scheduler/scheduler_config.json", SCHEDULER.into()),
    ];
    for (p, bytes) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    root
}

/// `SHA256SUMS` for every file of `root` (sha256sum's format).
fn write_sums(root: &Path) {
    let mut lines = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                lines.push(format!("{}  {rel}\n", sha256_hex(&std::fs::read(&p).unwrap())));
            }
        }
    }
    lines.sort();
    std::fs::write(root.join("SHA256SUMS"), lines.concat()).unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// The finding of `stage` whose location is `at`.
fn finding_at<'a>(s: &'a Scan, stage: &str, at: &str) -> &'a serde_json::Value {
    stage_results(s, stage)
        .into_iter()
        .flat_map(|r| r["findings"].as_array().unwrap())
        .find(|f| f["location"].as_str().is_some_and(|l| l.contains(at)))
        .unwrap_or_else(|| panic!("no {stage} finding at {at}: {}", s.one()))
}

#[test]
fn a_clean_tiny_diffusers_folder_passes_every_stage() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "tiny-sd");
    let s = scan_json(&root, &[]);
    assert_passed(&s);
    let st = s.stage("diffusion_deep_scan");
    assert_eq!(st["verdict"], "pass", "{st}");
    let summary = st["summary"].as_str().unwrap();
    assert!(summary.starts_with("StableDiffusionPipeline pipeline, 5 components checked"), "{summary}");
    assert_eq!(s.stage("format_gate")["summary"], "json, safetensors, text");
    // With a shipped SHA256SUMS that matches, it still passes, and says so.
    write_sums(&root);
    let s = scan_json(&root, &[]);
    assert_passed(&s);
    assert!(
        s.stage("diffusion_deep_scan")["summary"].as_str().unwrap().contains("11 files match SHA256SUMS"),
        "{}",
        s.one()
    );
}

#[test]
fn models_that_are_not_diffusers_folders_are_skipped() {
    let d = tmp();
    let s = scan_json(&Gguf::default().write(d.path(), "m.gguf"), &[]);
    assert_passed(&s);
    assert!(
        s.stage("diffusion_deep_scan")["summary"].as_str().unwrap().starts_with("not a diffusion model"),
        "{}",
        s.one()
    );
}

#[test]
fn a_symlink_to_etc_passwd_fails_at_the_format_gate() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    std::os::unix::fs::symlink("/etc/passwd", root.join("unet/notes.json")).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "format_gate", "unet/notes.json: the model folder holds a symlink (/etc/passwd)");
    assert_eq!(finding_at(&s, "format_gate", "unet/notes.json")["rule"], "format.symlink");
}

#[test]
fn a_pickle_bin_component_fails_at_the_format_gate_and_the_pickle_scan_says_why() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    std::fs::remove_file(root.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(root.join("unet/diffusion_pytorch_model.bin"), crate::formats::EVIL_PICKLE).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "format_gate", "unet/diffusion_pytorch_model.bin: format \"pickle\" is denied by policy");
    let f = assert_static_finding(&s, "pickle.dangerous-import", "unet/diffusion_pytorch_model.bin");
    assert!(f["message"].as_str().unwrap().contains("posix.system"), "{f}");
}

#[test]
fn a_custom_pipeline_pointing_at_python_fails() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    let index =
        INDEX.replacen("\"_diffusers_version\"", "\"custom_pipeline\": \"pipeline.py\",\n  \"_diffusers_version\"", 1);
    std::fs::write(root.join("model_index.json"), index).unwrap();
    std::fs::write(root.join("pipeline.py"), "import os\nos.system('id')\n").unwrap();
    let s = scan_json(&root, &[]);
    // The .py file is refused by name at the format gate; the static scan,
    // which runs beside stages 1-4, still reports the loader gadget.
    assert_rejected(&s, "format_gate", "pipeline.py: a .py file in a model folder is code");
    let f = assert_static_finding(&s, "meta.gadget.custom-pipeline", "model_index.json");
    assert!(f["message"].as_str().unwrap().contains("custom_pipeline"), "{f}");
    // Python code alone, with no gadget pointing at it: the format gate refuses it, and
    // stage 7 does too under a policy that lets .py files through the gate.
    std::fs::write(root.join("model_index.json"), INDEX).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "format_gate", "pipeline.py");
    let lax = policy_dir(d.path(), |t| {
        t.replacen(
            "denied_formats: [pickle, pytorch-zip, zip]",
            "denied_formats: [pickle, pytorch-zip, zip]\n        folder_denied_suffixes: []\n        folder_text_suffixes: [.py]",
            1,
        )
    });
    let s = scan_json(&root, &["--policy", lax.to_str().unwrap()]);
    assert_rejected(&s, "diffusion_deep_scan", "pipeline.py: Python code shipped with the model");
    assert_eq!(finding_at(&s, "diffusion_deep_scan", "pipeline.py")["rule"], "diffusion.python-file");
}

#[test]
fn an_index_naming_a_missing_component_fails_at_stage_7() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    let index = INDEX.replacen(
        "\"feature_extractor\": [null, null]",
        "\"feature_extractor\": [\"transformers\", \"CLIPImageProcessor\"]",
        1,
    );
    std::fs::write(root.join("model_index.json"), index).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(
        &s,
        "diffusion_deep_scan",
        "feature_extractor: named by model_index.json but feature_extractor/ does not exist",
    );
}

#[test]
fn an_extra_weight_file_fails_at_stage_7() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    std::fs::create_dir_all(root.join("lora")).unwrap();
    std::fs::write(root.join("lora/pytorch_lora_weights.safetensors"), st(&["unet.lora.down.weight"])).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(
        &s,
        "diffusion_deep_scan",
        "lora/pytorch_lora_weights.safetensors: folder lora/ is not a component",
    );
    assert_eq!(
        finding_at(&s, "diffusion_deep_scan", "lora/pytorch_lora_weights.safetensors")["rule"],
        "diffusion.extra-weights"
    );
}

#[test]
fn a_scheduler_config_with_a_url_fails_at_stage_7() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    let sched = SCHEDULER.replacen("\"leading\"", "\"https://evil.example/steps.json\"", 1);
    std::fs::write(root.join("scheduler/scheduler_config.json"), sched).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "diffusion_deep_scan", "scheduler/scheduler_config.json");
    let f = finding_at(&s, "diffusion_deep_scan", "scheduler/scheduler_config.json");
    assert!(f["message"].as_str().unwrap().contains("https://evil.example/steps.json"), "{f}");
}

#[test]
fn a_component_safetensors_with_trailing_bytes_fails_at_the_format_gate() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    let p = root.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes.extend_from_slice(b"hidden payload after the tensors");
    std::fs::write(&p, bytes).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "format_gate", "vae/diffusion_pytorch_model.safetensors");
    assert!(s.one()["reason"].as_str().unwrap().contains("trailing"), "{}", s.one());
}

#[test]
fn a_checksum_mismatch_against_the_shipped_sha256sums_fails_at_stage_7() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    write_sums(&root);
    // A different (still valid) text encoder after the sums were written.
    std::fs::write(root.join("text_encoder/model.safetensors"), st(&["text_model.final_layer_norm.weight"])).unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "diffusion_deep_scan", "text_encoder/model.safetensors: sha256 mismatch against SHA256SUMS");
    assert_eq!(
        finding_at(&s, "diffusion_deep_scan", "text_encoder/model.safetensors")["rule"],
        "diffusion.checksums.mismatch"
    );
}

#[test]
fn tensor_names_that_do_not_fit_the_component_fail() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    std::fs::write(
        root.join("vae/diffusion_pytorch_model.safetensors"),
        st(&["encoder.conv_in.weight", "payload.blob"]),
    )
    .unwrap();
    let s = scan_json(&root, &[]);
    assert_rejected(&s, "diffusion_deep_scan", "tensor \"payload.blob\" does not belong in a Vae");
}

#[test]
fn a_diffusers_folder_is_promoted_verified_and_rescanned_through_the_watcher() {
    let lab = Lab::new();
    tiny_diffusers(&lab.incoming(), "tiny-sd");
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: tiny-sd"), "{out}");
    assert!(lab.registry().join("tiny-sd/model/tiny-sd/unet/diffusion_pytorch_model.safetensors").is_file(), "{out}");
    let manifest = lab.manifest("tiny-sd");
    let listed = manifest.to_string();
    for f in ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"] {
        assert!(listed.contains(f), "{f} is not in the manifest: {manifest}");
    }
    let (code, out) = lab.run(&["verify", "tiny-sd"]);
    assert_eq!(code, 0, "{out}");
    // A changed component is caught by verify, and named.
    std::fs::write(
        lab.registry().join("tiny-sd/model/tiny-sd/scheduler/scheduler_config.json"),
        SCHEDULER.replace("1000", "999"),
    )
    .unwrap();
    let (code, out) = lab.run(&["verify", "tiny-sd"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("scheduler/scheduler_config.json"), "{out}");
    // A folder with a planted link is rejected whole, the entry named in its report.
    let bad = tiny_diffusers(&lab.incoming(), "bad-sd");
    std::os::unix::fs::symlink("/etc/passwd", bad.join("vae/passwd")).unwrap();
    let out = lab.watch_once();
    assert!(lab.rejected().join("bad-sd/unet/diffusion_pytorch_model.safetensors").is_file(), "{out}");
    let report = lab.report("bad-sd").to_string();
    assert!(report.contains("vae/passwd"), "{report}");
    // Mended in rejected/, rescan puts the whole folder back and it is promoted.
    std::fs::remove_file(lab.rejected().join("bad-sd/vae/passwd")).unwrap();
    let (code, out) = lab.run(&["rescan", "bad-sd"]);
    assert_eq!(code, 0, "{out}");
    assert!(lab.incoming().join("bad-sd/unet/config.json").is_file());
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: bad-sd"), "{out}");
    let (code, out) = lab.run(&["verify", "bad-sd"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_promoted_folder_is_pinned_per_file_and_a_changed_copy_fails_integrity() {
    let lab = Lab::new();
    tiny_diffusers(&lab.incoming(), "tiny-sd");
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: tiny-sd"), "{out}");
    let pins = std::fs::read_to_string(lab.root.join("state/models.lock.yaml")).unwrap();
    assert!(pins.contains("unet/diffusion_pytorch_model.safetensors:"), "{pins}");
    assert!(pins.contains("scheduler/scheduler_config.json:"), "{pins}");
    // The same model again, elsewhere: it matches its pins.
    let d = tmp();
    let copy = tiny_diffusers(d.path(), "tiny-sd");
    let scan = |p: &Path| scan_in(&lab.root, p, &["--format", "json"], &[]);
    let s = scan(&copy);
    assert_passed(&s);
    assert_eq!(s.stage("integrity_check")["summary"], "11 files match their pins");
    // A changed scheduler and an added file: integrity fails and names both.
    std::fs::write(copy.join("scheduler/scheduler_config.json"), SCHEDULER.replace("1000", "500")).unwrap();
    std::fs::write(copy.join("README.md"), "# tiny\n").unwrap();
    let s = scan(&copy);
    assert_rejected(&s, "integrity_check", "2 file(s) differ from their pins");
    assert_eq!(
        finding_at(&s, "integrity_check", "scheduler/scheduler_config.json")["rule"],
        "integrity.sha256-mismatch"
    );
    assert_eq!(finding_at(&s, "integrity_check", "README.md")["rule"], "integrity.unpinned-file");
}

#[test]
fn folder_limits_come_from_the_policy() {
    let d = tmp();
    let root = tiny_diffusers(d.path(), "m");
    let with = |limits: &str| {
        policy_dir(&d.path().join(limits.replace([' ', ':'], "")), |t| {
            t.replacen("  max_files: 10000\n  max_depth: 32\n  max_total_gib: 512\n", limits, 1)
        })
    };
    let cases = [
        ("  max_files: 10\n", "folder holds more than 10 files"),
        ("  max_depth: 0\n", "folder is nested deeper than 0 levels"),
        ("  max_total_gib: 0\n", "folder holds more than 0 bytes"),
    ];
    for (limits, needle) in cases {
        let pol = with(limits);
        let s = scan_json(&root, &["--policy", pol.to_str().unwrap()]);
        assert_eq!(s.code, 2, "{limits}: {}{}", s.stdout, s.stderr);
        assert!(s.stderr.contains(needle) && s.stderr.contains("/m"), "{limits}: {}", s.stderr);
    }
    // Within the defaults it opens and passes.
    assert_passed(&scan_json(&root, &[]));
}
