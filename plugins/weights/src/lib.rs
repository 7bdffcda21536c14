//! Stage 5 (static scan), weights: a full scan for non-finite values. Every
//! element of F32/F16/BF16 tensors and every block scale (`d`, `dmin`) of
//! quantised tensors is checked: no sampling, however large the tensor.
//! Types whose layout this plugin does not know are reported as not analysed,
//! never silently passed.
//!
//! (Dequantisation, statistics and anomaly scoring are still to come.)

use airlock_sdk::{ChunkReader, Dtype, File, Finding, Model, Report, Severity, Stage, StageInfo, TensorInfo};

/// Where a block keeps its f16 scales, and how long a block is.
struct QuantLayout {
    block_bytes: usize,
    /// Byte offsets of f16 scales inside a block.
    f16_scales: &'static [usize],
    /// Byte offsets of f32 scales inside a block.
    f32_scales: &'static [usize],
}

/// ggml's block structs (ggml-common.h): the positions of `d` and `dmin`.
fn quant_layout(dtype: Dtype) -> Option<QuantLayout> {
    let (block_bytes, f16_scales, f32_scales): (usize, &'static [usize], &'static [usize]) = match dtype {
        Dtype::Q40 => (18, &[0], &[]),
        Dtype::Q41 => (20, &[0, 2], &[]),
        Dtype::Q50 => (22, &[0], &[]),
        Dtype::Q51 => (24, &[0, 2], &[]),
        Dtype::Q80 => (34, &[0], &[]),
        Dtype::Q81 => (36, &[0, 2], &[]),
        Dtype::Q2k => (84, &[80, 82], &[]),
        Dtype::Q3k => (110, &[108], &[]),
        Dtype::Q4k => (144, &[0, 2], &[]),
        Dtype::Q5k => (176, &[0, 2], &[]),
        Dtype::Q6k => (210, &[208], &[]),
        Dtype::Q8k => (292, &[], &[0]),
        _ => return None,
    };
    Some(QuantLayout { block_bytes, f16_scales, f32_scales })
}

fn f16_non_finite(bits: u16) -> bool {
    bits & 0x7c00 == 0x7c00
}

fn f32_non_finite(bits: u32) -> bool {
    bits & 0x7f80_0000 == 0x7f80_0000
}

/// Chunks are whole multiples of the element or block size, so nothing straddles two.
const CHUNK_TARGET: u32 = 1 << 20;

enum Kind {
    F32,
    F16,
    Bf16,
    Quant(QuantLayout),
}

impl Kind {
    fn unit(&self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::F16 | Kind::Bf16 => 2,
            Kind::Quant(q) => q.block_bytes,
        }
    }
}

/// Index of the first non-finite element or block in `bytes`. The common
/// case (all finite) is an OR-reduction the compiler vectorises; only a chunk
/// that has a bad value is searched element by element.
fn first_bad(kind: &Kind, bytes: &[u8]) -> Option<usize> {
    match kind {
        Kind::F32 => {
            let words = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let any = words.clone().fold(false, |acc, x| acc | (x & 0x7f80_0000 == 0x7f80_0000));
            if any { words.clone().position(f32_non_finite) } else { None }
        }
        Kind::F16 | Kind::Bf16 => {
            let mask: u16 = if matches!(kind, Kind::F16) { 0x7c00 } else { 0x7f80 };
            let halves = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
            let any = halves.clone().fold(false, |acc, x| acc | (x & mask == mask));
            if any { halves.clone().position(|x| x & mask == mask) } else { None }
        }
        Kind::Quant(q) => bytes.chunks_exact(q.block_bytes).position(|b| {
            q.f16_scales.iter().any(|&o| f16_non_finite(u16::from_le_bytes([b[o], b[o + 1]])))
                || q.f32_scales
                    .iter()
                    .any(|&o| f32_non_finite(u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])))
        }),
    }
}

/// The first non-finite element or scale of a tensor: (element or block index, what).
fn scan(file: &File, t: &TensorInfo) -> Result<Option<(u64, &'static str)>, String> {
    let kind = match t.dtype {
        Dtype::F32 => Kind::F32,
        Dtype::F16 => Kind::F16,
        Dtype::Bf16 => Kind::Bf16,
        other => match quant_layout(other) {
            Some(q) => Kind::Quant(q),
            None => return Err(format!("type {} is not analysed", t.dtype_name)),
        },
    };
    let what = if matches!(kind, Kind::Quant(_)) { "block scale" } else { "value" };
    let unit = kind.unit();
    let chunk = (CHUNK_TARGET / unit as u32).max(1) * unit as u32;
    let mut index = 0u64;
    for piece in ChunkReader::tensor(file, t).chunk_size(chunk) {
        let (_, bytes) = piece?;
        if let Some(i) = first_bad(&kind, &bytes) {
            return Ok(Some((index + i as u64, what)));
        }
        index += (bytes.len() / unit) as u64;
    }
    Ok(None)
}

struct Weights;

impl Stage for Weights {
    fn describe() -> StageInfo {
        StageInfo::new(
            "weights",
            env!("CARGO_PKG_VERSION"),
            "full scan for NaN/Inf in every float element and block scale",
        )
    }

    fn run(model: &Model) -> Report {
        let mut findings = Vec::new();
        let mut scanned = 0u64;
        let mut not_analysed = 0usize;
        for file in model.files() {
            for t in file.tensors() {
                let location = format!("{}: {}", file.path(), t.name);
                match scan(&file, &t) {
                    Ok(None) => scanned += t.length,
                    Ok(Some((i, what))) => {
                        let unit = if what == "value" { "element" } else { "block" };
                        findings.push(
                            Finding::new(
                                if what == "value" { "weights.non-finite" } else { "weights.scale-non-finite" },
                                Severity::Critical,
                                format!("{} {what} at {unit} {i} is NaN or Inf", t.dtype_name),
                            )
                            .at(location),
                        );
                    }
                    Err(e) if e.ends_with("is not analysed") => {
                        not_analysed += 1;
                        findings.push(Finding::new("weights.not-analysed", Severity::Info, e).at(location));
                    }
                    Err(e) => return Report::fail(format!("{location}: cannot read: {e}")),
                }
            }
        }
        let bad = findings.iter().filter(|f| f.severity == Severity::Critical).count();
        if bad > 0 {
            let first = findings.iter().find(|f| f.severity == Severity::Critical).expect("counted");
            let reason = format!(
                "{bad} tensor(s) hold NaN/Inf; first: {} ({})",
                first.location.as_deref().unwrap_or("?"),
                first.message
            );
            return Report::fail(reason).findings(findings);
        }
        let note =
            if not_analysed > 0 { format!(", {not_analysed} tensor(s) of unanalysed types") } else { String::new() };
        Report::pass(format!("{:.0} MB of weights finite{note}", scanned as f64 / 1e6)).findings(findings)
    }
}

airlock_sdk::export_stage!(Weights);
