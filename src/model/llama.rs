//! The LLaMA / Qwen2 / Qwen3 training forward graph with LoRA, mirroring llama.cpp's graphs
//! (src/models/llama.cpp, qwen2.cpp, qwen3.cpp) with non-flash attention and no KV cache.

use crate::ggml::passes::geglu::{self, Geglu};
use crate::ggml::{Capacity, Computation, Context, Graph, Tensor};

use super::hparams::{Activation, LlamaHparams};
use super::lora::{LoraSet, Target};
use super::weights::{GateUp, Layer, Qkv, Weights};
use super::ModelError;

/// Which rows' logits the graph produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// Every token (parity tests, evaluation of whole windows).
    All,
    /// `n` rows chosen at run time by [`Batch::rows`] (the trained tokens).
    Rows(usize),
}

/// What a [`TrainGraph`] computes besides the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphOptions {
    /// Which rows' logits the graph produces.
    pub outputs: Outputs,
    /// The labels input and the mean cross-entropy loss.
    pub loss: bool,
    /// LoRA dropout mask inputs.
    pub dropout: bool,
    /// The graph will be differentiated ([`TrainGraph::build_backward`]): ops that lack a
    /// backward in ggml (GELU) are built from ops that have one. Such a graph computes the
    /// exact function until `build_backward` restores ggml's op for the forward.
    pub backward: bool,
}

impl GraphOptions {
    /// Logits only (evaluation, parity).
    pub fn logits(outputs: Outputs) -> Self {
        GraphOptions { outputs, loss: false, dropout: false, backward: false }
    }
    /// Logits and the loss (training without dropout, in-training eval).
    pub fn loss(outputs: Outputs) -> Self {
        GraphOptions { outputs, loss: true, dropout: false, backward: false }
    }
    /// These options for a graph that will be differentiated (see [`GraphOptions::backward`]).
    pub fn for_backward(self) -> Self {
        GraphOptions { backward: true, ..self }
    }
}

/// The LoRA input and rank-space activation of one adapted module: `x` [d_in, n_tokens] and
/// `u = A·x` [r, n_tokens] (before the scale). GRIT reads these and ∂L/∂u.
#[derive(Debug, Clone, Copy)]
pub struct LoraTap<'g> {
    pub layer: usize,
    pub target: Target,
    pub x: Tensor<'g>,
    pub u: Tensor<'g>,
}

/// The per-step inputs of a [`TrainGraph`].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids [n_tokens].
    pub tokens: Vec<i32>,
    /// RoPE positions [n_tokens] (restart at 0 for each packed sequence).
    pub positions: Vec<i32>,
    /// Additive attention mask, n_tokens × n_tokens, row j = query token j, column i = key
    /// token i: 0 where j may attend to i, −∞ elsewhere (ggml shape [n_kv, n_tokens]).
    pub mask: Vec<f32>,
    /// Rows (token indices) whose logits are produced, for `Outputs::Rows`.
    pub rows: Vec<i32>,
    /// The target token of each row (the next token), for the loss.
    pub labels: Vec<i32>,
}

/// The causal mask of one sequence of `n` tokens (see [`Batch::mask`]).
pub fn causal_mask(n: usize) -> Vec<f32> {
    let mut m = vec![f32::NEG_INFINITY; n * n];
    for j in 0..n {
        m[j * n..j * n + j + 1].fill(0.0);
    }
    m
}

