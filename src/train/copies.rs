//! Compute copies of the frozen weights for the backward pass (`--weight-copies`).
//!
//! The input gradient of `y = W·x` is `Wᵀ·∂L/∂y`. With a copy mode, every frozen matmul
//! weight gets a persistent transposed copy `Wᵀ` ([d_out, d_in] in ggml order) in Q8_0, F16 or
//! F32, made once at start-up on the host (dequantize, transpose, convert). With `none`, only
//! the quantized weights stay resident and the backward dequantizes one layer's weight at a
//! time (transient F16 copy).

use crate::ggml::{
    dequantize, quantize, Backend, BufferType, Capacity, Context, FrozenGrad, FrozenMap, Tensor,
    TensorId, Type,
};
use crate::model::{ModelError, Weights};

use super::config::WeightCopies;

/// How the forward multiplies frozen weights when copies are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The stored weights themselves.
    Stored,
    /// Q4_1 weights as their exact split into Q4_0 + per-block offsets (see [`split_q4_1`]):
    /// same values, a faster kernel. Other types as stored.
    Split,
    /// [`Forward::Split`], and Q8_0 copies of the other weights without a fast kernel (Q5_x,
    /// K-quants; `--forward-copy`): requantized values.
    Q8_0,
}

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
    /// (Q4_1 weight, its exact split into Q4_0 (in `ctx_q4`) + per-block offsets (in `ctx`)),
    /// see [`split_q4_1`].
    split: Vec<(TensorId, TensorId, TensorId)>,
    /// The Q4_0 halves of the splits, in the CPU's repacking buffer type when running on the
    /// CPU (Q4_0 × F32 at ~180 GFLOP/s on 2 AVX-512 cores here, Q4_1 ~60).
    ctx_q4: Option<Context>,
    bytes: usize,
    /// Running on the CPU backend: the graph rewrite may use its kernels
    /// ([`FrozenMap::cpu_kernels`]).
    cpu: bool,
}

/// Every frozen matmul weight of the model: the linear maps of each layer and the output.
pub fn frozen_matmul_weights(w: &Weights) -> Vec<Tensor<'_>> {
    let mut v = Vec::new();
    for i in 0..w.hparams.n_layer {
        v.extend(w.layer(i).matmul_weights());
    }
    v.push(w.output());
    v
}

/// The copies' tensors, made in their context before it is allocated: each frozen weight's
/// transposed backward copy (with its type), the forward's Q8_0 copies, and the Q4_1 splits'
/// offsets (their Q4_0 halves live in a context of their own, see [`q4_0_halves`]).
struct Plan<'t> {
    backward: Vec<(Tensor<'t>, Tensor<'t>, Type)>,
    forward: Vec<(Tensor<'t>, Tensor<'t>)>,
    split: Vec<(Tensor<'t>, Tensor<'t>)>,
}

