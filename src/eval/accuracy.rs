//! Task accuracy on JSONL with references.
//!
//! Rows (one JSON object per line):
//! - `{"prompt": P, "answer": A}` (also `"completion"` or `"reference"` for A): the model
//!   continues the plain prompt P greedily; the text is scored against A.
//! - `{"messages": [..., {"role": "assistant", "content": A}]}`: the conversation before the
//!   last assistant turn is rendered with the model's chat template (generation prompt
//!   added) and continued greedily; scored against A.
//! - `{"instruction", "input", "output"}` (alpaca): one user turn, scored against `output`.
//! - `{"prompt": P, "choices": [C0, C1, ...], "answer": k}` (k an index, or the text of a
//!   choice): multiple choice by log-likelihood, the choice with the highest
//!   Σ log p(C | P) wins (also reported: the highest per-byte log-likelihood).
//!
//! Generated text is matched three ways: **exact** (equal after trimming surrounding
//! whitespace), **normalized** (equal after lower-casing, dropping punctuation and the
//! articles a/an/the, and collapsing whitespace), and **contains** (the normalized
//! reference occurs in the normalized output as whole words).

use serde::Serialize;
use serde_json::Value;

use super::EvalError;
use crate::data::{ChatMessage, Tokenizer};

/// What a task row asks.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskItem {
    /// Greedy generation from `prompt` (text, chat template already applied), scored against `answer`.
    Generate { prompt: String, answer: String },
    /// Multiple choice: the `answer`-th of `choices` is right.
    Choice { prompt: String, choices: Vec<String>, answer: usize },
}

/// The language-model operations accuracy needs (llama.cpp in grit; a table in tests).
pub trait TaskModel {
    /// Greedy continuation of `prompt` (BOS added as the model wants).
    fn greedy(
        &mut self,
        prompt: &str,
        max_new: usize,
        stop: &[String],
    ) -> Result<String, EvalError>;
    /// Σ log p(continuation | prompt).
    fn loglik(&mut self, prompt: &str, continuation: &str) -> Result<f64, EvalError>;
}

/// Accuracy counts of one row of the table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Accuracy {
    /// Generation items scored.
    pub n: usize,
    pub exact: f64,
    pub normalized: f64,
    pub contains: f64,
    /// Multiple-choice items scored.
    pub choice_n: usize,
    /// Fraction right by total log-likelihood.
    pub choice: f64,
    /// Fraction right by log-likelihood per byte of the choice.
    pub choice_norm: f64,
}

/// Lower-case, punctuation removed, articles dropped, whitespace collapsed.
pub fn normalize(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() || c.is_whitespace() { c } else { ' ' })
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn exact_match(pred: &str, reference: &str) -> bool {
    pred.trim() == reference.trim()
}

pub fn normalized_match(pred: &str, reference: &str) -> bool {
    normalize(pred) == normalize(reference)
}

/// The normalized reference occurs in the normalized prediction on word boundaries.
pub fn contains_match(pred: &str, reference: &str) -> bool {
    let (p, r) = (normalize(pred), normalize(reference));
    if r.is_empty() {
        return p.is_empty();
    }
    format!(" {p} ").contains(&format!(" {r} "))
}

fn field<'a>(v: &'a Value, loc: &str, key: &str) -> Result<&'a str, EvalError> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => {
            Err(EvalError::Task(format!("{loc}: field '{key}' is not a string (found {other})")))
        }
        None => Err(EvalError::Task(format!("{loc}: field '{key}' is missing"))),
    }
}

/// Parses one task row (`loc` = `file:line` for messages).
pub fn parse_item(v: &Value, loc: &str, tok: &dyn Tokenizer) -> Result<TaskItem, EvalError> {
    if !v.is_object() {
        return Err(EvalError::Task(format!("{loc}: not a JSON object")));
    }
    if let Some(ch) = v.get("choices") {
        choice_item(v, ch, loc)
    } else if let Some(m) = v.get("messages") {
        messages_item(m, loc, tok)
    } else if v.get("instruction").is_some() {
        instruction_item(v, loc, tok)
    } else if v.get("prompt").is_some() {
        prompt_item(v, loc)
    } else {
        Err(EvalError::Task(format!("{loc}: unknown task row (expected prompt+answer, prompt+choices+answer, messages, or instruction+output)")))
    }
}

