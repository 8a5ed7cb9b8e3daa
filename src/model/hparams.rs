//! Hyper-parameters of LLaMA-family models, read from GGUF metadata the way llama.cpp reads them.

use crate::ggml::{RopeMode, RopeParams};
use crate::gguf::{GgufFile, Value};

use super::ModelError;

/// The architectures grit can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA 1/2/3, Mistral, SmolLM, TinyLlama: RoPE NORM, optional biases.
    Llama,
    /// Qwen2 / Qwen2.5: RoPE NEOX, q/k/v biases.
    Qwen2,
    /// Qwen3 (dense): RoPE NEOX, an RMS norm with a learned gain on each query and key head
    /// before RoPE, no biases.
    Qwen3,
    /// Phi-3 / Phi-3.5 (dense): RoPE NEOX, q/k/v fused in `attn_qkv`, gate and up fused in
    /// `ffn_up`, LongRoPE's short frequency factors when the model has them.
    Phi3,
    /// Gemma 3 (text): RoPE NEOX, a GELU-gated feed-forward (GEGLU), embeddings scaled by
    /// √n_embd, RMS norms after attention and feed-forward as well as before, per-head q/k
    /// norms, queries scaled before the scores, and sliding-window attention with its own
    /// RoPE base on five of every six layers.
    Gemma3,
}

/// The feed-forward's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(gate) ⊙ up.
    Silu,
    /// gelu(gate) ⊙ up, GELU's tanh approximation (ggml's GEGLU).
    GeluTanh,
}

impl Arch {
    /// Every architecture grit trains (the one list: `grit info`, the refusals and the README's).
    pub const ALL: [Arch; 5] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Phi3, Arch::Gemma3];

    /// The GGUF `general.architecture` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Parses `general.architecture`; other architectures are refused with what grit lacks
    /// to train them.
    pub fn parse(arch: &str) -> Result<Self, ModelError> {
        if let Some(a) = Arch::ALL.into_iter().find(|a| a.name() == arch) {
            return Ok(a);
        }
        let known = match arch {
            "gemma" | "gemma2" => Some("grit's graph implements Gemma 3 only (Gemma 1/2 differ in soft-capping and norms)"),
            "gemma3n" => Some("Gemma 3n's per-layer embeddings, AltUp and sparse activations are not implemented in grit's graph"),
            "qwen2moe" | "qwen3moe" | "mixtral" | "deepseek2" | "olmoe" | "gpt-oss" => {
                Some("mixture-of-experts layers need a mul_mat_id backward, which ggml lacks")
            }
            "granite" => Some("granite's residual/embedding/logit multipliers are not implemented in grit's graph"),
            "falcon" | "gpt2" | "gptneox" | "bloom" | "mpt" | "starcoder" | "phi2" => {
                Some("it uses LayerNorm and GELU (a GELU backward is missing in ggml) instead of RMSNorm and SwiGLU")
            }
            _ => None,
        };
        let missing = known.map(str::to_string).unwrap_or_else(|| {
            format!("grit's training graph covers only {}", Arch::ALL.map(Arch::name).join(", "))
        });
        Err(ModelError::UnsupportedArch { arch: arch.to_string(), missing })
    }

    /// Whether llama.cpp's HF→GGUF converter permutes the q/k weight rows (LLaMA's rotary
    /// layout; Qwen's converters keep HF's order): adapters exported to PEFT undo it.
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }

    /// RoPE layout: NORM for LLaMA, NEOX for the others (llama.cpp's
    /// llama_model_rope_type).
    pub fn rope_mode(self) -> RopeMode {
        match self {
            Arch::Llama => RopeMode::Norm,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 | Arch::Gemma3 => RopeMode::Neox,
        }
    }

    /// Whether the graph scales the queries by the attention scale (before the scores, with
    /// a score scale of 1) rather than the scores (Phi-3 and Gemma 3, as llama.cpp's graphs).
    pub fn scales_queries(self) -> bool {
        matches!(self, Arch::Phi3 | Arch::Gemma3)
    }

    /// Whether each block has per-head RMS norms of the queries and keys (`attn_q_norm`,
    /// `attn_k_norm`, [head_dim] each) before RoPE.
    pub fn qk_norms(self) -> bool {
        matches!(self, Arch::Qwen3 | Arch::Gemma3)
    }

    /// Whether the attention and feed-forward outputs are RMS-normed (`attn_post_norm`,
    /// `ffn_post_norm`) before the residual adds (Gemma 3).
    pub fn post_norms(self) -> bool {
        self == Arch::Gemma3
    }

    /// Whether the token embeddings are scaled by √n_embd (Gemma 3).
    pub fn scales_embeddings(self) -> bool {
        self == Arch::Gemma3
    }

    /// The feed-forward's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Arch::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// Whether the gate and up projections are one `ffn_up` tensor [n_embd, 2·n_ff] (Phi-3).
    pub fn fused_gate_up(self) -> bool {
        self == Arch::Phi3
    }
}

