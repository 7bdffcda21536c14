//! Dequantisation of GGML block formats into f32, block by block, following
//! the block layouts of ggml-common.h (the knowledge, written anew here).
//!
//! [`Quant::of`] tells whether a dtype is supported; [`Quant::dequantize`]
//! turns one block into its elements. Callers stream a tensor in chunks of
//! whole blocks and never hold more than one chunk.

use crate::Dtype;
use crate::tensor::f16_to_f32;

/// A supported block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// What a block's scales say, for block-level analysis.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockScales {
    /// The super-block scale `d`.
    pub d: f32,
    /// The raw bits of `d` (f16 bits widened, or f32 bits for Q8_K).
    pub d_bits: u32,
    /// The minimum scale `dmin` or `m`, for formats that have one.
    pub dmin: Option<f32>,
    /// How many codes sit at an end of their range (saturated).
    pub saturated: u32,
}

fn h(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

impl Quant {
    /// The block format of `dtype`, if this SDK can dequantise it.
    pub fn of(dtype: Dtype) -> Option<Quant> {
        Some(match dtype {
            Dtype::Q40 => Quant::Q4_0,
            Dtype::Q41 => Quant::Q4_1,
            Dtype::Q50 => Quant::Q5_0,
            Dtype::Q51 => Quant::Q5_1,
            Dtype::Q80 => Quant::Q8_0,
            Dtype::Q2k => Quant::Q2K,
            Dtype::Q3k => Quant::Q3K,
            Dtype::Q4k => Quant::Q4K,
            Dtype::Q5k => Quant::Q5K,
            Dtype::Q6k => Quant::Q6K,
            Dtype::Q8k => Quant::Q8K,
            _ => return None,
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Quant::Q4_0 | Quant::Q4_1 | Quant::Q5_0 | Quant::Q5_1 | Quant::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Quant::Q4_0 => 18,
            Quant::Q4_1 => 20,
            Quant::Q5_0 => 22,
            Quant::Q5_1 => 24,
            Quant::Q8_0 => 34,
            Quant::Q2K => 84,
            Quant::Q3K => 110,
            Quant::Q4K => 144,
            Quant::Q5K => 176,
            Quant::Q6K => 210,
            Quant::Q8K => 292,
        }
    }

    /// True when any scale of the block (`d`, `dmin`/`m`) is NaN or infinite.
    pub fn scales_non_finite(self, b: &[u8]) -> bool {
        let f16_bad = |at: usize| h(b, at) & 0x7c00 == 0x7c00;
        match self {
            Quant::Q4_0 | Quant::Q5_0 | Quant::Q8_0 => f16_bad(0),
            Quant::Q4_1 | Quant::Q5_1 | Quant::Q4K | Quant::Q5K => f16_bad(0) || f16_bad(2),
            Quant::Q2K => f16_bad(80) || f16_bad(82),
            Quant::Q3K => f16_bad(108),
            Quant::Q6K => f16_bad(208),
            Quant::Q8K => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000,
        }
    }

    /// Dequantises one block (`b.len() == block_bytes()`) into
    /// `out[..block_elems()]` and returns its scales.
    pub fn dequantize(self, b: &[u8], out: &mut [f32]) -> BlockScales {
        match self {
            Quant::Q4_0 => {
                let d = f16_to_f32(h(b, 0));
                let qs = &b[2..18];
                let mut sat = 0;
                for j in 0..16 {
                    let (lo, hi) = (qs[j] & 0xF, qs[j] >> 4);
                    sat += u32::from(lo == 0) + u32::from(hi == 0);
                    out[j] = (i32::from(lo) - 8) as f32 * d;
                    out[j + 16] = (i32::from(hi) - 8) as f32 * d;
                }
                BlockScales { d, d_bits: u32::from(h(b, 0)), dmin: None, saturated: sat }
            }
            Quant::Q4_1 => {
                let (d, m) = (f16_to_f32(h(b, 0)), f16_to_f32(h(b, 2)));
                let qs = &b[4..20];
                let mut sat = 0;
                for j in 0..16 {
                    let (lo, hi) = (qs[j] & 0xF, qs[j] >> 4);
                    sat += u32::from(lo == 15) + u32::from(hi == 15);
                    out[j] = f32::from(lo) * d + m;
                    out[j + 16] = f32::from(hi) * d + m;
                }
                BlockScales { d, d_bits: u32::from(h(b, 0)), dmin: Some(m), saturated: sat }
            }
            Quant::Q5_0 | Quant::Q5_1 => {
                let one = self == Quant::Q5_1;
                let d = f16_to_f32(h(b, 0));
                let (m, at) = if one { (f16_to_f32(h(b, 2)), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                let (bias, edge) = if one { (0, 31) } else { (16, 0) };
                let mut sat = 0;
                for j in 0..16 {
                    let x0 = (qs[j] & 0xF) as u32 | (((qh >> j) << 4) & 0x10);
                    let x1 = (qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10);
                    sat += u32::from(x0 == edge) + u32::from(x1 == edge);
                    out[j] = (x0 as i32 - bias) as f32 * d + m;
                    out[j + 16] = (x1 as i32 - bias) as f32 * d + m;
                }
                BlockScales { d, d_bits: u32::from(h(b, 0)), dmin: one.then_some(m), saturated: sat }
            }
            Quant::Q8_0 => {
                let d = f16_to_f32(h(b, 0));
                let mut sat = 0;
                for (o, &q) in out[..32].iter_mut().zip(&b[2..34]) {
                    let q = q as i8;
                    sat += u32::from(q == 127 || q == -127 || q == -128);
                    *o = f32::from(q) * d;
                }
                BlockScales { d, d_bits: u32::from(h(b, 0)), dmin: None, saturated: sat }
            }
            Quant::Q8K => {
                let bits = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                let d = f32::from_bits(bits);
                let mut sat = 0;
                for (o, &q) in out[..256].iter_mut().zip(&b[4..260]) {
                    let q = q as i8;
                    sat += u32::from(q == 127 || q == -127 || q == -128);
                    *o = f32::from(q) * d;
                }
                BlockScales { d, d_bits: bits, dmin: None, saturated: sat }
            }
            Quant::Q2K => {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (f16_to_f32(h(b, 80)), f16_to_f32(h(b, 82)));
                let mut y = 0;
                let mut is = 0;
                for n in 0..2 {
                    let q = &qs[n * 32..n * 32 + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let sc = scales[is];
                            is += 1;
                            let (dl, ml) = (d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
                            for &byte in &q[half * 16..half * 16 + 16] {
                                out[y] = dl * f32::from((byte >> shift) & 3) - ml;
                                y += 1;
                            }
                        }
                    }
                }
                BlockScales { d, d_bits: u32::from(h(b, 80)), dmin: Some(dmin), saturated: 0 }
            }
            Quant::Q3K => {
                let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
                let d = f16_to_f32(h(b, 108));
                let word = |i: usize| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]);
                let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                let (a0, a1, tmp) = (word(0), word(1), word(2));
                let aux = [
                    (a0 & k2) | ((tmp & k1) << 4),
                    (a1 & k2) | (((tmp >> 2) & k1) << 4),
                    ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                    ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
                ];
                let mut scales = [0i8; 16];
                for (i, s) in scales.iter_mut().enumerate() {
                    *s = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8;
                }
                let mut y = 0;
                let mut is = 0;
                let mut m = 1u8;
                for n in 0..2 {
                    let q = &qs[n * 32..n * 32 + 32];
                    for shift in [0, 2, 4, 6] {
                        for half in 0..2 {
                            let dl = d * f32::from(scales[is] as i16 - 32);
                            is += 1;
                            for l in half * 16..half * 16 + 16 {
                                let low = i16::from((q[l] >> shift) & 3);
                                let high = if hmask[l] & m != 0 { 0 } else { 4 };
                                out[y] = dl * f32::from(low - high);
                                y += 1;
                            }
                        }
                        m <<= 1;
                    }
                }
                BlockScales { d, d_bits: u32::from(h(b, 108)), dmin: None, saturated: 0 }
            }
            Quant::Q4K | Quant::Q5K => {
                let five = self == Quant::Q5K;
                let (d, dmin) = (f16_to_f32(h(b, 0)), f16_to_f32(h(b, 2)));
                let scales = &b[4..16];
                let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                let mut sat = 0;
                for (k, chunk) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min_k4(2 * k, scales);
                    let (s2, m2) = scale_min_k4(2 * k + 1, scales);
                    let (d1, min1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, min2) = (d * f32::from(s2), dmin * f32::from(m2));
                    let (o1, o2) = out[64 * k..64 * k + 64].split_at_mut(32);
                    for l in 0..32 {
                        let (mut lo, mut hi) = (chunk[l] & 0xF, chunk[l] >> 4);
                        if five {
                            lo |= ((qh[l] >> (2 * k)) & 1) << 4;
                            hi |= ((qh[l] >> (2 * k + 1)) & 1) << 4;
                        }
                        let top = if five { 31 } else { 15 };
                        sat += u32::from(lo == top) + u32::from(hi == top);
                        o1[l] = d1 * f32::from(lo) - min1;
                        o2[l] = d2 * f32::from(hi) - min2;
                    }
                }
                BlockScales { d, d_bits: u32::from(h(b, 0)), dmin: Some(dmin), saturated: sat }
            }
            Quant::Q6K => {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_to_f32(h(b, 208));
                let mut sat = 0;
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let y = &mut out[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q = [
                            (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (i, &q) in q.iter().enumerate() {
                            sat += u32::from(q == 0);
                            y[l + 32 * i] = d * f32::from(sc[is + 2 * i] as i8) * f32::from(q as i8 - 32);
                        }
                    }
                }
                BlockScales { d, d_bits: u32::from(h(b, 208)), dmin: None, saturated: sat }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16(x: f32) -> [u8; 2] {
        // Exact for the small powers of two used below.
        let bits: u16 = match x {
            0.5 => 0x3800,
            1.0 => 0x3c00,
            2.0 => 0x4000,
            0.25 => 0x3400,
            _ => panic!("add {x}"),
        };
        bits.to_le_bytes()
    }

    #[test]
    fn q8_0() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16(0.5));
        for i in 0..32 {
            b[2 + i] = (i as i8 - 16) as u8;
        }
        let mut out = [0f32; 32];
        let s = Quant::Q8_0.dequantize(&b, &mut out);
        assert_eq!(s.d, 0.5);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, (i as f32 - 16.0) * 0.5);
        }
        b[..2].copy_from_slice(&0x7c00u16.to_le_bytes());
        assert!(Quant::Q8_0.scales_non_finite(&b));
    }

    #[test]
    fn q4_0_nibbles() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16(2.0));
        b[2] = 0x9F; // element 0: 15 - 8 = 7; element 16: 9 - 8 = 1
        let mut out = [0f32; 32];
        let s = Quant::Q4_0.dequantize(&b, &mut out);
        assert_eq!(out[0], 14.0);
        assert_eq!(out[16], 2.0);
        assert_eq!(out[1], -16.0); // code 0 → -8 · 2, saturated
        assert_eq!(s.saturated, 30);
    }

    #[test]
    fn q5_0_high_bit() {
        let mut b = vec![0u8; 22];
        b[..2].copy_from_slice(&f16(1.0));
        b[2..6].copy_from_slice(&(1u32 | 1 << 16).to_le_bytes()); // high bit of elements 0 and 16
        b[6] = 0x21; // element 0 low nibble 1, element 16 low nibble 2
        let mut out = [0f32; 32];
        Quant::Q5_0.dequantize(&b, &mut out);
        assert_eq!(out[0], (17 - 16) as f32);
        assert_eq!(out[16], (18 - 16) as f32);
        assert_eq!(out[1], -16.0);
    }

    #[test]
    fn q4_k_scales_and_mins() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16(0.5)); // d
        b[2..4].copy_from_slice(&f16(0.25)); // dmin
        b[4] = 3; // sub-block 0 scale 3
        b[8] = 4; // sub-block 0 min 4
        b[5] = 2; // sub-block 1 scale 2, min 0
        b[16] = 0x5A; // element 0: 0xA, element 32: 0x5
        let mut out = [0f32; 256];
        Quant::Q4K.dequantize(&b, &mut out);
        assert_eq!(out[0], 0.5 * 3.0 * 10.0 - 0.25 * 4.0);
        assert_eq!(out[32], 0.5 * 2.0 * 5.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q6_k_signed_codes() {
        let mut b = vec![0u8; 210];
        b[208..210].copy_from_slice(&f16(1.0));
        b[192] = 2; // scale of elements 0..16
        b[0] = 0x01; // ql low nibble 1, qh bits 0 → q = 1 - 32
        let mut out = [0f32; 256];
        Quant::Q6K.dequantize(&b, &mut out);
        assert_eq!(out[0], 2.0 * -31.0);
        assert_eq!(out[1], 2.0 * -32.0);
    }

    /// One block of random bytes per format (finite scales written in), and
    /// what gguf-py's `dequantize` (the llama.cpp reference, in numpy) makes of
    /// it: Σx, Σx², the first and the last element. Generated once with
    /// gguf 0.17 / numpy; the block bytes are arbitrary, so every code path is hit.
    #[test]
    fn agrees_with_gguf_py_on_random_blocks() {
        let vectors: [(Quant, &str, f64, f64, f64, f64); 10] = [
            (
                Quant::Q4_0,
                "0423b6faf3fe08fa81ace9fcf7815461b43c",
                0.328857421875,
                0.14194320514798164,
                -0.02740478515625,
                -0.068511962890625,
            ),
            (
                Quant::Q4_1,
                "0423391d8e3eda1a5246fe42841e87234658b051",
                3.068115234375,
                0.41498730098828673,
                0.19693374633789062,
                0.07361221313476562,
            ),
            (
                Quant::Q5_0,
                "04233a891f3a3b1e8751bdcb5265e43d9bf23ac98670",
                -0.205535888671875,
                0.4113724371418357,
                -0.068511962890625,
                -0.123321533203125,
            ),
            (
                Quant::Q5_1,
                "0423391dbce5cdf6fb0e55f5b68d7e4330df3c8ef7c6e570",
                8.46685791015625,
                2.65740947984159,
                0.15582656860351562,
                0.3202552795410156,
            ),
            (
                Quant::Q8_0,
                "042335414d7e209c5d46a8e5084916dd74a85ea503391fddcd59ba849105c5acad32",
                0.24664306640625,
                33.010807463899255,
                0.726226806640625,
                0.68511962890625,
            ),
            (
                Quant::Q2K,
                "7786eda87027190cd49d5abcf2a919bd3c6206394868f9dd8b870c2ca566e9c90084d3de3e969b7b403f650fcbaf8e29813c06af17eaa30a3c41d6ab24acc523a6ac6b9ce51e7a8caf28650f6d51b12d0423391d",
                34.537200927734375,
                11.159228627337143,
                -0.035701751708984375,
                -0.056102752685546875,
            ),
            (
                Quant::Q3K,
                "660e476741225f7064b00a74b72558885c9b6b311047cd005dd64ea5800a53401c635ba88007c6db81ed4f6e4d5ae06c7ba40d2d33a25ebc1422ebb235060becc997a5c651154a27ee13b1cd6bb304feb38d8d5bb44bad2e301d19da393dabf0abcb92f9c8f73d16a3cf03e10423",
                8.90655517578125,
                127.80671334639192,
                -1.4798583984375,
                -0.232940673828125,
            ),
            (
                Quant::Q4K,
                "0423391ddea238d4333dbde7850af347a34596c201c87cde90b386ddc56ff6f905875d54d78b7ad7b016dd6c5961e972844be6c1f4a3d95eabe6d2c06639907b12d70f02b9359917c8e186c36ae7073a9ff213fca6675c8992babb2bca11b5bb04bdf93245d1eb7275acf394664c354e0bcd1eadb12886f26149495ae5c043c0ccaa4647f92ad8786672191c34081075",
                889.6883850097656,
                5286.005767998518,
                0.9731025695800781,
                5.0102081298828125,
            ),
            (
                Quant::Q5K,
                "0423391d88fe0fbffd4e9650847cfbdaf7e5228509eb224b31def83fc07fbabb3b72788167870fcf25d373c6c62118e3367a1d3f26785b068e23326bcb7036832bda79adb885df9cf719efb6eaf2c447b2fb9e1ea3e7be73b2602d40f41afe87b306109f9d2717fdf523b0cc07c98701f316389e0ba187338a27906bb89cc241cc981d07c40d3b57d7deb3c15f89910d23a6e7fbab249553897299be7c9ac732605b2d1ea56d47d435a8418b2e671aa3",
                2021.7726135253906,
                29912.441987452796,
                2.100505828857422,
                14.815105438232422,
            ),
            (
                Quant::Q6K,
                "d953ea6aad71df15dc19ba05366f5c38c21c5512fb8c61aebb2531591ab3682281205a74cc14def46fb23013423cf322c0750ad8163536ccf7027b080f2a907f68bab8fe5b53014e8634c2c086edf43b4ddc35f7e42e9ce440a88e86793ba660f00241e921608b134d4f9030e690a708d168bb636a4a2c7612a60cd355edb2df8eebaf98298bc159d5bf1de62c3ed2d25bfa583577a37bf2c688527a7894291170a008a5883f3f4c35a666411c56819efdda308b93f93f4d530b6467adbcc22cdc423875b06dd97eb3e6c472e3bdb4c20423",
                250.0960693359375,
                87664.94286466762,
                -4.4395751953125,
                16.14141845703125,
            ),
        ];
        for (quant, hex, sum, sum2, first, last) in vectors {
            let bytes: Vec<u8> =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            assert_eq!(bytes.len(), quant.block_bytes(), "{quant:?}");
            let mut out = vec![0f32; quant.block_elems()];
            quant.dequantize(&bytes, &mut out);
            let s: f64 = out.iter().map(|&x| f64::from(x)).sum();
            let s2: f64 = out.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
            assert!(close(s, sum) && close(s2, sum2), "{quant:?}: sums {s}, {s2} vs gguf-py {sum}, {sum2}");
            assert!(close(f64::from(out[0]), first) && close(f64::from(out[out.len() - 1]), last), "{quant:?}: ends");
        }
    }

    #[test]
    fn layouts_agree_with_block_layout() {
        for (dt, q) in [(Dtype::Q40, Quant::Q4_0), (Dtype::Q3k, Quant::Q3K), (Dtype::Q8k, Quant::Q8K)] {
            let (e, b) = crate::tensor::block_layout(dt).unwrap();
            assert_eq!((e as usize, b as usize), (q.block_elems(), q.block_bytes()));
            assert_eq!(Quant::of(dt), Some(q));
        }
    }
}