/// The prompt rendered with the model's chat template (generation prompt appended).
fn chat_prompt(msgs: &[ChatMessage], loc: &str, tok: &dyn Tokenizer) -> Result<String, EvalError> {
    tok.apply_chat_template(msgs, true).map_err(|e| EvalError::Task(format!("{loc}: {e}")))
}

/// A multiple-choice row: prompt, choices (≥ 2) and the answer as an index or a choice.
fn choice_item(v: &Value, ch: &Value, loc: &str) -> Result<TaskItem, EvalError> {
    let Value::Array(items) = ch else {
        return Err(EvalError::Task(format!("{loc}: field 'choices' is not an array")));
    };
    let choices = items
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.as_str().map(str::to_string).ok_or_else(|| {
                EvalError::Task(format!("{loc}: field 'choices[{i}]' is not a string"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if choices.len() < 2 {
        return Err(EvalError::Task(format!("{loc}: field 'choices' needs at least 2 choices")));
    }
    let prompt = field(v, loc, "prompt")?.to_string();
    let answer = match v.get("answer") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if (k as usize) < choices.len() => k as usize,
            _ => {
                return Err(EvalError::Task(format!(
                    "{loc}: field 'answer' {n} is not an index into the {} choices",
                    choices.len()
                )))
            }
        },
        Some(Value::String(s)) => {
            choices.iter().position(|c| c == s || c.trim() == s.trim()).ok_or_else(|| {
                EvalError::Task(format!("{loc}: field 'answer' \"{s}\" is none of the choices"))
            })?
        }
        Some(other) => {
            return Err(EvalError::Task(format!(
                "{loc}: field 'answer' must be an index or a choice (found {other})"
            )))
        }
        None => return Err(EvalError::Task(format!("{loc}: field 'answer' is missing"))),
    };
    Ok(TaskItem::Choice { prompt, choices, answer })
}

/// A conversation whose last (assistant) turn is the reference.
fn messages_item(m: &Value, loc: &str, tok: &dyn Tokenizer) -> Result<TaskItem, EvalError> {
    let Value::Array(items) = m else {
        return Err(EvalError::Task(format!("{loc}: field 'messages' is not an array")));
    };
    let mut msgs = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let role = field(it, loc, "role").map_err(|_| {
            EvalError::Task(format!("{loc}: field 'messages[{i}].role' is missing or not a string"))
        })?;
        let content = field(it, loc, "content").map_err(|_| {
            EvalError::Task(format!(
                "{loc}: field 'messages[{i}].content' is missing or not a string"
            ))
        })?;
        msgs.push(ChatMessage::new(role, content));
    }
    let Some(last) = msgs.pop() else {
        return Err(EvalError::Task(format!("{loc}: field 'messages' is empty")));
    };
    if last.role != "assistant" || msgs.is_empty() {
        return Err(EvalError::Task(format!("{loc}: field 'messages' must end with an assistant turn (the reference) after at least one message")));
    }
    Ok(TaskItem::Generate { prompt: chat_prompt(&msgs, loc, tok)?, answer: last.content })
}

/// An Alpaca-style row: instruction, optional input, output (the reference).
fn instruction_item(v: &Value, loc: &str, tok: &dyn Tokenizer) -> Result<TaskItem, EvalError> {
    let ins = field(v, loc, "instruction")?;
    let input = match v.get("input") {
        None | Some(Value::Null) => "",
        Some(_) => field(v, loc, "input")?,
    };
    let user = if input.is_empty() { ins.to_string() } else { format!("{ins}\n\n{input}") };
    let answer = field(v, loc, "output")?.to_string();
    let prompt = if tok.has_chat_template() {
        chat_prompt(&[ChatMessage::new("user", user)], loc, tok)?
    } else {
        crate::data::render::alpaca_prompt(None, ins, input)
    };
    Ok(TaskItem::Generate { prompt, answer })
}

/// A prompt with its reference under `answer`, `completion` or `reference`.
fn prompt_item(v: &Value, loc: &str) -> Result<TaskItem, EvalError> {
    let prompt = field(v, loc, "prompt")?.to_string();
    let key = ["answer", "completion", "reference"]
        .into_iter()
        .find(|k| v.get(*k).is_some())
        .ok_or_else(|| EvalError::Task(format!("{loc}: a prompt row needs a reference: field 'answer' (or 'completion', 'reference') is missing")))?;
    Ok(TaskItem::Generate { prompt, answer: field(v, loc, key)?.to_string() })
}

/// Reads a task file (JSONL); errors name `file:line` and the field.
pub fn load_items(
    path: &std::path::Path,
    tok: &dyn Tokenizer,
    limit: usize,
) -> Result<Vec<TaskItem>, EvalError> {
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| EvalError::Task(format!("{name}: {e}")))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if limit > 0 && items.len() >= limit {
            break;
        }
        let loc = format!("{name}:{}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| {
            EvalError::Task(format!("{loc}: invalid JSON at column {}: {e}", e.column()))
        })?;
        items.push(parse_item(&v, &loc, tok)?);
    }
    if items.is_empty() {
        return Err(EvalError::Task(format!("{name}: no task rows")));
    }
    Ok(items)
}

