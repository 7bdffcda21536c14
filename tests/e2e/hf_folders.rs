//! Hugging Face transformers folders: the real all-MiniLM-L6-v2 folder, the
//! same model resharded into three shards with an index, and one crafted
//! defect per rule, each failing at the stage that owns it, naming the file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::harness::*;
use crate::lifecycle::Lab;

/// Copies a model folder (regular files and subfolders only).
pub(crate) fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_folder(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The real MiniLM folder, copied under `dir`.
pub(crate) fn minilm(dir: &Path) -> PathBuf {
    let to = dir.join("all-MiniLM-L6-v2");
    copy_folder(&models().minilm_folder, &to);
    to
}

/// A safetensors file's header and data.
pub(crate) fn read_safetensors(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

/// Writes `tensors` (name, dtype, shape, bytes) as one safetensors file.
pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, Value, Value, &[u8])]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.clone(), json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut text = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Reshards the folder's `model.safetensors` into three shards and an index,
/// as `save_pretrained(max_shard_size=...)` writes them. Returns the index.
pub(crate) fn reshard(folder: &Path) -> Value {
    let (header, data) = read_safetensors(&folder.join("model.safetensors"));
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    let per = names.len().div_ceil(3);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, chunk) in names.chunks(per).enumerate() {
        let shard = format!("model-{:05}-of-00003.safetensors", i + 1);
        let tensors: Vec<(String, Value, Value, &[u8])> = chunk
            .iter()
            .map(|name| {
                let t = &header[*name];
                let o = t["data_offsets"].as_array().unwrap();
                let (a, b) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
                total += (b - a) as u64;
                weight_map.insert((*name).clone(), json!(shard));
                ((*name).clone(), t["dtype"].clone(), t["shape"].clone(), &data[a..b])
            })
            .collect();
        write_safetensors(&folder.join(&shard), &tensors);
    }
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_index(folder, &index);
    index
}