impl Batch {
    /// One causal sequence: positions 0..n, logits for `rows`, which predict `labels`.
    pub fn causal(tokens: &[i32], rows: &[i32], labels: &[i32]) -> Result<Self, ModelError> {
        let n = tokens.len();
        let b = Batch {
            tokens: tokens.to_vec(),
            positions: (0..n as i32).collect(),
            mask: causal_mask(n),
            rows: rows.to_vec(),
            labels: labels.to_vec(),
        };
        b.validate(None)?;
        Ok(b)
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }
    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }

    /// Checks lengths and index ranges (token and label ids against `n_vocab` when given).
    pub fn validate(&self, n_vocab: Option<usize>) -> Result<(), ModelError> {
        let n = self.tokens.len();
        let err = |m: String| Err(ModelError::Batch(m));
        if n == 0 {
            return err("no tokens".into());
        }
        if self.positions.len() != n {
            return err(format!("{} positions for {n} tokens", self.positions.len()));
        }
        if self.mask.len() != n * n {
            return err(format!("mask has {} values, expected {n}×{n}", self.mask.len()));
        }
        if let Some(j) =
            (0..n).find(|&j| self.mask[j * n..(j + 1) * n].iter().all(|&x| x == f32::NEG_INFINITY))
        {
            return err(format!("mask row {j} masks every token (its softmax would be undefined)"));
        }
        if !self.labels.is_empty() && self.labels.len() != self.rows.len() {
            return err(format!("{} labels for {} rows", self.labels.len(), self.rows.len()));
        }
        if let Some(r) = self.rows.iter().find(|&&r| r < 0 || r as usize >= n) {
            return err(format!("row {r} is outside the {n} tokens"));
        }
        if let Some(v) = n_vocab {
            if let Some(t) =
                self.tokens.iter().chain(&self.labels).find(|&&t| t < 0 || t as usize >= v)
            {
                return err(format!("token id {t} is outside the vocabulary of {v}"));
            }
        }
        Ok(())
    }

    /// The mask of a sliding-window layer: [`Batch::mask`] where the query's position is
    /// less than `window` past the key's (llama.cpp's standard sliding window), −∞ elsewhere.
    pub fn sliding_window_mask(&self, window: usize) -> Result<Vec<f32>, ModelError> {
        let n = self.tokens.len();
        let mut m = self.mask.clone();
        for (j, row) in m.chunks_mut(n).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                if (self.positions[j] as i64 - self.positions[i] as i64) >= window as i64 {
                    *v = f32::NEG_INFINITY;
                }
            }
            if row.iter().all(|&x| x == f32::NEG_INFINITY) {
                return Err(ModelError::Batch(format!(
                    "mask row {j} masks every token within the sliding window of {window}"
                )));
            }
        }
        Ok(m)
    }

    /// One-hot rows of `labels` over `n_vocab` classes ([n_vocab, n_rows] in ggml order).
    pub fn one_hot(&self, n_vocab: usize) -> Vec<f32> {
        let mut y = vec![0.0; n_vocab * self.labels.len()];
        for (r, &t) in self.labels.iter().enumerate() {
            y[r * n_vocab + t as usize] = 1.0;
        }
        y
    }
}

/// The training forward graph: inputs, logits of the selected rows, the loss, LoRA taps.
pub struct TrainGraph<'g> {
    pub graph: Graph<'g>,
    pub n_tokens: usize,
    pub outputs: Outputs,
    pub n_vocab: usize,
    /// I32 [n_tokens].
    pub tokens: Tensor<'g>,
    /// I32 [n_tokens].
    pub positions: Tensor<'g>,
    /// F32 [n_tokens (kv), n_tokens].
    pub mask: Tensor<'g>,
    /// F32 [n_tokens (kv), n_tokens]: the mask of the sliding-window layers (models with
    /// them), filled from [`Batch::mask`] and the positions by [`TrainGraph::set_inputs`].
    pub mask_swa: Option<(Tensor<'g>, usize)>,
    /// I32 [n_rows] (with `Outputs::Rows`).
    pub rows: Option<Tensor<'g>>,
    /// F32 one-hot [n_vocab, n_rows] (with a loss).
    pub labels: Option<Tensor<'g>>,
    /// I32 [n_rows], the labels' ids (with a loss): what the loss reads instead of the one-hot
    /// matrix once a CPU graph pass rewrote it (`FrozenMap::label_ids`).
    pub label_ids: Option<Tensor<'g>>,
    /// F32 [n_vocab, n_rows] (n_rows = n_tokens with `Outputs::All`).
    pub logits: Tensor<'g>,
    /// F32 [1]: mean cross entropy over the rows.
    pub loss: Option<Tensor<'g>>,
    /// One per adapted module, in graph order.
    pub taps: Vec<LoraTap<'g>>,
    /// The residual stream at block boundaries: the embeddings, then each block's output
    /// ([n_embd, n_tokens] each, n_layer + 1 of them).
    pub blocks: Vec<Tensor<'g>>,
    /// LoRA dropout masks (built with [`GraphOptions::dropout`]): F32 [d_in, n_tokens]
    /// inputs, each 0 or 1/(1 − p), one per distinct adapter input of a layer.
    pub dropout: Vec<DropoutMask<'g>>,
    /// GEGLUs built for the backward, restored to ggml's op by [`TrainGraph::build_backward`].
    geglu: Vec<Geglu<'g>>,
    backward: bool,
}

