//! tensor-guard: does the tensor table fit the architecture the GGUF declares?
//!
//! llama.cpp builds a model from `general.architecture` and its hyperparameters
//! (`<arch>.block_count`, `.embedding_length`, `.feed_forward_length`,
//! `.attention.head_count[_kv]`, `.attention.key_length/value_length`) and
//! then looks tensors up by name. A tensor it never looks up is never used,
//! so it is a place to hide a payload; a tensor whose shape does not fit the
//! hyperparameters is a broken or doctored file. For llama, qwen2 and the
//! gemma family this stage reports:
//!
//! * `tensor_guard.unexpected` (high): a tensor the architecture does not
//!   have, including a block index at or above `block_count`;
//! * `tensor_guard.missing` (high): a tensor the architecture needs;
//! * `tensor_guard.shape` (critical): a shape that does not fit;
//! * `tensor_guard.hparams` (high): a hyperparameter llama.cpp needs is absent
//!   or zero.
//!
//! Any of these fails the stage. Other formats and architectures, and MoE
//! models, are skipped with the reason: a guess would be a false reject.

use std::collections::BTreeMap;

use airlock_sdk::{File, Finding, Format, MetaValue, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Tensor names to accept beyond the architecture's own.
    #[serde(default)]
    allow_extra: Vec<String>,
}

/// The hyperparameters the shapes follow from.
struct Hparams {
    layers: u64,
    embd: u64,
    ff: u64,
    heads: u64,
    heads_kv: u64,
    key_len: u64,
    value_len: u64,
    vocab: Option<u64>,
}

/// Which optional tensor families an architecture has.
struct Family {
    /// q/k/v biases (qwen2).
    qkv_bias: bool,
    /// post_attention_norm and post_ffw_norm (gemma2, gemma3).
    post_norms: bool,
    /// attn_q_norm and attn_k_norm, one head wide (gemma3).
    qk_norm: bool,
}

fn family(arch: &str) -> Option<Family> {
    let f = |qkv_bias, post_norms, qk_norm| Some(Family { qkv_bias, post_norms, qk_norm });
    match arch {
        "llama" | "gemma" => f(false, false, false),
        "qwen2" => f(true, false, false),
        "gemma2" => f(false, true, false),
        "gemma3" => f(false, true, true),
        _ => None,
    }
}

fn uint(file: &File, key: &str) -> Option<u64> {
    match file.metadata(key)? {
        MetaValue::Uint(v) => Some(v),
        MetaValue::Int(v) => u64::try_from(v).ok(),
        _ => None,
    }
}

/// The expected tensors, name -> shape (GGUF order: ne[0] first).
fn expected(h: &Hparams, fam: &Family) -> BTreeMap<String, Vec<u64>> {
    let mut e = BTreeMap::new();
    let q = h.heads * h.key_len;
    let k = h.heads_kv * h.key_len;
    let v = h.heads_kv * h.value_len;
    let o = h.heads * h.value_len;
    if let Some(vocab) = h.vocab {
        e.insert("token_embd.weight".to_string(), vec![h.embd, vocab]);
    }
    e.insert("output_norm.weight".to_string(), vec![h.embd]);
    for i in 0..h.layers {
        let mut add = |name: &str, shape: Vec<u64>| {
            e.insert(format!("blk.{i}.{name}"), shape);
        };
        add("attn_norm.weight", vec![h.embd]);
        add("attn_q.weight", vec![h.embd, q]);
        add("attn_k.weight", vec![h.embd, k]);
        add("attn_v.weight", vec![h.embd, v]);
        add("attn_output.weight", vec![o, h.embd]);
        add("ffn_norm.weight", vec![h.embd]);
        add("ffn_gate.weight", vec![h.embd, h.ff]);
        add("ffn_up.weight", vec![h.embd, h.ff]);
        add("ffn_down.weight", vec![h.ff, h.embd]);
        if fam.qkv_bias {
            add("attn_q.bias", vec![q]);
            add("attn_k.bias", vec![k]);
            add("attn_v.bias", vec![v]);
        }
        if fam.post_norms {
            add("post_attention_norm.weight", vec![h.embd]);
            add("post_ffw_norm.weight", vec![h.embd]);
        }
        if fam.qk_norm {
            add("attn_q_norm.weight", vec![h.key_len]);
            add("attn_k_norm.weight", vec![h.key_len]);
        }
    }
    e
}

/// Tensors an architecture may have or not: the output head (absent when tied
/// to the embedding) and llama's rope frequency table.
fn optional(name: &str, h: &Hparams) -> Option<Option<Vec<u64>>> {
    match name {
        "output.weight" => Some(h.vocab.map(|v| vec![h.embd, v])),
        "rope_freqs.weight" => Some(None),
        _ => None,
    }
}

