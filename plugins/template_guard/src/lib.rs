//! Stage 5 (static scan), template guard: chat templates are programs that
//! run inside the inference server. This plugin finds every template the
//! model carries, compiles it with minijinja (inside the sandbox, never
//! rendering it) and inspects the compiled instructions.
//!
//! It rejects (critical): access to dunder attributes or items
//! (`__class__`, `__globals__`, ...), attribute walking from gadget objects
//! (`cycler`, `joiner`, `lipsum`, `namespace`, Flask's `self`/`config`/
//! `request`), the `attr` filter, imports, includes and `extends`, a
//! template that does not parse, and a branch that tests message content
//! against a literal and emits a system or assistant turn. It flags (medium)
//! literal URLs, base64 blobs and HTML comments that reach the output.
//! Ordinary templates, `namespace()`, loops and loop controls included, pass:
//! the e2e tests run it over llama.cpp's corpus of 70 real templates.

use airlock_sdk::{File, Finding, Format, MetaKind, MetaValue, Model, Report, Severity, Stage, StageInfo, context};
use minijinja::machinery::{Instruction, Instructions, get_compiled_template};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    /// sha256 (hex) of templates known to be good: they pass without analysis.
    #[serde(default)]
    allowed_sha256: Vec<String>,
}

/// Objects whose attributes lead to Python internals in Jinja2 sandboxes.
const GADGETS: [&str; 8] = ["cycler", "joiner", "lipsum", "namespace", "self", "config", "request", "url_for"];
/// Text that opens a system or assistant turn in the common chat formats.
const TURN_MARKERS: [&str; 9] = [
    "system",
    "assistant",
    "<|im_start|>",
    "<start_of_turn>",
    "<|start_header_id|>",
    "[INST]",
    "<<SYS>>",
    "<|system|>",
    "<|assistant|>",
];

/// One template and where it came from.
struct Source {
    location: String,
    text: String,
}

fn is_dunder(s: &str) -> bool {
    s.len() > 4 && s.starts_with("__") && s.ends_with("__")
}

/// A string constant naming a dunder anywhere inside it (`'x.__class__'`, `'__globals__'`).
fn mentions_dunder(s: &str) -> Option<&str> {
    let mut rest = s;
    while let Some(at) = rest.find("__") {
        let tail = &rest[at + 2..];
        let word: String = tail.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if let Some(end) = word.find("__")
            && end > 0
        {
            return Some(&rest[at..at + 2 + end + 2]);
        }
        rest = tail;
    }
    None
}

fn has_url(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    ["http://", "https://", "ftp://", "www."].iter().any(|p| l.contains(p))
}

/// A run of at least 40 base64 characters with letters of both cases and digits.
fn has_base64_blob(s: &str) -> bool {
    let b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    s.split(|c: char| !b64(c)).any(|run| {
        run.len() >= 40
            && run.chars().any(|c| c.is_ascii_lowercase())
            && run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_digit())
    })
}

/// Text that ends up in the output or in a constant: what a backdoor plants.
fn planted_text(location: &str, line: Option<usize>, text: &str, out: &mut Vec<Finding>) {
    let at = |what: &str| match line {
        Some(l) => format!("{location}, line {l}: {what}"),
        None => format!("{location}: {what}"),
    };
    let quote: String = text.chars().take(80).collect();
    if has_url(text) {
        out.push(
            Finding::new(
                "template.literal-url",
                Severity::Medium,
                at(&format!("a literal URL reaches the output: {quote:?}")),
            )
            .at(location),
        );
    }
    if has_base64_blob(text) {
        out.push(
            Finding::new(
                "template.base64-blob",
                Severity::Medium,
                at(&format!("a base64 blob reaches the output: {quote:?}")),
            )
            .at(location),
        );
    }
    if text.contains("<!--") {
        out.push(
            Finding::new(
                "template.html-comment",
                Severity::Medium,
                at(&format!("an HTML comment reaches the output: {quote:?}")),
            )
            .at(location),
        );
    }
}

/// Whether emitted text opens a turn: a turn marker other than the name in a
/// closing tag, which ends a turn (`</assistant>`, appended when the content
/// lacks it).
fn opens_turn(s: &str) -> bool {
    TURN_MARKERS.iter().any(|m| s.match_indices(m).any(|(at, _)| !s[..at].ends_with("</")))
}

