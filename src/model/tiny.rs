//! Tiny random models written as GGUF files, loadable by llama.cpp and by grit: the subject
//! of parity tests and gradient checks. The tokenizer (and so the vocabulary) is copied from a
//! real model, because llama.cpp needs one to load a model.

use std::path::Path;

use crate::ggml::{quantize, GgufWriter, Type};
use crate::gguf::{GgufFile, Value};

use super::hparams::Arch;
use super::lora::init_rng;
use super::ModelError;

/// The shape and contents of a tiny model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    pub arch: Arch,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    /// Size of one attention head when it is not n_embd / n_head (Qwen3's are wider: then
    /// `attention.key_length`/`value_length` are written and q is n_head × head_dim wide).
    pub head_dim: Option<usize>,
    pub n_ctx: usize,
    /// Type of the 2-D matrices (token embeddings included); norms and biases stay F32.
    /// Quantized types need every matrix row (n_embd, n_head × head_dim, n_ff) to be a
    /// multiple of the block size (256 for K-quants).
    pub weight_type: Type,
    /// Use the token embeddings as output projection (no `output.weight`).
    pub tied_output: bool,
    /// q/k/v biases (always written for qwen2).
    pub qkv_bias: bool,
    /// One `attn_qkv` tensor instead of attn_q/attn_k/attn_v (always for phi3, as its
    /// converter writes it).
    pub fused_qkv: bool,
    /// Write RoPE frequency factors: LLaMA 3 style `rope_freqs.weight` (llama), or Phi-3's
    /// LongRoPE `rope_factors_short`/`rope_factors_long` (phi3).
    pub rope_freqs: bool,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    /// Sliding-window attention keys (gemma3 only).
    pub sliding_window: Option<TinyWindow>,
    pub seed: u64,
}

/// A tiny model's sliding-window attention (written as `attention.sliding_window`,
/// `attention.sliding_window_pattern` and `rope.freq_base_swa`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TinyWindow {
    pub window: usize,
    /// Every `pattern`-th layer (the last of each period) is global.
    pub pattern: usize,
    pub rope_freq_base: f32,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            arch: Arch::Llama,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            head_dim: None,
            n_ctx: 512,
            weight_type: Type::F32,
            tied_output: true,
            qkv_bias: false,
            fused_qkv: false,
            rope_freqs: false,
            rope_freq_base: 10000.0,
            rms_eps: 1e-5,
            sliding_window: None,
            seed: 0,
        }
    }
}

/// Writes a random model of `spec` to `path`, with the tokenizer of the GGUF model
/// `tokenizer_from` (every `tokenizer.*` key). Returns the vocabulary size.
pub fn write_tiny_model(
    path: &Path,
    spec: &TinySpec,
    tokenizer_from: &Path,
) -> Result<usize, ModelError> {
    let head_dim = check(spec)?;
    let n_vocab = vocab_size(tokenizer_from)?;
    let d = Dims {
        e: spec.n_embd,
        q: spec.n_head * head_dim,
        kv: spec.n_head_kv * head_dim,
        ff: spec.n_ff,
        vocab: n_vocab,
        head_dim,
        fused_qkv: spec.fused_qkv || spec.arch == Arch::Phi3,
    };
    let mut w = GgufWriter::new();
    w.copy_keys_from(tokenizer_from, |k| k.starts_with("tokenizer."))?;
    write_keys(&mut w, spec, &d);
    // One generator: the matrices' values, then the vectors'.
    let mut rng = init_rng(spec.seed);
    write_matrices(&mut w, spec, &d, &mut rng)?;
    write_vectors(&mut w, spec, &d, &mut rng)?;
    if spec.rope_freqs {
        write_rope_factors(&mut w, spec, head_dim)?;
    }
    w.write(path)?;
    Ok(n_vocab)
}

/// The sizes of a tiny model's tensors.
struct Dims {
    e: usize,
    q: usize,
    kv: usize,
    ff: usize,
    vocab: usize,
    head_dim: usize,
    fused_qkv: bool,
}

