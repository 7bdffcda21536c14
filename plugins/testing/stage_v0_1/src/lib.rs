//! A stage built against `airlock:stage@0.1.0` (the archived WIT), not the
//! current SDK. The compatibility test checks that the host still loads and
//! runs it: it reads the first bytes, the tensor table and a metadata value,
//! and reports them, so every kind of 0.1 value crosses the boundary.

wit_bindgen::generate!({
    path: "../../../wit/archive/0.1.0/stage.wit",
    world: "stage",
    generate_all,
});

use airlock::stage::artifact::MetaValue;
use airlock::stage::types::{Finding, Severity, Verdict};

struct OldStage;

impl Guest for OldStage {
    fn describe() -> StageInfo {
        StageInfo {
            name: "stage_v0_1".into(),
            version: "0.1.0".into(),
            description: "a stage built against airlock:stage@0.1.0".into(),
        }
    }

    fn run(model: &Model) -> Report {
        let files = model.files();
        let Some(file) = files.first() else {
            return report(Verdict::Fail("no files".into()), "no files".into(), Vec::new());
        };
        let head = match file.read(0, 4) {
            Ok(b) => b,
            Err(e) => return report(Verdict::Fail(e.clone()), e, Vec::new()),
        };
        let tensors = file.tensors();
        let arch = match file.metadata("general.architecture") {
            Some(MetaValue::Text(t)) => t,
            _ => "none".into(),
        };
        let findings = tensors
            .iter()
            .take(3)
            .map(|t| Finding {
                rule: "v0_1.tensor".into(),
                severity: Severity::Info,
                message: format!("{} {:?} {:?}", t.name, t.dtype, t.shape),
                location: Some(t.name.clone()),
                offset: Some(t.offset),
                confidence: None,
            })
            .collect();
        let summary = format!(
            "0.1 plugin: magic {:?}, {} tensors, architecture {arch}, format {:?}",
            String::from_utf8_lossy(&head),
            tensors.len(),
            file.format()
        );
        report(Verdict::Pass, summary, findings)
    }
}

fn report(verdict: Verdict, summary: String, findings: Vec<Finding>) -> Report {
    Report { verdict, summary, findings, score: None, details: None }
}

export!(OldStage);
