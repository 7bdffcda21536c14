//! Stage 5 (static scan): is a folder model's tokenizer the one its weights
//! were trained with? A tokenizer maps text to the rows of the embedding, so
//! a tampered one changes what the model reads without touching a weight:
//! two tokens' ids exchanged turn "yes" into "no".
//!
//! For each folder that holds a `tokenizer.json`:
//! * it parses, and its vocabulary's ids are unique;
//! * its added tokens agree with the vocabulary and with
//!   `tokenizer_config.json`'s `added_tokens_decoder`;
//! * no id reaches past `config.json`'s `vocab_size`, and `vocab_size` is the
//!   row count of the embedding tensor;
//! * a `vocab.txt` (WordPiece) or `vocab.json` (BPE) beside it gives every
//!   token the same id;
//! * in a BPE vocabulary ordered by merge rank (GPT-2, Llama 3, Qwen), the
//!   order is unbroken: a swap of two tokens' ids breaks it in a few places.

use std::collections::{BTreeMap, HashMap};

use airlock_sdk::{ChunkReader, File, Finding, Format, Model, Report, Severity, Stage, StageInfo, context};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Largest tokenizer file read (a 256k-token vocabulary is about 30 MB).
    #[serde(default = "default_max_mib")]
    max_tokenizer_mib: u64,
}

fn default_max_mib() -> u64 {
    256
}

/// Tensor names of the input embedding, by architecture family.
const EMBEDDING_NAMES: [&str; 4] =
    ["embed_tokens.weight", "word_embeddings.weight", "wte.weight", "tok_embeddings.weight"];

/// At most this many breaks in an otherwise merge-ordered BPE vocabulary are
/// read as ids moved by hand; more mean the vocabulary is not in merge order
/// at all (SentencePiece conversions), and then the order says nothing.
const MAX_ORDER_BREAKS: usize = 8;

/// Fewest merges for the order to mean anything.
const MIN_MERGES: usize = 256;

struct Check<'a> {
    /// The model's files with their paths, each path asked of the host once.
    files: &'a [(String, File)],
    dir: String,
    max_bytes: u64,
    findings: Vec<Finding>,
    tokens: usize,
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

