//! `grit eval`: what an adapter learned and what it forgot.
//!
//! Every row of the table is the base model (first) or the base with one adapter, evaluated
//! on llama.cpp (llama-cpp-2) over the same token sequences:
//! - **Loss / perplexity** on `--data`. Plain text follows llama.cpp's perplexity convention
//!   ([`score::text_windows`]): the text is tokenized whole (BOS first when the model adds
//!   one), cut into non-overlapping windows of `--ctx` tokens whose first token is replaced
//!   by BOS, and only the second half of each window is scored. JSONL (and JSON arrays) are
//!   read by `grit train`'s data pipeline with its masking rules (chat rows: assistant turns
//!   and their end-of-turn token; prompt/completion: the completion; ...), so the loss is
//!   the one training optimizes; examples are cut at `--ctx` tokens.
//! - **Functional drift**: mean per-token KL(base ‖ adapted) over the same scored tokens,
//!   and the perplexity change against the base; `--general G` adds the same on a
//!   general-text set (`general_*` fields).
//! - **Weight drift**: per module and total ‖s·B·A‖_F of the adapter, and its trainable
//!   parameters Σ r·(d_in + d_out) ([`drift`]).
//! - **Accuracy** on `--task T` ([`accuracy`]).
//! - **Retention** (`--retention RUN`): every kept checkpoint of a run (and its final
//!   adapter) as rows, with the fine-tuning tokens D seen at each, and the forgetting law of
//!   docs/GRIT.md §8 fitted to their loss on `--data` ([`fit`]).

pub mod accuracy;
pub mod drift;
pub mod fit;
pub mod score;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_cpp_2::model::LlamaLoraAdapter;
use serde::Serialize;

use crate::data::{DataConfig, DataError, Tokenizer};
use crate::gguf::GgufError;
use crate::infer::{InferError, LoadOptions, Model};
use crate::rundir::{GritEvent, MetricsRow};
use accuracy::{Accuracy, TaskItem, TaskModel};
use drift::AdapterDrift;
use fit::LawFit;
use score::{Acc, ScoredSeq, Scorer};

/// Why an evaluation could not run. Messages name the file, row or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    AdapterFile(#[from] crate::adapter::AdapterError),
    #[error("{}: {msg}", .0.display(), msg = .1)]
    Adapter(PathBuf, String),
    #[error("{0}")]
    Llama(String),
    #[error("{0}")]
    Task(String),
    #[error("{}: {msg}", .path.display())]
    Text { path: PathBuf, msg: String },
    #[error("retention: {0}")]
    Retention(String),
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error(transparent)]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),
    #[error("invalid option {name}: {msg}")]
    Option { name: &'static str, msg: String },
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub gpu_layers: u32,
    /// Where llama.cpp runs the model.
    pub device: crate::ggml::Device,
    /// Adapters, one row each (after the base).
    pub adapters: Vec<PathBuf>,
    pub adapter_scale: f32,
    /// An adapter whose recorded base model differs from `model`: warned about or refused.
    pub base_mismatch: crate::adapter::BaseMismatch,
    /// Loss/perplexity set.
    pub data: Option<PathBuf>,
    /// General-text set for functional drift (`general_*` fields).
    pub general: Option<PathBuf>,
    /// Task file for accuracy.
    pub task: Option<PathBuf>,
    /// Context / window length in tokens.
    pub ctx: usize,
    /// At most this many windows or examples per set (0 = all).
    pub max_examples: usize,
    /// At most this many examples of the general set (0 = as `max_examples`).
    pub general_max_examples: usize,
    /// At most this many task rows (0 = all).
    pub max_task_rows: usize,
    pub max_new_tokens: usize,
    pub stop: Vec<String>,
    pub train_on_prompt: bool,
    pub skip_bad_rows: bool,
    pub threads: i32,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            model: PathBuf::new(),
            gpu_layers: 999,
            device: crate::ggml::Device::Auto,
            adapters: Vec::new(),
            adapter_scale: 1.0,
            base_mismatch: crate::adapter::BaseMismatch::Warn,
            data: None,
            general: None,
            task: None,
            ctx: 512,
            max_examples: 0,
            general_max_examples: 0,
            max_task_rows: 0,
            max_new_tokens: 32,
            stop: Vec::new(),
            train_on_prompt: false,
            skip_bad_rows: false,
            threads: 0,
            progress: false,
        }
    }
}