struct TensorGuard;

impl Stage for TensorGuard {
    fn describe() -> StageInfo {
        StageInfo::new(
            "tensor_guard",
            env!("CARGO_PKG_VERSION"),
            "tensor names and shapes against the declared architecture (llama, qwen2, gemma)",
        )
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let files: Vec<File> = model.files().into_iter().filter(|f| f.format() == Format::Gguf).collect();
        let [file] = files.as_slice() else {
            return Report::skip("not a single-file GGUF model");
        };
        if file.parse_error().is_some() {
            return Report::skip("the GGUF header did not parse (the format gate reports why)");
        }
        let arch = match file.metadata("general.architecture") {
            Some(MetaValue::Text(a)) => a,
            _ => return Report::fail("no general.architecture: llama.cpp cannot load this file"),
        };
        let Some(fam) = family(&arch) else {
            return Report::skip(format!(
                "architecture {arch:?} is not modelled (llama, qwen2, gemma, gemma2, gemma3)"
            ));
        };
        if uint(file, &format!("{arch}.expert_count")).unwrap_or(0) > 0 {
            return Report::skip(format!("{arch} with experts (MoE) is not modelled"));
        }

        let mut findings = Vec::new();
        let mut need = |key: &str| match uint(file, &format!("{arch}.{key}")) {
            Some(v) if v > 0 => v,
            _ => {
                findings.push(
                    Finding::new(
                        "tensor_guard.hparams",
                        Severity::High,
                        format!("{arch}.{key} is missing or zero; llama.cpp needs it"),
                    )
                    .at(format!("{arch}.{key}")),
                );
                0
            }
        };
        let layers = need("block_count");
        let embd = need("embedding_length");
        let ff = need("feed_forward_length");
        let heads = need("attention.head_count");
        if !findings.is_empty() {
            return Report::fail(findings[0].message.clone()).findings(findings);
        }
        let heads_kv = uint(file, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads);
        let key_len = uint(file, &format!("{arch}.attention.key_length")).unwrap_or(embd / heads);
        let value_len = uint(file, &format!("{arch}.attention.value_length")).unwrap_or(key_len);
        let tensors = file.tensors();
        // The vocabulary size is the embedding's second dimension; the tokenizer must agree.
        let vocab = tensors.iter().find(|t| t.name == "token_embd.weight").and_then(|t| t.shape.get(1).copied());
        if let (Some(v), Some(tokens)) = (vocab, file.metadata_packed_texts("tokenizer.ggml.tokens"))
            && tokens.len() as u64 != v
        {
            findings.push(
                Finding::new(
                    "tensor_guard.shape",
                    Severity::Critical,
                    format!("token_embd.weight has {v} rows but the tokenizer has {} tokens", tokens.len()),
                )
                .at("token_embd.weight"),
            );
        }
        let h = Hparams { layers, embd, ff, heads, heads_kv, key_len, value_len, vocab };
        let mut want = expected(&h, &fam);
        if vocab.is_none() {
            want.insert("token_embd.weight".into(), Vec::new());
        }

        for t in &tensors {
            let expected_shape = match want.remove(&t.name) {
                Some(s) => Some(s),
                None => match optional(&t.name, &h) {
                    Some(s) => s,
                    None if config.allow_extra.contains(&t.name) => None,
                    None => {
                        findings.push(
                            Finding::new(
                                "tensor_guard.unexpected",
                                Severity::High,
                                format!(
                                    "{} is not a tensor of {arch} with {layers} blocks; llama.cpp never reads it",
                                    t.name
                                ),
                            )
                            .at(t.name.clone())
                            .offset(t.offset),
                        );
                        None
                    }
                },
            };
            if let Some(shape) = expected_shape
                && !shape.is_empty()
                && shape != t.shape
            {
                findings.push(
                    Finding::new(
                        "tensor_guard.shape",
                        Severity::Critical,
                        format!(
                            "{} has shape {:?}; {arch} with these hyperparameters needs {shape:?}",
                            t.name, t.shape
                        ),
                    )
                    .at(t.name.clone())
                    .offset(t.offset),
                );
            }
        }
        for name in want.keys() {
            findings.push(
                Finding::new("tensor_guard.missing", Severity::High, format!("{name} is missing; {arch} needs it"))
                    .at(name.clone()),
            );
        }

        if findings.is_empty() {
            return Report::pass(format!("{} tensors fit {arch} (block_count {layers})", tensors.len()));
        }
        let summary = format!(
            "{} tensor(s) do not fit {arch}: {}",
            findings.len(),
            findings.iter().take(3).map(|f| f.message.as_str()).collect::<Vec<_>>().join("; ")
        );
        Report::fail(summary).findings(findings).cap_findings(200)
    }
}

airlock_sdk::export_stage!(TensorGuard);
