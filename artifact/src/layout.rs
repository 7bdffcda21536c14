//! What kind of folder model a folder is, judged by its top-level entries, and
//! whether it has finished arriving. The watcher takes a folder only when it
//! is one of these; the stages judge the contents.

use std::fs;
use std::path::Path;

/// The folder layouts airlock takes as models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolderLayout {
    /// A diffusers pipeline: `model_index.json` at the root.
    Diffusers,
    /// A transformers model: `config.json` and weights at the root.
    Transformers,
}

/// File names that hold weights in a transformers folder, in any format. A
/// pickle checkpoint counts: the folder is then taken, and refused by the
/// format gate naming the file, instead of waiting in incoming/ for ever.
fn is_weights_name(name: &str) -> bool {
    const SUFFIXES: [&str; 12] = [
        ".safetensors",
        ".safetensors.index.json",
        ".bin",
        ".bin.index.json",
        ".pt",
        ".pth",
        ".ckpt",
        ".pkl",
        ".npy",
        ".gguf",
        ".h5",
        ".msgpack",
    ];
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

fn is_regular_file(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
}

/// The layout of `dir`, or `None` when it is not a model folder (yet).
pub fn folder_layout(dir: &Path) -> Option<FolderLayout> {
    if is_regular_file(&dir.join("model_index.json")) {
        return Some(FolderLayout::Diffusers);
    }
    if !is_regular_file(&dir.join("config.json")) {
        return None;
    }
    let has_weights =
        fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).any(|e| e.file_name().to_str().is_some_and(is_weights_name));
    has_weights.then_some(FolderLayout::Transformers)
}

/// Largest shard index read while waiting for a folder to arrive. A bigger
/// one is taken as it is and judged by the format gate.
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// Shards that a `*.safetensors.index.json` at the root names and that are not
/// there yet: the folder is still being copied. An index that cannot be read
/// or names paths outside the folder counts as complete, so the folder is
/// taken and the format gate says what is wrong with it.
pub fn missing_shards(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut missing = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors.index.json") {
            continue;
        }
        let path = e.path();
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() <= MAX_INDEX_BYTES) {
            continue;
        }
        let Ok(text) = fs::read(&path) else { continue };
        for shard in shards_inside(&text) {
            if fs::symlink_metadata(dir.join(&shard)).is_err() && !missing.contains(&shard) {
                missing.push(shard);
            }
        }
    }
    missing
}

/// The shard paths a `*.safetensors.index.json` names that stay inside the
/// folder (plain relative components), each once, in order. Text that is not
/// such an index names none. Pure, so it is fuzzed (`fuzz/`).
pub fn shards_inside(index: &[u8]) -> Vec<String> {
    let Ok(index) = serde_json::from_slice::<serde_json::Value>(index) else { return Vec::new() };
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else { return Vec::new() };
    let mut out: Vec<String> = Vec::new();
    for shard in map.values().filter_map(|v| v.as_str()) {
        let inside = !shard.is_empty()
            && !shard.starts_with('/')
            && Path::new(shard).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if inside && !out.iter().any(|s| s == shard) {
            out.push(shard.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers_folders_need_config_and_weights_and_wait_for_their_shards() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(folder_layout(d), None);
        fs::write(d.join("config.json"), "{}").unwrap();
        assert_eq!(folder_layout(d), None, "config.json alone is not a model yet");
        fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                "c": "../outside.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(folder_layout(d), Some(FolderLayout::Transformers));
        assert_eq!(missing_shards(d), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        fs::write(d.join("model-00001-of-00002.safetensors"), "").unwrap();
        fs::write(d.join("model-00002-of-00002.safetensors"), "").unwrap();
        assert!(missing_shards(d).is_empty(), "a path outside the folder is the gate's to judge, not waited for");
        fs::write(d.join("model_index.json"), "{}").unwrap();
        assert_eq!(folder_layout(d), Some(FolderLayout::Diffusers));
    }

    #[test]
    fn a_pickle_checkpoint_makes_a_folder_a_model_so_it_is_taken_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), "{}").unwrap();
        fs::write(dir.path().join("pytorch_model.bin"), "").unwrap();
        assert_eq!(folder_layout(dir.path()), Some(FolderLayout::Transformers));
    }
}
