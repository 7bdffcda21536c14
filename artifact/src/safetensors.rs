//! Strict safetensors header parsing.
//!
//! Layout: an 8-byte little-endian header length N, N bytes of JSON, then the
//! tensor data. The JSON must be an object starting at byte 8 with `{`, with
//! only spaces after it; every tensor entry has exactly `dtype`, `shape` and
//! `data_offsets`; `__metadata__` maps strings to strings; the byte ranges
//! tile the data area exactly: no overlap, no hole, nothing after.
//! serde_json keeps the last of duplicate keys silently, so the maps are read
//! with visitors that refuse duplicates.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use super::source::ByteSource;
use super::{Dtype, Header, MetaValue, ParseError, TensorInfo};

/// The safetensors reference implementation's own limit.
pub const MAX_HEADER: u64 = 100_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

enum Item {
    Tensor(String, Entry),
    Metadata(Vec<(String, String)>),
}

struct Top(Vec<Item>);

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let mut seen = HashSet::new();
                let mut items = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    if key == "__metadata__" {
                        items.push(Item::Metadata(map.next_value::<StringMap>()?.0));
                    } else {
                        let entry =
                            map.next_value::<Entry>().map_err(|e| de::Error::custom(format!("tensor {key:?}: {e}")))?;
                        items.push(Item::Tensor(key, entry));
                    }
                }
                Ok(Top(items))
            }
        }
        d.deserialize_map(V)
    }
}

struct StringMap(Vec<(String, String)>);

impl<'de> Deserialize<'de> for StringMap {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("__metadata__ as an object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMap, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate __metadata__ key {key:?}")));
                    }
                    let value = map
                        .next_value::<String>()
                        .map_err(|e| de::Error::custom(format!("__metadata__[{key:?}] must be a string: {e}")))?;
                    out.push((key, value));
                }
                Ok(StringMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The dtype and its size in bits.
fn dtype(name: &str) -> Option<(Dtype, u64)> {
    use Dtype::*;
    Some(match name {
        "BOOL" => (Boolean, 8),
        "U8" => (U8, 8),
        "I8" => (I8, 8),
        "F8_E5M2" => (F8e5m2, 8),
        "F8_E4M3" => (F8e4m3, 8),
        "F8_E8M0" => (Other, 8),
        "I16" => (I16, 16),
        "U16" => (U16, 16),
        "F16" => (F16, 16),
        "BF16" => (Bf16, 16),
        "I32" => (I32, 32),
        "U32" => (U32, 32),
        "F32" => (F32, 32),
        "I64" => (I64, 64),
        "U64" => (U64, 64),
        "F64" => (F64, 64),
        "C64" => (Other, 64),
        "F4" => (Other, 4),
        "F6_E2M3" | "F6_E3M2" => (Other, 6),
        _ => return None,
    })
}

pub fn parse(src: &ByteSource) -> Result<Header, ParseError> {
    let size = src.size();
    if size < 8 {
        return Err(ParseError::new(
            0,
            "header length",
            format!("the file is {size} bytes; the length field alone needs 8"),
        ));
    }
    let n = u64::from_le_bytes(
        src.read_exact_at(0, 8)
            .map_err(|e| ParseError::new(0, "header length", e.to_string()))?
            .try_into()
            .expect("8 bytes"),
    );
    if n > MAX_HEADER {
        return Err(ParseError::new(0, "header length", format!("{n} bytes exceeds the {MAX_HEADER}-byte limit")));
    }
    if n > size - 8 {
        return Err(ParseError::new(0, "header length", format!("{n} bytes but only {} bytes follow it", size - 8)));
    }
    let header = src.read_exact_at(8, n as usize).map_err(|e| ParseError::new(8, "header", e.to_string()))?;
    if header.first() != Some(&b'{') {
        return Err(ParseError::new(8, "header", "the JSON header must start with '{'"));
    }
    let mut stream = serde_json::Deserializer::from_slice(&header).into_iter::<Top>();
    let top = match stream.next() {
        Some(Ok(top)) => top,
        Some(Err(e)) => {
            return Err(ParseError::new(
                8,
                "header",
                format!("invalid JSON at line {} column {}: {e}", e.line(), e.column()),
            ));
        }
        None => return Err(ParseError::new(8, "header", "empty JSON header")),
    };
    let json_end = stream.byte_offset();
    if let Some(i) = header[json_end..].iter().position(|&b| b != b' ') {
        let at = 8 + (json_end + i) as u64;
        return Err(ParseError::new(
            at,
            "header",
            format!("byte 0x{:02x} after the JSON object; only spaces may pad it", header[json_end + i]),
        ));
    }

    let data_start = 8 + n;
    let data_len = size - data_start;
    let mut metadata = Vec::new();
    let mut tensors = Vec::new();
    for item in top.0 {
        match item {
            Item::Metadata(m) => metadata.extend(m.into_iter().map(|(k, v)| (k, MetaValue::Text(v)))),
            Item::Tensor(name, e) => {
                let field = format!("tensor[{name}]");
                let Some((dt, bits)) = dtype(&e.dtype) else {
                    return Err(ParseError::new(8, &format!("{field}.dtype"), format!("unknown dtype {:?}", e.dtype)));
                };
                let elements = e
                    .shape
                    .iter()
                    .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                    .ok_or_else(|| ParseError::new(8, &format!("{field}.shape"), "element count overflows"))?;
                let total_bits = elements
                    .checked_mul(bits)
                    .ok_or_else(|| ParseError::new(8, &format!("{field}.shape"), "byte size overflows"))?;
                if total_bits % 8 != 0 {
                    return Err(ParseError::new(
                        8,
                        &format!("{field}.shape"),
                        format!("{elements} {} elements do not fill whole bytes", e.dtype),
                    ));
                }
                let [begin, end] = e.data_offsets;
                if end < begin {
                    return Err(ParseError::new(
                        8,
                        &format!("{field}.data_offsets"),
                        format!("end {end} is before begin {begin}"),
                    ));
                }
                if end - begin != total_bits / 8 {
                    return Err(ParseError::new(
                        8,
                        &format!("{field}.data_offsets"),
                        format!(
                            "[{begin}, {end}] holds {} bytes but shape {:?} of {} needs {}",
                            end - begin,
                            e.shape,
                            e.dtype,
                            total_bits / 8
                        ),
                    ));
                }
                if end > data_len {
                    return Err(ParseError::new(
                        8,
                        &format!("{field}.data_offsets"),
                        format!("ends at {end} but the data area is {data_len} bytes"),
                    ));
                }
                tensors.push(TensorInfo {
                    name,
                    dtype: dt,
                    dtype_name: e.dtype,
                    shape: e.shape,
                    offset: data_start + begin,
                    length: end - begin,
                });
            }
        }
    }
    // The ranges must tile [0, data_len) exactly.
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| (t.offset, t.length));
    let mut expected = data_start;
    for t in order {
        if t.offset != expected {
            let what = if t.offset < expected { "overlaps the tensor before it" } else { "leaves a hole before it" };
            return Err(ParseError::new(
                8,
                &format!("tensor[{}].data_offsets", t.name),
                format!(
                    "begins at {} but the previous tensor ends at {}: it {what}",
                    t.offset - data_start,
                    expected - data_start
                ),
            ));
        }
        expected = t.offset + t.length;
    }
    if expected != size {
        return Err(ParseError::new(
            expected,
            "trailing bytes",
            format!("{} bytes follow the last tensor's data", size - expected),
        ));
    }
    Ok(Header { version: None, alignment: Some(1), data_offset: Some(data_start), metadata, tensors })
}
