//! The loss read from label ids: ggml's `cross_entropy_loss(logits, labels)` and its autodiff
//! backward `cross_entropy_loss_back(g, logits, labels)` replaced by the CPU kernels of
//! [`crate::ggml::sparse_ce`], which read the labels' ids ([n_rows] i32) instead of the
//! one-hot matrix [n_vocab, n_rows]. The old nodes become views of the new results, so their
//! handles (the loss the trainer reads, the gradient its consumers read) stay valid; the
//! one-hot input is then read by nothing and drops out of the rebuilt graph.

use llama_cpp_sys_2 as sys;

use crate::ggml::context::{Context, Graph, Tensor};

/// Rewrites the loss over `labels` and its backward in `graph` to read `ids`; returns how many
/// nodes changed (2 for a training step, 1 for a forward-only graph).
pub(crate) fn read_label_ids<'a>(
    ctx: &'a Context,
    graph: &Graph<'a>,
    labels: Tensor<'a>,
    ids: Tensor<'a>,
) -> usize {
    let is_labels = |t: Option<Tensor<'a>>| t.is_some_and(|t| t.raw() == labels.raw());
    let mut changed = 0;
    for i in 0..graph.n_nodes() {
        let node = graph.node(i);
        let new = match node.op() {
            sys::GGML_OP_CROSS_ENTROPY_LOSS if is_labels(node.src(1)) => {
                let logits = node.src(0).expect("loss reads logits");
                let rows = logits.ne()[1];
                ctx.scale(ctx.sum(ctx.cross_entropy_rows(logits, ids)), 1.0 / rows as f32)
            }
            sys::GGML_OP_CROSS_ENTROPY_LOSS_BACK if is_labels(node.src(2)) => {
                let (g, logits) = (node.src(0).expect("grad"), node.src(1).expect("logits"));
                ctx.cross_entropy_back_ids(g, logits, ids)
            }
            _ => continue,
        };
        let ne = node.ne();
        let nb =
            [4, 4 * ne[0] as usize, 4 * (ne[0] * ne[1]) as usize, 4 * (ne[0] * ne[1]) as usize];
        // SAFETY: the new result has the node's type (F32) and shape, laid out contiguously
        // like the node; no computation holds the graph while it is rebuilt.
        unsafe { node.rewrite_as_view(new, 0, nb) };
        changed += 1;
    }
    changed
}