/// Conditions longer than this many instructions are cut (from the front).
const MAX_CONDITION: u32 = 512;

/// What a value on minijinja's stack may hold, for the backdoor rule: message
/// content, a string literal, or both (once combined).
#[derive(Clone, Copy, Default)]
struct Taint {
    content: bool,
    literal: bool,
}

impl Taint {
    /// The value an instruction pushes by itself (a name or a constant).
    fn of(i: &Instruction) -> Option<Taint> {
        match i {
            Instruction::Lookup(n) | Instruction::GetAttr(n) => {
                Some(Taint { content: n.contains("content"), literal: false })
            }
            Instruction::LoadConst(v) => Some(match v.as_str() {
                Some(s) => Taint { content: s == "content", literal: !s.is_empty() && s != "content" },
                None => Taint::default(),
            }),
            _ => None,
        }
    }

    fn or(self, o: Taint) -> Taint {
        Taint { content: self.content || o.content, literal: self.literal || o.literal }
    }
}

/// Whether the condition in instructions `from..to` tests message content
/// against a string literal in one operation: `'x' in m.content`,
/// `m.content == 'x'`, `(m.content or '').startswith('x')`. It follows the
/// VM's stack, so a literal that only meets other values does not count:
/// Phi-3.5's `m['role'] == 'system' and m['content']` compares the role with
/// the literal and tests the content for emptiness. None when the
/// instructions are not one expression it can follow.
fn compares_content_with_literal(ins: &Instructions, from: u32, to: u32) -> Option<bool> {
    let mut stack: Vec<Taint> = Vec::new();
    // `and`/`or`: the left operand, merged with the right one at the jump target.
    let mut pending: Vec<(u32, Taint)> = Vec::new();
    let mut hit = false;
    // Pops `n` operands and pushes their combination. A test (comparison,
    // call, filter) hits when content and a literal are among its operands.
    let mut combine = |stack: &mut Vec<Taint>, n: usize, test: bool| -> Option<()> {
        let ops = stack.split_off(stack.len().checked_sub(n)?);
        let mixed = ops.iter().any(|t| t.content && t.literal);
        let apart =
            ops.iter().enumerate().any(|(i, a)| a.content && ops.iter().enumerate().any(|(j, b)| i != j && b.literal));
        hit |= test && (mixed || apart);
        stack.push(ops.iter().fold(Taint::default(), |a, &b| a.or(b)));
        Some(())
    };
    for i in from..=to {
        while let Some(p) = pending.iter().position(|&(target, _)| target == i) {
            let (_, left) = pending.swap_remove(p);
            let right = stack.pop()?;
            stack.push(left.or(right));
        }
        if i == to {
            break;
        }
        let c = ins.get(i)?;
        match c {
            Instruction::Lookup(_) | Instruction::LoadConst(_) => stack.push(Taint::of(c)?),
            Instruction::GetAttr(_) => {
                let v = stack.pop()?;
                stack.push(v.or(Taint::of(c)?));
            }
            Instruction::GetItem => {
                // An item of the value: the key's content-ness carries (`m['content']`), not its literal.
                let key = stack.pop()?;
                let v = stack.pop()?;
                stack.push(Taint { content: v.content || key.content, literal: v.literal });
            }
            // The slice's bounds go; the value stays.
            Instruction::Slice => stack.truncate(stack.len().checked_sub(3)?),
            Instruction::Not | Instruction::Neg | Instruction::IsUndefined => {
                stack.last()?;
            }
            Instruction::Add
            | Instruction::Sub
            | Instruction::Mul
            | Instruction::Div
            | Instruction::IntDiv
            | Instruction::Rem
            | Instruction::Pow
            | Instruction::StringConcat => combine(&mut stack, 2, false)?,
            Instruction::Eq
            | Instruction::Ne
            | Instruction::Gt
            | Instruction::Gte
            | Instruction::Lt
            | Instruction::Lte
            | Instruction::In => combine(&mut stack, 2, true)?,
            Instruction::ApplyFilter(_, Some(n), _)
            | Instruction::PerformTest(_, Some(n), _)
            | Instruction::CallFunction(_, Some(n))
            | Instruction::CallMethod(_, Some(n))
            | Instruction::CallObject(Some(n)) => combine(&mut stack, usize::from(*n), true)?,
            Instruction::BuildList(Some(n)) | Instruction::BuildTuple(Some(n)) => combine(&mut stack, *n, false)?,
            Instruction::BuildMap(n) => combine(&mut stack, n.checked_mul(2)?, false)?,
            Instruction::DupTop => stack.push(*stack.last()?),
            Instruction::DiscardTop => {
                stack.pop()?;
            }
            Instruction::Swap => {
                let n = stack.len();
                stack.swap(n.checked_sub(1)?, n.checked_sub(2)?);
            }
            Instruction::JumpIfFalseOrPop(target) | Instruction::JumpIfTrueOrPop(target) => {
                let v = stack.pop()?;
                pending.push((*target, v));
            }
            _ => return None,
        }
    }
    pending.is_empty().then_some(hit)
}

