//! Frozen base weights, loaded from a GGUF file into a backend buffer as stored (quantized
//! tensors stay quantized).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::ggml::{dequantize, Backend, Capacity, Context, Tensor, TensorId, Type};
use crate::gguf::{GgufFile, TensorInfo};

use super::hparams::{Arch, LlamaHparams};
use super::lora::Target;
use super::ModelError;

/// One transformer block's tensors (`T` = [`Tensor`] to build graphs, [`TensorId`] to store).
#[derive(Debug, Clone, Copy)]
pub struct Layer<T> {
    pub attn_norm: T,
    pub qkv: Qkv<T>,
    pub attn_output: T,
    pub attn_output_b: Option<T>,
    /// Per-head RMS norm gains of the queries and keys, [head_dim] each (Qwen3, Gemma 3).
    pub attn_q_norm: Option<T>,
    pub attn_k_norm: Option<T>,
    /// RMS norm gain of the attention output before the residual add (Gemma 3).
    pub attn_post_norm: Option<T>,
    pub ffn_norm: T,
    pub gate_up: GateUp<T>,
    pub ffn_down: T,
    pub ffn_down_b: Option<T>,
    /// RMS norm gain of the feed-forward output before the residual add (Gemma 3).
    pub ffn_post_norm: Option<T>,
}

/// The query, key and value projections of a block.
#[derive(Debug, Clone, Copy)]
pub enum Qkv<T> {
    /// Three weights, each with an optional bias (LLaMA, Qwen).
    Split { q: T, k: T, v: T, q_b: Option<T>, k_b: Option<T>, v_b: Option<T> },
    /// One `attn_qkv` weight [n_embd, n_q + 2·n_kv] whose output rows are the queries, then
    /// the keys, then the values (Phi-3; llama.cpp's build_qkv views it the same way).
    Fused { qkv: T, qkv_b: Option<T> },
}

/// The gate and up projections of a block's SwiGLU feed-forward.
#[derive(Debug, Clone, Copy)]
pub enum GateUp<T> {
    /// `ffn_gate` and `ffn_up`, each [n_embd, n_ff] with an optional bias.
    Split { gate: T, up: T, gate_b: Option<T>, up_b: Option<T> },
    /// One `ffn_up` [n_embd, 2·n_ff] whose first n_ff output rows are the gate and the rest
    /// the up projection (Phi-3's `gate_up_proj`; llama.cpp's LLM_FFN_SWIGLU on one tensor).
    Fused { up: T },
}

impl<T: Copy> Layer<T> {
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Layer<U> {
        Layer {
            attn_norm: f(self.attn_norm),
            qkv: match self.qkv {
                Qkv::Split { q, k, v, q_b, k_b, v_b } => Qkv::Split {
                    q: f(q),
                    k: f(k),
                    v: f(v),
                    q_b: q_b.map(&f),
                    k_b: k_b.map(&f),
                    v_b: v_b.map(&f),
                },
                Qkv::Fused { qkv, qkv_b } => Qkv::Fused { qkv: f(qkv), qkv_b: qkv_b.map(&f) },
            },
            attn_output: f(self.attn_output),
            attn_output_b: self.attn_output_b.map(&f),
            attn_q_norm: self.attn_q_norm.map(&f),
            attn_k_norm: self.attn_k_norm.map(&f),
            attn_post_norm: self.attn_post_norm.map(&f),
            ffn_norm: f(self.ffn_norm),
            gate_up: match self.gate_up {
                GateUp::Split { gate, up, gate_b, up_b } => GateUp::Split {
                    gate: f(gate),
                    up: f(up),
                    gate_b: gate_b.map(&f),
                    up_b: up_b.map(&f),
                },
                GateUp::Fused { up } => GateUp::Fused { up: f(up) },
            },
            ffn_down: f(self.ffn_down),
            ffn_down_b: self.ffn_down_b.map(&f),
            ffn_post_norm: self.ffn_post_norm.map(&f),
        }
    }

    /// The block's matmul weights, in graph order (4 with fused projections, 7 without): the
    /// weights of the targets it has.
    pub fn matmul_weights(&self) -> Vec<T> {
        Target::ALL.into_iter().filter_map(|t| t.weight(self)).collect()
    }
}

