//! The compute core of a training step, all in ggml graphs on the chosen backend:
//! - the *micro-step graph*: forward with LoRA, loss over the trained rows, ggml's backward
//!   with the frozen-matmul input gradients rewritten ([`crate::ggml::rebuild_frozen_backward`]),
//!   and each parameter's gradient added into a persistent accumulator;
//! - the *optimizer graph*: mean over micro-batches, global-norm clipping computed in the graph,
//!   and ggml's AdamW step, writing parameters and moments in place.
//!
//! Only scalars (loss, gradient norm) come back to the host each step.

use crate::ggml::{Backend, Capacity, Context, Graph, Tensor, TensorId};
use crate::model::{Batch, GraphOptions, LoraSet, ModelError, Outputs, TrainGraph, Weights};

use super::copies::FrozenCopies;

/// Adam moments and gradient accumulators of every LoRA parameter (F32, persistent).
pub struct OptState {
    ctx: Context,
    /// Per module: (m_a, v_a, acc_a, m_b, v_b, acc_b).
    slots: Vec<[TensorId; 6]>,
    bytes: usize,
}

/// Names of the optimizer-state tensors of module `base` in checkpoints.
pub const SLOT_NAMES: [&str; 6] =
    ["adam_m_a", "adam_v_a", "grad_acc_a", "adam_m_b", "adam_v_b", "grad_acc_b"];

impl OptState {
    pub fn new(lora: &LoraSet, backend: &Backend) -> Result<Self, ModelError> {
        let ctx = Context::new(Capacity::tensors(6 * lora.modules().len() + 8))?;
        let mut slots = Vec::new();
        for m in lora.modules() {
            let a = [m.d_in as i64, m.rank as i64];
            let b = [m.rank as i64, m.d_out as i64];
            let base = m.base_name();
            let mk =
                |k: usize, ne: &[i64]| ctx.new_f32(&format!("{base}.{}", SLOT_NAMES[k]), ne).id();
            slots.push([mk(0, &a), mk(1, &a), mk(2, &a), mk(3, &b), mk(4, &b), mk(5, &b)]);
        }
        let bytes = ctx.allocate(backend.param_buffer_type())?;
        let s = OptState { ctx, slots, bytes };
        s.zero_all()?;
        Ok(s)
    }

    pub fn tensor(&self, module: usize, slot: usize) -> Tensor<'_> {
        self.ctx.tensor(self.slots[module][slot])
    }
    pub fn read(&self, module: usize, slot: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.ctx.read_f32(self.tensor(module, slot))?)
    }
    pub fn write(&self, module: usize, slot: usize, data: &[f32]) -> Result<(), ModelError> {
        Ok(self.ctx.write_f32(self.tensor(module, slot), data)?)
    }
    /// Zeroes every moment and accumulator (a fresh optimizer).
    pub fn zero_all(&self) -> Result<(), ModelError> {
        for s in &self.slots {
            for &id in s {
                self.ctx.zero(self.ctx.tensor(id))?;
            }
        }
        Ok(())
    }
    /// Zeroes the gradient accumulators (after an optimizer step).
    pub fn zero_grads(&self) -> Result<(), ModelError> {
        for s in &self.slots {
            self.ctx.zero(self.ctx.tensor(s[2]))?;
            self.ctx.zero(self.ctx.tensor(s[5]))?;
        }
        Ok(())
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The micro-step graph for batches of one shape (tokens, trained rows).
pub struct StepGraph<'g> {
    pub train: TrainGraph<'g>,
    /// The graph actually run (backward rewritten, accumulation appended).
    pub graph: Graph<'g>,
    /// ∂L/∂L: set it (and the regularizer's seed) to [`StepGraph::loss_scale`] before each
    /// run ([`StepGraph::set_seeds`]).
    pub loss_grad: Tensor<'g>,
    /// The loss scale of this graph (see [`loss_scale`]): the accumulators receive S × ∂L/∂θ.
    pub loss_scale: f32,
    /// Frozen-matmul backward nodes rewritten (persistent copies, transient copies).
    pub rewritten: (usize, usize),
    /// GRIT: the regularizer loss (None for LoRA, or when λ_K = λ_R = 0) and its ∂/∂ seed.
    pub reg: Option<(crate::grit::RegGraph<'g>, Tensor<'g>)>,
    /// GRIT: the K-FAC statistic nodes.
    pub stats: Option<crate::grit::StatsGraph<'g>>,
    /// Small nodes kept allocated (count, bytes; see `Graph::keep_small_nodes`).
    pub kept: (usize, usize),
    /// Forward nodes recomputed in the backward (0 without recomputation).
    pub recomputed: usize,
    /// Forward matmuls switched to a faster copy or an exact split of their weight.
    pub forward_rewritten: usize,
}