fn ends_statement(i: &Instruction) -> bool {
    matches!(
        i,
        Instruction::Emit
            | Instruction::EmitRaw(_)
            | Instruction::StoreLocal(_)
            | Instruction::Jump(_)
            | Instruction::JumpIfFalse(_)
            | Instruction::Iterate(_)
            | Instruction::PushLoop(_)
            | Instruction::PopFrame
            | Instruction::PopLoopFrame
    )
}

/// Inspects one compiled instruction list.
fn inspect(location: &str, ins: &Instructions, out: &mut Vec<Finding>) {
    let get = |i: u32| ins.get(i);
    let mut idx = 0u32;
    let crit = |out: &mut Vec<Finding>, rule: &str, line: Option<usize>, msg: String| {
        let msg = match line {
            Some(l) => format!("line {l}: {msg}"),
            None => msg,
        };
        out.push(Finding::new(rule, Severity::Critical, msg).at(location));
    };
    while let Some(i) = get(idx) {
        let line = ins.get_line(idx);
        match i {
            Instruction::GetAttr(name) | Instruction::SetAttr(name) | Instruction::CallMethod(name, _)
                if is_dunder(name) =>
            {
                crit(out, "template.dunder-access", line, format!("access to the dunder attribute `{name}`"));
            }
            Instruction::Lookup(name) | Instruction::StoreLocal(name) if is_dunder(name) => {
                crit(out, "template.dunder-access", line, format!("use of the dunder name `{name}`"));
            }
            Instruction::LoadConst(v) => {
                if let Some(s) = v.as_str() {
                    if let Some(d) = mentions_dunder(s) {
                        crit(
                            out,
                            "template.dunder-access",
                            line,
                            format!("a string constant names `{d}` (item access or attribute lookup by name)"),
                        );
                    }
                    // Constants that are emitted (directly, or via concatenation).
                    planted_text(location, line, s, out);
                }
            }
            Instruction::EmitRaw(s) => planted_text(location, line, s, out),
            Instruction::Lookup(name) if GADGETS.contains(name) => {
                let attr = match get(idx + 1) {
                    Some(Instruction::GetAttr(a) | Instruction::CallMethod(a, _)) => Some(a.to_string()),
                    Some(Instruction::GetItem) => Some("[...]".to_string()),
                    _ => None,
                };
                if let Some(attr) = attr {
                    crit(
                        out,
                        "template.gadget-walk",
                        line,
                        format!("attribute walk from the gadget object `{name}` (`{name}.{attr}`)"),
                    );
                }
            }
            Instruction::ApplyFilter(name, _, _) if *name == "attr" => {
                crit(out, "template.attr-filter", line, "the `attr` filter reads attributes by computed name".into());
            }
            Instruction::Include(_) => {
                crit(out, "template.include", line, "imports or includes another template".into());
            }
            Instruction::LoadBlocks => {
                crit(out, "template.include", line, "extends another template".into());
            }
            Instruction::JumpIfFalse(target) => {
                // The condition: the instructions since the last statement boundary.
                let mut start = idx;
                while start > 0 && idx - start < MAX_CONDITION {
                    match get(start - 1) {
                        Some(c) if !ends_statement(c) => start -= 1,
                        _ => break,
                    }
                }
                let content_against_literal = compares_content_with_literal(ins, start, idx).unwrap_or_else(|| {
                    // Not an expression the stack walk follows: content and a
                    // literal anywhere in the condition count, as they may meet.
                    let cond = || (start..idx).filter_map(get);
                    cond().any(|c| Taint::of(c).is_some_and(|t| t.content))
                        && cond().any(|c| Taint::of(c).is_some_and(|t| t.literal))
                });
                if content_against_literal {
                    // The branch body: what it emits. Constants count a run of
                    // straight-line instructions at a time, and not when the run
                    // calls `raise_exception`, which aborts the render, so its
                    // message ("Invalid assistant block type") is never output.
                    // Any jump, `and`/`or` included, ends a run: in
                    // `'<turn>' ~ (false and raise_exception(..))` the raise
                    // never runs and the turn is emitted.
                    let mut emitted = Vec::new();
                    let (mut run, mut raises) = (Vec::new(), false);
                    for k in idx + 1..(*target).min(idx + 1 + 4096) {
                        let Some(c) = get(k) else { break };
                        match c {
                            Instruction::EmitRaw(s) => emitted.push(s.to_string()),
                            Instruction::LoadConst(v) => {
                                if let Some(s) = v.as_str() {
                                    run.push(s.to_string())
                                }
                            }
                            Instruction::CallFunction(name, _) if *name == "raise_exception" => raises = true,
                            _ => {}
                        }
                        let run_ends = ends_statement(c)
                            || matches!(c, Instruction::JumpIfFalseOrPop(_) | Instruction::JumpIfTrueOrPop(_));
                        if run_ends {
                            if !raises {
                                emitted.append(&mut run);
                            }
                            run.clear();
                            raises = false;
                        }
                    }
                    if !raises {
                        emitted.append(&mut run);
                    }
                    if let Some(first) = emitted.iter().find(|s| opens_turn(s)) {
                        let quote: String = first.chars().take(80).collect();
                        crit(
                            out,
                            "template.backdoor-turn",
                            line,
                            format!("a branch on message content matching a literal emits a new turn: {quote:?}"),
                        );
                    }
                }
            }
            _ => {}
        }
        idx += 1;
    }
}

