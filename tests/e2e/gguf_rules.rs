//! Every GGUF header rule, broken one at a time by a crafted file.

use crate::harness::*;

fn rejects(g: &Gguf, needle: &str) {
    let d = tmp();
    let p = g.write(d.path(), "crafted.gguf");
    assert_rejected(&scan_json(&p, &[]), "format_gate", needle);
}

#[test]
fn a_well_formed_crafted_gguf_passes() {
    let d = tmp();
    assert_passed(&scan_json(&Gguf::default().write(d.path(), "ok.gguf"), &[]));
    let v2 = Gguf { version: 2, ..Gguf::default() };
    assert_passed(&scan_json(&v2.write(d.path(), "v2.gguf"), &[]));
    // Padding after the last tensor is allowed when it is zero.
    let mut padded = Gguf::default();
    padded.tensors[1].dims = vec![4, 1]; // 16 bytes: the file may end 16 zero bytes later
    let mut bytes = padded.bytes();
    assert_eq!(bytes.len() % 32, 16, "the last tensor must end mid-alignment");
    bytes.extend([0u8; 16]);
    assert_passed(&scan_json(&write(d.path(), "padded.gguf", &bytes), &[]));
}

#[test]
fn general_alignment_is_honoured() {
    let mut g = Gguf { alignment: 64, ..Gguf::default() };
    g.kvs.push(("general.alignment".into(), kv_u32(64)));
    g.tensors[0].dims = vec![4, 1]; // 16 bytes, so the next tensor needs 48 bytes of padding
    let d = tmp();
    assert_passed(&scan_json(&g.write(d.path(), "aligned.gguf"), &[]));
    // The same file laid out with the default alignment breaks the offset rule.
    let mut wrong = g.clone();
    wrong.alignment = 32;
    rejects(&wrong, "offset 32 but the tensors before it end at 64");
}

#[test]
fn alignment_must_be_a_u32_power_of_two() {
    let mut g = Gguf::default();
    g.kvs.push(("general.alignment".into(), kv_u32(48)));
    rejects(&g, "alignment 48 is not a power of two");
    let mut g = Gguf::default();
    g.kvs.push(("general.alignment".into(), kv_u64(32)));
    rejects(&g, "alignment must be a u32");
}

#[test]
fn more_than_four_dimensions() {
    let mut g = Gguf::default();
    g.tensors[0].dims = vec![8, 1, 1, 1, 1];
    rejects(&g, "5 dimensions; at most 4");
}

#[test]
fn zero_dimension() {
    let mut g = Gguf::default();
    g.tensors[1].dims = vec![8, 0];
    g.tensors[1].nbytes = Some(0);
    rejects(&g, "dimension 0 is out of range");
}

#[test]
fn element_count_overflow() {
    let mut g = Gguf::default();
    g.tensors[0].dims = vec![1 << 32, 1 << 32];
    g.tensors[0].nbytes = Some(16);
    rejects(&g, "element count overflows");
}

#[test]
fn byte_size_overflow() {
    let mut g = Gguf::default();
    g.tensors[0].dims = vec![1 << 31, 1 << 31]; // 2^62 f32 elements: 2^64 bytes
    g.tensors[0].nbytes = Some(16);
    rejects(&g, "byte size overflows");
}

#[test]
fn block_size_mismatch() {
    let mut g = Gguf::default();
    g.tensors[0].ty = Q4_0;
    g.tensors[0].dims = vec![33, 1];
    g.tensors[0].nbytes = Some(18);
    rejects(&g, "33 is not a multiple of the Q4_0 block size 32");
}

#[test]
fn unknown_tensor_type() {
    let mut g = Gguf::default();
    g.tensors[0].ty = 4; // Q4_2, removed from ggml
    rejects(&g, "unknown or removed GGML type 4");
}

#[test]
fn tensor_offset_must_follow_the_running_padded_size() {
    let mut g = Gguf::default();
    g.tensors[1].offset = Some(160);
    rejects(&g, "tensor[output.weight].offset: offset 160 but the tensors before it end at 128");
}

#[test]
fn data_past_end_of_file() {
    let g = Gguf::default();
    let len = g.bytes().len();
    rejects(&Gguf { truncate: Some(len - 4), ..g }, "the tensors need the file to be");
}

#[test]
fn bytes_after_the_data() {
    rejects(&Gguf { trailing: vec![0xab; 64], ..Gguf::default() }, "bytes follow the data");
}

