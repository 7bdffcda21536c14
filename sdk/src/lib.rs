//! # airlock-sdk
//!
//! Write a quarantine stage for [airlock](../README.md) as a WebAssembly
//! component. Implement [`Stage`], then export it with [`export_stage!`]:
//!
//! ```ignore
//! use airlock_sdk::{Model, Report, Stage, StageInfo};
//!
//! struct NoEmptyModels;
//!
//! impl Stage for NoEmptyModels {
//!     fn describe() -> StageInfo {
//!         StageInfo::new("no_empty", env!("CARGO_PKG_VERSION"), "rejects models without tensors")
//!     }
//!     fn run(model: &Model) -> Report {
//!         let tensors: usize = model.files().iter().map(|f| f.tensors().len()).sum();
//!         if tensors == 0 { Report::fail("the model has no tensors") } else { Report::pass(format!("{tensors} tensors")) }
//!     }
//! }
//!
//! airlock_sdk::export_stage!(NoEmptyModels);
//! ```
//!
//! Build it for `wasm32-wasip2` as a `cdylib`. The component imports only the
//! interfaces it calls: calling [`inference::generate`] or [`sidecars::sidecar`]
//! makes it need the `inference` or `sidecars` grant in the policy.
//!
//! The generated wit-bindgen module is private; this crate re-exports the
//! types a stage needs.

pub mod pickle;
pub mod quant;
mod read;
mod report;
pub mod tensor;

#[doc(hidden)]
pub mod __private {
    pub mod wit {
        wit_bindgen::generate!({
            path: "../wit/stage.wit",
            world: "stage",
            pub_export_macro: true,
            export_macro_name: "__export_stage_world",
            default_bindings_module: "airlock_sdk::__private::wit",
            generate_all,
        });
    }
    pub use wit::__export_stage_world;
    pub use wit::Guest;

    /// The `split-stage` world: the same imports, mapped onto `wit`'s types so
    /// a split stage's `run` takes the same `Model`, plus the `split` export.
    pub mod wit_split {
        wit_bindgen::generate!({
            path: "../wit/stage.wit",
            world: "split-stage",
            pub_export_macro: true,
            export_macro_name: "__export_split_stage_world",
            default_bindings_module: "airlock_sdk::__private::wit_split",
            with: {
                "airlock:stage/types@0.2.0": crate::__private::wit::airlock::stage::types,
                "airlock:stage/artifact@0.2.0": crate::__private::wit::airlock::stage::artifact,
                "airlock:stage/context@0.2.0": crate::__private::wit::airlock::stage::context,
                "airlock:stage/log@0.2.0": crate::__private::wit::airlock::stage::log,
                "airlock:stage/sidecars@0.2.0": crate::__private::wit::airlock::stage::sidecars,
                "airlock:stage/inference@0.2.0": crate::__private::wit::airlock::stage::inference,
            },
        });
    }
    pub use wit_split::__export_split_stage_world;
    pub use wit_split::Guest as SplitStageGuest;
    pub use wit_split::exports::airlock::stage::split::Guest as SplitGuest;
}

use __private::wit::airlock::stage as w;

pub use read::ChunkReader;
pub use w::artifact::{
    Dtype, File, Format, MetaKind, MetaValue, Model, PackedTexts, ParseError, Surrounding, TensorInfo,
};
pub use w::context::RecordedOrigin;
pub use w::types::{Finding, Report, Severity, StageInfo, Verdict};

/// A quarantine stage. Implement both functions; the host calls `describe`
/// for logs and `run` once per model, each time in a fresh instance.
pub trait Stage {
    /// Name, version and a one-line description of this stage.
    fn describe() -> StageInfo;
    /// Scan one model and return the verdict. Never panics on purpose: a
    /// panic traps the instance and the host fails the stage with the message.
    fn run(model: &Model) -> Report;
}

/// Exports a type implementing [`Stage`] as this component's stage.
#[macro_export]
macro_rules! export_stage {
    ($stage:ty) => {
        #[doc(hidden)]
        struct __AirlockStageExport;
        impl $crate::__private::Guest for __AirlockStageExport {
            fn describe() -> $crate::StageInfo {
                <$stage as $crate::Stage>::describe()
            }
            fn run(model: &$crate::Model) -> $crate::Report {
                <$stage as $crate::Stage>::run(model)
            }
        }
        $crate::__private::__export_stage_world!(__AirlockStageExport with_types_in $crate::__private::wit);
    };
}

