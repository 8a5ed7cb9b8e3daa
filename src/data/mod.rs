//! Training data for `grit train`: file formats, chat templating, loss masks, packing,
//! seeded batches and the dry-run statistics.
//!
//! ```text
//! data.jsonl / .json / .txt ─► load_file ─► rows ─► format::Record (per row, by keys)
//!      ─► render (chat template / prompt format, tokenizer) ─► Example {tokens, trained}
//!      ─► truncation to max_seq_len ─► Dataset {examples, stats}
//!      ─► split_eval (optional) ─► pack::plan (seeded shuffle + best-fit)
//!      ─► Sequence {tokens, labels, loss_mask, segment, pos} ─► Batcher (seeded per-epoch order)
//! ```
//!
//! Formats (per JSONL row, detected by keys; one file may mix them; see `format.rs`):
//! - `{"messages": [{"role", "content"}, ...]}` (and ShareGPT `conversations`) — rendered
//!   with the model's chat template; every assistant turn is trained through its
//!   end-of-turn token (EOS inserted when the template emits none), the rest is masked.
//! - `{"prompt", "completion"}` — the plain concatenation `prompt + completion`, BOS in
//!   front, EOS appended; completion and EOS trained. (Message lists in `prompt` and
//!   `completion` are rendered as a chat, only the completion trained.)
//! - `{"instruction", "input", "output"}` (alpaca; optional `system`) — with a chat template:
//!   one user turn `instruction` (+ `"\n\n" + input` when `input` is not empty) and one
//!   assistant turn `output`, exactly like a `messages` row, so the adapter learns the
//!   format `grit chat`/`grit serve` will use. Without a chat template: the Stanford Alpaca
//!   prompt ([`render::ALPACA_PROMPT_WITH_INPUT`] / [`render::ALPACA_PROMPT_NO_INPUT`])
//!   followed by `output` + EOS; output and EOS trained.
//! - `{"text"}` — BOS + text + EOS, everything trained.
//! - Plain text files (`.txt`, `.md`, or anything not JSON): one document per file, BOS +
//!   text + EOS, cut into windows of `max_seq_len` tokens overlapping by one token, so that
//!   every token is predicted exactly once; everything trained. Windows after the first
//!   start with BOS too when the model uses one (as it runs in llama.cpp).
//! - `.json` files holding one JSON array of rows are read like JSONL (errors give the line
//!   where the row starts).
//!
//! `train_on_prompt` trains every token. The first token of an example is never a target.
//! Examples longer than `max_seq_len` are truncated (their tail is cut, counted in the
//! statistics); an example left with nothing to train is dropped (counted).

mod format;
mod llama_tokenizer;
mod pack;
pub mod render;
mod stats;
#[cfg(test)]
pub(crate) mod testutil;
mod tokenizer;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use format::Format;
pub use pack::{causal_segment_mask, pack, plan, Batcher, DataPosition, Sequence, SplitMix64};
pub use stats::DataStats;
pub use tokenizer::{ChatMessage, Tokenizer};

/// Why training data could not be read. Row errors name `file:line` and the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    /// A row that is not valid JSON (`col` from serde_json).
    #[error("{loc}: invalid JSON at column {col}: {msg}")]
    Json { loc: String, col: usize, msg: String },
    /// A row without invalid UTF-8.
    #[error("{loc}: invalid UTF-8 at column {col}")]
    Utf8 { loc: String, col: usize },
    /// A field of a row is missing or of the wrong type.
    #[error("{loc}: field '{field}' {problem}")]
    Field { loc: String, field: String, problem: String },
    /// A problem with a row as a whole (not an object, unknown format, template failure).
    #[error("{loc}: {msg}")]
    Row { loc: String, msg: String },
    #[error("{model}: the model has no chat template, which chat rows need")]
    NoChatTemplate { model: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{what}: {why}")]
    Empty { what: String, why: String },
    #[error("invalid option {name}: {msg}")]
    Config { name: &'static str, msg: String },
    #[error("cannot resume the data position: {0}")]
    Position(String),
}

/// How data is read and packed. The defaults match `grit train`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// Longest sequence in tokens (`--max-seq-len`); longer examples are truncated.
    pub max_seq_len: usize,
    /// Train on every token, prompts included (`--train-on-prompt`).
    pub train_on_prompt: bool,
    /// Skip malformed rows and count them instead of failing (`--skip-bad-rows`).
    pub skip_bad_rows: bool,
    /// Seed of the packing shuffle and the epoch order (`--seed`).
    pub seed: u64,
    /// Pack several examples per sequence (else one example per sequence).
    pub pack: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self { max_seq_len: 256, train_on_prompt: false, skip_bad_rows: false, seed: 0, pack: true }
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.max_seq_len < 2 {
            return Err(DataError::Config {
                name: "--max-seq-len",
                msg: format!("{} must be at least 2", self.max_seq_len),
            });
        }
        Ok(())
    }
}