impl Check<'_> {
    fn path(&self, name: &str) -> String {
        if self.dir.is_empty() { name.to_string() } else { format!("{}/{name}", self.dir) }
    }

    fn file(&self, name: &str) -> Option<(&str, &File)> {
        let path = self.path(name);
        self.files.iter().find(|(p, _)| *p == path).map(|(p, f)| (p.as_str(), f))
    }

    fn flag(&mut self, rule: &str, location: String, message: String) {
        self.findings.push(Finding::new(rule, Severity::Critical, message).at(location));
    }

    /// The bytes of `name` in this folder, within the size cap.
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let Some((path, file)) = self.file(name) else { return Ok(None) };
        if file.size() > self.max_bytes {
            return Err(format!(
                "{path}: {} bytes, more than the {} a tokenizer file may have",
                file.size(),
                self.max_bytes
            ));
        }
        ChunkReader::file(file).collect_bytes().map(Some).map_err(|e| format!("{path}: cannot read: {e}"))
    }

    fn json(&mut self, name: &str) -> Result<Option<Value>, String> {
        let Some(bytes) = self.read(name)? else { return Ok(None) };
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                self.flag(
                    "tokenizer.unparseable",
                    self.path(name),
                    format!("{}: not valid JSON: {e}", self.path(name)),
                );
                Ok(None)
            }
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let tj = self.path("tokenizer.json");
        let Some(tokenizer) = self.json("tokenizer.json")? else { return Ok(()) };
        let model = &tokenizer["model"];
        let kind = model["type"].as_str().unwrap_or("?").to_string();

        // The vocabulary: token -> id. Unigram keeps a list, where the id is the position.
        let mut vocab: HashMap<String, u64> = HashMap::new();
        let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
        match &model["vocab"] {
            Value::Object(map) => {
                for (token, id) in map {
                    let Some(id) = id.as_u64() else {
                        self.flag(
                            "tokenizer.bad-id",
                            tj.clone(),
                            format!("{tj}: token {token:?} has id {id}, not a whole number"),
                        );
                        continue;
                    };
                    if let Some(other) = by_id.insert(id, token.clone()) {
                        self.flag(
                            "tokenizer.duplicate-id",
                            tj.clone(),
                            format!("{tj}: tokens {other:?} and {token:?} both have id {id}"),
                        );
                    }
                    vocab.insert(token.clone(), id);
                }
            }
            Value::Array(list) => {
                for (i, entry) in list.iter().enumerate() {
                    if let Some(token) = entry.get(0).and_then(Value::as_str) {
                        by_id.insert(i as u64, token.to_string());
                        vocab.insert(token.to_string(), i as u64);
                    }
                }
            }
            _ => {
                self.flag(
                    "tokenizer.unparseable",
                    tj.clone(),
                    format!("{tj}: model.vocab is neither a map nor a list"),
                );
                return Ok(());
            }
        }
        self.tokens += vocab.len();

        // Added tokens: an id that is in the vocabulary must be the same token there.
        let mut added: BTreeMap<u64, String> = BTreeMap::new();
        for entry in tokenizer["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(id), Some(content)) = (entry["id"].as_u64(), entry["content"].as_str()) else {
                self.flag(
                    "tokenizer.unparseable",
                    tj.clone(),
                    format!("{tj}: an added token without a numeric id and a content: {entry}"),
                );
                continue;
            };
            if let Some(other) = added.insert(id, content.to_string()) {
                self.flag(
                    "tokenizer.duplicate-id",
                    tj.clone(),
                    format!("{tj}: added tokens {other:?} and {content:?} both have id {id}"),
                );
            }
            if let Some(in_vocab) = by_id.get(&id)
                && in_vocab != content
            {
                self.flag(
                    "tokenizer.added-token-conflict",
                    tj.clone(),
                    format!("{tj}: added token {content:?} has id {id}, which the vocabulary gives to {in_vocab:?}"),
                );
            }
            if let Some(&vid) = vocab.get(content)
                && vid != id
            {
                self.flag(
                    "tokenizer.added-token-conflict",
                    tj.clone(),
                    format!("{tj}: added token {content:?} has id {id}, but the vocabulary gives it id {vid}"),
                );
            }
        }

        // tokenizer_config.json's view of the added tokens.
        let tc = self.path("tokenizer_config.json");
        if let Some(config) = self.json("tokenizer_config.json")?
            && let Some(decoder) = config.get("added_tokens_decoder").and_then(Value::as_object)
        {
            for (id, entry) in decoder {
                let content = entry.get("content").and_then(Value::as_str);
                match (id.parse::<u64>().ok(), content) {
                    (Some(id), Some(content)) => {
                        let there = added.get(&id).or_else(|| by_id.get(&id));
                        if there.map(String::as_str) != Some(content) {
                            self.flag(
                                "tokenizer.added-tokens-mismatch",
                                tc.clone(),
                                format!(
                                    "{tc}: added_tokens_decoder gives id {id} to {content:?}; {tj} gives it to {}",
                                    there.map_or("no token".to_string(), |t| format!("{t:?}"))
                                ),
                            );
                        }
                    }
                    _ => self.flag(
                        "tokenizer.unparseable",
                        tc.clone(),
                        format!("{tc}: added_tokens_decoder[{id:?}] is not a numeric id with a content"),
                    ),
                }
            }
        }

        // Ids against the model: config.json's vocab_size and the embedding's rows.
        let max_id = by_id.keys().chain(added.keys()).max().copied();
        let cj = self.path("config.json");
        let config = self.json("config.json")?;
        let vocab_size = config
            .as_ref()
            .and_then(|c| c.get("vocab_size").or_else(|| c.pointer("/text_config/vocab_size")))
            .and_then(Value::as_u64);
        if let (Some(size), Some(max)) = (vocab_size, max_id)
            && max >= size
        {
            self.flag(
                "tokenizer.id-out-of-range",
                tj.clone(),
                format!(
                    "{tj}: token {:?} has id {max}, past {cj}'s vocab_size {size}: it has no embedding row",
                    by_id.get(&max).or(added.get(&max)).map_or("?", String::as_str)
                ),
            );
        }
        if let Some(size) = vocab_size
            && let Some((at, rows)) = self.embedding_rows()
            && rows != size
        {
            self.flag(
                "tokenizer.embedding-mismatch",
                at.clone(),
                format!("{at}: the embedding has {rows} rows but {cj} says vocab_size {size}"),
            );
        }

        // The same vocabulary written another way beside it.
        if kind == "WordPiece"
            && let Some(text) = self.read("vocab.txt")?
        {
            let text = String::from_utf8_lossy(&text);
            let listed: Vec<&str> = text.lines().collect();
            self.compare_ids(&vocab, listed.iter().enumerate().map(|(i, t)| (*t, i as u64)), "vocab.txt");
        }
        if kind == "BPE"
            && let Some(other) = self.json("vocab.json")?
            && let Some(map) = other.as_object()
        {
            let pairs: Vec<(&str, u64)> = map.iter().filter_map(|(t, id)| Some((t.as_str(), id.as_u64()?))).collect();
            self.compare_ids(&vocab, pairs.into_iter(), "vocab.json");
        }
        if kind == "BPE" {
            self.merge_order(&tj, model, &vocab);
        }
        Ok(())
    }

    /// Every token listed in `other` must have the same id in tokenizer.json.
    fn compare_ids<'t>(
        &mut self,
        vocab: &HashMap<String, u64>,
        other: impl Iterator<Item = (&'t str, u64)>,
        name: &str,
    ) {
        let at = self.path(name);
        let mut differ = Vec::new();
        let mut count = 0usize;
        for (token, id) in other {
            count += 1;
            match vocab.get(token) {
                Some(&vid) if vid != id => differ.push(format!("{token:?} is {id} in {name}, {vid} in tokenizer.json")),
                None => differ.push(format!("{token:?} ({id} in {name}) is not in tokenizer.json")),
                _ => {}
            }
        }
        if count != vocab.len() {
            differ.push(format!("{name} lists {count} tokens, tokenizer.json {}", vocab.len()));
        }
        if !differ.is_empty() {
            let shown: Vec<&str> = differ.iter().take(4).map(String::as_str).collect();
            self.flag(
                "tokenizer.swapped-ids",
                at.clone(),
                format!("{at} and tokenizer.json disagree on {} token id(s): {}", differ.len(), shown.join("; ")),
            );
        }
    }

    /// In a vocabulary ordered by merge rank, the token each merge makes has a
    /// larger id than the one before. A few breaks in that order are tokens
    /// whose ids were exchanged.
    fn merge_order(&mut self, tj: &str, model: &Value, vocab: &HashMap<String, u64>) {
        let Some(merges) = model["merges"].as_array() else { return };
        if merges.len() < MIN_MERGES {
            return;
        }
        let made: Vec<(String, u64)> = merges
            .iter()
            .filter_map(|m| {
                let token = match m {
                    Value::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}"))?,
                    Value::Array(pair) => format!("{}{}", pair.first()?.as_str()?, pair.get(1)?.as_str()?),
                    _ => return None,
                };
                let id = *vocab.get(&token)?;
                Some((token, id))
            })
            .collect();
        let breaks: Vec<usize> = (1..made.len()).filter(|&i| made[i].1 < made[i - 1].1).collect();
        if breaks.is_empty() || breaks.len() > MAX_ORDER_BREAKS {
            return;
        }
        // The tokens around each break; a swap shows both of its tokens.
        let mut named: Vec<String> = Vec::new();
        for &i in &breaks {
            for (token, id) in [&made[i - 1], &made[i]] {
                let s = format!("{token:?} (id {id})");
                if !named.contains(&s) {
                    named.push(s);
                }
            }
        }
        self.flag(
            "tokenizer.swapped-ids",
            tj.to_string(),
            format!(
                "{tj}: the vocabulary follows the merge order except at {} place(s), so token ids were moved: {}",
                breaks.len(),
                named.join(", ")
            ),
        );
    }

    /// The embedding tensor of the weights in this folder: (where, rows).
    fn embedding_rows(&self) -> Option<(String, u64)> {
        for (path, f) in self.files.iter().filter(|(p, f)| dir_of(p) == self.dir && f.format() == Format::Safetensors) {
            for t in f.tensors() {
                // The name's last two parts: `model.embed_tokens.weight`, or the name itself.
                let is_embedding = EMBEDDING_NAMES
                    .iter()
                    .any(|e| t.name == *e || t.name.strip_suffix(e).is_some_and(|rest| rest.ends_with('.')));
                if is_embedding && t.shape.len() == 2 {
                    return Some((format!("{path}: {}", t.name), t.shape[0]));
                }
            }
        }
        None
    }
}

