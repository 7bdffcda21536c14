//! Stage 5 (static scan), weights: the gguf-guard checks, done without
//! sampling.
//!
//! * **Gates** (fail whatever the score): a NaN or Inf in any element of an
//!   F32/F16/BF16 tensor or in any block scale (`d`, `dmin`) of a quantised
//!   one; a tensor whose byte length does not match its shape and type.
//! * **Dequantisation** of F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and
//!   Q2_K…Q8_K, streamed in chunks of whole blocks. Other types are reported
//!   as not analysed (an info finding), never silently passed.
//! * **Per-tensor statistics**: mean, standard deviation, kurtosis, outlier
//!   ratio (share of 32-element groups 16× above the median group's
//!   amplitude) and sparsity.
//! * **Anomaly scoring**: a robust z-score (median/MAD) of log σ and log
//!   kurtosis across tensors of the same role in different layers, plus
//!   quant-block analysis (zero scales, saturated codes, repeated blocks,
//!   scale entropy). Critical +0.3, warning +0.1, info +0.02; above
//!   `static_fail_score` (default 0.5) the stage fails.

#[cfg(target_arch = "wasm32")]
mod kquant;
mod moments;
mod part;

use airlock_sdk::quant::Quant;
use airlock_sdk::tensor::{bf16_to_f32, block_layout, f16_to_f32};
use airlock_sdk::{
    ChunkReader, Dtype, File, Finding, Model, Report, Severity, Split, Stage, StageInfo, TensorInfo, context,
};
use moments::Moments;
use part::{Noted, PartStats};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// The score above which the stage fails.
    #[serde(default = "default_fail_score")]
    static_fail_score: f64,
}

fn default_fail_score() -> f64 {
    0.5
}

/// Below this many elements, statistics are too noisy to judge.
const MIN_ELEMS: u64 = 4096;
/// Robust z-scores: above WARN_Z a warning, above CRIT_Z critical. Measured on
/// 2026-11-26, the largest |z| of any real tensor was 11.8 on gemma-3-270m
/// (log kurtosis of blk.5.attn_k: kurtosis varies a lot between layers) and
/// 9.2 on MiniLM-L6. WARN_Z leaves twice that; a planted layer scores in the hundreds.
const WARN_Z: f64 = 25.0;
const CRIT_Z: f64 = 60.0;
/// Scale entropy (bits, top byte of the f16 scale) below which a tensor's
/// block scales have collapsed. The lowest real tensor measured 1.21 bits
/// (gemma); identical scales give 0.
const MIN_SCALE_ENTROPY: f64 = 0.25;
/// Fewest layers a role needs before its z-scores mean anything.
const MIN_ROLE: usize = 5;

/// What the quant-block analysis saw in one tensor.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BlockStats {
    blocks: u64,
    zero_scale: u64,
    saturated: u64,
    repeated: u64,
    /// Histogram of the top byte of `d` (sign, exponent, leading mantissa bits).
    /// A fixed-size array: indexed by a byte, so the hot loop needs no bounds check.
    #[serde(with = "part::sparse_hist::boxed")]
    scale_hist: Box<[u64; 256]>,
}

impl Default for BlockStats {
    fn default() -> Self {
        BlockStats { blocks: 0, zero_scale: 0, saturated: 0, repeated: 0, scale_hist: Box::new([0; 256]) }
    }
}

impl BlockStats {
    /// Records one block's scale: its top bits, and whether it is zero.
    pub(crate) fn note_scale(&mut self, bits: u32, zero: bool) {
        self.blocks += 1;
        self.zero_scale += u64::from(zero);
        self.scale_hist[((bits >> 8) & 0xff) as usize] += 1;
    }

