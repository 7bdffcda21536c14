//! Stage 1: is the model's recorded origin on the source allowlist?
//!
//! URLs are compared parsed, never as string prefixes: https only, no
//! userinfo, the same host and port, and a path prefix that ends on a segment
//! boundary. `https://huggingface.co.evil.example/` and
//! `https://huggingface.co@evil.example/` never match `https://huggingface.co/`.

use airlock_sdk::{Finding, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;
use url::Url;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    require_source: bool,
    #[serde(default)]
    allowlist: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    url_prefix: String,
}

/// Parses a URL and refuses anything that is not a plain https URL.
fn strict_https(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|e| format!("not a valid URL ({e})"))?;
    if url.scheme() != "https" {
        return Err(format!("scheme \"{}\" is not https", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("it carries userinfo (user@ or user:pass@)".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    Ok(url)
}

/// True when `origin` lies under `prefix`: same host and port, and the
/// prefix's path is a whole-segment prefix of the origin's path.
fn matches(origin: &Url, prefix: &Url) -> bool {
    if origin.host_str() != prefix.host_str() || origin.port_or_known_default() != prefix.port_or_known_default() {
        return false;
    }
    let want = prefix.path();
    let have = origin.path();
    if want.ends_with('/') {
        return have.starts_with(want);
    }
    have == want || (have.starts_with(want) && have.as_bytes().get(want.len()) == Some(&b'/'))
}

struct SourcePolicy;

impl Stage for SourcePolicy {
    fn describe() -> StageInfo {
        StageInfo::new(
            "source_policy",
            env!("CARGO_PKG_VERSION"),
            "checks the model's recorded origin against the source allowlist",
        )
    }

    fn run(_model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let Some(origin) = context::origin() else {
            return if config.require_source {
                Report::fail("no recorded origin, and quarantine.require_source is true")
            } else {
                Report::pass("no recorded origin; allowed by policy")
            };
        };
        let url = match strict_https(&origin.url) {
            Ok(u) => u,
            Err(why) => {
                return Report::fail(format!("origin {:?} (from {}) refused: {why}", origin.url, origin.source))
                    .finding(Finding::new("source.origin-invalid", Severity::Critical, why));
            }
        };
        for entry in &config.allowlist {
            let prefix = match strict_https(&entry.url_prefix) {
                Ok(p) => p,
                Err(why) => {
                    return Report::fail(format!(
                        "allowlist entry {:?} has an unusable url_prefix {:?}: {why}",
                        entry.name, entry.url_prefix
                    ));
                }
            };
            if matches(&url, &prefix) {
                return Report::pass(format!("origin {url} matches allowlist entry {:?}", entry.name)).details(
                    serde_json::json!({ "origin": url.as_str(), "source": origin.source, "entry": entry.name }),
                );
            }
        }
        Report::fail(format!("origin {url} (from {}) is not on the source allowlist", origin.source)).finding(
            Finding::new("source.not-allowlisted", Severity::Critical, format!("no allowlist entry covers {url}")),
        )
    }
}

airlock_sdk::export_stage!(SourcePolicy);
