//! Stage 5 (static scan), entropy: payloads hidden in weights.
//!
//! Two tests, both on byte histograms of every byte of every tensor:
//!
//! * **Random bytes.** A tensor whose bytes are uniformly distributed is an
//!   encrypted or compressed blob, not weights. Real weights never are: on the
//!   gemma GGUF the most uniform tensor type (Q5_0) still deviates from
//!   uniform with an effect size w² = (χ²/dof − 1)·255/N ≥ 0.073, Q4_K ≥ 0.31,
//!   Q6_K ≥ 0.11, Q8_0 ≥ 0.52, F32 ≥ 41 (measured 2026-11-26). A uniform
//!   source gives χ²/dof ≈ 1 ± 0.09 whatever N. From 64 KiB up, the weakest
//!   real case (Q5_0) is expected at χ²/dof ≈ 19, so `χ²/dof < 3` separates
//!   the two by a wide margin. Smaller tensors are pooled per file and dtype.
//!   Gemma requantised by llama-quantize into 24 other file types (2026-11-27)
//!   puts the weakest at Q3_K, w² ≥ 0.028: χ²/dof ≈ 8 at 64 KiB. The report's
//!   `details.weakest_by_dtype` gives these figures for any model scanned.
//!
//! * **Low-byte stuffing (EvilModel).** Replacing the low 3 bytes of every f32
//!   with payload makes byte 2 (the top 7 mantissa bits and the exponent's
//!   lowest bit) uniform. In real weights that byte is not: mantissas of
//!   values spread over several octaves follow a logarithmic (Benford-like)
//!   law. On MiniLM every f32 tensor of ≥ 64k elements has χ²/dof ≥ 23 on
//!   byte 2. The same test applies to the low byte of bf16. Bytes 0 and 1 of
//!   a natively trained f32 are noise already, so 2-byte stuffing is visible
//!   only against sibling tensors whose low bytes are structured (f16/bf16
//!   upcasts, with byte 0 constant): that case is checked too.

use airlock_sdk::{ChunkReader, Dtype, File, Finding, Model, Report, Severity, Split, Stage, StageInfo, TensorInfo};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Tensors at least this big are tested on their own.
const MIN_TEST_BYTES: u64 = 64 << 10;
/// χ²/dof below this is "uniform".
const UNIFORM_CHI: f64 = 3.0;
/// χ²/dof above this is "structured" (byte 0 of an f16 or bf16 upcast is constant).
const STRUCTURED_CHI: f64 = 100.0;
/// Tensors whose bits per byte the report lists.
const MAX_LISTED: usize = 4096;

/// Byte histograms by position modulo 8 within the tensor (table 0 holds the
/// lowest byte of every even f32, table 4 of every odd one). Eight tables
/// rather than four break the store-to-load chains that runs of equal bytes
/// cause in a single table.
struct Lanes([[u32; 256]; 8]);

impl Lanes {
    fn new() -> Self {
        Lanes([[0; 256]; 8])
    }

    /// `bytes` starts at a multiple of 8 from the tensor's start. Not inlined:
    /// cranelift allocates registers better in a small function.
    #[inline(never)]
    fn add(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        let h = &mut self.0;
        for w in &mut words {
            let x = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            h[0][(x & 0xff) as usize] += 1;
            h[1][((x >> 8) & 0xff) as usize] += 1;
            h[2][((x >> 16) & 0xff) as usize] += 1;
            h[3][((x >> 24) & 0xff) as usize] += 1;
            h[4][((x >> 32) & 0xff) as usize] += 1;
            h[5][((x >> 40) & 0xff) as usize] += 1;
            h[6][((x >> 48) & 0xff) as usize] += 1;
            h[7][(x >> 56) as usize] += 1;
        }
        for (i, &b) in words.remainder().iter().enumerate() {
            h[i][b as usize] += 1;
        }
    }

    fn whole(&self) -> [u64; 256] {
        let mut h = [0u64; 256];
        for lane in &self.0 {
            for (t, &c) in h.iter_mut().zip(lane) {
                *t += u64::from(c);
            }
        }
        h
    }

    fn lanes(&self, which: &[usize]) -> [u64; 256] {
        let mut h = [0u64; 256];
        for &i in which {
            for table in [&self.0[i], &self.0[i + 4]] {
                for (t, &c) in h.iter_mut().zip(table) {
                    *t += u64::from(c);
                }
            }
        }
        h
    }

    fn merge(&mut self, other: &Lanes) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
}

/// Shannon entropy in bits per byte.
fn entropy(h: &[u64; 256]) -> f64 {
    let n: u64 = h.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let n = n as f64;
    h.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|p| -p * p.log2()).sum()
}

/// Pearson's χ² against the uniform distribution, per degree of freedom.
fn chi_per_dof(h: &[u64; 256]) -> f64 {
    let n: u64 = h.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let e = n as f64 / 256.0;
    h.iter().map(|&c| (c as f64 - e) * (c as f64 - e) / e).sum::<f64>() / 255.0
}

