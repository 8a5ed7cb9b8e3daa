//! The OpenAI response bodies grit serve writes, as types (what the official client reads).
//! Requests are read field by field in `http.rs`, so that each error names the OpenAI
//! parameter (`param`) with a message of its own.

use serde::Serialize;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// `{"error": {...}}`, OpenAI's error body.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

/// A chat or text completion, whole or as one streamed chunk.
#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<Choice<'a>>,
    /// Absent in the usage chunk that ends a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Absent from chunks unless the client asked for usage (`stream_options.include_usage`);
    /// then null in every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl Completion<'_> {
    /// grit's `system_fingerprint`.
    pub fn fingerprint() -> Option<String> {
        Some(format!("grit-{}", crate::VERSION))
    }
}

/// One choice (grit answers with one, index 0). `logprobs` is always null.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Choice<'a> {
    /// A whole chat answer.
    Message { index: u32, message: Message<'a>, logprobs: Option<()>, finish_reason: &'a str },
    /// A chat chunk.
    Delta { index: u32, delta: Delta<'a>, logprobs: Option<()>, finish_reason: Option<&'a str> },
    /// Text (whole or a chunk) of a completion.
    Text { index: u32, text: &'a str, logprobs: Option<()>, finish_reason: Option<&'a str> },
}

#[derive(Debug, Serialize)]
pub struct Message<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// What a chat chunk adds: the role (first chunk), text, or nothing (the last).
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// `{"object": "list", "data": [...]}` (models, adapters), with the embeddings' extra fields.
#[derive(Debug, Serialize)]
pub struct List<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<EmbeddingUsage>,
}

impl<T> List<T> {
    pub fn of(data: Vec<T>) -> Self {
        List { object: "list", data, model: None, usage: None }
    }
}

/// A model (the base, or an adapter served as a model of its own).
#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The base model's name for an adapter; null for the base.
    pub parent: Option<String>,
    pub root: String,
    /// The adapter file (adapters only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// Whether the adapter is served merged into its own model copy (adapters only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged: Option<bool>,
}

/// The answer to deleting (unloading) an adapter.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// One embedding, as floats or as base64 of little-endian f32s (`encoding_format`).
#[derive(Debug, Serialize)]
pub struct Embedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingData,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingData {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes the OpenAI client reads: nulls where it expects them, fields absent where
    /// they must be.
    #[test]
    fn bodies_serialize_as_openai_writes_them() {
        let c = Completion {
            id: "chatcmpl-1",
            object: "chat.completion",
            created: 7,
            model: "m",
            choices: vec![Choice::Message {
                index: 0,
                message: Message { role: "assistant", content: "hi" },
                logprobs: None,
                finish_reason: "stop",
            }],
            system_fingerprint: Completion::fingerprint(),
            usage: Some(Some(Usage::new(3, 2))),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "hi");
        assert!(v["choices"][0]["logprobs"].is_null() && v["choices"][0].get("logprobs").is_some());
        assert_eq!(v["usage"]["total_tokens"], 5);
        let chunk = Completion {
            id: "c",
            object: "chat.completion.chunk",
            created: 7,
            model: "m",
            choices: vec![Choice::Delta {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: None,
            }],
            system_fingerprint: Completion::fingerprint(),
            usage: Some(None),
        };
        let v = serde_json::to_value(&chunk).unwrap();
        assert_eq!(v["choices"][0]["delta"], serde_json::json!({}));
        assert!(v["usage"].is_null() && v.get("usage").is_some());
        assert!(v["choices"][0]["finish_reason"].is_null());
        let last = Completion { choices: vec![], system_fingerprint: None, usage: None, ..chunk };
        let v = serde_json::to_value(&last).unwrap();
        assert!(v.get("usage").is_none() && v.get("system_fingerprint").is_none());
        let e = ErrorBody {
            error: ErrorDetail {
                message: "bad",
                kind: "invalid_request_error",
                param: None,
                code: None,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null() && v["error"].get("code").is_some());
    }
}
