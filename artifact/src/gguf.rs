//! Strict GGUF v2/v3 header parsing.
//!
//! The rules are llama.cpp's, made strict where llama.cpp is lax: every count
//! and length is bounded by the bytes left in the file; tensor offsets must be
//! the running padded size of the tensors before them; nothing may follow the
//! data except zero padding; padding anywhere must be zero, so no bytes hide
//! outside the declared tensors.

use std::collections::HashSet;

use super::reader::Reader;
use super::source::ByteSource;
use super::{Dtype, Header, MetaValue, ParseError, TensorInfo, Texts};

const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// llama.cpp's GGML_MAX_NAME (names must be shorter).
const MAX_NAME: usize = 64;
/// Keys are identifiers; nothing legitimate comes near this.
const MAX_KEY: u64 = 64 << 10;
/// Counts bounded only by the file size still let a crafted file expand in
/// memory (an 8-byte empty string becomes a 24-byte `String`), so the header
/// also has absolute caps, each far above any real model: the largest
/// vocabularies have ~262k tokens, the largest MoE models a few thousand tensors.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_KEYS: u64 = 1 << 20;
const MAX_ARRAY_ELEMENTS: u64 = 8 << 20;
/// Never pre-allocate more than this from a count the file declares.
const PREALLOC: usize = 1 << 16;

/// A GGML tensor type: its id, name, WIT dtype, elements per block and bytes per block.
struct GgmlType {
    name: &'static str,
    dtype: Dtype,
    block: u64,
    size: u64,
}

fn ggml_type(id: u32) -> Option<GgmlType> {
    use Dtype::*;
    let (name, dtype, block, size) = match id {
        0 => ("F32", F32, 1, 4),
        1 => ("F16", F16, 1, 2),
        2 => ("Q4_0", Q40, 32, 18),
        3 => ("Q4_1", Q41, 32, 20),
        6 => ("Q5_0", Q50, 32, 22),
        7 => ("Q5_1", Q51, 32, 24),
        8 => ("Q8_0", Q80, 32, 34),
        9 => ("Q8_1", Q81, 32, 36),
        10 => ("Q2_K", Q2k, 256, 84),
        11 => ("Q3_K", Q3k, 256, 110),
        12 => ("Q4_K", Q4k, 256, 144),
        13 => ("Q5_K", Q5k, 256, 176),
        14 => ("Q6_K", Q6k, 256, 210),
        15 => ("Q8_K", Q8k, 256, 292),
        16 => ("IQ2_XXS", Iq2xxs, 256, 66),
        17 => ("IQ2_XS", Iq2xs, 256, 74),
        18 => ("IQ3_XXS", Iq3xxs, 256, 98),
        19 => ("IQ1_S", Iq1s, 256, 50),
        20 => ("IQ4_NL", Iq4nl, 32, 18),
        21 => ("IQ3_S", Iq3s, 256, 110),
        22 => ("IQ2_S", Iq2s, 256, 82),
        23 => ("IQ4_XS", Iq4xs, 256, 136),
        24 => ("I8", I8, 1, 1),
        25 => ("I16", I16, 1, 2),
        26 => ("I32", I32, 1, 4),
        27 => ("I64", I64, 1, 8),
        28 => ("F64", F64, 1, 8),
        29 => ("IQ1_M", Iq1m, 256, 56),
        30 => ("BF16", Bf16, 1, 2),
        34 => ("TQ1_0", Tq10, 256, 54),
        35 => ("TQ2_0", Tq20, 256, 66),
        39 => ("MXFP4", Mxfp4, 32, 17),
        _ => return None,
    };
    Some(GgmlType { name, dtype, block, size })
}

// GGUF metadata value types.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// The smallest encoding of one value of a type (strings: their u64 length).
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 | T_STRING => 8,
        _ => return None,
    })
}

/// A string's u64 length, refused when over `max` (the error names where the length sits).
fn string_len(r: &mut Reader, field: &str, max: u64) -> Result<u64, ParseError> {
    let at = r.pos();
    let len = r.u64(field)?;
    if len > max {
        return Err(ParseError::new(at, field, format!("string length {len} exceeds the limit of {max}")));
    }
    Ok(len)
}

fn string(r: &mut Reader, field: &str, max: u64) -> Result<Vec<u8>, ParseError> {
    let len = string_len(r, field, max)?;
    r.take(len, field)
}

fn utf8(bytes: Vec<u8>, at: u64, field: &str) -> Result<String, ParseError> {
    String::from_utf8(bytes).map_err(|e| ParseError::new(at, field, format!("not valid UTF-8 ({e})")))
}

