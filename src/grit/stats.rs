//! Rank-space K-FAC statistics (docs/GRIT.md §2): in the graph, Σ_a = Σ_t w_t·u_t·u_tᵀ and
//! Σ_g = Σ_t w_t·g_t·g_tᵀ per adapted module; on the host, their EMA or running mean.
//!
//! # In the graph
//! For each module the forward exposes `u = A·x` (F32 [r, n_tokens], a [`LoraTap`]) and,
//! after `build_backward_expand`, its gradient `g = ∂L/∂u` (`graph.grad(u)`). The forward
//! computes `y = W0·x + B·(s·u)`, so `∂L/∂u = s·Bᵀ·δ` with δ = ∂L/∂y: exactly GRIT's g.
//! L is the graph's loss (the mean cross entropy over the trained rows, plus any other loss
//! node), so g carries the 1/n_rows of the mean: Σ_g scales with 1/n_rows². Callers who want
//! per-token scale can multiply Σ_g by n_rows² on the host ([`KfacState::accumulate`]'s
//! `g_scale`); relative damping makes the preconditioner's direction independent of it.
//!
//! Σ = v·diag(w)·vᵀ is one `mul_mat` per factor: ggml contracts over `ne[0]`, so with
//! vᵀ = cont(transpose(v)) [n_tokens, r]: Σ = mul_mat(vᵀ, vᵀ ⊙ w) → [r, r]
//! (entry (i, j) = Σ_t v[i, t]·w_t·v[j, t]). Plain ggml ops, so it runs on any backend.
//!
//! # Which tokens count
//! One weight input per graph, F32 `[n_tokens]`: w_t = 1/N for the N counted tokens, 0 for the
//! others, so the outputs are means over the counted tokens. The counted tokens are the
//! **trained rows** (`Batch::rows`: tokens whose next-token loss is in L), for both factors:
//! - the spec says padding and masked (prompt) tokens do not count. Prompt tokens do have a
//!   non-zero g (later trained tokens attend to them) but their own prediction is not
//!   trained; tokens after a segment's last trained row have g = 0;
//! - using one token set for both factors keeps F ≈ Σ_a ⊗ Σ_g an estimate over one
//!   population, and makes the hard-cut rotation of both factors exact (same tokens);
//! - on plain-text data every real token but the last of a sequence is a trained row, so the
//!   choice only matters for chat/instruction data.
//!
//! [`token_weights`] builds the vector from the trained rows; a caller that prefers another
//! set (e.g. every non-padding token of a trained segment) passes its own indices.

use serde::{Deserialize, Serialize};

use crate::ggml::{Computation, Context, GgmlError, Graph, Tensor};
use crate::model::{LoraSet, LoraTap};

use super::config::KfacStats;

/// (Σ_a, Σ_g) of one module as read from a graph: r×r row-major each.
pub type FactorPair = (Vec<f32>, Vec<f32>);

/// Σ = v·diag(w)·vᵀ for v F32 `[r, n]` and w F32 `[n]` → F32 `[r, r]` (ggml ops).
pub fn weighted_gram<'g>(ctx: &'g Context, v: Tensor<'g>, w: Tensor<'g>) -> Tensor<'g> {
    let (ne, nw) = (v.ne(), w.ne());
    assert!(
        ne[2] == 1 && ne[3] == 1 && nw[0] == ne[1] && w.is_vector(),
        "weighted_gram: v {v:?} with weights {w:?}"
    );
    // The two [n, r] temporaries are kept for the whole graph (marked as outputs): freed one
    // by one between the backward's large tensors, hundreds of these small blocks exhaust
    // ggml's allocator free list ("out of free blocks") on a 30-layer model. They cost
    // 2·n·r·4 bytes per module (13 MB for 210 modules at r = 16, n = 256).
    let vt = ctx.cont(ctx.transpose(v)).set_output(); // [n, r]
    let vtw = ctx.mul(vt, w).set_output(); // [n, r]: row t scaled by w_t (w broadcast over ne[1])
    ctx.mul_mat(vt, vtw) // [r, r]: Σ_t v[i, t]·w_t·v[j, t]
}

/// The per-token weights for a graph of `n_tokens`: 1/N at each of the N distinct `counted`
/// token indices (the trained rows), 0 elsewhere. Returns the weights and N.
pub fn token_weights(n_tokens: usize, counted: &[i32]) -> (Vec<f32>, usize) {
    let mut mark = vec![false; n_tokens];
    for &t in counted {
        assert!(
            t >= 0 && (t as usize) < n_tokens,
            "token_weights: index {t} outside {n_tokens} tokens"
        );
        mark[t as usize] = true;
    }
    let n = mark.iter().filter(|&&m| m).count();
    let w = if n == 0 { 0.0 } else { 1.0 / n as f32 };
    (mark.iter().map(|&m| if m { w } else { 0.0 }).collect(), n)
}

