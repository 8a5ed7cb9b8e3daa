//! Multi-sequence contexts and stacked LoRA adapters, for `grit serve`.
//!
//! llama-cpp-2's safe `LlamaContext` applies one adapter at a time and does not expose its raw
//! pointer, so the server uses this small context of its own: several sequences decoded in one
//! batch (continuous batching), several adapters with scales applied at once through
//! `llama_set_adapters_lora`, per-sequence KV removal, embeddings, and explicit
//! `llama_adapter_lora_free` for adapters unloaded at runtime. Every `unsafe` block says why it
//! holds; everything here borrows the model (`'m`), so nothing outlives it.

use std::ffi::CString;
use std::marker::PhantomData;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_sys_2 as sys;

/// Errors of this module; messages are complete sentences for the server's logs and replies.
#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("{}: llama.cpp cannot load this LoRA adapter: {msg}", .path.display())]
    AdapterLoad { path: std::path::PathBuf, msg: String },
    #[error("cannot create a llama.cpp context (n_ctx {n_ctx}, {n_seq} sequences): {msg}")]
    Context { n_ctx: u32, n_seq: u32, msg: String },
    #[error("llama_set_adapters_lora failed with code {0}")]
    SetAdapters(i32),
    #[error("llama_decode failed with code {code}: {msg}")]
    Decode { code: i32, msg: String },
    #[error("the batch is full ({0} tokens)")]
    BatchFull(usize),
}

/// The raw `llama_model *` behind a safe `LlamaModel`.
fn model_ptr(model: &LlamaModel) -> *mut sys::llama_model {
    // SAFETY: `LlamaModel` is `#[repr(transparent)]` over llama-cpp-2's `Ptr<llama_model>`, which
    // is `#[repr(transparent)]` over `NonNull<llama_model>` (llama-cpp-2 =0.1.160, pinned
    // exactly in Cargo.toml), so the struct's bytes are exactly the pointer. We only read it.
    unsafe { *(model as *const LlamaModel as *const *mut sys::llama_model) }
}

/// A LoRA adapter loaded for one model; freed (`llama_adapter_lora_free`) on drop.
///
/// The owner must make sure no [`Context`] still has it applied when it is dropped
/// ([`Context::set_adapters`] with a list that does not contain it, or dropping the context).
pub struct Adapter<'m> {
    ptr: NonNull<sys::llama_adapter_lora>,
    _model: PhantomData<&'m LlamaModel>,
}

// SAFETY: an adapter is immutable after loading; grit's server only touches it from one thread
// at a time (the scheduler thread), and moving the pointer between threads is harmless.
unsafe impl Send for Adapter<'_> {}

impl<'m> Adapter<'m> {
    /// Loads a GGUF LoRA adapter for `model`. llama.cpp checks the architecture and shapes.
    pub fn load(model: &'m LlamaModel, path: &Path) -> Result<Self, MultiError> {
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            MultiError::AdapterLoad {
                path: path.into(),
                msg: "the path contains a NUL byte".into(),
            }
        })?;
        super::clear_log_errors();
        // SAFETY: the model pointer is valid for 'm; the path is a NUL-terminated C string that
        // outlives the call. A null return means failure (reported below).
        let raw = unsafe { sys::llama_adapter_lora_init(model_ptr(model), cpath.as_ptr()) };
        match NonNull::new(raw) {
            Some(ptr) => Ok(Adapter { ptr, _model: PhantomData }),
            None => Err(MultiError::AdapterLoad {
                path: path.into(),
                msg: super::last_log_error().unwrap_or_else(|| "unknown error".into()),
            }),
        }
    }

    /// `adapter.lora.alpha` etc.: a metadata value of the adapter file, if present.
    pub fn meta(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: valid adapter pointer; the buffer is writable for its length and llama.cpp
        // NUL-terminates within it; a negative return means "not found".
        let n = unsafe {
            sys::llama_adapter_meta_val_str(
                self.ptr.as_ptr(),
                ckey.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        let n = (n as usize).min(buf.len().saturating_sub(1));
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Adapter<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_adapter_lora_init and is freed exactly once; the
        // model is still alive ('m). Removing it from the model's set is part of this call.
        unsafe { sys::llama_adapter_lora_free(self.ptr.as_ptr()) }
    }
}

/// How to build a [`Context`].
#[derive(Debug, Clone, Copy)]
pub struct ContextConfig {
    /// Context length of each sequence.
    pub n_ctx_seq: u32,
    /// Number of sequences decoded together.
    pub n_seq: u32,
    /// Most tokens one `decode` call accepts.
    pub n_batch: u32,
    pub threads: i32,
    /// Embeddings context (mean pooling per sequence) instead of a generation context.
    pub embeddings: bool,
    /// Run ops and keep the KV cache on the GPU (false for a model loaded for the CPU).
    pub offload: bool,
}

/// A llama.cpp context with `n_seq` independent sequences (separate KV streams).
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    n_vocab: usize,
    n_embd: usize,
    cfg: ContextConfig,
    _model: PhantomData<&'m LlamaModel>,
}

// SAFETY: a llama_context is not tied to the thread that made it; grit uses each one from a
// single thread at a time (it is not Sync).
unsafe impl Send for Context<'_> {}