/// The frozen weights of a LLaMA-family model, in a backend buffer (as stored in the file;
/// 1-D norm/bias tensors are converted to F32 if stored otherwise).
pub struct Weights {
    pub hparams: LlamaHparams,
    /// The GGUF file the weights came from.
    pub source: std::path::PathBuf,
    ctx: Context,
    tok_embd: TensorId,
    output_norm: TensorId,
    /// `output.weight`, or `token_embd.weight` when the output is tied.
    output: TensorId,
    output_b: Option<TensorId>,
    rope_freqs: Option<TensorId>,
    /// The context beyond which llama.cpp would use LongRoPE's long factors (Phi-3 models
    /// with `rope_factors_long`): grit trains with the short ones, so no longer.
    long_rope_beyond: Option<usize>,
    layers: Vec<Layer<TensorId>>,
    bytes: usize,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.source)
            .field("hparams", &self.hparams)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// What the loader wants of one tensor.
struct Want {
    name: String,
    shape: Vec<i64>,
    required: bool,
}

impl Weights {
    /// Reads hyper-parameters, checks every tensor's presence, shape and type, and loads the
    /// tensors into `backend`'s weight buffer type.
    pub fn load(file: &GgufFile, backend: &Backend) -> Result<Self, ModelError> {
        let hp = LlamaHparams::from_gguf(file)?;
        refuse_unsupported_layers(file, &hp)?;
        let fused_qkv = file.tensor("blk.0.attn_qkv.weight").is_some();
        let wants = wanted_tensors(&hp, fused_qkv);
        // Check everything before allocating anything.
        let found = check_tensors(file, &wants)?;
        let (ctx, ids, bytes) = load_tensors(file, found, backend)?;
        let id = |name: &str| ids.get(name).copied();
        let req = |name: String| ids[&name];
        let layers = (0..hp.n_layer)
            .map(|i| {
                let n = |t: &str| format!("blk.{i}.{t}");
                let qkv = match id(&n("attn_qkv.weight")) {
                    Some(qkv) => Qkv::Fused { qkv, qkv_b: id(&n("attn_qkv.bias")) },
                    None => Qkv::Split {
                        q: req(n("attn_q.weight")),
                        k: req(n("attn_k.weight")),
                        v: req(n("attn_v.weight")),
                        q_b: id(&n("attn_q.bias")),
                        k_b: id(&n("attn_k.bias")),
                        v_b: id(&n("attn_v.bias")),
                    },
                };
                let gate_up = match id(&n("ffn_gate.weight")) {
                    Some(gate) => GateUp::Split {
                        gate,
                        up: req(n("ffn_up.weight")),
                        gate_b: id(&n("ffn_gate.bias")),
                        up_b: id(&n("ffn_up.bias")),
                    },
                    None => GateUp::Fused { up: req(n("ffn_up.weight")) },
                };
                Layer {
                    attn_norm: req(n("attn_norm.weight")),
                    qkv,
                    attn_output: req(n("attn_output.weight")),
                    attn_output_b: id(&n("attn_output.bias")),
                    attn_q_norm: id(&n("attn_q_norm.weight")),
                    attn_k_norm: id(&n("attn_k_norm.weight")),
                    attn_post_norm: id(&n("post_attention_norm.weight")),
                    ffn_norm: req(n("ffn_norm.weight")),
                    gate_up,
                    ffn_down: req(n("ffn_down.weight")),
                    ffn_down_b: id(&n("ffn_down.bias")),
                    ffn_post_norm: id(&n("post_ffw_norm.weight")),
                }
            })
            .collect();
        let tok_embd = req("token_embd.weight".into());
        Ok(Weights {
            source: file.path().to_path_buf(),
            tok_embd,
            output_norm: req("output_norm.weight".into()),
            output: id("output.weight").unwrap_or(tok_embd),
            output_b: id("output.bias"),
            rope_freqs: id("rope_freqs.weight").or(id("rope_factors_short.weight")),
            long_rope_beyond: (hp.arch == Arch::Phi3
                && file.tensor("rope_factors_long.weight").is_some())
            .then_some(hp.rope.n_ctx_orig),
            layers,
            bytes,
            hparams: hp,
            ctx,
        })
    }