/// One tokenized example. `tokens.len() == trained.len() ≤ max_seq_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, BOS first when the model uses one.
    pub tokens: Vec<i32>,
    /// Whether predicting `tokens[j]` (from `tokens[..j]`) is trained; `trained[0]` is false.
    pub trained: Vec<bool>,
    pub format: Format,
    /// Tokens cut off by truncation (0 if none).
    pub truncated: usize,
}

impl Example {
    /// Number of trained predictions.
    pub fn n_trained(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Tokenized examples with their statistics and the configuration they were loaded with.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub stats: DataStats,
    pub config: DataConfig,
    /// The tokenizer's EOS (labels the last token of each packed example).
    pub eos: i32,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Recomputes the statistics from the examples (keeping the load-time counts of files,
    /// skipped rows and dropped examples), packing included.
    pub fn refresh_stats(&mut self) {
        let s = &mut self.stats;
        s.examples = self.examples.len();
        s.formats.clear();
        s.tokens = 0;
        s.trained_tokens = 0;
        s.truncated_examples = 0;
        s.truncated_tokens = 0;
        s.longest_example = 0;
        for e in &self.examples {
            *s.formats.entry(e.format).or_default() += 1;
            s.tokens += e.tokens.len();
            s.trained_tokens += e.n_trained();
            if e.truncated > 0 {
                s.truncated_examples += 1;
                s.truncated_tokens += e.truncated;
            }
            s.longest_example = s.longest_example.max(e.tokens.len() + e.truncated);
        }
        s.max_seq_len = self.config.max_seq_len;
        let lengths: Vec<usize> = self.examples.iter().map(|e| e.tokens.len()).collect();
        s.packed_sequences =
            plan(&lengths, self.config.max_seq_len, self.config.pack, self.config.seed).len();
    }

    /// Appends `other`'s examples and load-time counts (same configuration assumed).
    pub fn merge(&mut self, other: Dataset) {
        self.examples.extend(other.examples);
        self.stats.files.extend(other.stats.files);
        self.stats.skipped_rows += other.stats.skipped_rows;
        self.stats.dropped_examples += other.stats.dropped_examples;
        self.stats.dropped_by_truncation += other.stats.dropped_by_truncation;
        for r in other.stats.skipped_reasons {
            if self.stats.skipped_reasons.len() < stats::MAX_SKIPPED_REASONS {
                self.stats.skipped_reasons.push(r);
            }
        }
        self.refresh_stats();
    }
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Jsonl,
    JsonArray,
    PlainText,
}

fn file_kind(path: &Path, text: &str) -> FileKind {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let first = text.trim_start().chars().next();
    match ext.as_str() {
        "txt" | "text" | "md" => FileKind::PlainText,
        "jsonl" | "ndjson" => FileKind::Jsonl,
        _ => match first {
            Some('[') => FileKind::JsonArray,
            Some('{') => FileKind::Jsonl,
            _ if ext == "json" => FileKind::Jsonl,
            _ => FileKind::PlainText,
        },
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(p) => s[..p].to_string(),
        None => s,
    }
}

/// Collects examples from rows, applying truncation, dropping and bad-row skipping.
struct Loader<'a> {
    tok: &'a dyn Tokenizer,
    cfg: &'a DataConfig,
    examples: Vec<Example>,
    stats: DataStats,
    rows: usize,
}

impl<'a> Loader<'a> {
    fn new(tok: &'a dyn Tokenizer, cfg: &'a DataConfig, name: &str) -> Self {
        let stats = DataStats { files: vec![name.to_string()], ..Default::default() };
        Self { tok, cfg, examples: Vec::new(), stats, rows: 0 }
    }

