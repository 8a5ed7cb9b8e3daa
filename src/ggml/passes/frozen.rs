//! The backward of frozen matmuls, rewritten for speed.
//!
//! ggml's autodiff hard-codes the input gradient of `y = mul_mat(W, x)` as
//! `out_prod(W, transpose(∂L/∂y))`. For a frozen quantized `W` that kernel dequantizes each
//! weight row once per token and is ~24× slower than a plain matmul. After
//! [`Graph::build_backward_expand`], [`rebuild_frozen_backward`] turns every such node into
//! `mul_mat(Wᵀ, ∂L/∂y)` with `Wᵀ` [d_out, d_in] either a persistent transposed compute copy
//! (Q8_0/F16/F32, made once at load) or a transient one: `W` dequantized and transposed inside
//! the backward pass.
//!
//! The transient copy must exist only in the backward part of the graph, right before the
//! node that reads it, or the allocator would keep every layer's copy alive at once. Node
//! order is ggml's, so the graph is rebuilt: the old graph's nodes are re-added in their
//! original order, and each rewritten node pulls its new sources in just before itself.
//!
//! On the CPU backend ([`FrozenMap::cpu_kernels`]) the rebuild also swaps in kernels that
//! ggml's autodiff cannot choose: attention fused into two custom ops
//! ([`crate::ggml::attention`]), products with a small inner dimension by a register-tiled
//! kernel ([`small_inner`], [`Context::out_prod_tiled`]), and transposes by a tiled copy
//! ([`Context::cont_cpu`]).

use std::collections::{HashMap, HashSet};

use llama_cpp_sys_2 as sys;

use super::recompute::Segments;
use crate::ggml::context::{Context, Graph, Tensor, Type};
use crate::ggml::tiled;

/// How ∂L/∂x = Wᵀ·∂L/∂y is computed for one frozen weight.
#[derive(Debug, Clone, Copy)]
pub enum FrozenGrad<'a> {
    /// A persistent transposed copy Wᵀ, ggml shape [d_out, d_in].
    Transposed(Tensor<'a>),
    /// Dequantize W and transpose it into this type inside the backward pass (one at a time):
    /// Q8_0 (by a CPU kernel; F16 where it cannot run) or F16/F32 (by ggml's casts).
    Transient(Type),
}

/// Frozen weights of a graph and how their input gradients are computed, keyed by the
/// tensor that the forward's `mul_mat` reads.
#[derive(Debug, Default)]
pub struct FrozenMap<'a> {
    map: HashMap<usize, FrozenGrad<'a>>,
    /// Faster-to-multiply copies of frozen weights (same shape) for the forward pass.
    forward: HashMap<usize, Tensor<'a>>,
    /// Exact splits W = W₀ + C·blocksum for the forward pass: (W₀ [d_in, d_out], Cᵀ F32
    /// [d_out, d_in/32]); see `train::copies::split_q4_1`.
    split: HashMap<usize, (Tensor<'a>, Tensor<'a>)>,
    /// Q4_1 weights split the same way with the Q4_0 half made inside the graph, right before
    /// the product (CPU kernels; `--weight-copies none`): weight → its resident offsets Cᵀ.
    transient_split: HashMap<usize, Tensor<'a>>,
    /// The graph runs on the CPU backend: products with a small inner dimension run on the
    /// tiled kernel where the build has one (see [`small_inner`]).
    pub cpu_kernels: bool,
    /// With `cpu_kernels`: fuse attention (see [`super::attention`]). Default on.
    pub fuse_attention: bool,
    /// With `cpu_kernels`: the loss's one-hot labels and their ids; the loss and its backward
    /// then read the ids (see [`super::loss`]).
    pub label_ids: Option<(Tensor<'a>, Tensor<'a>)>,
}

