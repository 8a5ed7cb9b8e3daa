//! From a parsed record to token ids and a per-token "trained" flag.
//!
//! Every format is rendered to one text plus the byte ranges of that text that are trained
//! (assistant turns, completions, outputs). The text is tokenized once; each range boundary
//! is mapped to a token index by tokenizing the text up to the boundary and checking that
//! those tokens are a prefix of the whole text's tokens (then the boundary falls between two
//! tokens and the prefix length is its index). When a merge crosses the boundary (BPE joining
//! `" "` + `"Paris"`, say), the boundary is mapped by the byte offsets of the tokens instead,
//! and a token that straddles the boundary counts as trained.
//!
//! Chat rows: for each trained assistant message `i`, the template is rendered for
//! `messages[..i]` with the generation prompt (where the assistant content starts) and for
//! `messages[..=i]` without it (where the turn ends, end-of-turn marker included). The
//! trained tokens run from the content start through the first end-of-generation token after
//! the content (e.g. `<|im_end|>`), so the model learns to stop; template text after that
//! marker (ChatML's `"\n"`) stays masked. When the template emits no end-of-generation token
//! after an assistant turn, EOS is inserted there and trained.

use super::format::Record;
use super::{ChatMessage, DataError, Tokenizer};

/// How an alpaca row is rendered when the tokenizer has no chat template (the Stanford
/// Alpaca prompt), with `{instruction}` and `{input}` filled in. The output follows directly.
pub const ALPACA_PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// The alpaca prompt for rows without (or with an empty) `input`.
pub const ALPACA_PROMPT_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// Tokens and per-token trained flags of one example (`trained[0]` is always false: the
/// first token is never predicted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    pub tokens: Vec<i32>,
    pub trained: Vec<bool>,
}

/// Tokenizes `text` with BOS; a BOS the text itself already starts with (templates that
/// write `<s>` or `<|begin_of_text|>`) is not doubled.
pub(crate) fn encode(tok: &dyn Tokenizer, text: &str) -> Vec<i32> {
    let mut t = tok.tokenize(text, true);
    if let Some(b) = tok.bos() {
        if t.len() >= 2 && t[0] == b && t[1] == b {
            t.remove(0);
        }
    }
    t
}

/// Maps byte offsets of `text` to token indices of `tokens` (= `encode(text)`).
///
/// When the tokens' pieces spell the text exactly (`faithful`: byte-level BPE, and
/// SentencePiece up to its leading space), a byte offset falls between tokens exactly where
/// the pieces' lengths add up to it, so every boundary is read off the offsets: one
/// tokenization per text. Otherwise each boundary tokenizes the text up to it (module docs),
/// which costs a tokenization per boundary: quadratic in a long chat's turns (a 12 000-token
/// chitchat conversation with hundreds of turns took seconds).
struct Mapper<'a> {
    tok: &'a dyn Tokenizer,
    text: &'a str,
    tokens: &'a [i32],
    /// Byte range of each token in `text`, whether the pieces spell `text` exactly, and how
    /// many tokens lead the text's own (BOS), computed on first need.
    offsets: Option<(Vec<(usize, usize)>, bool, usize)>,
}

impl<'a> Mapper<'a> {
    fn new(tok: &'a dyn Tokenizer, text: &'a str, tokens: &'a [i32]) -> Self {
        Self { tok, text, tokens, offsets: None }
    }

    fn offsets(&mut self) -> (&[(usize, usize)], bool, usize) {
        if self.offsets.is_none() {
            let raw = self.tok.tokenize(self.text, false);
            let lead = self.tokens.len().saturating_sub(raw.len());
            let mut ends = Vec::with_capacity(raw.len());
            let mut spelled = Vec::with_capacity(self.text.len() + 1);
            let mut pos = 0usize;
            for &t in &raw {
                let start = pos;
                let piece = self.tok.token_bytes(t);
                pos += piece.len();
                spelled.extend_from_slice(&piece);
                ends.push((start, pos));
            }
            // Pieces may carry bytes the text lacks (SentencePiece's leading space): shift.
            let shift = pos.saturating_sub(self.text.len());
            let faithful = self.tokens.get(lead..) == Some(&raw[..])
                && spelled.get(shift..) == Some(self.text.as_bytes())
                && spelled[..shift].iter().all(|&b| b == b' ');
            let mut offs = vec![(0usize, 0usize); lead];
            offs.extend(
                ends.into_iter().map(|(s, e)| (s.saturating_sub(shift), e.saturating_sub(shift))),
            );
            offs.resize(self.tokens.len(), (self.text.len(), self.text.len()));
            self.offsets = Some((offs, faithful, lead));
        }
        self.offsets.as_ref().map_or((&[], false, 0), |(o, f, l)| (o.as_slice(), *f, *l))
    }