    fn push(&mut self, enc: render::Encoded, format: Format) {
        let mut e = Example { tokens: enc.tokens, trained: enc.trained, format, truncated: 0 };
        if e.tokens.len() > self.cfg.max_seq_len {
            e.truncated = e.tokens.len() - self.cfg.max_seq_len;
            e.tokens.truncate(self.cfg.max_seq_len);
            e.trained.truncate(self.cfg.max_seq_len);
        }
        if e.n_trained() == 0 {
            self.stats.dropped_examples += 1;
            if e.truncated > 0 {
                self.stats.dropped_by_truncation += 1;
            }
            return;
        }
        self.examples.push(e);
    }

    /// Reads one JSON value (row `loc`) into an example; `Err((error, fatal))`.
    fn row(&mut self, loc: &str, v: &Value) -> Result<(), (DataError, bool)> {
        let rec = format::parse_row(v).map_err(|e| {
            let err = match e.field {
                Some(field) => DataError::Field { loc: loc.to_string(), field, problem: e.problem },
                None => DataError::Row { loc: loc.to_string(), msg: e.problem },
            };
            (err, false)
        })?;
        let enc =
            render::encode_record(self.tok, &rec, self.cfg.train_on_prompt).map_err(
                |e| match e {
                    DataError::NoChatTemplate { model } => (
                        DataError::Row {
                            loc: loc.to_string(),
                            msg: format!(
                                "this {} row needs a chat template, and the model {model} has none",
                                rec.format().name()
                            ),
                        },
                        true,
                    ),
                    DataError::Template(msg) => (
                        DataError::Row {
                            loc: loc.to_string(),
                            msg: format!("chat template: {msg}"),
                        },
                        false,
                    ),
                    other => (other, true),
                },
            )?;
        self.push(enc, rec.format());
        Ok(())
    }

    /// Handles a row failure: skip and count, or fail.
    fn fail(&mut self, err: DataError, fatal: bool) -> Result<(), DataError> {
        if fatal || !self.cfg.skip_bad_rows {
            return Err(err);
        }
        self.stats.skipped_rows += 1;
        if self.stats.skipped_reasons.len() < stats::MAX_SKIPPED_REASONS {
            self.stats.skipped_reasons.push(err.to_string());
        }
        Ok(())
    }

    fn jsonl(&mut self, name: &str, bytes: &[u8]) -> Result<(), DataError> {
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let loc = format!("{name}:{}", i + 1);
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            self.rows += 1;
            let line = match std::str::from_utf8(raw) {
                Ok(l) => l,
                Err(e) => {
                    let col = String::from_utf8_lossy(&raw[..e.valid_up_to()]).chars().count() + 1;
                    self.fail(DataError::Utf8 { loc, col }, false)?;
                    continue;
                }
            };
            let v: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(DataError::Json { loc, col: e.column(), msg: json_msg(&e) }, false)?;
                    continue;
                }
            };
            if let Err((e, fatal)) = self.row(&loc, &v) {
                self.fail(e, fatal)?;
            }
        }
        Ok(())
    }

    fn json_array(&mut self, name: &str, text: &str) -> Result<(), DataError> {
        let v: Value = serde_json::from_str(text).map_err(|e| DataError::Json {
            loc: format!("{name}:{}", e.line()),
            col: e.column(),
            msg: json_msg(&e),
        })?;
        let Value::Array(rows) = v else {
            return Err(DataError::Row {
                loc: format!("{name}:1"),
                msg: "expected a JSON array of rows".into(),
            });
        };
        let offsets = format::array_element_offsets(text);
        let line_of = |k: usize| -> String {
            match offsets.get(k) {
                Some(&off) if offsets.len() == rows.len() => {
                    format!(
                        "{name}:{}",
                        text.as_bytes()[..off].iter().filter(|&&b| b == b'\n').count() + 1
                    )
                }
                _ => format!("{name}: row {}", k + 1),
            }
        };
        for (k, row) in rows.iter().enumerate() {
            self.rows += 1;
            let loc = line_of(k);
            if let Err((e, fatal)) = self.row(&loc, row) {
                self.fail(e, fatal)?;
            }
        }
        Ok(())
    }

    fn plain_text(&mut self, text: &str) {
        if text.trim().is_empty() {
            return;
        }
        self.rows += 1;
        for w in render::encode_plain_text(self.tok, text, self.cfg.max_seq_len) {
            self.push(w, Format::PlainText);
        }
    }
}

