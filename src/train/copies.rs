//! Compute copies of the frozen weights for the backward pass (`--weight-copies`).
//!
//! The input gradient of `y = W·x` is `Wᵀ·∂L/∂y`. With a copy mode, every frozen matmul
//! weight gets a persistent transposed copy `Wᵀ` ([d_out, d_in] in ggml order) in Q8_0, F16 or
//! F32, made once at start-up on the host (dequantize, transpose, convert). With `none`, only
//! the quantized weights stay resident and the backward dequantizes one layer's weight at a
//! time (transient F16 copy).

use crate::ggml::{dequantize, quantize, Backend, Capacity, Context, FrozenGrad, FrozenMap, Tensor, TensorId, Type};
use crate::model::{ModelError, Weights};

use super::config::WeightCopies;

/// The persistent transposed copies, keyed by the frozen weight they mirror.
pub struct FrozenCopies {
    mode: WeightCopies,
    ctx: Option<Context>,
    /// (frozen weight, its transposed copy in `ctx`).
    pairs: Vec<(TensorId, TensorId)>,
    /// Frozen weights without a copy (transient mode).
    transient: Vec<TensorId>,
    /// (frozen weight, a Q8_0 copy in `ctx` for the forward), for base types without a fast
    /// matmul kernel (e.g. Q4_1: 76 vs 142 GFLOP/s for Q8_0 on 2 AVX-512 cores).
    forward: Vec<(TensorId, TensorId)>,
    bytes: usize,
}

/// Every frozen matmul weight of the model: the 7 linear maps of each layer and the output.
pub fn frozen_matmul_weights(w: &Weights) -> Vec<Tensor<'_>> {
    let mut v = Vec::new();
    for i in 0..w.hparams.n_layer {
        let l = w.layer(i);
        v.extend([l.attn_q, l.attn_k, l.attn_v, l.attn_output, l.ffn_gate, l.ffn_up, l.ffn_down]);
    }
    v.push(w.output());
    v
}

/// Base types whose matmul is much slower than Q8_0's on the CPU (no tinyBLAS kernel).
fn needs_forward_copy(t: Type) -> bool {
    !matches!(t, Type::F32 | Type::F16 | Type::BF16 | Type::Q4_0 | Type::Q8_0)
}

impl FrozenCopies {
    /// `forward_copy`: also give weights whose type has no fast matmul kernel a Q8_0 copy for the
    /// forward pass (faster, but the adapter then trains against requantized weights).
    pub fn build(weights: &Weights, mode: WeightCopies, forward_copy: bool, backend: &Backend) -> Result<Self, ModelError> {
        let frozen = frozen_matmul_weights(weights);
        if mode == WeightCopies::Stock {
            return Ok(FrozenCopies { mode, ctx: None, pairs: Vec::new(), transient: Vec::new(), forward: Vec::new(), bytes: 0 });
        }
        if mode == WeightCopies::None {
            return Ok(FrozenCopies { mode, ctx: None, pairs: Vec::new(), transient: frozen.iter().map(|t| t.id()).collect(), forward: Vec::new(), bytes: 0 });
        }
        let ctx = Context::new(Capacity::tensors(2 * frozen.len() + 8))?;
        let mut planned = Vec::new();
        let mut fwd_planned = Vec::new();
        for &w in &frozen {
            if forward_copy && needs_forward_copy(w.ty()) && w.ne()[0] % 32 == 0 {
                let t = ctx.new_tensor(Type::Q8_0, &[w.ne()[0], w.ne()[1]]);
                t.set_name(&format!("{}.q8", w.name()));
                fwd_planned.push((w, t));
            }
        }
        for &w in &frozen {
            let ne = w.ne();
            let (d_in, d_out) = (ne[0], ne[1]);
            // Q8_0 needs rows (here: d_out values) in whole blocks of 32; fall back to F16.
            let ty = match mode {
                WeightCopies::Q8_0 if d_out % 32 == 0 => Type::Q8_0,
                WeightCopies::Q8_0 | WeightCopies::F16 => Type::F16,
                _ => Type::F32,
            };
            let t = ctx.new_tensor(ty, &[d_out, d_in]);
            t.set_name(&format!("{}.T", w.name()));
            planned.push((w, t, ty));
        }
        let bytes = ctx.allocate(backend.weight_buffer_type())?;
        let mut pairs = Vec::new();
        for (w, t, ty) in planned {
            let ne = w.ne();
            let (d_in, d_out) = (ne[0] as usize, ne[1] as usize);
            let raw = weights.read_bytes(w)?;
            let x = dequantize(w.ty(), &raw, d_in * d_out)?; // row-major [d_out][d_in]
            let mut xt = vec![0f32; x.len()]; // [d_in][d_out]
            const BLK: usize = 64;
            for ob in (0..d_out).step_by(BLK) {
                for ib in (0..d_in).step_by(BLK) {
                    for o in ob..(ob + BLK).min(d_out) {
                        for i in ib..(ib + BLK).min(d_in) {
                            xt[i * d_out + o] = x[o * d_in + i];
                        }
                    }
                }
            }
            let bytes = quantize(ty, &xt, d_out)?;
            ctx.write_bytes(t, &bytes)?;
            pairs.push((w.id(), t.id()));
        }
        let mut forward = Vec::new();
        for (w, t) in fwd_planned {
            let ne = w.ne();
            let x = dequantize(w.ty(), &weights.read_bytes(w)?, (ne[0] * ne[1]) as usize)?;
            ctx.write_bytes(t, &quantize(Type::Q8_0, &x, ne[0] as usize)?)?;
            forward.push((w.id(), t.id()));
        }
        Ok(FrozenCopies { mode, ctx: Some(ctx), pairs, transient: Vec::new(), forward, bytes })
    }

    /// How each frozen weight's input gradient is computed, for the graph rewrite.
    pub fn map<'a>(&'a self, weights: &'a Weights) -> FrozenMap<'a> {
        let mut m = FrozenMap::new();
        if let Some(ctx) = &self.ctx {
            for &(w, t) in &self.pairs {
                m.insert(weights.tensor(w), FrozenGrad::Transposed(ctx.tensor(t)));
            }
        }
        if let Some(ctx) = &self.ctx {
            for &(w, t) in &self.forward {
                m.insert_forward(weights.tensor(w), ctx.tensor(t));
            }
        }
        for &w in &self.transient {
            m.insert(weights.tensor(w), FrozenGrad::Transient(Type::F16));
        }
        m
    }

    pub fn mode(&self) -> WeightCopies {
        self.mode
    }
    /// Bytes the copies occupy.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
