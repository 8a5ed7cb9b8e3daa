//! The tokenizer interface the data pipeline needs: token ids with special tokens parsed,
//! BOS/EOS/end-of-turn ids, token bytes, and the model's chat template.
//!
//! The real implementation is the base model's own vocabulary through llama-cpp-2
//! (`llama_tokenizer.rs`); the unit tests use a small byte-level fake.

use super::DataError;

/// One chat message, as given to a chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// "system", "user", "assistant", ... (passed to the template as is).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// What the data pipeline needs from a model's tokenizer.
pub trait Tokenizer {
    /// Token ids of `text`. Special-token text (e.g. `<|im_end|>`) is parsed into the special
    /// token. When `add_bos` is true, [`Tokenizer::bos`] (if any) is prepended; no EOS is ever
    /// added here.
    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<i32>;

    /// The BOS token when the model wants one at the start of a sequence, else `None`.
    fn bos(&self) -> Option<i32>;

    /// The end-of-sequence token (appended after trained text that has no end-of-turn token).
    fn eos(&self) -> i32;

    /// Whether `token` ends a generation (EOS, or an end-of-turn token such as `<|im_end|>` or
    /// `<|eot_id|>`). Used to find the end-of-turn marker of each assistant turn.
    fn is_eog(&self, token: i32) -> bool {
        token == self.eos()
    }

    /// The bytes `token` stands for, special tokens rendered as their text. Used to map token
    /// boundaries to text offsets when prefix tokenization is not stable, and to decode.
    fn token_bytes(&self, token: i32) -> Vec<u8>;

    /// Whether the model has a chat template.
    fn has_chat_template(&self) -> bool;

    /// Renders `messages` with the model's chat template; with `add_generation_prompt` the
    /// text ends with the header that opens an assistant turn.
    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, DataError>;

    /// The text of `tokens` (special tokens rendered), invalid UTF-8 replaced.
    fn decode(&self, tokens: &[i32]) -> String {
        let mut bytes = Vec::new();
        for &t in tokens {
            bytes.extend_from_slice(&self.token_bytes(t));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