/// Scores of one row on one set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SetScores {
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    /// Mean per-token KL(base ‖ this row) (0 for the base).
    pub kl: f64,
    /// Perplexity minus the base's perplexity.
    pub perplexity_change: f64,
}

/// One row of the table (serialized as is by `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub name: String,
    /// The adapter file (null for the base).
    pub adapter: Option<String>,
    /// Scored tokens of `--data` (0 without it).
    pub tokens: usize,
    pub loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub kl: Option<f64>,
    pub perplexity_change: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub general_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub general_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub general_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub general_kl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub general_perplexity_change: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<Accuracy>,
    /// Adapters: √Σ‖s·B·A‖²_F, per module, and Σ r·(d_in + d_out).
    pub drift_total: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift_per_module: Option<BTreeMap<String, f64>>,
    pub trainable_params: Option<usize>,
    /// Training throughput of the run the adapter came from (its summary.json), if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_tokens_per_s: Option<f64>,
    /// Retention rows: the checkpoint's step and fine-tuning tokens seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_tokens: Option<u64>,
}

/// The result of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub rows: Vec<EvalRow>,
    /// `--retention`: the fitted forgetting laws.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

/// The forgetting-law fits of a retention evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Retention {
    pub run: String,
    pub power_law: LawFit,
    /// With the curvature factor (1 + γ_r·r_eff), where the run recorded effective ranks.
    pub curvature: Option<LawFit>,
    /// Why the curvature form was not fitted, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curvature_note: Option<String>,
}

/// The row name of an adapter: its run folder for `RUN/adapter.gguf`, else the file stem.
pub fn adapter_name(p: &Path) -> String {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string());
    if stem == "adapter" {
        if let Some(parent) = p.parent().and_then(|d| d.file_name()) {
            return parent.to_string_lossy().into_owned();
        }
    }
    stem
}

/// Whether a file is read as plain text (llama.cpp windows) rather than JSON rows: the same
/// rule as the training data pipeline (extension, else the first character).
fn is_plain_text(path: &Path, head: &str) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "text" | "md" => true,
        "jsonl" | "ndjson" | "json" => false,
        _ => !matches!(head.trim_start().chars().next(), Some('{') | Some('[')),
    }
}

/// Tokenizes a set into scored sequences (see the module docs).
pub fn prepare_set(
    model: &Model,
    path: &Path,
    opts: &EvalOptions,
    max_examples: usize,
) -> Result<Vec<ScoredSeq>, EvalError> {
    let bytes = std::fs::read(path)
        .map_err(|e| EvalError::Text { path: path.into(), msg: e.to_string() })?;
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
    let mut seqs = if is_plain_text(path, &head) {
        let text = String::from_utf8(bytes).map_err(|e| EvalError::Text {
            path: path.into(),
            msg: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
        })?;
        // llama.cpp's perplexity tool: tokenize with the model's special tokens added (BOS),
        // without parsing special-token text.
        let tokens: Vec<i32> = model
            .inner
            .vocab()
            .tokenize(text.as_bytes(), true, false)
            .into_iter()
            .map(|t| t.0)
            .collect();
        let w = score::text_windows(&tokens, opts.ctx, Tokenizer::bos(model));
        if w.is_empty() {
            return Err(EvalError::Text {
                path: path.into(),
                msg: format!(
                    "{} tokens is less than one window of --ctx {} tokens; lower --ctx",
                    tokens.len(),
                    opts.ctx
                ),
            });
        }
        w
    } else {
        let cfg = DataConfig {
            max_seq_len: opts.ctx,
            train_on_prompt: opts.train_on_prompt,
            skip_bad_rows: opts.skip_bad_rows,
            seed: 0,
            pack: false,
        };
        let ds = crate::data::load_file(path, model, &cfg)?;
        ds.examples
            .into_iter()
            .map(|e| ScoredSeq { targets: score::example_targets(&e.trained), tokens: e.tokens })
            .collect()
    };
    if max_examples > 0 {
        seqs.truncate(max_examples);
    }
    Ok(seqs)
}

fn set_scores(accs: &[Acc]) -> Vec<SetScores> {
    let base_ppl = accs[0].perplexity();
    accs.iter()
        .map(|a| SetScores {
            tokens: a.n,
            loss: a.loss(),
            perplexity: a.perplexity(),
            kl: a.mean_kl(),
            perplexity_change: a.perplexity() - base_ppl,
        })
        .collect()
}