impl<'a> FrozenMap<'a> {
    pub fn new() -> Self {
        Self {
            map: HashMap::new(),
            forward: HashMap::new(),
            split: HashMap::new(),
            transient_split: HashMap::new(),
            cpu_kernels: false,
            fuse_attention: true,
            label_ids: None,
        }
    }
    /// Uses `copy` (same shape as `w`, another type) wherever the forward multiplies by `w`.
    pub fn insert_forward(&mut self, w: Tensor<'a>, copy: Tensor<'a>) {
        assert_eq!(w.ne(), copy.ne(), "forward copy {copy:?} does not match {w:?}");
        self.forward.insert(w.raw() as usize, copy);
    }
    /// Computes `w·x` as `w0·x + C·s` wherever the forward multiplies by `w`, with s the sums
    /// of x over blocks of 32 inputs: `w0` has w's shape, `ct` = Cᵀ is F32 [d_out, d_in/32]
    /// (C·s is a product with a small inner dimension, the d_in/32 blocks, see
    /// [`small_inner`]).
    pub fn insert_forward_split(&mut self, w: Tensor<'a>, w0: Tensor<'a>, ct: Tensor<'a>) {
        let ne = w.ne();
        assert!(
            w0.ne() == ne
                && ct.ne()[1] * 32 == ne[0]
                && ct.ne()[0] == ne[1]
                && ct.ty() == Type::F32,
            "split {w0:?} + {ct:?} does not match {w:?}"
        );
        self.split.insert(w.raw() as usize, (w0, ct));
    }
    /// Computes `w·x` as [`FrozenMap::insert_forward_split`] does, with the Q4_0 half made
    /// from the Q4_1 `w` inside the graph right before the product
    /// ([`Context::q4_1_split_q4_0`]); CPU kernels only (ignored without
    /// [`FrozenMap::cpu_kernels`]).
    pub fn insert_forward_split_transient(&mut self, w: Tensor<'a>, ct: Tensor<'a>) {
        let ne = w.ne();
        assert!(
            w.ty() == Type::Q4_1
                && ct.ne()[1] * 32 == ne[0]
                && ct.ne()[0] == ne[1]
                && ct.ty() == Type::F32,
            "transient split of {w:?} with offsets {ct:?}"
        );
        self.transient_split.insert(w.raw() as usize, ct);
    }
    pub fn insert(&mut self, w: Tensor<'a>, how: FrozenGrad<'a>) {
        if let FrozenGrad::Transposed(t) = how {
            let (ne_w, ne_t) = (w.ne(), t.ne());
            assert!(
                ne_w[0] == ne_t[1] && ne_w[1] == ne_t[0] && ne_w[2] == 1 && ne_t[2] == 1,
                "transposed copy {t:?} does not match {w:?}"
            );
        }
        self.map.insert(w.raw() as usize, how);
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A contiguous transpose of `t`: the source of a transpose view when that is contiguous,
/// else a copy.
/// With `cpu`, the copy is made by the CPU's tiled kernel ([`Context::cont_cpu`]).
fn transposed<'a>(ctx: &'a Context, t: Tensor<'a>, cpu: bool) -> Tensor<'a> {
    if t.op() == sys::GGML_OP_TRANSPOSE {
        if let Some(src) = t.src(0) {
            if src.is_contiguous() {
                return src;
            }
        }
    }
    let tt = if cpu && t.ty() == Type::F32 && t.ne()[3] == 1 {
        ctx.cont_cpu(ctx.transpose(t))
    } else {
        ctx.cont(ctx.transpose(t))
    };
    // Named after the source (the profile sorts LoRA's products by the names they read).
    let name: String = t.name().chars().take(48).collect();
    tt.set_name(&format!("{name} (T)"))
}

/// Inner dimensions up to which a product runs on the tiled kernel on the CPU (ggml's
/// out_prod was 1.3–1.4× faster than its matmul kernel at 48, `bench/small_k.rs`).
const SMALL_INNER: i64 = 48;

/// True when `mul_mat(a [k, m], b [k, n])` (F32, 2-D) has a small inner dimension k and a
/// long output column m: LoRA's B·u (k = rank), Aᵀ·∂u, the Q4_1 split's offsets (k = d_in/32).
/// ggml's matmul kernels compute each output as a dot product of length k, which at k ≤ 32
/// is mostly per-output overhead; ggml's `out_prod(aᵀ [m, k], bᵀ [n, k])` streams whole
/// output columns (k multiply-adds of length m each) and ran 1.3–2.8× faster on the training
/// shapes here, and [`Context::out_prod_tiled`] (the same operands, the output kept in
/// registers while k is walked) faster still (`bench/small_k.rs`, 2 threads).
fn small_inner(k: i64, m: i64) -> bool {
    k <= SMALL_INNER && m >= 64
}

/// Turns `node` (F32 [m, n], an OUT_PROD of the frozen backward) into Σ_i mul_mat(a_i, b_i)
/// over `parts` (each product F32 [m, n]): MUL_MAT itself for one part, else ADD(Σ earlier
/// parts, last part).
fn rewrite_as_sum_of_products<'a>(
    ctx: &'a Context,
    node: Tensor<'a>,
    mut parts: Vec<(Tensor<'a>, Tensor<'a>)>,
) {
    let (last_a, last_b) = parts.pop().expect("at least one part");
    let acc = parts.into_iter().map(|(a, b)| ctx.mul_mat(a, b)).reduce(|acc, p| ctx.add(acc, p));
    // SAFETY: `node` is an OUT_PROD node of a graph in `ctx` whose result is F32 [m, n]; each
    // product and their sum have exactly that type and shape, so rewriting op and sources in
    // place keeps every consumer valid. No computation holds the graph while it is rebuilt.
    unsafe {
        match acc {
            None => node.rewrite_as_mul_mat(last_a, last_b),
            Some(acc) => node.rewrite_as_add(acc, ctx.mul_mat(last_a, last_b)),
        }
    }
}

/// The operands of `mul_mat(t [k, m], dy [k, n])` in chunks of `chunk` inner rows (a
/// multiple of t's block size), whose products sum to the product: views of whole blocks of
/// t's rows and of dy's rows.
fn inner_chunk_products<'a>(
    ctx: &'a Context,
    t: Tensor<'a>,
    dy: Tensor<'a>,
    chunk: i64,
) -> Vec<(Tensor<'a>, Tensor<'a>)> {
    let (k, n) = (t.ne()[0], dy.ne()[1]);
    assert!(
        chunk % t.ty().block_size() as i64 == 0 && k % t.ty().block_size() as i64 == 0,
        "inner chunks of {t:?}: {chunk} rows"
    );
    let row = |rows: i64| t.ty().row_size(rows as usize).expect("whole blocks");
    (0..k)
        .step_by(chunk as usize)
        .map(|c0| {
            let c = chunk.min(k - c0);
            let tc = ctx.view_2d(t, c, t.ne()[1], t.nb()[1], row(c0)); // [c, m]
            let dyc = ctx.view_2d(dy, c, n, dy.nb()[1], c0 as usize * dy.nb()[0]); // [c, n]
            (tc, dyc)
        })
        .collect()
}

/// Inner rows per chunk of a frozen backward product split along its inner dimension (see
/// `Rewriter::inner_chunks`).
const INNER_CHUNK: i64 = 4096;
/// Bytes of ∂L/∂y (F32) from which such a product is split.
const INNER_SPLIT_BYTES: i64 = 64 << 20;

/// Output rows up to which an F32 `mul_mat(w [k, m], x [k, n])` runs on the tiled kernel
/// (LoRA's u = A·x, m = rank): ggml's matmul kernels reach ~40 GFLOP/s on it here.
const SHORT_OUTPUT: i64 = 64;

