//! [`Tokenizer`] for a model loaded by llama.cpp: the base model's own vocabulary and chat
//! template through llama-cpp-2.

use llama_cpp_2::model::LlamaChatMessage;
use llama_cpp_2::token::LlamaToken;

use super::{ChatMessage, DataError, Tokenizer};
use crate::infer::Model;

impl Tokenizer for Model {
    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<i32> {
        // add_special = false: llama.cpp would also append EOS for models with add_eos set;
        // BOS is added here, by the model's own rule.
        let mut out = Vec::new();
        if add_bos {
            if let Some(b) = Tokenizer::bos(self) {
                out.push(b);
            }
        }
        if !text.is_empty() {
            out.extend(
                self.inner.vocab().tokenize(text.as_bytes(), false, true).into_iter().map(|t| t.0),
            );
        }
        out
    }

    fn bos(&self) -> Option<i32> {
        let vocab = self.inner.vocab();
        let bos = vocab.bos().0;
        (vocab.should_add_bos() && bos >= 0).then_some(bos)
    }

    fn eos(&self) -> i32 {
        let vocab = self.inner.vocab();
        let eos = vocab.eos().0;
        if eos >= 0 {
            eos
        } else {
            vocab.eot().0
        }
    }

    fn is_eog(&self, token: i32) -> bool {
        token >= 0 && token < self.inner.n_vocab() && self.inner.vocab().is_eog(LlamaToken(token))
    }

    fn token_bytes(&self, token: i32) -> Vec<u8> {
        if token < 0 || token >= self.inner.n_vocab() {
            return Vec::new();
        }
        self.inner.vocab().token_to_piece(LlamaToken(token), true, None)
    }

    fn has_chat_template(&self) -> bool {
        self.inner.chat_template(None).is_ok()
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let tmpl = self
            .inner
            .chat_template(None)
            .map_err(|_| DataError::NoChatTemplate { model: self.path.display().to_string() })?;
        let msgs = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DataError::Template(format!("a message contains a NUL byte ({e})")))?;
        self.inner.apply_chat_template(&tmpl, &msgs, add_generation_prompt).map_err(|e| {
            DataError::Template(format!("llama.cpp could not apply the chat template: {e}"))
        })
    }
}
