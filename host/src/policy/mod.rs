//! The policy: which stages run, which plugin runs each stage, what each is
//! granted, its limits and its config; the source allowlist; the pins.
//!
//! `policy.yaml` has the `quarantine` keys (`quarantine.stages.<stage>`,
//! `require_source`, `smoke_test_max_score`, `smoke_test_max_critical`) and
//! adds `defaults.limits` and `chain`. Unknown keys are errors. Every error
//! names the file, the line and the key.
//!
//! Layout by concern: `stage` (the seven stages), `file` (the YAML as
//! written), `limits` (resource limits and their ranges), `keys` (trusted
//! signing keys), `pins` (the one place `models.lock.yaml` is read and
//! written); this module loads and checks a policy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::plugin::{Grant, Limits};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {}{key}: {message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
    Invalid { file: String, line: Option<usize>, key: String, message: String },
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
}

mod file;
mod keys;
mod limits;
mod pins;
mod stage;
// Every `*File` struct is the YAML's shape, used only by the loader below.
use file::*;
pub use file::{AllowEntry, NatsAuth, Registry, ScaleOutKeys};
use keys::load_key;
pub use keys::{KeyKind, TrustedKey};
use limits::apply_limits;
pub use pins::{Pin, load_pins, record_pin};
pub use stage::{BUILTINS, Stage};

// ---- the loaded policy ----

/// Where a plugin's component comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    /// `builtin:<name>`, installed with the binary.
    Builtin(String),
    /// A component file with its pinned sha256.
    Path { path: PathBuf, sha256: String },
}

impl PluginSource {
    /// How the policy names it.
    pub fn label(&self) -> String {
        match self {
            PluginSource::Builtin(n) => format!("builtin:{n}"),
            PluginSource::Path { path, .. } => path.display().to_string(),
        }
    }
}

/// One plugin in a stage's chain.
#[derive(Clone, Debug)]
pub struct ChainEntry {
    pub source: PluginSource,
    pub grants: Vec<Grant>,
    /// The model formats this entry runs on; `None`: every model.
    pub formats: Option<Vec<String>>,
    pub limits: Limits,
    /// The plugin's config as a JSON object.
    pub config: serde_json::Value,
}

/// A loaded, validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Where it was loaded from (for messages).
    pub origin: String,
    pub require_source: bool,
    pub smoke_test_max_score: f64,
    pub smoke_test_max_critical: u32,
    /// Enabled stages with their chains; stages absent here are disabled.
    pub chain: BTreeMap<Stage, Vec<ChainEntry>>,
    pub allowlist: Vec<AllowEntry>,
    pub registry: Option<Registry>,
    /// `provenance.require_signature`.
    pub require_signature: bool,
    /// `provenance.trusted_keys`, read and parsed.
    pub trusted_keys: Vec<TrustedKey>,
    /// `inference`: the backend for plugins granted `inference`.
    pub inference: crate::inference::InferenceConfig,
    /// `folders`: limits on walking a folder model.
    pub folder_limits: crate::artifact::FolderLimits,
    /// `nats`: credentials for the scale-out server, if it needs them.
    pub nats: Option<NatsAuth>,
    /// `scale_out`: the keys that sign and check workers' results. Not part
    /// of the policy digest: each worker has its own key.
    pub scale_out: ScaleOutKeys,
}

impl Policy {
    pub fn enabled(&self, stage: Stage) -> Option<&[ChainEntry]> {
        self.chain.get(&stage).map(Vec::as_slice)
    }
}

/// The policy files shipped in the repo, compiled in as the fallback default.
pub const DEFAULT_POLICY: &str = include_str!("../../../policy/policy.yaml");
pub const DEFAULT_ALLOWLIST: &str = include_str!("../../../policy/sources.allowlist.yaml");
/// The behavioral stage's prompt suite, used unless an entry names its own `suite` file.
pub const DEFAULT_SUITE: &str = include_str!("../../../policy/prompts/suite.yaml");

