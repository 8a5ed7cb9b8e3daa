//! GRIT: K-FAC preconditioning, Fisher-guided reprojection and dynamic rank
//! (`docs/GRIT.md`), as plain functions the trainer calls.
//!
//! - [`config`]: [`GritConfig`], every hyper-parameter with the defaults measured in `docs/GRIT.md`.
//! - [`linalg`]: f64 host linear algebra for r×r matrices (Cholesky with escalating damping,
//!   inverses, Jacobi eigendecomposition).
//! - [`stats`]: Σ_a = mean_t u·uᵀ and Σ_g = mean_t g·gᵀ as ggml nodes over the trained tokens
//!   ([`StatsGraph`]), and their EMA / running mean on the host ([`KfacState`]).
//! - [`precondition`]: damped inverses and their pairing ([`Preconditioner`]), applied to ∇A
//!   and ∇B in the optimizer graph ([`precondition::precondition`], [`PrecondInputs`]).
//! - [`regularize`]: the λ_K curvature and λ_R projection penalties as one loss node
//!   ([`RegGraph`]).
//! - [`reproject`]: eigenbases, the energy rank rule, hard/soft cuts of A, B, their Adam
//!   moments and the statistics ([`Cut`]).
//! - [`schedule`]: when statistics, inversions and reprojections happen; adaptive intervals;
//!   the regularizer ramp; the reference's loss-std damping ([`Schedule`]).
//!
//! # How a trainer uses it (one optimizer step t, 1-based)
//! Building the micro-step graph (shapes in ggml order, `ne[0]` first):
//! 1. `lora.mark_params()`, `TrainGraph::build(..)` as for LoRA (taps: u [r, n_tokens]).
//! 2. `RegGraph::build(ctx, lora)`; mark `reg.loss` (F32 `[1]`) as a second loss
//!    (`set_loss`) and `build_forward_expand` it (skip when λ_K = λ_R = 0).
//! 3. `graph.build_backward_expand(ctx)`.
//! 4. `StatsGraph::build(ctx, &graph, &taps, lora)`; pass `stats.outputs()` (F32 [r, r]
//!    each) with the other extras to `rebuild_frozen_backward`. Set both losses'
//!    `grad_acc` to 1 each run.
//!
//! Building the optimizer graph: for each module, after g = acc / n_micro and before the
//! norm: `(ga, gb) = precondition::precondition(ctx, ga [d_in, r], gb [r, d_out], left_a,
//! right_b)` with the inputs of `PrecondInputs::new(ctx, lora)` (F32 [r, r]).
//!
//! Each step t:
//! - inputs: `stats.set_weights(run, &stats::token_weights(n_tokens, &batch.rows).0)`;
//!   `reg.set(run, schedule::reg_ramp(t, cfg.reg_warmup), &coeffs)` with
//!   `coeffs[i] = regularize::coefficients(&kfac.modules[i], cfg.lambda_k, cfg.lambda_r)`
//!   (recomputed after each statistics update or reprojection);
//! - after each micro-batch run, when `schedule.kfac_due(t, cfg)`: `stats.read(run)` and
//!   `kfac.accumulate(i, Σ_a, Σ_g, n_counted, 1.0)`; after the step's last micro-batch
//!   `kfac.commit()`;
//! - optimizer graph: `precond.set(run, &p)` with `p[i] = Preconditioner::identity(r)` until
//!   the first inversion and while `!schedule.precondition_active(t, cfg)`;
//! - after the step: `schedule.record_loss(loss)`; if `schedule.invert_due(t)`:
//!   `p[i] = Preconditioner::for_module(&kfac.modules[i], cfg, schedule.lambda_abs)`, then
//!   `schedule.on_inversion(t, cfg)`; if `schedule.reproject_due(t, cfg)`: for each module
//!   `Spectrum::of(&kfac.modules[i], &gram_b(B), cfg)` (None: no statistics yet), the ranks
//!   (`spectrum.module_rank(cfg, t, initial_rank)` per module, or `global_ranks` over all of
//!   them with `--rank-scope global`), `cut = spectrum.cut(k, cfg)` (`Cut::plan` does the
//!   three for one module; `cut.is_noop()`: nothing changes, `cut.report` is still worth
//!   logging), then with A = `lora.read_a(i)`
//!   (r×d_in), B = `lora.read_b(i)` (d_out×r) and the Adam moments (same layouts):
//!   `cut.apply_a`, `cut.apply_b`, `cut.apply_moments_a/b`, `cut.apply_stats(&mut
//!   kfac.modules[i])`; rebuild the LoRA set with `LoraSet::with_modules` (rank
//!   `cut.new_rank()`, the module's *current* scale), the OptState with the new shapes
//!   (accumulators zero), recompute `p[i]` for the new rank (or the identity until the next
//!   inversion), rebuild the graphs; then `schedule.on_reprojection(t, cfg)`.
//!
//! `KfacState`, `Schedule` and `GritConfig` are serde types for checkpoints.

pub mod config;
pub mod linalg;
pub mod precondition;
pub mod regularize;
pub mod reproject;
pub mod schedule;
pub mod stats;

pub use config::{
    Damping, FactorNorm, GritConfig, GritConfigError, KfacStats, Pairing, RankBudget, RankCut,
    RankScope, RankSignal,
};
pub use precondition::{PrecondInputs, Preconditioner};
pub use regularize::RegGraph;
pub use reproject::{Cut, ReprojectReport, Spectrum};
pub use schedule::Schedule;
pub use stats::{KfacState, ModuleKfac, StatsGraph};