fn write_index(folder: &Path, index: &Value) {
    std::fs::write(folder.join("model.safetensors.index.json"), serde_json::to_vec_pretty(index).unwrap()).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn scan(folder: &Path) -> Scan {
    scan_json(folder, &[])
}

/// Rejected at `stage` by the finding `rule` whose location names `file`.
fn assert_finding(s: &Scan, stage: &str, rule: &str, file: &str) {
    assert_eq!(s.one()["verdict"], "fail", "{}", s.one());
    let hit = s.one()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stage"] == stage && r["verdict"] == "fail")
        .flat_map(|r| r["findings"].as_array().unwrap())
        .find(|f| f["rule"] == rule);
    let Some(hit) = hit else { panic!("no {rule} failing {stage}: {}", s.one()) };
    let at = hit["location"].as_str().unwrap_or_default();
    assert!(at.contains(file), "{rule} should name {file}, names {at:?}: {hit}");
    if stage != "static_scan" {
        assert_eq!(s.one()["failed_stage"], stage, "{}", s.one());
    }
}

#[test]
fn the_real_minilm_folder_passes_every_stage() {
    let d = tmp();
    let s = scan(&minilm(d.path()));
    assert_passed(&s);
    assert_eq!(s.stage("format_gate")["summary"], "text, json, safetensors");
    let tokenizer = plugin_result(&s, "tokenizer_check");
    assert_eq!(tokenizer["verdict"], "pass", "{tokenizer}");
    assert!(tokenizer["summary"].as_str().unwrap().contains("30522 tokens"), "{tokenizer}");
    // modules.json names sentence-transformers classes by import path: real ones are not gadgets.
    assert_eq!(plugin_result(&s, "metadata_gadgets")["verdict"], "pass");
}

#[test]
fn the_real_minilm_folder_is_promoted_whole_and_a_swapped_tokenizer_is_caught_by_verify() {
    let lab = Lab::new();
    let folder = minilm(&lab.incoming());
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: all-MiniLM-L6-v2"), "{out}");
    let manifest = lab.manifest("all-MiniLM-L6-v2").to_string();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "model.safetensors",
        "1_Pooling/config.json",
    ] {
        assert!(manifest.contains(f), "{f} is not in the manifest");
    }
    assert!(!folder.exists());
    let (code, out) = lab.run(&["verify", "all-MiniLM-L6-v2"]);
    assert_eq!(code, 0, "{out}");
    // Two token ids exchanged in the registry copy: verify fails and names the file.
    let tj = lab.registry().join("all-MiniLM-L6-v2/model/all-MiniLM-L6-v2/tokenizer.json");
    edit_json(&tj, |v| {
        let vocab = &mut v["model"]["vocab"];
        assert_eq!((&vocab["hello"], &vocab["world"]), (&json!(7592), &json!(2088)));
        vocab["hello"] = json!(2088);
        vocab["world"] = json!(7592);
    });
    let (code, out) = lab.run(&["verify", "all-MiniLM-L6-v2"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tokenizer.json"), "{out}");
}

#[test]
fn a_folder_is_admitted_whole_with_its_origin_and_a_folder_with_a_link_is_not() {
    let lab = Lab::new();
    let d = tmp();
    let folder = minilm(d.path());
    let origin = "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2";
    let (code, out) = lab.run(&["admit", folder.to_str().unwrap(), "--origin", origin]);
    assert_eq!(code, 0, "{out}");
    assert!(lab.incoming().join("all-MiniLM-L6-v2/1_Pooling/config.json").is_file());
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: all-MiniLM-L6-v2"), "{out}");
    assert!(out.contains("matches allowlist entry \"sentence-transformers\""), "{out}");
    assert_eq!(lab.manifest("all-MiniLM-L6-v2")["origin"], origin);
    // A link inside: refused by name, and nothing is left in incoming/.
    let linked = d.path().join("linked");
    copy_folder(&folder, &linked);
    std::os::unix::fs::symlink("/etc/passwd", linked.join("vocab.txt.bak")).unwrap();
    let (code, out) = lab.run(&["admit", linked.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("vocab.txt.bak: a link or special file"), "{out}");
    assert_eq!(std::fs::read_dir(lab.incoming()).unwrap().count(), 0);
    // A folder that is not a model.
    let plain = d.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("notes.txt"), "hello").unwrap();
    let (code, out) = lab.run(&["admit", plain.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("admitted only as a model"), "{out}");
}

#[test]
fn a_folder_waits_in_incoming_until_every_shard_its_index_names_is_there() {
    let lab = Lab::new();
    let folder = minilm(&lab.incoming());
    reshard(&folder);
    let held = lab.incoming().join(".held-shard");
    std::fs::rename(folder.join("model-00003-of-00003.safetensors"), &held).unwrap();
    let out = lab.watch_once();
    assert!(!out.contains("all-MiniLM-L6-v2"), "taken before its last shard arrived: {out}");
    assert!(folder.join("config.json").is_file());
    std::fs::rename(&held, folder.join("model-00003-of-00003.safetensors")).unwrap();
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: all-MiniLM-L6-v2"), "{out}");
}

#[test]
fn the_real_model_resharded_into_three_shards_passes() {
    let d = tmp();
    let folder = minilm(d.path());
    let whole = scan(&folder);
    assert_passed(&whole);
    let index = reshard(&folder);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 104);
    let s = scan(&folder);
    assert_passed(&s);
    let gate = s.stage("format_gate")["summary"].as_str().unwrap().to_string();
    assert!(gate.contains("1 shard index(es) account for every shard and tensor"), "{gate}");
    // The shards are read by the static scan as the single file was: the same statistics.
    for plugin in ["weights", "tokenizer_check"] {
        assert_eq!(plugin_result(&s, plugin)["summary"], plugin_result(&whole, plugin)["summary"], "{plugin}");
    }
    let weights = plugin_result(&s, "weights")["summary"].as_str().unwrap().to_string();
    assert!(weights.contains("103 tensors"), "{weights}");
}

#[test]
fn shard_index_defects_fail_at_the_format_gate_naming_the_file() {
    let d = tmp();
    let base = minilm(d.path());
    let index = reshard(&base);
    let shard1 = "model-00001-of-00003.safetensors";
    let shard2 = "model-00002-of-00003.safetensors";
    let some_tensor = |shard: &str| {
        index["weight_map"].as_object().unwrap().iter().find(|(_, s)| *s == shard).map(|(t, _)| t.clone()).unwrap()
    };
    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let folder = d.path().join(name);
        copy_folder(&base, &folder);
        edit(&folder);
        scan(&folder)
    };
    // A shard named outside the folder.
    let s = case("outside", &|f| {
        let mut i = index.clone();
        i["weight_map"][some_tensor(shard1)] = json!("../model-00001-of-00003.safetensors");
        write_index(f, &i);
    });
    assert_finding(&s, "format_gate", "format.index.path", "model.safetensors.index.json");
    // An absolute path.
    let s = case("absolute", &|f| {
        let mut i = index.clone();
        i["weight_map"][some_tensor(shard1)] = json!("/etc/passwd");
        write_index(f, &i);
    });
    assert_finding(&s, "format_gate", "format.index.path", "model.safetensors.index.json");
    // A shard the index names that is missing.
    let s = case("missing", &|f| std::fs::remove_file(f.join(shard2)).unwrap());
    assert_finding(&s, "format_gate", "format.index.missing-shard", "model.safetensors.index.json");
    // A shard that is a link to another file: never followed.
    let s = case("link", &|f| {
        std::fs::remove_file(f.join(shard2)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", f.join(shard2)).unwrap();
    });
    assert_finding(&s, "format_gate", "format.symlink", shard2);
    // A weight file the index does not name.
    let s = case("unlisted", &|f| {
        std::fs::copy(f.join(shard1), f.join("model-00004-of-00003.safetensors")).unwrap();
    });
    assert_finding(&s, "format_gate", "format.index.unlisted-shard", "model-00004-of-00003.safetensors");
    // A tensor mapped to a shard that does not hold it.
    let s = case("wrong-shard", &|f| {
        let mut i = index.clone();
        i["weight_map"][some_tensor(shard1)] = json!(shard2);
        write_index(f, &i);
    });
    assert_finding(&s, "format_gate", "format.index.tensor-missing", shard2);
    // The same tensor in two shards.
    let s = case("twice", &|f| {
        let (h1, data1) = read_safetensors(&f.join(shard1));
        let (h2, data2) = read_safetensors(&f.join(shard2));
        let dup = some_tensor(shard1);
        let mut tensors = Vec::new();
        for (h, data, names) in [(&h2, &data2, None), (&h1, &data1, Some(&dup))] {
            for (name, t) in h.iter().filter(|(n, _)| *n != "__metadata__" && names.is_none_or(|d| d == *n)) {
                let o = t["data_offsets"].as_array().unwrap();
                let (a, b) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
                tensors.push((name.clone(), t["dtype"].clone(), t["shape"].clone(), &data[a..b]));
            }
        }
        write_safetensors(&f.join(shard2), &tensors);
    });
    assert_finding(&s, "format_gate", "format.index.tensor-duplicated", shard2);
    // A tensor in a shard that the index does not list.
    let s = case("hidden", &|f| {
        let mut i = index.clone();
        i["weight_map"].as_object_mut().unwrap().remove(&some_tensor(shard2));
        write_index(f, &i);
    });
    assert_finding(&s, "format_gate", "format.index.tensor-unlisted", shard2);
    // An index that is not JSON.
    let s = case("garbage", &|f| std::fs::write(f.join("model.safetensors.index.json"), "{\"weight_map\": ").unwrap());
    assert_finding(&s, "format_gate", "format.index.unparseable", "model.safetensors.index.json");
    // A shard whose own header is broken: the strict safetensors gate names it.
    let s = case("bad-shard", &|f| {
        let mut bytes = std::fs::read(f.join(shard2)).unwrap();
        bytes.extend(b"trailing");
        std::fs::write(f.join(shard2), bytes).unwrap();
    });
    assert_finding(&s, "format_gate", "format.parse-error", shard2);
}

#[test]
fn code_and_pickles_in_a_folder_are_refused_by_name_at_the_format_gate() {
    let d = tmp();
    let base = minilm(d.path());
    let case = |name: &str, file: &str, bytes: &[u8]| {
        let folder = d.path().join(name);
        copy_folder(&base, &folder);
        std::fs::write(folder.join(file), bytes).unwrap();
        scan(&folder)
    };
    let s = case("py", "modeling_minilm.py", b"import os\nos.system('id')\n");
    assert_finding(&s, "format_gate", "format.code-file", "modeling_minilm.py");
    let s = case("so", "kernel.so", b"\x7fELF\x02\x01\x01\0");
    assert_finding(&s, "format_gate", "format.code-file", "kernel.so");
    // A pickle checkpoint beside the safetensors: denied by content, named.
    let pickle = b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94.";
    let s = case("bin", "pytorch_model.bin", pickle);
    assert_finding(&s, "format_gate", "format.denied", "pytorch_model.bin");
    let s = case("pt", "training_args.pt", pickle);
    assert_finding(&s, "format_gate", "format.denied", "training_args.pt");
    // A numpy array of Python objects (a pickle inside .npy).
    let mut npy = b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".to_vec();
    while npy.len() < 10 + 0x76 - 1 {
        npy.push(b' ');
    }
    npy.push(b'\n');
    npy.extend(pickle);
    let s = case("npy", "extra.npy", &npy);
    assert_finding(&s, "format_gate", "format.not-allowed", "extra.npy");
}

#[test]
fn config_gadgets_fail_the_static_scan_naming_file_and_key() {
    let d = tmp();
    let base = minilm(d.path());
    let case = |name: &str, file: &str, edit: &dyn Fn(&mut Value)| {
        let folder = d.path().join(name);
        copy_folder(&base, &folder);
        let path = folder.join(file);
        if !path.exists() {
            std::fs::write(&path, "{}").unwrap();
        }
        edit_json(&path, edit);
        scan(&folder)
    };
    let s = case("auto-map", "config.json", &|v| v["auto_map"] = json!({"AutoModel": "modeling_minilm.MiniLM"}));
    assert_finding(&s, "static_scan", "meta.gadget.auto-map", "config.json: auto_map");
    let s = case("remote", "tokenizer_config.json", &|v| v["trust_remote_code"] = json!(true));
    assert_finding(&s, "static_scan", "meta.gadget.trust-remote-code", "tokenizer_config.json: trust_remote_code");
    let s = case("hydra", "generation_config.json", &|v| v["_target_"] = json!("builtins.exec"));
    assert_finding(&s, "static_scan", "meta.gadget.hydra-target", "generation_config.json: _target_");
    let s =
        case("kernel", "config.json", &|v| v["_attn_implementation_internal"] = json!("kernels-community/flash-attn"));
    assert_finding(&s, "static_scan", "meta.gadget.attention-kernel", "config.json: _attn_implementation_internal");
    let s = case("processor", "preprocessor_config.json", &|v| v["custom_pipelines"] = json!({"x": {"impl": "p.P"}}));
    assert_finding(&s, "static_scan", "meta.gadget.custom-pipeline", "preprocessor_config.json: custom_pipelines");
    let s = case("url", "config.json", &|v| v["kernel_source"] = json!("https://example.invalid/kernel.py"));
    assert_finding(&s, "static_scan", "meta.gadget.remote-code-url", "config.json: kernel_source");
    let s = case("modules", "modules.json", &|v| v[0]["type"] = json!("os.system"));
    assert_finding(&s, "static_scan", "meta.gadget.python-import", "modules.json: 0.type");
    // What real configs say is not a gadget: trust_remote_code false, a shipped attention kernel,
    // a name that only contains an import path, a token list.
    let s = case("benign", "config.json", &|v| {
        v["trust_remote_code"] = json!(false);
        v["_attn_implementation"] = json!("sdpa");
        v["dataset"] = json!("photos.system-archive");
    });
    assert_passed(&s);
}

#[test]
fn chat_templates_in_tokenizer_config_and_jinja_files_go_through_the_guard() {
    let d = tmp();
    let base = minilm(d.path());
    let ssti = "{{ cycler.__init__.__globals__.os.popen('id').read() }}";
    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let folder = d.path().join(name);
        copy_folder(&base, &folder);
        edit(&folder);
        scan(&folder)
    };
    let s = case("string", &|f| edit_json(&f.join("tokenizer_config.json"), |v| v["chat_template"] = json!(ssti)));
    assert_finding(&s, "static_scan", "template.dunder-access", "tokenizer_config.json: chat_template");
    let s = case("list", &|f| {
        edit_json(
            &f.join("tokenizer_config.json"),
            |v| v["chat_template"] = json!([{"name": "default", "template": "{{ messages[0].content }}"}, {"name": "tool_use", "template": ssti}]),
        )
    });
    assert_finding(&s, "static_scan", "template.dunder-access", "tokenizer_config.json: chat_template[tool_use]");
    let s = case("jinja", &|f| std::fs::write(f.join("chat_template.jinja"), ssti).unwrap());
    assert_finding(&s, "static_scan", "template.dunder-access", "chat_template.jinja");
    let s = case("json", &|f| {
        std::fs::write(f.join("chat_template.json"), json!({"chat_template": ssti}).to_string()).unwrap()
    });
    assert_finding(&s, "static_scan", "template.dunder-access", "chat_template.json: chat_template");
}

/// llama.cpp's 70 real chat templates, each as the `chat_template` of a
/// `tokenizer_config.json` in a transformers folder: every one must pass.
#[test]
fn real_models_chat_templates_pass_from_tokenizer_config() {
    let d = tmp();
    let folder = d.path().join("templates-as-folders");
    let mut count = 0;
    for e in std::fs::read_dir(&models().templates).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "jinja") {
            continue;
        }
        let template = std::fs::read_to_string(&path).unwrap();
        let sub = folder.join(path.file_stem().unwrap());
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("tokenizer_config.json"), json!({"chat_template": template}).to_string()).unwrap();
        count += 1;
    }
    assert_eq!(count, 70);
    let s = scan(&folder);
    let guard = plugin_result(&s, "template_guard");
    assert_eq!(guard["verdict"], "pass", "{guard}");
    assert_eq!(guard["summary"], "70 template(s) compiled and checked, 0 flagged");
}