/// A stage that may be split over the files of a model: the host can call
/// `part` on each shard (on different machines) and `join` on what they
/// returned, instead of `run` on the whole model. `join` must then give the
/// report `run` gives. The host still calls `run` when it does not split.
pub trait Split: Stage {
    /// Reads the files `model` shows and returns, as JSON, what `join` needs.
    fn part(model: &Model) -> Result<String, String>;
    /// The report from every part's output, in the model's file order.
    fn join(parts: Vec<String>) -> Report;
}

/// Exports a type implementing [`Split`] (and so [`Stage`]) as this
/// component's stage, with the `split` export that consents to being split.
#[macro_export]
macro_rules! export_split_stage {
    ($stage:ty) => {
        #[doc(hidden)]
        struct __AirlockStageExport;
        impl $crate::__private::SplitStageGuest for __AirlockStageExport {
            fn describe() -> $crate::StageInfo {
                <$stage as $crate::Stage>::describe()
            }
            fn run(model: &$crate::Model) -> $crate::Report {
                <$stage as $crate::Stage>::run(model)
            }
        }
        impl $crate::__private::SplitGuest for __AirlockStageExport {
            fn part(model: &$crate::Model) -> Result<String, String> {
                <$stage as $crate::Split>::part(model)
            }
            fn join(parts: Vec<String>) -> $crate::Report {
                <$stage as $crate::Split>::join(parts)
            }
        }
        $crate::__private::__export_split_stage_world!(__AirlockStageExport with_types_in $crate::__private::wit_split);
    };
}

/// What the host tells the stage about this run.
pub mod context {
    use super::w::context as c;
    pub use c::RecordedOrigin;

    /// This plugin's `config` section from the policy, as raw JSON text.
    pub fn config_json() -> String {
        c::config()
    }

    /// This plugin's config, deserialised. The error names what did not fit.
    pub fn config<T: serde::de::DeserializeOwned>() -> Result<T, String> {
        let text = c::config();
        serde_json::from_str(&text).map_err(|e| format!("invalid plugin config: {e}"))
    }

    /// The model's recorded origin, if any.
    pub fn origin() -> Option<RecordedOrigin> {
        c::origin()
    }

    /// The pinned sha256 for this model, if any.
    pub fn pinned_sha256() -> Option<String> {
        c::pinned_sha256()
    }

    /// A folder model's per-file pins, (path, sha256); empty when it has none.
    pub fn pinned_files() -> Vec<(String, String)> {
        c::pinned_files()
    }

    /// Bytes this run may still read before the host stops it (the policy's
    /// `max_total_read_mib`, by default four passes over the model). Needs a
    /// host that serves `airlock:stage@0.2`.
    pub fn read_budget() -> u64 {
        c::read_budget()
    }
}

/// Log lines that the host attaches to this stage's span.
pub mod log {
    use super::w::log as l;
    pub use l::Level;

    pub fn log(level: Level, message: &str) {
        l::log(level, message)
    }
    pub fn debug(message: &str) {
        l::log(Level::Debug, message)
    }
    pub fn info(message: &str) {
        l::log(Level::Info, message)
    }
    pub fn warn(message: &str) {
        l::log(Level::Warn, message)
    }
}

/// Capability `sidecars`: files that travel beside the model (signatures).
pub mod sidecars {
    /// The bytes of `<model file><suffix>` if it exists. Needs the `sidecars` grant.
    pub fn sidecar(suffix: &str) -> Result<Option<Vec<u8>>, String> {
        super::w::sidecars::sidecar(suffix)
    }
}

/// Capability `inference`: run the model under scan. Needs the `inference` grant.
pub mod inference {
    pub use super::w::inference::Options;

    /// Generate a completion with the model under scan.
    pub fn generate(prompt: &str, opts: Options) -> Result<String, String> {
        super::w::inference::generate(prompt, &opts)
    }
}

impl Format {
    /// The policy name of this format (`gguf`, `safetensors`, `pytorch-zip`,
    /// ...): the WIT enum's own case name, read from the contract this SDK
    /// was generated from, so no second table can drift from it.
    pub fn name(self) -> &'static str {
        static CASES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
        let cases = CASES.get_or_init(|| wit_enum_cases(include_str!("../../wit/stage.wit"), "format"));
        cases.get(self as usize).copied().unwrap_or("unknown")
    }
}

