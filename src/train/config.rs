//! The resolved training configuration: defaults, a TOML file (`--config`), then flags.
//! Saved as `OUT/config.toml` so a run can be read back and resumed exactly.

use std::path::{Path, PathBuf};

use crate::model::Target;
use serde::{Deserialize, Serialize};

/// Which training method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Plain LoRA with AdamW (the baseline).
    Lora,
    /// GRIT: K-FAC preconditioning, Fisher-guided reprojection, dynamic rank.
    Grit,
}

/// Learning-rate schedule after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Cosine,
    Linear,
    Constant,
}

/// Compute copies of the frozen weights for the backward pass (and the forward where faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum WeightCopies {
    /// Only the quantized weights stay resident; each layer's weight is dequantized transiently
    /// inside the backward pass (one layer at a time).
    None,
    /// Transposed Q8_0 copies (≈ 1.06 bytes per weight).
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Transposed F16 copies (2 bytes per weight).
    F16,
    /// Transposed F32 copies (4 bytes per weight; exact, for checks).
    F32,
    /// No rewrite: ggml's stock autodiff (out_prod through the quantized weight). Very slow;
    /// only for measuring what the rewrite gains.
    Stock,
}

/// Whether the backward recomputes each transformer block's activations from the residual
/// stream instead of keeping them from the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// On with `--weight-copies none` (the leanest configuration), off otherwise.
    Auto,
    /// Keep only the residual stream between blocks; recompute the rest (less memory, one more
    /// forward of the blocks per step).
    On,
    /// Keep every activation the backward reads (fastest).
    Off,
}

/// Everything that defines a training run. Field defaults are the documented flag defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    /// Base model (GGUF). None: the default model.
    pub model: Option<PathBuf>,
    /// Training data (JSONL or .txt).
    pub data: Option<PathBuf>,
    /// Separate evaluation data; otherwise `eval_split` of the training data (or none).
    pub eval_data: Option<PathBuf>,
    /// Fraction of the training examples held out for evaluation when no eval file is given.
    pub eval_split: f64,
    /// Target modules (llama.cpp tensor names without `blk.N.` and `.weight`).
    pub targets: Vec<String>,
    pub rank: usize,
    pub alpha: f32,
    /// Scale alpha/√r instead of alpha/r.
    pub rslora: bool,
    pub dropout: f32,
    pub lr: f32,
    pub lr_schedule: LrSchedule,
    pub warmup: usize,
    pub weight_decay: f32,
    pub max_grad_norm: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    /// Optimizer steps; None: derived from `epochs`.
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub eval_every: usize,
    pub eval_tokens: usize,
    /// 0 = all cores.
    pub threads: usize,
    /// The compute device of the training graphs.
    pub device: crate::ggml::Device,
    pub seed: u64,
    /// 0 = only the final adapter (plus Ctrl-C checkpoints).
    pub save_every: usize,
    /// None = keep all checkpoints.
    pub keep_checkpoints: Option<usize>,
    pub weight_copies: WeightCopies,
    /// Multiply the forward by Q8_0 copies of weights whose type has no fast kernel (Q5_x,
    /// K-quants): faster steps, but the adapter trains against requantized weights. (Q4_1
    /// weights always use their exact Q4_0 + offsets split when copies are made.)
    pub forward_copy: bool,
    /// Activation recomputation in the backward.
    pub recompute: Recompute,
    pub train_on_prompt: bool,
    pub skip_bad_rows: bool,
    /// GRIT's hyper-parameters (`[grit]` in a config file; used with `method = "grit"`).
    pub grit: crate::grit::GritConfig,
}

/// The default LoRA targets: every linear layer of a block (on a model with fused tensors,
/// the fused ones: Phi-3's attn_qkv, attn_output, ffn_up, ffn_down).
pub const DEFAULT_TARGETS: [&str; 7] =
    ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

impl TrainConfig {
    /// Whether the step graph recomputes activations (resolving `auto`).
    pub fn recompute(&self) -> bool {
        match self.recompute {
            Recompute::Auto => self.weight_copies == WeightCopies::None,
            Recompute::On => true,
            Recompute::Off => false,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: Method::Lora,
            model: None,
            data: None,
            eval_data: None,
            eval_split: 0.0,
            targets: DEFAULT_TARGETS.iter().map(|s| s.to_string()).collect(),
            rank: 16,
            alpha: 32.0,
            rslora: false,
            dropout: 0.0,
            lr: 2e-4,
            lr_schedule: LrSchedule::Cosine,
            warmup: 10,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            batch_size: 1,
            grad_accum: 1,
            max_seq_len: 256,
            steps: None,
            epochs: None,
            eval_every: 20,
            eval_tokens: 8192,
            threads: 0,
            device: crate::ggml::Device::Auto,
            seed: 0,
            save_every: 0,
            keep_checkpoints: None,
            weight_copies: WeightCopies::Q8_0,
            forward_copy: false,
            recompute: Recompute::Auto,
            train_on_prompt: false,
            skip_bad_rows: false,
            grit: crate::grit::GritConfig::default(),
        }
    }
}