/// Hyper-parameters of a LLaMA-family model (all fields public: tests and tools may
/// override them, e.g. to show that a wrong RoPE mode is caught).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaHparams {
    pub arch: Arch,
    pub n_vocab: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Size of one attention head (`attention.key_length`, default n_embd / n_head).
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    /// Attention logit scale (default 1/sqrt(head_dim); `attention.scale` when set).
    pub attn_scale: f32,
    pub rope: RopeParams,
    /// Sliding-window attention (Gemma 3), None: every layer attends to the whole sequence.
    pub swa: Option<SlidingWindow>,
}

/// Sliding-window attention as llama.cpp's "standard" kind: in a sliding-window layer query
/// position p₁ sees key position p₀ only if p₁ − p₀ < `window`; those layers rotate with
/// their own RoPE parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub window: usize,
    /// Per layer: true for a sliding-window layer.
    pub layers: Vec<bool>,
    /// RoPE of the sliding-window layers (`rope.freq_base_swa`, default 10000, scale 1).
    pub rope: RopeParams,
}

/// Reads the `{arch}.*` keys of one file; errors name the file and the key.
struct Keys<'f> {
    file: &'f GgufFile,
    arch: String,
    fname: String,
}

impl Keys<'_> {
    fn key(&self, s: &str) -> String {
        format!("{}.{s}", self.arch)
    }
    /// An error about key `{arch}.{s}`.
    fn bad(&self, s: &str, msg: String) -> ModelError {
        ModelError::Hparam { file: self.fname.clone(), key: self.key(s), msg }
    }
    fn usize(&self, s: &str) -> Result<usize, ModelError> {
        Ok(self.file.get_u64(&self.key(s))? as usize)
    }
    fn opt(&self, s: &str) -> Result<Option<usize>, ModelError> {
        match self.file.get(&self.key(s)) {
            None => Ok(None),
            Some(_) => self.usize(s).map(Some),
        }
    }
    fn f32(&self, s: &str) -> Result<Option<f32>, ModelError> {
        match self.file.get(&self.key(s)) {
            None => Ok(None),
            Some(_) => Ok(Some(self.file.get_f64(&self.key(s))? as f32)),
        }
    }
}