/// The factor the backward pass runs at: ∂(S·L)/∂θ instead of ∂L/∂θ, with S = 4 × the most
/// rows a micro-batch can train (batch size × max sequence length: 1024 at the defaults),
/// one value per run. GRIT's statistics unscale in the step graph; the accumulated
/// gradients are unscaled by the optimizer graph (dividing there, not per micro-step, adds no
/// parameter-sized intermediate tensors to the step graph: those fragmented ggml's allocator).
///
/// The loss is a mean over rows, so the gradients flowing back through the frozen matmuls
/// are O(1/rows) per token — down to 1e-7 and below. The frozen backward multiplies them in
/// reduced precision (converted to F16, or to Q8_0 blocks whose scale is an F16), where such
/// values are subnormal or flush to zero: with `--weight-copies q8_0` unscaled, 20 steps on
/// Hamlet moved the Macbeth eval loss from 4.018 to 4.042 (worse than no training), scaled
/// 3.905 — like f16 (3.900) and exact f32 copies (3.910). S = 4·rows keeps ∂(S·L)/∂logits
/// within ±4 and far below F16's 65504 anywhere downstream.
pub fn loss_scale(max_rows: usize) -> f32 {
    4.0 * max_rows.max(1) as f32
}

/// What a step graph contains besides LoRA's forward and backward.
#[derive(Debug, Clone, Copy)]
pub struct StepOptions<'c> {
    /// The loss scale S the backward runs at (see [`loss_scale`]); the accumulated gradients
    /// are S × the true ones until [`OptGraph::build`] divides them. Default 1.
    pub loss_scale: f32,
    /// GRIT: its regularizer (when λ_K or λ_R > 0) and the K-FAC statistic nodes.
    pub grit: Option<&'c crate::grit::GritConfig>,
    /// LoRA dropout mask inputs.
    pub dropout: bool,
    /// Recompute each transformer block's activations in the backward from the residual
    /// stream instead of keeping them (less memory, one more forward of the blocks).
    pub recompute: bool,
    /// On the CPU backend, run attention as the fused kernels of `ggml::attention` (not with
    /// `recompute`). Default on; off gives ggml's own ops, e.g. to compare other rewrites
    /// bit for bit.
    pub fuse_attention: bool,
}

impl Default for StepOptions<'_> {
    fn default() -> Self {
        StepOptions {
            loss_scale: 1.0,
            grit: None,
            dropout: false,
            recompute: false,
            fuse_attention: true,
        }
    }
}

/// The size up to which step-graph nodes stay allocated: the largest rank-dependent tensor —
/// f32 [r_max, n_tokens] (the rank-space activations and their gradients) or f32
/// [d_max, r_max] (a factor's gradient before it is accumulated) — or the block sums of the
/// exact Q4_1 split, f32 [d_in/32, n_tokens], whichever is larger. They come in many sizes
/// and, freed between large activations, fragment ggml's allocator past its 256 free blocks
/// (seen after GRIT cuts, with the split plus recomputation at uniform rank 16, and on
/// Vulkan with GRIT's first step at 8 tokens, where the factor gradients are the size of
/// the activations). Measured on the default model at 256 tokens on the CPU: the rank-sized
/// threshold added 4 MiB of compute buffer for LoRA, 7 MiB for GRIT; the gradient-sized
/// one adds nothing for LoRA r16 (427 MiB) and 39 MiB for GRIT (490 → 529 MiB).
pub fn small_node_bytes(weights: &Weights, lora: &LoraSet, n_tokens: usize) -> usize {
    let r_max = lora.modules().iter().map(|m| m.rank).max().unwrap_or(0);
    let d_max = lora.modules().iter().map(|m| m.d_in.max(m.d_out)).max().unwrap_or(0);
    let hp = &weights.hparams;
    let blocks = hp.n_ff.max(hp.n_embd) / 32;
    (4 * r_max.max(blocks) * n_tokens).max(4 * r_max * d_max)
}