/// A configuration value that cannot work; names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{p}: {msg}", p = .0.display(), msg = .1)]
    File(PathBuf, String),
    #[error("invalid {field}: {msg}")]
    Field { field: &'static str, msg: String },
}

fn bad(field: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Field { field, msg: msg.into() }
}

impl TrainConfig {
    /// Reads a TOML file holding any subset of the fields (unknown keys are errors).
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File(path.into(), e.to_string()))?;
        toml::from_str(&text).map_err(|e| {
            ConfigError::File(path.into(), e.to_string().replace('\n', " ").trim().to_string())
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The LoRA scale of a module of rank `r`: alpha/r, or alpha/√r with rsLoRA.
    pub fn scale_for_rank(&self, r: usize) -> f32 {
        if self.rslora {
            self.alpha / (r as f32).sqrt()
        } else {
            self.alpha / r as f32
        }
    }

    /// Checks every field's range; errors name the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rank == 0 {
            return Err(bad("--rank", "must be ≥ 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(bad("--alpha", format!("{} must be > 0", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad("--dropout", format!("{} must be in [0, 1)", self.dropout)));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("--lr", format!("{} must be > 0", self.lr)));
        }
        if !(self.weight_decay >= 0.0) {
            return Err(bad("--weight-decay", "must be ≥ 0"));
        }
        if !(self.max_grad_norm >= 0.0) {
            return Err(bad("--max-grad-norm", "must be ≥ 0 (0 = no clipping)"));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return Err(bad("--adam-beta1/--adam-beta2", "must be in [0, 1)"));
        }
        if self.batch_size == 0 {
            return Err(bad("--batch-size", "must be ≥ 1"));
        }
        if self.grad_accum == 0 {
            return Err(bad("--grad-accum", "must be ≥ 1"));
        }
        if self.max_seq_len < 2 {
            return Err(bad("--max-seq-len", "must be ≥ 2"));
        }
        if !(0.0..1.0).contains(&self.eval_split) {
            return Err(bad("--eval-split", format!("{} must be in [0, 1)", self.eval_split)));
        }
        if self.steps == Some(0) {
            return Err(bad("--steps", "must be ≥ 1"));
        }
        if let Some(e) = self.epochs {
            if !(e.is_finite() && e > 0.0) {
                return Err(bad("--epochs", format!("{e} must be > 0")));
            }
        }
        if self.keep_checkpoints == Some(0) {
            return Err(bad("--keep-checkpoints", "must be ≥ 1"));
        }
        if self.targets.is_empty() {
            return Err(bad("--targets", "needs at least one module"));
        }
        if self.method == Method::Grit {
            self.grit
                .validate()
                .map_err(|e| ConfigError::Field { field: "GRIT setting", msg: e.to_string() })?;
        }
        for t in &self.targets {
            if !Target::ALL.iter().any(|k| k.name() == t) {
                let known = Target::ALL.map(Target::name).join(", ");
                return Err(bad("--targets", format!("unknown module '{t}' (known: {known})")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_documented_flags() {
        let c = TrainConfig::default();
        assert_eq!(
            (c.rank, c.alpha, c.lr, c.warmup, c.batch_size, c.max_seq_len),
            (16, 32.0, 2e-4, 10, 1, 256)
        );
        assert_eq!((c.eval_every, c.eval_tokens, c.seed), (20, 8192, 0));
        assert_eq!(c.scale_for_rank(16), 2.0);
        c.validate().unwrap();
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c = TrainConfig { rank: 8, rslora: true, steps: Some(40), ..Default::default() };
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let partial: TrainConfig = toml::from_str("rank = 4\nweight_copies = \"f16\"").unwrap();
        assert_eq!(partial.rank, 4);
        assert_eq!(partial.weight_copies, WeightCopies::F16);
        assert_eq!(partial.alpha, 32.0);
        assert!(toml::from_str::<TrainConfig>("rnak = 4").is_err(), "typos must be caught");
    }

    #[test]
    fn validation_names_the_flag() {
        let c = TrainConfig { targets: vec!["attn_x".into()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("--targets"));
        let c = TrainConfig { lr: 0.0, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("--lr"));
    }
}