/// What the forward records besides its result.
struct Record<'g> {
    taps: Vec<LoraTap<'g>>,
    /// Dropout masks (None: no dropout).
    masks: Option<Vec<DropoutMask<'g>>>,
    blocks: Vec<Tensor<'g>>,
    /// GEGLUs built from differentiable ops (None: ggml's GEGLU, for forward-only graphs).
    geglu: Option<Vec<Geglu<'g>>>,
}

/// The graph inputs the transformer reads.
struct Inputs<'g> {
    tokens: Tensor<'g>,
    pos: Tensor<'g>,
    mask: Tensor<'g>,
    /// The sliding-window layers' mask (models with them).
    mask_swa: Option<Tensor<'g>>,
}

/// One LoRA dropout mask input: the adapter input it multiplies (`blk.3.attn_in`).
#[derive(Debug, Clone, Copy)]
pub struct DropoutMask<'g> {
    pub layer: usize,
    /// Which input of the layer: the attention input (q, k, v), the attention output
    /// (attn_output), the feed-forward input (gate, up) or the down projection's input.
    pub input: DropoutInput,
    /// F32 [d_in, n_tokens].
    pub mask: Tensor<'g>,
}

/// The distinct adapter inputs of a layer (modules reading the same activation share one
/// mask, as they share the activation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutInput {
    AttnIn,
    AttnOut,
    FfnIn,
    FfnDownIn,
}

impl DropoutInput {
    pub fn name(self) -> &'static str {
        match self {
            DropoutInput::AttnIn => "attn_in",
            DropoutInput::AttnOut => "attn_out",
            DropoutInput::FfnIn => "ffn_in",
            DropoutInput::FfnDownIn => "ffn_down_in",
        }
    }

    fn of(t: Target) -> Self {
        match t {
            Target::AttnQ | Target::AttnK | Target::AttnV | Target::AttnQkv => DropoutInput::AttnIn,
            Target::AttnOutput => DropoutInput::AttnOut,
            Target::FfnGate | Target::FfnUp => DropoutInput::FfnIn,
            Target::FfnDown => DropoutInput::FfnDownIn,
        }
    }
}

/// Fills LoRA dropout masks: each entry is kept with probability 1 − p and then scaled by
/// 1/(1 − p) (inverted dropout, so the expected adapter input is unchanged), drawn from a
/// SplitMix64 stream of (`seed`, `step`, `micro`, mask index), so a resumed run draws the
/// same masks without storing generator state.
pub fn dropout_mask(len: usize, p: f32, seed: u64, step: u64, micro: u64, index: u64) -> Vec<f32> {
    let mut rng = crate::data::SplitMix64::stream(
        seed ^ 0xD0D0_0000_0000_0000,
        step.wrapping_mul(1 << 20) ^ micro,
        index,
    );
    let keep = 1.0 / (1.0 - p);
    // Keep when a uniform 53-bit draw in [0, 1) is ≥ p.
    (0..len)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if u >= p as f64 {
                keep
            } else {
                0.0
            }
        })
        .collect()
}

/// Tensor objects one layer needs (ops incl. LoRA on all 7 targets, with margin).
const TENSORS_PER_LAYER: usize = 96;

impl<'g> TrainGraph<'g> {
    /// Context capacity for the graph of `weights` (with room for a backward pass when
    /// `backward`).
    pub fn capacity(weights: &Weights, lora: Option<&LoraSet>, backward: bool) -> Capacity {
        let lora_ops = lora.map_or(0, |l| 6 * l.modules().len()); // + dropout mask and mul
        let forward = TENSORS_PER_LAYER * weights.hparams.n_layer + lora_ops + 64;
        let n = if backward { 6 * forward } else { forward };
        Capacity::graph(n, n, backward)
    }

