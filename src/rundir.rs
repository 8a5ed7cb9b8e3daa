//! The run folder `grit train --out DIR` writes and `grit report` and `grit eval --retention`
//! read: its file names, the typed metrics rows and the typed summary, in one place.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::train::config::{Method, WeightCopies};

/// The run's configuration (TOML, `TrainConfig`).
pub const CONFIG: &str = "config.toml";
/// One JSON row per step, evaluation and event.
pub const METRICS: &str = "metrics.jsonl";
/// [`Summary`], written when the run ends.
pub const SUMMARY: &str = "summary.json";
/// The trained adapter (GGUF).
pub const ADAPTER: &str = "adapter.gguf";
/// `step-N/` folders.
pub const CHECKPOINTS: &str = "checkpoints";

/// Why a run folder's file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{}: {source}", .path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: not a grit run summary: {source}", .path.display())]
    Parse { path: std::path::PathBuf, source: serde_json::Error },
    #[error("{}: cannot encode: {source}", .path.display())]
    Encode { path: std::path::PathBuf, source: serde_json::Error },
    #[error("{}:{line}: not a metrics row: {source}", .path.display())]
    Row { path: std::path::PathBuf, line: usize, source: serde_json::Error },
    #[error(transparent)]
    Write(#[from] crate::fetch::FetchError),
}

/// One line of `metrics.jsonl`: a training step, an evaluation or a GRIT event. Fields are
/// declared in alphabetical order (the order of the rows' keys on disk; an event row starts
/// with its `event` tag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MetricsRow {
    Event(GritEvent),
    Step(StepRow),
    Eval(EvalRow),
}

/// An optimizer step: the mean loss of its micro-batches and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRow {
    /// Seconds since the run started (across resumes).
    pub elapsed_s: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub loss: f64,
    pub lr: f64,
    pub step: usize,
    /// Tokens of the step's micro-batches (padding included).
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// The in-training evaluation after `step` (0: before the first step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRow {
    pub eval_loss: f64,
    pub eval_tokens: usize,
    pub step: usize,
}

/// A GRIT event after a step (docs/GRIT.md §3, §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum GritEvent {
    Invert(InvertRow),
    Reproject(ReprojectRow),
}

/// The damped inverses were recomputed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvertRow {
    pub damping: DampingReport,
    /// The inversion interval after this event's adjustment (steps, unrounded).
    pub interval: f64,
    /// The step the next inversion is due.
    pub next: usize,
    pub step: usize,
}

/// How the factors were damped at an inversion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DampingReport {
    /// Modules whose inversion needed a larger λ than the first.
    pub escalated: usize,
    /// Modules whose inversion fell back to the identity.
    pub fallbacks: usize,
    pub lambda_abs: f64,
    /// Mean λ used for Σ_a and Σ_g over modules.
    pub mean_sigma_a: f64,
    pub mean_sigma_g: f64,
    pub mode: crate::grit::Damping,
}

/// A reprojection: every module's rank after it, keyed by module name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReprojectRow {
    /// Effective rank of Σ_a per module with statistics. (This and the next four fields
    /// default to empty or 0 in rows of runs made before grit wrote them.)
    #[serde(default)]
    pub eff_rank: BTreeMap<String, f64>,
    /// Share of the rank signal the kept directions hold, per module with statistics.
    #[serde(default)]
    pub energy: BTreeMap<String, f64>,
    /// The reprojection interval after this event's adjustment (steps, unrounded).
    #[serde(default)]
    pub interval: f64,
    #[serde(default)]
    pub modules_cut: usize,
    #[serde(default)]
    pub next: usize,
    pub ranks: BTreeMap<String, usize>,
    pub step: usize,
    pub trainable_params: usize,
}