/// Checks that the spec's sizes fit together; returns the head size.
fn check(spec: &TinySpec) -> Result<usize, ModelError> {
    let bad = |m: String| ModelError::Tiny(m);
    if spec.n_head == 0
        || spec.n_head_kv == 0
        || !spec.n_head.is_multiple_of(spec.n_head_kv)
        || (spec.head_dim.is_none() && !spec.n_embd.is_multiple_of(spec.n_head))
    {
        return Err(bad(format!(
            "{} heads / {} kv heads / n_embd {} do not fit together",
            spec.n_head, spec.n_head_kv, spec.n_embd
        )));
    }
    let head_dim = spec.head_dim.unwrap_or(spec.n_embd / spec.n_head);
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(bad(format!("head size {head_dim} must be even and positive for RoPE")));
    }
    for (what, n) in [
        ("n_embd", spec.n_embd),
        ("n_ff", spec.n_ff),
        ("n_head × head_dim", spec.n_head * head_dim),
    ] {
        if spec.weight_type.row_size(n).is_none() {
            return Err(bad(format!(
                "{what} = {n} is not a multiple of {}'s block size {}",
                spec.weight_type,
                spec.weight_type.block_size()
            )));
        }
    }
    if spec.sliding_window.is_some_and(|w| w.window == 0)
        || (spec.sliding_window.is_some() && spec.arch != Arch::Gemma3)
    {
        return Err(
            bad("a sliding window is written for gemma3 only, and must be positive".into()),
        );
    }
    if spec.rope_freqs && !matches!(spec.arch, Arch::Llama | Arch::Phi3) {
        return Err(bad(
            "rope frequency factors are used by the llama and phi3 architectures only".into(),
        ));
    }
    Ok(head_dim)
}

/// The vocabulary size of the tokenizer in `tokenizer_from`.
fn vocab_size(tokenizer_from: &Path) -> Result<usize, ModelError> {
    match GgufFile::open(tokenizer_from)?.get("tokenizer.ggml.tokens") {
        Some(Value::Array { len, .. }) if len > 0 => Ok(len),
        _ => Err(ModelError::Gguf(crate::gguf::GgufError::MissingKey(
            tokenizer_from.into(),
            "tokenizer.ggml.tokens".into(),
        ))),
    }
}

/// The architecture's hyper-parameter keys.
fn write_keys(w: &mut GgufWriter, spec: &TinySpec, d: &Dims) {
    let arch = spec.arch.name();
    w.set_str("general.architecture", arch);
    w.set_str("general.name", "grit tiny test model");
    let k = |s: &str| format!("{arch}.{s}");
    w.set_u32(&k("context_length"), spec.n_ctx as u32);
    w.set_u32(&k("embedding_length"), spec.n_embd as u32);
    w.set_u32(&k("block_count"), spec.n_layer as u32);
    w.set_u32(&k("feed_forward_length"), spec.n_ff as u32);
    w.set_u32(&k("attention.head_count"), spec.n_head as u32);
    w.set_u32(&k("attention.head_count_kv"), spec.n_head_kv as u32);
    w.set_u32(&k("rope.dimension_count"), d.head_dim as u32);
    if spec.head_dim.is_some() {
        w.set_u32(&k("attention.key_length"), d.head_dim as u32);
        w.set_u32(&k("attention.value_length"), d.head_dim as u32);
    }
    w.set_u32(&k("vocab_size"), d.vocab as u32);
    w.set_f32(&k("rope.freq_base"), spec.rope_freq_base);
    w.set_f32(&k("attention.layer_norm_rms_epsilon"), spec.rms_eps);
    if spec.rope_freqs && spec.arch == Arch::Phi3 {
        w.set_u32(&k("rope.scaling.original_context_length"), spec.n_ctx as u32);
    }
    if let Some(sw) = spec.sliding_window {
        w.set_u32(&k("attention.sliding_window"), sw.window as u32);
        w.set_u32(&k("attention.sliding_window_pattern"), sw.pattern as u32);
        w.set_f32(&k("rope.freq_base_swa"), sw.rope_freq_base);
    }
}

/// n values N(mean, std²).
fn normal(rng: &mut crate::rng::SplitMix64, n: usize, std: f32, mean: f32) -> Vec<f32> {
    (0..n).map(|_| mean + std * rng.normal()).collect()
}