#[test]
fn tokenizer_defects_fail_the_tokenizer_check_naming_the_file() {
    let d = tmp();
    let base = minilm(d.path());
    let case = |name: &str, edit: &dyn Fn(&Path)| {
        let folder = d.path().join(name);
        copy_folder(&base, &folder);
        edit(&folder);
        scan(&folder)
    };
    // Two tokens' ids exchanged: tokenizer.json no longer agrees with vocab.txt.
    let s = case("swapped", &|f| {
        edit_json(&f.join("tokenizer.json"), |v| {
            let vocab = &mut v["model"]["vocab"];
            let (yes, no) = (vocab["yes"].clone(), vocab["no"].clone());
            vocab["yes"] = no;
            vocab["no"] = yes;
        })
    });
    assert_finding(&s, "static_scan", "tokenizer.swapped-ids", "vocab.txt");
    let msg = assert_static_finding(&s, "tokenizer.swapped-ids", "vocab.txt")["message"].to_string();
    assert!(msg.contains("\\\"yes\\\"") && msg.contains("\\\"no\\\""), "{msg}");
    // Two tokens with one id.
    let s = case("duplicate", &|f| edit_json(&f.join("tokenizer.json"), |v| v["model"]["vocab"]["yes"] = json!(2053)));
    assert_finding(&s, "static_scan", "tokenizer.duplicate-id", "tokenizer.json");
    // An id past config.json's vocab_size: no embedding row.
    let s = case("range", &|f| edit_json(&f.join("config.json"), |v| v["vocab_size"] = json!(30000)));
    assert_finding(&s, "static_scan", "tokenizer.id-out-of-range", "tokenizer.json");
    // vocab_size that is not the embedding's row count.
    let s = case("rows", &|f| edit_json(&f.join("config.json"), |v| v["vocab_size"] = json!(40000)));
    assert_finding(
        &s,
        "static_scan",
        "tokenizer.embedding-mismatch",
        "model.safetensors: embeddings.word_embeddings.weight",
    );
    // An added token whose id the vocabulary gives to another token.
    let s = case("added", &|f| edit_json(&f.join("tokenizer.json"), |v| v["added_tokens"][1]["id"] = json!(7592)));
    assert_finding(&s, "static_scan", "tokenizer.added-token-conflict", "tokenizer.json");
    // tokenizer_config.json disagreeing with tokenizer.json on an added token.
    let s = case("decoder", &|f| {
        edit_json(&f.join("tokenizer_config.json"), |v| {
            v["added_tokens_decoder"] = json!({"101": {"content": "[SEP]", "special": true}})
        })
    });
    assert_finding(&s, "static_scan", "tokenizer.added-tokens-mismatch", "tokenizer_config.json");
    // Not JSON at all.
    let s = case("garbage", &|f| std::fs::write(f.join("tokenizer.json"), "{\"model\": {").unwrap());
    assert_eq!(s.one()["verdict"], "fail", "{}", s.one());
    assert!(s.one()["reason"].as_str().unwrap().contains("tokenizer.json"), "{}", s.one());
}