/// Reads a prompt suite (YAML, `prompts: [...]`) and returns its prompt list as JSON.
/// The prompts themselves are validated by the plugin, which owns their shape.
fn load_suite(file: &str, text: &str) -> Result<serde_json::Value, String> {
    let v: serde_norway::Value = serde_norway::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    let prompts = serde_json::to_value(&v).map_err(|e| format!("{file}: {e}"))?["prompts"].clone();
    match prompts.as_array() {
        Some(a) if !a.is_empty() => Ok(prompts),
        _ => Err(format!("{file}: no `prompts` list")),
    }
}

fn parse_yaml<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, PolicyError> {
    serde_norway::from_str(text).map_err(|e| {
        let at = e.location().map(|l| format!("line {}, column {}: ", l.line(), l.column())).unwrap_or_default();
        PolicyError::Parse { file: file.to_string(), message: format!("{at}{e}") }
    })
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Io { file: path.display().to_string(), source })
}

impl Policy {
    /// Loads `policy.yaml` and `sources.allowlist.yaml` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Policy, PolicyError> {
        let pf = dir.join("policy.yaml");
        let af = dir.join("sources.allowlist.yaml");
        let allow = if af.exists() { Some((af.display().to_string(), read(&af)?)) } else { None };
        Self::from_texts(
            &pf.display().to_string(),
            &read(&pf)?,
            allow.as_ref().map(|(f, t)| (f.as_str(), t.as_str())),
            Some(dir),
        )
    }

    /// The compiled-in default policy.
    pub fn builtin_default() -> Result<Policy, PolicyError> {
        Self::from_texts(
            "<built-in policy.yaml>",
            DEFAULT_POLICY,
            Some(("<built-in sources.allowlist.yaml>", DEFAULT_ALLOWLIST)),
            None,
        )
    }

    /// Parses and validates policy texts. Relative plugin paths resolve against `dir`.
    pub fn from_texts(
        policy_file: &str,
        policy_text: &str,
        allowlist: Option<(&str, &str)>,
        dir: Option<&Path>,
    ) -> Result<Policy, PolicyError> {
        let pf: PolicyFile = parse_yaml(policy_file, policy_text)?;
        let invalid = |key: String, message: String| PolicyError::Invalid {
            file: policy_file.to_string(),
            line: line_of(policy_text, &key),
            key,
            message,
        };

        let allowlist = match allowlist {
            Some((file, text)) => {
                let a: AllowlistFile = parse_yaml(file, text)?;
                for (i, e) in a.models.iter().enumerate() {
                    if let Err(why) = check_prefix(&e.url_prefix) {
                        let key = format!("models[{i}].url_prefix");
                        return Err(PolicyError::Invalid {
                            file: file.to_string(),
                            line: line_of(text, &key),
                            key,
                            message: format!("{:?} ({}): {why}", e.url_prefix, e.name),
                        });
                    }
                }
                a.models
            }
            None => Vec::new(),
        };

        let mut trusted_keys = Vec::new();
        for (i, k) in pf.provenance.trusted_keys.iter().enumerate() {
            let path = relative_to(dir, &k.path);
            if trusted_keys.iter().any(|t: &TrustedKey| t.name == k.name) {
                return Err(invalid(
                    format!("provenance.trusted_keys[{i}].name"),
                    format!("{:?} is used twice", k.name),
                ));
            }
            trusted_keys.push(load_key(k.kind, &k.name, &path).map_err(|m| {
                invalid(
                    format!("provenance.trusted_keys[{i}].path"),
                    format!("{} key {:?}: {m}", k.kind.name(), k.name),
                )
            })?);
        }
        let provenance = ProvenanceSettings { require_signature: pf.provenance.require_signature, keys: &trusted_keys };

        let defaults =
            apply_limits(&Limits::default(), &pf.defaults.limits).map_err(|m| invalid("defaults.limits".into(), m))?;
        let s = &pf.quarantine.stages;
        let enabled = [
            s.source_policy,
            s.format_gate,
            s.integrity_check,
            s.provenance_check,
            s.static_scan,
            s.behavioral_test,
            s.diffusion_deep_scan,
        ];
        let mut chain = BTreeMap::new();
        for (stage, on) in Stage::ALL.into_iter().zip(enabled) {
            let entries = pf.chain.0.get(&stage).map(Vec::as_slice).unwrap_or(&[]);
            if !on {
                continue;
            }
            if entries.is_empty() {
                return Err(invalid(
                    format!("chain.{}", stage.name()),
                    format!("quarantine.stages.{} is true but the chain names no plugin for it", stage.name()),
                ));
            }
            let mut out = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let key = format!("chain.{}[{i}]", stage.name());
                out.push(
                    entry(e, &defaults, dir, stage, &pf.quarantine, &allowlist, &provenance)
                        .map_err(|(k, m)| invalid(format!("{key}.{k}"), m))?,
                );
            }
            chain.insert(stage, out);
        }
        let registry = match pf.registry {
            None => None,
            Some(r) => {
                let url =
                    url::Url::parse(&r.url).map_err(|e| invalid("registry.url".into(), format!("{:?}: {e}", r.url)))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(invalid("registry.url".into(), "must be an http or https URL".into()));
                }
                let token_file = r.token_file.map(|p| relative_to(dir, &p));
                Some(Registry { url: r.url.trim_end_matches('/').to_string(), token_file })
            }
        };
        let nats = match pf.nats {
            None => None,
            Some(n) => Some(match (n.user, n.password_file, n.nkey_file) {
                (Some(user), Some(p), None) => NatsAuth::UserPassword { user, password_file: relative_to(dir, &p) },
                (None, None, Some(k)) => NatsAuth::Nkey { seed_file: relative_to(dir, &k) },
                _ => {
                    return Err(invalid(
                        "nats".into(),
                        "give either `user` and `password_file`, or `nkey_file`".into(),
                    ));
                }
            }),
        };
        for (i, k) in pf.scale_out.trusted_workers.iter().enumerate() {
            if !k.starts_with('U') || nkeys::KeyPair::from_public_key(k).is_err() {
                return Err(invalid(
                    format!("scale_out.trusted_workers[{i}]"),
                    format!("{k:?} is not a user nkey's public key (56 characters starting with U)"),
                ));
            }
        }
        let scale_out = ScaleOutKeys {
            signing_key_file: pf.scale_out.signing_key_file.map(|p| relative_to(dir, &p)),
            trusted_workers: pf.scale_out.trusted_workers,
        };
        let mut inference = pf.inference;
        inference.validate().map_err(|e| invalid("inference".into(), e))?;
        inference.worker = inference.worker.map(|p| relative_to(dir, &p));
        Ok(Policy {
            registry,
            origin: policy_file.to_string(),
            require_source: pf.quarantine.require_source,
            smoke_test_max_score: pf.quarantine.smoke_test_max_score,
            smoke_test_max_critical: pf.quarantine.smoke_test_max_critical,
            chain,
            allowlist,
            require_signature: pf.provenance.require_signature,
            trusted_keys,
            inference,
            folder_limits: pf.folders,
            nats,
            scale_out,
        })
    }
}