/// Context capacity for a step graph.
pub fn step_capacity(weights: &Weights, lora: &LoraSet) -> Capacity {
    let base = TrainGraph::capacity(weights, Some(lora), true);
    // Accumulation adds 2 ops per parameter; transient copies 3 tensors per frozen weight.
    let extra = 4 * 2 * lora.modules().len() + 4 * (7 * weights.hparams.n_layer + 1) + 64;
    // Transient copies of large weights are made in chunks (8 tensors each).
    let chunks: i64 = crate::train::copies::frozen_matmul_weights(weights)
        .iter()
        .map(|t| {
            let ne = t.ne();
            crate::ggml::transient_chunks(ne[0], ne[1])
        })
        .sum();
    let extra = extra + 8 * chunks as usize;
    // Exact Q4_1 splits in the forward: up to 8 tensors per frozen weight (made in the graph
    // without copies).
    let extra = extra + 8 * (7 * weights.hparams.n_layer + 1);
    // Recomputation duplicates at most every forward node.
    let extra = extra + TrainGraph::capacity(weights, Some(lora), false).graph_nodes;
    // GRIT: regularizer and statistics nodes (and their gradients).
    let extra = extra
        + 2 * (crate::grit::RegGraph::TENSORS_PER_MODULE
            + crate::grit::StatsGraph::TENSORS_PER_MODULE
            + 4)
            * lora.modules().len();
    Capacity::graph(base.graph_nodes + extra, base.graph_nodes + extra, true)
}

impl<'g> StepGraph<'g> {
    /// Builds forward + backward for `n_tokens` tokens and `n_rows` trained rows, with the
    /// options of [`StepOptions`] (`StepOptions::default()`: plain LoRA, no dropout).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        ctx: &'g Context,
        weights: &'g Weights,
        lora: &'g LoraSet,
        copies: &'g FrozenCopies,
        opt: &'g OptState,
        n_tokens: usize,
        n_rows: usize,
        o: StepOptions<'_>,
    ) -> Self {
        let (grit, dropout) = (o.grit, o.dropout);
        lora.mark_params();
        let mut train = TrainGraph::build(
            ctx,
            weights,
            Some(lora),
            n_tokens,
            GraphOptions { outputs: Outputs::Rows(n_rows), loss: true, dropout, backward: true },
        );
        let loss = train.loss.expect("training graph has a loss");
        let reg = grit.filter(|g| g.regularized()).map(|_| {
            let reg = crate::grit::RegGraph::build(ctx, lora);
            reg.loss.set_loss();
            train.graph.build_forward_expand(reg.loss);
            reg
        });
        train.build_backward(ctx);
        let loss_grad =
            train.graph.grad_acc(loss).expect("the loss has a gradient accumulator").set_input();
        let reg = reg.map(|r| {
            let seed = train
                .graph
                .grad_acc(r.loss)
                .expect("the regularizer has a gradient accumulator")
                .set_input();
            (r, seed)
        });
        let scale = o.loss_scale;
        let stats = grit.map(|_| {
            crate::grit::StatsGraph::build_scaled(ctx, &train.graph, &train.taps, lora, 1.0 / scale)
        });
        // Accumulate each parameter's gradient into its persistent slot: acc ← acc + ∂L/∂θ.
        let mut extra = vec![loss];
        if let Some((r, _)) = &reg {
            extra.push(r.loss);
        }
        if let Some(s) = &stats {
            extra.extend(s.outputs());
        }
        for (i, m) in lora.modules().iter().enumerate() {
            for (param, slot) in [(lora.a(m), 2usize), (lora.b(m), 5usize)] {
                let g = train
                    .graph
                    .grad(param)
                    .unwrap_or_else(|| panic!("no gradient for {}", param.name()));
                let acc = opt.tensor(i, slot);
                extra.push(ctx.cpy(ctx.add(acc, g), acc));
            }
        }
        let mut map = copies.map(weights);
        map.fuse_attention = o.fuse_attention;
        map.label_ids = train.labels.zip(train.label_ids);
        // Recomputation: only the residual stream between blocks stays allocated from the
        // forward to the backward; each block's intermediates are recomputed from it.
        let (graph, rw) = crate::ggml::rebuild_backward(
            ctx,
            &train.graph,
            &map,
            &extra,
            o.recompute.then_some(&train.blocks[..]),
        );
        let recomputed = rw.recomputed;
        // The adapter's own tensors (rank-space activations and their gradients, ∇A, ∇B, K-FAC
        // products) come in as many sizes as there are ranks; kept allocated, they cannot
        // fragment ggml's allocator (see `Graph::keep_small_nodes`).
        // With recomputation and the CPU's fused attention they go first in the buffer.
        let at_start = o.recompute && map.cpu_kernels && o.fuse_attention;
        let kept = graph.keep_small_nodes(small_node_bytes(weights, lora, n_tokens), at_start);
        StepGraph {
            train,
            graph,
            loss_grad,
            loss_scale: scale,
            rewritten: (rw.persistent, rw.transient),
            reg,
            stats,
            kept,
            recomputed,
            forward_rewritten: rw.forward,
        }
    }
}