impl<'t> Plan<'t> {
    fn new(
        ctx: &'t Context,
        frozen: &[Tensor<'t>],
        mode: WeightCopies,
        forward: Forward,
        gpu: bool,
    ) -> Self {
        let mut plan = Plan { backward: Vec::new(), forward: Vec::new(), split: Vec::new() };
        for &w in frozen {
            // The split and the forward copies are CPU speed-ups (GPU backends have a fast
            // kernel for every type, and the split's extra product only costs there).
            if gpu {
                continue;
            }
            if forward != Forward::Stored && w.ty() == Type::Q4_1 {
                // Stored transposed, [d_out, d_in/32]: the product C·s runs as an outer-product
                // sum over the blocks (see `FrozenMap::insert_forward_split`).
                let c = ctx.new_tensor(Type::F32, &[w.ne()[1], w.ne()[0] / 32]);
                c.set_name(&format!("{}.q4_1_offsets", w.name()));
                plan.split.push((w, c));
            } else if forward == Forward::Q8_0 && needs_forward_copy(w.ty()) && w.ne()[0] % 32 == 0
            {
                let t = ctx.new_tensor(Type::Q8_0, &[w.ne()[0], w.ne()[1]]);
                t.set_name(&format!("{}.q8", w.name()));
                plan.forward.push((w, t));
            }
        }
        for &w in frozen {
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
            plan.backward.push((w, t, ty));
        }
        plan
    }
}

/// The Q4_0 halves of the split weights, allocated: in the CPU's repacking buffer type when it
/// has a kernel for every one of them (it attaches one per tensor at allocation; none means
/// ggml would crash on upload, e.g. a CPU without AVX2; it needs rows in multiples of 8 and is
/// CPU-only), else in the backend's plain weight buffer. Returns the context, the halves in
/// `split`'s order and their bytes.
fn q4_0_halves(
    split: &[(Tensor<'_>, Tensor<'_>)],
    backend: &Backend,
) -> Result<(Context, Vec<TensorId>, usize), ModelError> {
    let plan_q4 = |buft: BufferType| -> Result<(Context, Vec<TensorId>, usize), ModelError> {
        let c4 = Context::new(Capacity::tensors(split.len() + 8))?;
        let qs: Vec<_> = split
            .iter()
            .map(|(w, _)| {
                let q = c4.new_tensor(Type::Q4_0, &[w.ne()[0], w.ne()[1]]);
                q.set_name(&format!("{}.q4_0", w.name()));
                q.id()
            })
            .collect();
        let b = c4.allocate(buft)?;
        Ok((c4, qs, b))
    };
    let repacked = match BufferType::cpu_repack().filter(|_| !backend.is_gpu()) {
        Some(r) => Some(plan_q4(r)?)
            .filter(|(c4, qs, _)| qs.iter().all(|&q| c4.tensor(q).has_backend_extra())),
        None => None,
    };
    match repacked {
        Some(p) => Ok(p),
        None => plan_q4(backend.weight_buffer_type()),
    }
}

/// Splits Q4_1 data exactly into Q4_0 data and one F32 offset per block.
///
/// A Q4_1 block holds 32 weights d·q + m (q in 0..16, d and m F16); Q4_0 holds d·(q − 8) with
/// the same nibble layout. So W = W₀ + c with c = 8d + m per block, and
/// W·x = W₀·x + C·s, where s sums x over each block of 32 inputs: a Q4_0 matmul (a fast
/// kernel: tinyBLAS, AVX-512) plus one 32× smaller F32 matmul. ggml has no fast Q4_1 kernel
/// (≈ 0.6× Q4_0's speed on the training shapes here), and unlike a Q8_0 forward copy this
/// represents the stored weights exactly. Returns (Q4_0 bytes, offsets [rows][blocks]).
pub fn split_q4_1(q4_1: &[u8]) -> (Vec<u8>, Vec<f32>) {
    const Q4_1: usize = 20; // d, m (F16), 16 bytes of nibbles
    const Q4_0: usize = 18; // d (F16), 16 bytes of nibbles
    let n = q4_1.len() / Q4_1;
    let mut q = Vec::with_capacity(n * Q4_0);
    let mut c = Vec::with_capacity(n);
    for b in q4_1.chunks_exact(Q4_1) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        q.extend_from_slice(&b[0..2]);
        q.extend_from_slice(&b[4..20]);
        c.push(8.0 * d + m);
    }
    (q, c)
}

/// Base types whose matmul is much slower than Q8_0's on the CPU (no tinyBLAS kernel).
fn needs_forward_copy(t: Type) -> bool {
    !matches!(t, Type::F32 | Type::F16 | Type::BF16 | Type::Q4_0 | Type::Q8_0)
}

impl FrozenCopies {
    /// `forward_copy`: give weights whose type has no fast matmul kernel a Q8_0 copy for the
    /// forward pass (faster, but the adapter then trains against requantized weights);
    /// otherwise Q4_1 weights get their exact split ([`Forward::Split`]).
    pub fn build(
        weights: &Weights,
        mode: WeightCopies,
        forward_copy: bool,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        Self::build_with(
            weights,
            mode,
            if forward_copy { Forward::Q8_0 } else { Forward::Split },
            backend,
        )
    }