impl MetricsRow {
    /// The step the row belongs to.
    pub fn step(&self) -> usize {
        match self {
            MetricsRow::Event(GritEvent::Invert(r)) => r.step,
            MetricsRow::Event(GritEvent::Reproject(r)) => r.step,
            MetricsRow::Step(r) => r.step,
            MetricsRow::Eval(r) => r.step,
        }
    }
}

/// Reads every row of `dir/metrics.jsonl`; a line that is not a row is an error naming it.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricsRow>, RunDirError> {
    let path = dir.join(METRICS);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| RunDirError::Io { path: path.clone(), source })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| RunDirError::Row {
                path: path.clone(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

/// Appends rows to `metrics.jsonl`, one JSON object per line, flushed as written, so a crash
/// loses at most the line being written. On resume, rows after the checkpoint's step are
/// dropped first, so a resumed run's file matches an uninterrupted one.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Creates (truncates) `dir/metrics.jsonl`.
    pub fn create(dir: &Path) -> Result<Self, RunDirError> {
        let path = dir.join(METRICS);
        let file = std::fs::File::create(&path)
            .map_err(|source| RunDirError::Io { path: path.clone(), source })?;
        Ok(Self { path, file })
    }

    /// Opens `dir/metrics.jsonl` for appending after removing every row whose step is greater
    /// than `keep_through_step` (and any torn or unreadable line). The rewrite is atomic.
    pub fn resume(dir: &Path, keep_through_step: usize) -> Result<Self, RunDirError> {
        let path = dir.join(METRICS);
        let io = |source| RunDirError::Io { path: path.clone(), source };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let mut kept = String::new();
        for line in text.lines() {
            match serde_json::from_str::<MetricsRow>(line) {
                Ok(r) if r.step() <= keep_through_step => {
                    kept.push_str(line);
                    kept.push('\n');
                }
                _ => {}
            }
        }
        crate::fetch::write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(io)?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<(), RunDirError> {
        let mut line = serde_json::to_string(row)
            .map_err(|source| RunDirError::Encode { path: self.path.clone(), source })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|source| RunDirError::Io { path: self.path.clone(), source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub method: Method,
    pub base_model: String,
    /// The adapted targets, in graph order (a fused tensor where the model fuses them).
    pub targets: Vec<String>,
    pub rank_per_module: BTreeMap<String, usize>,
    pub trainable_params: usize,
    pub steps: usize,
    pub train_loss: Option<f32>,
    pub eval_loss: Option<f32>,
    pub eval_loss_initial: Option<f32>,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: u64,
    pub wall_s: f64,
    pub weight_copies: WeightCopies,
    /// GRIT: Σ_m r_m·(d_in + d_out) at the start and at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_params_initial: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_params_final: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inversions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprojections: Option<usize>,
    /// ‖s·B·A‖_F per module (every method) and its total (√ of the sum of squares).
    #[serde(default)]
    pub drift_per_module: BTreeMap<String, f64>,
    #[serde(default)]
    pub drift_total: f64,
}

impl Summary {
    /// Reads `dir/summary.json`; `Ok(None)` when the run has not finished (no file).
    pub fn read(dir: &Path) -> Result<Option<Summary>, RunDirError> {
        let path = dir.join(SUMMARY);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| RunDirError::Parse { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RunDirError::Io { path, source }),
        }
    }

    /// Writes `dir/summary.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), RunDirError> {
        let path = dir.join(SUMMARY);
        let js = serde_json::to_vec_pretty(self)
            .map_err(|source| RunDirError::Encode { path: path.clone(), source })?;
        Ok(crate::fetch::write_atomic(&path, &js)?)
    }

    /// Trainable parameters at the end (after GRIT's cuts).
    pub fn final_params(&self) -> usize {
        self.trainable_params_final.unwrap_or(self.trainable_params)
    }

    /// Trainable parameters at the start.
    pub fn initial_params(&self) -> usize {
        self.trainable_params_initial.unwrap_or(self.trainable_params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows are written with sorted keys (the tag first) and f64 numbers, parse back into
    /// their own variant, and resume drops later and torn rows.
    #[test]
    fn metrics_rows_round_trip_and_resume_drops_later_rows() {
        let step = r#"{"elapsed_s":25.2,"grad_norm":1.25,"loss":4.5,"lr":0.0001,"step":1,"tokens":128,"tokens_per_s":8.5}"#;
        let eval = r#"{"eval_loss":4.75,"eval_tokens":256,"step":0}"#;
        let inv = r#"{"event":"invert","damping":{"escalated":0,"fallbacks":1,"lambda_abs":0.0,"mean_sigma_a":0.5,"mean_sigma_g":0.25,"mode":"relative"},"interval":15.0,"next":25,"step":10}"#;
        let rep = r#"{"event":"reproject","eff_rank":{"blk.0.attn_q.weight":3.5},"energy":{"blk.0.attn_q.weight":0.9},"interval":45.0,"modules_cut":1,"next":75,"ranks":{"blk.0.attn_q.weight":4},"step":30,"trainable_params":1000}"#;
        let rows: Vec<MetricsRow> =
            [eval, step, inv, rep].iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(matches!(rows[0], MetricsRow::Eval(_)));
        assert!(matches!(rows[1], MetricsRow::Step(_)));
        assert!(matches!(rows[2], MetricsRow::Event(GritEvent::Invert(_))));
        assert!(
            matches!(&rows[3], MetricsRow::Event(GritEvent::Reproject(r)) if r.ranks["blk.0.attn_q.weight"] == 4)
        );
        for (r, l) in rows.iter().zip([eval, step, inv, rep]) {
            assert_eq!(serde_json::to_string(r).unwrap(), l);
        }
        assert_eq!(rows.iter().map(MetricsRow::step).collect::<Vec<_>>(), [0, 1, 10, 30]);
        assert!(serde_json::from_str::<MetricsRow>(r#"{"step":1,"loss":2.0}"#).is_err());

        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path()).unwrap();
        for r in &rows {
            w.write(r).unwrap();
        }
        drop(w);
        let mut f =
            std::fs::OpenOptions::new().append(true).open(dir.path().join(METRICS)).unwrap();
        f.write_all(b"{\"step\": 31, \"lo").unwrap();
        assert!(read_metrics(dir.path()).unwrap_err().to_string().contains("metrics.jsonl:5"));
        let mut w = MetricsWriter::resume(dir.path(), 10).unwrap();
        w.write(&rows[0]).unwrap();
        let back = read_metrics(dir.path()).unwrap();
        assert_eq!(back, [&rows[..3], &rows[..1]].concat());
    }

    #[test]
    fn a_summary_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Summary::read(dir.path()).unwrap().is_none());
        let s = Summary {
            method: Method::Grit,
            base_model: "m.gguf".into(),
            targets: vec!["attn_q".into()],
            rank_per_module: [("blk.0.attn_q.weight".to_string(), 4)].into(),
            trainable_params: 100,
            steps: 3,
            train_loss: Some(2.5),
            eval_loss: None,
            eval_loss_initial: None,
            tokens_per_s: 10.0,
            peak_rss_bytes: 1,
            wall_s: 1.0,
            weight_copies: WeightCopies::Q8_0,
            trainable_params_initial: Some(400),
            trainable_params_final: Some(100),
            inversions: Some(1),
            reprojections: Some(1),
            drift_per_module: [("blk.0.attn_q.weight".to_string(), 0.5)].into(),
            drift_total: 0.5,
        };
        s.write(dir.path()).unwrap();
        assert_eq!(Summary::read(dir.path()).unwrap(), Some(s.clone()));
        assert_eq!((s.initial_params(), s.final_params()), (400, 100));
        std::fs::write(dir.path().join(SUMMARY), "{").unwrap();
        assert!(Summary::read(dir.path()).unwrap_err().to_string().contains("summary.json"));
    }
}