/// An allowlist prefix must itself be a plain https URL.
fn check_prefix(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a valid URL ({e})"))?;
    if url.scheme() != "https" {
        return Err("only https prefixes are allowed".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a prefix may not carry userinfo".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a prefix needs a host".into());
    }
    Ok(())
}

/// 64 hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What `provenance.*` hands to the provenance stage's plugins.
struct ProvenanceSettings<'a> {
    require_signature: bool,
    keys: &'a [TrustedKey],
}

/// A path from the policy: relative ones resolve against the policy's folder.
fn relative_to(dir: Option<&Path>, path: &Path) -> PathBuf {
    match dir {
        Some(d) if path.is_relative() => d.join(path),
        _ => path.to_path_buf(),
    }
}

/// Config keys the host fills in for a stage: an entry may not set them itself.
fn reserved(
    obj: &serde_json::Map<String, serde_json::Value>,
    keys: &[&str],
    set_by: &str,
) -> Result<(), (String, String)> {
    match keys.iter().find(|k| obj.contains_key(**k)) {
        Some(k) => Err((format!("config.{k}"), format!("is set by {set_by}"))),
        None => Ok(()),
    }
}

fn entry(
    e: &EntryFile,
    defaults: &Limits,
    dir: Option<&Path>,
    stage: Stage,
    q: &QuarantineFile,
    allowlist: &[AllowEntry],
    provenance: &ProvenanceSettings,
) -> Result<ChainEntry, (String, String)> {
    let source = if let Some(name) = e.plugin.strip_prefix("builtin:") {
        if !BUILTINS.contains(&name) {
            return Err((
                "plugin".into(),
                format!("unknown built-in plugin {name:?} (this build has: {})", BUILTINS.join(", ")),
            ));
        }
        if e.sha256.is_some() {
            return Err(("sha256".into(), "built-in plugins are not pinned; remove sha256".into()));
        }
        PluginSource::Builtin(name.to_string())
    } else {
        let Some(sha) = &e.sha256 else {
            return Err(("sha256".into(), format!("third-party plugin {:?} needs a sha256 pin", e.plugin)));
        };
        if !is_sha256(sha) {
            return Err(("sha256".into(), format!("{sha:?} is not 64 hex digits")));
        }
        let path = relative_to(dir, Path::new(&e.plugin));
        PluginSource::Path { path, sha256: sha.to_ascii_lowercase() }
    };
    let limits = apply_limits(defaults, &e.limits).map_err(|m| ("limits".to_string(), m))?;
    let mut config = match &e.config {
        None => serde_json::Value::Object(Default::default()),
        Some(v) => serde_json::to_value(v)
            .map_err(|err| ("config".to_string(), format!("cannot be expressed as JSON: {err}")))?,
    };
    let Some(obj) = config.as_object_mut() else {
        return Err(("config".into(), "must be a mapping".into()));
    };
    // The source stage gets the policy-level settings it enforces.
    if stage == Stage::SourcePolicy {
        reserved(obj, &["require_source", "allowlist"], "quarantine.require_source and sources.allowlist.yaml")?;
        obj.insert("require_source".into(), q.require_source.into());
        obj.insert("allowlist".into(), serde_json::to_value(allowlist).expect("plain strings"));
    }
    // The behavioral stage gets the prompt suite and quarantine.smoke_test_* thresholds.
    if stage == Stage::BehavioralTest {
        reserved(
            obj,
            &["prompts", "max_score", "max_critical"],
            "the suite file and quarantine.smoke_test_max_score/max_critical",
        )?;
        let prompts = match obj.remove("suite") {
            None => load_suite("<built-in prompts/suite.yaml>", DEFAULT_SUITE),
            Some(serde_json::Value::String(path)) => {
                let path = relative_to(dir, Path::new(&path));
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|t| load_suite(&path.display().to_string(), &t))
            }
            Some(_) => Err("must be a path to a YAML suite".into()),
        }
        .map_err(|m| ("config.suite".to_string(), m))?;
        obj.insert("prompts".into(), prompts);
        obj.insert("max_score".into(), q.smoke_test_max_score.into());
        obj.insert("max_critical".into(), q.smoke_test_max_critical.into());
    }
    // The provenance stage gets the trusted keys' bytes (plugins cannot read files).
    if stage == Stage::ProvenanceCheck {
        use base64::Engine;
        reserved(
            obj,
            &["require_signature", "trusted_keys"],
            "provenance.require_signature and provenance.trusted_keys",
        )?;
        obj.insert("require_signature".into(), provenance.require_signature.into());
        let keys: Vec<serde_json::Value> = provenance
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kind": k.kind.name(),
                    "name": k.name,
                    "data_base64": base64::engine::general_purpose::STANDARD.encode(&k.bytes),
                })
            })
            .collect();
        obj.insert("trusted_keys".into(), keys.into());
    }
    let formats = match &e.formats {
        None => None,
        Some(list) if list.is_empty() => {
            return Err((
                "formats".into(),
                "is empty, so the plugin would never run; remove it or name formats".into(),
            ));
        }
        Some(list) => {
            // The sniffed file formats, and `folder` for any folder model.
            let known = |f: &str| f == "folder" || crate::artifact::Format::NAMES.contains(&f);
            if let Some(bad) = list.iter().find(|f| !known(f)) {
                return Err((
                    "formats".into(),
                    format!("unknown format {bad:?} (known: {}, folder)", crate::artifact::Format::NAMES.join(", ")),
                ));
            }
            Some(list.clone())
        }
    };
    Ok(ChainEntry { source, grants: e.grants.clone(), formats, limits, config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_policy_loads() {
        let p = Policy::builtin_default().unwrap();
        assert!(p.enabled(Stage::FormatGate).is_some());
        assert!(p.enabled(Stage::BehavioralTest).is_none());
    }

    #[test]
    fn nats_credentials_are_a_password_or_an_nkey_never_both_or_half() {
        let with =
            |section: &str| Policy::from_texts("p.yaml", &format!("{DEFAULT_POLICY}\nnats:\n{section}"), None, None);
        let p = with("  user: airlock\n  password_file: /etc/airlock/nats.pass\n").unwrap();
        assert!(matches!(p.nats, Some(NatsAuth::UserPassword { ref user, .. }) if user == "airlock"));
        let p = with("  nkey_file: /etc/airlock/worker.nk\n").unwrap();
        assert!(matches!(p.nats, Some(NatsAuth::Nkey { .. })));
        for bad in ["  user: airlock\n", "  user: a\n  password_file: p\n  nkey_file: k\n", "  password_file: p\n"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("nats") && e.contains("nkey_file"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn scale_out_keys_must_be_user_public_keys() {
        let with = |section: &str| {
            Policy::from_texts("p.yaml", &format!("{DEFAULT_POLICY}\nscale_out:\n{section}"), None, None)
        };
        let user = nkeys::KeyPair::new_user().public_key();
        let p = with(&format!("  signing_key_file: worker.nk\n  trusted_workers: [{user}]\n")).unwrap();
        assert_eq!(p.scale_out.trusted_workers, vec![user.clone()]);
        assert!(p.scale_out.signing_key_file.is_some_and(|f| f.ends_with("worker.nk")));
        let server = nkeys::KeyPair::new_server().public_key();
        for bad in [server.as_str(), "UNOTAKEY", "not a key"] {
            let e = with(&format!("  trusted_workers: [{user}, \"{bad}\"]\n")).unwrap_err().to_string();
            assert!(e.contains("scale_out.trusted_workers[1]") && e.contains("not a user nkey"), "{bad}: {e}");
        }
        assert!(with("  trusted_worker: []\n").is_err(), "a misspelt key was accepted");
    }

    #[test]
    fn unknown_keys_name_the_file_line_and_key() {
        let text =
            DEFAULT_POLICY.replacen("  require_source: false", "  require_source: false\n  requier_source: true", 1);
        let e = Policy::from_texts("p.yaml", &text, None, None).unwrap_err().to_string();
        assert!(e.starts_with("p.yaml: line "), "{e}");
        assert!(e.contains("requier_source"), "{e}");
    }

    #[test]
    fn a_chain_written_twice_is_an_error_not_a_replacement() {
        let text = format!("{DEFAULT_POLICY}  static_scan:\n    - plugin: builtin:entropy\n");
        let e = Policy::from_texts("p.yaml", &text, None, None).unwrap_err().to_string();
        assert!(e.contains("static_scan is written twice"), "{e}");
    }

    #[test]
    fn enabled_stage_without_a_plugin_is_an_error() {
        let at = DEFAULT_POLICY.find("  diffusion_deep_scan:\n    #").expect("the default chain has stage 7");
        let text = &DEFAULT_POLICY[..at];
        let e = Policy::from_texts("p.yaml", text, None, None).unwrap_err().to_string();
        assert!(e.contains("chain.diffusion_deep_scan"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_line() {
        let text =
            DEFAULT_POLICY.replacen("    - plugin: builtin:integrity_check", "    - plugin: builtin:integrity_chek", 1);
        let e = Policy::from_texts("p.yaml", &text, None, None).unwrap_err().to_string();
        let line = text.lines().position(|l| l.contains("integrity_chek")).unwrap() + 1;
        assert!(e.starts_with(&format!("p.yaml: line {line}: chain.integrity_check[0].plugin:")), "{e}");
    }

    #[test]
    fn allowlist_prefixes_must_be_https() {
        let e = Policy::from_texts(
            "p.yaml",
            DEFAULT_POLICY,
            Some(("a.yaml", "models:\n  - name: x\n    url_prefix: http://example.com/\n")),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a.yaml") && e.contains("models[0].url_prefix"), "{e}");
    }
}
