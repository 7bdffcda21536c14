//! Splitting a stage over a sharded model: a plugin that exports `split`
//! (the built-in `weights`) is run with `part` on each shard of the real
//! MiniLM resharded into three, and `join` over the parts. The join must give
//! the report one run over the whole model gives; a planted layer that a shard
//! scanned alone passes must be rejected through the join.

use std::path::Path;
use std::sync::Arc;

use airlock::artifact::{FolderLimits, Model, ReadMode};
use airlock::plugin::{Limits, Plugin, Report, RunContext, Runtime, Verdict};
use serde_json::{Value, json};

use crate::harness::*;
use crate::hf_folders::{minilm, read_safetensors, reshard};
use crate::plugin_platform::airlock_cmd;

fn open(folder: &Path) -> Arc<Model> {
    Arc::new(Model::open(folder, ReadMode::Mmap, &FolderLimits::default()).unwrap())
}

/// The same model showing only the files whose path `keep` accepts.
fn only(model: &Model, keep: impl Fn(&str) -> bool) -> Arc<Model> {
    Arc::new(Model {
        name: model.name.clone(),
        kind: model.kind,
        root: model.root.clone(),
        files: model.files.iter().filter(|f| keep(&f.rel_path)).cloned().collect(),
        surroundings: Vec::new(),
        sidecars: model.sidecars.clone(),
    })
}

fn ctx() -> Arc<RunContext> {
    Arc::new(RunContext { config_json: "{}".into(), ..RunContext::default() })
}

fn load(runtime: &Runtime, name: &str) -> Plugin {
    runtime.load(&std::fs::read(component(name)).unwrap(), &[]).unwrap()
}

fn weights(runtime: &Runtime) -> Plugin {
    load(runtime, "weights")
}

fn whole(runtime: &Runtime, plugin: &Plugin, model: Arc<Model>) -> Report {
    runtime.run(plugin, model, ctx(), Limits::default()).result.unwrap()
}

/// `part` on each file of the model in turn, then `join` over the parts.
fn split(runtime: &Runtime, plugin: &Plugin, model: &Arc<Model>) -> Report {
    let parts: Vec<String> = model
        .files
        .iter()
        .map(|f| {
            let shard = only(model, |p| p == f.rel_path);
            runtime.run_part(plugin, shard, ctx(), Limits::default()).result.unwrap()
        })
        .collect();
    runtime.run_join(plugin, parts, model.clone(), ctx(), Limits::default()).result.unwrap()
}

/// The report without its timings, which differ between any two runs.
fn untimed(r: &Report) -> Value {
    let mut details = r.details.clone().unwrap();
    details.as_object_mut().unwrap().remove("ms_by_type");
    json!({
        "verdict": format!("{:?}", r.verdict),
        "summary": r.summary,
        "findings": r.findings,
        "score": r.score,
        "details": details,
    })
}