/// The case names of `enum <name> { ... }` in WIT text, in order.
fn wit_enum_cases(wit: &'static str, name: &str) -> Vec<&'static str> {
    let Some(start) = wit.find(&format!("enum {name} {{")) else { return Vec::new() };
    let body = &wit[start..];
    let body = &body[body.find('{').map_or(0, |i| i + 1)..body.find('}').unwrap_or(body.len())];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .map(|l| l.trim_end_matches(','))
        .collect()
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at offset {}, {}: {}", self.offset, self.field, self.message)
    }
}

impl PackedTexts {
    /// The strings, in order. The host packs valid UTF-8; a malformed entry
    /// (which a correct host never sends) comes back empty rather than panicking.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        // One check of all the bytes, then each string is a slice whose ends
        // must fall on character boundaries. The check's cost is in the bytes
        // (about 9 ms for gemma's vocabulary), so this saves little time; it
        // keeps one code path for the whole vocabulary.
        let whole = std::str::from_utf8(&self.bytes).ok();
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let end = (end as usize).min(self.bytes.len());
            let s = match whole {
                Some(all) => all.get(start..end),
                None => self.bytes.get(start..end).and_then(|b| std::str::from_utf8(b).ok()),
            };
            start = end;
            s.unwrap_or("")
        })
    }

    /// The strings' raw bytes, in order, with no UTF-8 check: for scanners
    /// that match bytes (a vocabulary's UTF-8 check costs about 9 ms of a
    /// gemma scan). Ends are read as in [`PackedTexts::iter`]: one past the
    /// buffer is cut at its end, one before the previous end gives an empty entry.
    pub fn iter_bytes(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let end = (end as usize).min(self.bytes.len());
            let b = self.bytes.get(start..end).unwrap_or(&[]);
            start = end;
            b
        })
    }

    /// How many strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

impl StageInfo {
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        StageInfo { name: name.into(), version: version.into(), description: description.into() }
    }
}

#[cfg(test)]
mod format_name_tests {
    use super::Format;

    #[test]
    fn names_are_the_wit_cases() {
        assert_eq!(Format::Gguf.name(), "gguf");
        assert_eq!(Format::PytorchZip.name(), "pytorch-zip");
        assert_eq!(Format::Unknown.name(), "unknown");
        assert_eq!(
            super::wit_enum_cases(include_str!("../../wit/stage.wit"), "format").len(),
            Format::Unknown as usize + 1
        );
    }
}

#[cfg(test)]
mod packed_texts_tests {
    use super::PackedTexts;

    #[test]
    fn strings_come_back_and_a_split_character_comes_back_empty() {
        let words = ["a", "", "héllo", "▁the", "<0x0A>"];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for w in words {
            bytes.extend_from_slice(w.as_bytes());
            ends.push(bytes.len() as u32);
        }
        let p = PackedTexts { bytes: bytes.clone(), ends: ends.clone() };
        assert_eq!(p.iter().collect::<Vec<_>>(), words);

        // An end inside "é" (two bytes) cannot be sliced there.
        let mut bad = ends.clone();
        bad[2] = 3; // "h" + half of "é"
        let p = PackedTexts { bytes: bytes.clone(), ends: bad };
        assert_eq!(p.iter().nth(2), Some(""));

        // Invalid bytes overall: each string is checked on its own.
        let mut broken = bytes;
        broken.push(0xff);
        ends.push(broken.len() as u32);
        let p = PackedTexts { bytes: broken, ends };
        let got: Vec<_> = p.iter().collect();
        assert_eq!(&got[..5], &words);
        assert_eq!(got[5], "");
    }

    #[test]
    fn raw_bytes_come_back_unchecked_and_bad_ends_give_empty_entries() {
        let p = PackedTexts { bytes: b"ab\xffcd".to_vec(), ends: vec![2, 3, 5, 4, 99] };
        let got: Vec<&[u8]> = p.iter_bytes().collect();
        // 4 is before the previous end (empty); 99 is cut at the end, after 4.
        assert_eq!(got, [&b"ab"[..], b"\xff", b"cd", b"", b"d"]);
    }
}
