//! Element types: sizes and decoding.

use crate::Dtype;

/// Elements per block and bytes per block for a dtype (1 element per block for
/// plain types). `None` for `Dtype::Other` and sub-byte types the SDK does not know.
pub fn block_layout(dtype: Dtype) -> Option<(u64, u64)> {
    use Dtype::*;
    Some(match dtype {
        F64 | I64 | U64 => (1, 8),
        F32 | I32 | U32 => (1, 4),
        F16 | Bf16 | I16 | U16 => (1, 2),
        I8 | U8 | Boolean | F8e4m3 | F8e5m2 => (1, 1),
        Q40 => (32, 18),
        Q41 => (32, 20),
        Q50 => (32, 22),
        Q51 => (32, 24),
        Q80 => (32, 34),
        Q81 => (32, 36),
        Q2k => (256, 84),
        Q3k => (256, 110),
        Q4k => (256, 144),
        Q5k => (256, 176),
        Q6k => (256, 210),
        Q8k => (256, 292),
        Iq2xxs => (256, 66),
        Iq2xs => (256, 74),
        Iq3xxs => (256, 98),
        Iq1s => (256, 50),
        Iq4nl => (32, 18),
        Iq3s => (256, 110),
        Iq2s => (256, 82),
        Iq4xs => (256, 136),
        Iq1m => (256, 56),
        Tq10 => (256, 54),
        Tq20 => (256, 66),
        Mxfp4 => (32, 17),
        Other => return None,
    })
}

/// IEEE 754 half precision to f32, by the `half` crate (exact: every f16
/// value is an f32 value).
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// bfloat16 to f32 (the top half of an f32).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn half_precision() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }
}
