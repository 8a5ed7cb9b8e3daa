//! `grit train` flags. Every flag is optional here so that the precedence
//! defaults < `--config FILE` < flags can be applied; the documented defaults live in
//! [`TrainConfig::default`](crate::train::config::TrainConfig).

use std::path::PathBuf;

use clap::Args;

use crate::grit::{
    Damping, FactorNorm, KfacStats, Pairing, RankBudget, RankCut, RankScope, RankSignal,
};
use crate::train::config::{LrSchedule, Method, Recompute, TrainConfig, WeightCopies};

#[derive(Debug, Args, Default)]
pub struct TrainArgs {
    /// Training method: lora (baseline) or grit.
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Base model (GGUF). Default: SmolLM2-135M-Instruct Q4_1, fetched on first use.
    #[arg(short, long, value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// Training data: JSONL (messages / prompt+completion / alpaca / text) or plain .txt.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Evaluation data (any supported format).
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training examples for evaluation (when no --eval-data).
    #[arg(long, value_name = "FRACTION")]
    pub eval_split: Option<f64>,
    /// Output folder: adapter.gguf, metrics.jsonl, summary.json, config.toml, checkpoints/.
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Allow writing into a non-empty --out (its previous run is replaced).
    #[arg(long)]
    pub overwrite: bool,
    /// Continue the run in DIR from its latest checkpoint.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// A TOML file with any training options (flags override it).
    #[arg(long, value_name = "grit.toml")]
    pub config: Option<PathBuf>,
    /// Print token counts, masked fraction and truncations, then exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Time every graph node and print where a step's time goes (slows training a little).
    /// With the environment variable GRIT_PROFILE_DETAIL=1, by op and tensor shapes.
    #[arg(long)]
    pub profile: bool,
    /// Write the token ids this run trains on (its first --steps batches) to FILE as JSON
    /// (`{"sequences":[{"tokens","labels","loss_mask"}]}`), e.g. for bench/peft_lora.py.
    #[arg(long, value_name = "FILE")]
    pub dump_tokens: Option<PathBuf>,

    /// Modules to adapt, comma-separated [default: attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down]; on
    /// fused tensors (attn_qkv; Phi-3's gate/up ffn_up) the fused one is adapted.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// LoRA rank r [default: 16].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha; the scale is alpha/r (or alpha/√r with --rslora) [default: 32].
    #[arg(long)]
    pub alpha: Option<f32>,
    /// Use the rsLoRA scale alpha/√r.
    #[arg(long)]
    pub rslora: bool,
    /// Dropout on the adapter input [default: 0].
    #[arg(long)]
    pub dropout: Option<f32>,

    /// Peak learning rate [default: 2e-4].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Schedule after warmup [default: cosine].
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// Linear warmup steps [default: 10].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// AdamW decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Clip the global gradient norm to this (0 = off) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f32>,
    /// AdamW β1 [default: 0.9].
    #[arg(long)]
    pub adam_beta1: Option<f32>,
    /// AdamW β2 [default: 0.999].
    #[arg(long)]
    pub adam_beta2: Option<f32>,
    /// AdamW ε [default: 1e-8].
    #[arg(long)]
    pub adam_eps: Option<f32>,

