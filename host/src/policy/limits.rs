//! A plugin's resource limits as the policy writes them (`defaults.limits`,
//! a chain entry's `limits`), with the ranges each may take.

use std::time::Duration;

use serde::Deserialize;

use crate::plugin::Limits;

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsFile {
    pub(super) memory_mib: Option<u64>,
    pub(super) timeout_secs: Option<f64>,
    pub(super) max_read_mib: Option<u32>,
    pub(super) max_report_kib: Option<usize>,
    pub(super) max_log_kib: Option<usize>,
    pub(super) max_value_mib: Option<usize>,
    pub(super) max_total_read_mib: Option<u64>,
}

pub(super) fn apply_limits(base: &Limits, f: &LimitsFile) -> Result<Limits, String> {
    let mut l = base.clone();
    if let Some(m) = f.memory_mib {
        if !(1..=16 * 1024).contains(&m) {
            return Err(format!("memory_mib {m} is out of range (1..=16384)"));
        }
        l.memory_bytes = m << 20;
    }
    if let Some(t) = f.timeout_secs {
        if !(t > 0.0 && t <= 24.0 * 3600.0) {
            return Err(format!("timeout_secs {t} is out of range (0..=86400]"));
        }
        l.timeout = Duration::from_secs_f64(t);
    }
    if let Some(r) = f.max_read_mib {
        if !(1..=1024).contains(&r) {
            return Err(format!("max_read_mib {r} is out of range (1..=1024)"));
        }
        l.max_read_bytes = r << 20;
    }
    if let Some(r) = f.max_report_kib {
        l.max_report_bytes = r.checked_mul(1024).ok_or("max_report_kib is too large")?;
    }
    if let Some(r) = f.max_log_kib {
        l.max_log_bytes = r.checked_mul(1024).ok_or("max_log_kib is too large")?;
    }
    if let Some(r) = f.max_total_read_mib {
        if r == 0 {
            return Err("max_total_read_mib must be at least 1".into());
        }
        l.max_total_read = Some(r.checked_mul(1 << 20).ok_or("max_total_read_mib is too large")?);
    }
    if let Some(r) = f.max_value_mib {
        l.max_value_bytes = r.checked_mul(1 << 20).ok_or("max_value_mib is too large")?;
    }
    Ok(l)
}