    /// Builds the graph in `ctx` for `n_tokens` tokens: the logits `o.outputs` asks for, with
    /// `o.loss` the labels input and the mean cross-entropy loss (marked as the graph's loss),
    /// with `o.dropout` LoRA dropout mask inputs (the adapter path reads mask ⊙ x, the frozen
    /// path x itself; fill the masks with [`dropout_mask`]).
    pub fn build(
        ctx: &'g Context,
        weights: &'g Weights,
        lora: Option<&'g LoraSet>,
        n_tokens: usize,
        o: GraphOptions,
    ) -> Self {
        assert!(n_tokens > 0, "TrainGraph::build with no tokens");
        let hp = &weights.hparams;
        let cap = ctx.capacity();
        let mut graph = ctx.new_graph(cap.graph_nodes, cap.grads);

        let tokens = ctx.new_i32("tokens", n_tokens).set_input();
        let positions = ctx.new_i32("positions", n_tokens).set_input();
        let mask = ctx.new_f32("kq_mask", &[n_tokens as i64, n_tokens as i64]).set_input();
        let GraphOptions { outputs, loss: with_loss, dropout, backward } = o;
        let rows = match outputs {
            Outputs::All => None,
            Outputs::Rows(n) => {
                assert!(n > 0, "Outputs::Rows(0)");
                Some(ctx.new_i32("out_rows", n).set_input())
            }
        };

        let mask_swa = hp.swa.as_ref().map(|w| {
            let t = ctx.new_f32("kq_mask_swa", &[n_tokens as i64, n_tokens as i64]).set_input();
            (t, w.window)
        });
        let inputs = Inputs { tokens, pos: positions, mask, mask_swa: mask_swa.map(|m| m.0) };
        let model = Llama::new(weights, lora);
        let mut rec = Record {
            taps: Vec::new(),
            masks: dropout.then(Vec::new),
            blocks: Vec::new(),
            geglu: o.backward.then(Vec::new),
        };
        let x = model.forward(ctx, &inputs, &mut rec); // [n_embd, n_tokens]
        let x = match rows {
            Some(r) => ctx.get_rows(x, r), // [n_embd, n_rows]
            None => x,
        };
        let logits = model.head(ctx, x).set_name("logits").set_output(); // [n_vocab, n_rows]
        graph.build_forward_expand(logits);

        let (labels, label_ids, loss) = if with_loss {
            let n_rows = logits.ne()[1];
            let labels = ctx.new_f32("labels", &[hp.n_vocab as i64, n_rows]).set_input();
            let ids = ctx.new_i32("label_ids", n_rows as usize).set_input();
            let loss =
                ctx.cross_entropy_loss(logits, labels).set_name("loss").set_output().set_loss(); // [1]
            graph.build_forward_expand(loss);
            (Some(labels), Some(ids), Some(loss))
        } else {
            (None, None, None)
        };
        TrainGraph {
            graph,
            n_tokens,
            outputs,
            n_vocab: hp.n_vocab,
            tokens,
            positions,
            mask,
            mask_swa,
            rows,
            labels,
            label_ids,
            logits,
            loss,
            taps: rec.taps,
            blocks: rec.blocks,
            dropout: rec.masks.unwrap_or_default(),
            geglu: rec.geglu.unwrap_or_default(),
            backward,
        }
    }

    /// Adds the backward pass (ggml's autodiff of the marked loss with respect to the marked
    /// parameters), then gives the forward ggml's own ops where the graph was built from
    /// differentiable ones (GEGLU): the forward computes what llama.cpp computes, the
    /// gradient is that of the exact function.
    pub fn build_backward(&mut self, ctx: &'g Context) {
        assert!(
            self.backward,
            "TrainGraph::build_backward on a graph built without GraphOptions::for_backward"
        );
        self.graph.build_backward_expand(ctx);
        geglu::restore_geglu(&mut self.graph, &self.geglu);
    }

    /// Fills the dropout masks (if any) for micro-batch `micro` of optimizer step `step`.
    pub fn set_dropout(
        &self,
        run: &mut Computation<'_, 'g>,
        p: f32,
        seed: u64,
        step: u64,
        micro: u64,
    ) -> Result<(), ModelError> {
        for (i, d) in self.dropout.iter().enumerate() {
            let ne = d.mask.ne();
            run.write_f32(
                d.mask,
                &dropout_mask((ne[0] * ne[1]) as usize, p, seed, step, micro, i as u64),
            )?;
        }
        Ok(())
    }