impl<'m> Context<'m> {
    pub fn new(model: &'m LlamaModel, cfg: ContextConfig) -> Result<Self, MultiError> {
        // SAFETY: returns a plain struct of default values.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = cfg.n_ctx_seq.saturating_mul(cfg.n_seq);
        p.n_batch = cfg.n_batch;
        // Embeddings pool a whole sequence, which llama.cpp wants in one micro-batch.
        p.n_ubatch = if cfg.embeddings { cfg.n_batch } else { cfg.n_batch.min(512) };
        p.n_seq_max = cfg.n_seq;
        p.n_threads = cfg.threads;
        p.n_threads_batch = cfg.threads;
        p.kv_unified = false;
        p.op_offload = cfg.offload;
        p.offload_kqv = cfg.offload;
        if cfg.embeddings {
            p.embeddings = true;
            p.pooling_type = sys::LLAMA_POOLING_TYPE_MEAN;
        }
        super::clear_log_errors();
        // SAFETY: valid model pointer for 'm; params by value. Null means failure.
        let raw = unsafe { sys::llama_init_from_model(model_ptr(model), p) };
        let ptr = NonNull::new(raw).ok_or_else(|| MultiError::Context {
            n_ctx: cfg.n_ctx_seq,
            n_seq: cfg.n_seq,
            msg: super::last_log_error().unwrap_or_else(|| "unknown error".into()),
        })?;
        Ok(Context {
            ptr,
            n_vocab: model.n_vocab() as usize,
            n_embd: model.n_embd() as usize,
            cfg,
            _model: PhantomData,
        })
    }

    pub fn config(&self) -> &ContextConfig {
        &self.cfg
    }

    /// Applies exactly these adapters with these scales (an empty list removes all).
    pub fn set_adapters(&mut self, adapters: &[(&Adapter<'m>, f32)]) -> Result<(), MultiError> {
        let mut ptrs: Vec<*mut sys::llama_adapter_lora> =
            adapters.iter().map(|(a, _)| a.ptr.as_ptr()).collect();
        let mut scales: Vec<f32> = adapters.iter().map(|(_, s)| *s).collect();
        let (pp, sp) = if ptrs.is_empty() {
            (std::ptr::null_mut(), std::ptr::null_mut())
        } else {
            (ptrs.as_mut_ptr(), scales.as_mut_ptr())
        };
        // SAFETY: valid context; the arrays hold `len` valid adapter pointers and scales and live
        // across the call (llama.cpp copies them into its own map); null/0 clears the set.
        let rc = unsafe { sys::llama_set_adapters_lora(self.ptr.as_ptr(), pp, ptrs.len(), sp) };
        if rc != 0 {
            return Err(MultiError::SetAdapters(rc));
        }
        Ok(())
    }

    /// Runs the model over `batch`.
    pub fn decode(&mut self, batch: &Batch) -> Result<(), MultiError> {
        super::clear_log_errors();
        // SAFETY: valid context; the batch's arrays hold `n_tokens` initialised entries (Batch
        // only grows through `add`) with sequence ids below n_seq (checked in `add`).
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
        if rc != 0 {
            let msg = match rc {
                1 => "no KV cache slot for the batch".to_string(),
                2 => "aborted".to_string(),
                _ => super::last_log_error()
                    .unwrap_or_else(|| "invalid batch or internal error".into()),
            };
            return Err(MultiError::Decode { code: rc, msg });
        }
        Ok(())
    }

    /// The logits of the `i`-th batch entry that asked for output (after [`Context::decode`]).
    pub fn logits(&mut self, i: i32) -> Option<&[f32]> {
        // SAFETY: valid context; llama.cpp returns null for an index without output, else a
        // pointer to n_vocab floats that stay valid until the next decode (&mut self borrow).
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i) };
        if p.is_null() {
            return None;
        }
        // SAFETY: see above: n_vocab contiguous floats.
        Some(unsafe { std::slice::from_raw_parts(p, self.n_vocab) })
    }

    /// The pooled embedding of sequence `seq` (embeddings contexts, after decode).
    pub fn embeddings_seq(&mut self, seq: i32) -> Option<&[f32]> {
        // SAFETY: valid context; null when the sequence has no pooled output.
        let p = unsafe { sys::llama_get_embeddings_seq(self.ptr.as_ptr(), seq) };
        if p.is_null() {
            return None;
        }
        // SAFETY: mean pooling returns n_embd floats, valid until the next decode.
        Some(unsafe { std::slice::from_raw_parts(p, self.n_embd) })
    }

    /// Forgets everything sequence `seq` stored in the KV cache.
    pub fn clear_seq(&mut self, seq: i32) {
        // SAFETY: valid context; its memory object lives as long as the context. Removing a whole
        // sequence (p0 = p1 = -1) never fails.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            if !mem.is_null() {
                sys::llama_memory_seq_rm(mem, seq, -1, -1);
            }
        }
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed exactly once, model still alive.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A batch of tokens for [`Context::decode`], each in one sequence.
pub struct Batch {
    raw: sys::llama_batch,
    cap: usize,
    n_seq: i32,
}

// SAFETY: the batch owns its arrays; nothing else points into them.
unsafe impl Send for Batch {}

impl Batch {
    /// Room for `cap` tokens over sequences `0..n_seq`.
    pub fn new(cap: usize, n_seq: u32) -> Self {
        // SAFETY: allocates `cap` entries of each array (token mode, one seq id per token).
        let raw = unsafe { sys::llama_batch_init(cap as i32, 0, 1) };
        Batch { raw, cap, n_seq: n_seq as i32 }
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Appends `token` at position `pos` of sequence `seq`; `output` asks for its logits.
    /// Returns the entry's index.
    pub fn add(
        &mut self,
        token: LlamaToken,
        pos: i32,
        seq: i32,
        output: bool,
    ) -> Result<i32, MultiError> {
        let i = self.raw.n_tokens as usize;
        if i >= self.cap || seq < 0 || seq >= self.n_seq {
            return Err(MultiError::BatchFull(self.cap));
        }
        // SAFETY: i < cap, and every array was allocated with cap entries (seq_id[i] with room
        // for one id) by llama_batch_init.
        unsafe {
            *self.raw.token.add(i) = token.0;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
        Ok(i as i32)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}
