//! The folder walker's JSON: which shards a `*.safetensors.index.json` names.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for shard in airlock_artifact::fuzzing::shard_index(data) {
        // Whatever it returns must stay inside the folder.
        assert!(!shard.starts_with('/') && !shard.split('/').any(|c| c == ".."), "{shard:?}");
    }
});