/// A batched `out_prod(a [n, k, B_a], transpose(g) [p, k, B])` (F32, 3-D) whose left factor
/// is much smaller than the gradient it multiplies: cheaper as `mul_mat(aᵀ, g)`.
fn batched_small_left(a: Tensor<'_>, b: Tensor<'_>, node: Tensor<'_>) -> bool {
    let n = |t: Tensor<'_>| t.ne().iter().product::<i64>();
    let f32_3d = |t: Tensor<'_>| t.ty() == Type::F32 && t.ne()[3] == 1;
    f32_3d(a)
        && f32_3d(b)
        && f32_3d(node)
        && node.ne()[2] > 1
        && b.op() == sys::GGML_OP_TRANSPOSE
        && a.nb()[0] == 4
        && n(a) <= n(b)
        && b.ne()[2] % a.ne()[2] == 0
}

/// Bytes of a transient dequantized F32 copy above which it is made in chunks.
pub(crate) const TRANSIENT_CHUNK_BYTES: i64 = 8 << 20;

/// Number of row chunks for a transient copy of a [d_in, d_out] weight.
pub fn transient_chunks(d_in: i64, d_out: i64) -> i64 {
    let bytes = d_in * d_out * 4;
    ((bytes + TRANSIENT_CHUNK_BYTES - 1) / TRANSIENT_CHUNK_BYTES).clamp(1, d_out)
}

/// What [`rebuild_frozen_backward`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// OUT_PROD nodes turned into MUL_MAT with a persistent transposed copy.
    pub persistent: usize,
    /// OUT_PROD nodes turned into MUL_MAT with a transient dequantized copy.
    pub transient: usize,
    /// Other 2-D OUT_PROD nodes (LoRA weight gradients) turned into MUL_MAT.
    pub out_prods: usize,
    /// Forward MUL_MAT nodes switched to a faster copy of their weight (or an exact split).
    pub forward: usize,
    /// Forward nodes duplicated for recomputation in the backward.
    pub recomputed: usize,
    /// Products with a small inner dimension turned into outer-product sums.
    pub outer: usize,
    /// Attention blocks fused into CPU kernels.
    pub attention: usize,
    /// GPU matmuls given contiguous F32 copies of strided operands.
    pub contiguous: usize,
    /// Loss nodes (forward and backward) rewritten to read label ids.
    pub loss: usize,
}

/// Rewrites the frozen-weight input gradients of `graph` (which must already hold its
/// backward pass) and returns a new graph with the same nodes in the same order, the new
/// sources inserted right before their consumers, plus `extra` outputs appended.
///
/// Gradient bookkeeping of the old graph (`grad`, `grad_acc`, `ggml_graph_reset`) does not
/// carry over: read the gradient tensors you need from the old graph first, and set the
/// loss gradient (the old graph's `grad_acc(loss)`) to 1 yourself.
pub fn rebuild_frozen_backward<'a>(
    ctx: &'a Context,
    graph: &Graph<'a>,
    frozen: &FrozenMap<'a>,
    extra: &[Tensor<'a>],
) -> (Graph<'a>, RewriteStats) {
    rebuild_backward(ctx, graph, frozen, extra, None)
}

/// [`rebuild_frozen_backward`], and with `recompute` (the boundaries of the forward's
/// segments, e.g. the residual stream between blocks), every node outside the segments (the
/// backward pass) reads duplicates of the segments' intermediate results instead of the
/// originals (see [`Segments`]): activations are recomputed in the backward instead of kept.
pub fn rebuild_backward<'a>(
    ctx: &'a Context,
    graph: &Graph<'a>,
    frozen: &FrozenMap<'a>,
    extra: &[Tensor<'a>],
    recompute: Option<&[Tensor<'a>]>,
) -> (Graph<'a>, RewriteStats) {
    let size = rebuilt_size(graph, frozen, extra.len(), recompute.is_some());
    let mut out = ctx.new_graph(size, false);
    let (first, mut due) = schedule_extras(graph, extra);
    for t in first {
        out.build_forward_expand(t);
    }
    let mut rw = Rewriter {
        ctx,
        frozen,
        stats: RewriteStats::default(),
        transposes: HashMap::new(),
        contiguous: HashMap::new(),
        block_sums: HashMap::new(),
    };
    if let Some((labels, ids)) = frozen.label_ids.filter(|_| frozen.cpu_kernels) {
        rw.stats.loss = super::loss::read_label_ids(ctx, graph, labels, ids);
    }
    // Attention fused into CPU kernels (forward and backward); the nodes it makes redundant
    // are skipped below.
    let fused = if frozen.cpu_kernels && frozen.fuse_attention {
        super::attention::fuse_attention(ctx, graph)
    } else {
        Default::default()
    };
    rw.stats.attention = fused.backward.len();
    // The forward's frozen matmuls first (faster copies, exact splits), so that recomputed
    // segments duplicate the rewritten forward.
    for i in 0..graph.n_nodes() {
        rw.forward_matmul(graph.node(i));
    }
    let mut recompute = recompute.map(|b| Recompute::new(b, &fused.backward));
    for i in 0..graph.n_nodes() {
        let node = graph.node(i);
        if !fused.dead.contains(&(node.raw() as usize)) {
            if let Some(r) = recompute.as_mut() {
                r.redirect_backward(ctx, node);
            }
            rw.frozen_input_grad(node);
            rw.out_prod(node);
            rw.gpu_contiguous(node);
            out.build_forward_expand(node);
        }
        for t in due.remove(&i).unwrap_or_default() {
            out.build_forward_expand(t);
        }
    }
    rw.stats.recomputed = recompute.map_or(0, |r| r.segments.n_dups());
    let out = drop_unused_views(ctx, out, size);
    crate::ggml::extra::flatten_view_chains(&out);
    (out, rw.stats)
}

/// In a forward-only `graph`, points every `mul_mat` of a weight that has a forward copy in
/// `frozen` at that copy, in place (no rebuild, no other rewrite); returns how many. For
/// comparing grit's forward with llama.cpp's, which multiplies the same copies' layout (see
/// `train::copies::FrozenCopies::llama_cpp_kernels`).
pub fn use_forward_copies<'a>(graph: &Graph<'a>, frozen: &FrozenMap<'a>) -> usize {
    let mut n = 0;
    for i in 0..graph.n_nodes() {
        let node = graph.node(i);
        if node.op() != sys::GGML_OP_MUL_MAT {
            continue;
        }
        let (Some(w), Some(x)) = (node.src(0), node.src(1)) else {
            continue;
        };
        if let Some(&copy) = frozen.forward.get(&(w.raw() as usize)) {
            // SAFETY: the copy has w's shape (checked by `insert_forward`), so MUL_MAT(copy, x)
            // has the node's type and shape; the graph is not allocated while it changes.
            unsafe { node.rewrite_as_mul_mat(copy, x) };
            n += 1;
        }
    }
    n
}

