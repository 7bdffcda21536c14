//! Stage 5, metadata gadgets: code-execution keys, dangerous import paths and
//! insane values in GGUF metadata, safetensors `__metadata__` and JSON configs.

use crate::harness::*;

#[track_caller]
fn rejected_with(s: &Scan, rule: &str, location: &str) {
    assert_rejected(s, "static_scan", rule);
    let st = s.stage("static_scan");
    let f = st["findings"].as_array().unwrap().iter().find(|f| f["rule"] == rule).unwrap_or_else(|| panic!("{st:#}"));
    assert_eq!(f["severity"], "critical");
    assert!(f["location"].as_str().unwrap().contains(location), "{f}");
}

fn gguf_with(key: &str, value: (u32, Vec<u8>)) -> Vec<u8> {
    let mut g = Gguf::default();
    g.kvs.push((key.into(), value));
    g.bytes()
}

#[test]
fn hydra_target_in_safetensors_metadata() {
    let d = tmp();
    let header = r#"{"__metadata__":{"config":"{\"_target_\": \"os.system\", \"_args_\": [\"id\"]}"},"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#;
    let s = scan_json(&write(d.path(), "m.safetensors", &safetensors(header, &[1; 24])), &[]);
    rejected_with(&s, "meta.gadget.hydra-target", "__metadata__[\"config\"]");
    let f = s.stage("static_scan")["findings"].as_array().unwrap().clone();
    assert!(f.iter().any(|f| f["rule"] == "meta.gadget.python-import"), "{f:?}");
}

#[test]
fn loader_gadgets_in_gguf_metadata() {
    let d = tmp();
    for (key, value, rule) in [
        ("general.auto_map", "{\"AutoModel\": \"modeling_evil.Model\"}", "meta.gadget.auto-map"),
        ("general.config", "{\"trust_remote_code\": true}", "meta.gadget.trust-remote-code"),
        ("general.pipeline", "{\"custom_pipeline\": \"evil/pipe\"}", "meta.gadget.custom-pipeline"),
        ("general.description", "helpful model; run builtins.exec on load", "meta.gadget.python-import"),
    ] {
        let p = write(d.path(), "m.gguf", &gguf_with(key, kv_str(value)));
        rejected_with(&scan_json(&p, &[]), rule, key);
    }
}

#[test]
fn insane_block_count() {
    let d = tmp();
    let p = write(d.path(), "m.gguf", &gguf_with("llama.block_count", kv_u32(100_000)));
    rejected_with(&scan_json(&p, &[]), "meta.value.block-count", "llama.block_count");
    let ok = write(d.path(), "ok.gguf", &gguf_with("llama.block_count", kv_u32(32)));
    assert_passed(&scan_json(&ok, &[]));
}

/// A GGUF string-array value (type 9 of type 8).
fn tokens<S: AsRef<str>>(list: &[S]) -> (u32, Vec<u8>) {
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend((list.len() as u64).to_le_bytes());
    for t in list {
        let t = t.as_ref();
        v.extend((t.len() as u64).to_le_bytes());
        v.extend(t.as_bytes());
    }
    (9u32, v)
}

#[test]
fn malformed_byte_tokens() {
    let d = tmp();
    let good =
        write(d.path(), "ok.gguf", &gguf_with("tokenizer.ggml.tokens", tokens(&["<0x00>", "<0xFF>", "hello", "<0x"])));
    assert_passed(&scan_json(&good, &[]));
    let bad = write(d.path(), "m.gguf", &gguf_with("tokenizer.ggml.tokens", tokens(&["<0x41>", "<0xZZ>"])));
    rejected_with(&scan_json(&bad, &[]), "meta.value.byte-token", "tokenizer.ggml.tokens");
}

/// Vocabularies are scanned packed: the elements that may hold a needle are
/// found in one pass over the whole buffer. A needle deep inside one element
/// is found; one split across two neighbouring elements is in neither.
#[test]
fn a_gadget_deep_in_a_vocabulary_is_found_and_one_split_across_tokens_is_not() {
    let d = tmp();
    let mut vocab: Vec<String> =
        (0..20_000).map(|i| if i % 7 == 0 { format!("▁w_{i}") } else { format!("▁tok{i}") }).collect();
    vocab[12_001] = "os.".into();
    vocab[12_002] = "system".into();
    vocab[15_000] = "_target".into();
    vocab[15_001] = "_".into();
    let clean = write(d.path(), "ok.gguf", &gguf_with("tokenizer.ggml.tokens", tokens(&vocab)));
    assert_passed(&scan_json(&clean, &[]));

    vocab[12_345] = "▁os.system(".into();
    let bad = write(d.path(), "m.gguf", &gguf_with("tokenizer.ggml.tokens", tokens(&vocab)));
    let s = scan_json(&bad, &[]);
    rejected_with(&s, "meta.gadget.python-import", "tokenizer.ggml.tokens");
    let f = s.stage("static_scan")["findings"].as_array().unwrap().clone();
    assert!(f.iter().any(|f| f["message"].as_str().unwrap().contains("os.system")), "{f:?}");
}

#[test]
fn overlong_metadata_strings() {
    let d = tmp();
    let p = write(d.path(), "m.gguf", &gguf_with("general.description", kv_str(&"a".repeat((1 << 20) + 1))));
    rejected_with(&scan_json(&p, &[]), "meta.value.string-too-long", "general.description");
}

#[test]
fn a_clean_crafted_model_with_a_normal_template_passes() {
    let d = tmp();
    let template = "{% set ns = namespace(found=false) %}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}";
    let p = write(d.path(), "m.gguf", &gguf_with("tokenizer.chat_template", kv_str(template)));
    let s = scan_json(&p, &[]);
    assert_passed(&s);
    assert!(s.stage("static_scan")["findings"].as_array().unwrap().is_empty());
}