    /// The token index where a trained range starting at byte `c` starts.
    fn start(&mut self, c: usize) -> usize {
        self.boundary(c, true)
    }

    /// The token index where a trained range ending at byte `c` ends (exclusive).
    fn end(&mut self, c: usize) -> usize {
        self.boundary(c, false)
    }

    fn boundary(&mut self, c: usize, is_start: bool) -> usize {
        if c >= self.text.len() {
            return self.tokens.len();
        }
        let faithful = self.offsets().1;
        if !faithful && self.text.is_char_boundary(c) {
            let p = encode(self.tok, &self.text[..c]);
            if self.tokens.starts_with(&p) {
                return p.len();
            }
        }
        let (offs, _, lead) = self.offsets();
        let n = offs.len();
        if is_start {
            // First token that reaches past c (a straddling token is trained).
            offs.iter().position(|&(_, e)| e > c).unwrap_or(n)
        } else {
            // First of the text's own tokens that starts at or after c (a straddling token is
            // trained).
            offs.iter().skip(lead).position(|&(s, _)| s >= c).map_or(n, |k| k + lead)
        }
    }
}

/// A trained range in bytes of the rendered text: `start..end`, and where the trained
/// content itself ends (the end-of-turn marker is searched from there).
struct Span {
    start: usize,
    content_end: usize,
    end: usize,
}

/// Tokenizes `text` and marks `spans` trained, each through its end-of-generation token
/// (EOS inserted when there is none). With `train_all`, every token is trained.
fn encode_spans(tok: &dyn Tokenizer, text: &str, spans: &[Span], train_all: bool) -> Encoded {
    let tokens = encode(tok, text);
    let n = tokens.len();
    let mut m = Mapper::new(tok, text, &tokens);
    // (first trained token, end exclusive, insert EOS at end)
    let mut ranges: Vec<(usize, usize, bool)> = Vec::with_capacity(spans.len());
    for s in spans {
        let ts = m.start(s.start);
        let te = m.end(s.end).max(ts);
        let ce = m.end(s.content_end).clamp(ts, te);
        let range = match (ce..te).find(|&k| tok.is_eog(tokens[k])) {
            Some(k) => (ts, k + 1, false),
            None if te < n && tok.is_eog(tokens[te]) => (ts, te + 1, false),
            None => (ts, te, true),
        };
        ranges.push(range);
    }
    let mut out = Encoded {
        tokens: Vec::with_capacity(n + ranges.len()),
        trained: Vec::with_capacity(n + ranges.len()),
    };
    let mut flags = vec![train_all; n];
    let mut inserts: Vec<usize> = Vec::new();
    for &(a, b, ins) in &ranges {
        for f in &mut flags[a.min(n)..b.min(n)] {
            *f = true;
        }
        if ins {
            inserts.push(b.min(n));
        }
    }
    inserts.sort_unstable();
    let mut next = inserts.iter().peekable();
    for (k, (&t, &f)) in tokens.iter().zip(&flags).enumerate() {
        while next.peek().is_some_and(|&&at| at == k) {
            out.tokens.push(tok.eos());
            out.trained.push(true);
            next.next();
        }
        out.tokens.push(t);
        out.trained.push(f);
    }
    for _ in next {
        out.tokens.push(tok.eos());
        out.trained.push(true);
    }
    if let Some(f) = out.trained.first_mut() {
        *f = false;
    }
    out
}

