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
}

impl Arch {
    /// Every architecture grit trains (the one list: `grit info`, the refusals and the README's).
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Phi3];

    /// The GGUF `general.architecture` name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// Parses `general.architecture`; other architectures are refused with what grit lacks
    /// to train them.
    pub fn parse(arch: &str) -> Result<Self, ModelError> {
        if let Some(a) = Arch::ALL.into_iter().find(|a| a.name() == arch) {
            return Ok(a);
        }
        let known = match arch {
            "gemma" | "gemma2" | "gemma3" | "gemma3n" => Some("its GELU-gated FFN needs a GEGLU (and GELU) backward, which ggml lacks"),
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

    /// RoPE layout: NORM for LLaMA, NEOX for Qwen2, Qwen3 and Phi-3 (llama.cpp's
    /// llama_model_rope_type).
    pub fn rope_mode(self) -> RopeMode {
        match self {
            Arch::Llama => RopeMode::Norm,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Phi3 => RopeMode::Neox,
        }
    }

    /// Whether the graph scales the queries by the attention scale (before the scores, with
    /// a score scale of 1) rather than the scores (Phi-3, as llama.cpp's phi3 graph).
    pub fn scales_queries(self) -> bool {
        self == Arch::Phi3
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
}

impl LlamaHparams {
    /// Reads and checks the hyper-parameters (`{arch}.*` keys) of a GGUF model.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = file.architecture()?;
        let arch = Arch::parse(&arch_name)?;
        let fname = file.path().display().to_string();
        let k = |s: &str| format!("{arch_name}.{s}");
        let bad = |key: String, msg: String| ModelError::Hparam { file: fname.clone(), key, msg };
        let get = |s: &str| -> Result<usize, ModelError> { Ok(file.get_u64(&k(s))? as usize) };
        let get_opt = |s: &str| -> Result<Option<usize>, ModelError> {
            match file.get(&k(s)) {
                None => Ok(None),
                Some(_) => get(s).map(Some),
            }
        };
        let get_f = |s: &str| -> Result<Option<f32>, ModelError> {
            match file.get(&k(s)) {
                None => Ok(None),
                Some(_) => Ok(Some(file.get_f64(&k(s))? as f32)),
            }
        };

        let n_embd = get("embedding_length")?;
        let n_layer = get("block_count")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = get_opt("attention.head_count_kv")?.unwrap_or(n_head);
        let n_ff = get("feed_forward_length")?;
        let n_ctx_train = get("context_length")?;
        let rms_eps = get_f("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| bad(k("attention.layer_norm_rms_epsilon"), "missing".into()))?;
        if n_embd == 0 || n_layer == 0 || n_head == 0 || n_ff == 0 {
            return Err(bad(
                k("embedding_length/block_count/head_count/feed_forward_length"),
                "must be positive".into(),
            ));
        }
        if n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(bad(
                k("attention.head_count_kv"),
                format!("{n_head_kv} does not divide head_count {n_head}"),
            ));
        }
        let head_dim = get_opt("attention.key_length")?.unwrap_or(n_embd / n_head);
        let head_dim_v = get_opt("attention.value_length")?.unwrap_or(n_embd / n_head);
        if head_dim == 0 || head_dim != head_dim_v {
            return Err(bad(k("attention.key_length"), format!("key length {head_dim} and value length {head_dim_v} must be equal and positive")));
        }
        let n_rot = get_opt("rope.dimension_count")?.unwrap_or(head_dim);
        if n_rot != head_dim {
            return Err(bad(
                k("rope.dimension_count"),
                format!(
                    "{n_rot} differs from the head size {head_dim} (partial RoPE is not supported)"
                ),
            ));
        }

        // RoPE scaling, as llama.cpp's llama_model::load_hparams / llama_context.
        let scaling = match file.get(&k("rope.scaling.type")) {
            Some(Value::Str(s)) => s,
            _ => "linear".into(),
        };
        if scaling != "none" && scaling != "linear" {
            return Err(bad(
                k("rope.scaling.type"),
                format!(
                    "'{scaling}' RoPE scaling is not supported for training (none/linear only)"
                ),
            ));
        }
        let factor = match get_f("rope.scaling.factor")? {
            Some(f) => f,
            None => get_f("rope.scale_linear")?.unwrap_or(0.0),
        };
        let freq_scale = if scaling == "none" || factor == 0.0 { 1.0 } else { 1.0 / factor };
        let attn_factor = get_f("rope.scaling.attn_factor")?.unwrap_or(1.0);
        let n_ctx_orig = get_opt("rope.scaling.original_context_length")?.unwrap_or(n_ctx_train);
        let freq_base = get_f("rope.freq_base")?.unwrap_or(10000.0);

        let attn_scale = match get_f("attention.scale")? {
            Some(s) if s != 0.0 => s,
            _ => 1.0 / (head_dim as f32).sqrt(),
        };

        let n_vocab = match file.tensor("token_embd.weight") {
            Some(t) => t.ne[1] as usize,
            None => {
                return Err(ModelError::MissingTensor {
                    file: fname.clone(),
                    tensor: "token_embd.weight".into(),
                });
            }
        };

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
            attn_scale,
            rope: RopeParams {
                mode: arch.rope_mode(),
                n_dims: n_rot,
                n_ctx_orig,
                freq_base,
                freq_scale,
                ext_factor: 0.0,
                attn_factor,
                beta_fast: 32.0,
                beta_slow: 1.0,
            },
        })
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
        assert!(err.contains("covers only llama, qwen2, qwen3, phi3"), "{err}");
        assert!(Arch::Phi3.fused_gate_up() && !Arch::Phi3.permutes_qk());
        let e = Arch::parse("gemma3").unwrap_err().to_string();
        assert!(e.contains("gemma3") && e.contains("GEGLU"), "{e}");
        let e = Arch::parse("mamba").unwrap_err().to_string();
        assert!(e.contains("mamba") && e.contains("llama"), "{e}");
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