fn scalar(r: &mut Reader, ty: u32, field: &str) -> Result<MetaValue, ParseError> {
    let at = r.pos();
    Ok(match ty {
        T_U8 => MetaValue::Uint(r.u8(field)?.into()),
        T_I8 => MetaValue::Int((r.u8(field)? as i8).into()),
        T_U16 => MetaValue::Uint(r.u16(field)?.into()),
        T_I16 => MetaValue::Int((r.u16(field)? as i16).into()),
        T_U32 => MetaValue::Uint(r.u32(field)?.into()),
        T_I32 => MetaValue::Int((r.u32(field)? as i32).into()),
        T_U64 => MetaValue::Uint(r.u64(field)?),
        T_I64 => MetaValue::Int(r.u64(field)? as i64),
        T_F32 => MetaValue::Float(f32::from_bits(r.u32(field)?).into()),
        T_F64 => MetaValue::Float(f64::from_bits(r.u64(field)?)),
        T_BOOL => match r.u8(field)? {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => return Err(ParseError::new(at, field, format!("bool value {b} is neither 0 nor 1"))),
        },
        T_STRING => {
            let max = r.remaining();
            // Valid UTF-8 (nearly every string) keeps its buffer: one allocation per string,
            // which matters for a 262k-token vocabulary.
            MetaValue::Text(
                String::from_utf8(string(r, field, max)?)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            )
        }
        _ => return Err(ParseError::new(at, field, format!("unknown value type {ty}"))),
    })
}

fn array(r: &mut Reader, field: &str, budget: &mut u64) -> Result<MetaValue, ParseError> {
    let at = r.pos();
    let ty = r.u32(field)?;
    if ty == T_ARRAY {
        return Err(ParseError::new(at, field, "nested arrays are not supported"));
    }
    let Some(min) = min_size(ty) else {
        return Err(ParseError::new(at, field, format!("unknown array element type {ty}")));
    };
    let count_at = r.pos();
    let count = r.u64(field)?;
    if count > r.remaining() / min {
        return Err(ParseError::new(
            count_at,
            field,
            format!("array count {count} cannot fit in the {} bytes left", r.remaining()),
        ));
    }
    if count > *budget {
        return Err(ParseError::new(
            count_at,
            field,
            format!(
                "array count {count} exceeds what is left of the {MAX_ARRAY_ELEMENTS}-element limit for all arrays"
            ),
        ));
    }
    *budget -= count;
    if ty == T_STRING {
        // Read back to back, then checked as UTF-8 in one pass; a string that
        // is invalid on its own is kept lossily, as scalars are.
        let (mut raw, mut ends) = (Vec::new(), Vec::with_capacity((count as usize).min(PREALLOC)));
        for _ in 0..count {
            let max = r.remaining();
            let len = string_len(r, field, max)?;
            r.with_bytes(len, field, |b| raw.extend_from_slice(b))?;
            ends.push(raw.len());
        }
        return Ok(MetaValue::Texts(Texts::from_utf8_parts(raw, ends)));
    }
    // Fixed-size elements: decoded a batch at a time from the read buffer.
    let n = count as usize;
    // Every byte pattern is a valid number; only bools have bad values.
    macro_rules! numbers {
        ($decode:expr) => {
            batched(r, field, n, $decode, |_: &[u8]| None)?
        };
    }
    Ok(match ty {
        T_U8 => MetaValue::Uints(numbers!(|b: [u8; 1]| u64::from(b[0]))),
        T_U16 => MetaValue::Uints(numbers!(|b| u64::from(u16::from_le_bytes(b)))),
        T_U32 => MetaValue::Uints(numbers!(|b| u64::from(u32::from_le_bytes(b)))),
        T_U64 => MetaValue::Uints(numbers!(u64::from_le_bytes)),
        T_I8 => MetaValue::Ints(numbers!(|b: [u8; 1]| i64::from(b[0] as i8))),
        T_I16 => MetaValue::Ints(numbers!(|b| i64::from(i16::from_le_bytes(b)))),
        T_I32 => MetaValue::Ints(numbers!(|b| i64::from(i32::from_le_bytes(b)))),
        T_I64 => MetaValue::Ints(numbers!(i64::from_le_bytes)),
        T_F32 => MetaValue::Floats(numbers!(|b| f64::from(f32::from_le_bytes(b)))),
        T_F64 => MetaValue::Floats(numbers!(f64::from_le_bytes)),
        T_BOOL => MetaValue::Bools(batched(
            r,
            field,
            n,
            |b: [u8; 1]| b[0] == 1,
            |b| b.iter().position(|&x| x > 1).map(|i| (i, format!("bool value {} is neither 0 nor 1", b[i]))),
        )?),
        _ => unreachable!("min_size() filtered the types"),
    })
}