/// The 2-D matrices in the spec's type: N(0, 1/d_in), so activations stay O(1); embeddings
/// N(0, 0.5²).
fn write_matrices(
    w: &mut GgufWriter,
    spec: &TinySpec,
    d: &Dims,
    rng: &mut crate::rng::SplitMix64,
) -> Result<(), ModelError> {
    let mut matrix = |name: &str, d_in: usize, d_out: usize, std: f32| -> Result<(), ModelError> {
        let x = normal(rng, d_in * d_out, std, 0.0);
        let data = quantize(spec.weight_type, &x, d_in)?;
        w.add_tensor(name, spec.weight_type, &[d_in as i64, d_out as i64], data)?;
        Ok(())
    };
    let Dims { e, q, kv, ff, .. } = *d;
    matrix("token_embd.weight", e, d.vocab, 0.5)?;
    if !spec.tied_output {
        matrix("output.weight", e, d.vocab, 0.5)?;
    }
    let (sd_e, sd_q, sd_ff) =
        (1.0 / (e as f32).sqrt(), 1.0 / (q as f32).sqrt(), 1.0 / (ff as f32).sqrt());
    for i in 0..spec.n_layer {
        let n = |t: &str| format!("blk.{i}.{t}");
        if d.fused_qkv {
            matrix(&n("attn_qkv.weight"), e, q + 2 * kv, sd_e)?;
        } else {
            matrix(&n("attn_q.weight"), e, q, sd_e)?;
            matrix(&n("attn_k.weight"), e, kv, sd_e)?;
            matrix(&n("attn_v.weight"), e, kv, sd_e)?;
        }
        matrix(&n("attn_output.weight"), q, e, sd_q)?;
        if spec.arch.fused_gate_up() {
            matrix(&n("ffn_up.weight"), e, 2 * ff, sd_e)?; // gate rows, then up rows
        } else {
            matrix(&n("ffn_gate.weight"), e, ff, sd_e)?;
            matrix(&n("ffn_up.weight"), e, ff, sd_e)?;
        }
        matrix(&n("ffn_down.weight"), ff, e, sd_ff)?;
    }
    Ok(())
}

/// The vectors (F32): norm gains near 1, biases small.
fn write_vectors(
    w: &mut GgufWriter,
    spec: &TinySpec,
    d: &Dims,
    rng: &mut crate::rng::SplitMix64,
) -> Result<(), ModelError> {
    let mut vector = |name: &str, n: usize, std: f32, mean: f32| -> Result<(), ModelError> {
        w.add_f32(name, &[n as i64], &normal(rng, n, std, mean))?;
        Ok(())
    };
    let Dims { e, q, kv, head_dim, .. } = *d;
    vector("output_norm.weight", e, 0.1, 1.0)?;
    for i in 0..spec.n_layer {
        let n = |t: &str| format!("blk.{i}.{t}");
        vector(&n("attn_norm.weight"), e, 0.1, 1.0)?;
        vector(&n("ffn_norm.weight"), e, 0.1, 1.0)?;
        if (spec.qkv_bias || spec.arch == Arch::Qwen2) && d.fused_qkv {
            vector(&n("attn_qkv.bias"), q + 2 * kv, 0.2, 0.0)?;
        } else if spec.qkv_bias || spec.arch == Arch::Qwen2 {
            vector(&n("attn_q.bias"), q, 0.2, 0.0)?;
            vector(&n("attn_k.bias"), kv, 0.2, 0.0)?;
            vector(&n("attn_v.bias"), kv, 0.2, 0.0)?;
        }
        if spec.arch.qk_norms() {
            vector(&n("attn_q_norm.weight"), head_dim, 0.1, 1.0)?;
            vector(&n("attn_k_norm.weight"), head_dim, 0.1, 1.0)?;
        }
        if spec.arch.post_norms() {
            vector(&n("post_attention_norm.weight"), e, 0.1, 1.0)?;
            vector(&n("post_ffw_norm.weight"), e, 0.1, 1.0)?;
        }
    }
    Ok(())
}

/// RoPE frequency factors, LLaMA 3 style: 1 for high frequencies, growing to 8 for the
/// lowest. Phi-3's short factors are the same; its long ones (used by llama.cpp only past the
/// original context) differ, so a graph that picked them would be caught.
fn write_rope_factors(
    w: &mut GgufWriter,
    spec: &TinySpec,
    head_dim: usize,
) -> Result<(), ModelError> {
    let half = head_dim / 2;
    let f: Vec<f32> =
        (0..half).map(|i| 1.0 + 7.0 * (i as f32 / (half - 1).max(1) as f32).powi(2)).collect();
    if spec.arch == Arch::Phi3 {
        let long: Vec<f32> = f.iter().map(|x| 4.0 * x).collect();
        w.add_f32("rope_factors_short.weight", &[half as i64], &f)?;
        w.add_f32("rope_factors_long.weight", &[half as i64], &long)?;
    } else {
        w.add_f32("rope_freqs.weight", &[half as i64], &f)?;
    }
    Ok(())
}