/// Renders a chat with the template and marks the trained assistant turns.
fn encode_chat(
    tok: &dyn Tokenizer,
    messages: &[ChatMessage],
    train: &[bool],
    train_all: bool,
) -> Result<Encoded, DataError> {
    let full = tok.apply_chat_template(messages, false)?;
    let mut spans = Vec::new();
    let mut prev_end = 0usize;
    for (i, m) in messages.iter().enumerate() {
        if !train.get(i).copied().unwrap_or(false) {
            continue;
        }
        let before = tok.apply_chat_template(&messages[..i], true)?;
        let content = m.content.trim();
        let start = if before.len() >= prev_end && full.starts_with(&before) {
            before.len()
        } else {
            // The template renders this prefix differently inside the whole chat: find the
            // content itself after the previous turn.
            match full.get(prev_end..).and_then(|rest| rest.find(content)) {
                Some(p) => prev_end + p,
                None => {
                    return Err(DataError::Template(format!(
                        "the chat template does not render messages[{i}].content verbatim; cannot locate the assistant turn"
                    )))
                }
            }
        };
        let content_end = match full.get(start..).and_then(|rest| rest.find(content)) {
            Some(p) => start + p + content.len(),
            None => start,
        };
        let through = tok.apply_chat_template(&messages[..=i], false)?;
        let end = if through.len() >= content_end && full.starts_with(&through) {
            through.len()
        } else {
            content_end
        };
        spans.push(Span { start, content_end, end });
        prev_end = end;
    }
    Ok(encode_spans(tok, &full, &spans, train_all))
}

/// Tokenizes one record. `train_all` (`train_on_prompt`) trains every token.
pub(crate) fn encode_record(
    tok: &dyn Tokenizer,
    rec: &Record,
    train_all: bool,
) -> Result<Encoded, DataError> {
    match rec {
        Record::Chat { messages, train } => encode_chat(tok, messages, train, train_all),
        Record::PromptCompletion { prompt, completion } => {
            let text = format!("{prompt}{completion}");
            let span = Span { start: prompt.len(), content_end: text.len(), end: text.len() };
            Ok(encode_spans(tok, &text, &[span], train_all))
        }
        Record::Alpaca { system, instruction, input, output } => {
            if tok.has_chat_template() {
                let user = if input.trim().is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                let mut messages = Vec::with_capacity(3);
                if let Some(s) = system {
                    messages.push(ChatMessage::new("system", s.clone()));
                }
                messages.push(ChatMessage::new("user", user));
                messages.push(ChatMessage::new("assistant", output.clone()));
                let mut train = vec![false; messages.len()];
                if let Some(last) = train.last_mut() {
                    *last = true;
                }
                encode_chat(tok, &messages, &train, train_all)
            } else {
                let prompt = alpaca_prompt(system.as_deref(), instruction, input);
                let text = format!("{prompt}{output}");
                let span = Span { start: prompt.len(), content_end: text.len(), end: text.len() };
                Ok(encode_spans(tok, &text, &[span], train_all))
            }
        }
        Record::Text(text) => {
            let span = Span { start: 0, content_end: text.len(), end: text.len() };
            Ok(encode_spans(tok, text, &[span], true))
        }
    }
}

/// The Stanford Alpaca prompt (with `system`, if given, replacing its first sentence(s)).
pub fn alpaca_prompt(system: Option<&str>, instruction: &str, input: &str) -> String {
    let tmpl =
        if input.trim().is_empty() { ALPACA_PROMPT_NO_INPUT } else { ALPACA_PROMPT_WITH_INPUT };
    let mut p = tmpl.replace("{instruction}", instruction).replace("{input}", input);
    if let Some(s) = system {
        if let Some(cut) = p.find("\n\n### Instruction:") {
            p = format!("{s}{}", &p[cut..]);
        }
    }
    p
}

