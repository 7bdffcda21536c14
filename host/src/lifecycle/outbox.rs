//! Announcing promotions to an HTTP registry (`POST {url}/v1/model/promote`).
//!
//! Each promotion's announcement is first written to `state/outbox/` (as part
//! of finishing the promotion, so a crash cannot lose it), then sent. A failed
//! send stays in the outbox, is logged, and is retried: the model stays
//! promoted locally and nothing is silently dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::Registry;

pub fn dir(state: &Path) -> PathBuf {
    state.join("outbox")
}

/// Queues one announcement.
pub fn enqueue(state: &Path, name: &str, body: &serde_json::Value) -> std::io::Result<()> {
    let d = dir(state);
    fs::create_dir_all(&d)?;
    super::root::write_atomic(
        &d.join(format!("{name}.json")),
        &serde_json::to_vec(body).map_err(std::io::Error::other)?,
    )
}

/// How many announcements are waiting.
pub fn pending(state: &Path) -> usize {
    fs::read_dir(dir(state))
        .map(|d| d.filter_map(|e| e.ok()).filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count())
        .unwrap_or(0)
}

fn post(registry: &Registry, body: &[u8]) -> Result<(), String> {
    let url = format!("{}/v1/model/promote", registry.url);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .http_status_as_error(true)
        .build()
        .into();
    let mut req = agent.post(&url).header("Content-Type", "application/json");
    if let Some(file) = &registry.token_file {
        let token =
            fs::read_to_string(file).map_err(|e| format!("cannot read the token file {}: {e}", file.display()))?;
        req = req.header("Authorization", format!("Bearer {}", token.trim()));
    }
    req.send(body).map(|_| ()).map_err(|e| format!("POST {url}: {e}"))
}

/// Sends every queued announcement; returns how many are still waiting.
pub fn flush(state: &Path, registry: &Registry) -> usize {
    let Ok(entries) = fs::read_dir(dir(state)) else { return 0 };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    paths.sort();
    let mut left = 0;
    for p in paths {
        let result = fs::read(&p).map_err(|e| e.to_string()).and_then(|body| post(registry, &body));
        match result {
            Ok(()) => {
                tracing::info!("announced {} to the registry", p.display());
                let _ = fs::remove_file(&p);
            }
            Err(e) => {
                left += 1;
                tracing::warn!(
                    "registry announcement {} failed: {e}; it stays queued and will be retried",
                    p.display()
                );
            }
        }
    }
    left
}
