//! `airlock scan --format sarif`: one SARIF 2.1.0 log for all the models of a
//! scan, in the shape GitHub code scanning takes: a rule per finding rule
//! with its `security-severity`, a result per finding with its level, a file
//! location (line 1: a model has no lines) and a partial fingerprint, so an
//! upload of the next scan matches this one's alerts.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One scanned model: its report as `--format json` prints it, the path it
/// was scanned at, and the paths of its files inside it (empty for a single file).
pub struct Scanned {
    pub report: Value,
    pub path: String,
    pub files: Vec<String>,
    pub folder: bool,
}

/// SARIF's level and GitHub's security-severity (a number as a string: 9.0+
/// critical, 7.0+ high, 4.0+ medium, above 0 low) for an airlock severity;
/// an info finding is a note with no security rating.
fn level(severity: &str) -> (&'static str, Option<&'static str>) {
    match severity {
        "critical" => ("error", Some("9.5")),
        "high" => ("error", Some("8.0")),
        "medium" => ("warning", Some("5.5")),
        "low" => ("note", Some("3.0")),
        _ => ("note", None),
    }
}

fn rank(severity: &str) -> u8 {
    match severity {
        "critical" => 4,
        "high" => 3,
        "medium" => 2,
        "low" => 1,
        _ => 0,
    }
}

/// A URI reference for a path as given on the command line: every byte but
/// the unreserved ones and `/` percent-encoded.
fn uri(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The file a finding's location names (`path` or `path: detail`), as a
/// path to give SARIF, and the rest of the location.
fn file_of(m: &Scanned, location: &str) -> (String, Option<String>) {
    let named = m
        .files
        .iter()
        .filter(|f| location == f.as_str() || location.strip_prefix(f.as_str()).is_some_and(|r| r.starts_with(": ")))
        .max_by_key(|f| f.len());
    match named {
        Some(f) => {
            let rest = location[f.len()..].trim_start_matches(": ");
            let path = if m.folder { format!("{}/{f}", m.path.trim_end_matches('/')) } else { m.path.clone() };
            (path, (!rest.is_empty()).then(|| rest.to_string()))
        }
        None => (m.path.clone(), (!location.is_empty()).then(|| location.to_string())),
    }
}

struct Rule {
    id: String,
    worst: String,
    stage: String,
    example: String,
}

/// The SARIF log for `models`.
pub fn log(models: &[Scanned]) -> Value {
    let mut rules: Vec<Rule> = Vec::new();
    let mut results = Vec::new();
    let mut add =
        |rule: &str, severity: &str, stage: &str, message: String, m: &Scanned, location: &str, extra: Value| {
            let index = match rules.iter().position(|r| r.id == rule) {
                Some(i) => {
                    if rank(severity) > rank(&rules[i].worst) {
                        rules[i].worst = severity.to_string();
                    }
                    i
                }
                None => {
                    rules.push(Rule {
                        id: rule.to_string(),
                        worst: severity.to_string(),
                        stage: stage.to_string(),
                        example: message.clone(),
                    });
                    rules.len() - 1
                }
            };
            let (file, detail) = file_of(m, location);
            let model_sha = m.report["sha256"].as_str().unwrap_or("");
            let fingerprint = hex::encode(Sha256::digest(format!("{rule}\0{model_sha}\0{location}").as_bytes()));
            let mut result = json!({
                "ruleId": rule,
                "ruleIndex": index,
                "level": level(severity).0,
                "message": {"text": match &detail { Some(d) => format!("{message} ({d})"), None => message }},
                "locations": [{
                    "physicalLocation": {"artifactLocation": {"uri": uri(&file)}, "region": {"startLine": 1}},
                }],
                "partialFingerprints": {"airlockFinding/v1": fingerprint},
                "properties": {"stage": stage, "model": m.report["model"], "modelSha256": m.report["sha256"]},
            });
            if let Some(d) = detail {
                result["locations"][0]["logicalLocations"] = json!([{"name": d}]);
            }
            if let Value::Object(extra) = extra {
                let props = result["properties"].as_object_mut().expect("an object");
                props.extend(extra.into_iter().filter(|(_, v)| !v.is_null()));
            }
            results.push(result);
        };
    for m in models {
        let report = &m.report;
        if report["verdict"] == "error" {
            let reason = report["reason"].as_str().unwrap_or("the model could not be opened").to_string();
            add("airlock.open-error", "critical", "open", reason, m, "", json!({}));
            continue;
        }
        for stage in report["stages"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let name = stage["stage"].as_str().unwrap_or("?");
            let findings = stage["findings"].as_array().map(Vec::as_slice).unwrap_or_default();
            for f in findings {
                let extra = json!({"plugin": stage["plugin"], "offset": f["offset"], "confidence": f["confidence"]});
                add(
                    f["rule"].as_str().unwrap_or("airlock.finding"),
                    f["severity"].as_str().unwrap_or("info"),
                    name,
                    f["message"].as_str().unwrap_or("").to_string(),
                    m,
                    f["location"].as_str().unwrap_or(""),
                    extra,
                );
            }
            // A failed stage that names no finding is still a result.
            if stage["verdict"] == "fail" && findings.is_empty() {
                let summary = stage["summary"].as_str().unwrap_or("failed").to_string();
                add(
                    &format!("airlock.stage.{name}"),
                    "critical",
                    name,
                    summary,
                    m,
                    "",
                    json!({"plugin": stage["plugin"]}),
                );
            }
        }
    }
    let rules: Vec<Value> = rules
        .iter()
        .map(|r| {
            let (level, severity) = level(&r.worst);
            let mut properties = json!({"tags": ["security", "airlock", r.stage]});
            if let Some(s) = severity {
                properties["security-severity"] = json!(s);
            }
            json!({
                "id": r.id,
                "name": r.id,
                "shortDescription": {"text": format!("{} ({})", r.id, r.stage)},
                "fullDescription": {"text": r.example},
                "defaultConfiguration": {"level": level},
                "help": {"text": "airlock's docs/stages/ pages list every rule and the test that shows it."},
                "properties": properties,
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "airlock",
                "version": env!("CARGO_PKG_VERSION"),
                "semanticVersion": env!("CARGO_PKG_VERSION"),
                "rules": rules,
            }},
            "results": results,
            "columnKind": "utf16CodeUnits",
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_map_to_the_file_they_name() {
        let folder = Scanned {
            report: json!({}),
            path: "models/minilm".into(),
            files: vec!["config.json".into(), "1_Pooling/config.json".into()],
            folder: true,
        };
        assert_eq!(
            file_of(&folder, "config.json: auto_map"),
            ("models/minilm/config.json".into(), Some("auto_map".into()))
        );
        assert_eq!(file_of(&folder, "1_Pooling/config.json"), ("models/minilm/1_Pooling/config.json".into(), None));
        assert_eq!(file_of(&folder, "7"), ("models/minilm".into(), Some("7".into())));
        let file =
            Scanned { report: json!({}), path: "m v.gguf".into(), files: vec!["m v.gguf".into()], folder: false };
        assert_eq!(file_of(&file, "m v.gguf: tokenizer.chat_template").0, "m v.gguf");
        assert_eq!(uri("m v.gguf"), "m%20v.gguf");
    }
}
