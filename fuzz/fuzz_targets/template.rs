//! template_guard's parse and inspection of a chat template.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = template_guard::vet("fuzz", text);
    }
});
