//! A stage that calls `inference::generate`, so its component imports the
//! `inference` capability. Used to test that an ungranted import is refused
//! at load time.

use airlock_sdk::inference::{self, Options};
use airlock_sdk::{Model, Report, Stage, StageInfo};

struct WantsInference;

impl Stage for WantsInference {
    fn describe() -> StageInfo {
        StageInfo::new("wants_inference", env!("CARGO_PKG_VERSION"), "imports the inference capability")
    }
    fn run(_model: &Model) -> Report {
        match inference::generate("Say hello.", Options { max_tokens: 8, temperature: 0.0, system: None }) {
            Ok(text) => Report::pass(format!("generated {} bytes", text.len())),
            Err(e) => Report::fail(format!("inference failed: {e}")),
        }
    }
}

airlock_sdk::export_stage!(WantsInference);