/// Reads one data file (format by extension and content, see the module docs).
pub fn load_file(path: &Path, tok: &dyn Tokenizer, cfg: &DataConfig) -> Result<Dataset, DataError> {
    cfg.validate()?;
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| DataError::Io { path: name.clone(), err })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut ld = Loader::new(tok, cfg, &name);
    // The kind is sniffed from the first bytes; a non-UTF-8 file is read as JSONL/text below.
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
    match file_kind(path, &head) {
        FileKind::Jsonl => ld.jsonl(&name, bytes)?,
        kind => {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                let before = &bytes[..e.valid_up_to()];
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                let col = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
                DataError::Utf8 { loc: format!("{name}:{line}"), col }
            })?;
            if kind == FileKind::JsonArray {
                ld.json_array(&name, text)?;
            } else {
                ld.plain_text(text);
            }
        }
    }
    if ld.examples.is_empty() {
        let why = if ld.rows == 0 {
            "no data (the file is empty)".to_string()
        } else if ld.stats.skipped_rows == ld.rows {
            format!(
                "all {} rows were malformed and skipped (first: {})",
                ld.rows,
                ld.stats.skipped_reasons.first().cloned().unwrap_or_default()
            )
        } else {
            format!(
                "no example has anything to train ({} dropped, {} skipped)",
                ld.stats.dropped_examples, ld.stats.skipped_rows
            )
        };
        return Err(DataError::Empty { what: name, why });
    }
    let mut ds =
        Dataset { examples: ld.examples, stats: ld.stats, config: cfg.clone(), eos: tok.eos() };
    ds.refresh_stats();
    Ok(ds)
}

/// Reads several files into one dataset (in order).
pub fn load_files(
    paths: &[PathBuf],
    tok: &dyn Tokenizer,
    cfg: &DataConfig,
) -> Result<Dataset, DataError> {
    let mut it = paths.iter();
    let Some(first) = it.next() else {
        return Err(DataError::Config { name: "--data", msg: "no data file given".into() });
    };
    let mut ds = load_file(first, tok, cfg)?;
    for p in it {
        ds.merge(load_file(p, tok, cfg)?);
    }
    Ok(ds)
}

