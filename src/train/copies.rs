//! Compute copies of the frozen weights for the backward pass (`--weight-copies`).
//!
//! The input gradient of `y = W·x` is `Wᵀ·∂L/∂y`. With a copy mode, every frozen matmul
//! weight gets a persistent transposed copy `Wᵀ` ([d_out, d_in] in ggml order) in Q8_0, F16 or
//! F32, made once at start-up on the host (dequantize, transpose, convert). With `none`, only
//! the quantized weights stay resident and the backward makes one weight's transposed copy at
//! a time: Q8_0 on the CPU (the default mode's bytes, made by a kernel in one pass), F16 on GPU
//! backends.

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
    /// (frozen weight, its transposed F16/F32 copy in `ctx`).
    pairs: Vec<(TensorId, TensorId)>,
    /// The transposed Q8_0 copies, in the CPU's fastest matmul buffer that takes them (see
    /// [`matmul_operands`]), and (frozen weight, its copy in `ctx_q8`).
    ctx_q8: Option<Context>,
    pairs_q8: Vec<(TensorId, TensorId)>,
    /// Frozen weights without a copy (transient mode).
    transient: Vec<TensorId>,
    /// (Q4_1 weight, its split's offsets in `ctx`), the Q4_0 half made inside the forward
    /// (transient mode, CPU): the Q4_0 kernel's speed for 1/8 byte per weight.
    transient_split: Vec<(TensorId, TensorId)>,
    /// (frozen weight, a Q8_0 copy in `ctx` for the forward), for base types without a fast
    /// matmul kernel (e.g. Q4_1: 76 vs 142 GFLOP/s for Q8_0 on 2 AVX-512 cores).
    forward: Vec<(TensorId, TensorId)>,
    /// On CPUs with AMX: (frozen weight, a copy of its own bytes in the AMX buffer of
    /// `ctx_amx`) for the forward — exact, and 4–7× ggml's other kernels (see [`amx_forward`]).
    ctx_amx: Option<Context>,
    forward_amx: Vec<(TensorId, TensorId)>,
    /// (Q4_1 weight, its exact split into Q4_0 (in `ctx_q4`) + per-block offsets (in `ctx`)),
    /// see [`split_q4_1`].
    split: Vec<(TensorId, TensorId, TensorId)>,
    /// The Q4_0 halves of the splits, in the CPU's fastest matmul buffer that takes them when
    /// running on the CPU (AMX, else CPU_REPACK: Q4_0 × F32 at ~180 GFLOP/s on 2 AVX-512
    /// cores, Q4_1 ~60).
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
    /// Frozen weights whose backward copy is Q8_0 (made in a context of their own, see
    /// [`matmul_operands`]).
    backward_q8: Vec<Tensor<'t>>,
    forward: Vec<(Tensor<'t>, Tensor<'t>)>,
    split: Vec<(Tensor<'t>, Tensor<'t>)>,
}

