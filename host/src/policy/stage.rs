//! The seven stages and the built-in plugins.

use serde::{Deserialize, Serialize};

/// The seven stages, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    SourcePolicy,
    FormatGate,
    IntegrityCheck,
    ProvenanceCheck,
    StaticScan,
    BehavioralTest,
    DiffusionDeepScan,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::SourcePolicy,
        Stage::FormatGate,
        Stage::IntegrityCheck,
        Stage::ProvenanceCheck,
        Stage::StaticScan,
        Stage::BehavioralTest,
        Stage::DiffusionDeepScan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::SourcePolicy => "source_policy",
            Stage::FormatGate => "format_gate",
            Stage::IntegrityCheck => "integrity_check",
            Stage::ProvenanceCheck => "provenance_check",
            Stage::StaticScan => "static_scan",
            Stage::BehavioralTest => "behavioral_test",
            Stage::DiffusionDeepScan => "diffusion_deep_scan",
        }
    }

    /// 1-based position in the chain.
    pub fn number(self) -> usize {
        Stage::ALL.iter().position(|s| *s == self).expect("in ALL") + 1
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in plugins this build ships.
pub use airlock_wasm_toolchain::BUILTINS;