    fn scale_entropy(&self) -> f64 {
        let n: u64 = self.scale_hist.iter().sum();
        if n == 0 {
            return 0.0;
        }
        self.scale_hist.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n as f64).map(|p| -p * p.log2()).sum()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorStats {
    location: String,
    name: String,
    role: String,
    elems: u64,
    m: Moments,
    q: Option<BlockStats>,
}

enum Outcome {
    Analysed(Box<TensorStats>),
    NonFinite { index: u64, what: &'static str },
    NotAnalysed(String),
}

const CHUNK_TARGET: u32 = 1 << 20;
/// Tensors whose statistics go into the report details (about 250 bytes each).
const MAX_LISTED: usize = 1000;

/// The role of a tensor: its name with layer numbers replaced, so
/// `blk.7.attn_q.weight` and `blk.8.attn_q.weight` compare with each other.
fn role(name: &str) -> String {
    name.split('.')
        .map(|p| if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) { "#" } else { p })
        .collect::<Vec<_>>()
        .join(".")
}

fn analyse(file: &File, t: &TensorInfo) -> Result<Outcome, String> {
    let location = format!("{}: {}", file.path(), t.name);
    let elems = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or("the shape overflows")?;
    let Some((per_block, block_bytes)) = block_layout(t.dtype) else {
        return Ok(Outcome::NotAnalysed(format!("type {} is not analysed", t.dtype_name)));
    };
    if elems % per_block != 0 || elems / per_block * block_bytes != t.length {
        return Err(format!(
            "structure: {} elements of {} need {} bytes, the header gives {}",
            elems,
            t.dtype_name,
            elems.div_ceil(per_block).saturating_mul(block_bytes),
            t.length
        ));
    }
    let quant = Quant::of(t.dtype);
    if quant.is_none() && !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) {
        return Ok(Outcome::NotAnalysed(format!("type {} is not analysed", t.dtype_name)));
    }
    let unit = block_bytes as u32;
    let chunk = (CHUNK_TARGET / unit).max(1) * unit;
    let mut m = Moments::default();
    let mut q = quant.map(|_| BlockStats::default());
    let mut buf: Vec<f32> = Vec::new();
    let mut prev: Vec<u8> = Vec::new();
    let mut prev_codes: Option<(u16, [u8; 32])> = None;
    let mut index = 0u64;
    for piece in ChunkReader::tensor(file, t).chunk_size(chunk) {
        let (_, bytes) = piece?;
        match (t.dtype, quant) {
            (Dtype::F32, _) => {
                let any = bytes.chunks_exact(4).fold(false, |acc, b| {
                    acc | (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000)
                });
                if any {
                    let i = bytes
                        .chunks_exact(4)
                        .position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000)
                        .unwrap_or(0);
                    return Ok(Outcome::NonFinite { index: index + i as u64, what: "value" });
                }
                m.add_f32_bytes(&bytes);
                index += (bytes.len() / 4) as u64;
            }
            (Dtype::F16 | Dtype::Bf16, _) => {
                let (mask, convert): (u16, fn(u16) -> f32) =
                    if t.dtype == Dtype::F16 { (0x7c00, f16_to_f32) } else { (0x7f80, bf16_to_f32) };
                buf.clear();
                for (i, b) in bytes.chunks_exact(2).enumerate() {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    if bits & mask == mask {
                        return Ok(Outcome::NonFinite { index: index + i as u64, what: "value" });
                    }
                    buf.push(convert(bits));
                }
                m.add(&buf);
                index += (bytes.len() / 2) as u64;
            }
            (_, Some(quant)) => {
                let qs = q.as_mut().expect("set for quant types");
                let bb = quant.block_bytes();
                if matches!(quant, Quant::Q8_0 | Quant::Q5_0 | Quant::Q4_0) {
                    // One fused SIMD pass: scale check, repeats, moments.
                    if let Err(i) = m.add_symmetric(quant, &bytes, qs, &mut prev_codes) {
                        return Ok(Outcome::NonFinite { index: index + i as u64, what: "block scale" });
                    }
                    index += (bytes.len() / bb) as u64;
                    continue;
                }
                if let Some(i) = bytes.chunks_exact(bb).position(|b| quant.scales_non_finite(b)) {
                    return Ok(Outcome::NonFinite { index: index + i as u64, what: "block scale" });
                }
                // Each block against the one before it (the last block of the
                // previous chunk is kept); all-zero blocks count as zero scales.
                let mut before: &[u8] = &prev;
                for block in bytes.chunks_exact(bb) {
                    // Cheap first test: a full compare call per block costs more than the dequantisation.
                    let head = |b: &[u8]| b.get(..8).map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")));
                    if head(block) == head(before) && block == before && !block.iter().all(|&b| b == 0) {
                        qs.repeated += 1;
                    }
                    before = block;
                }
                prev = before.to_vec();
                index += (bytes.len() / bb) as u64;
                let n = quant.block_elems();
                // Dequantise a batch of blocks, then fold it into the moments.
                buf.resize(64 * 256, 0.0);
                let mut filled = 0;
                for block in bytes.chunks_exact(bb) {
                    #[cfg(target_arch = "wasm32")]
                    let s = kquant::dequantize(quant, block, &mut buf[filled..filled + n]);
                    #[cfg(not(target_arch = "wasm32"))]
                    let s = quant.dequantize(block, &mut buf[filled..filled + n]);
                    filled += n;
                    let bits = if quant == Quant::Q8K { s.d_bits >> 16 } else { s.d_bits };
                    qs.note_scale(bits, s.d == 0.0);
                    qs.saturated += u64::from(s.saturated);
                    if filled + n > buf.len() {
                        m.add(&buf[..filled]);
                        filled = 0;
                    }
                }
                m.add(&buf[..filled]);
            }
            _ => unreachable!("checked above"),
        }
    }
    Ok(Outcome::Analysed(Box::new(TensorStats { location, name: t.name.clone(), role: role(&t.name), elems, m, q })))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