/// A BPE vocabulary in merge order, as GPT-2's: two tokens' ids exchanged
/// break the order, and the check names both tokens.
#[test]
fn a_swap_in_a_merge_ordered_bpe_vocabulary_is_reported() {
    let d = tmp();
    let folder = d.path().join("bpe");
    std::fs::create_dir_all(&folder).unwrap();
    // 26 letters, then 300 merges each making a new token from two earlier ones.
    let mut vocab: Vec<String> = (b'a'..=b'z').map(|c| (c as char).to_string()).collect();
    let mut merges = Vec::new();
    let mut rng = Rng(7);
    while merges.len() < 300 {
        let a = vocab[(rng.next_u64() % vocab.len() as u64) as usize].clone();
        let b = vocab[(rng.next_u64() % 26) as usize].clone();
        let made = format!("{a}{b}");
        if made.len() > 12 || vocab.contains(&made) {
            continue;
        }
        merges.push(format!("{a} {b}"));
        vocab.push(made);
    }
    let write = |vocab: &[String]| {
        let map: serde_json::Map<String, Value> =
            vocab.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let tokenizer =
            json!({"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": map, "merges": merges}});
        std::fs::write(folder.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    };
    write(&vocab);
    let s = scan(&folder);
    assert_eq!(plugin_result(&s, "tokenizer_check")["verdict"], "pass", "{}", s.one());
    let (x, y) = (vocab[100].clone(), vocab[250].clone());
    vocab.swap(100, 250);
    write(&vocab);
    let s = scan(&folder);
    let f = assert_static_finding(&s, "tokenizer.swapped-ids", "tokenizer.json");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains(&format!("{x:?}")) && msg.contains(&format!("{y:?}")), "{msg}");
}