    /// Token embeddings [n_embd, n_vocab].
    pub fn tok_embd(&self) -> Tensor<'_> {
        self.ctx.tensor(self.tok_embd)
    }
    /// Final norm weight [n_embd].
    pub fn output_norm(&self) -> Tensor<'_> {
        self.ctx.tensor(self.output_norm)
    }
    /// Output projection [n_embd, n_vocab] (the token embeddings when tied).
    pub fn output(&self) -> Tensor<'_> {
        self.ctx.tensor(self.output)
    }
    pub fn output_b(&self) -> Option<Tensor<'_>> {
        self.output_b.map(|id| self.ctx.tensor(id))
    }
    /// Whether the output projection is the token embedding matrix.
    pub fn tied_output(&self) -> bool {
        self.output == self.tok_embd
    }
    /// RoPE frequency factors [head_dim / 2] (LLaMA 3's, or Phi-3's LongRoPE short ones), if
    /// the model has them.
    pub fn rope_freqs(&self) -> Option<Tensor<'_>> {
        self.rope_freqs.map(|id| self.ctx.tensor(id))
    }
    /// Checks that sequences of `n` tokens run the way llama.cpp runs this model: a LongRoPE
    /// model (Phi-3 128k, Phi-3.5) uses its short factors up to the original context, which is
    /// what grit's graph applies; llama.cpp switches to the long ones beyond it.
    pub fn check_sequence_length(&self, n: usize) -> Result<(), ModelError> {
        match self.long_rope_beyond {
            Some(orig) if n > orig => Err(ModelError::Hparam {
                file: self.source.display().to_string(),
                key: format!("{}.rope.scaling.original_context_length", self.hparams.arch.name()),
                msg: format!(
                    "sequences of {n} tokens exceed the original context {orig}, beyond which llama.cpp uses LongRoPE's long factors; grit trains with the short ones (use --max-seq-len ≤ {orig})"
                ),
            }),
            _ => Ok(()),
        }
    }
    /// The LoRA targets this model has, in graph order: the 7 projections, or the fused ones
    /// in their place (Phi-3: attn_qkv, attn_output, ffn_up, ffn_down).
    pub fn targets(&self) -> Vec<Target> {
        let l = self.layer(0);
        Target::ALL.into_iter().filter(|t| t.weight(&l).is_some()).collect()
    }
    /// Block `i`'s tensors.
    pub fn layer(&self, i: usize) -> Layer<Tensor<'_>> {
        self.layers[i].map(|id| self.ctx.tensor(id))
    }
    /// A loaded tensor by its GGUF name.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        self.ctx.get(name)
    }
    /// Bytes of backend memory the weights occupy.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The weight a [`TensorId`] (from one of this struct's tensors) names.
    pub fn tensor(&self, id: TensorId) -> Tensor<'_> {
        self.ctx.tensor(id)
    }
    /// Reads a weight back (as stored) — for tests and tools.
    pub fn read_bytes(&self, t: Tensor<'_>) -> Result<Vec<u8>, ModelError> {
        Ok(self.ctx.read_bytes(t)?)
    }
}

/// Refuses layer kinds grit cannot train (mixture of experts), naming why.
fn refuse_unsupported_layers(file: &GgufFile, hp: &LlamaHparams) -> Result<(), ModelError> {
    for i in 0..hp.n_layer {
        if file.tensor(&format!("blk.{i}.ffn_gate_inp.weight")).is_some() {
            return Err(ModelError::UnsupportedArch {
                arch: hp.arch.name().into(),
                missing: "mixture-of-experts layers need a mul_mat_id backward, which ggml lacks"
                    .into(),
            });
        }
    }

    Ok(())
}

