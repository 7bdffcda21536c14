//! The policy digest: one sha256 over everything that decides a verdict, so
//! a watcher and its workers can tell whether they would judge a model alike.
//!
//! It is the RFC 8785 (JCS) canonical JSON of a view made for it: each
//! enabled stage's chain (the component's sha256, grants, formats, limits
//! and config), the trusted keys by the sha256 of their bytes, the allowlist,
//! the thresholds, the folder limits, the inference settings, and this
//! airlock's version. Paths are not in it (a key or a plugin read from
//! another folder on another machine is the same key or plugin), nor is
//! anything that does not change a verdict: where the policy was read from,
//! the registry it announces to, the NATS credentials, the worker binary.

use serde_json::{Value, json};
use sha2::Digest;

use super::Scanner;
use crate::plugin::Limits;
use crate::policy::{PluginSource, Policy};

fn limits(l: &Limits) -> Value {
    json!({
        "memory_bytes": l.memory_bytes,
        "timeout_ms": l.timeout.as_millis() as u64,
        "max_read_bytes": l.max_read_bytes,
        "max_report_bytes": l.max_report_bytes,
        "max_log_bytes": l.max_log_bytes,
        "max_value_bytes": l.max_value_bytes,
        "max_total_read": l.max_total_read,
    })
}

/// The view of `policy` (as `scanner` loaded its components) that is hashed.
pub fn verdict_view(policy: &Policy, scanner: &Scanner) -> Value {
    let components = scanner.components();
    let chain: serde_json::Map<String, Value> = policy
        .chain
        .iter()
        .map(|(stage, entries)| {
            let loaded: Vec<&(crate::policy::Stage, String, String)> =
                components.iter().filter(|(s, _, _)| s == stage).collect();
            let entries: Vec<Value> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    json!({
                        "builtin": match &e.source { PluginSource::Builtin(n) => Some(n.clone()), PluginSource::Path { .. } => None },
                        "component_sha256": loaded.get(i).map(|c| c.2.clone()),
                        "grants": e.grants,
                        "formats": e.formats,
                        "limits": limits(&e.limits),
                        "config": e.config,
                    })
                })
                .collect();
            (stage.name().to_string(), Value::Array(entries))
        })
        .collect();
    let keys: Vec<Value> = policy
        .trusted_keys
        .iter()
        .map(|k| json!({"kind": k.kind.name(), "name": k.name, "sha256": hex::encode(sha2::Sha256::digest(&k.bytes))}))
        .collect();
    let mut inference = serde_json::to_value(&policy.inference).unwrap_or(Value::Null);
    if let Some(o) = inference.as_object_mut() {
        o.remove("worker");
    }
    json!({
        "airlock": env!("CARGO_PKG_VERSION"),
        "require_source": policy.require_source,
        "smoke_test_max_score": policy.smoke_test_max_score,
        "smoke_test_max_critical": policy.smoke_test_max_critical,
        "require_signature": policy.require_signature,
        "allowlist": policy.allowlist,
        "trusted_keys": keys,
        "inference": inference,
        "folder_limits": policy.folder_limits,
        "chain": chain,
    })
}

/// The lowercase hex sha256 of the canonical (RFC 8785) view.
pub fn policy_digest(policy: &Policy, scanner: &Scanner) -> String {
    // A view JCS cannot write (a NaN threshold) still gets a digest, one no
    // other policy shares by accident.
    let canonical = serde_jcs::to_vec(&verdict_view(policy, scanner))
        .unwrap_or_else(|e| format!("not canonical: {e}: {:?}", verdict_view(policy, scanner)).into_bytes());
    hex::encode(sha2::Sha256::digest(canonical))
}