    /// Sequences per micro-batch [default: 1].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence (longer examples are truncated and reported) [default: 256].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Optimizer steps to run.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Passes over the training data (when --steps is not given) [default: 1].
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Evaluate every N steps (and at step 0 and at the end) [default: 20].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Evaluate on at most this many tokens of the eval set [default: 8192].
    #[arg(long)]
    pub eval_tokens: Option<usize>,
    /// Worker threads (0 = all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Where the training graphs run: auto (a GPU when this build has a GPU backend and
    /// ggml finds one, else the CPU), cpu, or gpu (an error without one) [default: auto].
    #[arg(long, value_enum, env = "GRIT_DEVICE")]
    pub device: Option<crate::ggml::Device>,
    /// Random seed (adapter init, shuffling, dropout) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a checkpoint every N steps into OUT/checkpoints/step-N (0 = none).
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Keep only the newest K checkpoints [default: all].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Compute copies of the frozen weights for the backward pass [default: q8_0].
    #[arg(long, value_enum)]
    pub weight_copies: Option<WeightCopies>,
    /// Also run the forward on Q8_0 copies of weights whose type has no fast matmul kernel
    /// (Q5_0/Q5_1, K-quants): faster steps, but the adapter then trains against requantized
    /// weights, not the stored ones it will be served with. (Q4_1 always runs as its exact,
    /// faster Q4_0 + offsets split when copies are made.)
    #[arg(long)]
    pub forward_copy: bool,
    /// Recompute each block's activations in the backward from the residual stream instead of
    /// keeping them: the step's compute buffer falls by more than half (469 → 189 MiB on the
    /// default model at 256 tokens) for one more forward pass per step
    /// [default: auto = on with `--weight-copies none`].
    #[arg(long, value_enum)]
    pub recompute: Option<Recompute>,
    /// Train on prompt tokens too (no masking).
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Skip malformed data rows (counted) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_rows: bool,

    // ---- GRIT (--method grit; defaults in GritConfig / docs/GRIT.md)
    /// GRIT: collect the K-FAC factors Σ_a, Σ_g every N steps [default: 5].
    #[arg(long, help_heading = "GRIT")]
    pub kfac_every: Option<usize>,
    /// GRIT: exponential moving average or running mean of the factors [default: ema].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub kfac_stats: Option<KfacStats>,
    /// GRIT: EMA factor β [default: 0.95].
    #[arg(long, help_heading = "GRIT")]
    pub kfac_beta: Option<f64>,
    /// GRIT: recompute the damped inverses every N steps (adaptive) [default: 10].
    #[arg(long, help_heading = "GRIT")]
    pub invert_every: Option<usize>,
    /// GRIT: damping relative to each factor's scale or absolute [default: relative].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub damping: Option<Damping>,
    /// GRIT: λ_rel of relative damping [default: 10].
    #[arg(long, help_heading = "GRIT")]
    pub damping_rel: Option<f64>,
    /// GRIT: λ of absolute damping (or the floor of relative) [default: 1e-3 absolute, 0 relative].
    #[arg(long, help_heading = "GRIT")]
    pub damping_abs: Option<f64>,
    /// GRIT: keep absolute damping fixed (no loss-std rule).
    #[arg(long, help_heading = "GRIT")]
    pub no_damping_adaptive: bool,
    /// GRIT: which factor preconditions which gradient [default: textbook].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub kfac_pairing: Option<Pairing>,
    /// GRIT: scale each K-FAC factor to unit mean eigenvalue before damping (trace) or use it as collected [default: trace].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub factor_norm: Option<FactorNorm>,
    /// GRIT: keep the preconditioned gradients' own size instead of rescaling each to the raw gradient's norm (grafting).
    #[arg(long, help_heading = "GRIT")]
    pub no_graft: bool,
    /// GRIT: no preconditioning during the first N steps [default: 0].
    #[arg(long, help_heading = "GRIT")]
    pub ng_warmup: Option<usize>,
    /// GRIT: λ_K of the curvature regularizer, a drift control: KL on other text falls as it
    /// grows (1e-3..1e-2), at some cost in gain [default: 0].
    #[arg(long, help_heading = "GRIT")]
    pub lambda_k: Option<f64>,
    /// GRIT: λ_R of the projection regularizer (acts with --rank-cut soft only) [default: 1e-4].
    #[arg(long, help_heading = "GRIT")]
    pub lambda_r: Option<f64>,
    /// GRIT: ramp the regularizers in over N steps [default: 30].
    #[arg(long, help_heading = "GRIT")]
    pub reg_warmup: Option<usize>,
    /// GRIT: reproject every N steps (adaptive) [default: 30].
    #[arg(long, help_heading = "GRIT")]
    pub reproject_every: Option<usize>,
    /// GRIT: the first reprojection and rank cut after this share of the run's steps
    /// (--reproject-warmup and --rank-start, when given, win) [default: 0.7].
    #[arg(long, help_heading = "GRIT", value_name = "SHARE")]
    pub first_cut: Option<f64>,
    /// GRIT: no reprojection before step N (instead of --first-cut) [default: the first cut].
    #[arg(long, help_heading = "GRIT")]
    pub reproject_warmup: Option<usize>,
    /// GRIT: ranks may change from step N on (instead of --first-cut) [default: the first cut].
    #[arg(long, help_heading = "GRIT")]
    pub rank_start: Option<usize>,
    /// GRIT: smallest rank of a module [default: 3].
    #[arg(long, help_heading = "GRIT")]
    pub rank_min: Option<usize>,
    /// GRIT: largest rank of a module [default: --rank].
    #[arg(long, help_heading = "GRIT")]
    pub rank_max: Option<usize>,
    /// GRIT: keep the fewest directions holding this share of the rank signal [default: 0.9].
    #[arg(long, help_heading = "GRIT")]
    pub rank_energy: Option<f64>,
    /// GRIT: what the rank rule weighs per direction: Σ_a's eigenvalue (input), the update's output energy (output) or its K-FAC Fisher cost in loss (fisher) [default: fisher].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub rank_signal: Option<RankSignal>,
    /// GRIT: τ is a share of what a module held before its first cut (run) or of what each event finds (event) [default: event].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub rank_budget: Option<RankBudget>,
    /// GRIT: τ of each module's own signal (module) or one budget over every module's directions, by signal per parameter (global; needs --rank-signal fisher) [default: module].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub rank_scope: Option<RankScope>,
    /// GRIT: hard (tensors shrink) or soft (project in place) rank cuts [default: hard].
    #[arg(long, value_enum, help_heading = "GRIT")]
    pub rank_cut: Option<RankCut>,
    /// GRIT: B's basis from Σ_a instead of Σ_g.
    #[arg(long, help_heading = "GRIT")]
    pub one_sided: bool,
    /// GRIT: fixed event intervals (no adaptation from the loss trend).
    #[arg(long, help_heading = "GRIT")]
    pub fixed_intervals: bool,
}

