//! Every hyper-parameter of GRIT (`docs/GRIT.md`), with the defaults measured there.

use serde::{Deserialize, Serialize};

/// How the K-FAC factors accumulate over steps (docs/GRIT.md §2, `--kfac-stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KfacStats {
    /// Exponential moving average Σ ← β·Σ + (1 − β)·Σ_step (grit's default: A changes at
    /// every reprojection, so an all-time mean goes stale).
    #[default]
    Ema,
    /// Running mean over every token ever seen (the reference; never reset).
    Mean,
}

/// How the damping λ added to a factor is chosen (docs/GRIT.md §3, `--damping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Damping {
    /// λ = λ_rel · tr(Σ)/r + λ_abs, per factor: follows each factor's scale (Σ_g is ~1e-11 to
    /// 1e-8 on SmolLM2-135M, Σ_a is O(1e-2..1)).
    #[default]
    Relative,
    /// λ = λ_abs for every factor (the reference: 1e-3, then the loss-std rule).
    Absolute,
}

/// Which factor preconditions which gradient (docs/GRIT.md §3, `--kfac-pairing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pairing {
    /// Textbook K-FAC: ∇B ← ∇B·(Σ_a + λI)⁻¹, ∇A ← (Σ_g + λI)⁻¹·∇A.
    #[default]
    Textbook,
    /// The released code: ∇B ← ∇B·(Σ_g + λI)⁻¹, ∇A ← (Σ_a + λI)⁻¹·∇A.
    Reference,
}

/// Whether each K-FAC factor is scaled to unit mean eigenvalue before damping and inversion
/// (`--factor-norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FactorNorm {
    /// Σ ← Σ / (tr(Σ)/r) (grit's default): the preconditioner changes the gradient's
    /// direction and per-direction scale, not its overall size. Unnormalized, Σ_g ~1e-10
    /// makes ∇A ×1e10 larger than ∇B; global clipping then shrinks ∇B below AdamW's ε and
    /// B stops learning.
    #[default]
    Trace,
    /// The factors as collected (textbook K-FAC / the reference).
    None,
}

/// Whether a reprojection changes the tensor shapes (docs/GRIT.md §5, `--rank-cut`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RankCut {
    /// A ← V_a,kᵀ·A (k×d_in), B ← B·V_g,k·(V_g,kᵀ·V_a,k) (d_out×k): the rank really shrinks.
    #[default]
    Hard,
    /// A ← V_a,k·V_a,kᵀ·A, B ← B·V_g,k·V_g,kᵀ: shapes kept (the reference); λ_R applies.
    Soft,
}

/// What the rank rule weighs per direction of Σ_a's eigenbasis (docs/GRIT.md §5,
/// `--rank-signal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RankSignal {
    /// The update's output energy in direction v_j: λ_j·‖B·v_j‖², whose sum over j is
    /// E‖B·A·x‖² exactly. A direction that A fills with input but B does not use counts
    /// nothing; while B is still zero nothing is cut.
    Output,
    /// Σ_a's eigenvalue λ_j alone (the method as first written: the input seen through A).
    Input,
    /// The K-FAC Fisher estimate of what dropping a direction costs in loss: the directions
    /// are the singular vectors of Σ_g^½·Σ_a^½ (the update B·A in the Fisher metric), each
    /// weighted by its squared singular value, and the cut is the best rank-k update in that
    /// metric (not Σ_a's eigenvectors). In loss units, so comparable across modules
    /// ([`RankScope::Global`]). The default: side by side with the input signal it gained as
    /// much with fewer parameters on both benchmark tasks, and drifted more (docs/GRIT.md §5).
    #[default]
    Fisher,
}

/// Over which directions τ is counted (docs/GRIT.md §5, `--rank-scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RankScope {
    /// Each module keeps τ of its own signal.
    #[default]
    Module,
    /// One budget for the whole adapter: the directions of every module, by signal per
    /// trainable parameter, until τ of the total signal is kept; a module's rank follows from
    /// how many of its directions made it. Needs the Fisher signal (the only one in the same
    /// units across modules) and the event budget.
    Global,
}

/// What τ is a share of (docs/GRIT.md §5, `--rank-budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RankBudget {
    /// The whole run: the shares a module keeps at its cuts multiply, and every cut keeps
    /// the product ≥ τ. A cut of what an earlier cut left needs τ / (share kept so far), so
    /// repeated events do not ratchet a module to `rank_min`.
    Run,
    /// Each event on its own: τ of what is left (every event throws away up to 1 − τ more).
    /// The default, measured with the input signal (docs/GRIT.md §5).
    #[default]
    Event,
}

/// The first reprojection step of a configuration whose run length is unknown (no
/// [`GritConfig::resolve_first_cut`]).
pub const UNRESOLVED_FIRST_CUT: usize = 30;