    /// Writes a batch into the graph's inputs (after [`Backend::compute`](crate::ggml::Backend::compute)).
    pub fn set_inputs(
        &self,
        run: &mut Computation<'_, 'g>,
        batch: &Batch,
    ) -> Result<(), ModelError> {
        batch.validate(Some(self.n_vocab))?;
        if batch.n_tokens() != self.n_tokens {
            return Err(ModelError::Batch(format!(
                "{} tokens for a graph built for {}",
                batch.n_tokens(),
                self.n_tokens
            )));
        }
        run.write_i32(self.tokens, &batch.tokens)?;
        run.write_i32(self.positions, &batch.positions)?;
        run.write_f32(self.mask, &batch.mask)?;
        if let Some((t, window)) = self.mask_swa {
            run.write_f32(t, &batch.sliding_window_mask(window)?)?;
        }
        if let Some(rows) = self.rows {
            if batch.n_rows() != rows.ne()[0] as usize {
                return Err(ModelError::Batch(format!(
                    "{} rows for a graph built for {}",
                    batch.n_rows(),
                    rows.ne()[0]
                )));
            }
            run.write_i32(rows, &batch.rows)?;
        }
        if let Some(labels) = self.labels {
            let n_rows = labels.ne()[1] as usize;
            if batch.labels.len() != n_rows {
                return Err(ModelError::Batch(format!(
                    "{} labels for a graph with {n_rows} output rows",
                    batch.labels.len()
                )));
            }
            // The graph reads one of the two: the one-hot matrix (ggml's loss), or the ids once
            // a CPU pass rewrote the loss (then the matrix is not even allocated).
            if run.contains(labels) {
                run.write_f32(labels, &batch.one_hot(self.n_vocab))?;
            }
            if let Some(ids) = self.label_ids.filter(|&t| run.contains(t)) {
                run.write_i32(ids, &batch.labels)?;
            }
        }
        Ok(())
    }
}

/// The model as the forward sees it: frozen weights, optional adapters.
struct Llama<'w> {
    hp: &'w LlamaHparams,
    tok_embd: Tensor<'w>,
    layers: Vec<Layer<Tensor<'w>>>,
    output_norm: Tensor<'w>,
    output: Tensor<'w>,
    output_b: Option<Tensor<'w>>,
    rope_freqs: Option<Tensor<'w>>,
    lora: Option<&'w LoraSet>,
}

impl<'w> Llama<'w> {
    fn new(w: &'w Weights, lora: Option<&'w LoraSet>) -> Self {
        Llama {
            hp: &w.hparams,
            tok_embd: w.tok_embd(),
            layers: (0..w.hparams.n_layer).map(|i| w.layer(i)).collect(),
            output_norm: w.output_norm(),
            output: w.output(),
            output_b: w.output_b(),
            rope_freqs: w.rope_freqs(),
            lora,
        }
    }