fn histogram(file: &File, t: &TensorInfo) -> Result<Lanes, String> {
    let mut lanes = Lanes::new();
    // 1 MiB chunks: a multiple of 8, so lane positions stay aligned to the tensor start.
    for piece in ChunkReader::tensor(file, t) {
        let (_, bytes) = piece?;
        lanes.add(&bytes);
    }
    Ok(lanes)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Tested {
    location: String,
    dtype: String,
    /// Where the tensor starts (none for a pool).
    offset: Option<u64>,
    bytes: u64,
    entropy: f64,
    chi: f64,
    /// f32 only: χ²/dof of bytes 0, 1 and 2 (positions modulo 4).
    f32_lanes: Option<[f64; 3]>,
}

/// For each dtype, the tested tensor closest to uniform: its effect size
/// w² = (χ²/dof − 1)·255/N, which does not depend on the tensor's size as
/// χ²/dof does. How far the real model stands from the `UNIFORM_CHI` line.
fn weakest_by_dtype(tested: &[Tested]) -> serde_json::Map<String, serde_json::Value> {
    let w2 = |t: &Tested| (t.chi - 1.0) * 255.0 / t.bytes.max(1) as f64;
    let mut out = serde_json::Map::new();
    for t in tested {
        let weaker = out.get(&t.dtype).and_then(|v| v["w2"].as_f64()).is_none_or(|w| w2(t) < w);
        if weaker {
            let v = json!({ "w2": w2(t), "chi2_per_dof": t.chi, "bytes": t.bytes, "at": t.location });
            out.insert(t.dtype.clone(), v);
        }
    }
    out
}

/// What the scan of some files leaves for the verdict: everything but the
/// cross-file sibling check, which needs every f32 tensor of the model. A
/// scan split over shards joins these in file order, and so does `run`.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Part {
    /// Bytes read.
    total: u64,
    /// (tensor, bits per byte to 3 places) in reading order, as many as the report may list.
    bits_per_byte: Vec<(String, f64)>,
    /// bf16 tensors whose low byte is uniform: (location, offset, χ²/dof).
    bf16_low: Vec<(String, u64, f64)>,
    tested: Vec<Tested>,
}

impl Part {
    fn join(parts: Vec<Part>) -> Part {
        let mut all = Part::default();
        for p in parts {
            all.total += p.total;
            all.bits_per_byte.extend(p.bits_per_byte);
            all.bf16_low.extend(p.bf16_low);
            all.tested.extend(p.tested);
        }
        all
    }
}

/// One file's tensors, each tested alone or pooled with the small ones of its dtype.
fn read_file(file: &File) -> Result<Part, String> {
    let mut part = Part::default();
    let mut listed = std::collections::BTreeSet::new();
    // Small tensors, pooled per dtype so that a payload split into
    // many small pieces is still tested.
    let mut pools: Vec<(String, Lanes, u64, usize)> = Vec::new();
    for t in file.tensors() {
        let location = format!("{}: {}", file.path(), t.name);
        let lanes = histogram(file, &t).map_err(|e| format!("{location}: cannot read: {e}"))?;
        part.total += t.length;
        let whole = lanes.whole();
        let e = entropy(&whole);
        // The report's rule (list while fewer than MAX_LISTED names are in),
        // applied here too: whatever the report lists, this file's list holds.
        if listed.len() < MAX_LISTED {
            listed.insert(t.name.clone());
            part.bits_per_byte.push((t.name.clone(), (e * 1000.0).round() / 1000.0));
        }
        if t.length < MIN_TEST_BYTES {
            match pools.iter_mut().find(|p| p.0 == t.dtype_name) {
                Some(p) => {
                    p.1.merge(&lanes);
                    p.2 += t.length;
                    p.3 += 1;
                }
                None => pools.push((t.dtype_name.clone(), lanes, t.length, 1)),
            }
            continue;
        }
        let f32_lanes = (t.dtype == Dtype::F32).then(|| [0, 1, 2].map(|i| chi_per_dof(&lanes.lanes(&[i]))));
        if t.dtype == Dtype::Bf16 {
            let low = chi_per_dof(&lanes.lanes(&[0, 2]));
            if low < UNIFORM_CHI {
                part.bf16_low.push((location.clone(), t.offset, low));
            }
        }
        part.tested.push(Tested {
            location,
            dtype: t.dtype_name.clone(),
            offset: Some(t.offset),
            bytes: t.length,
            entropy: e,
            chi: chi_per_dof(&whole),
            f32_lanes,
        });
    }
    for (dtype, lanes, bytes, count) in pools {
        if bytes < MIN_TEST_BYTES {
            continue;
        }
        let whole = lanes.whole();
        part.tested.push(Tested {
            location: format!("{}: {count} tensors of {dtype} under {} KiB, pooled", file.path(), MIN_TEST_BYTES >> 10),
            dtype,
            offset: None,
            bytes,
            entropy: entropy(&whole),
            chi: chi_per_dof(&whole),
            f32_lanes: None,
        });
    }
    Ok(part)
}

/// Every file of `model`, each read on its own and joined: one code path for
/// a whole scan and a split one.
fn read_model(model: &Model) -> Result<Part, String> {
    model.files().iter().map(read_file).collect::<Result<Vec<_>, _>>().map(Part::join)
}

