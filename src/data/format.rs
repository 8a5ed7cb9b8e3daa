//! Row formats of JSONL training data, detected per row by its keys:
//!
//! | keys                                   | format            | trained                       |
//! |----------------------------------------|-------------------|-------------------------------|
//! | `messages: [{role, content}]`          | chat              | every assistant turn + its end-of-turn |
//! | `conversations: [{from, value}]`       | chat (ShareGPT)   | every `gpt`/`assistant` turn  |
//! | `prompt`, `completion` (strings)       | prompt/completion | completion + EOS              |
//! | `prompt`, `completion` (message lists) | chat              | assistant turns of `completion` |
//! | `instruction`, `output` (+ `input`, `system`) | alpaca     | output + end-of-turn / EOS    |
//! | `text`                                 | text              | everything                    |
//!
//! The first matching row of the table wins when a row has keys of several formats. A
//! message `content` may be a string or an OpenAI-style list of `{"type": "text", "text"}`
//! parts (concatenated).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ChatMessage;

/// The format an example came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `messages` / `conversations` / conversational prompt-completion rows.
    Chat,
    /// `{"prompt", "completion"}` strings.
    PromptCompletion,
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"text"}`.
    Text,
    /// A window of a plain-text file.
    PlainText,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Chat => "chat",
            Format::PromptCompletion => "prompt/completion",
            Format::Alpaca => "alpaca",
            Format::Text => "text",
            Format::PlainText => "plain text windows",
        }
    }
}

/// One parsed JSONL row, before templating and tokenization.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// Messages and, per message, whether it is a trained (assistant) turn.
    Chat {
        messages: Vec<ChatMessage>,
        train: Vec<bool>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Alpaca {
        system: Option<String>,
        instruction: String,
        input: String,
        output: String,
    },
    Text(String),
}

impl Record {
    pub(crate) fn format(&self) -> Format {
        match self {
            Record::Chat { .. } => Format::Chat,
            Record::PromptCompletion { .. } => Format::PromptCompletion,
            Record::Alpaca { .. } => Format::Alpaca,
            Record::Text(_) => Format::Text,
        }
    }
}

/// Why a row could not be read: the field at fault (a path like `messages[2].content`), or
/// none for a problem with the row as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowError {
    pub field: Option<String>,
    pub problem: String,
}

impl RowError {
    fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: Some(field.into()), problem: problem.into() }
    }
    fn row(problem: impl Into<String>) -> Self {
        Self { field: None, problem: problem.into() }
    }
}

/// "a number", "an array", ... for error messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn not_a(what: &str, v: &Value) -> String {
    format!("is not {what} (found {})", kind(v))
}

/// A required string field.
fn req_str(obj: &Map<String, Value>, key: &str, path: &str) -> Result<String, RowError> {
    match obj.get(key) {
        None => Err(RowError::field(path, "is missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(RowError::field(path, not_a("a string", v))),
    }
}

/// An optional string field (absent or null = empty).
fn opt_str(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, RowError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(RowError::field(path, not_a("a string", v))),
    }
}

/// A message content: a string, or a list of `{"type": "text", "text": ...}` parts.
fn content(obj: &Map<String, Value>, key: &str, path: &str) -> Result<String, RowError> {
    match obj.get(key) {
        None => Err(RowError::field(path, "is missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, part) in parts.iter().enumerate() {
                let ppath = format!("{path}[{j}]");
                let Value::Object(p) = part else {
                    return Err(RowError::field(ppath, not_a("an object", part)));
                };
                match p.get("type") {
                    Some(Value::String(t)) if t == "text" => {}
                    Some(Value::String(t)) => {
                        return Err(RowError::field(
                            format!("{ppath}.type"),
                            format!("is '{t}'; only text parts are supported"),
                        ))
                    }
                    Some(v) => {
                        return Err(RowError::field(format!("{ppath}.type"), not_a("a string", v)))
                    }
                    None => return Err(RowError::field(format!("{ppath}.type"), "is missing")),
                }
                out.push_str(&req_str(p, "text", &format!("{ppath}.text"))?);
            }
            Ok(out)
        }
        Some(v) => Err(RowError::field(path, not_a("a string", v))),
    }
}

/// A list of `{role, content}` messages at `key`.
fn messages(obj: &Map<String, Value>, key: &str) -> Result<Vec<ChatMessage>, RowError> {
    let mut out = Vec::new();
    for (path, m) in objects(obj, key)? {
        let m = m?;
        let role = req_str(m, "role", &format!("{path}.role"))?;
        if role.trim().is_empty() {
            return Err(RowError::field(format!("{path}.role"), "is empty"));
        }
        let content = content(m, "content", &format!("{path}.content"))?;
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// The objects of the non-empty array at `key`, each with its path (`key[i]`); an element
/// that is not an object is an error naming it.
#[allow(clippy::type_complexity)]
fn objects<'v>(
    obj: &'v Map<String, Value>,
    key: &'v str,
) -> Result<impl Iterator<Item = (String, Result<&'v Map<String, Value>, RowError>)> + 'v, RowError>
{
    Ok(non_empty_array(obj, key)?.iter().enumerate().map(move |(i, m)| {
        let path = format!("{key}[{i}]");
        let m = match m {
            Value::Object(m) => Ok(m),
            other => Err(RowError::field(path.clone(), not_a("an object", other))),
        };
        (path, m)
    }))
}

/// The non-empty array at `key`; errors name the field.
fn non_empty_array<'v>(obj: &'v Map<String, Value>, key: &str) -> Result<&'v Vec<Value>, RowError> {
    match obj.get(key) {
        None => Err(RowError::field(key, "is missing")),
        Some(Value::Array(a)) if a.is_empty() => Err(RowError::field(key, "is empty")),
        Some(Value::Array(a)) => Ok(a),
        Some(v) => Err(RowError::field(key, not_a("an array", v))),
    }
}

/// ShareGPT `conversations: [{from, value}]`, roles mapped to system/user/assistant.
fn sharegpt(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, RowError> {
    let key = "conversations";
    let mut out = Vec::new();
    for (path, m) in objects(obj, key)? {
        let m = m?;
        let from = req_str(m, "from", &format!("{path}.from"))?;
        let role = match from.as_str() {
            "system" => "system",
            "human" | "user" => "user",
            "gpt" | "assistant" | "model" | "chatgpt" | "bing" | "bard" => "assistant",
            "tool" | "function_response" | "observation" => "tool",
            other => {
                return Err(RowError::field(
                    format!("{path}.from"),
                    format!("is '{other}', not one of system, human, user, gpt, assistant, tool"),
                ))
            }
        };
        let content = content(m, "value", &format!("{path}.value"))?;
        out.push(ChatMessage { role: role.to_string(), content });
    }
    Ok(out)
}

fn assistant_mask(messages: &[ChatMessage]) -> Vec<bool> {
    messages.iter().map(|m| m.role == "assistant").collect()
}

fn require_assistant(field: &str, train: &[bool]) -> Result<(), RowError> {
    if train.iter().any(|&t| t) {
        Ok(())
    } else {
        Err(RowError::field(field, "has no assistant message (nothing to train)"))
    }
}

/// Reads one JSON row into a [`Record`].
pub(crate) fn parse_row(v: &Value) -> Result<Record, RowError> {
    let Value::Object(obj) = v else {
        return Err(RowError::row(format!("the row is not a JSON object (found {})", kind(v))));
    };
    if obj.contains_key("messages") {
        let messages = messages(obj, "messages")?;
        let train = assistant_mask(&messages);
        require_assistant("messages", &train)?;
        return Ok(Record::Chat { messages, train });
    }
    if obj.contains_key("conversations") {
        let messages = sharegpt(obj)?;
        let train = assistant_mask(&messages);
        require_assistant("conversations", &train)?;
        return Ok(Record::Chat { messages, train });
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        // Conversational prompt/completion: lists of messages; only the completion is trained.
        if matches!(obj.get("prompt"), Some(Value::Array(_)))
            || matches!(obj.get("completion"), Some(Value::Array(_)))
        {
            let prompt = messages(obj, "prompt")?;
            let completion = messages(obj, "completion")?;
            let mut train = vec![false; prompt.len()];
            train.extend(assistant_mask(&completion));
            require_assistant("completion", &train)?;
            let mut all = prompt;
            all.extend(completion);
            return Ok(Record::Chat { messages: all, train });
        }
        let prompt = req_str(obj, "prompt", "prompt")?;
        let completion = req_str(obj, "completion", "completion")?;
        return Ok(Record::PromptCompletion { prompt, completion });
    }
    if obj.contains_key("instruction") || obj.contains_key("output") {
        let instruction = req_str(obj, "instruction", "instruction")?;
        let input = opt_str(obj, "input", "input")?.unwrap_or_default();
        let output = req_str(obj, "output", "output")?;
        let system = opt_str(obj, "system", "system")?.filter(|s| !s.is_empty());
        return Ok(Record::Alpaca { system, instruction, input, output });
    }
    if obj.contains_key("text") {
        return Ok(Record::Text(req_str(obj, "text", "text")?));
    }
    let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    keys.truncate(8);
    Err(RowError::row(format!(
        "unknown row format: expected the key 'messages', 'conversations', 'prompt'+'completion', \
         'instruction'+'output' or 'text' (found {})",
        if keys.is_empty() { "no keys".to_string() } else { format!("keys {}", keys.join(", ")) }
    )))
}

/// Byte offsets of the elements of a top-level JSON array in `text` (which must parse as
/// one), to report the line where each row starts.
pub(crate) fn array_element_offsets(text: &str) -> Vec<usize> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut expect_elem = false;
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            continue;
        }
        if depth == 1 && expect_elem && c != b']' {
            out.push(i);
            expect_elem = false;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth == 1 {
                    expect_elem = true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_elem = true,
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> RowError {
        parse_row(&v).unwrap_err()
    }

    #[test]
    fn detects_formats_by_keys() {
        let r = parse_row(&json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})).unwrap();
        assert_eq!(r.format(), Format::Chat);
        let r = parse_row(&json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})).unwrap();
        match r {
            Record::Chat { messages, train } => {
                assert_eq!(messages[0].role, "user");
                assert_eq!(messages[1].role, "assistant");
                assert_eq!(train, vec![false, true]);
            }
            _ => panic!("not chat"),
        }
        let r = parse_row(&json!({"prompt": "a", "completion": "b"})).unwrap();
        assert_eq!(r, Record::PromptCompletion { prompt: "a".into(), completion: "b".into() });
        let r = parse_row(&json!({"instruction": "i", "output": "o"})).unwrap();
        assert_eq!(
            r,
            Record::Alpaca {
                system: None,
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        let r =
            parse_row(&json!({"instruction": "i", "input": null, "output": "o", "system": "s"}))
                .unwrap();
        assert_eq!(
            r,
            Record::Alpaca {
                system: Some("s".into()),
                instruction: "i".into(),
                input: String::new(),
                output: "o".into()
            }
        );
        assert_eq!(parse_row(&json!({"text": "t", "meta": 1})).unwrap(), Record::Text("t".into()));
    }

    #[test]
    fn conversational_prompt_completion_trains_only_completion() {
        let r = parse_row(&json!({
            "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "earlier"}, {"role": "user", "content": "q2"}],
            "completion": [{"role": "assistant", "content": "a"}]
        }))
        .unwrap();
        match r {
            Record::Chat { messages, train } => {
                assert_eq!(messages.len(), 4);
                assert_eq!(train, vec![false, false, false, true]);
            }
            _ => panic!("not chat"),
        }
    }

    #[test]
    fn content_parts_are_concatenated() {
        let r = parse_row(&json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}]})).unwrap();
        match r {
            Record::Chat { messages, .. } => assert_eq!(messages[0].content, "ab"),
            _ => panic!("not chat"),
        }
        let e = err(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}));
        assert_eq!(e.field.as_deref(), Some("messages[0].content[0].type"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user"}]}),
        );
        assert_eq!(e.field.as_deref(), Some("messages[2].content"));
        assert_eq!(e.problem, "is missing");
        let e = err(json!({"messages": [{"role": "user", "content": 3}]}));
        assert_eq!(e.field.as_deref(), Some("messages[0].content"));
        assert_eq!(e.problem, "is not a string (found a number)");
        let e = err(json!({"messages": [{"content": "x"}]}));
        assert_eq!(e.field.as_deref(), Some("messages[0].role"));
        let e = err(json!({"messages": "hi"}));
        assert_eq!(e.field.as_deref(), Some("messages"));
        assert!(e.problem.contains("not an array"));
        let e = err(json!({"messages": []}));
        assert_eq!(e.problem, "is empty");
        let e = err(json!({"messages": [{"role": "user", "content": "a"}]}));
        assert!(e.problem.contains("no assistant"));
        let e = err(json!({"prompt": "a"}));
        assert_eq!(e.field.as_deref(), Some("completion"));
        let e = err(json!({"instruction": "a", "output": ["x"]}));
        assert_eq!(e.field.as_deref(), Some("output"));
        let e = err(json!({"conversations": [{"from": "robot", "value": "x"}]}));
        assert_eq!(e.field.as_deref(), Some("conversations[0].from"));
        let e = err(json!({"foo": 1}));
        assert!(e.field.is_none());
        assert!(
            e.problem.contains("unknown row format") && e.problem.contains("foo"),
            "{}",
            e.problem
        );
        let e = err(json!([1, 2]));
        assert!(e.problem.contains("not a JSON object"));
    }

    #[test]
    fn array_offsets_find_each_element() {
        let t = "[\n {\"text\": \"a,]\\\"\"},\n {\"x\": [1, 2]} ,\n\"s\"\n]";
        let offs = array_element_offsets(t);
        assert_eq!(offs.len(), 3);
        assert!(t[offs[0]..].starts_with("{\"text\""));
        assert!(t[offs[1]..].starts_with("{\"x\""));
        assert!(t[offs[2]..].starts_with("\"s\""));
        assert!(array_element_offsets("[]").is_empty());
    }
}
