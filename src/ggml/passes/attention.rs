//! Attention fusion: the pass that puts the fused CPU kernels of [`crate::ggml::attention`]
//! in place of the attention ops ggml's autodiff built (forward and backward).
//!
//! The pattern, per layer (ggml order, see the kernels' docs for shapes): forward `S = K·Q`
//! (MUL_MAT), `P = soft_max_ext(S, mask, scale)` (no sinks, max_bias 0), `O = Vᵀ·P`
//! (MUL_MAT); backward `∂Vᵀ = out_prod(P, ∂O)`, `∂P = out_prod(Vᵀ, transpose(∂O))`,
//! `∂S = soft_max_back(∂P, P)`, `∂Q = out_prod(K, transpose(∂S))`, `∂K = out_prod(Q, ∂S)`,
//! and nothing else reads S, P, ∂P or ∂S. A block that differs in any way is left as it is.

use std::collections::HashSet;

use llama_cpp_sys_2 as sys;

use crate::ggml::attention::{f32_param, kernel_layout};
use crate::ggml::context::{Context, Graph, Tensor, Type};

/// What [`fuse_attention`] changed: nodes that no longer have to run, and the new backward ops
/// (they read forward activations: recomputation must redirect them).
#[derive(Default)]
pub(crate) struct Fused<'a> {
    pub dead: HashSet<usize>,
    pub backward: Vec<Tensor<'a>>,
}

/// `a` is the tensor `b`.
fn is(a: Option<Tensor<'_>>, b: Tensor<'_>) -> bool {
    a.is_some_and(|a| a.raw() == b.raw())
}

/// One attention block of a graph, forward and backward, matched node for node.
struct Block<'a> {
    // Forward: inputs, scores, probabilities, output.
    q: Tensor<'a>,
    k: Tensor<'a>,
    vt: Tensor<'a>,
    mask: Tensor<'a>,
    kq: Tensor<'a>,
    p: Tensor<'a>,
    o: Tensor<'a>,
    // Backward: output gradient in, ∂P and ∂S between, ∂Q, ∂K and ∂Vᵀ out.
    d_o: Tensor<'a>,
    dp: Tensor<'a>,
    ds: Tensor<'a>,
    ds_t: Tensor<'a>,
    dq: Tensor<'a>,
    dk: Tensor<'a>,
    dvt: Tensor<'a>,
}

/// Readers of each tensor among a graph's nodes.
type Readers<'a> = std::collections::HashMap<usize, Vec<Tensor<'a>>>;

/// The forward half of a block whose output is the node `o`: (q, k, vᵀ, mask, S, P).
#[allow(clippy::type_complexity)]
fn match_forward<'a>(
    o: Tensor<'a>,
) -> Option<(Tensor<'a>, Tensor<'a>, Tensor<'a>, Tensor<'a>, Tensor<'a>, Tensor<'a>)> {
    if o.op() != sys::GGML_OP_MUL_MAT {
        return None;
    }
    let (vt, p) = (o.src(0)?, o.src(1)?);
    if p.op() != sys::GGML_OP_SOFT_MAX || p.src(2).is_some() {
        return None;
    }
    let (kq, mask) = (p.src(0)?, p.src(1)?);
    if kq.op() != sys::GGML_OP_MUL_MAT || f32_param(p, 1) != 0.0 {
        return None;
    }
    let (k, q) = (kq.src(0)?, kq.src(1)?);
    let (qn, kn, vn, on) = (q.ne(), k.ne(), vt.ne(), o.ne());
    let (d, t, h, g) = (qn[0], qn[1], qn[2], kn[2]);
    let shapes = kn[0] == d
        && kn[1] == t
        && vn == [t, d, g, 1]
        && on == [d, t, h, 1]
        && g > 0
        && h % g == 0
        && mask.ne()[0] == t
        && mask.ne()[1] >= t
        && mask.ne()[2] == 1;
    (shapes && [q, k, vt, mask, o].iter().all(|&x| kernel_layout(x)))
        .then_some((q, k, vt, mask, kq, p))
}

