//! The SDK's pickle opcode walker and pickle_scan's import finder over it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for op in airlock_sdk::pickle::ops(data) {
        if op.is_err() {
            break;
        }
    }
    let _ = airlock_sdk::pickle::stream_at_start(data);
    let _ = pickle_scan::count_imports(data);
});