/// Greedy generation and log-likelihoods through a [`Scorer`] with one adapter applied.
struct LlamaTask<'a, 'm> {
    scorer: &'a mut Scorer<'m>,
    model: &'m Model,
}

impl TaskModel for LlamaTask<'_, '_> {
    fn greedy(
        &mut self,
        prompt: &str,
        max_new: usize,
        stop: &[String],
    ) -> Result<String, EvalError> {
        let toks = Tokenizer::tokenize(self.model, prompt, true);
        self.scorer.greedy(&toks, max_new, stop)
    }
    fn loglik(&mut self, prompt: &str, continuation: &str) -> Result<f64, EvalError> {
        let ctx = Tokenizer::tokenize(self.model, prompt, true);
        let cont = Tokenizer::tokenize(self.model, continuation, false);
        self.scorer.loglik(&ctx, &cont)
    }
}

/// A row source: an adapter file, with what is known about the run it came from.
#[derive(Debug, Clone)]
struct Source {
    name: String,
    path: PathBuf,
    step: Option<usize>,
    train_tokens: Option<u64>,
    train_tokens_per_s: Option<f64>,
}

fn progress_line(enabled: bool, what: &str) -> impl FnMut(usize, usize) + '_ {
    let mut last = std::time::Instant::now();
    move |done, total| {
        if enabled && (done == total || last.elapsed().as_secs_f64() > 5.0) {
            last = std::time::Instant::now();
            eprintln!("grit eval: {what}: {done}/{total}");
        }
    }
}

/// Evaluates the base and each source adapter (see the module docs).
fn evaluate_sources(opts: &EvalOptions, sources: &[Source]) -> Result<Vec<EvalRow>, EvalError> {
    check_options(opts)?;
    let mut model = Model::load(
        &opts.model,
        &LoadOptions { n_gpu_layers: opts.gpu_layers, device: opts.device },
    )?;
    let (mut adapters, drifts) = load_sources(&mut model, sources, opts)?;
    let model = &model;
    let mut scorer = Scorer::new(model, opts.ctx, opts.threads)?;
    let n_rows = sources.len() + 1;

    // Every row's loss on a set of text: --data, then --general (its own example cap).
    let mut score_set = |p: &Path, max_examples: usize| -> Result<Vec<SetScores>, EvalError> {
        let seqs = prepare_set(model, p, opts, max_examples)?;
        let what = format!("{} ({} sequences × {n_rows} rows)", p.display(), seqs.len());
        let accs = score::score_all(
            &mut scorer,
            &mut adapters,
            opts.adapter_scale,
            &seqs,
            progress_line(opts.progress, &what),
        )?;
        Ok(set_scores(&accs))
    };
    let data = opts.data.as_deref().map(|p| score_set(p, opts.max_examples)).transpose()?;
    let general_max =
        if opts.general_max_examples > 0 { opts.general_max_examples } else { opts.max_examples };
    let general = opts.general.as_deref().map(|p| score_set(p, general_max)).transpose()?;
    let accuracies = opts
        .task
        .as_deref()
        .map(|p| task_accuracies(p, model, &mut scorer, &mut adapters, opts))
        .transpose()?;
    let scores = RowScores { data, general, accuracies, drifts };
    Ok((0..n_rows).map(|r| eval_row(r, sources, &scores)).collect())
}

/// The options that no source or file can make right.
fn check_options(opts: &EvalOptions) -> Result<(), EvalError> {
    if opts.ctx < 8 {
        return Err(EvalError::Option {
            name: "--ctx",
            msg: format!("{} must be at least 8", opts.ctx),
        });
    }
    if opts.data.is_none() && opts.task.is_none() && opts.general.is_none() {
        return Err(EvalError::Option {
            name: "--data",
            msg: "nothing to evaluate: pass --data FILE (and/or --general, --task)".into(),
        });
    }
    Ok(())
}

/// Each source adapter, validated against the base model before llama.cpp sees it (its
/// provenance checked), loaded into llama.cpp, and its weight drift from that reading.
fn load_sources(
    model: &mut Model,
    sources: &[Source],
    opts: &EvalOptions,
) -> Result<(Vec<LlamaLoraAdapter>, Vec<AdapterDrift>), EvalError> {
    let mut adapters = Vec::with_capacity(sources.len());
    let mut drifts = Vec::with_capacity(sources.len());
    for s in sources {
        let (lora, adapter) = model.load_checked_adapter(&s.path)?;
        if let Some(warning) = crate::adapter::check_provenance(
            &adapter.provenance,
            &s.path,
            &opts.model,
            opts.base_mismatch,
        )? {
            eprintln!("grit: warning: {warning}");
        }
        drifts.push(drift::adapter_drift(&adapter, opts.adapter_scale));
        adapters.push(lora);
    }
    Ok((adapters, drifts))
}