/// The whole block whose forward output is the node `o`, if its backward matches too.
fn match_block<'a>(o: Tensor<'a>, rd: &Readers<'a>) -> Option<Block<'a>> {
    let readers_of = |t: Tensor<'a>| rd.get(&(t.raw() as usize)).cloned().unwrap_or_default();
    let (q, k, vt, mask, kq, p) = match_forward(o)?;
    let on = o.ne();
    let (kq_r, p_r) = (readers_of(kq), readers_of(p));
    if kq_r.len() != 1 || p_r.len() != 3 {
        return None;
    }
    let dvt = p_r.iter().copied().find(|n| n.op() == sys::GGML_OP_OUT_PROD && is(n.src(0), p))?;
    let ds =
        p_r.iter().copied().find(|n| n.op() == sys::GGML_OP_SOFT_MAX_BACK && is(n.src(1), p))?;
    let (d_o, dp) = (dvt.src(1)?, ds.src(0)?);
    let dp_ok = dp.op() == sys::GGML_OP_OUT_PROD
        && is(dp.src(0), vt)
        && dp.src(1).is_some_and(|x| x.op() == sys::GGML_OP_TRANSPOSE && is(x.src(0), d_o))
        && readers_of(dp).len() == 1;
    if !dp_ok
        || f32_param(ds, 0) != f32_param(p, 0)
        || d_o.ne() != on
        || d_o.ty() != Type::F32
        || d_o.nb()[0] != 4
    {
        return None;
    }
    let ds_r = readers_of(ds);
    let ds_t = ds_r.iter().copied().find(|n| n.op() == sys::GGML_OP_TRANSPOSE)?;
    let dk = ds_r
        .iter()
        .copied()
        .find(|n| n.op() == sys::GGML_OP_OUT_PROD && is(n.src(0), q) && is(n.src(1), ds))?;
    let ds_t_r = readers_of(ds_t);
    let dq = ds_t_r
        .first()
        .copied()
        .filter(|n| ds_t_r.len() == 1 && n.op() == sys::GGML_OP_OUT_PROD && is(n.src(0), k))?;
    let (d, t, h) = (on[0], on[1], on[2]);
    if ds_r.len() != 2 || dq.ne() != on || dk.ne() != on || dvt.ne() != [t, d, h, 1] {
        return None;
    }
    Some(Block { q, k, vt, mask, kq, p, o, d_o, dp, ds, ds_t, dq, dk, dvt })
}

/// Rewrites every attention block of `graph` that matches the pattern (module docs); others
/// are left as they are.
pub(crate) fn fuse_attention<'a>(ctx: &'a Context, graph: &Graph<'a>) -> Fused<'a> {
    let rd = graph.readers();
    let mut fused = Fused::default();
    for i in 0..graph.n_nodes() {
        let Some(b) = match_block(graph.node(i), &rd) else {
            continue;
        };
        let scale = f32_param(b.p, 0);
        let fwd = ctx.fused_attention(b.q, b.k, b.vt, b.mask, scale);
        let bwd = ctx.fused_attention_back(b.q, b.k, b.vt, b.mask, b.d_o, scale);
        let on = b.o.ne();
        let (nd, nt, h) = (on[0] as usize, on[1] as usize, on[2] as usize);
        let block = nd * nt * h * 4;
        // SAFETY: each rewritten node keeps its type and shape and becomes a view of a region
        // of the new op's result laid out like its own contiguous data (∂Vᵀ's blocks are
        // [T, D]); no computation holds the graph while it is rebuilt.
        unsafe {
            b.o.rewrite_as_view(fwd, 0, [4, 4 * nd, 4 * nd * nt, 4 * nd * nt * h]);
            b.dq.rewrite_as_view(bwd, 0, [4, 4 * nd, 4 * nd * nt, 4 * nd * nt * h]);
            b.dk.rewrite_as_view(bwd, block, [4, 4 * nd, 4 * nd * nt, 4 * nd * nt * h]);
            b.dvt.rewrite_as_view(bwd, 2 * block, [4, 4 * nt, 4 * nd * nt, 4 * nd * nt * h]);
        }
        for x in [b.kq, b.p, b.dp, b.ds, b.ds_t] {
            fused.dead.insert(x.raw() as usize);
        }
        if let Some(x) = b.dp.src(1) {
            fused.dead.insert(x.raw() as usize);
        }
        fused.backward.push(bwd);
    }
    fused
}
