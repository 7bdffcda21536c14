use std::process::Command;

use crate::harness::*;

#[test]
fn gemma_gguf_passes_stages_1_to_3() {
    let m = models();
    let s = scan_text(&m.gemma, &[]);
    assert_eq!(s.code, 0, "{}\n{}", s.stdout, s.stderr);
    let want = [
        "[quarantine] Processing: gemma-3-270m-q4_k_m.gguf",
        "[quarantine] Stage 1/7: source_policy — checking origin...",
        "[quarantine] Stage 1/7: source_policy — PASS (no recorded origin; allowed by policy)",
        "[quarantine] Stage 2/7: format_gate — PASS (gguf)",
        "[quarantine] Stage 3/7: integrity_check — PASS (sha256=a5fd3b62...",
        "[quarantine] Stage 4/7: provenance_check — PASS (no signature; not required by policy)",
        "[quarantine] Stage 5/7: static_scan — PASS (metadata_gadgets: ",
        "[quarantine] Stage 5/7: static_scan — PASS (weights: score=0.00",
        "[quarantine] Stage 7/7: diffusion_deep_scan — SKIP (not a diffusion model",
    ];
    for line in want {
        assert!(s.stdout.lines().any(|l| l.starts_with(line)), "missing {line:?} in:\n{}", s.stdout);
    }
    assert!(!s.stdout.contains("behavioral_test — PASS"), "a stage that did not run printed PASS");
}

#[test]
fn gemma_gguf_json_report() {
    let s = scan_json(&models().gemma, &[]);
    assert_passed(&s);
    let o = s.one();
    assert_eq!(o["sha256"], "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818");
    assert_eq!(o["failed_stage"], serde_json::Value::Null);
    let st = s.stage("format_gate");
    assert_eq!(st["plugin"], "builtin:format_gate");
    assert_eq!(st["plugin_sha256"], sha256_file(&component("format_gate")));
    assert_eq!(st["plugin_info"]["name"], "format_gate");
    assert_eq!(st["plugin_info"]["version"], "0.1.0");
    assert!(st["elapsed_ms"].is_u64());
    // Every stage-5 plugin runs and finds nothing above info on a real model.
    assert_static_scan_clean(&s, 6);
    assert_eq!(s.stage("behavioral_test")["verdict"], "skip");
}

#[test]
fn gemma_gguf_passes_with_pread_reads() {
    assert_passed(&scan_json(&models().gemma, &["--pread"]));
}

#[test]
fn minilm_safetensors_passes_stages_1_to_3() {
    let s = scan_json(&models().minilm, &[]);
    assert_passed(&s);
    assert_eq!(s.one()["sha256"], "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db");
    assert_eq!(s.stage("format_gate")["summary"], "safetensors");
    assert_static_scan_clean(&s, 6);
}

#[test]
fn both_models_in_one_invocation() {
    let m = models();
    let root = tmp();
    let out = airlock(root.path()).args(["scan", "--format", "json"]).arg(&m.gemma).arg(&m.minilm).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

/// gemma requantised by llama.cpp's own `llama-quantize` into every file type
/// it makes (the i-quants with an importance matrix, computed here from this
/// repository's README): each one is a real model of that type, and each must
/// pass the whole static scan with nothing above info. Low-bit codes look far
/// more random than Q4_K's; Q3_K has the least byte structure measured
/// (README, entropy.random-bytes). Each file is deleted once scanned.
#[test]
fn gemma_requantised_into_every_llama_cpp_type_passes_the_static_scan() {
    let m = models();
    let d = tmp();
    let imatrix = d.path().join("imatrix.gguf");
    let out = Command::new(&m.llama_imatrix)
        .arg("-m")
        .arg(&m.gemma)
        .arg("-f")
        .arg(repo().join("README.md"))
        .arg("-o")
        .arg(&imatrix)
        .args(["-c", "256", "--chunks", "8", "-t", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "llama-imatrix failed:\n{}", String::from_utf8_lossy(&out.stderr));
    // (file type, a tensor type it must contain): llama.cpp picks types per
    // tensor, and gemma's 640-wide rows rule out k-quants for most tensors.
    let types = [
        ("F16", "F16"),
        ("BF16", "BF16"),
        ("Q8_0", "Q8_0"),
        ("Q5_1", "Q5_1"),
        ("Q5_0", "Q5_0"),
        ("Q4_1", "Q4_1"),
        ("Q4_0", "Q4_0"),
        ("Q6_K", "Q6_K"),
        ("Q5_K_M", "Q5_K"),
        ("Q4_K_S", "Q4_K"),
        ("Q3_K_S", "Q3_K"),
        ("IQ4_NL", "IQ4_NL"),
        ("IQ4_XS", "IQ4_XS"),
        ("IQ3_S", "IQ3_S"),
        ("IQ3_XXS", "IQ3_XXS"),
        ("IQ2_XS", "IQ2_XS"),
        ("IQ2_XXS", "IQ2_XXS"),
        ("IQ1_M", "IQ1_M"),
        ("IQ1_S", "Q2_K"),
        ("TQ2_0", "TQ2_0"),
        ("TQ1_0", "TQ1_0"),
    ];
    for (ftype, tensor_type) in types {
        let file = d.path().join(format!("gemma-{ftype}.gguf"));
        let out = Command::new(&m.llama_quantize)
            .args(["--allow-requantize", "--imatrix"])
            .arg(&imatrix)
            .arg(&m.gemma)
            .arg(&file)
            .args([ftype, "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "llama-quantize {ftype} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let s = scan_json(&file, &[]);
        assert_passed(&s);
        assert_static_scan_clean(&s, 6);
        let weights = plugin_result(&s, "weights");
        assert!(weights["summary"].as_str().unwrap().starts_with("score=0.00"), "{ftype}: {weights:#}");
        let seen = weights["details"]["ms_by_type"].as_object().unwrap();
        assert!(seen.contains_key(tensor_type), "{ftype}: no {tensor_type} tensor in {:?}", seen.keys());
        std::fs::remove_file(&file).unwrap();
    }
}
