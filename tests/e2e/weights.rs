//! Stage 5, weights: every float element and every quant block scale is
//! checked for NaN/Inf, with no sampling.

use crate::harness::*;

fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn model(tensors: Vec<Tensor>) -> Vec<u8> {
    Gguf { tensors, ..Gguf::default() }.bytes()
}

fn scan_weights(bytes: &[u8]) -> Scan {
    let d = tmp();
    let p = write(d.path(), "m.gguf", bytes);
    scan_json(&p, &[])
}

#[track_caller]
fn rejected_at(s: &Scan, rule: &str, tensor: &str, needle: &str) {
    assert_rejected(s, "static_scan", tensor);
    let st = s.stage("static_scan");
    let all: Vec<&serde_json::Value> =
        s.one()["stages"].as_array().unwrap().iter().filter(|x| x["stage"] == "static_scan").collect();
    let f = all
        .iter()
        .flat_map(|x| x["findings"].as_array().unwrap())
        .find(|f| f["rule"] == rule)
        .unwrap_or_else(|| panic!("no {rule} in {st:#}"));
    assert_eq!(f["severity"], "critical");
    assert!(f["location"].as_str().unwrap().ends_with(tensor), "{f}");
    assert!(f["message"].as_str().unwrap().contains(needle), "{f}");
}

#[test]
fn one_nan_deep_in_a_large_f32_tensor() {
    let n = 1_200_000;
    let data = f32s((0..n).map(|i| if i == 1_000_003 { f32::NAN } else { 0.5 }));
    let t = Tensor {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![n],
        ty: F32,
        nbytes: None,
        offset: None,
        data: Some(data),
    };
    let s = scan_weights(&model(vec![t]));
    rejected_at(&s, "weights.non-finite", "blk.0.ffn_up.weight", "at element 1000003");
}

#[test]
fn a_q8_0_block_with_an_inf_scale() {
    let blocks = 64;
    let mut data = Vec::new();
    for b in 0..blocks {
        let d: u16 = if b == 41 { 0x7c00 } else { 0x3c00 }; // +Inf, else 1.0
        data.extend(d.to_le_bytes());
        data.extend([1u8; 32]);
    }
    let t = Tensor {
        name: "blk.1.attn_q.weight".into(),
        dims: vec![32 * blocks],
        ty: 8,
        nbytes: None,
        offset: None,
        data: Some(data),
    };
    let s = scan_weights(&model(vec![t]));
    rejected_at(&s, "weights.scale-non-finite", "blk.1.attn_q.weight", "Q8_0 block scale at block 41");
}

#[test]
fn half_precision_infinities_are_found() {
    let mut data: Vec<u8> = [0x3c00u16; 64].iter().flat_map(|h| h.to_le_bytes()).collect();
    data[2 * 17..2 * 18].copy_from_slice(&0xfc00u16.to_le_bytes()); // -Inf
    let t = Tensor {
        name: "output_norm.weight".into(),
        dims: vec![64],
        ty: 1,
        nbytes: None,
        offset: None,
        data: Some(data),
    };
    rejected_at(&scan_weights(&model(vec![t])), "weights.non-finite", "output_norm.weight", "F16 value at element 17");
}

#[test]
fn finite_weights_pass_and_unknown_types_are_reported_not_passed_silently() {
    let f = Tensor {
        name: "a".into(),
        dims: vec![256],
        ty: F32,
        nbytes: None,
        offset: None,
        data: Some(f32s((0..256).map(|i| i as f32))),
    };
    // IQ2_XXS: a type this plugin does not analyse yet.
    let iq =
        Tensor { name: "b".into(), dims: vec![256], ty: 16, nbytes: Some(66), offset: None, data: Some(vec![0; 66]) };
    let s = scan_weights(&model(vec![f, iq]));
    assert_eq!(s.code, 0, "{}", s.stdout);
    let st = &s.one()["stages"].as_array().unwrap().iter().find(|x| x["plugin"] == "builtin:weights").unwrap().clone();
    assert!(st["summary"].as_str().unwrap().contains("1 of unanalysed types"), "{st}");
    assert_eq!(st["findings"][0]["rule"], "weights.not-analysed");
    assert_eq!(st["findings"][0]["severity"], "info");
}

#[test]
fn real_models_are_finite_and_unremarkable() {
    for m in [&models().gemma, &models().minilm] {
        let s = scan_json(m, &[]);
        assert_passed(&s);
        let st =
            s.one()["stages"].as_array().unwrap().iter().rfind(|x| x["plugin"] == "builtin:weights").unwrap().clone();
        assert_eq!(st["verdict"], "pass", "{st}");
        assert!(st["findings"].as_array().unwrap().iter().all(|f| f["severity"] == "info"), "{st}");
        assert!(st["summary"].as_str().unwrap().starts_with("score=0.00, no anomalies"), "{st}");
    }
}