impl TrainArgs {
    /// Applies every flag that was given on top of `base`.
    pub fn apply(&self, mut c: TrainConfig) -> TrainConfig {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { c.$f = v; } )* };
        }
        set!(
            method,
            eval_split,
            targets,
            rank,
            alpha,
            dropout,
            lr,
            lr_schedule,
            warmup,
            weight_decay,
            max_grad_norm
        );
        set!(
            adam_beta1,
            adam_beta2,
            adam_eps,
            batch_size,
            grad_accum,
            max_seq_len,
            eval_every,
            eval_tokens,
            threads,
            seed
        );
        set!(save_every, weight_copies, recompute, device);
        if self.model.is_some() {
            c.model = self.model.clone();
        }
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        if self.eval_data.is_some() {
            c.eval_data = self.eval_data.clone();
        }
        if self.steps.is_some() {
            c.steps = self.steps;
        }
        if self.epochs.is_some() {
            c.epochs = self.epochs;
        }
        if self.keep_checkpoints.is_some() {
            c.keep_checkpoints = self.keep_checkpoints;
        }
        macro_rules! set_grit {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.grit.$f = v; } )* };
        }
        set_grit!(
            kfac_every,
            kfac_stats,
            kfac_beta,
            invert_every,
            damping,
            damping_rel,
            kfac_pairing,
            factor_norm,
            ng_warmup,
            lambda_k,
            lambda_r
        );
        set_grit!(
            reg_warmup,
            reproject_every,
            first_cut,
            rank_min,
            rank_energy,
            rank_cut,
            rank_signal,
            rank_budget,
            rank_scope
        );
        if self.reproject_warmup.is_some() {
            c.grit.reproject_warmup = self.reproject_warmup;
        }
        if self.rank_start.is_some() {
            c.grit.rank_start = self.rank_start;
        }
        if self.damping_abs.is_some() {
            c.grit.damping_abs = self.damping_abs;
        }
        if self.rank_max.is_some() {
            c.grit.rank_max = self.rank_max;
        }
        if self.no_damping_adaptive {
            c.grit.damping_adaptive = false;
        }
        if self.no_graft {
            c.grit.graft = false;
        }
        if self.one_sided {
            c.grit.two_sided = false;
        }
        if self.fixed_intervals {
            c.grit.adaptive_intervals = false;
        }
        c.rslora |= self.rslora;
        c.forward_copy |= self.forward_copy;
        c.train_on_prompt |= self.train_on_prompt;
        c.skip_bad_rows |= self.skip_bad_rows;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_config_which_overrides_defaults() {
        let base: TrainConfig = toml::from_str("rank = 8\nlr = 1e-3\nseed = 5").unwrap();
        let args = TrainArgs { rank: Some(4), rslora: true, ..Default::default() };
        let c = args.apply(base);
        assert_eq!(c.rank, 4);
        assert_eq!(c.lr, 1e-3);
        assert_eq!(c.seed, 5);
        assert!(c.rslora);
        assert_eq!(c.alpha, 32.0);
        let base: TrainConfig =
            toml::from_str("method = \"grit\"\n[grit]\nrank_energy = 0.8\nkfac_every = 3").unwrap();
        let args = TrainArgs {
            kfac_every: Some(1),
            rank_cut: Some(RankCut::Soft),
            one_sided: true,
            ..Default::default()
        };
        let c = args.apply(base);
        assert_eq!(
            (c.grit.kfac_every, c.grit.rank_energy, c.grit.rank_cut, c.grit.two_sided),
            (1, 0.8, RankCut::Soft, false)
        );
        let back: TrainConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    /// Every `[default: X]` that `grit train --help` prints with a value is the value
    /// `TrainConfig::default()` (and its `[grit]` table) really has: the help text and the
    /// config cannot drift apart silently.
    #[test]
    fn help_defaults_are_the_config_defaults() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: TrainArgs,
        }
        let cfg = toml::Value::try_from(TrainConfig::default()).unwrap();
        let grit = cfg.get("grit").cloned().unwrap();
        let (mut checked, mut mismatches) = (0, Vec::new());
        for arg in Wrap::command().get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let Some(default) = help.split("[default: ").nth(1).and_then(|d| d.split(']').next())
            else {
                continue;
            };
            let id = arg.get_id().as_str();
            let Some(value) = cfg.get(id).or_else(|| grit.get(id)) else { continue };
            let agrees = match value {
                // f32 fields come back as the nearest f64.
                toml::Value::Float(x) => {
                    default.parse::<f64>().ok().map(|d| (d - x).abs() <= 1e-6 * x.abs())
                }
                toml::Value::Integer(x) => default.parse::<i64>().ok().map(|d| d == *x),
                toml::Value::String(x) => Some(
                    default.split_whitespace().next().is_some_and(|d| d.eq_ignore_ascii_case(x)),
                ),
                toml::Value::Array(a) => Some(
                    default == a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","),
                ),
                _ => None,
            };
            match agrees {
                Some(true) => checked += 1,
                Some(false) => {
                    mismatches.push(format!("--{id}: help says {default}, the config has {value}"))
                }
                None => {} // a described default ("the first cut", "--rank", "auto = …")
            }
        }
        assert!(mismatches.is_empty(), "{mismatches:#?}");
        assert!(checked >= 25, "only {checked} defaults compared");
    }
}