/// `--task`'s accuracy for every row (the base, then each adapter).
fn task_accuracies<'m>(
    task: &Path,
    model: &'m Model,
    scorer: &mut Scorer<'m>,
    adapters: &mut [LlamaLoraAdapter],
    opts: &EvalOptions,
) -> Result<Vec<Accuracy>, EvalError> {
    let items: Vec<TaskItem> = accuracy::load_items(task, model, opts.max_task_rows)?;
    let n_rows = adapters.len() + 1;
    let mut v = Vec::with_capacity(n_rows);
    for r in 0..n_rows {
        scorer.use_adapter(adapters, r.checked_sub(1), opts.adapter_scale)?;
        let what = format!("{} row {}/{n_rows}", task.display(), r + 1);
        let mut tm = LlamaTask { scorer, model };
        v.push(accuracy::score(
            &mut tm,
            &items,
            opts.max_new_tokens,
            &opts.stop,
            progress_line(opts.progress, &what),
        )?);
    }
    Ok(v)
}

/// What was measured for every row (index 0 is the base; drifts are the adapters' only).
struct RowScores {
    data: Option<Vec<SetScores>>,
    general: Option<Vec<SetScores>>,
    accuracies: Option<Vec<Accuracy>>,
    drifts: Vec<AdapterDrift>,
}

/// Row `r` of the table: the base (r = 0) or source r − 1.
fn eval_row(r: usize, sources: &[Source], scores: &RowScores) -> EvalRow {
    let src = r.checked_sub(1).map(|k| &sources[k]);
    let d = scores.data.as_ref().map(|v| v[r]);
    let g = scores.general.as_ref().map(|v| v[r]);
    let dr = r.checked_sub(1).map(|k| &scores.drifts[k]);
    EvalRow {
        name: src.map(|s| s.name.clone()).unwrap_or_else(|| "base".into()),
        adapter: src.map(|s| s.path.display().to_string()),
        tokens: d.map(|s| s.tokens).unwrap_or(0),
        loss: d.map(|s| s.loss),
        perplexity: d.map(|s| s.perplexity),
        kl: d.map(|s| s.kl),
        perplexity_change: d.map(|s| s.perplexity_change),
        general_tokens: g.map(|s| s.tokens),
        general_loss: g.map(|s| s.loss),
        general_perplexity: g.map(|s| s.perplexity),
        general_kl: g.map(|s| s.kl),
        general_perplexity_change: g.map(|s| s.perplexity_change),
        accuracy: scores.accuracies.as_ref().map(|v| v[r].clone()),
        drift_total: Some(dr.map(|d| d.total()).unwrap_or(0.0)),
        drift_per_module: dr.map(|d| d.per_module()),
        trainable_params: Some(dr.map(|d| d.params()).unwrap_or(0)),
        train_tokens_per_s: src.and_then(|s| s.train_tokens_per_s),
        step: src.and_then(|s| s.step),
        // The base row trained on 0 tokens when any adapter says how many it trained on.
        train_tokens: src.and_then(|s| s.train_tokens).or(
            if src.is_none() && sources.iter().any(|s| s.train_tokens.is_some()) {
                Some(0)
            } else {
                None
            },
        ),
    }
}

/// `tokens_per_s` of the run that wrote `adapter` (its sibling summary.json), if any.
fn run_tokens_per_s(adapter: &Path) -> Option<f64> {
    Some(crate::rundir::Summary::read(adapter.parent()?).ok()??.tokens_per_s)
}

/// `grit eval` without `--retention`: the base and each `--adapter`.
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport, EvalError> {
    let sources: Vec<Source> = opts
        .adapters
        .iter()
        .map(|p| Source {
            name: adapter_name(p),
            path: p.clone(),
            step: None,
            train_tokens: None,
            train_tokens_per_s: run_tokens_per_s(p),
        })
        .collect();
    Ok(EvalReport { rows: evaluate_sources(opts, &sources)?, retention: None })
}