/// Lays `folder` out as a Hugging Face hub cache repository under `hub`:
/// `models--ORG--NAME/blobs/<hash>` (sha256 for weights, git blob sha1 for
/// the rest, as the hub stores them) and `snapshots/REV/` of links into it.
/// Returns the snapshot folder.
fn hf_cache(folder: &Path, hub: &Path, repo: &str) -> PathBuf {
    use sha1::Digest as _;
    let repo = hub.join(format!("models--{repo}"));
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&blobs).unwrap();
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() { walk(&e.path(), &r, out) } else { out.push(r) }
        }
    }
    let mut files = Vec::new();
    walk(folder, Path::new(""), &mut files);
    for rel in files {
        let bytes = std::fs::read(folder.join(&rel)).unwrap();
        let hash = if rel.extension().is_some_and(|e| e == "safetensors") {
            sha256_bytes(&bytes)
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(&bytes);
            hex::encode(h.finalize())
        };
        std::fs::write(blobs.join(&hash), &bytes).unwrap();
        let link = snapshot.join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(rel.components().count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{hash}"), &link).unwrap();
    }
    snapshot
}

/// Issue 37: `airlock admit` takes a Hugging Face cache snapshot, whose files
/// are links into the cache's blobs, by copying each blob once it matches the
/// hash its name records, under the repository's name. A blob with other
/// bytes, or a link out of `blobs/`, stops the admission and leaves nothing
/// in incoming/. The watcher itself still refuses links.
#[test]
fn admit_takes_a_hugging_face_cache_snapshot_and_checks_each_blob() {
    let lab = Lab::new();
    let d = tmp();
    let folder = minilm(d.path());
    let snapshot = hf_cache(&folder, &d.path().join("hub"), "sentence-transformers--all-MiniLM-L6-v2");
    let (code, out) = lab.run(&["admit", snapshot.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let admitted = lab.incoming().join("sentence-transformers--all-MiniLM-L6-v2");
    let meta = std::fs::symlink_metadata(admitted.join("1_Pooling/config.json")).unwrap();
    assert!(meta.is_file(), "a link was admitted");
    assert_eq!(sha256_file(&admitted.join("model.safetensors")), sha256_file(&folder.join("model.safetensors")));
    let out = lab.watch_once();
    assert!(out.contains("PROMOTED: sentence-transformers--all-MiniLM-L6-v2"), "{out}");

    // A blob whose bytes are not its name's: refused, naming the file.
    let bad = hf_cache(&folder, &d.path().join("hub2"), "org--tampered");
    let target = std::fs::read_link(bad.join("config.json")).unwrap();
    let blob = bad.join(target);
    std::fs::write(&blob, b"{\"architectures\": [\"Evil\"]}").unwrap();
    let (code, out) = lab.run(&["admit", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("config.json") && out.contains("holds other bytes"), "{out}");
    // A link out of blobs/.
    let out_link = hf_cache(&folder, &d.path().join("hub3"), "org--escaping");
    std::fs::remove_file(out_link.join("vocab.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", out_link.join("vocab.txt")).unwrap();
    let (code, out) = lab.run(&["admit", out_link.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("vocab.txt") && out.contains("not a file of the cache's"), "{out}");
    let left: Vec<_> = std::fs::read_dir(lab.incoming()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left in incoming/: {left:?}");
    // The watcher never follows links, snapshot or not.
    std::os::unix::fs::symlink(&snapshot, lab.incoming().join("linked-snapshot")).unwrap();
    let out = lab.watch_once();
    assert!(!out.contains("PROMOTED: linked-snapshot"), "{out}");
}