impl<'g> StepGraph<'g> {
    /// Seeds the backward: ∂(S·L)/∂L = S for the loss and GRIT's regularizer.
    pub fn set_seeds(
        &self,
        run: &mut crate::ggml::Computation<'_, 'g>,
    ) -> Result<(), crate::ggml::GgmlError> {
        run.write_f32(self.loss_grad, &[self.loss_scale])?;
        if let Some((_, seed)) = &self.reg {
            run.write_f32(*seed, &[self.loss_scale])?;
        }
        Ok(())
    }
}

/// Hyper-parameters of one optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count for the bias corrections.
    pub t: u64,
}

impl AdamStep {
    /// The 7 values of ggml's `opt_step_adamw` parameter tensor.
    pub fn params(&self) -> [f32; 7] {
        let b1h = 1.0 / (1.0 - (self.beta1 as f64).powi(self.t as i32));
        let b2h = 1.0 / (1.0 - (self.beta2 as f64).powi(self.t as i32));
        [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, b1h as f32, b2h as f32]
    }
}

/// The optimizer graph: g = acc / n_micro, norm = ‖g‖₂ over all parameters,
/// g ← g · min(1, max_norm / norm), AdamW.
pub struct OptGraph<'g> {
    pub graph: Graph<'g>,
    /// F32 [7]: AdamW parameters.
    pub adamw: Tensor<'g>,
    /// F32 [1]: max_norm (clipping; unused when clipping is off).
    pub max_norm: Tensor<'g>,
    /// F32 [1]: the global gradient norm before clipping.
    pub norm: Tensor<'g>,
    pub clip: bool,
    /// GRIT: the per-module preconditioner inputs (applied before the norm).
    pub precond: Option<crate::grit::PrecondInputs<'g>>,
}

/// What the optimizer graph does with the accumulated gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptOptions {
    /// Micro-batches accumulated per step (the mean gradient divides by it).
    pub n_micro: usize,
    /// Global-norm clipping threshold; 0 turns clipping off. Baked into the graph and also fed
    /// as the `max_norm` input each step.
    pub max_grad_norm: f32,
    /// GRIT: each module's mean gradients are preconditioned before the norm, the clipping and
    /// AdamW.
    pub precondition: bool,
    /// GRIT, with `precondition`: each preconditioned gradient is rescaled to the Frobenius
    /// norm of the raw one (per module and per factor, A and B): the preconditioner sets the
    /// direction and the raw gradient the size ("grafting", Agarwal et al. 2020). Without it,
    /// a preconditioner that changes the gradients' size at its first use (step 11 by default)
    /// leaves AdamW's second moment, which remembers ~1/(1 − β₂) = 1000 steps, matched to the
    /// old size: the effective learning rate jumps or drops by that factor for hundreds of
    /// steps.
    pub graft: bool,
    /// The loss scale the accumulators were filled at (see [`StepOptions::loss_scale`]): the
    /// mean gradient is acc / (n_micro · S).
    pub loss_scale: f32,
}

impl Default for OptOptions {
    fn default() -> Self {
        OptOptions {
            n_micro: 1,
            max_grad_norm: 1.0,
            precondition: false,
            graft: false,
            loss_scale: 1.0,
        }
    }
}

pub fn opt_capacity(lora: &LoraSet) -> Capacity {
    let n = (16 * 2 + 2 * crate::grit::PrecondInputs::TENSORS_PER_MODULE + 2 * 8)
        * lora.modules().len()
        + 64;
    Capacity::graph(n, n, false)
}