impl LlamaHparams {
    /// Reads and checks the hyper-parameters (`{arch}.*` keys) of a GGUF model.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = file.architecture()?;
        let arch = Arch::parse(&arch_name)?;
        let keys = Keys { file, arch: arch_name, fname: file.path().display().to_string() };
        let n_embd = keys.usize("embedding_length")?;
        let n_layer = keys.usize("block_count")?;
        let n_head = keys.usize("attention.head_count")?;
        let n_head_kv = keys.opt("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ff = keys.usize("feed_forward_length")?;
        let n_ctx_train = keys.usize("context_length")?;
        let rms_eps = keys
            .f32("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| keys.bad("attention.layer_norm_rms_epsilon", "missing".into()))?;
        if n_embd == 0 || n_layer == 0 || n_head == 0 || n_ff == 0 {
            return Err(keys.bad(
                "embedding_length/block_count/head_count/feed_forward_length",
                "must be positive".into(),
            ));
        }
        if n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(keys.bad(
                "attention.head_count_kv",
                format!("{n_head_kv} does not divide head_count {n_head}"),
            ));
        }
        let head_dim = keys.opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let head_dim_v = keys.opt("attention.value_length")?.unwrap_or(n_embd / n_head);
        if head_dim == 0 || head_dim != head_dim_v {
            return Err(keys.bad("attention.key_length", format!("key length {head_dim} and value length {head_dim_v} must be equal and positive")));
        }
        let n_vocab = match file.tensor("token_embd.weight") {
            Some(t) => t.ne[1] as usize,
            None => {
                return Err(ModelError::MissingTensor {
                    file: keys.fname.clone(),
                    tensor: "token_embd.weight".into(),
                });
            }
        };
        refuse_softcapping(&keys)?;
        let rope = rope_params(&keys, arch, head_dim, n_ctx_train)?;
        Ok(LlamaHparams {
            arch,
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            rms_eps,
            attn_scale: attention_scale(&keys, arch, n_layer, n_embd / n_head, head_dim)?,
            swa: sliding_window(&keys, arch, n_layer, &rope)?,
            rope,
        })
    }

    /// The RoPE parameters of layer `il` (a sliding-window layer's own, else the model's).
    pub fn rope_of(&self, il: usize) -> &RopeParams {
        match &self.swa {
            Some(w) if w.layers[il] => &w.rope,
            _ => &self.rope,
        }
    }

    /// The sliding window of layer `il` (None: it attends to the whole sequence).
    pub fn window_of(&self, il: usize) -> Option<usize> {
        self.swa.as_ref().filter(|w| w.layers[il]).map(|w| w.window)
    }