#[test]
fn weights_exports_split_and_inspect_says_so() {
    let d = tmp();
    let wasm = component("weights");
    let (code, out, err) = airlock_cmd(d.path(), &["plugin", "inspect", "--format", "json", wasm.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["world"], "airlock:stage/split-stage@0.2.0");
    assert_eq!(v["splits"], true);
    assert!(v["exports"].as_array().unwrap().contains(&json!("airlock:stage/split@0.2.0: instance")), "{v}");
    let (code, out, _) = airlock_cmd(d.path(), &["plugin", "inspect", wasm.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("split:    yes"), "{out}");
}

#[test]
fn the_real_minilm_in_three_shards_gives_the_same_report_split_and_whole() {
    let d = tmp();
    let folder = minilm(d.path());
    reshard(&folder);
    let runtime = Runtime::new(None).unwrap();
    let model = open(&folder);
    let shards = model.files.iter().filter(|f| f.rel_path.ends_with(".safetensors")).count();
    assert_eq!(shards, 3);
    for name in ["weights", "entropy"] {
        let plugin = load(&runtime, name);
        assert!(plugin.splits(), "{name}");
        let whole = whole(&runtime, &plugin, model.clone());
        let split = split(&runtime, &plugin, &model);
        assert_eq!(whole.verdict, Verdict::Pass, "{name}: {}", whole.summary);
        assert_eq!(split.summary, whole.summary, "{name}");
        assert_eq!(untimed(&split), untimed(&whole), "{name}");
    }
    // Every tensor of every shard went into the join.
    let whole = whole(&runtime, &load(&runtime, "weights"), model.clone());
    let listed = whole.details.as_ref().unwrap()["tensors_listed"].as_u64().unwrap();
    assert!(listed > 90, "{listed} tensors");
}

/// Random low bytes planted in one f32 matrix of the middle shard (a payload
/// hidden EvilModel-style): `entropy` split and joined names it, as one run does.
#[test]
fn entropy_joined_from_shards_names_a_payload_in_one_of_them() {
    let d = tmp();
    let folder = minilm(d.path());
    let index = reshard(&folder);
    let middle = "model-00002-of-00003.safetensors";
    let (header, _) = read_safetensors(&folder.join(middle));
    let target = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, f)| *f == middle)
        .map(|(n, _)| n.clone())
        .find(|n| header[n]["dtype"] == "F32" && header[n]["shape"].as_array().unwrap().len() == 2)
        .expect("an f32 matrix in the middle shard");
    let mut bytes = std::fs::read(folder.join(middle)).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let o = header[&target]["data_offsets"].as_array().unwrap();
    let (a, b) = (start + o[0].as_u64().unwrap() as usize, start + o[1].as_u64().unwrap() as usize);
    // An LCG's top bytes into the low three bytes of every f32.
    let mut x = 0x9e3779b97f4a7c15u64;
    for f in bytes[a..b].chunks_exact_mut(4) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        f[..3].copy_from_slice(&(x >> 40).to_le_bytes()[..3]);
    }
    std::fs::write(folder.join(middle), bytes).unwrap();

    let runtime = Runtime::new(None).unwrap();
    let plugin = load(&runtime, "entropy");
    let model = open(&folder);
    let whole = whole(&runtime, &plugin, model.clone());
    let split = split(&runtime, &plugin, &model);
    assert!(matches!(split.verdict, Verdict::Fail(_)), "{}", split.summary);
    let named: Vec<&str> = split
        .findings
        .iter()
        .filter(|f| f.rule == "entropy.low-bytes-uniform")
        .filter_map(|f| f.location.as_deref())
        .collect();
    assert_eq!(named, vec![format!("{middle}: {target}")], "{:?}", split.findings);
    assert_eq!(split.summary, whole.summary);
    assert_eq!(untimed(&split), untimed(&whole));
}