/// Room in the rebuilt graph for the old nodes, the new sources and the extras.
fn rebuilt_size(graph: &Graph<'_>, frozen: &FrozenMap<'_>, n_extra: usize, dups: bool) -> usize {
    // ≤ 2 new sources per frozen rewrite (8 chunks at most), the split's sums and products, and
    // ≤ 3 new nodes per product turned into an outer-product sum (a transposed copy and two
    // views); with recomputation up to one duplicate per node.
    let n_mul_mat =
        (0..graph.n_nodes()).filter(|&i| graph.node(i).op() == sys::GGML_OP_MUL_MAT).count();
    let dups = if dups { graph.n_nodes() } else { 0 };
    graph.size().max(
        graph.n_nodes()
            + 2 * frozen.len() * 8
            + 8 * (frozen.split.len() + frozen.transient_split.len())
            + 3 * n_mul_mat
            + 128
            + n_extra
            + 16
            + dups,
    )
}

/// Where each extra output goes: right after the last old node it depends on, not at the end
/// (a gradient accumulation or statistic then runs as soon as its inputs exist, so those inputs
/// are freed early instead of all staying alive until the end of the graph, which raises peak
/// memory and, with hundreds of small tensors, exhausts ggml's allocator). Returns the extras
/// that depend on no old node (they go first) and the others by old node index.
#[allow(clippy::type_complexity)]
fn schedule_extras<'a>(
    graph: &Graph<'a>,
    extra: &[Tensor<'a>],
) -> (Vec<Tensor<'a>>, HashMap<usize, Vec<Tensor<'a>>>) {
    let index: HashMap<usize, usize> =
        (0..graph.n_nodes()).map(|i| (graph.node(i).raw() as usize, i)).collect();
    let mut due: HashMap<usize, Vec<Tensor<'a>>> = HashMap::new();
    let mut first = Vec::new();
    for &t in extra {
        match last_dependency(t, &index) {
            Some(i) => due.entry(i).or_default().push(t),
            None => first.push(t),
        }
    }
    (first, due)
}

/// Recomputation during the rebuild: backward nodes read the segments' duplicates.
struct Recompute<'a> {
    segments: Segments<'a>,
    /// The fused attention backward ops, which read forward activations too.
    fused_backward: HashMap<usize, Tensor<'a>>,
    redirected: HashSet<usize>,
}

impl<'a> Recompute<'a> {
    fn new(boundaries: &[Tensor<'a>], fused_backward: &[Tensor<'a>]) -> Self {
        Recompute {
            segments: Segments::new(boundaries),
            fused_backward: fused_backward.iter().map(|t| (t.raw() as usize, *t)).collect(),
            redirected: HashSet::new(),
        }
    }

    /// Points `node` (if it is a backward node) at the duplicates of the forward results it
    /// reads, and likewise a fused attention backward op that it reads.
    fn redirect_backward(&mut self, ctx: &'a Context, node: Tensor<'a>) {
        if self.segments.is_forward(node) {
            return;
        }
        if let Some(&b) = node.src(0).and_then(|s| self.fused_backward.get(&(s.raw() as usize))) {
            if self.redirected.insert(b.raw() as usize) {
                // SAFETY: as below.
                unsafe { self.segments.redirect(ctx, b) };
            }
        }
        // SAFETY: the graph is being rebuilt, no computation holds it.
        unsafe { self.segments.redirect(ctx, node) };
    }
}

/// The in-place rewrites of one rebuild, with the copies they share.
struct Rewriter<'r, 'a> {
    ctx: &'a Context,
    frozen: &'r FrozenMap<'a>,
    stats: RewriteStats,
    /// Transposed copies made for the out_prod rewrites, shared by nodes with the same source
    /// (q/k/v and gate/up read the same activations).
    transposes: HashMap<usize, Tensor<'a>>,
    /// Contiguous copies of GPU matmul operands (shared by the nodes that read one).
    contiguous: HashMap<usize, Tensor<'a>>,
    /// Block sums of the split forward's inputs (shared by q/k/v, gate/up).
    block_sums: HashMap<usize, Tensor<'a>>,
}

/// F32 and 2-D.
fn flat(t: Tensor<'_>) -> bool {
    t.ne()[2] == 1 && t.ne()[3] == 1 && t.ty() == Type::F32
}

