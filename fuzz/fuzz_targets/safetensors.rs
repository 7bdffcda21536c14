//! The strict safetensors parser (both read paths) and the content sniffer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = airlock_artifact::fuzzing::sniff(data);
    let _ = airlock_artifact::fuzzing::safetensors(data);
});
