//! `policy.yaml` and `sources.allowlist.yaml` as written: every key they
//! may hold, and nothing else (unknown keys are errors). The loader in
//! `mod.rs` checks values and turns these into a [`super::Policy`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::limits::LimitsFile;
use super::{KeyKind, Stage};
use crate::plugin::Grant;

/// A YAML mapping that refuses a key written twice. Plain maps keep the last
/// value, so a second `static_scan:` appended to a policy would silently
/// replace the first chain; for a policy that is a hole, not a convenience.
pub(super) struct UniqueMap<K, V>(pub(super) BTreeMap<K, V>);

impl<K, V> Default for UniqueMap<K, V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: Deserialize<'de> + Ord + std::fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K, V> serde::de::Visitor<'de> for Visit<K, V>
        where
            K: Deserialize<'de> + Ord + std::fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = UniqueMap<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping with unique keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<K, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("{k} is written twice")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub(super) quarantine: QuarantineFile,
    #[serde(default)]
    pub(super) defaults: DefaultsFile,
    #[serde(default)]
    pub(super) chain: UniqueMap<Stage, Vec<EntryFile>>,
    #[serde(default)]
    pub(super) registry: Option<RegistryFile>,
    #[serde(default)]
    pub(super) provenance: ProvenanceFile,
    #[serde(default)]
    pub(super) inference: crate::inference::InferenceConfig,
    #[serde(default)]
    pub(super) folders: crate::artifact::FolderLimits,
    #[serde(default)]
    pub(super) nats: Option<NatsFile>,
    #[serde(default)]
    pub(super) scale_out: ScaleOutFile,
}

/// `scale_out:`: the keys that authenticate workers' results.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ScaleOutFile {
    pub(super) signing_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) trusted_workers: Vec<String>,
}

/// `scale_out:` as loaded: a worker signs each result it stores with its
/// nkey, and a dispatching watcher accepts only results signed by a key it
/// lists (red team D8).
#[derive(Clone, Debug, Default)]
pub struct ScaleOutKeys {
    /// The worker's nkey seed file (`airlock worker-key FILE` makes one);
    /// when absent, a worker that logs in with `nats.nkey_file` signs with that.
    pub signing_key_file: Option<PathBuf>,
    /// The public nkeys (`U...`) whose results the watcher, and a worker
    /// reading the parts of a split scan, accept.
    pub trusted_workers: Vec<String>,
}

/// `nats:`: how `airlock worker` and `airlock watch --dispatch` log in to the
/// NATS server: a user and a password file, or an nkey seed file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NatsFile {
    pub(super) user: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) nkey_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ProvenanceFile {
    #[serde(default)]
    pub(super) require_signature: bool,
    #[serde(default)]
    pub(super) trusted_keys: Vec<TrustedKeyFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrustedKeyFile {
    pub(super) kind: KeyKind,
    pub(super) path: PathBuf,
    pub(super) name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegistryFile {
    pub(super) url: String,
    pub(super) token_file: Option<PathBuf>,
}

/// The credentials for the NATS server (scale-out), read when connecting.
#[derive(Clone, Debug)]
pub enum NatsAuth {
    UserPassword { user: String, password_file: PathBuf },
    Nkey { seed_file: PathBuf },
}

/// An HTTP registry that promotions are announced to.
#[derive(Clone, Debug)]
pub struct Registry {
    /// Base URL; promotions go to `{url}/v1/model/promote`.
    pub url: String,
    /// A file holding the bearer token, read at send time.
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuarantineFile {
    #[serde(default)]
    pub(super) require_source: bool,
    #[serde(default = "default_max_score")]
    pub(super) smoke_test_max_score: f64,
    #[serde(default = "default_max_critical")]
    pub(super) smoke_test_max_critical: u32,
    pub(super) stages: StagesFile,
}

pub(super) fn default_max_score() -> f64 {
    0.3
}
pub(super) fn default_max_critical() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StagesFile {
    pub(super) source_policy: bool,
    pub(super) format_gate: bool,
    pub(super) integrity_check: bool,
    pub(super) provenance_check: bool,
    pub(super) static_scan: bool,
    pub(super) behavioral_test: bool,
    pub(super) diffusion_deep_scan: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DefaultsFile {
    #[serde(default)]
    pub(super) limits: LimitsFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EntryFile {
    pub(super) plugin: String,
    pub(super) sha256: Option<String>,
    #[serde(default)]
    pub(super) grants: Vec<Grant>,
    /// Run only on models of these formats (`gguf`, `safetensors`, ..., `folder`).
    #[serde(default)]
    pub(super) formats: Option<Vec<String>>,
    #[serde(default)]
    pub(super) limits: LimitsFile,
    #[serde(default)]
    pub(super) config: Option<serde_norway::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AllowlistFile {
    #[serde(default)]
    pub(super) models: Vec<AllowEntry>,
}

/// One source allowlist entry: `{name, url_prefix}`.
#[derive(Deserialize, Clone, Debug, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    pub name: String,
    pub url_prefix: String,
}

/// The 1-based line of a key path like `chain.static_scan[0].sha256` in YAML
/// text: each segment is looked for as `name:` (or the n-th `- ` item) after
/// the previous one. Good enough to point a person at the right line; `None`
/// when the key is not written out (a missing key).
pub(super) fn line_of(text: &str, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = 0;
    for seg in key.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((n, i)) => (n, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let found = (at..lines.len()).find(|&i| {
            let l = lines[i].trim_start().trim_start_matches("- ");
            l.starts_with(&format!("{name}:")) || l.starts_with(&format!("{name} :"))
        })?;
        at = found;
        if let Some(n) = index {
            at = (at + 1..lines.len()).filter(|&i| lines[i].trim_start().starts_with("- ")).nth(n)?;
        }
    }
    Some(at + 1)
}