/// GRIT's hyper-parameters. Field defaults are the flag defaults (`docs/GRIT.md`); values marked
/// "placeholder" are to be chosen by measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GritConfig {
    // ---- statistics (§2)
    /// Collect Σ_a, Σ_g every this many optimizer steps (reference 15).
    pub kfac_every: usize,
    pub kfac_stats: KfacStats,
    /// EMA factor β (with `kfac_stats = ema`).
    pub kfac_beta: f64,

    // ---- preconditioning (§3)
    /// Recompute the damped inverses every this many steps (reference 50/150); adaptive when
    /// `adaptive_intervals`.
    pub invert_every: usize,
    pub damping: Damping,
    /// λ_rel of relative damping (10, by measurement: with trace-normalized factors and
    /// grafting, the 120-step Hamlet→Macbeth gain rose monotonically with λ_rel — 0.1 < 1 < 3
    /// < 10 — and 10 is the first value tried whose gain clears 0.9× LoRA's; see README).
    /// The damped, normalized factor's condition number is at most r/λ_rel + 1, so at r = 16
    /// the preconditioner still reweights directions by up to 2.6×.
    pub damping_rel: f64,
    /// λ_abs: the damping of absolute mode (None: 1e-3, the reference), or the additive floor
    /// of relative mode (None: 0).
    pub damping_abs: Option<f64>,
    /// Absolute mode only: after each inversion set λ = clip(0.001 + std(last 20 losses),
    /// 1e-6, 0.01), as the reference does.
    pub damping_adaptive: bool,
    pub kfac_pairing: Pairing,
    /// Scale each factor to unit mean eigenvalue before damping (see [`FactorNorm`]).
    pub factor_norm: FactorNorm,
    /// Rescale each preconditioned gradient (per module, A and B) to the raw gradient's norm:
    /// the preconditioner sets the direction, the gradient the size (see `OptOptions::graft`).
    pub graft: bool,
    /// No preconditioning during the first this many steps (reference 0, or 300 on long runs).
    pub ng_warmup: usize,

    // ---- regularizers (§4)
    /// λ_K of the curvature term Σ_m [tr(Σ_a·A·Aᵀ) + tr(Σ_g·Bᵀ·B)] (reference 1e-5). Off (0)
    /// by default, by measurement: at 1e-5 its gradient was ~1e-3 of the loss's and gain and
    /// drift with and without it agreed; at 1e-3..1e-2 it is a drift control, KL on other
    /// text falling with λ_K, but it costs gain, and the default already drifts less than
    /// LoRA r16 without it (docs/GRIT.md §4).
    pub lambda_k: f64,
    /// λ_R of the projection term Σ_m [‖(I − P_a)·A‖²_F + ‖B·(I − P_g)‖²_F] (reference 1e-4).
    /// Only soft cuts keep a projector: after a hard cut P = I and the term is 0.
    pub lambda_r: f64,
    /// Both terms ramp in linearly over this many steps (placeholder 30).
    pub reg_warmup: usize,

    // ---- reprojection and rank (§5)
    /// Reproject every this many steps (reference 50/300); adaptive when `adaptive_intervals`.
    pub reproject_every: usize,
    /// No reprojection before this step (None: from `first_cut`; read it with
    /// [`GritConfig::reproject_warmup`]).
    pub reproject_warmup: Option<usize>,
    /// Ranks may change only from this step on, before it a reprojection keeps k = r (None:
    /// from `first_cut`; read it with [`GritConfig::rank_start`]).
    pub rank_start: Option<usize>,
    /// The first reprojection and rank cut as a share of the run's optimizer steps:
    /// [`GritConfig::resolve_first_cut`] fills the unset `reproject_warmup` and `rank_start`
    /// with round(share × steps) once the run's length is known. Default 0.7: A has learned
    /// its directions by then, so the cut keeps what training found (cut at step 30 of 150,
    /// most modules fell to `rank_min` and the run lost 8 % of LoRA r16's gain; at half the run
    /// the Fisher cut kept less than at 0.7, docs/GRIT.md §5).
    pub first_cut: f64,
    /// τ: keep the fewest directions whose rank signal holds this share of the total (0.9; with
    /// Σ_a's eigenvalues the reference's 0.99 cut only 7–10 % on the default model; the Fisher
    /// signal is so concentrated that `rank_min` sets the size).
    pub rank_energy: f64,
    /// Smallest rank a module is cut to (reference 4; 3 here: the Fisher cut sends nearly every
    /// module to the floor, and at 3 it kept the gain of 4 with three quarters of the
    /// parameters on both benchmark tasks over two seeds, docs/GRIT.md §5).
    pub rank_min: usize,
    /// Largest rank a module may have (None: its initial rank). A module above it is cut to it.
    /// (Growing a module back above its current rank is not implemented.)
    pub rank_max: Option<usize>,
    pub rank_cut: RankCut,
    /// What the rank rule weighs (see [`RankSignal`]).
    pub rank_signal: RankSignal,
    /// What τ is a share of (see [`RankBudget`]).
    pub rank_budget: RankBudget,
    /// Per module or one budget for the adapter (see [`RankScope`]).
    pub rank_scope: RankScope,
    /// B's basis from Σ_g (true, default) or from Σ_a (false: one-sided).
    pub two_sided: bool,

    // ---- intervals (§5)
    /// Adjust `invert_every` after each inversion and `reproject_every` after each
    /// reprojection from the loss trend (× 1.5 when the mean of the last 10 losses is below
    /// 0.99 × that of the 10 before, else × 0.75), clamped to [1, 1000] / [1, 2000].
    pub adaptive_intervals: bool,
}

