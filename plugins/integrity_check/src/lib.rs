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
            let mut hashed = 0;
            for f in &files {
                if let Err(e) = f.sha256() {
                    return Report::fail(format!("{}: cannot hash: {e}", f.path()));
                }
                hashed += 1;
            }
            return Report::pass(format!("{hashed} files hashed; no pins yet, they would be recorded on promotion"));
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