impl<'a> Rewriter<'_, 'a> {
    /// A shared contiguous transpose of `t` (see [`transposed`]).
    fn transpose_of(&mut self, t: Tensor<'a>) -> Tensor<'a> {
        let (ctx, cpu) = (self.ctx, self.frozen.cpu_kernels);
        *self.transposes.entry(t.raw() as usize).or_insert_with(|| transposed(ctx, t, cpu))
    }

    /// A forward `mul_mat(W, x)` of a frozen weight with a faster copy or an exact split, or
    /// (CPU) a product with a small inner dimension.
    fn forward_matmul(&mut self, node: Tensor<'a>) {
        if node.op() != sys::GGML_OP_MUL_MAT {
            return;
        }
        let (Some(w), Some(x)) = (node.src(0), node.src(1)) else {
            return;
        };
        let cpu = self.frozen.cpu_kernels;
        if let Some(&copy) = self.frozen.forward.get(&(w.raw() as usize)) {
            // SAFETY: the copy has w's shape, so MUL_MAT(copy, x) has the node's
            // type and shape; the graph is not allocated while rebuilt.
            unsafe { node.rewrite_as_mul_mat(copy, x) };
            self.stats.forward += 1;
        } else if let Some(&(w0, c)) = self.frozen.split.get(&(w.raw() as usize)) {
            self.split_forward(node, x, w0, c);
        } else if let Some(&c) =
            self.frozen.transient_split.get(&(w.raw() as usize)).filter(|_| cpu)
        {
            self.split_forward(node, x, self.ctx.q4_1_split_q4_0(w), c);
        } else if cpu
            && flat(w)
            && flat(x)
            && flat(node)
            && (small_inner(w.ne()[0], w.ne()[1]) || tiled::TILED_SIMD && w.ne()[1] <= SHORT_OUTPUT)
        {
            // LoRA's B·u and the like (a small inner dimension, see `small_inner`) and LoRA's
            // u = A·x (few outputs per token, the rank, and a long inner dimension). On the
            // tiled kernel wᵀ is read through a view (the kernel copies it per thread: no
            // small copy for the graph to keep) and x in place.
            let xt = self.ctx.transpose(x); // [n, k]
            if tiled::TILED_SIMD && w.ne()[0] * w.ne()[1] <= tiled::GATHER_MAX {
                // Σ_k wᵀ[:, k]·x[k, :] is F32 [m, n] like the node.
                self.rewrite_tiled(node, self.ctx.out_prod_tiled(self.ctx.transpose(w), xt));
            } else if small_inner(w.ne()[0], w.ne()[1]) {
                let wt = self.transpose_of(w); // [m, k]
                                               // SAFETY: OUT_PROD(wᵀ [m, k], xᵀ [n, k]) is F32 [m, n] like the node; the
                                               // graph is not allocated while rebuilt.
                unsafe { node.rewrite_as_out_prod(wt, xt) };
                self.stats.outer += 1;
            }
        }
    }

    /// Turns `node` into a copy of `prod`, a tiled-kernel node of its type and shape, and
    /// marks the name (`--profile` sorts products by the names they read and would otherwise
    /// see a custom op).
    fn rewrite_tiled(&mut self, node: Tensor<'a>, prod: Tensor<'a>) {
        // SAFETY: callers pass a product with the node's values, type and shape; the graph is
        // not allocated while rebuilt.
        unsafe { node.rewrite_as_copy_of(prod) };
        let name: String = node.name().chars().take(48).collect();
        node.set_name(&format!("{name} (tiled)"));
        self.stats.outer += 1;
    }

    /// `W·x` as `W₀·x + C·s` for a 2-D x (see [`FrozenMap::insert_forward_split`]).
    fn split_forward(&mut self, node: Tensor<'a>, x: Tensor<'a>, w0: Tensor<'a>, c: Tensor<'a>) {
        let ctx = self.ctx;
        let ne = x.ne();
        if ne[2] != 1 || ne[3] != 1 {
            return;
        }
        // s [d_in/32, T]: x summed over each block of 32 inputs (shared by q/k/v, gate/up).
        let s = *self.block_sums.entry(x.raw() as usize).or_insert_with(|| {
            let xc = if x.is_contiguous() { x } else { ctx.cont(x) };
            ctx.reshape_2d(
                ctx.sum_rows(ctx.reshape_3d(xc, 32, ne[0] / 32, ne[1])),
                ne[0] / 32,
                ne[1],
            )
        });
        // C·s [d_out, T] from Cᵀ [d_out, d_in/32].
        let cs = if self.frozen.cpu_kernels && small_inner(ne[0] / 32, c.ne()[0]) {
            if tiled::TILED_SIMD {
                ctx.out_prod_tiled(c, ctx.transpose(s))
            } else {
                ctx.out_prod(c, ctx.transpose(s))
            }
        } else {
            ctx.mul_mat(transposed(ctx, c, false), s)
        };
        // SAFETY: both terms are F32 [d_out, T] like the node (w0 has w's shape); the
        // graph is not allocated while rebuilt.
        unsafe { node.rewrite_as_add(ctx.mul_mat(w0, x), cs) };
        self.stats.forward += 1;
    }

    /// ggml's input gradient of a frozen matmul, `out_prod(W, transpose(∂L/∂y))`, as
    /// `mul_mat(Wᵀ, ∂L/∂y)` with a persistent or a transient Wᵀ.
    fn frozen_input_grad(&mut self, node: Tensor<'a>) {
        if node.op() != sys::GGML_OP_OUT_PROD {
            return;
        }
        let (Some(w), Some(dy_t)) = (node.src(0), node.src(1)) else {
            return;
        };
        let Some(&how) = self.frozen.map.get(&(w.raw() as usize)) else {
            return;
        };
        if dy_t.op() != sys::GGML_OP_TRANSPOSE {
            return;
        }
        let dy = dy_t.src(0).expect("transpose view has a source"); // ∂L/∂y [d_out, T]
        match how {
            FrozenGrad::Transposed(t) => {
                self.stats.persistent += 1;
                // Wᵀ·∂L/∂y, in one piece or as Σ_c Wᵀ_c·∂L/∂y_c.
                let parts = self.inner_chunks(t, dy).unwrap_or_else(|| vec![(t, dy)]);
                rewrite_as_sum_of_products(self.ctx, node, parts);
            }
            FrozenGrad::Transient(ty) => {
                self.stats.transient += 1;
                self.transient_input_grad(node, w, dy, ty);
            }
        }
        assert_eq!(node.ne()[0], w.ne()[0]);
    }

    /// The products Wᵀ_c·∂L/∂y_c over chunks c of the inner dimension d_out, when Wᵀ·∂L/∂y
    /// has a long one and many tokens (the output layer: d_out = the vocabulary): ggml's
    /// kernels walk the whole inner dimension per output tile, and at 1024 tokens the 8-bit
    /// copy of ∂L/∂y they make (53 MB) is read from memory for every tile: the output layer's
    /// backward took 11× its time at 256 tokens on the AVX2 path. In chunks of
    /// [`INNER_CHUNK`] rows each product's operands stay in cache. CPU only, and only for a
    /// copy in ggml's row layout (not in a repacking buffer such as AMX's, whose kernels are
    /// fast there anyway).
    fn inner_chunks(&self, t: Tensor<'a>, dy: Tensor<'a>) -> Option<Vec<(Tensor<'a>, Tensor<'a>)>> {
        let (k, tokens) = (t.ne()[0], dy.ne()[1]);
        if !self.frozen.cpu_kernels
            || t.has_backend_extra()
            || k <= INNER_CHUNK
            || k * tokens * 4 < INNER_SPLIT_BYTES
            || k % t.ty().block_size() as i64 != 0
            || dy.ne()[2] != 1
            || dy.ne()[3] != 1
        {
            return None;
        }
        Some(inner_chunk_products(self.ctx, t, dy, INNER_CHUNK))
    }

    /// ∂L/∂x = Wᵀ·∂L/∂y with W dequantized and transposed into `ty` inside the backward.
    /// Large weights (the output layer: 576 × 49152 here) are done in chunks of output rows,
    /// ∂L/∂x = Σ_c W_cᵀ·∂L/∂y_c, so only one chunk's dequantized copy is alive at a time.
    ///
    /// Q8_0 on the CPU is one pass of grit's kernel ([`Context::transposed_q8_0`]: W's blocks
    /// to Wᵀ's Q8_0 blocks, the persistent Q8_0 copy's bytes) and the product runs on ggml's
    /// Q8_0 kernel; otherwise (a GPU backend, or rows not in blocks of 32) ggml's casts make
    /// an F16 copy.
    fn transient_input_grad(&mut self, node: Tensor<'a>, w: Tensor<'a>, dy: Tensor<'a>, ty: Type) {
        let ctx = self.ctx;
        let (d_in, d_out) = (w.ne()[0], w.ne()[1]);
        let q8 = ty == Type::Q8_0 && self.frozen.cpu_kernels && d_out % 32 == 0;
        // On GPU backends in one piece: ggml-vulkan computes the chunked form wrong (row views
        // at byte offsets into the quantized weight; measured on lavapipe: ∂B of layer 0 2.6×
        // the CPU's on the default model, exact in one piece).
        let n_chunks = if self.frozen.cpu_kernels { transient_chunks(d_in, d_out) } else { 1 };
        let mut rows = (d_out + n_chunks - 1) / n_chunks;
        if q8 {
            rows = (rows + 31) / 32 * 32; // Q8_0 rows of Wᵀ in whole blocks
        }
        let mut parts = Vec::new();
        let mut r0 = 0;
        while r0 < d_out {
            let n = rows.min(d_out - r0);
            let (wc, dyc) = if n == d_out {
                (w, dy)
            } else {
                // Rows r0..r0+n of W [d_in, d_out] (whole quantized rows) and of ∂L/∂y
                // [d_out, T] (a strided view).
                (
                    ctx.view_2d(w, d_in, n, w.nb()[1], r0 as usize * w.nb()[1]),
                    ctx.view_2d(dy, n, dy.ne()[1], dy.nb()[1], r0 as usize * dy.nb()[0]),
                )
            };
            let wt = if q8 {
                ctx.transposed_q8_0(wc) // [n, d_in]
            } else {
                // A cast, not a cpy into a new tensor: that tensor would be a graph leaf, and
                // ggml-alloc allocates leafs up front, keeping every layer's copy alive at once.
                let deq = ctx.cast(wc, Type::F32); // [d_in, n]
                let ty = if ty == Type::Q8_0 { Type::F16 } else { ty };
                ctx.cast(ctx.transpose(deq), ty) // [n, d_in]
            };
            parts.push((wt, dyc));
            r0 += n;
        }
        rewrite_as_sum_of_products(ctx, node, parts);
    }

    /// The remaining OUT_PROD nodes (LoRA's weight gradients, attention's batched products)
    /// as the faster `mul_mat` where one is known to be faster.
    fn out_prod(&mut self, node: Tensor<'a>) {
        if node.op() != sys::GGML_OP_OUT_PROD {
            return;
        }
        let (Some(a), Some(b)) = (node.src(0), node.src(1)) else {
            return;
        };
        let cpu = self.frozen.cpu_kernels;
        let all_flat = flat(a) && flat(b) && flat(node);
        // A 2-D outer-product sum out_prod(a [n, k], b [p, k]) = Σ_k a[:, k]·b[:, k]ᵀ [n, p]:
        // the LoRA matmuls' weight gradients ∂A = out_prod(x, ∂u) (k = tokens) and
        // ∂B = out_prod(s·u, ∂L/∂y), and their input gradient A·∂u (k = rank). On x86 CPUs the
        // tiled kernel reads them as stored, in the orientation whose output columns are long
        // (∂B as (out_prod(∂L/∂y, s·u))ᵀ), 3–4× faster than ggml's out_prod at k = rank
        // (`bench/small_k.rs`) and without the transposed copies of x and ∂L/∂y that ggml's
        // matmul kernels needed for the weight gradients.
        if cpu && all_flat && tiled::TILED_SIMD {
            let prod = if a.nb()[0] == 4 && (a.ne()[0] >= b.ne()[0] || b.nb()[0] != 4) {
                Some(self.ctx.out_prod_tiled(a, b))
            } else if b.nb()[0] == 4 {
                Some(self.ctx.out_prod_tiled_t(b, a))
            } else {
                None
            };
            if let Some(prod) = prod {
                // The same sum as the node's out_prod, F32 [n, p] (the transposed form writes
                // (Σ_k b[:, k]·a[:, k]ᵀ)ᵀ, the same values).
                self.rewrite_tiled(node, prod);
                return;
            }
        }
        // Elsewhere: ggml's matmul kernels run out_prod(a, b) as mul_mat(aᵀ, bᵀ) several times
        // faster than its out_prod loop, transposes included (measured 2026-11-29: keeping
        // out_prod for ∂B alone, which needs the big transpose of ∂L/∂y, costs 0.3 s more per
        // step than the transpose saves; so does ∂B as transpose(out_prod(∂L/∂y, s·u)), whose
        // vectors are long: +0.2 s). Attention's batched products were tried too: 0.04 s/step
        // faster, eaten by the transposes they need. With a small inner dimension (LoRA's
        // A·∂u: k = rank) ggml's out_prod is the faster form (see `small_inner`): kept.
        let keep = cpu && a.nb()[0] == 4 && small_inner(a.ne()[1], a.ne()[0]);
        if all_flat && !keep {
            let at = self.transpose_of(a); // [k, n]
            let bt = self.transpose_of(b); // [k, p]
                                           // SAFETY: MUL_MAT(aᵀ [k, n], bᵀ [k, p]) is F32 [n, p] like the node; the graph is
                                           // not allocated while rebuilt.
            unsafe { node.rewrite_as_mul_mat(at, bt) };
            self.stats.out_prods += 1;
        } else if cpu && batched_small_left(a, b, node) {
            // Attention's ∂Q = out_prod(K, transpose(∂S)) and ∂P = out_prod(Vᵀ, transpose(∂O)):
            // per head a small left factor (head_dim × n_kv) against a transposed gradient. As
            // mul_mat(aᵀ, g) only `a` (small) is transposed and the gradient is read as stored;
            // tinyBLAS then runs them ~2× faster than out_prod. (The other two, ∂K and ∂V,
            // contract over the query axis, which would need the big score-shaped tensors
            // transposed: kept.)
            let g = b.src(0).expect("transpose view has a source");
            let g = if g.is_contiguous() { g } else { self.ctx.cont_cpu(g) };
            let at = transposed(self.ctx, a, true);
            // SAFETY: MUL_MAT(aᵀ [k, n, B_a], g [k, p, B]) broadcasts a's batches over g's like
            // out_prod does (batch i uses a's batch i / (B / B_a)): F32 [n, p, B] like the
            // node; the graph is not allocated while rebuilt.
            unsafe { node.rewrite_as_mul_mat(at, g) };
            self.stats.out_prods += 1;
        } else if !cpu
            && a.ty() == Type::F32
            && b.ty() == Type::F32
            && !(a.is_contiguous() && b.is_contiguous())
        {
            // GPU backends: attention's batched products (∂Q, ∂K, ∂V, ∂P) read permuted or
            // transposed views, and ggml-vulkan's out_prod takes only contiguous operands: the
            // scheduler would run all of them on the CPU, with copies of the score-sized
            // tensors to and from the device. As mul_mat(aᵀ [k, n, B_a], bᵀ [k, p, B]) they
            // stay on the device; a transposed view of a contiguous tensor is read as stored.
            let at = transposed(self.ctx, a, false);
            let bt = transposed(self.ctx, b, false);
            // SAFETY: MUL_MAT broadcasts src0's batches over src1's exactly as OUT_PROD
            // broadcasts a's over b's (batch i uses batch i / (B / B_a)): F32 [n, p, B] like
            // the node; the graph is not allocated while rebuilt.
            unsafe { node.rewrite_as_mul_mat(at, bt) };
            self.stats.out_prods += 1;
        }
    }

    /// GPU backends convert a matmul operand whose first two dimensions are not contiguous to
    /// F16 before multiplying (ggml-vulkan does); contiguous F32 copies keep such products in
    /// F32. (Measured on lavapipe, this did not change the GPU step gradients' difference to
    /// the CPU's, ≤ 3.1e-3 on an F32 model: that comes from elsewhere.)
    fn gpu_contiguous(&mut self, node: Tensor<'a>) {
        if self.frozen.cpu_kernels || node.op() != sys::GGML_OP_MUL_MAT {
            return;
        }
        let (Some(a), Some(b)) = (node.src(0), node.src(1)) else {
            return;
        };
        let ctx = self.ctx;
        let mut fix = |t: Tensor<'a>| {
            if t.ty() == Type::F32 && !dim01_contiguous(t) {
                *self.contiguous.entry(t.raw() as usize).or_insert_with(|| ctx.cont(t))
            } else {
                t
            }
        };
        let (a2, b2) = (fix(a), fix(b));
        if a2.raw() != a.raw() || b2.raw() != b.raw() {
            // SAFETY: the same op on contiguous copies of the same values: type and shape
            // unchanged; the graph is not allocated while rebuilt.
            unsafe { node.rewrite_as_mul_mat(a2, b2) };
            self.stats.contiguous += 1;
        }
    }
}