/// Robust z-scores (0.6745·(x − median)/MAD) of one metric within each role.
fn robust_z(stats: &[TensorStats], metric: impl Fn(&TensorStats) -> f64) -> Vec<Option<f64>> {
    let mut out = vec![None; stats.len()];
    let mut roles: Vec<&str> = stats.iter().map(|s| s.role.as_str()).collect();
    roles.sort();
    roles.dedup();
    for r in roles {
        let idx: Vec<usize> = (0..stats.len()).filter(|&i| stats[i].role == r && stats[i].elems >= MIN_ELEMS).collect();
        if idx.len() < MIN_ROLE {
            continue;
        }
        let xs: Vec<f64> = idx.iter().map(|&i| metric(&stats[i])).collect();
        if xs.iter().any(|x| !x.is_finite()) {
            continue;
        }
        let med = median(xs.clone());
        let mad = median(xs.iter().map(|x| (x - med).abs()).collect());
        // A MAD of zero means identical tensors; fall back to a scale floor
        // so one deviant among clones still stands out, but noise does not.
        let mad = mad.max(1e-3);
        for (&i, &x) in idx.iter().zip(&xs) {
            out[i] = Some(0.6745 * (x - med) / mad);
        }
    }
    out
}

struct Anomalies(Vec<Finding>);

impl Anomalies {
    fn add(&mut self, rule: &str, severity: Severity, location: &str, message: String) {
        self.0.push(Finding::new(rule, severity, message).at(location));
    }
    fn score(&self) -> f64 {
        self.0
            .iter()
            .map(|f| match f.severity {
                Severity::Critical => 0.3,
                Severity::High | Severity::Medium => 0.1,
                Severity::Low | Severity::Info => 0.02,
            })
            .sum()
    }
}