struct TokenizerCheck;

impl Stage for TokenizerCheck {
    fn describe() -> StageInfo {
        StageInfo::new(
            "tokenizer_check",
            env!("CARGO_PKG_VERSION"),
            "checks a folder model's tokenizer against its config, its embedding and itself: unique ids, consistent added tokens, no swapped ids",
        )
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let files: Vec<(String, File)> = model.files().into_iter().map(|f| (f.path(), f)).collect();
        let dirs: Vec<String> = files
            .iter()
            .filter(|(p, _)| file_name(p) == "tokenizer.json")
            .map(|(p, _)| dir_of(p).to_string())
            .collect();
        if dirs.is_empty() {
            return Report::pass("no tokenizer.json");
        }
        let mut findings = Vec::new();
        let mut tokens = 0;
        for dir in &dirs {
            let mut check = Check {
                files: &files,
                dir: dir.clone(),
                max_bytes: config.max_tokenizer_mib << 20,
                findings: Vec::new(),
                tokens: 0,
            };
            if let Err(e) = check.run() {
                return Report::fail(e);
            }
            tokens += check.tokens;
            findings.extend(check.findings);
        }
        if let Some(first) = findings.first() {
            let reason = format!(
                "{} tokenizer problem(s); first: {} at {}",
                findings.len(),
                first.message,
                first.location.as_deref().unwrap_or("?")
            );
            return Report::fail(reason).findings(findings).cap_findings(200);
        }
        Report::pass(format!(
            "{} tokenizer(s), {tokens} tokens: ids unique and consistent with the config and the weights",
            dirs.len()
        ))
    }
}

airlock_sdk::export_stage!(TokenizerCheck);