/// The statistic nodes of one module.
#[derive(Debug, Clone, Copy)]
pub struct ModuleStatsNodes<'g> {
    /// Index into `LoraSet::modules()`.
    pub module: usize,
    pub rank: usize,
    /// u = A·x, F32 [r, n_tokens] (forward).
    pub u: Tensor<'g>,
    /// g = ∂L/∂u, F32 [r, n_tokens] (backward).
    pub g: Tensor<'g>,
    /// Σ_a of this batch, F32 [r, r] (graph output).
    pub sigma_a: Tensor<'g>,
    /// Σ_g of this batch, F32 [r, r] (graph output).
    pub sigma_g: Tensor<'g>,
}

/// Σ_a and Σ_g of every adapted module of a training graph.
#[derive(Debug)]
pub struct StatsGraph<'g> {
    /// F32 `[n_tokens]` input: the per-token weights ([`token_weights`]).
    pub weights: Tensor<'g>,
    /// In `LoraSet::modules()` order.
    pub modules: Vec<ModuleStatsNodes<'g>>,
}

impl<'g> StatsGraph<'g> {
    /// Tensor objects this adds to a context per module (for capacity planning).
    pub const TENSORS_PER_MODULE: usize = 6;

    /// Builds the statistic nodes from the taps of a graph that already holds its backward
    /// pass (`graph.build_backward_expand` called). The nodes are *not* added to `graph`:
    /// add [`StatsGraph::outputs`] to the graph that is run (e.g. as `extra` of
    /// `rebuild_frozen_backward`, or with `build_forward_expand`). They are marked as outputs.
    pub fn build(
        ctx: &'g Context,
        graph: &Graph<'g>,
        taps: &[LoraTap<'g>],
        lora: &LoraSet,
    ) -> Self {
        Self::build_scaled(ctx, graph, taps, lora, 1.0)
    }

    /// [`StatsGraph::build`] for a backward run at a loss scale S: each gradient is multiplied
    /// by `grad_scale` = 1/S first.
    pub fn build_scaled(
        ctx: &'g Context,
        graph: &Graph<'g>,
        taps: &[LoraTap<'g>],
        lora: &LoraSet,
        grad_scale: f32,
    ) -> Self {
        let n_tokens = taps.first().map_or(1, |t| t.u.ne()[1]);
        let weights = ctx.new_f32("grit.token_weights", &[n_tokens]).set_input();
        let mut modules = Vec::with_capacity(taps.len());
        for tap in taps {
            let module = lora
                .modules()
                .iter()
                .position(|m| m.layer == tap.layer && m.target == tap.target)
                .unwrap_or_else(|| {
                    panic!("tap blk.{}.{} has no module in the LoRA set", tap.layer, tap.target)
                });
            let g = graph.grad(tap.u).unwrap_or_else(|| {
                panic!(
                    "no gradient for {:?}: call build_backward_expand before StatsGraph::build",
                    tap.u
                )
            });
            let g = if grad_scale == 1.0 { g } else { ctx.scale(g, grad_scale) };
            assert_eq!(tap.u.ne()[1], n_tokens, "taps with different token counts");
            let name = lora.modules()[module].base_name();
            let sigma_a = weighted_gram(ctx, tap.u, weights)
                .set_name(&format!("{name}.grit_sa"))
                .set_output();
            let sigma_g =
                weighted_gram(ctx, g, weights).set_name(&format!("{name}.grit_sg")).set_output();
            modules.push(ModuleStatsNodes {
                module,
                rank: tap.u.ne()[0] as usize,
                u: tap.u,
                g,
                sigma_a,
                sigma_g,
            });
        }
        modules.sort_by_key(|m| m.module);
        StatsGraph { weights, modules }
    }

    /// Every Σ node (to add to the graph that is run).
    pub fn outputs(&self) -> Vec<Tensor<'g>> {
        self.modules.iter().flat_map(|m| [m.sigma_a, m.sigma_g]).collect()
    }

    /// Writes the per-token weights (after `Backend::compute`).
    pub fn set_weights(
        &self,
        run: &mut Computation<'_, 'g>,
        weights: &[f32],
    ) -> Result<(), GgmlError> {
        run.write_f32(self.weights, weights)
    }

    /// Reads (Σ_a, Σ_g) of every module after a run, r×r row-major each, in module order.
    pub fn read(&self, run: &Computation<'_, 'g>) -> Result<Vec<FactorPair>, GgmlError> {
        self.modules
            .iter()
            .map(|m| Ok((run.read_f32(m.sigma_a)?, run.read_f32(m.sigma_g)?)))
            .collect()
    }
}

/// Per-module statistics accumulated on the host (f64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleKfac {
    /// The adapted base tensor (`blk.3.attn_q.weight`), for checkpoints and reports.
    pub name: String,
    /// Current rank r (the size of the factors).
    pub rank: usize,
    /// Σ_a, r×r row-major.
    pub sigma_a: Vec<f64>,
    /// Σ_g, r×r row-major.
    pub sigma_g: Vec<f64>,
    /// Counted tokens folded into the statistics so far.
    pub n_tokens: u64,
    /// Committed updates (0: no statistics yet).
    pub updates: u64,
    /// P_a = V_a,k·V_a,kᵀ of the last soft reprojection (None: identity, no λ_R penalty).
    pub proj_a: Option<Vec<f64>>,
    /// P_g = V_g,k·V_g,kᵀ of the last soft reprojection (None: identity).
    pub proj_g: Option<Vec<f64>>,
    /// Share of the rank rule's signal that this module's cuts have kept so far (the
    /// product over its cuts; 1 before the first).
    #[serde(default = "one")]
    pub retained: f64,
    /// Token-weighted sums of the micro-batches of the current step (see
    /// [`KfacState::accumulate`]).
    #[serde(default)]
    pending_a: Vec<f64>,
    #[serde(default)]
    pending_g: Vec<f64>,
    #[serde(default)]
    pending_n: u64,
}