/// Removes HF's `{% generation %}` / `{% endgeneration %}` markers (no-ops
/// for the output) so that templates using them still parse.
fn strip_generation_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // Look for the closer after the opener: in `{%}` the two overlap.
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = tag[2..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(&tag[..end + 2]);
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

fn check(src: &Source, allowed: &[String], out: &mut Vec<Finding>) {
    let digest = hex::encode(Sha256::digest(src.text.as_bytes()));
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(&digest)) {
        out.push(
            Finding::new(
                "template.allowlisted",
                Severity::Info,
                format!("sha256 {digest} is on the policy's allowlist"),
            )
            .at(&src.location),
        );
        return;
    }
    let text = strip_generation_tags(&src.text);
    let env = minijinja::Environment::new();
    let tmpl = match env.template_from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            out.push(
                Finding::new(
                    "template.unparseable",
                    Severity::Critical,
                    format!("the template does not parse, so it cannot be vetted: {e}"),
                )
                .at(&src.location),
            );
            return;
        }
    };
    let compiled = get_compiled_template(&tmpl);
    inspect(&src.location, &compiled.instructions, out);
    for (name, block) in &compiled.blocks {
        inspect(&format!("{} (block {name})", src.location), block, out);
    }
}

/// Vets one template text as `check` does with an empty allowlist; the
/// entry point of the fuzz target in `fuzz/` (native, outside the sandbox).
pub fn vet(location: &str, text: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    check(&Source { location: location.into(), text: text.into() }, &[], &mut out);
    out
}

/// Largest JSON or Jinja file of a folder model that is read.
const MAX_TEXT_FILE: u64 = 16 << 20;

fn read_text(file: &File) -> Result<String, String> {
    if file.size() > MAX_TEXT_FILE {
        return Err(format!(
            "{} is {} bytes, above the {MAX_TEXT_FILE}-byte limit for template files",
            file.path(),
            file.size()
        ));
    }
    let bytes = airlock_sdk::ChunkReader::file(file).collect_bytes()?;
    String::from_utf8(bytes).map_err(|e| format!("{} is not UTF-8: {e}", file.path()))
}

fn looks_like_template(s: &str) -> bool {
    s.contains("{%") || s.contains("{{")
}

/// JSON files that hold a `chat_template` (a string, or a list of `{name,
/// template}`): the tokenizer's config, and the processor's for multimodal models.
const TEMPLATE_CONFIGS: [&str; 4] =
    ["tokenizer_config.json", "chat_template.json", "processor_config.json", "preprocessor_config.json"];

