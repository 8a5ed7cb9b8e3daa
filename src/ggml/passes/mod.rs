//! Graph passes: rewrites of a built training graph (forward + ggml's autodiff backward)
//! before it is allocated.
//!
//! - [`frozen`]: the input gradients of frozen quantized matmuls as products with a transposed
//!   copy (persistent or made inside the backward), faster forward copies and exact Q4_1
//!   splits, and the CPU's faster forms of small products; it drives the other two.
//! - [`attention`]: the attention ops replaced by the fused CPU kernels of
//!   [`super::attention`].
//! - [`loss`]: ggml's one-hot cross-entropy and its backward as kernels that read label ids
//!   ([`super::sparse_ce`]).
//! - [`geglu`]: GEGLU differentiated through a GELU built from ops with a backward, then
//!   restored to ggml's op for the forward.
//! - [`recompute`]: activation recomputation (backward nodes read duplicates of the forward's
//!   intermediates, recomputed from the residual stream).
//!
//! # Why they live inside the FFI fence
//! A pass changes nodes in place: a node keeps its identity (the handles the trainer holds for
//! losses, gradients and statistics stay valid, and so do its consumers) but gets a new op and
//! new sources. That is sound only if the node's type and shape stay (checked at run time by
//! the `rewrite_as_*` primitives), no allocated computation holds the node (true while a graph
//! is being rebuilt), and every new source lives as long as the node. Rust's lifetimes cannot
//! express the last point for `Copy` tensor handles that are covariant in their context's
//! lifetime, so the primitives are `unsafe` and their callers, these passes, stay behind the
//! same fence as the FFI, each call with its SAFETY note. Everything else in them is plain
//! graph matching over the safe wrappers.

pub(crate) mod attention;
pub mod frozen;
pub mod geglu;
pub(crate) mod loss;
pub mod recompute;
