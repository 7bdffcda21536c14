//! Stage 3: compare the host's native sha256 of the model against its pin.

use airlock_sdk::{Finding, Model, Report, Severity, Stage, StageInfo, context};

struct IntegrityCheck;

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Stage for IntegrityCheck {
    fn describe() -> StageInfo {
        StageInfo::new(
            "integrity_check",
            env!("CARGO_PKG_VERSION"),
            "compares the model's sha256 (computed natively by the host) against its pin",
        )
    }

    fn run(model: &Model) -> Report {
        let files = model.files();
        let pin = context::pinned_sha256();
        if model.kind() != "file" || files.len() != 1 {
            if pin.is_some() {
                return Report::fail("a single sha256 pin cannot apply to a folder model; pin each file");
            }
            let pins: std::collections::BTreeMap<String, String> = context::pinned_files().into_iter().collect();
            let mut findings = Vec::new();
            let mut bad = |rule: &str, at: &str, message: String| {
                findings.push(Finding::new(rule, Severity::Critical, message).at(at.to_string()));
            };
            for f in &files {
                let path = f.path();
                let actual = match f.sha256() {
                    Ok(h) => h,
                    Err(e) => return Report::fail(format!("{path}: cannot hash: {e}")),
                };
                match pins.get(&path) {
                    _ if pins.is_empty() => {}
                    None => bad("integrity.unpinned-file", &path, format!("{path} is not among the folder's pins")),
                    Some(expected) if !expected.eq_ignore_ascii_case(&actual) => bad(
                        "integrity.sha256-mismatch",
                        &path,
                        format!("{path}: sha256 mismatch\nexpected: {expected}\nactual:   {actual}"),
                    ),
                    Some(_) => {}
                }
            }
            for path in pins.keys() {
                if !files.iter().any(|f| f.path() == *path) {
                    bad("integrity.missing-file", path, format!("{path} is pinned but missing from the folder"));
                }
            }
            if pins.is_empty() {
                return Report::pass(format!(
                    "{} files hashed; no pins yet, they would be recorded on promotion",
                    files.len()
                ));
            }
            if let Some(first) = findings.first() {
                let reason = format!("{} file(s) differ from their pins; first: {}", findings.len(), first.message);
                return Report::fail(reason).findings(findings);
            }
            return Report::pass(format!("{} files match their pins", files.len()));
        }
        let file = &files[0];
        let actual = match file.sha256() {
            Ok(h) => h,
            Err(e) => return Report::fail(format!("cannot hash {}: {e}", file.path())),
        };
        let short = &actual[..actual.len().min(8)];
        match pin {
            None => Report::pass(format!("sha256={short}...; no pin yet, it would be recorded on promotion"))
                .details(serde_json::json!({ "sha256": actual, "pinned": false })),
            Some(expected) if !is_sha256_hex(expected.trim()) => {
                Report::fail(format!("the pin is not a sha256 (64 hex digits): {expected:?}"))
            }
            Some(expected) if expected.trim().eq_ignore_ascii_case(&actual) => {
                Report::pass(format!("sha256={short}..., matches its pin"))
                    .details(serde_json::json!({ "sha256": actual, "pinned": true }))
            }
            Some(expected) => {
                let expected = expected.trim().to_ascii_lowercase();
                Report::fail("sha256 mismatch")
                    .finding(
                        Finding::new(
                            "integrity.sha256-mismatch",
                            Severity::Critical,
                            format!("expected: {expected}\nactual:   {actual}"),
                        )
                        .at(file.path()),
                    )
                    .details(serde_json::json!({ "expected": expected, "actual": actual }))
            }
        }
    }
}

airlock_sdk::export_stage!(IntegrityCheck);