impl<'g> OptGraph<'g> {
    /// The optimizer step over `lora`'s accumulated gradients in `opt`, as `o` says.
    pub fn build(ctx: &'g Context, lora: &'g LoraSet, opt: &'g OptState, o: &OptOptions) -> Self {
        let OptOptions { n_micro, max_grad_norm, precondition, graft, loss_scale } = *o;
        let clip = max_grad_norm > 0.0;
        let cap = ctx.capacity();
        let mut graph = ctx.new_graph(cap.graph_nodes, false);
        let adamw = ctx.new_f32("adamw_params", &[7]).set_input();
        let max_norm = ctx.new_f32("max_grad_norm", &[1]).set_input();
        let inv = 1.0 / (n_micro as f32 * loss_scale);
        let mut grads = Vec::new();
        let mut sumsq: Option<Tensor<'g>> = None;
        let precond = precondition.then(|| crate::grit::PrecondInputs::new(ctx, lora));
        for (i, m) in lora.modules().iter().enumerate() {
            let mean = |k: usize| {
                let acc = opt.tensor(i, k + 2);
                if inv == 1.0 {
                    acc
                } else {
                    ctx.scale(acc, inv)
                }
            };
            let (ga, gb) = (mean(0), mean(3));
            let (ga, gb) = match &precond {
                Some(p) => {
                    let (pa, pb) = crate::grit::precondition::precondition(
                        ctx,
                        ga,
                        gb,
                        p.modules[i].0,
                        p.modules[i].1,
                    );
                    if graft {
                        // g' = P·g · ‖g‖ / ‖P·g‖ (0 stays 0).
                        let graft = |raw: Tensor<'g>, pre: Tensor<'g>| {
                            let n_raw = ctx.sqrt(ctx.sum(ctx.sqr(raw))); // [1]
                            let n_pre = ctx.sqrt(ctx.sum(ctx.sqr(pre))); // [1]
                            ctx.mul(pre, ctx.div(n_raw, ctx.clamp(n_pre, 1e-30, f32::MAX)))
                        };
                        (graft(ga, pa), graft(gb, pb))
                    } else {
                        (pa, pb)
                    }
                }
                None => (ga, gb),
            };
            for (param, k, g) in [(lora.a(m), 0usize, ga), (lora.b(m), 3usize, gb)] {
                let s = ctx.sum(ctx.sqr(g)); // [1]
                sumsq = Some(match sumsq {
                    Some(t) => ctx.add(t, s),
                    None => s,
                });
                grads.push((param, g, opt.tensor(i, k), opt.tensor(i, k + 1)));
            }
        }
        let norm =
            ctx.sqrt(sumsq.expect("at least one parameter")).set_name("grad_norm").set_output(); // [1]
                                                                                                 // factor = max_norm / max(norm, max_norm) = min(1, max_norm / norm)
        let factor = clip.then(|| ctx.div(max_norm, ctx.clamp(norm, max_grad_norm, f32::MAX))); // [1]
        graph.build_forward_expand(norm);
        for (param, g, m, v) in grads {
            let g = match factor {
                Some(f) => ctx.mul(g, f),
                None => g,
            };
            graph.build_forward_expand(ctx.opt_step_adamw(param, g, m, v, adamw));
        }
        OptGraph { graph, adamw, max_norm, norm, clip, precond }
    }
}

/// One forward-only evaluation graph (loss over the trained rows).
pub fn eval_capacity(weights: &Weights, lora: &LoraSet) -> Capacity {
    TrainGraph::capacity(weights, Some(lora), false)
}

/// Runs the eval graph over `batch`; returns the mean loss over its rows.
pub fn eval_batch(
    backend: &mut Backend,
    g: &TrainGraph<'_>,
    batch: &Batch,
) -> Result<f32, ModelError> {
    let mut run = backend.compute(&g.graph)?;
    g.set_inputs(&mut run, batch)?;
    run.run()?;
    Ok(run.read_f32(g.loss.expect("eval graph has a loss"))?[0])
}

