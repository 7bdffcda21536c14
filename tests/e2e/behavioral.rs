//! Stage 6 without an inference worker yet: the stage applies only to GGUF
//! language models, and it fails closed when inference cannot run. The
//! grading itself is unit-tested in plugins/behavioral (recorded responses).

use crate::harness::*;

fn enabled(dir: &std::path::Path) -> std::path::PathBuf {
    policy_dir(dir, |t| t.replacen("behavioral_test: false", "behavioral_test: true", 1))
}

fn llm() -> Gguf {
    let mut g = Gguf::default();
    g.kvs.push(("tokenizer.ggml.model".into(), kv_str("llama")));
    g
}

#[test]
fn without_an_inference_backend_the_stage_fails_never_passes() {
    let d = tmp();
    let m = llm().write(d.path(), "m.gguf");
    let s = scan_json(&m, &["--policy", enabled(d.path()).to_str().unwrap()]);
    assert_rejected(&s, "behavioral_test", "inference failed at prompt jb-01 (1 of 50)");
    assert!(s.one()["reason"].as_str().unwrap().contains("no inference backend"), "{}", s.one());
}

#[test]
fn models_that_are_not_gguf_language_models_are_skipped_with_the_reason() {
    let d = tmp();
    let pol = enabled(d.path());
    let cases = [
        (Gguf::default().write(d.path(), "no-tokenizer.gguf"), "has no tokenizer"),
        (
            {
                let mut g = llm();
                g.kvs[0] = ("general.architecture".into(), kv_str("bert"));
                g.write(d.path(), "bert.gguf")
            },
            "architecture \"bert\" does not generate text",
        ),
        (
            write(
                d.path(),
                "m.safetensors",
                &safetensors(r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#, &[0x3f; 24]),
            ),
            "convert the model to GGUF",
        ),
    ];
    for (model, needle) in cases {
        let s = scan_json(&model, &["--policy", pol.to_str().unwrap()]);
        assert_passed(&s);
        let st = s.stage("behavioral_test");
        assert_eq!(st["verdict"], "skip", "{st}");
        assert!(st["summary"].as_str().unwrap().contains(needle), "{st}");
        assert!(st["summary"].as_str().unwrap().starts_with("not an LLM in a supported format"), "{st}");
    }
}

#[test]
fn the_stage_needs_the_inference_grant() {
    let d = tmp();
    let m = llm().write(d.path(), "m.gguf");
    let pol = policy_dir(d.path(), |t| {
        t.replacen("behavioral_test: false", "behavioral_test: true", 1).replacen("      grants: [inference]\n", "", 1)
    });
    let s = scan_json(&m, &["--policy", pol.to_str().unwrap()]);
    assert_rejected(&s, "behavioral_test", "airlock:stage/inference");
    assert!(s.one()["reason"].as_str().unwrap().contains("not granted"), "{}", s.one());
}

#[test]
fn the_suite_and_thresholds_come_from_the_policy_not_the_entry() {
    let d = tmp();
    let m = llm().write(d.path(), "m.gguf");
    let pol = policy_dir(d.path(), |t| {
        t.replacen("behavioral_test: false", "behavioral_test: true", 1).replacen(
            "        max_tokens: 64\n",
            "        max_tokens: 64\n        max_score: 0.9\n",
            1,
        )
    });
    let s = scan_json(&m, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 2, "{}{}", s.stdout, s.stderr);
    assert!(s.stderr.contains("config.max_score") && s.stderr.contains("smoke_test_max_score"), "{}", s.stderr);
    let pol = policy_dir(&d.path().join("b"), |t| {
        t.replacen("behavioral_test: false", "behavioral_test: true", 1).replacen(
            "        max_tokens: 64\n",
            "        max_tokens: 64\n        suite: missing.yaml\n",
            1,
        )
    });
    let s = scan_json(&m, &["--policy", pol.to_str().unwrap()]);
    assert_eq!(s.code, 2, "{}{}", s.stdout, s.stderr);
    assert!(s.stderr.contains("config.suite") && s.stderr.contains("missing.yaml"), "{}", s.stderr);
}
