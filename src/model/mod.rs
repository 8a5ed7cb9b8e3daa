//! Architectures grit trains (LLaMA, Qwen2, Qwen3 and Phi-3), their weights and the training forward graph
//! with LoRA adapters.
//!
//! # Using it
//! ```no_run
//! use grit::ggml::{Backend, Context};
//! use grit::gguf::GgufFile;
//! use grit::model::{Batch, GraphOptions, LoraConfig, LoraSet, Outputs, TrainGraph, Weights};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut backend = Backend::cpu(0)?;
//! let file = GgufFile::open("model.gguf")?;
//! let weights = Weights::load(&file, &backend)?;                 // frozen, as stored
//! let lora = LoraSet::new(&weights, &LoraConfig::default(), &backend)?;
//! lora.init(0)?;                                                 // A random, B = 0
//!
//! let tokens = vec![1, 2, 3, 4];
//! let batch = Batch::causal(&tokens, &[1, 2, 3], &[2, 3, 4])?;    // rows 1..3 predict 2..4
//! let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), false))?;
//! let rows = Outputs::Rows(batch.n_rows());
//! let g = TrainGraph::build(&ctx, &weights, Some(&lora), batch.n_tokens(), GraphOptions::loss(rows));
//! let mut run = backend.compute(&g.graph)?;
//! g.set_inputs(&mut run, &batch)?;
//! run.run()?;
//! let loss = run.read_f32(g.loss.unwrap())?[0];
//! # Ok(()) }
//! ```
//!
//! # Decisions
//! - The graph mirrors llama.cpp's (src/models/llama.cpp, build_attn_mha without
//!   flash-attention, build_lora_mm) so llama.cpp is the parity reference, with no KV cache:
//!   K and V are the current tokens' (causal attention over the batch itself).
//! - A batch is one token stream of `n_tokens`. Several sequences (batch > 1, or packed
//!   documents) are placed one after the other; the caller's additive mask
//!   [n_tokens, n_tokens] keeps them apart and positions restart per sequence. Activations
//!   stay 2-D [n_embd, n_tokens], which the CPU backend's quantized matmul requires.
//! - The LoRA term is `y = W0·x + B·(s·(A·x))`: the scale is applied to the rank-r
//!   intermediate (r × n_tokens values, not d_out × n_tokens), and `u = A·x` is exposed per
//!   module ([`LoraTap`]) for GRIT's statistics.
//! - Only the rows whose next token is trained are gathered (`get_rows`) before the output
//!   projection, so prompt tokens cost no vocabulary-sized work and get no gradient.
//! - The loss is ggml's `cross_entropy_loss` against one-hot labels: it is numerically
//!   stable (log-softmax inside), fused, and has a fused backward ((softmax − labels)/rows).
//!   Its value is the mean over trained rows. The one-hot matrix costs n_vocab × n_rows
//!   floats of input (≈ 50 MB for 49k × 256, 200 MB at 1024 rows), so on the CPU the step
//!   graph's rewrite makes the loss and its backward read the label ids instead
//!   (`TrainGraph::label_ids`, `ggml::passes::loss`); GPU graphs keep ggml's op.

mod hparams;
mod info;
mod llama;
mod lora;
mod tiny;
mod weights;

pub use hparams::{Arch, LlamaHparams};
pub use info::ModelInfo;
pub use llama::{
    causal_mask, dropout_mask, Batch, DropoutInput, DropoutMask, GraphOptions, LoraTap, Outputs,
    TrainGraph,
};
pub use lora::{lora_scale, LoraConfig, LoraModule, LoraSet, ModuleId, Target};
pub use tiny::{write_tiny_model, TinySpec, TinyWindow};
pub use weights::{GateUp, Layer, Qkv, Weights};

use crate::ggml::GgmlError;
use crate::gguf::GgufError;

/// Why a model cannot be loaded or trained. Messages name the tensor, key or architecture.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Ggml(#[from] GgmlError),
    #[error("architecture '{arch}' cannot be trained by grit: {missing}")]
    UnsupportedArch { arch: String, missing: String },
    #[error("{file}: missing tensor '{tensor}'")]
    MissingTensor { file: String, tensor: String },
    #[error("{file}: tensor '{tensor}' has shape {got:?}, expected {expected:?}")]
    Shape { file: String, tensor: String, expected: Vec<i64>, got: Vec<i64> },
    #[error("{file}: tensor '{tensor}' has type {ty}, which ggml cannot convert to f32")]
    TensorType { file: String, tensor: String, ty: String },
    #[error("{file}: invalid hyper-parameter {key}: {msg}")]
    Hparam { file: String, key: String, msg: String },
    #[error("{file}: cannot read tensor data: {err}")]
    Io { file: String, err: std::io::Error },
    #[error("invalid LoRA configuration: {0}")]
    Lora(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("invalid tiny model: {0}")]
    Tiny(String),
}