fn one() -> f64 {
    1.0
}

impl ModuleKfac {
    pub fn new(name: String, rank: usize) -> Self {
        ModuleKfac {
            name,
            rank,
            sigma_a: vec![0.0; rank * rank],
            sigma_g: vec![0.0; rank * rank],
            n_tokens: 0,
            updates: 0,
            proj_a: None,
            proj_g: None,
            retained: 1.0,
            pending_a: Vec::new(),
            pending_g: Vec::new(),
            pending_n: 0,
        }
    }
    /// Replaces the factors after a change of rank coordinates (reprojection). Token counts
    /// and update numbers are kept (the EMA or mean continues in the new coordinates);
    /// pending micro-batch sums, in the old coordinates, are dropped (reprojections happen
    /// between steps, when none are pending).
    pub(crate) fn set_factors(&mut self, rank: usize, sigma_a: Vec<f64>, sigma_g: Vec<f64>) {
        assert!(sigma_a.len() == rank * rank && sigma_g.len() == rank * rank);
        self.rank = rank;
        self.sigma_a = sigma_a;
        self.sigma_g = sigma_g;
        self.pending_a.clear();
        self.pending_g.clear();
        self.pending_n = 0;
    }
}

/// The host-side K-FAC statistics of every module (checkpointed with serde).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KfacState {
    pub mode: KfacStats,
    /// EMA factor β (with `mode = Ema`).
    pub beta: f64,
    /// In `LoraSet::modules()` order.
    pub modules: Vec<ModuleKfac>,
}

impl KfacState {
    /// Empty statistics for every module of `lora`.
    pub fn new(lora: &LoraSet, mode: KfacStats, beta: f64) -> Self {
        Self::with_modules(lora.modules().iter().map(|m| (m.base_name(), m.rank)), mode, beta)
    }
    /// Empty statistics for modules given as (name, rank).
    pub fn with_modules(
        modules: impl IntoIterator<Item = (String, usize)>,
        mode: KfacStats,
        beta: f64,
    ) -> Self {
        assert!(beta > 0.0 && beta < 1.0, "KfacState: β = {beta} is not in (0, 1)");
        KfacState {
            mode,
            beta,
            modules: modules.into_iter().map(|(n, r)| ModuleKfac::new(n, r)).collect(),
        }
    }

    /// Adds one micro-batch's statistics of module `i`: Σ_a and Σ_g as read from the graph
    /// (means over its `n_tokens` counted tokens), Σ_g multiplied by `g_scale`² (1 for GRIT's
    /// g as is). Micro-batches of one step are combined as a token-weighted mean; call
    /// [`KfacState::commit`] once per step to fold that mean into the statistics.
    pub fn accumulate(
        &mut self,
        i: usize,
        sigma_a: &[f32],
        sigma_g: &[f32],
        n_tokens: usize,
        g_scale: f64,
    ) {
        let m = &mut self.modules[i];
        let rr = m.rank * m.rank;
        assert!(
            sigma_a.len() == rr && sigma_g.len() == rr,
            "accumulate: {} / {} values for rank {}",
            sigma_a.len(),
            sigma_g.len(),
            m.rank
        );
        if n_tokens == 0 {
            return;
        }
        if m.pending_a.len() != rr {
            m.pending_a = vec![0.0; rr];
            m.pending_g = vec![0.0; rr];
            m.pending_n = 0;
        }
        let (n, g2) = (n_tokens as f64, g_scale * g_scale);
        for k in 0..rr {
            m.pending_a[k] += n * sigma_a[k] as f64;
            m.pending_g[k] += n * g2 * sigma_g[k] as f64;
        }
        m.pending_n += n_tokens as u64;
    }