/// Decodes `n` elements of `SIZE` bytes, a batch at a time from the read
/// buffer (a constant size lets the decoding loop be vectorised). `invalid`
/// finds the first bad byte of a batch (its index and why); the error then
/// names that byte's offset in the file.
fn batched<T, const SIZE: usize>(
    r: &mut Reader,
    field: &str,
    n: usize,
    decode: impl Fn([u8; SIZE]) -> T,
    invalid: impl Fn(&[u8]) -> Option<(usize, String)>,
) -> Result<Vec<T>, ParseError> {
    const BATCH: usize = 1 << 14;
    // `n` fits in the file and in what is left of MAX_ARRAY_ELEMENTS (checked
    // by the caller), so the whole array can be reserved at once.
    let mut v = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let k = left.min(BATCH);
        let batch_at = r.pos();
        let bad = r.with_bytes((k * SIZE) as u64, field, |b| {
            let (elements, _) = b.as_chunks::<SIZE>();
            v.extend(elements.iter().map(|&e| decode(e)));
            invalid(b)
        })?;
        if let Some((i, why)) = bad {
            return Err(ParseError::new(batch_at + i as u64, field, why));
        }
        left -= k;
    }
    Ok(v)
}

fn align_up(x: u64, align: u64, at: u64, field: &str) -> Result<u64, ParseError> {
    x.checked_next_multiple_of(align)
        .ok_or_else(|| ParseError::new(at, field, format!("{x} overflows when padded to {align}")))
}

/// Checks that `[from, to)` holds only zero bytes.
fn zero_padding(src: &ByteSource, from: u64, to: u64, what: &str) -> Result<(), ParseError> {
    let mut buf = vec![0u8; (to - from).min(1 << 20) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(buf.len() as u64) as usize;
        src.read_at(at, &mut buf[..n]).map_err(|e| ParseError::new(at, what, format!("read failed: {e}")))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Err(ParseError::new(
                at + i as u64,
                what,
                format!("padding byte is 0x{:02x}, not zero: bytes are hidden outside the tensors", buf[i]),
            ));
        }
        at += n as u64;
    }
    Ok(())
}