impl Default for GritConfig {
    fn default() -> Self {
        GritConfig {
            kfac_every: 5,
            kfac_stats: KfacStats::Ema,
            kfac_beta: 0.95,
            invert_every: 10,
            damping: Damping::Relative,
            damping_rel: 10.0,
            damping_abs: None,
            damping_adaptive: true,
            kfac_pairing: Pairing::Textbook,
            factor_norm: FactorNorm::Trace,
            graft: true,
            ng_warmup: 0,
            lambda_k: 0.0,
            lambda_r: 1e-4,
            reg_warmup: 30,
            reproject_every: 30,
            reproject_warmup: None,
            rank_start: None,
            first_cut: 0.7,
            rank_energy: 0.9,
            rank_min: 3,
            rank_max: None,
            rank_cut: RankCut::Hard,
            rank_signal: RankSignal::Fisher,
            rank_budget: RankBudget::Event,
            rank_scope: RankScope::Module,
            two_sided: true,
            adaptive_intervals: true,
        }
    }
}

/// Why a [`GritConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid GRIT setting {key}: {msg}")]
pub struct GritConfigError {
    pub key: &'static str,
    pub msg: String,
}

impl GritConfig {
    /// Whether the regularizers can be non-zero, so the step graph needs their loss node: the
    /// curvature term whenever λ_K > 0, the projection term only with soft cuts (after a hard
    /// cut the kept basis is the whole rank space and the term is identically 0).
    pub fn regularized(&self) -> bool {
        self.lambda_k > 0.0 || (self.lambda_r > 0.0 && self.rank_cut == RankCut::Soft)
    }

    /// λ_abs as used: the explicit value, or the mode's default (absolute 1e-3, relative 0).
    pub fn lambda_abs(&self) -> f64 {
        self.damping_abs.unwrap_or(match self.damping {
            Damping::Absolute => 1e-3,
            Damping::Relative => 0.0,
        })
    }

    /// Fills the unset `reproject_warmup` and `rank_start` from `first_cut` for a run of
    /// `total_steps` optimizer steps (explicit steps are kept).
    pub fn resolve_first_cut(&mut self, total_steps: usize) {
        let step = ((self.first_cut * total_steps as f64).round() as usize).max(1);
        self.reproject_warmup.get_or_insert(step);
        self.rank_start.get_or_insert(step);
    }

    /// The first step a reprojection may happen at ([`UNRESOLVED_FIRST_CUT`] before
    /// [`GritConfig::resolve_first_cut`], e.g. a configuration used outside a run).
    pub fn reproject_warmup(&self) -> usize {
        self.reproject_warmup.unwrap_or(UNRESOLVED_FIRST_CUT)
    }

    /// The first step a reprojection may change ranks at (as [`GritConfig::reproject_warmup`]).
    pub fn rank_start(&self) -> usize {
        self.rank_start.unwrap_or(UNRESOLVED_FIRST_CUT)
    }