/// Every tensor the training graph may read, with its ggml shape and whether it must exist:
/// q/k/v as one `attn_qkv` when `fused_qkv` (as llama.cpp, any architecture), gate and up as
/// one `ffn_up` for Phi-3.
fn wanted_tensors(hp: &LlamaHparams, fused_qkv: bool) -> Vec<Want> {
    let (e, q, kv, ff, v) = (
        hp.n_embd as i64,
        hp.n_embd_q() as i64,
        hp.n_embd_kv() as i64,
        hp.n_ff as i64,
        hp.n_vocab as i64,
    );
    let mut wants = vec![
        Want { name: "token_embd.weight".into(), shape: vec![e, v], required: true },
        Want { name: "output_norm.weight".into(), shape: vec![e], required: true },
        Want { name: "output.weight".into(), shape: vec![e, v], required: false },
        Want { name: "output.bias".into(), shape: vec![v], required: false },
    ];
    // RoPE frequency factors, as llama.cpp reads them: LLaMA 3's `rope_freqs`; Phi-3's
    // LongRoPE short factors, which llama.cpp uses while the context stays within
    // `rope.scaling.original_context_length` (the long ones only beyond it).
    let factors = match hp.arch {
        Arch::Llama => Some("rope_freqs.weight"),
        Arch::Phi3 => Some("rope_factors_short.weight"),
        Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => None,
    };
    if let Some(name) = factors {
        wants.push(Want {
            name: name.into(),
            shape: vec![hp.rope.n_dims as i64 / 2],
            required: false,
        });
    }
    for i in 0..hp.n_layer {
        let w = |t: &str, shape: Vec<i64>, required: bool| Want {
            name: format!("blk.{i}.{t}"),
            shape,
            required,
        };
        wants.push(w("attn_norm.weight", vec![e], true));
        if fused_qkv {
            wants.extend([
                w("attn_qkv.weight", vec![e, q + 2 * kv], true),
                w("attn_qkv.bias", vec![q + 2 * kv], false),
            ]);
        } else {
            wants.extend([
                w("attn_q.weight", vec![e, q], true),
                w("attn_k.weight", vec![e, kv], true),
                w("attn_v.weight", vec![e, kv], true),
                w("attn_q.bias", vec![q], false),
                w("attn_k.bias", vec![kv], false),
                w("attn_v.bias", vec![kv], false),
            ]);
        }
        wants.extend([
            w("attn_output.weight", vec![q, e], true),
            w("attn_output.bias", vec![e], false),
            w("ffn_norm.weight", vec![e], true),
            w("ffn_down.weight", vec![ff, e], true),
            w("ffn_down.bias", vec![e], false),
        ]);
        if hp.arch.fused_gate_up() {
            wants.push(w("ffn_up.weight", vec![e, 2 * ff], true));
        } else {
            wants.extend([
                w("ffn_gate.weight", vec![e, ff], true),
                w("ffn_up.weight", vec![e, ff], true),
                w("ffn_gate.bias", vec![ff], false),
                w("ffn_up.bias", vec![ff], false),
            ]);
        }
        if hp.arch.qk_norms() {
            let hd = hp.head_dim as i64;
            wants.extend([
                w("attn_q_norm.weight", vec![hd], true),
                w("attn_k_norm.weight", vec![hd], true),
            ]);
        }
        if hp.arch.post_norms() {
            wants.extend([
                w("post_attention_norm.weight", vec![e], true),
                w("post_ffw_norm.weight", vec![e], true),
            ]);
        }
    }

    wants
}

/// The wanted tensors the file has, each checked for shape and type (a missing required one
/// is an error).
fn check_tensors<'w, 'f>(
    file: &'f GgufFile,
    wants: &'w [Want],
) -> Result<Vec<(&'w Want, &'f TensorInfo)>, ModelError> {
    let fname = file.path().display().to_string();
    let mut found: Vec<(&Want, &TensorInfo)> = Vec::new();
    for want in wants {
        let Some(info) = file.tensor(&want.name) else {
            if want.required {
                return Err(ModelError::MissingTensor { file: fname, tensor: want.name.clone() });
            }
            continue;
        };
        let mut expected = [1i64; 4];
        expected[..want.shape.len()].copy_from_slice(&want.shape);
        if info.ne != expected {
            return Err(ModelError::Shape {
                file: fname,
                tensor: want.name.clone(),
                expected: want.shape.clone(),
                got: info.ne.to_vec(),
            });
        }
        let ty = Type(info.ggml_type);
        if !ty.can_dequantize() || ty.row_size(info.ne[0] as usize).is_none() {
            return Err(ModelError::TensorType {
                file: fname,
                tensor: want.name.clone(),
                ty: ty.name(),
            });
        }
        found.push((want, info));
    }

    Ok(found)
}