/// Multiplies every f32 of the named tensors in a safetensors file by `factor`, in place.
fn scale_tensors(path: &Path, names: &[String], factor: f32) {
    let (header, _) = read_safetensors(path);
    let mut bytes = std::fs::read(path).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for name in names {
        let t = &header[name];
        assert_eq!(t["dtype"], "F32", "{name}");
        let o = t["data_offsets"].as_array().unwrap();
        let (a, b) = (start + o[0].as_u64().unwrap() as usize, start + o[1].as_u64().unwrap() as usize);
        for x in bytes[a..b].chunks_exact_mut(4) {
            let v = f32::from_le_bytes(x.try_into().unwrap()) * factor;
            x.copy_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// Scales every matrix of layer 5 (the top layer) of the resharded MiniLM in
/// `folder` a million times, in the last shard, which holds too few layers of
/// each role for a z-score on its own. Returns that shard and the matrices.
pub(crate) fn plant_top_layer(folder: &Path, index: &Value) -> (&'static str, Vec<String>) {
    let last = "model-00003-of-00003.safetensors";
    let in_last: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, file)| *file == last)
        .map(|(name, _)| name.clone())
        .collect();
    let layers: std::collections::BTreeSet<&str> =
        in_last.iter().filter_map(|n| n.strip_prefix("encoder.layer.")).filter_map(|n| n.split('.').next()).collect();
    assert!(!layers.is_empty() && layers.len() < 5, "layers in the last shard: {layers:?}");
    let planted: Vec<String> =
        in_last.iter().filter(|n| n.starts_with("encoder.layer.5.") && n.ends_with(".weight")).cloned().collect();
    let matrices: Vec<String> = {
        let (header, _) = read_safetensors(&folder.join(last));
        planted.into_iter().filter(|n| header[n]["shape"].as_array().unwrap().len() == 2).collect()
    };
    assert!(matrices.len() >= 4, "{matrices:?}");
    scale_tensors(&folder.join(last), &matrices, 1e6);
    (last, matrices)
}

#[test]
fn a_planted_layer_in_a_small_shard_passes_alone_and_is_rejected_through_the_join() {
    let d = tmp();
    let folder = minilm(d.path());
    let index = reshard(&folder);
    let (last, matrices) = plant_top_layer(&folder, &index);

    let runtime = Runtime::new(None).unwrap();
    let plugin = weights(&runtime);
    let model = open(&folder);
    let alone = whole(&runtime, &plugin, only(&model, |p| p == last));
    assert_eq!(alone.verdict, Verdict::Pass, "the shard alone: {}", alone.summary);
    assert!(alone.findings.iter().all(|f| f.rule != "weights.role-outlier"), "{:?}", alone.findings);

    let joined = split(&runtime, &plugin, &model);
    assert!(matches!(joined.verdict, Verdict::Fail(_)), "through the join: {}", joined.summary);
    let outliers: Vec<&str> = joined
        .findings
        .iter()
        .filter(|f| f.rule == "weights.role-outlier")
        .filter_map(|f| f.location.as_deref())
        .collect();
    assert!(
        matrices.iter().all(|m| outliers.iter().any(|o| o.ends_with(&format!("{last}: {m}")))),
        "every planted matrix is named: {outliers:?}"
    );
    let whole = whole(&runtime, &plugin, model.clone());
    assert_eq!(joined.summary, whole.summary);
    assert_eq!(untimed(&joined), untimed(&whole));
}

#[test]
fn a_plugin_without_split_is_not_run_in_parts() {
    let d = tmp();
    let folder = minilm(d.path());
    let runtime = Runtime::new(None).unwrap();
    let plugin = load(&runtime, "pickle_scan");
    assert!(!plugin.splits());
    let out = runtime.run_part(&plugin, open(&folder), ctx(), Limits::default());
    let err = out.result.unwrap_err();
    assert!(err.contains("pickle_scan") && err.contains("does not export airlock:stage/split"), "{err}");
}

#[test]
fn a_join_given_parts_it_did_not_write_fails_naming_the_part() {
    let d = tmp();
    let folder = minilm(d.path());
    let runtime = Runtime::new(None).unwrap();
    let plugin = weights(&runtime);
    let model = open(&folder);
    let good = runtime.run_part(&plugin, model.clone(), ctx(), Limits::default()).result.unwrap();
    for (parts, needle) in [
        (vec![good.clone(), "{\"tensors\": 1}".to_string()], "part 2 of 2"),
        (vec!["not json".to_string(), good.clone()], "part 1 of 2"),
        (Vec::new(), "no parts"),
    ] {
        let r = runtime.run_join(&plugin, parts, model.clone(), ctx(), Limits::default()).result.unwrap();
        match r.verdict {
            Verdict::Fail(why) => assert!(why.contains(needle), "{why}"),
            v => panic!("a join of bad parts must fail, got {v:?}: {}", r.summary),
        }
    }
}

/// The parts of the real gemma GGUF (236 quantised tensors, as if it were one
/// shard) fit in one NATS message at the server's default 1 MiB cap, with
/// room to spare: what a part job of a sharded GGUF sends.
#[test]
fn parts_of_the_real_gemma_fit_a_default_nats_message() {
    let runtime = Runtime::new(None).unwrap();
    let model = open(&models().gemma);
    let tensors = match model.files[0].header.as_ref().unwrap() {
        Ok(h) => h.tensors.len(),
        Err(e) => panic!("{e}"),
    };
    let mut total = 0;
    for name in ["weights", "entropy"] {
        let part = runtime.run_part(&load(&runtime, name), model.clone(), ctx(), Limits::default()).result.unwrap();
        eprintln!("{name}: a part of the real gemma ({tensors} tensors) is {} bytes", part.len());
        total += part.len();
    }
    eprintln!("both: {total} bytes, {} per tensor", total / tensors);
    assert!(total < 1 << 20, "{total} bytes");
}
