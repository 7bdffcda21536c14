//! Q4_K and Q6_K blocks dequantised with wasm `simd128`: the SDK's scalar
//! loops ran at about 0.4 GB/s in wasm, a quarter of the symmetric formats.
//! Every element is computed with the same f32 operations in the same order
//! as `airlock_sdk::quant::Quant::dequantize` (a product, then a difference),
//! so the values, and the statistics built from them, are bit for bit the same.

use airlock_sdk::quant::{BlockScales, Quant, scale_min_k4};
use airlock_sdk::tensor::f16_to_f32;
use core::arch::wasm32::*;

/// Dequantises one block of `quant` into `out`: SIMD for Q4_K and Q6_K, the
/// SDK for every other format.
pub fn dequantize(quant: Quant, b: &[u8], out: &mut [f32]) -> BlockScales {
    match quant {
        Quant::Q4K if b.len() >= 144 && out.len() >= 256 => q4_k(b, out),
        Quant::Q6K if b.len() >= 210 && out.len() >= 256 => q6_k(b, out),
        _ => quant.dequantize(b, out),
    }
}

/// 16 bytes as four f32x4 of their unsigned (or, with `signed`, signed) values.
#[inline(always)]
fn widen(v: v128, signed: bool) -> [v128; 4] {
    let (w0, w1) = if signed {
        (i16x8_extend_low_i8x16(v), i16x8_extend_high_i8x16(v))
    } else {
        (u16x8_extend_low_u8x16(v), u16x8_extend_high_u8x16(v))
    };
    let ints = if signed {
        [
            i32x4_extend_low_i16x8(w0),
            i32x4_extend_high_i16x8(w0),
            i32x4_extend_low_i16x8(w1),
            i32x4_extend_high_i16x8(w1),
        ]
    } else {
        [
            u32x4_extend_low_u16x8(w0),
            u32x4_extend_high_u16x8(w0),
            u32x4_extend_low_u16x8(w1),
            u32x4_extend_high_u16x8(w1),
        ]
    };
    ints.map(|i| f32x4_convert_i32x4(i))
}

/// Writes `scale · v − min` for 16 codes at `out[..16]`.
#[inline(always)]
fn store_affine(v: v128, signed: bool, scale: f32, min: f32, out: &mut [f32]) {
    let (s, m) = (f32x4_splat(scale), f32x4_splat(min));
    let out = &mut out[..16];
    for (k, f) in widen(v, signed).into_iter().enumerate() {
        let x = f32x4_sub(f32x4_mul(s, f), m);
        // SAFETY: `out` has 16 f32; lanes 4k..4k+4 lie inside it.
        unsafe { v128_store(out.as_mut_ptr().add(4 * k).cast::<v128>(), x) };
    }
}

#[inline(always)]
fn count_eq(v: v128, x: u8) -> u32 {
    i8x16_bitmask(i8x16_eq(v, u8x16_splat(x))).count_ones()
}

#[inline(always)]
fn load(b: &[u8], at: usize) -> v128 {
    let s = &b[at..at + 16];
    // SAFETY: `s` is 16 bytes; v128_load has no alignment requirement.
    unsafe { v128_load(s.as_ptr().cast::<v128>()) }
}

/// Q4_K: d and dmin (f16), 12 bytes of 6-bit sub-block scales and mins, 128
/// bytes of nibbles. Sub-block 2k takes the low nibbles of bytes 32k..32k+32,
/// sub-block 2k+1 the high ones; x = d·scale·q − dmin·min.
#[inline(never)]
fn q4_k(b: &[u8], out: &mut [f32]) -> BlockScales {
    let (d, dmin) = (f16_to_f32(u16::from_le_bytes([b[0], b[1]])), f16_to_f32(u16::from_le_bytes([b[2], b[3]])));
    let scales = &b[4..16];
    let low = u8x16_splat(0x0f);
    let mut sat = 0;
    for k in 0..4 {
        let (s1, m1) = scale_min_k4(2 * k, scales);
        let (s2, m2) = scale_min_k4(2 * k + 1, scales);
        let (d1, min1) = (d * f32::from(s1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(s2), dmin * f32::from(m2));
        let o = &mut out[64 * k..64 * k + 64];
        for half in 0..2 {
            let q = load(b, 16 + 32 * k + 16 * half);
            let (lo, hi) = (v128_and(q, low), u8x16_shr(q, 4));
            sat += count_eq(lo, 15) + count_eq(hi, 15);
            store_affine(lo, false, d1, min1, &mut o[16 * half..]);
            store_affine(hi, false, d2, min2, &mut o[32 + 16 * half..]);
        }
    }
    BlockScales { d, d_bits: u32::from(u16::from_le_bytes([b[0], b[1]])), dmin: Some(dmin), saturated: sat }
}

/// Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed 8-bit
/// scales (one per 16 elements) and d (f16); x = d·scale·(q − 32).
#[inline(never)]
fn q6_k(b: &[u8], out: &mut [f32]) -> BlockScales {
    let bits = u16::from_le_bytes([b[208], b[209]]);
    let d = f16_to_f32(bits);
    let (low, two, bias) = (u8x16_splat(0x0f), u8x16_splat(3), u8x16_splat(32));
    let mut sat = 0;
    for n in 0..2 {
        let (ql, qh, sc) = (64 * n, 128 + 32 * n, 192 + 8 * n);
        let y = &mut out[128 * n..128 * n + 128];
        for h in 0..2 {
            let (a, c, hb) = (load(b, ql + 16 * h), load(b, ql + 32 + 16 * h), load(b, qh + 16 * h));
            let q = [
                v128_or(v128_and(a, low), i8x16_shl(v128_and(hb, two), 4)),
                v128_or(v128_and(c, low), i8x16_shl(v128_and(u8x16_shr(hb, 2), two), 4)),
                v128_or(u8x16_shr(a, 4), i8x16_shl(v128_and(u8x16_shr(hb, 4), two), 4)),
                v128_or(u8x16_shr(c, 4), i8x16_shl(u8x16_shr(hb, 6), 4)),
            ];
            for (i, q) in q.into_iter().enumerate() {
                sat += count_eq(q, 0);
                let scale = d * f32::from(b[sc + h + 2 * i] as i8);
                store_affine(i8x16_sub(q, bias), true, scale, 0.0, &mut y[16 * h + 32 * i..]);
            }
        }
    }
    BlockScales { d, d_bits: u32::from(bits), dmin: None, saturated: sat }
}
