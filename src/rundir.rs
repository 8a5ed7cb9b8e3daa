//! The run folder `grit train --out DIR` writes and `grit report` and `grit eval --retention`
//! read: its file names and the typed summary, in one place.

use std::collections::BTreeMap;
use std::path::Path;

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
    #[error("{}: cannot encode the run summary: {source}", .path.display())]
    Encode { path: std::path::PathBuf, source: serde_json::Error },
    #[error(transparent)]
    Write(#[from] crate::fetch::FetchError),
}

/// What a finished run reports (also written as `summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub method: Method,
    pub base_model: String,
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