    /// [`FrozenCopies::build`] with the forward's treatment chosen explicitly. With
    /// `WeightCopies::None` (or `Stock`) the forward always multiplies the stored weights.
    pub fn build_with(
        weights: &Weights,
        mode: WeightCopies,
        forward: Forward,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let frozen = frozen_matmul_weights(weights);
        // No copies: ggml's own backward (stock), or each weight dequantized and transposed
        // inside the backward pass (none).
        let without_copies = |transient: Vec<TensorId>| FrozenCopies {
            mode,
            ctx: None,
            pairs: Vec::new(),
            transient,
            forward: Vec::new(),
            split: Vec::new(),
            ctx_q4: None,
            bytes: 0,
            cpu: !backend.is_gpu(),
        };
        match mode {
            WeightCopies::Stock => return Ok(without_copies(Vec::new())),
            WeightCopies::None => {
                return Ok(without_copies(frozen.iter().map(|t| t.id()).collect()));
            }
            WeightCopies::Q8_0 | WeightCopies::F16 | WeightCopies::F32 => {}
        }
        let ctx = Context::new(Capacity::tensors(3 * frozen.len() + 8))?;
        let plan = Plan::new(&ctx, &frozen, mode, forward, backend.is_gpu());
        let mut bytes = ctx.allocate(backend.weight_buffer_type())?;
        let (ctx_q4, q_ids, q_bytes) = q4_0_halves(&plan.split, backend)?;
        bytes += q_bytes;
        let mut pairs = Vec::new();
        for (w, t, ty) in plan.backward {
            let ne = w.ne();
            let (d_in, d_out) = (ne[0] as usize, ne[1] as usize);
            let raw = weights.read_bytes(w)?;
            let x = dequantize(w.ty(), &raw, d_in * d_out)?; // row-major [d_out][d_in]
            let bytes = quantize(ty, &transpose(&x, d_out, d_in), d_out)?;
            ctx.write_bytes(t, &bytes)?;
            pairs.push((w.id(), t.id()));
        }
        let mut forward = Vec::new();
        for (w, t) in plan.forward {
            let ne = w.ne();
            let x = dequantize(w.ty(), &weights.read_bytes(w)?, (ne[0] * ne[1]) as usize)?;
            ctx.write_bytes(t, &quantize(Type::Q8_0, &x, ne[0] as usize)?)?;
            forward.push((w.id(), t.id()));
        }
        let mut split = Vec::new();
        for ((w, c), q) in plan.split.into_iter().zip(q_ids) {
            let (q4_0, offsets) = split_q4_1(&weights.read_bytes(w)?);
            ctx_q4.write_bytes(ctx_q4.tensor(q), &q4_0)?;
            // offsets: [d_out][d_in/32] row-major; stored as [d_in/32][d_out].
            let (blocks, d_out) = ((w.ne()[0] / 32) as usize, w.ne()[1] as usize);
            ctx.write_f32(c, &transpose(&offsets, d_out, blocks))?;
            split.push((w.id(), q, c.id()));
        }
        Ok(FrozenCopies {
            mode,
            ctx: Some(ctx),
            pairs,
            transient: Vec::new(),
            forward,
            split,
            ctx_q4: Some(ctx_q4),
            bytes,
            cpu: !backend.is_gpu(),
        })
    }

    /// The same copies, with the graph rewrite choosing what it does for a GPU backend (ggml's
    /// own ops only, no CPU kernels): builds the GPU form of a step graph on any backend, e.g.
    /// to check on the CPU that it allocates.
    pub fn portable(mut self) -> Self {
        self.cpu = false;
        self
    }

    /// How each frozen weight's input gradient is computed, for the graph rewrite.
    pub fn map<'a>(&'a self, weights: &'a Weights) -> FrozenMap<'a> {
        let mut m = FrozenMap::new();
        m.cpu_kernels = self.cpu;
        if let Some(ctx) = &self.ctx {
            for &(w, t) in &self.pairs {
                m.insert(weights.tensor(w), FrozenGrad::Transposed(ctx.tensor(t)));
            }
        }
        if let Some(ctx) = &self.ctx {
            for &(w, t) in &self.forward {
                m.insert_forward(weights.tensor(w), ctx.tensor(t));
            }
            if let Some(q4) = &self.ctx_q4 {
                for &(w, q, c) in &self.split {
                    m.insert_forward_split(weights.tensor(w), q4.tensor(q), ctx.tensor(c));
                }
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

/// The transpose of the row-major `rows`×`cols` matrix `x` (cache-blocked).
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BLK: usize = 64;
    let mut xt = vec![0f32; x.len()];
    for rb in (0..rows).step_by(BLK) {
        for cb in (0..cols).step_by(BLK) {
            for r in rb..(rb + BLK).min(rows) {
                for c in cb..(cb + BLK).min(cols) {
                    xt[c * rows + r] = x[r * cols + c];
                }
            }
        }
    }
    xt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_split_is_exact() {
        let mut seed = 7u64;
        let data: Vec<f32> = (0..64 * 8)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 0.3 - 0.05
            })
            .collect();
        let q41 = quantize(Type::Q4_1, &data, 64).unwrap();
        let w = dequantize(Type::Q4_1, &q41, data.len()).unwrap();
        let (q40, c) = split_q4_1(&q41);
        let w0 = dequantize(Type::Q4_0, &q40, data.len()).unwrap();
        assert_eq!(c.len(), data.len() / 32);
        for (i, (&a, &b)) in w.iter().zip(&w0).enumerate() {
            assert!(
                (a - (b + c[i / 32])).abs() <= 1e-6 * a.abs().max(1e-3),
                "element {i}: {a} vs {b} + {}",
                c[i / 32]
            );
        }
    }
}