/// Splits off a deterministic `fraction` of the examples (chosen by a `seed`ed shuffle,
/// kept in file order) as an evaluation set: `(train, eval)`. At least one example goes to
/// each side. The load-time counts (skipped rows, dropped examples) stay with `train`.
pub fn split_eval(ds: Dataset, fraction: f64, seed: u64) -> Result<(Dataset, Dataset), DataError> {
    if !(fraction.is_finite() && fraction > 0.0 && fraction < 1.0) {
        return Err(DataError::Config {
            name: "--eval-split",
            msg: format!("{fraction} must be between 0 and 1 (exclusive)"),
        });
    }
    let n = ds.examples.len();
    if n < 2 {
        return Err(DataError::Config {
            name: "--eval-split",
            msg: format!("the data has {n} example(s); a split needs at least 2"),
        });
    }
    let n_eval = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix64::stream(seed, pack::STREAM_SPLIT, 0).shuffle(&mut idx);
    let mut is_eval = vec![false; n];
    for &i in &idx[..n_eval] {
        is_eval[i] = true;
    }
    let Dataset { examples, stats, config, eos } = ds;
    let mut train_ex = Vec::with_capacity(n - n_eval);
    let mut eval_ex = Vec::with_capacity(n_eval);
    for (e, ev) in examples.into_iter().zip(is_eval) {
        if ev {
            eval_ex.push(e);
        } else {
            train_ex.push(e);
        }
    }
    let eval_stats = DataStats { files: stats.files.clone(), ..Default::default() };
    let mut train = Dataset { examples: train_ex, stats, config: config.clone(), eos };
    let mut eval = Dataset { examples: eval_ex, stats: eval_stats, config, eos };
    train.refresh_stats();
    eval.refresh_stats();
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::testutil::{FakeTemplate, FakeTok, EOS, IM_END};
    use super::*;
    use std::io::Write;

    fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
        let p = dir.path().join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(body.as_bytes()).unwrap();
        p
    }

    fn cfg() -> DataConfig {
        DataConfig::default()
    }

    fn trained_text(tok: &dyn Tokenizer, e: &Example) -> String {
        let t: Vec<i32> =
            e.tokens.iter().zip(&e.trained).filter(|(_, &f)| f).map(|(&t, _)| t).collect();
        tok.decode(&t)
    }

    const MIXED: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
{"prompt": "2+2=", "completion": "4"}