    /// The transformer: token ids → final hidden states [n_embd, n_tokens] (before the norm).
    fn forward<'g>(&self, ctx: &'g Context, inp: &Inputs<'g>, rec: &mut Record<'g>) -> Tensor<'g>
    where
        'w: 'g,
    {
        let hp = self.hp;
        let mut x = ctx.get_rows(self.tok_embd, inp.tokens); // [n_embd, n_tokens]
        if hp.arch.scales_embeddings() {
            x = ctx.scale(x, (hp.n_embd as f32).sqrt());
        }
        rec.blocks.push(x);
        for (il, l) in self.layers.iter().enumerate() {
            // self-attention block
            let h = self.norm(ctx, x, l.attn_norm); // [n_embd, n_tokens]
            let qkv = match l.qkv {
                Qkv::Split { q, k, v, q_b, k_b, v_b } => {
                    let (hd, nh, nkv) = (hp.head_dim as i64, hp.n_head as i64, hp.n_head_kv as i64);
                    let n = h.ne()[1];
                    let q = self.linear(ctx, il, Target::AttnQ, q, q_b, h, rec); // [n_embd_q, n_tokens]
                    let k = self.linear(ctx, il, Target::AttnK, k, k_b, h, rec); // [n_embd_kv, n_tokens]
                    let v = self.linear(ctx, il, Target::AttnV, v, v_b, h, rec); // [n_embd_kv, n_tokens]
                    [
                        ctx.reshape_3d(q, hd, nh, n),
                        ctx.reshape_3d(k, hd, nkv, n),
                        ctx.reshape_3d(v, hd, nkv, n),
                    ]
                }
                Qkv::Fused { qkv, qkv_b } => {
                    let y = self.linear(ctx, il, Target::AttnQkv, qkv, qkv_b, h, rec); // [n_embd_q + 2·n_embd_kv, n_tokens]
                    self.split_qkv(ctx, y)
                }
            }; // [head_dim, n_head(_kv), n_tokens] each
            let a = self.attention(ctx, il, qkv, (l.attn_q_norm, l.attn_k_norm), inp); // [n_embd_q, n_tokens]
            let o =
                self.linear(ctx, il, Target::AttnOutput, l.attn_output, l.attn_output_b, a, rec); // [n_embd, n_tokens]
            let o = match l.attn_post_norm {
                Some(w) => self.norm(ctx, o, w),
                None => o,
            };
            x = ctx.add(o, x);

            // feed-forward block: down(act(gate(h)) ⊙ up(h))
            let h = self.norm(ctx, x, l.ffn_norm); // [n_embd, n_tokens]
            let (gate, up) = match l.gate_up {
                GateUp::Split { gate, up, gate_b, up_b } => (
                    self.linear(ctx, il, Target::FfnGate, gate, gate_b, h, rec), // [n_ff, n_tokens]
                    self.linear(ctx, il, Target::FfnUp, up, up_b, h, rec),       // [n_ff, n_tokens]
                ),
                GateUp::Fused { up } => {
                    // One [2·n_ff, n_tokens] product: gate rows first, then up rows.
                    let y = self.linear(ctx, il, Target::FfnUp, up, None, h, rec);
                    let (ff, n) = (hp.n_ff as i64, y.ne()[1]);
                    let half = |i: usize| {
                        ctx.cont(ctx.view_2d(y, ff, n, y.nb()[1], i * y.nb()[0] * ff as usize))
                    };
                    (half(0), half(1))
                }
            };
            let g = match (hp.arch.activation(), &mut rec.geglu) {
                (Activation::Silu, _) => ctx.swiglu_split(gate, up),
                (Activation::GeluTanh, None) => ctx.geglu_split(gate, up),
                (Activation::GeluTanh, Some(gs)) => {
                    let g = geglu::geglu_differentiable(ctx, gate, up);
                    gs.push(g);
                    g.node
                }
            }; // [n_ff, n_tokens]
            let y = self.linear(ctx, il, Target::FfnDown, l.ffn_down, l.ffn_down_b, g, rec); // [n_embd, n_tokens]
            let y = match l.ffn_post_norm {
                Some(w) => self.norm(ctx, y, w),
                None => y,
            };
            x = ctx.add(y, x);
            rec.blocks.push(x);
        }
        x
    }

    /// Final norm and output projection: hidden [n_embd, n] → logits [n_vocab, n].
    fn head<'g>(&self, ctx: &'g Context, x: Tensor<'g>) -> Tensor<'g>
    where
        'w: 'g,
    {
        let h = self.norm(ctx, x, self.output_norm); // [n_embd, n]
        let logits = ctx.mul_mat(self.output, h); // [n_vocab, n]
        match self.output_b {
            Some(b) => ctx.add(logits, b),
            None => logits,
        }
    }

    /// RMSNorm with a learned gain: w ⊙ x / rms(x).
    fn norm<'g>(&self, ctx: &'g Context, x: Tensor<'g>, w: Tensor<'g>) -> Tensor<'g> {
        ctx.mul(ctx.rms_norm(x, self.hp.rms_eps), w)
    }

    /// A frozen linear map with its LoRA term and bias: W0·x + B·(s·(A·x)) + b.
    #[allow(clippy::too_many_arguments)]
    fn linear<'g>(
        &self,
        ctx: &'g Context,
        il: usize,
        target: Target,
        w: Tensor<'g>,
        bias: Option<Tensor<'g>>,
        x: Tensor<'g>,
        rec: &mut Record<'g>,
    ) -> Tensor<'g>
    where
        'w: 'g,
    {
        let mut y = ctx.mul_mat(w, x); // W0·x [d_out, n_tokens]
        if let Some(lora) = self.lora {
            if let Some(m) = lora.get(il, target) {
                // LoRA dropout: the adapter reads mask ⊙ x (one mask per distinct input).
                let x = match &mut rec.masks {
                    Some(ms) => {
                        let input = DropoutInput::of(target);
                        let mask = match ms.iter().find(|d| d.layer == il && d.input == input) {
                            Some(d) => d.mask,
                            None => {
                                let t = ctx
                                    .new_f32(
                                        &format!("blk.{il}.dropout.{}", input.name()),
                                        &[x.ne()[0], x.ne()[1]],
                                    )
                                    .set_input();
                                ms.push(DropoutMask { layer: il, input, mask: t });
                                t
                            }
                        };
                        ctx.mul(x, mask) // [d_in, n_tokens]
                    }
                    None => x,
                };
                let u = ctx.mul_mat(lora.a(m), x).set_name(&format!("blk.{il}.{target}.lora_u")); // u = A·x [r, n_tokens]
                let su = ctx.scale(u, m.scale); // s·u
                y = ctx.add(y, ctx.mul_mat(lora.b(m), su)); // + B·(s·u) [d_out, n_tokens]
                rec.taps.push(LoraTap { layer: il, target, x, u });
            }
        }
        match bias {
            Some(b) => ctx.add(y, b),
            None => y,
        }
    }

    /// The queries, keys and values of a fused projection's output y [n_embd_q + 2·n_embd_kv,
    /// n], each copied out of its rows and shaped [head_dim, heads, n]. (llama.cpp's
    /// build_qkv feeds strided views on; the copies keep every gradient on its way back
    /// contiguous, which the accumulation into y's gradient requires.)
    fn split_qkv<'g>(&self, ctx: &'g Context, y: Tensor<'g>) -> [Tensor<'g>; 3] {
        let hp = self.hp;
        let (hd, n, f) = (hp.head_dim as i64, y.ne()[1], y.nb()[0]);
        let part = |heads: usize, first_row: usize| {
            let rows = ctx.view_2d(y, hd * heads as i64, n, y.nb()[1], f * first_row);
            ctx.reshape_3d(ctx.cont(rows), hd, heads as i64, n)
        };
        [
            part(hp.n_head, 0),
            part(hp.n_head_kv, hp.n_embd_q()),
            part(hp.n_head_kv, hp.n_embd_q() + hp.n_embd_kv()),
        ]
    }

    /// Causal multi-head attention with GQA (llama.cpp's build_attn_mha, non-flash path):
    /// softmax(scale · K·Q + mask) applied to V, per head. q [head_dim, n_head, n], k/v
    /// [head_dim, n_head_kv, n].
    /// With `qk_norm` (Qwen3, Gemma 3) each query and key head is RMS-normed with its gain
    /// before RoPE. Sliding-window layers (Gemma 3) use their own mask and RoPE parameters.
    fn attention<'g>(
        &self,
        ctx: &'g Context,
        il: usize,
        [q, k, v]: [Tensor<'g>; 3],
        qk_norm: (Option<Tensor<'g>>, Option<Tensor<'g>>),
        inp: &Inputs<'g>,
    ) -> Tensor<'g>
    where
        'w: 'g,
    {
        let hp = self.hp;
        let (hd, nh, n) = (q.ne()[0], q.ne()[1], q.ne()[2]);
        let per_head = |x: Tensor<'g>, w: Option<Tensor<'g>>| match w {
            Some(w) => self.norm(ctx, x, w), // w [head_dim] broadcast over heads and tokens
            None => x,
        };
        // Sliding-window layers: their own mask and RoPE base.
        let (mask, rope) = match (hp.window_of(il), inp.mask_swa) {
            (Some(_), Some(m)) => (m, hp.rope_of(il)),
            _ => (inp.mask, &hp.rope),
        };
        let pos = inp.pos;
        let (q, k) = (per_head(q, qk_norm.0), per_head(k, qk_norm.1));
        let q = ctx.rope_ext(q, pos, self.rope_freqs, rope);
        let k = ctx.rope_ext(k, pos, self.rope_freqs, rope);
        // Phi-3 and Gemma 3 scale the queries instead of the scores (llama.cpp's graphs): the same
        // numbers mathematically, but this order rounds as llama.cpp does. (The reshape to the
        // same shape costs nothing forward; backward it makes the gradient that reaches the
        // scale contiguous, which ggml's scale requires.)
        let (q, kq_scale) = if hp.arch.scales_queries() {
            (ctx.reshape_3d(ctx.scale(q, hp.attn_scale), hd, nh, n), 1.0)
        } else {
            (q, hp.attn_scale)
        };

        // Left strided, as llama.cpp has it: made contiguous, the scores go through tinyBLAS,
        // which sums in another order (correct to 4e-7, checked), and the 8-bit activation
        // rounding of the quantized matmuls after it amplifies that to logits up to ~1 apart
        // from llama.cpp's on the default Q4_1 model — too far for the parity check's bound.
        // Training steps on the CPU run attention as fused kernels anyway.
        let q = ctx.permute(q, [0, 2, 1, 3]); // [head_dim, n_tokens, n_head]
        let k = ctx.permute(k, [0, 2, 1, 3]); // [head_dim, n_kv, n_head_kv]
        let kq = ctx.mul_mat(k, q); // [n_kv, n_tokens, n_head]  (query heads share kv heads in groups)
        ctx.mul_mat_prec_f32(kq);
        let p = ctx.soft_max_ext(kq, Some(mask), kq_scale, 0.0); // [n_kv, n_tokens, n_head]

        let vt = ctx.cont(ctx.transpose(ctx.permute(v, [0, 2, 1, 3]))); // [n_kv, head_dim, n_head_kv]
        let o = ctx.mul_mat(vt, p); // [head_dim, n_tokens, n_head]
        let o = ctx.permute(o, [0, 2, 1, 3]); // [head_dim, n_head, n_tokens]
        ctx.cont_2d(o, hd * nh, n) // [n_embd_q, n_tokens]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_shape() {
        let m = causal_mask(3);
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![0.0, inf, inf, 0.0, 0.0, inf, 0.0, 0.0, 0.0]);
    }

    /// The sliding-window mask keeps the batch mask where the query is less than `window`
    /// positions past the key (positions restart in a packed second sequence).
    #[test]
    fn sliding_window_mask_follows_positions() {
        let inf = f32::NEG_INFINITY;
        let b = Batch::causal(&[1, 2, 3, 4], &[], &[]).unwrap();
        let m = b.sliding_window_mask(2).unwrap();
        #[rustfmt::skip]
        let want = vec![
            0.0, inf, inf, inf,
            0.0, 0.0, inf, inf,
            inf, 0.0, 0.0, inf,
            inf, inf, 0.0, 0.0,
        ];
        assert_eq!(m, want);
        // Two packed sequences of 2 and 3 tokens: the window counts positions, not indices.
        let mut p = Batch::causal(&[1, 2, 3, 4, 5], &[], &[]).unwrap();
        p.positions = vec![0, 1, 0, 1, 2];
        for j in 0..5 {
            for i in 0..5 {
                let same = (j < 2) == (i < 2);
                p.mask[j * 5 + i] = if same && i <= j { 0.0 } else { inf };
            }
        }
        let m = p.sliding_window_mask(2).unwrap();
        assert_eq!(
            &m[2 * 5..],
            &[inf, inf, 0.0, inf, inf, inf, inf, 0.0, 0.0, inf, inf, inf, inf, 0.0, 0.0]
        );
        assert_eq!(&m[..2 * 5], &p.mask[..2 * 5]);
    }

    #[test]
    fn batch_validation() {
        let b = Batch::causal(&[1, 2, 3], &[0, 1], &[2, 3]).unwrap();
        assert!(b.validate(Some(4)).is_ok());
        assert!(b.validate(Some(3)).unwrap_err().to_string().contains("token id 3"));
        assert!(Batch::causal(&[1, 2], &[2], &[1]).is_err());
        assert!(Batch::causal(&[1, 2], &[0, 1], &[1]).is_err());
        let y = b.one_hot(4);
        assert_eq!(y, vec![0., 0., 1., 0., 0., 0., 0., 1.]);
    }
}