/// Scores `items` with `model`. `progress(done, total)` after each item.
pub fn score(
    model: &mut dyn TaskModel,
    items: &[TaskItem],
    max_new: usize,
    stop: &[String],
    mut progress: impl FnMut(usize, usize),
) -> Result<Accuracy, EvalError> {
    let mut acc = Accuracy::default();
    let (mut ex, mut no, mut co, mut ch, mut chn) = (0usize, 0usize, 0usize, 0usize, 0usize);
    for (i, it) in items.iter().enumerate() {
        match it {
            TaskItem::Generate { prompt, answer } => {
                let out = model.greedy(prompt, max_new, stop)?;
                acc.n += 1;
                ex += usize::from(exact_match(&out, answer));
                no += usize::from(normalized_match(&out, answer));
                co += usize::from(contains_match(&out, answer));
            }
            TaskItem::Choice { prompt, choices, answer } => {
                let mut best = (f64::NEG_INFINITY, 0usize);
                let mut best_norm = (f64::NEG_INFINITY, 0usize);
                for (k, c) in choices.iter().enumerate() {
                    let ll = model.loglik(prompt, c)?;
                    if ll > best.0 {
                        best = (ll, k);
                    }
                    let per_byte = ll / c.len().max(1) as f64;
                    if per_byte > best_norm.0 {
                        best_norm = (per_byte, k);
                    }
                }
                acc.choice_n += 1;
                ch += usize::from(best.1 == *answer);
                chn += usize::from(best_norm.1 == *answer);
            }
        }
        progress(i + 1, items.len());
    }
    let frac = |k: usize, n: usize| if n > 0 { k as f64 / n as f64 } else { 0.0 };
    acc.exact = frac(ex, acc.n);
    acc.normalized = frac(no, acc.n);
    acc.contains = frac(co, acc.n);
    acc.choice = frac(ch, acc.choice_n);
    acc.choice_norm = frac(chn, acc.choice_n);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::FakeTok;
    use std::collections::HashMap;

    /// A model that answers from a table and scores continuations from another.
    struct Table {
        answers: HashMap<String, String>,
        ll: HashMap<(String, String), f64>,
    }

    impl TaskModel for Table {
        fn greedy(
            &mut self,
            prompt: &str,
            _max_new: usize,
            stop: &[String],
        ) -> Result<String, EvalError> {
            let mut s = self.answers.get(prompt).cloned().unwrap_or_default();
            for st in stop {
                if let Some(p) = s.find(st.as_str()) {
                    s.truncate(p);
                }
            }
            Ok(s)
        }
        fn loglik(&mut self, prompt: &str, c: &str) -> Result<f64, EvalError> {
            Ok(*self.ll.get(&(prompt.to_string(), c.to_string())).unwrap_or(&-100.0))
        }
    }

    #[test]
    fn matching_rules() {
        assert!(exact_match("  Paris\n", "Paris"));
        assert!(!exact_match("paris", "Paris"));
        assert!(normalized_match("The Paris!", "paris"));
        assert!(!normalized_match("Paris, France", "Paris"));
        assert!(contains_match("It is Paris, France.", "paris"));
        assert!(!contains_match("Parisian", "Paris")); // whole words only
        assert_eq!(normalize("  An Apple,  a day. "), "apple day");
    }

    #[test]
    fn scores_generation_and_choices_with_known_answers() {
        let rows = [
            r#"{"prompt": "Capital of France?", "answer": "Paris"}"#,
            r#"{"prompt": "2+2=", "answer": "4"}"#,
            r#"{"prompt": "Color of the sky?", "completion": "blue"}"#,
            r#"{"prompt": "Largest planet?", "reference": "Jupiter"}"#,
            r#"{"prompt": "Pick:", "choices": [" cat", " dog", " elephant"], "answer": 1}"#,
            r#"{"prompt": "Q:", "choices": [" yes", " no"], "answer": " yes"}"#,
        ];
        let tok = FakeTok::chatml();
        let items: Vec<TaskItem> = rows
            .iter()
            .map(|r| parse_item(&serde_json::from_str(r).unwrap(), "t:1", &tok).unwrap())
            .collect();
        let mut m = Table {
            answers: [
                ("Capital of France?", "Paris"),           // exact
                ("2+2=", " 4.\nand more"), // contains (after the stop: normalized too)
                ("Color of the sky?", "The sky is blue."), // contains only
                ("Largest planet?", "Saturn"), // wrong
            ]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
            ll: [
                (("Pick:", " cat"), -3.0),
                (("Pick:", " dog"), -2.0),      // best by sum: right
                (("Pick:", " elephant"), -4.0), // best per byte (−0.44 vs −0.5): wrong
                (("Q:", " yes"), -1.0),
                (("Q:", " no"), -0.5), // wrong both ways
            ]
            .iter()
            .map(|((p, c), l)| ((p.to_string(), c.to_string()), *l))
            .collect(),
        };
        let acc = score(&mut m, &items, 16, &["\n".to_string()], |_, _| {}).unwrap();
        assert_eq!(acc.n, 4);
        assert_eq!(acc.exact, 0.25);
        assert_eq!(acc.normalized, 0.5);
        assert_eq!(acc.contains, 0.75);
        assert_eq!(acc.choice_n, 2);
        assert_eq!(acc.choice, 0.5);
        assert_eq!(acc.choice_norm, 0.0);
    }

    #[test]
    fn chat_rows_use_the_template_and_bad_rows_name_the_field() {
        let tok = FakeTok::chatml();
        let v = serde_json::json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]});
        let TaskItem::Generate { prompt, answer } = parse_item(&v, "f:3", &tok).unwrap() else {
            panic!()
        };
        assert_eq!(answer, "Hello");
        assert!(prompt.contains("Hi") && !prompt.contains("Hello"), "{prompt}");
        let bad = [
            (r#"{"prompt": "x"}"#, "field 'answer'"),
            (r#"{"prompt": "x", "choices": ["a"], "answer": 0}"#, "at least 2"),
            (r#"{"prompt": "x", "choices": ["a", "b"], "answer": 2}"#, "not an index"),
            (r#"{"prompt": "x", "choices": ["a", "b"], "answer": "c"}"#, "none of the choices"),
            (r#"{"messages": [{"role": "user", "content": "Hi"}]}"#, "assistant turn"),
            (r#"{"foo": 1}"#, "unknown task row"),
        ];
        for (row, want) in bad {
            let e = parse_item(&serde_json::from_str(row).unwrap(), "f:3", &tok)
                .unwrap_err()
                .to_string();
            assert!(e.contains("f:3") && e.contains(want), "{e}");
        }
    }
}
