//! Streaming per-tensor moments: count, Σx, Σx², Σx³, Σx⁴, exact zeros, and a
//! histogram of each 32-element group's largest magnitude (by binary
//! exponent). Memory is constant whatever the tensor's size.
//!
//! The hot loop is written with wasm `simd128` intrinsics: left to
//! auto-vectorisation, the same loop ran at a third of the speed (see
//! earlier measurements). Sums run in f32 lanes over at most a few
//! thousand elements and are then folded into f64.

use airlock_sdk::quant::Quant;
use serde::{Deserialize, Serialize};

/// f16 to f32 without branches, for finite values (callers reject Inf/NaN
/// scales first): the f16 bits moved into an f32, rescaled by 2^112. Exact
/// for normals and subnormals alike. It is a twin of the SDK's conversion (the
/// `half` crate), kept because the SIMD loop needs one without branches;
/// `fast_f16_matches_the_sdk` checks every finite value against it.
#[inline(always)]
pub fn fast_f16(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = f32::from_bits(u32::from(bits & 0x7fff) << 13) * f32::from_bits(0x7780_0000); // 2^112
    f32::from_bits(magnitude.to_bits() | sign)
}

/// Elements per amplitude group.
pub const GROUP: usize = 32;

/// Serialisable so a scan of one shard can hand its sums to the join (`crate::part`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Moments {
    pub n: u64,
    pub s: [f64; 4],
    pub zeros: u64,
    /// Groups by the biased f32 exponent of their largest |x| (0 for an all-zero group).
    #[serde(with = "crate::part::sparse_hist")]
    pub amp: [u32; 256],
}

impl Default for Moments {
    fn default() -> Self {
        Moments { n: 0, s: [0.0; 4], zeros: 0, amp: [0; 256] }
    }
}

/// Largest batch folded in f32 before it goes into the f64 sums.
const BATCH_GROUPS: usize = 64;

impl Moments {
    /// Adds little-endian f32 values given as bytes (any alignment).
    pub fn add_f32_bytes(&mut self, bytes: &[u8]) {
        let whole = bytes.len() / (4 * GROUP);
        for batch in bytes[..whole * 4 * GROUP].chunks(4 * GROUP * BATCH_GROUPS) {
            self.batch(batch);
        }
        let tail = &bytes[whole * 4 * GROUP..];
        if tail.len() >= 4 {
            let xs: Vec<f32> = tail.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            self.add_scalar(&xs);
        }
    }

    /// Adds values.
    pub fn add(&mut self, xs: &[f32]) {
        let whole = xs.len() / GROUP * GROUP;
        for batch in xs[..whole].chunks(GROUP * BATCH_GROUPS) {
            // SAFETY: the byte view covers exactly the f32 slice.
            let bytes = unsafe { core::slice::from_raw_parts(batch.as_ptr().cast::<u8>(), batch.len() * 4) };
            self.batch(bytes);
        }
        if whole < xs.len() {
            self.add_scalar(&xs[whole..]);
        }
    }

    /// A partial group: plain arithmetic.
    fn add_scalar(&mut self, xs: &[f32]) {
        let mut max = 0f32;
        for &x in xs {
            let x = f64::from(x);
            let x2 = x * x;
            self.s[0] += x;
            self.s[1] += x2;
            self.s[2] += x2 * x;
            self.s[3] += x2 * x2;
            self.zeros += u64::from(x == 0.0);
            max = max.max(x.abs() as f32);
        }
        self.n += xs.len() as u64;
        self.amp[((max.to_bits() >> 23) & 0xff) as usize] += 1;
    }

    #[cfg(target_arch = "wasm32")]
    #[inline(never)]
    fn batch(&mut self, bytes: &[u8]) {
        use core::arch::wasm32::*;
        debug_assert!(bytes.len().is_multiple_of(4 * GROUP));
        let mut acc = simd::Acc::new();
        for g in bytes.chunks_exact(4 * GROUP) {
            let p = g.as_ptr();
            // SAFETY: `g` holds GROUP f32 (128 bytes); v128_load has no alignment requirement.
            let v: [v128; 8] = core::array::from_fn(|k| unsafe { v128_load(p.add(16 * k).cast::<v128>()) });
            acc.group(&v, self);
        }
        acc.fold(self, (bytes.len() / 4) as u64);
    }