/// Allocates the found tensors in `backend`'s weight buffer type (vectors as F32) and reads
/// their data in file order; returns the context, the tensor ids by name and the bytes.
#[allow(clippy::type_complexity)]
fn load_tensors(
    file: &GgufFile,
    mut found: Vec<(&Want, &TensorInfo)>,
    backend: &Backend,
) -> Result<(Context, std::collections::HashMap<String, TensorId>, usize), ModelError> {
    let fname = file.path().display().to_string();
    let ctx = Context::new(Capacity::tensors(found.len()))?;
    let mut ids = std::collections::HashMap::new();
    for (want, info) in &found {
        // Vectors (norms, biases) are used by elementwise ops: keep them F32.
        let ty = if want.shape.len() == 1 { Type::F32 } else { Type(info.ggml_type) };
        let t = ctx.new_tensor(ty, &want.shape);
        t.set_name(&want.name);
        ids.insert(want.name.clone(), t.id());
    }
    let bytes = ctx.allocate(backend.weight_buffer_type())?;

    // Read tensor data in file order into the buffer (a reused staging vector).
    let io = |err| ModelError::Io { file: fname.clone(), err };
    let mut f = File::open(file.path()).map_err(io)?;
    let base = file.data_offset();
    found.sort_by_key(|(_, info)| info.offset);
    let mut buf = Vec::new();
    for (want, info) in &found {
        buf.resize(info.size as usize, 0);
        f.seek(SeekFrom::Start(base + info.offset)).map_err(io)?;
        f.read_exact(&mut buf).map_err(io)?;
        let t = ctx.tensor(ids[&want.name]);
        if t.ty() == Type(info.ggml_type) {
            ctx.write_bytes(t, &buf)?;
        } else {
            let x = dequantize(Type(info.ggml_type), &buf, info.n_elements() as usize)?;
            ctx.write_f32(t, &x)?;
        }
    }

    Ok((ctx, ids, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::GgufWriter;

    /// A minimal llama GGUF (no tokenizer: enough for grit's loader, not for llama.cpp).
    fn write(path: &std::path::Path, arch: &str, skip: &str, bad_shape: &str) {
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", arch);
        let k = |s: &str| format!("{arch}.{s}");
        for (key, v) in [
            ("context_length", 64),
            ("embedding_length", 8),
            ("block_count", 1),
            ("feed_forward_length", 16),
            ("attention.head_count", 2),
        ] {
            w.set_u32(&k(key), v);
        }
        w.set_f32(&k("attention.layer_norm_rms_epsilon"), 1e-5);
        let mut t = |name: &str, ne: &[i64]| {
            if name == skip {
                return;
            }
            let ne: Vec<i64> =
                if name == bad_shape { ne.iter().map(|d| d + 1).collect() } else { ne.to_vec() };
            let n: i64 = ne.iter().product();
            w.add_f32(name, &ne, &vec![0.5; n as usize]).unwrap();
        };
        t("token_embd.weight", &[8, 10]);
        t("output_norm.weight", &[8]);
        for n in ["attn_norm", "ffn_norm"] {
            t(&format!("blk.0.{n}.weight"), &[8]);
        }
        for n in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            t(&format!("blk.0.{n}.weight"), &[8, 8]);
        }
        t("blk.0.ffn_gate.weight", &[8, 16]);
        t("blk.0.ffn_up.weight", &[8, 16]);
        t("blk.0.ffn_down.weight", &[16, 8]);
        w.write(path).unwrap();
    }

    fn load(arch: &str, skip: &str, bad_shape: &str) -> Result<Weights, ModelError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        write(&p, arch, skip, bad_shape);
        Weights::load(&GgufFile::open(&p).unwrap(), &Backend::cpu(1).unwrap())
    }

    #[test]
    fn loads_a_complete_model() {
        let w = load("llama", "", "").unwrap();
        assert_eq!(w.hparams.n_vocab, 10);
        assert_eq!(w.hparams.head_dim, 4);
        assert!(w.tied_output());
        assert!(matches!(w.layer(0).qkv, Qkv::Split { q_b: None, .. }));
        let bytes = w.read_bytes(w.layer(0).ffn_down).unwrap();
        assert_eq!(bytes.len(), 16 * 8 * 4);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = load("llama", "blk.0.ffn_down.weight", "").unwrap_err().to_string();
        assert!(e.contains("missing tensor 'blk.0.ffn_down.weight'"), "{e}");
        let e = load("llama", "", "blk.0.attn_k.weight").unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_k.weight") && e.contains("shape"), "{e}");
        let e = load("gemma2", "", "").unwrap_err().to_string();
        assert!(e.contains("gemma2") && e.contains("Gemma 3 only"), "{e}");
        // A Gemma 3 block has q/k norms and post norms besides the llama tensors.
        let e = load("gemma3", "", "").unwrap_err().to_string();
        assert!(e.contains("missing tensor 'blk.0.attn_q_norm.weight'"), "{e}");
    }
}