/// Fine-tuning tokens seen through `step`: Σ `tokens` of the step rows up to it.
pub fn tokens_through(metrics: &[MetricsRow], step: usize) -> u64 {
    metrics
        .iter()
        .filter_map(|r| match r {
            MetricsRow::Step(s) if s.step <= step => Some(s.tokens as u64),
            _ => None,
        })
        .sum()
}

/// Mean effective rank over modules at `step` (the last reprojection at or before it), or
/// `initial` before any.
pub fn eff_rank_at(metrics: &[MetricsRow], step: usize, initial: f64) -> f64 {
    metrics
        .iter()
        .filter_map(|r| match r {
            MetricsRow::Event(GritEvent::Reproject(e))
                if e.step <= step && !e.eff_rank.is_empty() =>
            {
                Some(e.eff_rank.values().sum::<f64>() / e.eff_rank.len() as f64)
            }
            _ => None,
        })
        .next_back()
        .unwrap_or(initial)
}

/// `grit eval --retention RUN --data general`: every kept checkpoint of the run and its final
/// adapter, and the forgetting law fitted to their loss on `--data`.
/// What `--retention` scores: every kept checkpoint (written as an adapter GGUF into `tmp`)
/// and the final adapter when its step has no checkpoint, each with the tokens trained so far.
fn retention_sources(
    run: &Path,
    steps: &[usize],
    final_step: Option<usize>,
    metrics: &[MetricsRow],
    arch: &str,
    scale: f32,
    tmp: &Path,
) -> Result<Vec<Source>, EvalError> {
    let ck_dir = run.join(crate::rundir::CHECKPOINTS);
    let final_adapter = run.join(crate::rundir::ADAPTER);
    let run_name = run
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string());
    let mut sources = Vec::new();
    for &s in steps {
        let dir = crate::train::checkpoint::step_dir(&ck_dir, s);
        let ck = crate::train::checkpoint::Checkpoint::load(&dir)?;
        let path = tmp.join(format!("step-{s}.gguf"));
        drift::checkpoint_to_gguf(&ck, arch, scale, &path)?;
        sources.push(Source {
            name: format!("{run_name}@{s}"),
            path,
            step: Some(s),
            train_tokens: Some(tokens_through(metrics, s)),
            train_tokens_per_s: None,
        });
    }
    if final_adapter.is_file() {
        let s = final_step.unwrap_or(0);
        if !steps.contains(&s) {
            sources.push(Source {
                name: format!("{run_name}@{s}"),
                path: final_adapter,
                step: Some(s),
                train_tokens: Some(tokens_through(metrics, s)),
                train_tokens_per_s: None,
            });
        }
    }
    Ok(sources)
}

/// The forgetting law fitted to the rows' losses over trained tokens (row 0 is the base), and
/// with the effective rank when the run recorded reprojections.
fn fit_retention(
    rows: &[EvalRow],
    metrics: &[MetricsRow],
    rank: usize,
) -> Result<(LawFit, Option<LawFit>, Option<String>), EvalError> {
    let l0 = rows[0].loss.unwrap_or(f64::NAN);
    let points: Vec<(f64, f64)> = rows[1..]
        .iter()
        .map(|r| (r.train_tokens.unwrap_or(0) as f64, r.loss.unwrap_or(f64::NAN)))
        .collect();
    let power_law = fit::fit_law(l0, &points, None)?;
    let has_ranks = metrics.iter().any(|r| matches!(r, MetricsRow::Event(GritEvent::Reproject(_))));
    let (curvature, curvature_note) = if !has_ranks {
        (None, Some("the run recorded no effective ranks (no reprojection events): the curvature factor is not fitted".to_string()))
    } else {
        let r_eff: Vec<f64> = rows[1..]
            .iter()
            .map(|r| eff_rank_at(metrics, r.step.unwrap_or(0), rank as f64))
            .collect();
        match fit::fit_law(l0, &points, Some(&r_eff)) {
        Ok(f) => (
            Some(f),
            Some("Ξ = 1 + γ_r·r_eff (mean effective rank per module at each checkpoint); ρ_align and π_proj are not recorded, α = 1 (N fixed)".into()),
        ),
        Err(e) => (None, Some(e.to_string())),
    }
    };
    Ok((power_law, curvature, curvature_note))
}