    /// Blocks of a symmetric format (Q8_0, Q5_0, Q4_0: x = d·q with one f16
    /// scale and 32 signed codes) added in SIMD without dequantising: the
    /// power sums of a block are d^k·Σq^k, and Σq^k comes from integer dot
    /// products of the codes.
    ///
    /// The same pass checks each scale for Inf/NaN (returning the block index
    /// of the first bad one) and counts blocks equal to the one before
    /// (`prev`, carried across chunks).
    ///
    /// Its own function: inlined into the plugin's big `run`, cranelift
    /// spilled the SIMD accumulators to the stack on every block.
    #[cfg(target_arch = "wasm32")]
    pub fn add_symmetric(
        &mut self,
        quant: Quant,
        blocks: &[u8],
        scales: &mut crate::BlockStats,
        prev: &mut Option<(u16, [u8; 32])>,
    ) -> Result<(), usize> {
        // One instance per format, so that each keeps only its own constants in registers.
        match quant {
            Quant::Q8_0 => self.symmetric::<8>(blocks, scales, prev),
            Quant::Q5_0 => self.symmetric::<5>(blocks, scales, prev),
            _ => self.symmetric::<4>(blocks, scales, prev),
        }
    }

    #[cfg(target_arch = "wasm32")]
    #[inline(never)]
    fn symmetric<const BITS: u8>(
        &mut self,
        blocks: &[u8],
        scales: &mut crate::BlockStats,
        prev: &mut Option<(u16, [u8; 32])>,
    ) -> Result<(), usize> {
        use core::arch::wasm32::*;
        let quant = match BITS {
            8 => Quant::Q8_0,
            5 => Quant::Q5_0,
            _ => Quant::Q4_0,
        };
        let bb = quant.block_bytes();
        let mut sat = 0u32;
        let lo_mask = u8x16_splat(0x0f);
        let top_code = match BITS {
            8 => 127.0,
            5 => 16.0,
            _ => 8.0,
        };
        let bits_of_byte = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
        let (mut last_bits, mut last0, mut last1) = match prev {
            Some((bits, codes)) => unsafe {
                // SAFETY: 32 bytes, two unaligned loads.
                (*bits, v128_load(codes.as_ptr().cast::<v128>()), v128_load(codes.as_ptr().add(16).cast::<v128>()))
            },
            None => (0xffff, u8x16_splat(0), u8x16_splat(0)), // 0xffff: a NaN scale, never a real previous block
        };
        let mut repeated = 0u64;
        // Block and zero-scale counts in locals, written once at the end: as
        // fields beside the histogram they were stored on every block, since
        // the histogram's stores might alias them.
        let (mut counted, mut zero_scales) = (0u64, 0u64);
        let hist: &mut [u64; 256] = &mut scales.scale_hist;
        // Batches with no fold inside: a fold in the loop made cranelift move
        // the accumulators through the stack on every block.
        let whole = blocks.len() / bb * bb;
        for (n, batch) in blocks[..whole].chunks(bb * BATCH_GROUPS).enumerate() {
            let mut acc = simd::CodeAcc::new();
            for (j, b) in batch.chunks_exact(bb).enumerate() {
                let i = n * BATCH_GROUPS + j;
                let bits = u16::from_le_bytes([b[0], b[1]]);
                if bits & 0x7c00 == 0x7c00 {
                    scales.blocks += counted;
                    scales.zero_scale += zero_scales;
                    return Err(i);
                }
                let d = fast_f16(bits);
                counted += 1;
                zero_scales += u64::from(bits & 0x7fff == 0);
                hist[usize::from(bits >> 8)] += 1;
                let p = b.as_ptr();
                // SAFETY: every load below reads 16 bytes that lie inside the block
                // (Q8_0: codes at 2..34; Q4_0: nibbles at 2..18; Q5_0: at 6..22).
                let (c0, c1, edge) = unsafe {
                    match BITS {
                        8 => {
                            let (c0, c1) = (v128_load(p.add(2).cast::<v128>()), v128_load(p.add(18).cast::<v128>()));
                            // A code at either end (±127 or -128) has |c| + 1 at or past
                            // 128, a set sign bit once wrapped (abs(-128) wraps to -128):
                            // the bitmask reads it directly, with one constant, not two.
                            let at_end = |c: v128| i8x16_add(i8x16_abs(c), i8x16_splat(1));
                            sat += i8x16_bitmask(at_end(c0)).count_ones() + i8x16_bitmask(at_end(c1)).count_ones();
                            (c0, c1, None)
                        }
                        4 => {
                            let qs = v128_load(p.add(2).cast::<v128>());
                            let eight = i8x16_splat(8);
                            (i8x16_sub(v128_and(qs, lo_mask), eight), i8x16_sub(u8x16_shr(qs, 4), eight), Some(-8))
                        }
                        _ => {
                            // Q5_0: the fifth bit of element j is bit j of qh.
                            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                            let qs = v128_load(p.add(6).cast::<v128>());
                            let spread = i32x4_splat(qh as i32);
                            let fifth = |idx: v128| {
                                let bytes = i8x16_swizzle(spread, idx);
                                v128_and(i8x16_eq(v128_and(bytes, bits_of_byte), bits_of_byte), u8x16_splat(0x10))
                            };
                            let h0 = fifth(u8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
                            let h1 = fifth(u8x16(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
                            let sixteen = i8x16_splat(16);
                            (
                                i8x16_sub(v128_or(v128_and(qs, lo_mask), h0), sixteen),
                                i8x16_sub(v128_or(u8x16_shr(qs, 4), h1), sixteen),
                                Some(-16),
                            )
                        }
                    }
                };
                if let Some(e) = edge {
                    let e = i8x16_splat(e);
                    sat += i8x16_bitmask(i8x16_eq(c0, e)).count_ones() + i8x16_bitmask(i8x16_eq(c1, e)).count_ones();
                }
                // A repeated block: same scale and codes as the one before (all-zero blocks are zero scales).
                if bits == last_bits
                    && bits & 0x7fff != 0
                    && i8x16_all_true(i8x16_eq(c0, last0))
                    && i8x16_all_true(i8x16_eq(c1, last1))
                {
                    repeated += 1;
                }
                (last_bits, last0, last1) = (bits, c0, c1);
                acc.block(d, bits & 0x7fff == 0, top_code, c0, c1, self);
            }
            acc.fold(self, (32 * (batch.len() / bb)) as u64);
        }
        scales.blocks += counted;
        scales.zero_scale += zero_scales;
        scales.saturated += u64::from(sat);
        scales.repeated += repeated;
        let mut codes = [0u8; 32];
        // SAFETY: 32 bytes, two unaligned stores.
        unsafe {
            v128_store(codes.as_mut_ptr().cast::<v128>(), last0);
            v128_store(codes.as_mut_ptr().add(16).cast::<v128>(), last1);
        }
        *prev = Some((last_bits, codes));
        Ok(())
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn add_symmetric(
        &mut self,
        quant: Quant,
        blocks: &[u8],
        scales: &mut crate::BlockStats,
        prev: &mut Option<(u16, [u8; 32])>,
    ) -> Result<(), usize> {
        let _ = prev; // the scalar twin serves the unit tests, which do not count repeats
        let mut out = [0f32; 32];
        for (i, b) in blocks.chunks_exact(quant.block_bytes()).enumerate() {
            if quant.scales_non_finite(b) {
                return Err(i);
            }
            let s = quant.dequantize(b, &mut out);
            scales.note_scale(s.d_bits, s.d == 0.0);
            scales.saturated += u64::from(s.saturated);
            self.add(&out);
        }
        Ok(())
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn batch(&mut self, bytes: &[u8]) {
        for g in bytes.chunks_exact(4 * GROUP) {
            let xs: Vec<f32> = g.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            self.add_scalar(&xs);
        }
    }

    pub fn mean(&self) -> f64 {
        if self.n == 0 { 0.0 } else { self.s[0] / self.n as f64 }
    }

    pub fn std(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        let m = self.s[0] / n;
        (self.s[1] / n - m * m).max(0.0).sqrt()
    }

    /// Pearson kurtosis (3 for a normal distribution); 0 for a constant tensor.
    pub fn kurtosis(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        let (m1, m2, m3, m4) = (self.s[0] / n, self.s[1] / n, self.s[2] / n, self.s[3] / n);
        let var = m2 - m1 * m1;
        if var <= 0.0 {
            return 0.0;
        }
        let c4 = m4 - 4.0 * m1 * m3 + 6.0 * m1 * m1 * m2 - 3.0 * m1.powi(4);
        (c4 / (var * var)).max(0.0)
    }

    pub fn sparsity(&self) -> f64 {
        if self.n == 0 { 0.0 } else { self.zeros as f64 / self.n as f64 }
    }

    /// Share of groups whose largest magnitude is at least 2^OUTLIER_OCTAVES
    /// times the median group's: a few huge values planted among normal ones.
    pub fn outlier_ratio(&self) -> f64 {
        // All-zero groups (bucket 0: padding rows, zeroed blocks) say nothing
        // about the scale of the rest, so the median is over the others.
        let groups: u64 = self.amp[1..].iter().map(|&c| u64::from(c)).sum();
        if groups == 0 {
            return 0.0;
        }
        let mut seen = 0u64;
        let mut median = 0usize;
        for (e, &c) in self.amp.iter().enumerate().skip(1) {
            seen += u64::from(c);
            if seen * 2 >= groups {
                median = e;
                break;
            }
        }
        let far: u64 = self.amp.iter().skip(median + OUTLIER_OCTAVES).map(|&c| u64::from(c)).sum();
        far as f64 / groups as f64
    }
}

/// SIMD accumulators for one batch of groups.
#[cfg(target_arch = "wasm32")]
mod simd {
    use super::Moments;
    use core::arch::wasm32::*;

    /// Power sums d^k·Σq^k of code blocks, in f32 lanes, and the count of
    /// zero values (kept here, not in `Moments`, so it stays in a register).
    pub struct CodeAcc {
        pub s: [v128; 4],
        pub zeros: u64,
    }

    impl CodeAcc {
        pub fn new() -> Self {
            CodeAcc { s: [f32x4_splat(0.0); 4], zeros: 0 }
        }
    }

    pub struct Acc {
        a: [v128; 4],
        zeros: v128,
    }

    impl Acc {
        #[inline(always)]
        pub fn new() -> Self {
            let z = f32x4_splat(0.0);
            Acc { a: [z; 4], zeros: i32x4_splat(0) }
        }

        /// Adds one group of 32 values (8 × f32x4) to the power sums only.
        /// Pairs of vectors are summed before they meet the accumulators, so
        /// each accumulator's dependency chain is half as long.
        #[inline(always)]
        pub fn sums(&mut self, v: &[v128; 8]) {
            let mut k = 0;
            while k < 8 {
                let (u, w) = (v[k], v[k + 1]);
                let (u2, w2) = (f32x4_mul(u, u), f32x4_mul(w, w));
                self.a[0] = f32x4_add(self.a[0], f32x4_add(u, w));
                self.a[1] = f32x4_add(self.a[1], f32x4_add(u2, w2));
                self.a[2] = f32x4_add(self.a[2], f32x4_add(f32x4_mul(u2, u), f32x4_mul(w2, w)));
                self.a[3] = f32x4_add(self.a[3], f32x4_add(f32x4_mul(u2, u2), f32x4_mul(w2, w2)));
                k += 2;
            }
        }

        /// Adds one group of 32 values: power sums, zeros and the group's amplitude.
        #[inline(always)]
        pub fn group(&mut self, v: &[v128; 8], m: &mut Moments) {
            self.sums(v);
            let zero = f32x4_splat(0.0);
            let mut mx = zero;
            let mut zeros = i32x4_splat(0);
            for &u in v {
                zeros = i32x4_add(zeros, f32x4_eq(u, zero));
                mx = f32x4_pmax(mx, f32x4_abs(u));
            }
            self.zeros = i32x4_add(self.zeros, zeros);
            let top = f32x4_pmax(mx, i32x4_shuffle::<2, 3, 0, 1>(mx, mx));
            let top = f32x4_pmax(top, i32x4_shuffle::<1, 0, 3, 2>(top, top));
            m.amp[((f32x4_extract_lane::<0>(top).to_bits() >> 23) & 0xff) as usize] += 1;
        }

        pub fn fold(self, m: &mut Moments, n: u64) {
            let lanes = |v: v128| {
                f64::from(f32x4_extract_lane::<0>(v))
                    + f64::from(f32x4_extract_lane::<1>(v))
                    + f64::from(f32x4_extract_lane::<2>(v))
                    + f64::from(f32x4_extract_lane::<3>(v))
            };
            for i in 0..4 {
                m.s[i] += lanes(self.a[i]);
            }
            // Each equal lane counted -1.
            let z = i32x4_extract_lane::<0>(self.zeros)
                + i32x4_extract_lane::<1>(self.zeros)
                + i32x4_extract_lane::<2>(self.zeros)
                + i32x4_extract_lane::<3>(self.zeros);
            m.zeros += u64::from(z.unsigned_abs());
            m.n += n;
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl simd::CodeAcc {
    /// One block of 32 signed codes with scale `d`: power sums from integer
    /// dot products, zeros and the amplitude from the codes.
    #[inline(always)]
    pub fn block(
        &mut self,
        d: f32,
        d_is_zero: bool,
        top_code: f32,
        c0: core::arch::wasm32::v128,
        c1: core::arch::wasm32::v128,
        m: &mut Moments,
    ) {
        use core::arch::wasm32::*;
        let x = [
            i16x8_extend_low_i8x16(c0),
            i16x8_extend_high_i8x16(c0),
            i16x8_extend_low_i8x16(c1),
            i16x8_extend_high_i8x16(c1),
        ];
        let sq = [i16x8_mul(x[0], x[0]), i16x8_mul(x[1], x[1]), i16x8_mul(x[2], x[2]), i16x8_mul(x[3], x[3])];
        let dot4 = |a: &[v128; 4], b: &[v128; 4]| {
            i32x4_add(
                i32x4_add(i32x4_dot_i16x8(a[0], b[0]), i32x4_dot_i16x8(a[1], b[1])),
                i32x4_add(i32x4_dot_i16x8(a[2], b[2]), i32x4_dot_i16x8(a[3], b[3])),
            )
        };
        // Σq fits i16 (32·128); Σq² and Σq³ fit i32; Σq⁴ fits u32 (see below).
        let s1 = i32x4_dot_i16x8(i16x8_add(i16x8_add(x[0], x[1]), i16x8_add(x[2], x[3])), i16x8_splat(1));
        let s2 = dot4(&x, &x);
        let s3 = dot4(&x, &sq);
        let s4 = dot4(&sq, &sq);
        let d2 = d * d;
        self.s[0] = f32x4_add(self.s[0], f32x4_mul(f32x4_convert_i32x4(s1), f32x4_splat(d)));
        self.s[1] = f32x4_add(self.s[1], f32x4_mul(f32x4_convert_i32x4(s2), f32x4_splat(d2)));
        self.s[2] = f32x4_add(self.s[2], f32x4_mul(f32x4_convert_i32x4(s3), f32x4_splat(d2 * d)));
        // Σq⁴ per lane is at most 8·128⁴ = 2^31: it wraps a signed lane only
        // at that extreme, seen as negative and mended by adding 2^32. A signed
        // convert plus the mend is far cheaper on x86 than an unsigned convert.
        let q4 = f32x4_convert_i32x4(s4);
        let q4 = f32x4_add(q4, v128_and(i32x4_lt(s4, i32x4_splat(0)), f32x4_splat(4294967296.0)));
        self.s[3] = f32x4_add(self.s[3], f32x4_mul(q4, f32x4_splat(d2 * d2)));
        let zero = i8x16_splat(0);
        self.zeros += if d_is_zero {
            32
        } else {
            u64::from(i8x16_bitmask(i8x16_eq(c0, zero)).count_ones() + i8x16_bitmask(i8x16_eq(c1, zero)).count_ones())
        };
        // The amplitude is |d| times the largest code a block of this format
        // has (llama.cpp picks d so that the largest element gets it): no
        // horizontal reduction per block.
        let amax = top_code * d.abs();
        m.amp[((amax.to_bits() >> 23) & 0xff) as usize] += 1;
    }

    /// Folds the lanes into the f64 sums; `n` values were added.
    pub fn fold(self, m: &mut Moments, n: u64) {
        use core::arch::wasm32::*;
        for (i, v) in self.s.iter().enumerate() {
            m.s[i] += f64::from(f32x4_extract_lane::<0>(*v))
                + f64::from(f32x4_extract_lane::<1>(*v))
                + f64::from(f32x4_extract_lane::<2>(*v))
                + f64::from(f32x4_extract_lane::<3>(*v));
        }
        m.zeros += self.zeros;
        m.n += n;
    }
}

/// 16× the median group amplitude.
pub const OUTLIER_OCTAVES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_of_a_known_sequence() {
        let xs: Vec<f32> = (0..100).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let mut m = Moments::default();
        m.add(&xs);
        assert_eq!(m.n, 100);
        assert!(m.mean().abs() < 1e-12);
        assert!((m.std() - 1.0).abs() < 1e-9);
        assert!((m.kurtosis() - 1.0).abs() < 1e-9);
        let mut bytes = Vec::new();
        for x in &xs {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let mut b = Moments::default();
        b.add_f32_bytes(&bytes);
        assert_eq!(b.n, m.n);
        assert!((b.s[3] - m.s[3]).abs() < 1e-9);
    }

    #[test]
    fn fast_f16_matches_the_sdk() {
        for bits in (0u16..=0xffff).filter(|b| b & 0x7c00 != 0x7c00) {
            assert_eq!(fast_f16(bits).to_bits(), airlock_sdk::tensor::f16_to_f32(bits).to_bits(), "{bits:#06x}");
        }
    }

    #[test]
    fn outliers_and_zeros() {
        let mut xs = vec![0.5f32; 32 * 100];
        xs[5] = 100.0; // one group with a 200× element
        for x in &mut xs[32..64] {
            *x = 0.0;
        }
        let mut m = Moments::default();
        m.add(&xs);
        assert!((m.outlier_ratio() - 1.0 / 99.0).abs() < 1e-9, "zero groups are not counted");
        assert!((m.sparsity() - 0.01).abs() < 1e-9);
    }
}