/// Whether `t`'s first two dimensions are laid out densely (rows of contiguous elements, one
/// after another), as GPU matmul kernels read an operand without converting it.
fn dim01_contiguous(t: Tensor<'_>) -> bool {
    let (ne, nb) = (t.ne(), t.nb());
    let es = t.ty().row_size(1).unwrap_or(0);
    nb[0] == es && nb[1] == es * ne[0] as usize
}

/// The graph without its view nodes (VIEW, RESHAPE, PERMUTE, TRANSPOSE) that no node reads.
///
/// A rewrite leaves such views behind: `out_prod(W, transpose(∂L/∂y))` becomes
/// `mul_mat(Wᵀ, ∂L/∂y)`, and the old `transpose(∂L/∂y)` node stays in the graph with no
/// consumer. ggml's allocator frees a tensor only once all its views have been consumed, so
/// every such leftover kept its source (the gradient of each frozen matmul's output, the
/// logits' gradient) allocated to the end of the graph: ~200 MiB on the default model at
/// 256 tokens.
fn drop_unused_views<'a>(ctx: &'a Context, graph: Graph<'a>, size: usize) -> Graph<'a> {
    let is_view_op = |t: Tensor<'a>| {
        matches!(
            t.op(),
            sys::GGML_OP_VIEW
                | sys::GGML_OP_RESHAPE
                | sys::GGML_OP_PERMUTE
                | sys::GGML_OP_TRANSPOSE
        )
    };
    let nodes: Vec<Tensor<'a>> = (0..graph.n_nodes()).map(|i| graph.node(i)).collect();
    let mut readers: HashMap<usize, usize> =
        graph.readers().into_iter().map(|(k, v)| (k, v.len())).collect();
    let mut dropped = HashSet::new();
    // Reverse order: dropping a view may leave the view it was made from unread.
    for t in nodes.iter().rev() {
        let unread = readers.get(&(t.raw() as usize)).copied().unwrap_or(0) == 0;
        if unread && is_view_op(*t) && t.flags() & sys::GGML_TENSOR_FLAG_OUTPUT as i32 == 0 {
            dropped.insert(t.raw() as usize);
            for k in 0..10 {
                if let Some(s) = t.src(k) {
                    if let Some(n) = readers.get_mut(&(s.raw() as usize)) {
                        *n -= 1;
                    }
                }
            }
        }
    }
    if dropped.is_empty() {
        return graph;
    }
    let mut out = ctx.new_graph(size, false);
    for t in nodes {
        if !dropped.contains(&(t.raw() as usize)) {
            out.build_forward_expand(t);
        }
    }
    out
}