pub fn retention(opts: &EvalOptions, run: &Path) -> Result<EvalReport, EvalError> {
    if opts.data.is_none() {
        return Err(EvalError::Option {
            name: "--data",
            msg: "--retention needs --data general.txt (the set whose loss is tracked)".into(),
        });
    }
    let cfg_path = run.join(crate::rundir::CONFIG);
    let cfg = crate::train::config::TrainConfig::from_toml_file(&cfg_path).map_err(|e| {
        EvalError::Retention(format!("{}: not a grit run folder: {e}", run.display()))
    })?;
    let metrics = crate::rundir::read_metrics(run)?;
    let ck_dir = run.join(crate::rundir::CHECKPOINTS);
    let steps = crate::train::checkpoint::list_steps(&ck_dir);
    let final_adapter = run.join(crate::rundir::ADAPTER);
    let final_step = metrics
        .iter()
        .filter_map(|r| match r {
            MetricsRow::Step(s) => Some(s.step),
            _ => None,
        })
        .max();
    let n_points = steps.len() + usize::from(final_adapter.is_file());
    if n_points < fit::MIN_POINTS {
        return Err(EvalError::Retention(format!(
            "{} has {} kept checkpoint(s){}; the forgetting-law fit needs at least {} (train with --save-every N and --keep-checkpoints K so that at least {} are kept)",
            run.display(),
            steps.len(),
            if final_adapter.is_file() { " and a final adapter" } else { "" },
            fit::MIN_POINTS,
            fit::MIN_POINTS - usize::from(final_adapter.is_file()),
        )));
    }
    let arch = crate::gguf::GgufFile::open(&opts.model)?.architecture()?;
    let scale = cfg.scale_for_rank(cfg.rank);
    let tmp = crate::tempdir::TempDir::new_in(&std::env::temp_dir(), "grit-retention")
        .map_err(|e| EvalError::Retention(format!("{}: {e}", std::env::temp_dir().display())))?;
    let sources = retention_sources(run, &steps, final_step, &metrics, &arch, scale, tmp.path())?;
    let mut rows = evaluate_sources(opts, &sources)?;
    // The adapter paths of checkpoints point into the temporary folder: name the checkpoint.
    for (row, s) in rows.iter_mut().skip(1).zip(&sources) {
        if s.path.starts_with(tmp.path()) {
            row.adapter = s
                .step
                .map(|k| crate::train::checkpoint::step_dir(&ck_dir, k).display().to_string());
        }
    }
    let (power_law, curvature, curvature_note) = fit_retention(&rows, &metrics, cfg.rank)?;
    Ok(EvalReport {
        rows,
        retention: Some(Retention {
            run: run.display().to_string(),
            power_law,
            curvature,
            curvature_note,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_names() {
        assert_eq!(adapter_name(Path::new("runs/demo-grit/adapter.gguf")), "demo-grit");
        assert_eq!(adapter_name(Path::new("x/my-lora.gguf")), "my-lora");
    }

    #[test]
    fn plain_text_detection() {
        assert!(is_plain_text(Path::new("a.txt"), "{"));
        assert!(!is_plain_text(Path::new("a.jsonl"), "hello"));
        assert!(!is_plain_text(Path::new("a"), "  {\"text\": 1}"));
        assert!(is_plain_text(Path::new("a"), "To be"));
    }

    #[test]
    fn tokens_and_ranks_from_metrics() {
        let step = |s: usize, tokens: usize| {
            MetricsRow::Step(crate::rundir::StepRow {
                elapsed_s: 1.0,
                grad_norm: 1.0,
                loss: 3.0,
                lr: 1e-4,
                step: s,
                tokens,
                tokens_per_s: 10.0,
            })
        };
        let reproject = MetricsRow::Event(GritEvent::Reproject(crate::rundir::ReprojectRow {
            eff_rank: [("blk.0.attn_q.weight".into(), 4.0), ("blk.0.attn_k.weight".into(), 6.0)]
                .into(),
            energy: Default::default(),
            interval: 30.0,
            modules_cut: 2,
            next: 32,
            ranks: Default::default(),
            step: 2,
            trainable_params: 10,
        }));
        let eval =
            MetricsRow::Eval(crate::rundir::EvalRow { eval_loss: 3.1, eval_tokens: 50, step: 1 });
        let m = vec![step(1, 100), eval, step(2, 120), reproject, step(3, 80)];
        assert_eq!(tokens_through(&m, 2), 220);
        assert_eq!(tokens_through(&m, 3), 300);
        assert_eq!(eff_rank_at(&m, 1, 16.0), 16.0);
        assert_eq!(eff_rank_at(&m, 3, 16.0), 5.0);
    }
}
