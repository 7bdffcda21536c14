//! `airlock scan --format sarif`: a log the OASIS SARIF 2.1.0 schema accepts,
//! in the shape GitHub code scanning reads (rules with security-severity,
//! results with ruleId, level, a file location and partial fingerprints).

use serde_json::{Value, json};

use crate::harness::*;

const EVIL: &[u8] = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";

fn sarif(args: &[&str]) -> (i32, Value) {
    let d = tmp();
    let out = airlock(d.path()).arg("scan").args(["--format", "sarif"]).args(args).output().unwrap();
    let log = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), log)
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(&models().sarif_schema).unwrap();
    // One pattern of the schema (for `run.language`, which airlock does not
    // write) has a stray `]` that ECMAScript regexes take as a literal and
    // Rust's regex engine refuses; it is written as ECMAScript reads it.
    let stray = r#""^[a-zA-Z]{2}|^[a-zA-Z]{2}-[a-zA-Z]{2}]?$""#;
    assert!(text.contains(stray), "the schema changed; revisit this patch");
    let text = text.replace(stray, r#""^[a-zA-Z]{2}|^[a-zA-Z]{2}-[a-zA-Z]{2}\\]?$""#);
    let schema: Value = serde_json::from_str(&text).unwrap();
    jsonschema::draft4::new(&schema).unwrap()
}

#[test]
fn a_scan_of_good_bad_and_missing_models_is_a_valid_sarif_log() {
    let d = tmp();
    let evil = write(d.path(), "evil.gguf", EVIL);
    let mut g = Gguf::default();
    g.kvs.push(("tokenizer.chat_template".into(), kv_str("{{ ''.__class__.__mro__[1].__subclasses__() }}")));
    let ssti = g.write(d.path(), "ssti.gguf");
    let folder = d.path().join("minilm");
    std::fs::create_dir_all(&folder).unwrap();
    for e in std::fs::read_dir(&models().minilm_folder).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), folder.join(e.file_name())).unwrap();
        }
    }
    let config = folder.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    v["auto_map"] = json!({"AutoModel": "modeling.M"});
    std::fs::write(&config, v.to_string()).unwrap();
    let missing = d.path().join("missing.gguf");
    let paths: Vec<&str> =
        [&evil, &ssti, &folder, &models().gemma, &missing].iter().map(|p| p.to_str().unwrap()).collect();
    let (code, log) = sarif(&paths);
    assert_eq!(code, 2, "a model that cannot be opened is exit 2, in SARIF too");

    let validator = validator();
    let errors: Vec<String> = validator.iter_errors(&log).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "the log breaks the SARIF 2.1.0 schema:\n{}", errors.join("\n"));

    assert_eq!(log["version"], "2.1.0");
    let run = &log["runs"][0];
    assert_eq!(run["tool"]["driver"]["name"], "airlock");
    let rules = run["tool"]["driver"]["rules"].as_array().unwrap();
    let results = run["results"].as_array().unwrap();
    for r in results {
        let rule = &rules[r["ruleIndex"].as_u64().unwrap() as usize];
        assert_eq!(rule["id"], r["ruleId"], "{r}");
        assert!(["error", "warning", "note"].contains(&r["level"].as_str().unwrap()), "{r}");
        assert_eq!(r["locations"][0]["physicalLocation"]["region"]["startLine"], 1, "{r}");
        assert_eq!(r["partialFingerprints"]["airlockFinding/v1"].as_str().unwrap().len(), 64, "{r}");
    }
    let by_rule = |id: &str| -> Vec<&Value> { results.iter().filter(|r| r["ruleId"] == id).collect() };
    let rule = |id: &str| rules.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no rule {id}"));
    // The pickle: denied at the format gate, and its import named.
    let denied = by_rule("format.denied");
    assert_eq!(denied[0]["level"], "error");
    assert!(
        denied[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            .as_str()
            .unwrap()
            .ends_with("evil.gguf")
    );
    assert_eq!(rule("pickle.dangerous-import")["properties"]["security-severity"], "9.5");
    // The template: its metadata key is the logical location.
    let ssti = &by_rule("template.dunder-access")[0];
    assert_eq!(ssti["locations"][0]["logicalLocations"][0]["name"], "tokenizer.chat_template");
    // The folder: the finding points at the file inside it.
    let gadget = &by_rule("meta.gadget.auto-map")[0];
    let uri = gadget["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap();
    assert!(uri.ends_with("/minilm/config.json"), "{uri}");
    // The missing model: an error result, not silence.
    assert_eq!(by_rule("airlock.open-error").len(), 1);
    // gemma is clean: nothing about it but notes.
    assert!(
        results.iter().filter(|r| r["properties"]["model"] == "gemma-3-270m-q4_k_m.gguf").all(|r| r["level"] == "note")
    );

    // The same scan again gives the same fingerprints, so an upload matches earlier alerts.
    let (_, again) = sarif(&paths);
    let prints = |l: &Value| -> Vec<Value> {
        l["runs"][0]["results"].as_array().unwrap().iter().map(|r| r["partialFingerprints"].clone()).collect()
    };
    assert_eq!(prints(&log), prints(&again));

    // The validator is real: a log without its version is refused.
    let mut broken = log.clone();
    broken.as_object_mut().unwrap().remove("version");
    assert!(!validator.is_valid(&broken));
}