    /// Folds each module's pending step estimate Σ_step (token-weighted mean of its
    /// micro-batches) into its statistics, symmetrized:
    /// - EMA: Σ ← β·Σ + (1 − β)·Σ_step, and Σ ← Σ_step at the first update (no bias
    ///   towards the zero initial value);
    /// - mean: Σ ← (n·Σ + N·Σ_step)/(n + N) over all tokens ever seen.
    ///
    /// Modules without pending tokens are unchanged.
    pub fn commit(&mut self) {
        let (mode, beta) = (self.mode, self.beta);
        for m in &mut self.modules {
            if m.pending_n == 0 {
                continue;
            }
            let r = m.rank;
            let n_new = m.pending_n as f64;
            let step_a: Vec<f64> = m.pending_a.iter().map(|x| x / n_new).collect();
            let step_g: Vec<f64> = m.pending_g.iter().map(|x| x / n_new).collect();
            let (wa, wb) = match (mode, m.updates) {
                (_, 0) => (0.0, 1.0),
                (KfacStats::Ema, _) => (beta, 1.0 - beta),
                (KfacStats::Mean, _) => {
                    let n_old = m.n_tokens as f64;
                    (n_old / (n_old + n_new), n_new / (n_old + n_new))
                }
            };
            for k in 0..r * r {
                m.sigma_a[k] = wa * m.sigma_a[k] + wb * step_a[k];
                m.sigma_g[k] = wa * m.sigma_g[k] + wb * step_g[k];
            }
            m.sigma_a = super::linalg::symmetrize(&m.sigma_a, r);
            m.sigma_g = super::linalg::symmetrize(&m.sigma_g, r);
            m.n_tokens += m.pending_n;
            m.updates += 1;
            m.pending_a.clear();
            m.pending_g.clear();
            m.pending_n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_weights_are_a_mean_over_distinct_rows() {
        let (w, n) = token_weights(6, &[1, 2, 2, 5]);
        assert_eq!(n, 3);
        assert_eq!(w, vec![0.0, 1.0 / 3.0, 1.0 / 3.0, 0.0, 0.0, 1.0 / 3.0]);
        let (w, n) = token_weights(3, &[]);
        assert_eq!((w, n), (vec![0.0; 3], 0));
    }

    #[test]
    fn ema_and_mean_accumulation() {
        let s = |x: f32| vec![x, 0.0, 0.0, x];
        // EMA: first update takes the step value; then β-mixing; micro-batches token-weighted.
        let mut k = KfacState::with_modules([("m".to_string(), 2)], KfacStats::Ema, 0.9);
        k.accumulate(0, &s(1.0), &s(2.0), 10, 1.0);
        k.commit();
        assert_eq!(k.modules[0].sigma_a, vec![1.0, 0.0, 0.0, 1.0]);
        assert_eq!(k.modules[0].sigma_g, vec![2.0, 0.0, 0.0, 2.0]);
        k.accumulate(0, &s(3.0), &s(0.0), 10, 1.0);
        k.accumulate(0, &s(6.0), &s(0.0), 20, 1.0); // step mean = (30 + 120)/30 = 5
        k.commit();
        assert!((k.modules[0].sigma_a[0] - (0.9 * 1.0 + 0.1 * 5.0)).abs() < 1e-12);
        assert!((k.modules[0].sigma_g[3] - 0.9 * 2.0).abs() < 1e-12);
        assert_eq!((k.modules[0].n_tokens, k.modules[0].updates), (40, 2));
        k.commit(); // nothing pending: unchanged
        assert_eq!(k.modules[0].updates, 2);

        // Mean over all tokens ever seen; g_scale squares into Σ_g.
        let mut k = KfacState::with_modules([("m".to_string(), 2)], KfacStats::Mean, 0.9);
        k.accumulate(0, &s(1.0), &s(1.0), 10, 2.0);
        k.commit();
        k.accumulate(0, &s(4.0), &s(1.0), 30, 2.0);
        k.commit();
        assert!((k.modules[0].sigma_a[0] - (10.0 * 1.0 + 30.0 * 4.0) / 40.0).abs() < 1e-12);
        assert!((k.modules[0].sigma_g[0] - 4.0).abs() < 1e-12);
        let j = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<KfacState>(&j).unwrap(), k);
    }
}
