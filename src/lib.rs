//! grit: fine-tune and serve LLaMA-family models on the hardware people own.
//!
//! The library is laid out by architecture (see `docs/ARCHITECTURE.md`):
//! - [`llama`]: the fenced FFI that llama-cpp-2 does not wrap (logging, system info, multi-adapter).
//! - [`gguf`]: a safe reader over ggml's GGUF API (validation, metadata, tensor index).
//! - [`fetch`]: the default model and demo data, fetched from PyPI packages and checked by sha256.
//! - [`infer`]: text generation and chat on llama-cpp-2.
//! - [`data`]: training data formats, chat templating, masking and packing.
//! - [`ggml`]: safe wrappers over ggml (contexts, tensors, graphs, backends) for training.
//! - [`model`]: architectures (llama, qwen2) and their forward graphs with LoRA.
//! - [`serve`]: `grit serve`, the OpenAI-compatible server (scheduler, adapters, metrics).
//! - [`adapter`]: adapter files: GGUF and PEFT read/write, merge, inspect, provenance.
//! - [`eval`]: `grit eval` (perplexity, masked loss, accuracy, drift, retention fit) on llama-cpp-2.
//! - [`report`]: `grit report` (an HTML page of plots over training runs).
//! - [`cli`]: the `grit` command line (clap derive).

// `unsafe` only inside the FFI fence (`ggml`, `gguf`, `llama`), each block with a SAFETY note.
#![deny(unsafe_code)]

pub mod adapter;
pub mod cli;
pub mod data;
pub mod eval;
pub mod fetch;
#[allow(unsafe_code)]
pub mod ggml;
#[allow(unsafe_code)]
pub mod gguf;
pub mod grit;
pub mod infer;
#[allow(unsafe_code)]
pub mod llama;
pub mod model;
pub mod report;
pub mod rng;
pub mod rundir;
pub mod serve;
pub mod tempdir;
pub mod train;

/// grit's version, as recorded in exported adapters and reports.
/// The cause of an error from a library whose error types differ per call (plotting, archives,
/// safetensors), kept as the `source` of grit's own error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