/// Names the part of a training step a graph node belongs to, for `grit train --profile`.
pub fn categorize(n: &crate::ggml::profile::NodeInfo) -> String {
    let frozen = |s: &str| {
        (s.ends_with(".weight")
            || s.ends_with(".weight.q8")
            || s.ends_with(".weight.q4_0")
            || s.ends_with(".weight.amx")
            || s.ends_with(".q4_1_offsets"))
            && !s.contains("lora")
            && !s.contains("norm")
    };
    let output = |s: &str| s.starts_with("token_embd.weight") || s.starts_with("output.weight");
    let lora = |s: &str| s.contains("lora");
    let (s0, s1) = (n.src0_name.as_str(), n.src1_name.as_str());
    let transient = |s: &str| s.ends_with(".T (transient)");
    // A persistent transposed copy, or a view of one (chunks of the inner dimension).
    let copy_t = |s: &str| s.ends_with(".T") || s.ends_with(".T (view)");
    match n.op.as_str() {
        "MUL_MAT" if transient(s0) && output(s0) => "output layer: backward".into(),
        "MUL_MAT" if transient(s0) => "frozen matmuls: backward (transient)".into(),
        "CUSTOM" if transient(&n.name) || n.name.ends_with(".q4_0") => {
            "transient dequantization".into()
        }
        "MUL_MAT" if copy_t(s0) && output(s0) => "output layer: backward".into(),
        "MUL_MAT" if copy_t(s0) => "frozen matmuls: backward (copies)".into(),
        "MUL_MAT" if output(s0) => "output layer: forward".into(),
        "MUL_MAT" if frozen(s0) => "frozen matmuls: forward".into(),
        "MUL_MAT" if n.name.is_empty() || s0.contains("(copy") => {
            "frozen matmuls: backward (transient)".into()
        }
        "MUL_MAT" | "OUT_PROD" if lora(s0) || lora(s1) || lora(&n.name) => "LoRA matmuls".into(),
        "MUL_MAT" if s0.contains(".grit_p") || s1.contains(".grit_p") => {
            "GRIT preconditioning".into()
        }
        "OUT_PROD" if s0.ends_with(".q4_1_offsets") => "frozen matmuls: forward".into(),
        "OUT_PROD" if frozen(s0) || output(s0) => {
            "frozen matmuls: backward (stock out_prod)".into()
        }
        "MUL_MAT" | "OUT_PROD" => "attention matmuls".into(),
        "SOFT_MAX" | "SOFT_MAX_BACK" => "attention softmax".into(),
        "CROSS_ENTROPY_LOSS" | "CROSS_ENTROPY_LOSS_BACK" => "loss".into(),
        "OPT_STEP_ADAMW" | "SQRT" | "CLAMP" | "DIV" => "optimizer".into(),
        "CPY" if frozen(s0) || output(s0) => "transient dequantization".into(),
        "CUSTOM" if n.name.starts_with("attn_fused") => "attention (fused CPU kernels)".into(),
        "CUSTOM" if s0.ends_with(".q4_1_offsets") => "frozen matmuls: forward".into(),
        "CUSTOM" if lora(s0) || lora(s1) || n.name.ends_with("(tiled)") => "LoRA matmuls".into(),
        "CUSTOM" | "MAP_CUSTOM1" => "transposes (tiled CPU copies)".into(),
        op => format!("other: {}", op.to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::categorize;
    use crate::ggml::profile::NodeInfo;

    fn node(op: &str, name: &str, src0: &str, src1: &str) -> NodeInfo {
        let s = |x: &str| x.to_string();
        NodeInfo { op: s(op), name: s(name), src0_name: s(src0), src1_name: s(src1), ne: [1; 4] }
    }

    #[test]
    fn the_profile_names_each_kind_of_matmul() {
        let cases = [
            (node("MUL_MAT", "", "blk.3.ffn_up.weight.amx", "x"), "frozen matmuls: forward"),
            (node("MUL_MAT", "", "blk.3.ffn_up.weight.q4_0", "x"), "frozen matmuls: forward"),
            (
                node("MUL_MAT", "", "blk.3.ffn_up.weight.T", "g"),
                "frozen matmuls: backward (copies)",
            ),
            (node("MUL_MAT", "", "output.weight.amx", "x"), "output layer: forward"),
            (node("MUL_MAT", "", "output.weight.T", "g"), "output layer: backward"),
            (node("MUL_MAT", "", "output.weight.T (view)", "g (view)"), "output layer: backward"),
            (node("MUL_MAT", "node_5", "blk.3.ffn_up.lora_a", "x"), "LoRA matmuls"),
            (node("MUL_MAT", "kq", "k", "q"), "attention matmuls"),
            (node("MUL_MAT", "node_6", "blk.3.ffn_up.grit_pb", "g"), "GRIT preconditioning"),
            (node("CUSTOM", "node_7", "blk.3.ffn_up.lora_b (T)", "u"), "LoRA matmuls"),
            (node("CUSTOM", "node_9 (tiled)", "node_4", "node_5"), "LoRA matmuls"),
            (node("CUSTOM", "node_8", "blk.3.ffn_up.q4_1_offsets", "s"), "frozen matmuls: forward"),
            (node("MAP_CUSTOM1", "x (T)", "x", ""), "transposes (tiled CPU copies)"),
        ];
        for (n, want) in cases {
            assert_eq!(categorize(&n), want, "{n:?}");
        }
    }
}