impl<'t> Plan<'t> {
    /// `forward_needs`: the frozen weights whose forward is not served otherwise (by AMX copies).
    fn new(
        ctx: &'t Context,
        frozen: &[Tensor<'t>],
        forward_needs: &[Tensor<'t>],
        mode: WeightCopies,
        forward: Forward,
        gpu: bool,
    ) -> Self {
        let mut plan = Plan {
            backward: Vec::new(),
            backward_q8: Vec::new(),
            forward: Vec::new(),
            split: Vec::new(),
        };
        for &w in forward_needs {
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
            if ty == Type::Q8_0 {
                plan.backward_q8.push(w);
                continue;
            }
            let t = ctx.new_tensor(ty, &[d_out, d_in]);
            t.set_name(&format!("{}.T", w.name()));
            plan.backward.push((w, t, ty));
        }
        plan
    }
}

/// Whether AMX's kernels take a weight of type `ty` and shape `ne` (ggml's AMX `supports_op`):
/// Q4_0/Q4_1/Q8_0 with rows in blocks of 32, K-quants with rows in blocks of 256, outputs
/// (`ne[1]`) in multiples of 32.
fn amx_takes(ty: Type, ne: [i64; 4]) -> bool {
    let block = match ty {
        Type::Q4_0 | Type::Q4_1 | Type::Q8_0 => 32,
        Type::Q4_K | Type::Q5_K | Type::Q6_K => 256,
        _ => return false,
    };
    ne[0] % block == 0 && ne[1] % 32 == 0
}

/// Tensors that only `mul_mat` reads as its weight (the splits' Q4_0 halves, the transposed
/// Q8_0 copies), given as (name, type, shape) and allocated in the CPU's fastest matmul buffer
/// type that has a kernel for every one of them ([`BufferType::cpu_matmul`]: AMX, then
/// CPU_REPACK; each attaches its kernel per tensor at allocation, and a tensor without one
/// would crash ggml on upload, e.g. Q4_0 rows not in multiples of 8, or a CPU without AVX2;
/// AMX also has shape rules, [`amx_takes`]), else in the backend's plain weight
/// buffer. `repack`: CPU_REPACK may take them (measured for the Q4_0 halves; the Q8_0 copies
/// go to AMX or plain memory). Returns the context, the tensors in order and their bytes.
fn matmul_operands(
    specs: &[(String, Type, [i64; 2])],
    repack: bool,
    backend: &Backend,
) -> Result<(Context, Vec<TensorId>, usize), ModelError> {
    let plan = |buft: BufferType| -> Result<(Context, Vec<TensorId>, usize), ModelError> {
        let c = Context::new(Capacity::tensors(specs.len() + 8))?;
        let ids: Vec<_> = specs
            .iter()
            .map(|(name, ty, ne)| {
                let t = c.new_tensor(*ty, ne);
                t.set_name(name);
                t.id()
            })
            .collect();
        let b = c.allocate(buft)?;
        Ok((c, ids, b))
    };
    if !backend.is_gpu() && !specs.is_empty() {
        for buft in BufferType::cpu_matmul().into_iter().filter(|b| repack || b.is_amx()) {
            if buft.is_amx() && !specs.iter().all(|&(_, ty, [k, m])| amx_takes(ty, [k, m, 1, 1])) {
                continue;
            }
            let p = plan(buft)?;
            if p.1.iter().all(|&t| p.0.tensor(t).has_backend_extra()) {
                return Ok(p);
            }
        }
    }
    plan(backend.weight_buffer_type())
}

/// On a CPU with AMX: a copy of each frozen weight whose type and shape AMX's kernels take
/// (Q4_0/Q4_1/Q8_0 with rows in blocks of 32, K-quants with rows in blocks of 256; 32·k
/// output rows) in the AMX buffer, for the forward: the stored values exactly (the same bytes,
/// laid out for AMX's int8 tiles), at 470–680 GFLOP/s on 2 cores against ~210 for the
/// CPU_REPACK Q4_0 split and ~110 for the stored Q8_0 output layer (bench/README.md). Costs the
/// weights' size once more (against the split's 22/20 of it). Nothing (and the split and
/// forward copies as before) without AMX, on a GPU, or if AMX does not take them after all.
#[allow(clippy::type_complexity)]
fn amx_forward(
    weights: &Weights,
    frozen: &[Tensor<'_>],
    backend: &Backend,
) -> Result<(Option<Context>, Vec<(TensorId, TensorId)>, usize), ModelError> {
    let none = (None, Vec::new(), 0);
    if backend.is_gpu() || !BufferType::cpu_matmul().iter().any(|b| b.is_amx()) {
        return Ok(none);
    }
    let ws: Vec<_> = frozen.iter().copied().filter(|w| amx_takes(w.ty(), w.ne())).collect();
    let specs: Vec<_> =
        ws.iter().map(|w| (format!("{}.amx", w.name()), w.ty(), [w.ne()[0], w.ne()[1]])).collect();
    let (ctx, ids, bytes) = matmul_operands(&specs, false, backend)?;
    if ids.iter().any(|&t| !ctx.tensor(t).has_backend_extra()) {
        return Ok(none);
    }
    let mut pairs = Vec::new();
    for (w, t) in ws.iter().zip(ids) {
        ctx.write_bytes(ctx.tensor(t), &weights.read_bytes(*w)?)?;
        pairs.push((w.id(), t));
    }
    Ok((Some(ctx), pairs, bytes))
}

/// Wᵀ [d_out, d_in] of frozen weight `w` in `ty`: dequantized, transposed, converted.
fn transposed_copy(weights: &Weights, w: Tensor<'_>, ty: Type) -> Result<Vec<u8>, ModelError> {
    let ne = w.ne();
    let (d_in, d_out) = (ne[0] as usize, ne[1] as usize);
    let x = dequantize(w.ty(), &weights.read_bytes(w)?, d_in * d_out)?; // row-major [d_out][d_in]
    Ok(quantize(ty, &transpose(&x, d_out, d_in), d_out)?)
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

/// `none`'s forward on the CPU: each Q4_1 weight's split offsets resident (Cᵀ F32
/// [d_out, d_in/32], 1/8 byte per weight), its Q4_0 half made inside the graph right before
/// the product. Nothing on a GPU backend or with `Forward::Stored`.
fn transient_split(
    mut copies: FrozenCopies,
    weights: &Weights,
    frozen: &[Tensor<'_>],
    forward: Forward,
    backend: &Backend,
) -> Result<FrozenCopies, ModelError> {
    let q4_1: Vec<_> = frozen.iter().filter(|w| w.ty() == Type::Q4_1).collect();
    if forward == Forward::Stored || backend.is_gpu() || q4_1.is_empty() {
        return Ok(copies);
    }
    let ctx = Context::new(Capacity::tensors(q4_1.len() + 8))?;
    let cs: Vec<_> = q4_1
        .iter()
        .map(|w| {
            let c = ctx.new_tensor(Type::F32, &[w.ne()[1], w.ne()[0] / 32]);
            c.set_name(&format!("{}.q4_1_offsets", w.name()));
            c
        })
        .collect();
    copies.bytes = ctx.allocate(backend.weight_buffer_type())?;
    for (w, c) in q4_1.iter().zip(cs) {
        let (_, offsets) = split_q4_1(&weights.read_bytes(**w)?);
        let (blocks, d_out) = ((w.ne()[0] / 32) as usize, w.ne()[1] as usize);
        ctx.write_f32(c, &transpose(&offsets, d_out, blocks))?;
        copies.transient_split.push((w.id(), c.id()));
    }
    copies.ctx = Some(ctx);
    Ok(copies)
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
    /// `WeightCopies::None` the forward's Q4_1 weights are split inside the graph (unless
    /// `Forward::Stored`; CPU only), other types multiplied as stored; with `Stock` every
    /// weight is multiplied as stored.
    pub fn build_with(
        weights: &Weights,
        mode: WeightCopies,
        forward: Forward,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let frozen = frozen_matmul_weights(weights);
        // No copies: ggml's own backward (stock), or each weight's copy made inside the
        // backward pass (none).
        let without_copies =
            |transient: Vec<TensorId>| FrozenCopies { transient, ..Self::empty(mode, backend) };
        match mode {
            WeightCopies::Stock => return Ok(without_copies(Vec::new())),
            WeightCopies::None => {
                let transient = without_copies(frozen.iter().map(|t| t.id()).collect());
                return transient_split(transient, weights, &frozen, forward, backend);
            }
            WeightCopies::Q8_0 | WeightCopies::F16 | WeightCopies::F32 => {}
        }
        let (ctx_amx, forward_amx, amx_bytes) = match forward {
            Forward::Split => amx_forward(weights, &frozen, backend)?,
            _ => (None, Vec::new(), 0),
        };
        // Weights the AMX copies serve need no split or forward copy.
        let served: Vec<Tensor<'_>> = frozen
            .iter()
            .copied()
            .filter(|w| !forward_amx.iter().any(|&(f, _)| f == w.id()))
            .collect();
        let ctx = Context::new(Capacity::tensors(3 * frozen.len() + 8))?;
        let plan = Plan::new(&ctx, &frozen, &served, mode, forward, backend.is_gpu());
        let mut bytes = ctx.allocate(backend.weight_buffer_type())?;
        let halves: Vec<_> = plan
            .split
            .iter()
            .map(|(w, _)| (format!("{}.q4_0", w.name()), Type::Q4_0, [w.ne()[0], w.ne()[1]]))
            .collect();
        let (ctx_q4, q_ids, q_bytes) = matmul_operands(&halves, true, backend)?;
        let copies_q8: Vec<_> = plan
            .backward_q8
            .iter()
            .map(|w| (format!("{}.T", w.name()), Type::Q8_0, [w.ne()[1], w.ne()[0]]))
            .collect();
        let (ctx_q8, t_ids, t_bytes) = matmul_operands(&copies_q8, false, backend)?;
        bytes += q_bytes + t_bytes + amx_bytes;
        let mut pairs_q8 = Vec::new();
        for (&w, t) in plan.backward_q8.iter().zip(t_ids) {
            ctx_q8.write_bytes(ctx_q8.tensor(t), &transposed_copy(weights, w, Type::Q8_0)?)?;
            pairs_q8.push((w.id(), t));
        }
        let mut pairs = Vec::new();
        for (w, t, ty) in plan.backward {
            ctx.write_bytes(t, &transposed_copy(weights, w, ty)?)?;
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
            ctx: Some(ctx),
            pairs,
            ctx_q8: Some(ctx_q8),
            pairs_q8,
            forward,
            ctx_amx,
            forward_amx,
            split,
            ctx_q4: Some(ctx_q4),
            bytes,
            ..Self::empty(mode, backend)
        })
    }

    /// No copies of any kind, for `mode` on `backend`.
    fn empty(mode: WeightCopies, backend: &Backend) -> Self {
        FrozenCopies {
            mode,
            ctx: None,
            pairs: Vec::new(),
            ctx_q8: None,
            pairs_q8: Vec::new(),
            transient: Vec::new(),
            transient_split: Vec::new(),
            forward: Vec::new(),
            ctx_amx: None,
            forward_amx: Vec::new(),
            split: Vec::new(),
            ctx_q4: None,
            bytes: 0,
            cpu: !backend.is_gpu(),
        }
    }

    /// The matmul weights as llama.cpp's CPU backend lays out the same file: on a CPU with AMX
    /// the AMX copies of [`amx_forward`] (llama.cpp puts every weight AMX takes in its AMX
    /// buffer, the output layer included), nothing elsewhere. With
    /// [`crate::ggml::use_forward_copies`], a forward graph then runs llama.cpp's kernels: for
    /// comparing logits (parity tests). CPU_REPACK's Q4_0/Q4_K layouts are not mirrored.
    pub fn llama_cpp_kernels(weights: &Weights, backend: &Backend) -> Result<Self, ModelError> {
        let frozen = frozen_matmul_weights(weights);
        let (ctx_amx, forward_amx, bytes) = amx_forward(weights, &frozen, backend)?;
        Ok(FrozenCopies {
            ctx_amx,
            forward_amx,
            bytes,
            ..Self::empty(WeightCopies::Stock, backend)
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
        for (ctx, pairs) in [(&self.ctx, &self.pairs), (&self.ctx_q8, &self.pairs_q8)] {
            if let Some(ctx) = ctx {
                for &(w, t) in pairs {
                    m.insert(weights.tensor(w), FrozenGrad::Transposed(ctx.tensor(t)));
                }
            }
        }
        if let Some(ctx) = &self.ctx_amx {
            for &(w, t) in &self.forward_amx {
                m.insert_forward(weights.tensor(w), ctx.tensor(t));
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
        if let Some(ctx) = &self.ctx {
            for &(w, c) in &self.transient_split {
                m.insert_forward_split_transient(weights.tensor(w), ctx.tensor(c));
            }
        }
        // The CPU makes Q8_0 copies (the default mode's numbers, from one pass over W); GPU
        // backends F16 ones (ggml's casts).
        let transient = if self.cpu { Type::Q8_0 } else { Type::F16 };
        for &w in &self.transient {
            m.insert(weights.tensor(w), FrozenGrad::Transient(transient));
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

    /// Q8_0 copies go to AMX when the CPU has it and every shape suits its kernels (both
    /// dimensions multiples of 32), else to plain memory (never CPU_REPACK); the Q4_0 halves
    /// to AMX or CPU_REPACK. On a CPU without AMX the first half checks the fallback only.
    #[test]
    fn matmul_operands_take_the_fastest_buffer_that_fits() {
        let backend = Backend::cpu(1).unwrap();
        let amx = BufferType::cpu_matmul().iter().any(|b| b.is_amx());
        let spec = |ty, ne: [i64; 2]| (format!("t{}x{}", ne[0], ne[1]), ty, ne);
        let extra = |specs: &[(String, Type, [i64; 2])]| {
            let (c, ids, _) = matmul_operands(specs, false, &backend).unwrap();
            ids.iter().map(|&t| c.tensor(t).has_backend_extra()).collect::<Vec<_>>()
        };
        assert_eq!(extra(&[spec(Type::Q8_0, [64, 256]), spec(Type::Q8_0, [576, 1536])]), [amx; 2]);
        // One shape AMX does not take (40 rows) keeps the whole set in plain memory.
        assert_eq!(extra(&[spec(Type::Q8_0, [64, 256]), spec(Type::Q8_0, [64, 40])]), [false; 2]);
        let (c, ids, _) = matmul_operands(&[spec(Type::Q4_0, [64, 256])], true, &backend).unwrap();
        let fast = !BufferType::cpu_matmul().is_empty();
        assert!(!fast || c.tensor(ids[0]).has_backend_extra(), "Q4_0 half in plain memory");
    }

    /// A product that a rearranged weight's kernel does not take (AMX: a non-contiguous
    /// activation) is refused by `Backend::compute` with the node's name; ggml's scheduler
    /// would abort. Needs a CPU with AMX (skipped otherwise).
    #[test]
    fn unsupported_products_are_refused_not_aborted() {
        if !BufferType::cpu_matmul().iter().any(|b| b.is_amx()) {
            eprintln!("no AMX on this CPU: skipped");
            return;
        }
        let mut backend = Backend::cpu(1).unwrap();
        let spec = [("w".to_string(), Type::Q8_0, [64i64, 64])];
        let (c, ids, _) = matmul_operands(&spec, false, &backend).unwrap();
        let w = c.tensor(ids[0]);
        let g_ctx = Context::new(Capacity::graph(8, 16, false)).unwrap();
        let x = g_ctx.new_f32("x", &[32, 64]).set_input();
        let y = g_ctx.mul_mat(w, g_ctx.transpose(x)).set_name("odd product").set_output();
        let mut g = g_ctx.new_graph(16, false);
        g.build_forward_expand(y);
        let err = backend.compute(&g).err().expect("refused").to_string();
        assert!(err.contains("odd product"), "{err}");
    }

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