fn score_tensors(stats: &[TensorStats]) -> Anomalies {
    let mut a = Anomalies(Vec::new());
    let zs = [
        ("log standard deviation", robust_z(stats, |s| s.m.std().max(1e-30).ln())),
        ("log kurtosis", robust_z(stats, |s| s.m.kurtosis().max(1e-30).ln())),
    ];
    for (i, s) in stats.iter().enumerate() {
        for (what, z) in &zs {
            if let Some(z) = z[i]
                && z.abs() > WARN_Z
            {
                let sev = if z.abs() > CRIT_Z { Severity::Critical } else { Severity::Medium };
                a.add(
                    "weights.role-outlier",
                    sev,
                    &s.location,
                    format!("{what} is {z:+.1} robust z-scores from the other tensors of role {}", s.role),
                );
            }
        }
        if s.elems < MIN_ELEMS {
            continue;
        }
        if s.m.sparsity() > 0.9 && s.m.std() > 0.0 {
            a.add(
                "weights.sparse",
                Severity::Medium,
                &s.location,
                format!("{:.1}% of the elements are exactly zero", 100.0 * s.m.sparsity()),
            );
        }
        let outliers = s.m.outlier_ratio();
        if outliers > 0.02 {
            a.add(
                "weights.outliers",
                Severity::Medium,
                &s.location,
                format!("{:.2}% of 32-element groups reach 16× the median group's magnitude", 100.0 * outliers),
            );
        }
        if let Some(q) = &s.q {
            let per_block = |n: u64| n as f64 / q.blocks.max(1) as f64;
            let ratios = [
                ("weights.quant.zero-scales", per_block(q.zero_scale), 0.5, "of blocks have a zero scale"),
                (
                    "weights.quant.repeated-blocks",
                    per_block(q.repeated),
                    0.05,
                    "of blocks repeat the block before them byte for byte",
                ),
                (
                    "weights.quant.saturated",
                    q.saturated as f64 / s.m.n.max(1) as f64,
                    0.25,
                    "of codes sit at the end of their range",
                ),
            ];
            for (rule, value, limit, what) in ratios {
                if value > limit {
                    a.add(rule, Severity::Medium, &s.location, format!("{:.1}% {what}", 100.0 * value));
                }
            }
            if q.blocks >= 1024 && q.scale_entropy() < MIN_SCALE_ENTROPY {
                a.add(
                    "weights.quant.scale-entropy",
                    Severity::Medium,
                    &s.location,
                    format!("block scales collapse to {:.2} bits of entropy: not a trained tensor", q.scale_entropy()),
                );
            }
        }
    }
    a
}

struct Weights;

impl Stage for Weights {
    fn describe() -> StageInfo {
        StageInfo::new(
            "weights",
            env!("CARGO_PKG_VERSION"),
            "NaN/Inf gates, dequantisation, per-tensor statistics, robust z-scores and quant-block analysis of every tensor",
        )
    }

    fn run(model: &Model) -> Report {
        decide(|| read_model(model))
    }
}

impl Split for Weights {
    fn part(model: &Model) -> Result<String, String> {
        serde_json::to_string(&read_model(model)?).map_err(|e| format!("cannot write the part's statistics: {e}"))
    }

    fn join(parts: Vec<String>) -> Report {
        decide(|| parts_from_json(&parts).map(PartStats::join))
    }
}

/// The report from the statistics `read` gathers, once the config is known to be valid.
fn decide(read: impl FnOnce() -> Result<PartStats, String>) -> Report {
    let config: Config = match context::config() {
        Ok(c) => c,
        Err(e) => return Report::fail(e),
    };
    match read() {
        Ok(part) => verdict(part, &config),
        Err(e) => Report::fail(e),
    }
}

/// Every file of `model`, each read on its own and joined, the way a scan
/// split over workers joins shards: one code path for both.
fn read_model(model: &Model) -> Result<PartStats, String> {
    model.files().iter().map(read_file).collect::<Result<Vec<_>, _>>().map(PartStats::join)
}

/// The parts as `part` wrote them; one that does not parse fails the join, naming it.
fn parts_from_json(parts: &[String]) -> Result<Vec<PartStats>, String> {
    if parts.is_empty() {
        return Err("the join was given no parts".into());
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::from_str(p).map_err(|e| format!("part {} of {}: {e}", i + 1, parts.len())))
        .collect()
}

