//! Every safetensors header rule, broken one at a time by a crafted file.

use crate::harness::*;

const DATA: [u8; 24] = [1; 24];

fn rejects(bytes: &[u8], needle: &str) {
    let d = tmp();
    let p = write(d.path(), "crafted.safetensors", bytes);
    assert_rejected(&scan_json(&p, &[]), "format_gate", needle);
}

fn header(json: &str) -> Vec<u8> {
    safetensors(json, &DATA)
}

#[test]
fn a_well_formed_crafted_file_passes() {
    let d = tmp();
    assert_passed(&scan_json(&write(d.path(), "ok.safetensors", &header(ST_HEADER)), &[]));
    // Trailing spaces inside the header are the one allowed padding.
    let padded = format!("{ST_HEADER}      ");
    assert_passed(&scan_json(&write(d.path(), "padded.safetensors", &header(&padded)), &[]));
}

#[test]
fn header_length_over_100_mb() {
    let mut b = (100_000_001u64).to_le_bytes().to_vec();
    b.extend(b"{}");
    rejects(&b, "100000001 bytes exceeds the 100000000-byte limit");
}

#[test]
fn header_length_past_end_of_file() {
    let mut b = (5000u64).to_le_bytes().to_vec();
    b.extend(ST_HEADER.as_bytes());
    rejects(&b, "5000 bytes but only");
}

#[test]
fn header_must_start_with_a_brace() {
    rejects(&header(&format!(" {ST_HEADER}")), "must start with '{'");
}

#[test]
fn only_spaces_may_follow_the_json() {
    rejects(&header(&format!("{ST_HEADER}\n")), "only spaces may pad it");
    rejects(&header(&format!("{ST_HEADER}{{}}")), "only spaces may pad it");
}

#[test]
fn entries_have_exactly_three_fields() {
    rejects(&header(r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24],"extra":1}}"#), "unknown field `extra`");
    rejects(&header(r#"{"a":{"dtype":"F32","shape":[6]}}"#), "missing field `data_offsets`");
    rejects(
        &header(r#"{"a":{"dtype":"F32","dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#),
        "duplicate field `dtype`",
    );
}

#[test]
fn metadata_is_a_string_to_string_map() {
    rejects(
        &header(r#"{"__metadata__":{"n":1},"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#),
        "__metadata__[\"n\"] must be a string",
    );
    rejects(
        &header(r#"{"__metadata__":{"k":"a","k":"b"},"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#),
        "duplicate __metadata__ key \"k\"",
    );
}

#[test]
fn duplicate_tensor_keys_are_detected() {
    rejects(
        &header(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[3],"data_offsets":[12,24]}}"#,
        ),
        "duplicate key \"a\"",
    );
}

#[test]
fn byte_length_must_equal_shape_times_dtype() {
    rejects(
        &header(r#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,24]}}"#),
        "holds 24 bytes but shape [5] of F32 needs 20",
    );
}

#[test]
fn overlapping_tensors() {
    rejects(
        &header(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        ),
        "overlaps the tensor before it",
    );
}

#[test]
fn holes_between_tensors() {
    rejects(
        &header(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
        ),
        "leaves a hole before it",
    );
}

#[test]
fn trailing_bytes_after_the_data() {
    rejects(
        &header(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#),
        "8 bytes follow the last tensor's data",
    );
}

#[test]
fn offsets_past_the_data() {
    rejects(
        &header(r#"{"a":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}}"#),
        "ends at 32 but the data area is 24 bytes",
    );
}

#[test]
fn shape_overflow() {
    rejects(&header(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,24]}}"#), "overflows");
}

#[test]
fn unknown_dtype() {
    rejects(&header(r#"{"a":{"dtype":"F33","shape":[6],"data_offsets":[0,24]}}"#), "unknown dtype \"F33\"");
}

#[test]
fn json_depth_is_bounded() {
    let deep =
        format!(r#"{{"a":{{"dtype":"F32","shape":{}6{},"data_offsets":[0,24]}}}}"#, "[".repeat(5000), "]".repeat(5000));
    rejects(&header(&deep), "invalid JSON");
}

#[test]
fn not_json_at_all() {
    rejects(&header("{not json at all}"), "invalid JSON at line 1");
}