/// The report on a model's files, read and joined.
fn verdict(part: Part) -> Report {
    let Part { total, bits_per_byte, bf16_low, tested } = part;
    let mut per_tensor = serde_json::Map::new();
    for (name, bits) in bits_per_byte {
        if per_tensor.len() < MAX_LISTED {
            per_tensor.insert(name, json!(bits));
        }
    }
    let mut findings: Vec<Finding> = bf16_low
        .into_iter()
        .map(|(location, offset, low)| {
            Finding::new(
                "entropy.low-bytes-uniform",
                Severity::Critical,
                format!(
                    "the low byte of every bf16 is uniformly random (chi2/dof {low:.2} < {UNIFORM_CHI}); real mantissas are not: a payload hidden in the weights"
                ),
            )
            .at(location)
            .offset(offset)
        })
        .collect();

    // Sibling check for 2-byte stuffing: most big f32 tensors have a
    // constant-ish byte 0 (upcast from 16 bits), this one has random bytes 0 and 1.
    let f32s: Vec<&[f64; 3]> = tested.iter().filter_map(|t| t.f32_lanes.as_ref()).collect();
    let structured = f32s.iter().filter(|l| l[0] > STRUCTURED_CHI).count();
    let siblings_structured = f32s.len() >= 4 && structured * 4 >= f32s.len() * 3;

    for t in &tested {
        if t.chi < UNIFORM_CHI {
            findings.push(
                Finding::new(
                    "entropy.random-bytes",
                    Severity::Critical,
                    format!(
                        "{} bytes are uniformly random ({:.4} bits/byte, chi2/dof {:.2} < {UNIFORM_CHI}): an encrypted or compressed blob, not weights",
                        t.bytes, t.entropy, t.chi
                    ),
                )
                .at(t.location.clone()),
            );
            if let (Some(f), Some(o)) = (findings.last_mut(), t.offset) {
                f.offset = Some(o);
            }
            continue;
        }
        if let Some([b0, b1, b2]) = t.f32_lanes {
            if b2 < UNIFORM_CHI {
                findings.push(
                    Finding::new(
                        "entropy.low-bytes-uniform",
                        Severity::Critical,
                        format!(
                            "the low 3 bytes of every f32 look uniformly random (byte 2 chi2/dof {b2:.2} < {UNIFORM_CHI}); real mantissas are not: a payload hidden in the weights (EvilModel)"
                        ),
                    )
                    .at(t.location.clone()),
                );
            } else if siblings_structured && b0 < UNIFORM_CHI && b1 < UNIFORM_CHI {
                findings.push(
                    Finding::new(
                        "entropy.low-bytes-uniform",
                        Severity::Critical,
                        format!(
                            "bytes 0 and 1 of every f32 are uniformly random (chi2/dof {b0:.2}, {b1:.2}) while {structured} of {} f32 tensors of this model have structured low bytes: a payload hidden in the weights",
                            f32s.len()
                        ),
                    )
                    .at(t.location.clone()),
                );
            }
        }
    }

    let (lo, hi) = tested.iter().fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(t.entropy), hi.max(t.entropy)));
    let details = json!({
        "bits_per_byte": per_tensor,
        "tested": tested.len(),
        "weakest_by_dtype": weakest_by_dtype(&tested),
    });
    let bad = findings.iter().filter(|f| f.severity == Severity::Critical).count();
    if bad > 0 {
        let first = &findings[0];
        let reason = format!(
            "{bad} tensor(s) look like hidden payloads; first: {}: {}",
            first.location.as_deref().unwrap_or("?"),
            first.message
        );
        return Report::fail(reason).findings(findings).details(details).cap_findings(200);
    }
    let range = if tested.is_empty() {
        String::from("no tensor big enough to test")
    } else {
        format!("{lo:.2}–{hi:.2} bits/byte")
    };
    Report::pass(format!("{:.0} MB read, {} tested, {range}, no random payloads", total as f64 / 1e6, tested.len()))
        .findings(findings)
        .details(details)
}

struct Entropy;

impl Stage for Entropy {
    fn describe() -> StageInfo {
        StageInfo::new(
            "entropy",
            env!("CARGO_PKG_VERSION"),
            "byte entropy and chi-square of every tensor: encrypted blobs and low-byte payloads (EvilModel)",
        )
    }

    fn run(model: &Model) -> Report {
        read_model(model).map_or_else(Report::fail, verdict)
    }
}

impl Split for Entropy {
    fn part(model: &Model) -> Result<String, String> {
        serde_json::to_string(&read_model(model)?).map_err(|e| format!("cannot write the part: {e}"))
    }

    fn join(parts: Vec<String>) -> Report {
        if parts.is_empty() {
            return Report::fail("the join was given no parts");
        }
        let read: Result<Vec<Part>, String> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| serde_json::from_str(p).map_err(|e| format!("part {} of {}: {e}", i + 1, parts.len())))
            .collect();
        read.map(Part::join).map_or_else(Report::fail, verdict)
    }
}

airlock_sdk::export_split_stage!(Entropy);
