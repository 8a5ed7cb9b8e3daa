//! Safe wrappers over the ggml FFI used by grit's training graphs.
//!
//! ggml builds a graph of tensor operations in a *context* (a memory pool for tensor
//! metadata), allocates tensor data in *backend buffers* and computes the graph on a
//! *backend* (CPU, CUDA, Vulkan, Metal). This module wraps exactly what grit needs, and all
//! ggml FFI outside `src/gguf/` lives here (every `unsafe` block carries a `// SAFETY:` note).
//!
//! # Pieces
//! - [`Context`]: an owned ggml context created with `no_alloc` (tensor metadata only). Ops are
//!   methods on the context the result lives in: `ctx.mul_mat(w, x)`. [`Context::allocate`]
//!   gives the context's tensors persistent storage (base weights, adapter parameters); the
//!   buffer is owned by the context and freed with it.
//! - [`Tensor`]: a `Copy` handle to a tensor, tied by lifetime to the context that owns it.
//!   [`TensorId`] is the same handle without the lifetime, for structs that own their context
//!   (`Weights`, `LoraSet`); [`Context::tensor`] turns it back into a [`Tensor`].
//! - [`Graph`]: a computation graph, invariant in its lifetime so it can never outlive any
//!   tensor it references.
//! - [`Backend`]: the one place where the compute device is chosen (CPU, or the GPU backend
//!   compiled in with the `cuda`/`vulkan`/`metal` features, with the CPU as fallback for ops
//!   the GPU lacks). It owns a `ggml_backend_sched`, which allocates graph tensors in a
//!   compute buffer and runs the graph.
//! - [`Computation`]: an allocated graph, borrowed from the backend: set inputs, run, read
//!   outputs. Reads and writes are checked (size, type, membership in the graph), so no data
//!   pointer can dangle.
//! - [`GgufWriter`] and [`quantize`]/[`dequantize`]: writing GGUF files (tiny test models,
//!   LoRA adapters) and converting between F32 and ggml's block formats.
//!
//! # Decisions
//! - Contexts are always `no_alloc`: data lives in backend buffers, never in the context
//!   pool, so the same code runs on any backend.
//! - Shape preconditions of the ops are checked in Rust with `assert!` (a programming error
//!   in graph construction panics with the shapes involved instead of aborting the process
//!   inside ggml). Errors that depend on input (files, sizes of user data, allocation
//!   failures) are [`GgmlError`] values.
//! - A context's capacity (number of tensor objects, graph size) is fixed at creation and
//!   checked before each op; running out panics with the capacity to raise.
//! - Base weights go to `ggml_backend_cpu_buffer_type()` on the CPU (never CPU_REPACK, whose
//!   tensors support only `mul_mat`), or the GPU's default buffer type.

mod attention;
mod backend;
mod context;
mod extra;
mod gguf_write;
pub mod passes;
pub mod profile;
mod sparse_ce;
mod tiled;
mod transient;

pub use backend::{
    cpu_only_nodes, devices, resolve_gpu, Backend, BackendOptions, BufferType, Computation, Device,
    DeviceInfo,
};
pub use context::{Capacity, Context, Graph, RopeMode, RopeParams, Tensor, TensorId, Type};
pub use gguf_write::{dequantize, quantize, GgufWriter};
pub use passes::frozen::{
    rebuild_backward, rebuild_frozen_backward, transient_chunks, use_forward_copies, FrozenGrad,
    FrozenMap, RewriteStats,
};
pub use passes::recompute::Segments;

use std::path::PathBuf;

/// Errors from ggml that depend on input or resources (not on graph-construction bugs).
#[derive(Debug, thiserror::Error)]
pub enum GgmlError {
    #[error("ggml could not create a context of {bytes} bytes")]
    ContextInit { bytes: usize },
    #[error("cannot allocate {bytes} bytes of {buffer_type} memory for {what}")]
    Alloc { what: String, buffer_type: String, bytes: usize },
    #[error("{0}")]
    NoDevice(String),
    #[error("graph node '{node}' is a CPU-only kernel and cannot run on the {backend} backend (a graph built for the CPU was given to a GPU backend)")]
    CpuOnlyOp { node: String, backend: String },
    #[error("graph node '{node}' ({op}) cannot run on the {backend} backend: its weight sits in a buffer rearranged for a matmul kernel that does not take this shape or operand")]
    Unsupported { node: String, op: String, backend: String },
    #[error("ggml could not initialise the {0} backend")]
    BackendInit(String),
    #[error("graph computation failed with ggml status {0}")]
    Compute(i32),
    #[error("tensor '{tensor}' holds {expected} bytes but {got} bytes were given/requested")]
    Size { tensor: String, expected: usize, got: usize },
    #[error("tensor '{tensor}' has type {actual}, expected {expected}")]
    TensorType { tensor: String, actual: String, expected: String },
    #[error("tensor '{0}' has no data (it is not allocated)")]
    NotAllocated(String),
    #[error("tensor '{0}' does not belong to this graph or context")]
    Foreign(String),
    #[error("tensor '{0}' is not contiguous; make a contiguous copy (`cont`) to read it")]
    NotContiguous(String),
    #[error("cannot quantize to {ty}: {why}")]
    Quantize { ty: String, why: String },
    #[error("{}: {msg}", .path.display())]
    Gguf { path: PathBuf, msg: String },
}