    /// Checks ranges (intervals ≥ 1, 0 < β < 1, 0 < τ ≤ 1, a first-cut share in [0, 1],
    /// non-negative λs, rank bounds).
    pub fn validate(&self) -> Result<(), GritConfigError> {
        let err = |key, msg: String| Err(GritConfigError { key, msg });
        if !(0.0..=1.0).contains(&self.first_cut) {
            return err(
                "first_cut",
                format!("{} is not a share of the run in [0, 1]", self.first_cut),
            );
        }
        for (key, v) in [
            ("kfac_every", self.kfac_every),
            ("invert_every", self.invert_every),
            ("reproject_every", self.reproject_every),
            ("rank_min", self.rank_min),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if !(self.kfac_beta > 0.0 && self.kfac_beta < 1.0) {
            return err("kfac_beta", format!("{} is not in (0, 1)", self.kfac_beta));
        }
        if !(self.rank_energy > 0.0 && self.rank_energy <= 1.0) {
            return err("rank_energy", format!("{} is not in (0, 1]", self.rank_energy));
        }
        for (key, v) in [
            ("damping_rel", self.damping_rel),
            ("lambda_k", self.lambda_k),
            ("lambda_r", self.lambda_r),
            ("damping_abs", self.lambda_abs()),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return err(key, format!("{v} is not a finite number ≥ 0"));
            }
        }
        if self.damping == Damping::Absolute && self.lambda_abs() <= 0.0 {
            return err("damping_abs", "absolute damping needs λ > 0".into());
        }
        if self.damping == Damping::Relative && self.damping_rel <= 0.0 && self.lambda_abs() <= 0.0
        {
            return err("damping_rel", "relative damping needs λ_rel > 0 or λ_abs > 0".into());
        }
        if self.rank_signal == RankSignal::Fisher && self.rank_cut == RankCut::Soft {
            return err(
                "rank_signal",
                "the Fisher signal (the default) cuts to its own basis, which a soft cut \
                 cannot keep (use --rank-cut hard, or --rank-signal input with a soft cut)"
                    .into(),
            );
        }
        if self.rank_scope == RankScope::Global {
            if self.rank_signal != RankSignal::Fisher {
                return err(
                    "rank_scope",
                    "a global budget compares modules, which needs the Fisher signal (the \
                     others are in each module's own units)"
                        .into(),
                );
            }
            if self.rank_budget == RankBudget::Run {
                return err(
                    "rank_scope",
                    "a global budget counts τ per event (the run budget is per module)".into(),
                );
            }
        }
        if let Some(m) = self.rank_max {
            if m < self.rank_min {
                return err("rank_max", format!("{m} is below rank_min {}", self.rank_min));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first cut comes at a share of the run; explicit steps win over the share.
    #[test]
    fn the_first_cut_is_a_share_of_the_run_unless_steps_are_given() {
        let mut c = GritConfig::default();
        c.resolve_first_cut(150);
        assert_eq!((c.reproject_warmup(), c.rank_start()), (105, 105));
        let mut c = GritConfig { first_cut: 0.2, rank_start: Some(40), ..GritConfig::default() };
        c.resolve_first_cut(1000);
        assert_eq!((c.reproject_warmup(), c.rank_start()), (200, 40));
        let mut c = GritConfig { first_cut: 0.0, ..GritConfig::default() };
        c.resolve_first_cut(10);
        assert_eq!(c.reproject_warmup(), 1, "never before the first step");
        assert!(GritConfig { first_cut: 1.5, ..GritConfig::default() }.validate().is_err());
        // A config file's explicit steps survive the round trip.
        let c = GritConfig { reproject_warmup: Some(12), ..GritConfig::default() };
        let back: GritConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!((back.reproject_warmup, back.rank_start), (Some(12), None));
    }

    #[test]
    fn defaults_are_the_documented_defaults_and_round_trip() {
        let c = GritConfig::default();
        assert_eq!(
            (
                c.kfac_every,
                c.invert_every,
                c.reproject_every,
                c.reproject_warmup(),
                c.rank_start(),
                c.rank_min
            ),
            (5, 10, 30, 30, 30, 3)
        );
        assert_eq!(
            (c.kfac_beta, c.kfac_stats, c.damping, c.kfac_pairing, c.ng_warmup),
            (0.95, KfacStats::Ema, Damping::Relative, Pairing::Textbook, 0)
        );
        assert_eq!(
            (c.lambda_k, c.lambda_r, c.rank_cut, c.two_sided),
            (0.0, 1e-4, RankCut::Hard, true)
        );
        assert_eq!((c.rank_signal, c.first_cut), (RankSignal::Fisher, 0.7));
        assert!(!c.regularized(), "λ_R alone does nothing with hard cuts");
        assert!(GritConfig { rank_cut: RankCut::Soft, ..c.clone() }.regularized());
        assert!(GritConfig { lambda_k: 3e-3, ..c.clone() }.regularized());
        c.validate().unwrap();
        let t = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<GritConfig>(&t).unwrap(), c);
        // serde(default): a partial file keeps the other defaults.
        let p: GritConfig =
            toml::from_str("rank_energy = 0.95\nrank_cut = \"soft\"\nkfac_stats = \"mean\"")
                .unwrap();
        assert_eq!(
            (p.rank_energy, p.rank_cut, p.kfac_stats, p.kfac_every),
            (0.95, RankCut::Soft, KfacStats::Mean, 5)
        );
        assert!(toml::from_str::<GritConfig>("rank_energi = 0.9").is_err());
        assert_eq!(c.lambda_abs(), 0.0);
        assert_eq!(GritConfig { damping: Damping::Absolute, ..c.clone() }.lambda_abs(), 1e-3);
        assert!(GritConfig { kfac_beta: 1.0, ..c.clone() }.validate().is_err());
        assert!(GritConfig { rank_max: Some(2), ..c }.validate().is_err());
    }
}