/// The SIMD paths (Q8_0, Q5_0, Q4_0) give exact statistics on blocks whose values are known:
/// half the elements 7.0 and half 1.0 (scale 1.0), so mean 4, std 3, kurtosis 1.
#[test]
fn simd_statistics_are_exact_on_known_blocks() {
    let one = 0x3c00u16.to_le_bytes(); // f16 1.0
    let blocks = 4096;
    let mut q8 = Vec::new();
    let mut q4 = Vec::new();
    let mut q5 = Vec::new();
    for _ in 0..blocks {
        q8.extend(one);
        q8.extend([7u8; 16].iter().chain([1u8; 16].iter()));
        q4.extend(one);
        q4.extend([0x9fu8; 16]); // low nibble 15 → 7, high nibble 9 → 1
        q5.extend(one);
        q5.extend(0xffff_ffffu32.to_le_bytes()); // fifth bit set everywhere: 16 + n - 16
        q5.extend([0x17u8; 16]); // low nibble 7 → 7, high nibble 1 → 1
    }
    let t = |name: &str, ty: u32, data: Vec<u8>| Tensor {
        name: name.into(),
        dims: vec![32 * blocks],
        ty,
        nbytes: None,
        offset: None,
        data: Some(data),
    };
    // The extreme code: a block of -128 gives Σq⁴ = 2^31 in each SIMD lane,
    // one past i32. Half such blocks, half zero blocks: mean -64, std 64, kurtosis 1.
    let mut extreme = Vec::new();
    for b in 0..blocks {
        extreme.extend(one);
        extreme.extend([if b % 2 == 0 { 0x80u8 } else { 0 }; 32]);
    }
    // Saturation: 3 codes in 8 sit at an end (127, -127, -128); 126 and -126 do not.
    let mut ends = Vec::new();
    for _ in 0..blocks {
        ends.extend(one);
        ends.extend([127i8, -127, -128, 126, -126, 0, 1, -1].repeat(4).iter().map(|&c| c as u8));
    }
    // K-quants, 256 elements a block. Q4_K: d 1, dmin 0, every 6-bit scale 1
    // (packed as llama.cpp does), nibbles 15 and 9: mean 12, std 3, kurtosis 1.
    // Q6_K: d 1, scales 1, nibbles 15 and 1 with high bits 2 and 1: codes
    // 47 and 17, so values +15 and -15 (centred: f32 sums of an off-centre
    // pair lose the kurtosis to cancellation, whatever the dequantiser).
    let (mut q4k, mut q6k) = (Vec::new(), Vec::new());
    for _ in 0..blocks / 8 {
        q4k.extend(one);
        q4k.extend([0u8; 2]);
        q4k.extend([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
        q4k.extend([0x9fu8; 128]);
        q6k.extend([0x1fu8; 128]);
        q6k.extend([0b01_01_10_10u8; 64]);
        q6k.extend([1u8; 16]);
        q6k.extend(one);
    }
    let s = scan_weights(&model(vec![
        t("a.q8_0", 8, q8),
        t("b.q4_0", 2, q4),
        t("c.q5_0", 6, q5),
        t("d.q8_0", 8, extreme),
        t("e.q4_k", 12, q4k),
        t("f.q6_k", 14, q6k),
        t("g.q8_0", 8, ends),
    ]));
    let w = s.one()["stages"].as_array().unwrap().iter().find(|x| x["plugin"] == "builtin:weights").unwrap().clone();
    for name in ["a.q8_0", "b.q4_0", "c.q5_0"] {
        let st = &w["details"]["tensors"][name];
        let close = |key: &str, want: f64| {
            let got = st[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-6, "{name} {key}: {got} != {want}; {st}");
        };
        close("mean", 4.0);
        close("std", 3.0);
        close("kurtosis", 1.0);
        close("sparsity", 0.0);
    }
    for (name, mean, std, sparsity) in
        [("d.q8_0", -64.0, 64.0, 0.5), ("e.q4_k", 12.0, 3.0, 0.0), ("f.q6_k", 0.0, 15.0, 0.0)]
    {
        let st = &w["details"]["tensors"][name];
        for (key, want) in [("mean", mean), ("std", std), ("kurtosis", 1.0), ("sparsity", sparsity)] {
            let got = st[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-6, "{name} {key}: {got} != {want}; {st}");
        }
    }
    for (name, want) in [("a.q8_0", 0.0), ("b.q4_0", 0.0), ("c.q5_0", 0.0), ("d.q8_0", 0.5), ("g.q8_0", 0.375)] {
        let got = w["details"]["tensors"][name]["saturated"].as_f64().unwrap();
        assert_eq!(got, want, "{name} saturated: {}", w["details"]["tensors"][name]);
    }
}