/// Tokenizes a whole plain-text document (BOS + text + EOS, all trained) and cuts it into
/// windows of at most `max_len` tokens, so that every token after the first is predicted in
/// exactly one window. Each window after the first starts with the last token of the one
/// before (context, not trained again) — and, when the model uses a BOS token, with BOS
/// before it: a model that always saw BOS at position 0 (Gemma, LLaMA) is trained and
/// evaluated the way it runs, as llama.cpp's perplexity windows start with BOS.
pub(crate) fn encode_plain_text(tok: &dyn Tokenizer, text: &str, max_len: usize) -> Vec<Encoded> {
    let mut tokens = encode(tok, text);
    if tokens.last() != Some(&tok.eos()) {
        tokens.push(tok.eos());
    }
    let n = tokens.len();
    let max_len = max_len.max(2);
    if n < 2 {
        return Vec::new();
    }
    // Later windows: [BOS,] the previous window's last token, then new tokens.
    let bos = tok.bos().filter(|_| max_len >= 3);
    let prefix = 1 + bos.is_some() as usize;
    let window = |w: Vec<i32>, untrained: usize| {
        let mut trained = vec![true; w.len()];
        trained[..untrained].fill(false);
        Encoded { tokens: w, trained }
    };
    let mut end = max_len.min(n);
    let mut out = vec![window(tokens[..end].to_vec(), 1)];
    while end < n {
        let start = end - 1;
        end = (start + max_len + 1 - prefix).min(n);
        let w: Vec<i32> = bos.into_iter().chain(tokens[start..end].iter().copied()).collect();
        out.push(window(w, prefix));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testutil::{FakeTemplate, FakeTok, BOS, EOS, IM_END};

    fn trained_text(tok: &dyn Tokenizer, e: &Encoded) -> String {
        let t: Vec<i32> =
            e.tokens.iter().zip(&e.trained).filter(|(_, &f)| f).map(|(&t, _)| t).collect();
        tok.decode(&t)
    }

    fn chat(msgs: &[(&str, &str)]) -> Record {
        let messages: Vec<ChatMessage> =
            msgs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect();
        let train = messages.iter().map(|m| m.role == "assistant").collect();
        Record::Chat { messages, train }
    }

    /// Where the pieces spell the text, every boundary is read off the token offsets: the
    /// same token index as tokenizing the text up to the boundary, at every byte, with and
    /// without merges across boundaries.
    #[test]
    fn offsets_give_the_prefix_tokenization_boundaries() {
        let text =
            "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nA b, c!<|im_end|>\n";
        for merge_space_letter in [false, true] {
            let tok = FakeTok { merge_space_letter, ..FakeTok::chatml() };
            let tokens = encode(&tok, text);
            let mut m = Mapper::new(&tok, text, &tokens);
            assert!(m.offsets().1, "the fake tokenizer's pieces spell the text");
            for c in 0..=text.len() {
                let p = encode(&tok, &text[..c]);
                for is_start in [true, false] {
                    let got = m.boundary(c, is_start);
                    if tokens.starts_with(&p) {
                        assert_eq!(got, p.len(), "merge {merge_space_letter}, byte {c}");
                    } else {
                        // A token straddles c: trained when a range starts at c (it is the
                        // range's first), and when one ends there (its last).
                        let offs = m.offsets().0.to_vec();
                        let k = if is_start { got } else { got - 1 };
                        assert!(
                            offs[k].0 < c && c < offs[k].1,
                            "byte {c}: token {k} {:?}",
                            offs[k]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn chatml_trains_assistant_turns_and_end_of_turn() {
        let tok = FakeTok::chatml();
        let rec = chat(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
            ("assistant", "Ciao"),
        ]);
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), "Hello!<|im_end|>Ciao<|im_end|>");
        assert_eq!(e.tokens[0], tok.bos().unwrap());
        // The whole conversation is the template's rendering, nothing inserted.
        let full = tok
            .apply_chat_template(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                    ChatMessage::new("assistant", "Hello!"),
                    ChatMessage::new("user", "Bye"),
                    ChatMessage::new("assistant", "Ciao"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(tok.decode(&e.tokens[1..]), full);
        // The "\n" after each <|im_end|> is masked.
        let ends: Vec<usize> = (0..e.tokens.len()).filter(|&k| e.tokens[k] == IM_END).collect();
        assert_eq!(ends.len(), 5);
        for &k in &ends {
            // Only the assistant turns' (2nd and 4th message) markers are trained.
            assert_eq!(e.trained[k], k == ends[2] || k == ends[4]);
            assert!(!e.trained[k + 1]);
        }
    }

    #[test]
    fn template_without_end_of_turn_gets_eos_inserted() {
        let tok = FakeTok { template: FakeTemplate::NoEog, ..FakeTok::chatml() };
        let rec = chat(&[("user", "Hi"), ("assistant", "Yo"), ("user", "Q"), ("assistant", "A")]);
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), "Yo\n\n</s>A\n\n</s>");
        assert_eq!(e.tokens.iter().filter(|&&t| t == EOS).count(), 2);
        let text = tok.decode(&e.tokens[1..]);
        assert_eq!(text, "User: Hi\n\nAssistant: Yo\n\n</s>User: Q\n\nAssistant: A\n\n</s>");
    }

    #[test]
    fn train_on_prompt_trains_everything_but_the_first_token() {
        let tok = FakeTok::chatml();
        let rec = chat(&[("user", "Hi"), ("assistant", "Yo")]);
        let e = encode_record(&tok, &rec, true).unwrap();
        assert!(!e.trained[0]);
        assert!(e.trained[1..].iter().all(|&f| f));
    }

    #[test]
    fn prompt_completion_plain_concatenation_with_eos() {
        let tok = FakeTok::chatml();
        let rec = Record::PromptCompletion {
            prompt: "Q: capital of France?\nA:".into(),
            completion: " Paris".into(),
        };
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), " Paris</s>");
        assert_eq!(*e.tokens.last().unwrap(), EOS);
    }

    #[test]
    fn boundary_inside_a_merged_token_falls_back_to_offsets() {
        // " P" merges into one token across the prompt/completion boundary.
        let tok = FakeTok { merge_space_letter: true, ..FakeTok::chatml() };
        let rec = Record::PromptCompletion { prompt: "A: ".into(), completion: "Paris".into() };
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), " Paris</s>");
        assert_eq!(tok.decode(&e.tokens), "<s>A: Paris</s>");
    }

    #[test]
    fn alpaca_uses_the_chat_template_when_there_is_one() {
        let tok = FakeTok::chatml();
        let rec = Record::Alpaca {
            system: None,
            instruction: "Add.".into(),
            input: "2+2".into(),
            output: "4".into(),
        };
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), "4<|im_end|>");
        assert!(tok.decode(&e.tokens).contains("<|im_start|>user\nAdd.\n\n2+2<|im_end|>"));
    }

    #[test]
    fn alpaca_without_template_uses_the_alpaca_prompt() {
        let tok = FakeTok { template: FakeTemplate::None, ..FakeTok::chatml() };
        let rec = Record::Alpaca {
            system: None,
            instruction: "Add.".into(),
            input: String::new(),
            output: "4".into(),
        };
        let e = encode_record(&tok, &rec, false).unwrap();
        assert_eq!(trained_text(&tok, &e), "4</s>");
        let text = tok.decode(&e.tokens);
        assert!(
            text.starts_with("<s>Below is an instruction that describes a task. Write"),
            "{text}"
        );
        assert!(text.ends_with("### Instruction:\nAdd.\n\n### Response:\n4</s>"), "{text}");
        let p = alpaca_prompt(Some("You add."), "Add.", "2+2");
        assert!(
            p.starts_with(
                "You add.\n\n### Instruction:\nAdd.\n\n### Input:\n2+2\n\n### Response:\n"
            ),
            "{p}"
        );
    }

    #[test]
    fn text_rows_are_all_trained_with_eos() {
        let tok = FakeTok::chatml();
        let e = encode_record(&tok, &Record::Text("abc".into()), false).unwrap();
        assert_eq!(tok.decode(&e.tokens), "<s>abc</s>");
        assert_eq!(e.trained, vec![false, true, true, true, true]);
    }

    #[test]
    fn template_bos_is_not_doubled() {
        let tok = FakeTok::chatml();
        assert_eq!(encode(&tok, "<s>x"), encode(&tok, "x"));
    }

    #[test]
    fn plain_text_windows_overlap_by_one_and_cover_every_target_once() {
        let text = "abcdefghijklmnopqrstuvwxyz";
        for use_bos in [false, true] {
            let tok = FakeTok { use_bos, ..FakeTok::chatml() };
            let all = encode(&tok, text); // 26 tokens (+ BOS) + EOS
            let n = all.len() + 1;
            let w = encode_plain_text(&tok, text, 8);
            // The first window holds 8 tokens; later ones 7 new (6 after BOS).
            let new_per_window = if use_bos { 6 } else { 7 };
            assert_eq!(w.len(), 1 + (n - 8).div_ceil(new_per_window), "bos {use_bos}");
            let mut targets = Vec::new();
            for (k, win) in w.iter().enumerate() {
                assert!(win.tokens.len() <= 8);
                assert_eq!(win.tokens.len(), win.trained.len());
                if k > 0 && use_bos {
                    // BOS, then the previous window's last token: both context only.
                    assert_eq!(win.tokens[0], BOS);
                    assert_eq!(win.tokens[1], *w[k - 1].tokens.last().unwrap());
                    assert_eq!(&win.trained[..2], &[false, false]);
                } else if k > 0 {
                    assert_eq!(win.tokens[0], *w[k - 1].tokens.last().unwrap());
                }
                assert!(!win.trained[0]);
                targets.extend(
                    win.tokens.iter().zip(&win.trained).filter(|(_, &f)| f).map(|(&t, _)| t),
                );
            }
            let mut expected = all[1..].to_vec();
            expected.push(EOS);
            assert_eq!(targets, expected, "bos {use_bos}");
        }
        // A document exactly one window long gives one window.
        let tok = FakeTok::chatml();
        let w = encode_plain_text(&tok, "abcdef", 8);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].tokens.len(), 8);
    }
}