pub fn parse(src: &ByteSource) -> Result<Header, ParseError> {
    let size = src.size();
    let mut r = Reader::new(src, 0);
    if r.array::<4>("magic")? != *b"GGUF" {
        return Err(ParseError::new(0, "magic", "not \"GGUF\""));
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(ParseError::new(4, "version", "GGUF v1 (32-bit counts) is not supported")),
        v => return Err(ParseError::new(4, "version", format!("unknown GGUF version {v}"))),
    }
    let tensor_count = r.u64("tensor_count")?;
    let kv_count = r.u64("metadata_kv_count")?;
    // Smallest tensor info: name length, n_dims, type, offset.
    if tensor_count > r.remaining() / 24 {
        return Err(ParseError::new(
            8,
            "tensor_count",
            format!("{tensor_count} tensors cannot fit in a {size}-byte file"),
        ));
    }
    // Smallest key/value: key length, value type, one byte of value.
    if kv_count > r.remaining() / 13 {
        return Err(ParseError::new(
            16,
            "metadata_kv_count",
            format!("{kv_count} keys cannot fit in a {size}-byte file"),
        ));
    }

    if tensor_count > MAX_TENSORS {
        return Err(ParseError::new(
            8,
            "tensor_count",
            format!("{tensor_count} tensors exceeds the limit of {MAX_TENSORS}"),
        ));
    }
    if kv_count > MAX_KEYS {
        return Err(ParseError::new(
            16,
            "metadata_kv_count",
            format!("{kv_count} keys exceeds the limit of {MAX_KEYS}"),
        ));
    }
    let mut budget = MAX_ARRAY_ELEMENTS;
    let mut metadata = Vec::with_capacity((kv_count as usize).min(PREALLOC));
    let mut keys = HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..kv_count {
        let at = r.pos();
        let field = format!("metadata[{i}].key");
        let key = utf8(string(&mut r, &field, MAX_KEY)?, at, &field)?;
        if key.is_empty() {
            return Err(ParseError::new(at, &field, "empty key"));
        }
        if !keys.insert(key.clone()) {
            return Err(ParseError::new(at, &field, format!("duplicate metadata key {key:?}")));
        }
        let field = format!("metadata[{key}]");
        let ty_at = r.pos();
        let ty = r.u32(&field)?;
        let value = match ty {
            T_ARRAY => array(&mut r, &field, &mut budget)?,
            _ => scalar(&mut r, ty, &field)?,
        };
        if key == "general.alignment" {
            match (ty, &value) {
                (T_U32, MetaValue::Uint(a)) if a.is_power_of_two() => alignment = *a,
                (T_U32, MetaValue::Uint(a)) => {
                    return Err(ParseError::new(ty_at, &field, format!("alignment {a} is not a power of two")));
                }
                _ => return Err(ParseError::new(ty_at, &field, format!("alignment must be a u32, found type {ty}"))),
            }
        }
        metadata.push((key, value));
    }

    let mut tensors = Vec::with_capacity((tensor_count as usize).min(PREALLOC));
    let mut names = HashSet::new();
    let mut expected_offset = 0u64;
    for i in 0..tensor_count {
        let at = r.pos();
        let field = format!("tensor[{i}].name");
        let name = utf8(string(&mut r, &field, MAX_KEY)?, at, &field)?;
        if name.len() >= MAX_NAME {
            return Err(ParseError::new(
                at,
                &field,
                format!("name {name:?} is {} bytes; llama.cpp allows {}", name.len(), MAX_NAME - 1),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(ParseError::new(at, &field, format!("duplicate tensor name {name:?}")));
        }
        let field = format!("tensor[{name}]");
        let dims_at = r.pos();
        let n_dims = r.u32(&format!("{field}.n_dims"))?;
        if n_dims > MAX_DIMS {
            return Err(ParseError::new(
                dims_at,
                &format!("{field}.n_dims"),
                format!("{n_dims} dimensions; at most {MAX_DIMS}"),
            ));
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for d in 0..n_dims {
            let f = format!("{field}.dims[{d}]");
            let dim_at = r.pos();
            let dim = r.u64(&f)?;
            if dim == 0 || dim > i64::MAX as u64 {
                return Err(ParseError::new(dim_at, &f, format!("dimension {dim} is out of range (1..=2^63-1)")));
            }
            elements = elements
                .checked_mul(dim)
                .filter(|&e| e <= i64::MAX as u64)
                .ok_or_else(|| ParseError::new(dim_at, &f, "element count overflows"))?;
            shape.push(dim);
        }
        let type_at = r.pos();
        let type_id = r.u32(&format!("{field}.type"))?;
        let Some(t) = ggml_type(type_id) else {
            return Err(ParseError::new(
                type_at,
                &format!("{field}.type"),
                format!("unknown or removed GGML type {type_id}"),
            ));
        };
        let ne0 = shape.first().copied().unwrap_or(1);
        if ne0 % t.block != 0 {
            return Err(ParseError::new(
                dims_at,
                &format!("{field}.dims[0]"),
                format!("{ne0} is not a multiple of the {} block size {}", t.name, t.block),
            ));
        }
        let length = (elements / t.block)
            .checked_mul(t.size)
            .ok_or_else(|| ParseError::new(dims_at, &field, "byte size overflows"))?;
        let off_at = r.pos();
        let offset = r.u64(&format!("{field}.offset"))?;
        if offset != expected_offset {
            return Err(ParseError::new(
                off_at,
                &format!("{field}.offset"),
                format!("offset {offset} but the tensors before it end at {expected_offset} (padded to {alignment})"),
            ));
        }
        expected_offset = offset
            .checked_add(length)
            .and_then(|end| end.checked_next_multiple_of(alignment))
            .ok_or_else(|| ParseError::new(off_at, &format!("{field}.offset"), "offset plus size overflows"))?;
        tensors.push(TensorInfo { name, dtype: t.dtype, dtype_name: t.name.to_string(), shape, offset, length });
    }

    let header_end = r.pos();
    let data_start = align_up(header_end, alignment, header_end, "data start")?;
    // Absolute positions; the unpadded end of the last tensor is the end of the data.
    let mut data_end = data_start;
    for t in &mut tensors {
        t.offset = data_start
            .checked_add(t.offset)
            .ok_or_else(|| ParseError::new(header_end, "tensor data", "data offset overflows"))?;
        data_end = t.offset + t.length;
    }
    if tensors.is_empty() {
        data_end = header_end;
    }
    if data_end > size {
        return Err(ParseError::new(
            header_end,
            "tensor data",
            format!("the tensors need the file to be {data_end} bytes long, it is {size}"),
        ));
    }
    // Only padding may follow the data, up to the next alignment boundary.
    let padded_end = align_up(data_end, alignment, data_end, "trailing padding")?;
    if size > padded_end {
        return Err(ParseError::new(
            data_end,
            "trailing bytes",
            format!("{} bytes follow the data and its padding (data ends at {data_end})", size - padded_end),
        ));
    }
    if !tensors.is_empty() {
        zero_padding(src, header_end, data_start, "header padding")?;
        for pair in tensors.windows(2) {
            zero_padding(src, pair[0].offset + pair[0].length, pair[1].offset, "tensor padding")?;
        }
    }
    zero_padding(src, data_end, size, "trailing padding")?;

    Ok(Header { version: Some(version), alignment: Some(alignment), data_offset: Some(data_start), metadata, tensors })
}