/// Reads and analyses every tensor of one file: the part of the work that
/// needs the bytes. Fails only when a tensor cannot be read.
fn read_file(file: &File) -> Result<PartStats, String> {
    let mut part = PartStats::default();
    for t in file.tensors() {
        let location = format!("{}: {}", file.path(), t.name);
        let started = std::time::Instant::now();
        let outcome = analyse(file, &t);
        *part.ms_by_type.entry(t.dtype_name.clone()).or_default() += started.elapsed().as_secs_f64() * 1e3;
        let noted = |rule: &str, message: String| Noted {
            rule: rule.into(),
            message,
            location: location.clone(),
            offset: None,
        };
        match outcome {
            Ok(Outcome::Analysed(s)) => {
                part.bytes += t.length;
                part.tensors.push(*s);
            }
            Ok(Outcome::NonFinite { index, what }) => {
                let (rule, unit) = if what == "value" {
                    ("weights.non-finite", "element")
                } else {
                    ("weights.scale-non-finite", "block")
                };
                let message = format!("{} {what} at {unit} {index} is NaN or Inf", t.dtype_name);
                part.gates.push(Noted { offset: Some(t.offset), ..noted(rule, message) });
            }
            Ok(Outcome::NotAnalysed(why)) => part.notes.push(noted("weights.not-analysed", why)),
            Err(e) if e.starts_with("structure: ") => {
                part.gates.push(noted("weights.structure", e["structure: ".len()..].to_string()));
            }
            Err(e) => return Err(format!("{location}: cannot read: {e}")),
        }
    }
    Ok(part)
}

impl Noted {
    fn finding(&self, severity: Severity) -> Finding {
        let f = Finding::new(&self.rule, severity, &self.message).at(&self.location);
        match self.offset {
            Some(o) => f.offset(o),
            None => f,
        }
    }
}

/// The stage's report from everything read: the gates, the cross-tensor
/// scores and the summary. A whole-model scan is one part; the parts of a
/// split scan, joined in file order, give the same report.
fn verdict(part: PartStats, config: &Config) -> Report {
    let PartStats { tensors: stats, gates, notes, bytes, ms_by_type } = part;
    let gates: Vec<Finding> = gates.iter().map(|g| g.finding(Severity::Critical)).collect();
    let mut notes: Vec<Finding> = notes.iter().map(|n| n.finding(Severity::Info)).collect();
    let anomalies = score_tensors(&stats);
    let score = anomalies.score() + 0.0; // a sum of nothing is -0.0
    let details = json!({
        "score": score,
        "ms_by_type": ms_by_type,
        "static_fail_score": config.static_fail_score,
        // Bounded so the report stays far below the host's 1 MiB cap on any model.
        "tensors_listed": stats.len().min(MAX_LISTED),
        "tensors": stats.iter().take(MAX_LISTED).map(|s| (s.name.clone(), json!({
            "mean": s.m.mean(),
            "std": s.m.std(),
            "kurtosis": s.m.kurtosis(),
            "outlier_ratio": s.m.outlier_ratio(),
            "sparsity": s.m.sparsity(),
            "zero_scales": s.q.as_ref().map(|q| q.zero_scale),
            "saturated": s.q.as_ref().map(|q| q.saturated as f64 / s.m.n.max(1) as f64),
            "repeated_blocks": s.q.as_ref().map(|q| q.repeated),
            "scale_entropy": s.q.as_ref().map(BlockStats::scale_entropy),
        }))).collect::<serde_json::Map<_, _>>(),
    });
    let counts = {
        let crit = anomalies.0.iter().filter(|f| f.severity == Severity::Critical).count();
        let warn = anomalies.0.iter().filter(|f| matches!(f.severity, Severity::High | Severity::Medium)).count();
        let info = anomalies.0.len() - crit - warn;
        if anomalies.0.is_empty() {
            "no anomalies".to_string()
        } else {
            format!("{crit} critical, {warn} warning, {info} info")
        }
    };
    let coverage = format!(
        "{} tensors, {:.0} MB analysed{}",
        stats.len(),
        bytes as f64 / 1e6,
        if notes.is_empty() { String::new() } else { format!(", {} of unanalysed types", notes.len()) }
    );
    let summary = format!("score={score:.2}, {counts} ({coverage})");
    // Many tensors of an unanalysed type become one finding per type, so the report stays small.
    if notes.len() > 50 {
        let mut per_type: std::collections::BTreeMap<String, usize> = Default::default();
        for n in &notes {
            *per_type.entry(n.message.clone()).or_default() += 1;
        }
        notes = per_type
            .into_iter()
            .map(|(why, count)| Finding::new("weights.not-analysed", Severity::Info, format!("{count} tensors: {why}")))
            .collect();
    }
    let findings: Vec<Finding> = gates.iter().cloned().chain(anomalies.0).chain(notes).collect();
    if let Some(first) = gates.first() {
        let reason = format!(
            "{} gate(s): {}: {}; {summary}",
            gates.len(),
            first.location.as_deref().unwrap_or("?"),
            first.message
        );
        return Report::fail(reason).findings(findings).score(score as f32).details(details).cap_findings(500);
    }
    if score > config.static_fail_score {
        return Report::fail(format!("{summary}: above static_fail_score {}", config.static_fail_score))
            .findings(findings)
            .cap_findings(500)
            .score(score as f32)
            .details(details);
    }
    Report::pass(summary).findings(findings).score(score as f32).details(details).cap_findings(500)
}

