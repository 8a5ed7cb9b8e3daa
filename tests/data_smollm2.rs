//! The data pipeline on the real default model (SmolLM2-135M-Instruct, ChatML template):
//! chat masking trains exactly the assistant contents and their `<|im_end|>` markers, the
//! other formats mask as documented, and a Shakespeare play packs into the expected windows.

use std::path::PathBuf;

use grit::data::{
    causal_segment_mask, load_file, split_eval, Batcher, ChatMessage, DataConfig, Dataset, Example,
    Format, Tokenizer,
};
use grit::infer::{LoadOptions, Model};

fn model() -> Model {
    let mut path = grit::fetch::default_model_path();
    if !path.exists() {
        path = grit::fetch::ensure_default_model().expect("fetch the default model");
    }
    Model::load(&path, &LoadOptions::default()).expect("load the default model")
}

/// The trained tokens of `e`, as runs of consecutive trained tokens, decoded.
fn trained_runs(tok: &dyn Tokenizer, e: &Example) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<i32> = Vec::new();
    for (&t, &f) in e.tokens.iter().zip(&e.trained) {
        if f {
            cur.push(t);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur));
    }
    runs
}

fn write_jsonl(dir: &tempfile::TempDir, rows: &[serde_json::Value]) -> PathBuf {
    let p = dir.path().join("data.jsonl");
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, body).expect("write data");
    p
}

#[test]
fn smollm2_chat_masking_and_shakespeare_windows() {
    let m = model();
    let tok: &dyn Tokenizer = &m;
    assert!(tok.has_chat_template(), "SmolLM2-Instruct has a chat template");
    let im_end = tok.tokenize("<|im_end|>", false);
    assert_eq!(im_end.len(), 1, "<|im_end|> is one special token");
    assert!(tok.is_eog(im_end[0]));
    eprintln!("bos {:?} eos {} im_end {}", tok.bos(), tok.eos(), im_end[0]);

    // --- chat: exactly the assistant contents plus their end-of-turn markers are trained.
    let dir = tempfile::tempdir().expect("tempdir");
    let a1 = "The capital of France is Paris.";
    let a2 =
        "Roughly 2.1 million people live in Paris proper — and about 12 million in the metro area!";
    let rows = vec![
        serde_json::json!({"messages": [
            {"role": "system", "content": "You are a concise geography tutor."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": "How many people live there?"},
            {"role": "assistant", "content": a2},
        ]}),
        serde_json::json!({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}),
        serde_json::json!({"prompt": "Q: What is 2+2?\nA:", "completion": " 4"}),
        serde_json::json!({"text": "Once upon a time."}),
    ];
    let p = write_jsonl(&dir, &rows);
    let ds = load_file(&p, tok, &DataConfig::default()).expect("load chat data");
    assert_eq!(ds.len(), 4);

    let chat = &ds.examples[0];
    assert_eq!(chat.format, Format::Chat);
    assert_eq!(trained_runs(tok, chat), vec![format!("{a1}<|im_end|>"), format!("{a2}<|im_end|>")]);
    // Nothing was inserted: the tokens are the template's rendering, tokenized.
    let msgs: Vec<ChatMessage> = rows[0]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            ChatMessage::new(m["role"].as_str().unwrap_or(""), m["content"].as_str().unwrap_or(""))
        })
        .collect();
    let rendered = tok.apply_chat_template(&msgs, false).expect("template");
    assert_eq!(chat.tokens, tok.tokenize(&rendered, true));
    eprintln!("chat: {} tokens, {} trained", chat.tokens.len(), chat.n_trained());

    let alpaca = &ds.examples[1];
    assert_eq!(trained_runs(tok, alpaca), vec!["Bonjour<|im_end|>".to_string()]);
    assert!(tok
        .decode(&alpaca.tokens)
        .contains("<|im_start|>user\nTranslate to French.\n\nGood morning<|im_end|>"));

    let pc = &ds.examples[2];
    let eos = tok.decode(&[tok.eos()]);
    assert_eq!(trained_runs(tok, pc), vec![format!(" 4{eos}")]);

    let text = &ds.examples[3];
    assert_eq!(text.n_trained(), text.tokens.len() - 1);
    assert_eq!(*text.tokens.last().expect("tokens"), tok.eos());

    // Packed: labels are next tokens, the loss mask is exactly the trained tokens.
    let batcher = Batcher::new(&ds, 1).expect("batcher");
    let trained: usize = batcher.sequences().iter().map(|s| s.n_trained()).sum();
    assert_eq!(trained, ds.stats.trained_tokens);
    for s in batcher.sequences() {
        let mask = causal_segment_mask(s);
        assert_eq!(mask.len(), s.len() * s.len());
    }

    // With train_on_prompt everything but the first token is trained.
    let all = load_file(&p, tok, &DataConfig { train_on_prompt: true, ..DataConfig::default() })
        .expect("load");
    assert_eq!(all.stats.trained_tokens, all.stats.tokens - all.len());

    // --- Shakespeare: one document per file, windows of 256 overlapping by one token.
    let hamlet = grit::fetch::shakespeare_dir().join("hamlet.txt");
    if !hamlet.exists() {
        grit::fetch::ensure_shakespeare().expect("fetch the plays");
    }
    let play = std::fs::read_to_string(&hamlet).expect("read hamlet");
    let cfg = DataConfig::default();
    let ds: Dataset = load_file(&hamlet, tok, &cfg).expect("load hamlet");
    let mut doc = tok.tokenize(&play, true);
    doc.push(tok.eos());
    let n = doc.len();
    let windows = (n - 1).div_ceil(cfg.max_seq_len - 1);
    eprintln!("hamlet: {} bytes, {n} tokens, {windows} windows\n{}", play.len(), ds.stats);
    assert!(n > 30_000, "hamlet is a long play ({n} tokens)");
    assert_eq!(ds.len(), windows);
    assert_eq!(ds.stats.formats.get(&Format::PlainText), Some(&windows));
    assert_eq!(ds.stats.tokens, n + windows - 1, "each window after the first repeats one token");
    assert_eq!(ds.stats.trained_tokens, n - 1, "every token but the first is predicted once");
    assert_eq!(ds.stats.truncated_examples, 0);
    assert_eq!(ds.stats.packed_sequences, windows);
    for (k, w) in ds.examples.iter().enumerate() {
        let start = k * (cfg.max_seq_len - 1);
        let end = (start + cfg.max_seq_len).min(n);
        assert_eq!(w.tokens, doc[start..end], "window {k}");
    }
    // The windows' tokens decode back to the play.
    let body: Vec<i32> =
        doc.iter().copied().filter(|&t| Some(t) != tok.bos() && t != tok.eos()).collect();
    assert_eq!(tok.decode(&body), play);

    let b = Batcher::new(&ds, 4).expect("batcher");
    assert_eq!(b.sequences_per_epoch(), windows);
    assert!(b.sequences().iter().all(|s| s.len() <= cfg.max_seq_len && s.n_segments() == 1));
    let full = b.sequences().iter().filter(|s| s.len() == cfg.max_seq_len).count();
    assert!(full >= windows - 1);

    // A 5% eval split of the windows.
    let (train, eval) = split_eval(ds, 0.05, 0).expect("split");
    assert_eq!(train.len() + eval.len(), windows);
    assert_eq!(eval.len(), ((windows as f64) * 0.05).round() as usize);
}