/// Every template of the model.
fn sources(model: &Model) -> Result<Vec<Source>, String> {
    let mut found = Vec::new();
    for file in model.files() {
        let path = file.path();
        let name = path.rsplit('/').next().unwrap_or(&path).to_string();
        match file.format() {
            Format::Gguf | Format::Safetensors => {
                for key in file.metadata_keys() {
                    let chat = key == "tokenizer.chat_template"
                        || key.starts_with("tokenizer.chat_template.")
                        || key.contains("chat_template");
                    // Only text values can be templates; arrays (the vocabulary) are not copied in.
                    if file.metadata_kind(&key) != Some(MetaKind::Text) {
                        continue;
                    }
                    match file.metadata(&key) {
                        Some(MetaValue::Text(t)) if chat || looks_like_template(&t) => {
                            let location = if file.format() == Format::Safetensors {
                                format!("{path}: __metadata__[{key:?}]")
                            } else {
                                format!("{path}: {key}")
                            };
                            found.push(Source { location, text: t })
                        }
                        _ => {}
                    }
                }
            }
            _ if name.ends_with(".jinja") => found.push(Source { location: path.clone(), text: read_text(&file)? }),
            _ if TEMPLATE_CONFIGS.contains(&name.as_str()) => {
                let text = read_text(&file)?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{path} is not valid JSON: {e}"))?;
                match json.get("chat_template") {
                    Some(serde_json::Value::String(t)) => {
                        found.push(Source { location: format!("{path}: chat_template"), text: t.clone() })
                    }
                    Some(serde_json::Value::Array(list)) => {
                        for (i, entry) in list.iter().enumerate() {
                            let label =
                                entry.get("name").and_then(|n| n.as_str()).map(str::to_string).unwrap_or(i.to_string());
                            match entry.get("template").and_then(|t| t.as_str()) {
                                Some(t) => found.push(Source {
                                    location: format!("{path}: chat_template[{label}]"),
                                    text: t.to_string(),
                                }),
                                None => return Err(format!("{path}: chat_template[{label}] has no template string")),
                            }
                        }
                    }
                    Some(_) => return Err(format!("{path}: chat_template is neither a string nor a list")),
                    None => {}
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

struct TemplateGuard;

impl Stage for TemplateGuard {
    fn describe() -> StageInfo {
        StageInfo::new(
            "template_guard",
            env!("CARGO_PKG_VERSION"),
            "compiles every chat template with minijinja and rejects SSTI gadgets, includes and backdoor branches",
        )
    }

    fn run(model: &Model) -> Report {
        let config: Config = match context::config() {
            Ok(c) => c,
            Err(e) => return Report::fail(e),
        };
        let found = match sources(model) {
            Ok(f) => f,
            Err(e) => return Report::fail(format!("cannot read the templates: {e}")),
        };
        if found.is_empty() {
            return Report::pass("no chat template");
        }
        let mut findings = Vec::new();
        for src in &found {
            check(src, &config.allowed_sha256, &mut findings);
        }
        let critical: Vec<&Finding> = findings.iter().filter(|f| f.severity == Severity::Critical).collect();
        if let Some(first) = critical.first() {
            let reason = format!(
                "{} critical finding(s) in {} template(s); first: {} at {}: {}",
                critical.len(),
                found.len(),
                first.rule,
                first.location.as_deref().unwrap_or("?"),
                first.message
            );
            return Report::fail(reason).findings(findings).cap_findings(200);
        }
        let flagged = findings.iter().filter(|f| f.severity != Severity::Info).count();
        Report::pass(format!("{} template(s) compiled and checked, {flagged} flagged", found.len()))
            .findings(findings)
            .cap_findings(200)
    }
}

airlock_sdk::export_stage!(TemplateGuard);

#[cfg(test)]
mod tests {
    /// Every input the fuzzer crashed on (fuzz/regressions/template/) now vets without a panic.
    #[test]
    fn fuzz_regressions_vet_without_panicking() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/template");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let text = String::from_utf8_lossy(&std::fs::read(e.unwrap().path()).unwrap()).into_owned();
            let _ = super::vet("regression", &text);
            n += 1;
        }
        assert!(n > 0, "no regression inputs in {}", dir.display());
        // The first one, reduced: an opener and closer that overlap.
        assert_eq!(super::strip_generation_tags("a{%}b"), "a{%}b");
        assert_eq!(super::strip_generation_tags("x{% generation %}y{%- endgeneration -%}z"), "xyz");
    }
}
