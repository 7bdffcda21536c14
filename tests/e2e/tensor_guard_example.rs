//! The third-party example in plugins/examples/tensor-guard, driven the way
//! its README tells a new user to: `airlock plugin build`, `airlock plugin
//! pin`, paste the entry into the policy, `airlock scan`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::harness::*;

/// Builds the example once (its own workspace and target dir) and returns its entry.
fn entry() -> &'static str {
    static ENTRY: OnceLock<String> = OnceLock::new();
    ENTRY.get_or_init(|| {
        let d = tmp();
        let dir = repo().join("plugins/examples/tensor-guard");
        let out = airlock(d.path()).args(["plugin", "build"]).arg(&dir).output().unwrap();
        assert!(out.status.success(), "airlock plugin build: {}", String::from_utf8_lossy(&out.stderr));
        let wasm = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let out = airlock(d.path()).args(["plugin", "pin", "--formats", "gguf"]).arg(&wasm).output().unwrap();
        assert!(out.status.success(), "airlock plugin pin: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    })
}

fn scan(dir: &Path, model: &Path) -> Scan {
    let pol = policy_dir(dir, |t| t.replacen("\n  static_scan:\n", &format!("\n  static_scan:\n{}", entry()), 1));
    scan_json(model, &["--policy", pol.to_str().unwrap()])
}

fn guard(s: &Scan) -> &Value {
    stage_results(s, "static_scan")
        .into_iter()
        .find(|r| r["plugin_info"]["name"] == "tensor_guard")
        .unwrap_or_else(|| panic!("tensor_guard did not run: {:#}", s.one()))
}

/// A one-block llama whose tensors fit its hyperparameters: 8 wide, 2 heads
/// of 4, 1 KV head, feed-forward 16, vocabulary 10.
fn tiny_llama() -> Gguf {
    let t = f32_tensor;
    Gguf {
        kvs: vec![
            ("general.architecture".into(), kv_str("llama")),
            ("llama.block_count".into(), kv_u32(1)),
            ("llama.embedding_length".into(), kv_u32(8)),
            ("llama.feed_forward_length".into(), kv_u32(16)),
            ("llama.attention.head_count".into(), kv_u32(2)),
            ("llama.attention.head_count_kv".into(), kv_u32(1)),
        ],
        tensors: vec![
            t("token_embd.weight", &[8, 10]),
            t("output_norm.weight", &[8]),
            t("blk.0.attn_norm.weight", &[8]),
            t("blk.0.attn_q.weight", &[8, 8]),
            t("blk.0.attn_k.weight", &[8, 4]),
            t("blk.0.attn_v.weight", &[8, 4]),
            t("blk.0.attn_output.weight", &[8, 8]),
            t("blk.0.ffn_norm.weight", &[8]),
            t("blk.0.ffn_gate.weight", &[8, 16]),
            t("blk.0.ffn_up.weight", &[8, 16]),
            t("blk.0.ffn_down.weight", &[16, 8]),
        ],
        ..Gguf::default()
    }
}

#[test]
fn the_real_gemma_fits_gemma3() {
    let d = tmp();
    let s = scan(d.path(), &models().gemma);
    let r = guard(&s);
    assert_eq!(r["verdict"], "pass", "{r:#}");
    assert_eq!(r["summary"], "236 tensors fit gemma3 (block_count 18)");
}

#[test]
fn a_fitting_llama_passes_and_safetensors_is_not_its_business() {
    let d = tmp();
    let s = scan(d.path(), &tiny_llama().write(d.path(), "tiny.gguf"));
    assert_eq!(guard(&s)["verdict"], "pass", "{:#}", guard(&s));
    assert_eq!(guard(&s)["summary"], "11 tensors fit llama (block_count 1)");
    let s = scan(d.path(), &models().minilm);
    assert_eq!(guard(&s)["verdict"], "skip");
}

/// (what, how to doctor the file, the rule, the tensor the first finding names)
type Case = (&'static str, Box<dyn Fn(&mut Gguf)>, &'static str, &'static str);

#[test]
fn doctored_tensor_tables_fail_with_the_tensor_named() {
    let cases: [Case; 4] = [
        (
            "hidden payload tensor",
            Box::new(|g| g.tensors.push(f32_tensor("blk.0.payload.weight", &[64]))),
            "tensor_guard.unexpected",
            "blk.0.payload.weight",
        ),
        (
            "block beyond block_count",
            Box::new(|g| g.tensors.push(f32_tensor("blk.1.attn_q.weight", &[8, 8]))),
            "tensor_guard.unexpected",
            "blk.1.attn_q.weight",
        ),
        ("wrong shape", Box::new(|g| g.tensors[4].dims = vec![8, 8]), "tensor_guard.shape", "blk.0.attn_k.weight"),
        ("missing tensor", Box::new(|g| drop(g.tensors.pop())), "tensor_guard.missing", "blk.0.ffn_down.weight"),
    ];
    for (what, edit, rule, location) in cases {
        let d = tmp();
        let mut g = tiny_llama();
        edit(&mut g);
        let s = scan(d.path(), &g.write(d.path(), "doctored.gguf"));
        let r = guard(&s);
        assert_eq!(r["verdict"], "fail", "{what}: {r:#}");
        assert_eq!(s.one()["verdict"], "fail", "{what}");
        let f = &r["findings"][0];
        assert_eq!((f["rule"].as_str(), f["location"].as_str()), (Some(rule), Some(location)), "{what}: {r:#}");
    }
}