/// The highest index (in the old graph) of the nodes `t` depends on, looking through tensors
/// that are not old nodes (new ops, views, leafs); None when it depends on none.
fn last_dependency(t: Tensor<'_>, index: &HashMap<usize, usize>) -> Option<usize> {
    let mut best = None;
    let mut seen = HashSet::new();
    let mut stack = vec![t];
    while let Some(x) = stack.pop() {
        if !seen.insert(x.raw() as usize) {
            continue;
        }
        if let Some(&i) = index.get(&(x.raw() as usize)) {
            best = best.max(Some(i));
            continue;
        }
        for k in 0..10 {
            if let Some(s) = x.src(k) {
                stack.push(s);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{Backend, Capacity};

    /// The chunked product of a Q8_0 Wᵀ (views at whole blocks of its rows, the last chunk
    /// shorter) equals the product in one piece, up to the order of the sums.
    #[test]
    fn inner_chunks_sum_to_the_product() {
        let mut backend = Backend::cpu(2).unwrap();
        let (k, m, n) = (320i64, 48i64, 7i64);
        let ctx = Context::new(Capacity::graph(32, 32, false)).unwrap();
        let t = ctx.new_tensor(Type::Q8_0, &[k, m]).set_input();
        let dy = ctx.new_f32("dy", &[k, n]).set_input();
        let whole = ctx.mul_mat(t, dy).set_output();
        let parts = inner_chunk_products(&ctx, t, dy, 128);
        assert_eq!(parts.len(), 3);
        let products = parts.into_iter().map(|(a, b)| ctx.mul_mat(a, b));
        let sum = products.reduce(|a, p| ctx.add(a, p)).unwrap().set_output();
        let mut g = ctx.new_graph(32, false);
        g.build_forward_expand(whole);
        g.build_forward_expand(sum);
        let mut c = backend.compute(&g).unwrap();
        // Q8_0 blocks: an f16 scale, then 32 int8 values.
        let blocks = (k * m / 32) as usize;
        let mut bytes = Vec::with_capacity(blocks * 34);
        for b in 0..blocks {
            bytes.extend_from_slice(&half::f16::from_f32(0.01 + b as f32 * 1e-4).to_le_bytes());
            bytes.extend((0..32).map(|i| ((b * 31 + i * 7) % 255) as u8));
        }
        c.write_bytes(t, &bytes).unwrap();
        let v: Vec<f32> = (0..k * n).map(|i| ((i * 13 % 97) as f32 / 97.0) - 0.5).collect();
        c.write_f32(dy, &v).unwrap();
        c.run().unwrap();
        let (x, y) = (c.read_f32(whole).unwrap(), c.read_f32(sum).unwrap());
        let scale = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let err = x.iter().zip(&y).fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(scale > 0.1 && err < 1e-5 * scale, "max |Δ| {err} at scale {scale}");
    }
}