    /// Width of the query projection (n_head × head_dim).
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Width of the key/value projections (n_head_kv × head_dim).
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// RoPE as llama.cpp's llama_model::load_hparams / llama_context read it (rotating every
/// dimension of a head of `head_dim`; none or linear scaling).
fn rope_params(
    keys: &Keys<'_>,
    arch: Arch,
    head_dim: usize,
    n_ctx_train: usize,
) -> Result<RopeParams, ModelError> {
    let n_rot = keys.opt("rope.dimension_count")?.unwrap_or(head_dim);
    if n_rot != head_dim {
        return Err(keys.bad(
            "rope.dimension_count",
            format!(
                "{n_rot} differs from the head size {head_dim} (partial RoPE is not supported)"
            ),
        ));
    }
    let scaling = match keys.file.get(&keys.key("rope.scaling.type")) {
        Some(Value::Str(s)) => s,
        _ => "linear".into(),
    };
    if scaling != "none" && scaling != "linear" {
        return Err(keys.bad(
            "rope.scaling.type",
            format!("'{scaling}' RoPE scaling is not supported for training (none/linear only)"),
        ));
    }
    let factor = match keys.f32("rope.scaling.factor")? {
        Some(f) => f,
        None => keys.f32("rope.scale_linear")?.unwrap_or(0.0),
    };
    Ok(RopeParams {
        mode: arch.rope_mode(),
        n_dims: n_rot,
        n_ctx_orig: keys.opt("rope.scaling.original_context_length")?.unwrap_or(n_ctx_train),
        freq_base: keys.f32("rope.freq_base")?.unwrap_or(10000.0),
        freq_scale: if scaling == "none" || factor == 0.0 { 1.0 } else { 1.0 / factor },
        ext_factor: 0.0,
        attn_factor: keys.f32("rope.scaling.attn_factor")?.unwrap_or(1.0),
        beta_fast: 32.0,
        beta_slow: 1.0,
    })
}

/// The attention logit scale: `attention.scale`, else 1/√head_dim. llama.cpp's gemma3
/// ignores the key: 1/√head_dim, but 1/√(n_embd/n_head) for the 27B model (62 layers), after
/// Google's reference configuration.
fn attention_scale(
    keys: &Keys<'_>,
    arch: Arch,
    n_layer: usize,
    embd_per_head: usize,
    head_dim: usize,
) -> Result<f32, ModelError> {
    Ok(match keys.f32("attention.scale")? {
        _ if arch == Arch::Gemma3 && n_layer == 62 => 1.0 / (embd_per_head as f32).sqrt(),
        _ if arch == Arch::Gemma3 => 1.0 / (head_dim as f32).sqrt(),
        Some(s) if s != 0.0 => s,
        _ => 1.0 / (head_dim as f32).sqrt(),
    })
}

/// Refuses logit soft-capping (Gemma 2's; it needs a tanh, which has no backward in ggml).
fn refuse_softcapping(keys: &Keys<'_>) -> Result<(), ModelError> {
    for (key, what) in
        [("final_logit_softcapping", "final-logit"), ("attn_logit_softcapping", "attention-logit")]
    {
        if let Some(c) = keys.f32(key)?.filter(|&c| c != 0.0) {
            return Err(keys.bad(
                key,
                format!("{what} soft-capping ({c}) is not implemented in grit's graph"),
            ));
        }
    }
    Ok(())
}

/// Gemma 3's sliding window, as llama.cpp's gemma3 reads it: applied when
/// `attention.sliding_window` > 0; `attention.sliding_window_pattern` one bool per layer or a
/// period (default 6, the last layer of each period global: llama.cpp's set_swa_pattern);
/// the windowed layers' RoPE base `rope.freq_base_swa` (default 10000, scale 1).
fn sliding_window(
    keys: &Keys<'_>,
    arch: Arch,
    n_layer: usize,
    rope: &RopeParams,
) -> Result<Option<SlidingWindow>, ModelError> {
    let window = match keys.opt("attention.sliding_window")? {
        Some(w) if w > 0 && arch == Arch::Gemma3 => w,
        _ => return Ok(None),
    };
    let pattern = "attention.sliding_window_pattern";
    let layers = match keys.file.get(&keys.key(pattern)) {
        Some(Value::Array { .. }) => match keys.file.bool_array(&keys.key(pattern)) {
            Some(v) if v.len() == n_layer => v,
            _ => {
                return Err(keys
                    .bad(pattern, format!("must be {n_layer} bools (one per layer) or a period")))
            }
        },
        _ => {
            let p = keys.opt(pattern)?.unwrap_or(6);
            (0..n_layer).map(|il| p == 0 || il % p < p - 1).collect()
        }
    };
    let freq_base = keys.f32("rope.freq_base_swa")?.unwrap_or(10000.0);
    let rope = RopeParams { freq_base, freq_scale: 1.0, ..*rope };
    Ok(Some(SlidingWindow { window, layers, rope }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures() {
        assert_eq!(Arch::parse("llama").unwrap(), Arch::Llama);
        assert_eq!(Arch::parse("qwen2").unwrap().rope_mode(), RopeMode::Neox);
        assert_eq!(Arch::parse("qwen3").unwrap().rope_mode(), RopeMode::Neox);
        // Only llama.cpp's LLaMA converter permutes q/k rows (PEFT export undoes it).
        assert!(
            Arch::Llama.permutes_qk() && !Arch::Qwen2.permutes_qk() && !Arch::Qwen3.permutes_qk()
        );
        for a in Arch::ALL {
            assert_eq!(Arch::parse(a.name()).unwrap(), a);
        }
        let err = Arch::parse("mamba").unwrap_err().to_string();
        assert!(err.contains("covers only llama, qwen2, qwen3, phi3, gemma3"), "{err}");
        assert!(Arch::Phi3.fused_gate_up() && !Arch::Phi3.permutes_qk());
        assert!(!Arch::Gemma3.permutes_qk() && Arch::Gemma3.activation() == Activation::GeluTanh);
        let e = Arch::parse("gemma2").unwrap_err().to_string();
        assert!(e.contains("gemma2") && e.contains("Gemma 3 only"), "{e}");
        let e = Arch::parse("mamba").unwrap_err().to_string();
        assert!(e.contains("mamba") && e.contains("llama"), "{e}");
    }

    /// A minimal Gemma 3 file's hyper-parameters, with `keys` added.
    fn gemma3(
        n_layer: u32,
        keys: impl FnOnce(&mut crate::ggml::GgufWriter),
    ) -> Result<LlamaHparams, ModelError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.gguf");
        let mut w = crate::ggml::GgufWriter::new();
        w.set_str("general.architecture", "gemma3");
        for (key, v) in [
            ("context_length", 64),
            ("embedding_length", 32),
            ("block_count", n_layer),
            ("feed_forward_length", 64),
            ("attention.head_count", 2),
            ("attention.key_length", 8),
            ("attention.value_length", 8),
        ] {
            w.set_u32(&format!("gemma3.{key}"), v);
        }
        w.set_f32("gemma3.attention.layer_norm_rms_epsilon", 1e-6);
        keys(&mut w);
        w.add_f32("token_embd.weight", &[32, 4], &[0.0; 128]).unwrap();
        w.write(&path).unwrap();
        LlamaHparams::from_gguf(&GgufFile::open(&path).unwrap())
    }

    /// Gemma 3's sliding window and attention scale as llama.cpp reads them.
    #[test]
    fn gemma3_sliding_window_and_scale() {
        // No window: every layer global; queries scaled by 1/√head_dim (not n_embd/n_head).
        let hp = gemma3(8, |_| {}).unwrap();
        assert!(hp.swa.is_none() && hp.window_of(0).is_none());
        assert_eq!(hp.attn_scale, 1.0 / 8f32.sqrt());
        // A window with the default period 6: layers 5 and 11 global, their own RoPE base.
        let hp = gemma3(12, |w| {
            w.set_u32("gemma3.attention.sliding_window", 512);
            w.set_f32("gemma3.rope.freq_base", 1e6);
        })
        .unwrap();
        let global: Vec<usize> = (0..12).filter(|&il| hp.window_of(il).is_none()).collect();
        assert_eq!(global, vec![5, 11]);
        assert_eq!(hp.window_of(0), Some(512));
        assert_eq!((hp.rope_of(0).freq_base, hp.rope_of(5).freq_base), (10000.0, 1e6));
        // The pattern as a period, and as one bool per layer.
        let hp = gemma3(4, |w| {
            w.set_u32("gemma3.attention.sliding_window", 4);
            w.set_u32("gemma3.attention.sliding_window_pattern", 2);
            w.set_f32("gemma3.rope.freq_base_swa", 500.0);
        })
        .unwrap();
        assert_eq!(hp.swa.as_ref().unwrap().layers, vec![true, false, true, false]);
        assert_eq!(hp.rope_of(2).freq_base, 500.0);
        let hp = gemma3(3, |w| {
            w.set_u32("gemma3.attention.sliding_window", 4);
            w.set_bool_array("gemma3.attention.sliding_window_pattern", &[false, true, true]);
        })
        .unwrap();
        assert_eq!(hp.swa.as_ref().unwrap().layers, vec![false, true, true]);
        let e = gemma3(3, |w| {
            w.set_u32("gemma3.attention.sliding_window", 4);
            w.set_bool_array("gemma3.attention.sliding_window_pattern", &[true]);
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("sliding_window_pattern") && e.contains("3 bools"), "{e}");
        // The 27B (62 layers) scales by 1/√(n_embd/n_head) = 1/4, as llama.cpp.
        assert_eq!(gemma3(62, |_| {}).unwrap().attn_scale, 0.25);
        // Soft-capping is refused, naming the key.
        let e = gemma3(2, |w| w.set_f32("gemma3.final_logit_softcapping", 30.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("final_logit_softcapping") && e.contains("soft-capping"), "{e}");
    }

    /// The README's list of trainable architectures is this one.
    #[test]
    fn readme_lists_the_trainable_architectures() {
        let readme = include_str!("../../README.md");
        let start = readme.find("Trainable architectures:").expect("the README's list");
        let end = start + readme[start..].find("others are refused").expect("its end");
        let listed: Vec<&str> = readme[start..end].split('`').skip(1).step_by(2).collect();
        assert_eq!(listed, Arch::ALL.map(Arch::name), "README: {}", &readme[start..end]);
    }
}