#[test]
fn nonzero_padding_hides_bytes() {
    let mut g = Gguf { pad: 0x41, ..Gguf::default() };
    g.tensors[0].dims = vec![4, 1]; // 16 bytes: 16 bytes of padding follow it
    rejects(&g, "not zero: bytes are hidden outside the tensors");
}

#[test]
fn duplicate_metadata_key() {
    let mut g = Gguf::default();
    g.kvs.push(("general.name".into(), kv_str("again")));
    rejects(&g, "duplicate metadata key \"general.name\"");
}

#[test]
fn duplicate_tensor_name() {
    let mut g = Gguf::default();
    g.tensors[1].name = "token_embd.weight".into();
    rejects(&g, "duplicate tensor name \"token_embd.weight\"");
}

#[test]
fn unknown_versions_are_refused() {
    rejects(&Gguf { version: 4, ..Gguf::default() }, "unknown GGUF version 4");
    rejects(&Gguf { version: 1, ..Gguf::default() }, "GGUF v1");
}

#[test]
fn lying_counts_are_bounded_by_the_file() {
    rejects(&Gguf { tensor_count: Some(1 << 62), ..Gguf::default() }, "tensors cannot fit");
    rejects(&Gguf { kv_count: Some(1 << 62), ..Gguf::default() }, "keys cannot fit");
}

#[test]
fn lying_string_length() {
    let mut g = Gguf::default();
    let mut v = (1u64 << 62).to_le_bytes().to_vec();
    v.extend(b"x");
    g.kvs.push(("general.description".into(), (8, v)));
    rejects(&g, "string length 4611686018427387904 exceeds");
}

#[test]
fn lying_array_count() {
    let mut g = Gguf::default();
    let mut v = 4u32.to_le_bytes().to_vec(); // u32 elements
    v.extend((1u64 << 62).to_le_bytes());
    g.kvs.push(("tokenizer.ggml.scores".into(), (9, v)));
    rejects(&g, "array count 4611686018427387904 cannot fit");
}

#[test]
fn nested_arrays_are_refused() {
    let mut g = Gguf::default();
    let mut v = 9u32.to_le_bytes().to_vec();
    v.extend(1u64.to_le_bytes());
    g.kvs.push(("general.nested".into(), (9, v)));
    rejects(&g, "nested arrays are not supported");
}

#[test]
fn truncated_header() {
    let g = Gguf::default();
    rejects(&Gguf { truncate: Some(100), ..g }, "remain in the file");
}

#[test]
fn metadata_arrays_cannot_expand_without_bound() {
    // 9M one-byte elements fit in the file, but exceed the 8M-element cap for all arrays.
    let mut g = Gguf::default();
    let count = 9u64 << 20;
    let mut v = 0u32.to_le_bytes().to_vec(); // u8 elements
    v.extend(count.to_le_bytes());
    v.extend(vec![7u8; count as usize]);
    g.kvs.push(("general.blob".into(), (9, v)));
    rejects(&g, "array count 9437184 exceeds what is left of the 8388608-element limit");
}

/// Arrays are decoded in batches straight from the read buffer: a bad element
/// far into a bool array, behind an array that spans buffer refills, is still
/// named at its exact offset.
#[test]
fn a_bad_bool_deep_in_an_array_is_named_at_its_offset() {
    let mut g = Gguf::default();
    let mut ints = 5u32.to_le_bytes().to_vec(); // i32 elements
    ints.extend(300_000u64.to_le_bytes()); // 1.2 MB: more than one read buffer
    ints.extend((0..300_000i32).flat_map(i32::to_le_bytes));
    g.kvs.push(("tokenizer.ggml.token_type".into(), (9, ints)));
    let mut flags = 7u32.to_le_bytes().to_vec(); // bool elements
    flags.extend(40_000u64.to_le_bytes());
    let mut values = vec![1u8; 40_000];
    values[20_001] = 2;
    flags.extend(&values);
    g.kvs.push(("test.flags".into(), (9, flags)));
    let bytes = g.bytes();
    let key = bytes.windows(10).position(|w| w == b"test.flags").unwrap();
    // key, value type, element type, count, then the elements.
    let offset = key + 10 + 4 + 4 + 8 + 20_001;
    assert_eq!(bytes[offset], 2);
    rejects(&g, &format!("at offset {offset}, metadata[test.flags]: bool value 2 is neither 0 nor 1"));
}
