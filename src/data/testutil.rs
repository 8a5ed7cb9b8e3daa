//! A byte-level fake tokenizer for the unit tests: one token per byte (id = 10 + byte), four
//! special tokens, optional merging of `" "` + ASCII letter into one token (to provoke merges
//! across boundaries), and a ChatML-like or EOS-less chat template.

use super::{ChatMessage, DataError, Tokenizer};

pub const BOS: i32 = 1;
pub const EOS: i32 = 2;
pub const IM_START: i32 = 3;
pub const IM_END: i32 = 4;
const SPECIALS: [(&str, i32); 4] =
    [("<s>", BOS), ("</s>", EOS), ("<|im_start|>", IM_START), ("<|im_end|>", IM_END)];
const BYTE0: i32 = 10;
const MERGED0: i32 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, generation prompt `<|im_start|>assistant\n`.
    ChatMl,
    /// `{Role}: {content}\n\n`, generation prompt `Assistant: ` (no end-of-turn token).
    NoEog,
    /// No chat template.
    None,
}

#[derive(Debug, Clone)]
pub struct FakeTok {
    pub use_bos: bool,
    pub template: FakeTemplate,
    pub merge_space_letter: bool,
}

impl FakeTok {
    pub fn chatml() -> Self {
        Self { use_bos: true, template: FakeTemplate::ChatMl, merge_space_letter: false }
    }
}

impl Tokenizer for FakeTok {
    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<i32> {
        let mut out = Vec::new();
        if add_bos && self.use_bos {
            out.push(BOS);
        }
        let b = text.as_bytes();
        let mut i = 0;
        'outer: while i < b.len() {
            for (s, id) in SPECIALS {
                if b[i..].starts_with(s.as_bytes()) {
                    out.push(id);
                    i += s.len();
                    continue 'outer;
                }
            }
            if self.merge_space_letter
                && b[i] == b' '
                && i + 1 < b.len()
                && b[i + 1].is_ascii_alphabetic()
            {
                out.push(MERGED0 + b[i + 1] as i32);
                i += 2;
                continue;
            }
            out.push(BYTE0 + b[i] as i32);
            i += 1;
        }
        out
    }

    fn bos(&self) -> Option<i32> {
        self.use_bos.then_some(BOS)
    }

    fn eos(&self) -> i32 {
        EOS
    }

    fn is_eog(&self, token: i32) -> bool {
        token == EOS || (token == IM_END && self.template == FakeTemplate::ChatMl)
    }

    fn token_bytes(&self, token: i32) -> Vec<u8> {
        if let Some((s, _)) = SPECIALS.iter().find(|(_, id)| *id == token) {
            return s.as_bytes().to_vec();
        }
        if (BYTE0..BYTE0 + 256).contains(&token) {
            return vec![(token - BYTE0) as u8];
        }
        if (MERGED0..MERGED0 + 256).contains(&token) {
            return vec![b' ', (token - MERGED0) as u8];
        }
        Vec::new()
    }

    fn has_chat_template(&self) -> bool {
        self.template != FakeTemplate::None
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let mut s = String::new();
        match self.template {
            FakeTemplate::ChatMl => {
                for m in messages {
                    s.push_str(&format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content));
                }
                if add_generation_prompt {
                    s.push_str("<|im_start|>assistant\n");
                }
            }
            FakeTemplate::NoEog => {
                for m in messages {
                    let role = match m.role.as_str() {
                        "user" => "User",
                        "assistant" => "Assistant",
                        "system" => "System",
                        _ => return Err(DataError::Template(format!("unknown role '{}'", m.role))),
                    };
                    s.push_str(&format!("{role}: {}\n\n", m.content));
                }
                if add_generation_prompt {
                    s.push_str("Assistant: ");
                }
            }
            FakeTemplate::None => return Err(DataError::NoChatTemplate { model: "fake".into() }),
        }
        Ok(s)
    }
}