{"instruction": "Say yes.", "input": "", "output": "yes"}
{"text": "plain"}
{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
"#;

    #[test]
    fn loads_every_format_from_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "mixed.jsonl", MIXED);
        let tok = FakeTok::chatml();
        let ds = load_file(&p, &tok, &cfg()).unwrap();
        assert_eq!(ds.len(), 5);
        let got: Vec<String> = ds.examples.iter().map(|e| trained_text(&tok, e)).collect();
        assert_eq!(
            got,
            vec!["Hello<|im_end|>", "4</s>", "yes<|im_end|>", "plain</s>", "b<|im_end|>"]
        );
        let f = &ds.stats.formats;
        assert_eq!(
            (f[&Format::Chat], f[&Format::PromptCompletion], f[&Format::Alpaca], f[&Format::Text]),
            (2, 1, 1, 1)
        );
        assert_eq!(ds.stats.examples, 5);
        let tokens: usize = ds.examples.iter().map(|e| e.tokens.len()).sum();
        let trained: usize = ds.examples.iter().map(|e| e.n_trained()).sum();
        assert_eq!(ds.stats.tokens, tokens);
        assert_eq!(ds.stats.trained_tokens, trained);
        assert_eq!(ds.stats.packed_sequences, pack(&ds).len());
        assert!(ds.stats.masked_fraction() > 0.3 && ds.stats.masked_fraction() < 1.0);
    }

    #[test]
    fn train_on_prompt_lifts_masking() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "mixed.jsonl", MIXED);
        let tok = FakeTok::chatml();
        let ds = load_file(&p, &tok, &DataConfig { train_on_prompt: true, ..cfg() }).unwrap();
        for e in &ds.examples {
            assert!(!e.trained[0] && e.trained[1..].iter().all(|&t| t));
        }
        assert_eq!(ds.stats.trained_tokens, ds.stats.tokens - ds.len());
    }

    #[test]
    fn bad_rows_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let cases = [
            (
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user"}]}"#,
                "field 'messages[2].content' is missing",
            ),
            (
                r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}"#,
                "field 'messages[0].content' is not a string",
            ),
            (
                r#"{"prompt": "a", "completion": null}"#,
                "field 'completion' is not a string (found null)",
            ),
            (r#"{"instruction": "a"}"#, "field 'output' is missing"),
            (r#"{"text": "a""#, "invalid JSON at column 12"),
            (r#"{"foo": 1}"#, "unknown row format"),
            (r#"[1]"#, "not a JSON object"),
        ];
        for (row, want) in cases {
            let body = format!("{{\"text\": \"ok\"}}\n\n{row}\n{{\"text\": \"ok\"}}\n");
            let p = write(&dir, "data.jsonl", &body);
            let e = load_file(&p, &tok, &cfg()).unwrap_err().to_string();
            let loc = format!("{}:3: ", p.display());
            assert!(e.starts_with(&loc), "{e}");
            assert!(e.contains(want), "{e} lacks {want}");
        }
        // Invalid UTF-8 names the line too.
        let p = dir.path().join("bin.jsonl");
        std::fs::write(&p, b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n").unwrap();
        let e = load_file(&p, &tok, &cfg()).unwrap_err().to_string();
        assert!(e.contains("bin.jsonl:2: invalid UTF-8 at column 11"), "{e}");
    }

    #[test]
    fn skip_bad_rows_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let body =
            "{\"text\": \"a\"}\n{\"text\": 1}\nnot json\n{\"messages\": []}\n{\"text\": \"b\"}\n";
        let p = write(&dir, "d.jsonl", body);
        let ds = load_file(&p, &tok, &DataConfig { skip_bad_rows: true, ..cfg() }).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.stats.skipped_rows, 3);
        assert_eq!(ds.stats.skipped_reasons.len(), 3);
        assert!(
            ds.stats.skipped_reasons[0].contains("d.jsonl:2: field 'text'"),
            "{:?}",
            ds.stats.skipped_reasons
        );
        assert!(ds.stats.to_string().contains("skipped bad rows   3"));
        // Only bad rows: an error that says so.
        let p = write(&dir, "bad.jsonl", "nope\n{\"x\": 1}\n");
        let e = load_file(&p, &tok, &DataConfig { skip_bad_rows: true, ..cfg() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("all 2 rows were malformed"), "{e}");
    }

    #[test]
    fn chat_rows_without_a_template_fail_even_when_skipping() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok { template: FakeTemplate::None, ..FakeTok::chatml() };
        let p = write(
            &dir,
            "d.jsonl",
            "{\"text\": \"a\"}\n{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}\n",
        );
        let e = load_file(&p, &tok, &DataConfig { skip_bad_rows: true, ..cfg() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("needs a chat template"), "{e}");
    }

    #[test]
    fn truncation_is_counted_and_empty_examples_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let long = "x".repeat(30);
        let body = format!("{{\"text\": \"{long}\"}}\n{{\"prompt\": \"{long}\", \"completion\": \"y\"}}\n{{\"text\": \"short\"}}\n");
        let p = write(&dir, "d.jsonl", &body);
        let c = DataConfig { max_seq_len: 16, ..cfg() };
        let ds = load_file(&p, &tok, &c).unwrap();
        // Text: BOS + 30 + EOS = 32 → 16 kept, 16 lost. Prompt row: 33 tokens, the completion
        // is cut off entirely → dropped, counted as dropped by truncation.
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.examples[0].tokens.len(), 16);
        assert_eq!(ds.examples[0].truncated, 16);
        assert_eq!(ds.stats.truncated_examples, 1);
        assert_eq!(ds.stats.truncated_tokens, 16);
        assert_eq!(ds.stats.dropped_examples, 1);
        assert_eq!(ds.stats.dropped_by_truncation, 1);
        assert_eq!(ds.stats.longest_example, 32);
        for s in pack(&ds) {
            assert!(s.len() <= 16);
        }
        let t = ds.stats.to_string();
        assert!(t.contains("1 examples, 16 tokens lost (max_seq_len 16)"), "{t}");
        assert!(
            t.contains("1 examples with nothing to train (1 of them cut by truncation)"),
            "{t}"
        );
    }

    #[test]
    fn plain_text_files_become_windows() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let text = "To be, or not to be, that is the question.\n".repeat(3);
        let p = write(&dir, "play.txt", &text);
        let c = DataConfig { max_seq_len: 32, ..cfg() };
        let ds = load_file(&p, &tok, &c).unwrap();
        let n = 1 + text.len() + 1; // BOS + bytes + EOS
        assert_eq!(ds.len(), (n - 1).div_ceil(31));
        assert_eq!(ds.stats.trained_tokens, n - 1);
        assert_eq!(ds.stats.truncated_examples, 0);
        assert_eq!(ds.stats.formats[&Format::PlainText], ds.len());
        assert_eq!(*ds.examples.last().unwrap().tokens.last().unwrap(), EOS);
        // Empty text file: a clear error.
        let p = write(&dir, "empty.txt", "  \n");
        let e = load_file(&p, &tok, &c).unwrap_err().to_string();
        assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
    }

    #[test]
    fn json_array_files_report_row_lines() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let body = "[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\"instruction\": \"c\",\n   \"input\": 3, \"output\": \"d\"}\n]\n";
        let p = write(&dir, "alpaca.json", body);
        let e = load_file(&p, &tok, &cfg()).unwrap_err().to_string();
        assert!(e.contains("alpaca.json:3: field 'input' is not a string"), "{e}");
        let p = write(&dir, "ok.json", "[{\"instruction\": \"a\", \"output\": \"b\"}]");
        let ds = load_file(&p, &tok, &cfg()).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(trained_text(&tok, &ds.examples[0]), "b<|im_end|>");
        assert!(ds.examples[0].tokens.contains(&IM_END));
    }

    #[test]
    fn eval_split_is_deterministic_and_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let body: String = (0..50).map(|i| format!("{{\"text\": \"row {i}\"}}\n")).collect();
        let p = write(&dir, "d.jsonl", &body);
        let ds = load_file(&p, &tok, &cfg()).unwrap();
        let (tr, ev) = split_eval(ds.clone(), 0.1, 7).unwrap();
        assert_eq!((tr.len(), ev.len()), (45, 5));
        assert_eq!(tr.stats.examples + ev.stats.examples, 50);
        assert_eq!(tr.stats.tokens + ev.stats.tokens, ds.stats.tokens);
        let (tr2, ev2) = split_eval(ds.clone(), 0.1, 7).unwrap();
        assert_eq!(tr.examples, tr2.examples);
        assert_eq!(ev.examples, ev2.examples);
        let (_, ev3) = split_eval(ds.clone(), 0.1, 8).unwrap();
        assert_ne!(ev.examples, ev3.examples);
        for e in &ev.examples {
            assert!(!tr.examples.contains(e));
        }
        assert!(split_eval(ds.clone(), 1.0, 0).unwrap_err().to_string().contains("--eval-split"));
        assert!(split_eval(ds.clone(), f64::NAN, 0).is_err());
        let (_, ev) = split_eval(ds, 0.001, 0).unwrap();
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn load_files_merges_counts() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let a = write(&dir, "a.jsonl", "{\"text\": \"a\"}\n");
        let b = write(&dir, "b.txt", "hello world");
        let ds = load_files(&[a, b], &tok, &cfg()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.stats.files.len(), 2);
        assert_eq!(ds.stats.formats[&Format::PlainText], 1);
    }

    #[test]
    fn same_seed_same_batches_through_loading() {
        let dir = tempfile::tempdir().unwrap();
        let tok = FakeTok::chatml();
        let p = write(&dir, "mixed.jsonl", &MIXED.repeat(10));
        let c = DataConfig { max_seq_len: 64, seed: 3, ..cfg() };
        let mut a = Batcher::new(&load_file(&p, &tok, &c).unwrap(), 2).unwrap();
        let mut b = Batcher::new(&load_file(&p, &tok, &c).unwrap(), 2).unwrap();
        for _ in 0..40 {
            assert_eq!(a.next_batch(), b.next_batch());
        }
        assert_eq!(a.position(), b.position());
    }

    #[test]
    fn config_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "d.jsonl", "{\"text\": \"a\"}\n");
        let e =
            load_file(&p, &FakeTok::chatml(), &DataConfig { max_seq_len: 1, ..cfg() }).unwrap_err();
        assert!(e.to_string().contains("--max-seq-len"));
        let e =
            load_file(&dir.path().join("missing.jsonl"), &FakeTok::chatml(), &cfg()).unwrap_err();
        assert!(e.to_string().contains("missing.jsonl"));
    }
}