airlock_sdk::export_split_stage!(Weights);

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: Config = Config { static_fail_score: 0.5 };

    /// A deterministic, roughly normal tensor (a sum of four uniforms from an
    /// LCG); `planted` cubes and scales it, so both σ and the tails change.
    fn tensor(file: &str, name: &str, seed: u64, planted: bool) -> TensorStats {
        let mut x = seed;
        let mut uniform = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let xs: Vec<f32> = (0..8192)
            .map(|_| uniform() + uniform() + uniform() + uniform())
            .map(|x| if planted { 40.0 * x * x * x } else { x })
            .collect();
        let mut m = Moments::default();
        m.add(&xs);
        // Block statistics as a quantised tensor would leave them, so their histogram travels too.
        let mut q = BlockStats::default();
        for i in 0..256u32 {
            q.note_scale(0x3c00 + (i * 7 + seed as u32) % 97 * 256, i % 50 == 0);
        }
        q.saturated = seed % 5;
        q.repeated = seed % 3;
        let location = format!("{file}: {name}");
        TensorStats { location, name: name.into(), role: role(name), elems: xs.len() as u64, m, q: Some(q) }
    }

    /// A 12-layer model in three shards: layers 0-4, 5-9 and 10-11. The last
    /// shard holds two layers, fewer than MIN_ROLE. `planted` replaces layer
    /// 11's attn_q with heavy-tailed values at another scale, as a tampered layer would.
    fn shards(planted: bool) -> Vec<PartStats> {
        let mut parts: Vec<PartStats> = (0..3).map(|_| PartStats::default()).collect();
        for layer in 0..12u64 {
            let shard = (layer / 5) as usize;
            let file = format!("model-{:05}-of-00003.safetensors", shard + 1);
            for (r, role) in ["attn_q", "ffn_up"].iter().enumerate() {
                let plant = planted && layer == 11 && *role == "attn_q";
                let t = tensor(&file, &format!("blk.{layer}.{role}.weight"), layer * 2 + r as u64 + 1, plant);
                parts[shard].bytes += t.elems * 2;
                parts[shard].tensors.push(t);
            }
        }
        parts[0].notes.push(Noted {
            rule: "weights.not-analysed".into(),
            message: "type I64 is not analysed".into(),
            location: "model-00001-of-00003.safetensors: position_ids".into(),
            offset: None,
        });
        parts[0].ms_by_type.insert("F16".into(), 1.5);
        parts[2].ms_by_type.insert("F16".into(), 0.25);
        parts
    }

    /// What a worker would send and the join would read back: the part as JSON.
    fn through_json(part: &PartStats) -> PartStats {
        serde_json::from_str(&serde_json::to_string(part).unwrap()).unwrap()
    }

    #[test]
    fn shards_scanned_apart_and_joined_give_the_whole_model_report() {
        for planted in [false, true] {
            // The whole model read in one pass: every tensor in file order.
            let mut whole = PartStats::default();
            for p in shards(planted) {
                whole.tensors.extend(p.tensors);
                whole.notes.extend(p.notes);
                whole.bytes += p.bytes;
                for (k, ms) in p.ms_by_type {
                    *whole.ms_by_type.entry(k).or_default() += ms;
                }
            }
            let whole = verdict(whole, &CONFIG);
            let joined = verdict(PartStats::join(shards(planted).iter().map(through_json).collect()), &CONFIG);
            assert_eq!(format!("{joined:?}"), format!("{whole:?}"), "planted: {planted}");
            assert_eq!(joined.is_fail(), planted, "{}", joined.summary);
        }
        let joined = verdict(PartStats::join(shards(true).iter().map(through_json).collect()), &CONFIG);
        let outlier = joined.findings.iter().find(|f| f.rule == "weights.role-outlier").expect("an outlier finding");
        assert_eq!(outlier.severity, Severity::Critical);
        assert_eq!(outlier.location.as_deref(), Some("model-00003-of-00003.safetensors: blk.11.attn_q.weight"));
    }

    /// Why a sharded model cannot be scanned shard by shard with the verdicts
    /// merged: the shard holding the planted layer has too few layers of each
    /// role for a z-score, so alone it passes.
    #[test]
    fn a_shard_alone_passes_a_planted_layer_that_the_join_rejects() {
        let mut parts = shards(true);
        let last = parts.pop().expect("three shards");
        let alone = verdict(last, &CONFIG);
        assert!(!alone.is_fail(), "{}", alone.summary);
        assert!(alone.findings.iter().all(|f| f.rule != "weights.role-outlier"));
    }

    #[test]
    fn part_statistics_survive_json_bit_for_bit() {
        for part in shards(true) {
            let back = through_json(&part);
            assert_eq!(back.tensors.len(), part.tensors.len());
            for (a, b) in part.tensors.iter().zip(&back.tensors) {
                assert_eq!(a.m.s.map(f64::to_bits), b.m.s.map(f64::to_bits), "{}", a.name);
                assert_eq!((a.m.n, a.m.zeros, a.m.amp), (b.m.n, b.m.zeros, b.m.amp));
                let (qa, qb) = (a.q.as_ref().unwrap(), b.q.as_ref().unwrap());
                assert_eq!(qa.scale_hist, qb.scale_hist);
                assert_eq!(
                    (qa.blocks, qa.zero_scale, qa.saturated, qa.repeated),
                    (qb.blocks, qb.zero_scale, qb.saturated, qb.repeated)
                );
            }
        }
    }

    #[test]
    fn a_histogram_with_a_repeated_or_impossible_bucket_is_refused() {
        let part = serde_json::to_value(&shards(false)[0]).unwrap();
        let amp = &part["tensors"][0]["m"]["amp"];
        assert!(amp.as_array().is_some_and(|a| !a.is_empty() && a.len() < 256), "sparse: {amp}");
        for bad in
            [serde_json::json!([[3, 1], [3, 2]]), serde_json::json!([[5, 1], [4, 1]]), serde_json::json!([[256, 1]])]
        {
            let mut p = part.clone();
            p["tensors"][0]["m"]["amp"] = bad.clone();
            let err = serde_json::from_value::<PartStats>(p).err().unwrap_or_else(|| panic!("{bad} was taken"));
            assert!(err.to_string().contains("bucket") || err.to_string().contains("256"), "{bad}: {err}");
        }
    }
}
