//! Text generation and chat on llama-cpp-2: model loading with clear errors, a sampler chain
//! built from user options, token streaming with stop strings, and optional LoRA adapters.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaLoraAdapter, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::ggml::{resolve_gpu, Device, DeviceInfo, GgmlError};
use crate::gguf::{GgufError, GgufFile};

/// Why inference could not run. Messages name the file or the option at fault.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Device(#[from] GgmlError),
    #[error("{}: llama.cpp cannot load this model: {msg}", .path.display())]
    Load { path: PathBuf, msg: String },
    /// The adapter failed grit's validation (the message names the file and tensor).
    #[error(transparent)]
    InvalidAdapter(Box<crate::adapter::AdapterError>),
    #[error("{}: llama.cpp cannot load this LoRA adapter: {msg}", .path.display())]
    Adapter { path: PathBuf, msg: String },
    #[error("cannot create a llama.cpp context (n_ctx {n_ctx}): {msg}")]
    Context { n_ctx: u32, msg: String },
    #[error("the prompt has {n_prompt} tokens, more than the context of {n_ctx} allows with --max-tokens {max_tokens}")]
    PromptTooLong { n_prompt: usize, n_ctx: u32, max_tokens: usize },
    #[error("decode failed at token {pos}: {msg}")]
    Decode { pos: usize, msg: String },
    #[error("{}: the model has no chat template; use `grit generate` with a plain prompt", .0.display())]
    NoChatTemplate(PathBuf),
    #[error("chat template failed: {0}")]
    Template(#[source] crate::BoxError),
    #[error("invalid option {name}: {msg}")]
    Option { name: &'static str, msg: String },
}

/// How to load a model for inference.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Layers to offload to the GPU when one is used.
    pub n_gpu_layers: u32,
    /// `Cpu` keeps weights, KV cache and every op on the CPU; `Gpu` fails without a GPU.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { n_gpu_layers: 999, device: Device::Auto }
    }
}

impl LoadOptions {
    /// Everything on the CPU (the parity tests' reference).
    pub fn cpu() -> Self {
        Self { n_gpu_layers: 0, device: Device::Cpu }
    }
}

/// A model loaded by llama.cpp, with the path it came from.
pub struct Model {
    pub path: PathBuf,
    pub inner: LlamaModel,
    /// The GPU the model runs on (None: the CPU).
    pub gpu: Option<DeviceInfo>,
    /// Layers llama.cpp offloaded to the GPU (0 on the CPU).
    pub gpu_layers: u32,
}

impl Model {
    /// Validates `path` as GGUF (exists, magic, header, not truncated), then loads it with
    /// llama.cpp; llama.cpp's own reason (e.g. an unknown architecture) is reported on failure.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, InferError> {
        GgufFile::open(path)?.check_for_llama()?;
        let backend = crate::llama::backend();
        let gpu = resolve_gpu(opts.device)?;
        let gpu_layers = if gpu.is_some() { opts.n_gpu_layers } else { 0 };
        crate::llama::clear_log_errors();
        let params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
        let inner =
            LlamaModel::load_from_file(backend, path, &params).map_err(|e| InferError::Load {
                path: path.into(),
                msg: crate::llama::last_log_error().unwrap_or_else(|| e.to_string()),
            })?;
        Ok(Model { path: path.into(), inner, gpu, gpu_layers })
    }

    /// Where the model runs, for logs: `CPU` or `Vulkan0 (llvmpipe ...), 31 layers offloaded`.
    pub fn device_label(&self) -> String {
        match &self.gpu {
            Some(d) => format!(
                "{} ({}), {} layers offloaded",
                d.name,
                d.description,
                self.gpu_layers.min(self.inner.n_layer())
            ),
            None => "CPU".into(),
        }
    }

    /// Whether llama.cpp may run ops (and the KV cache) on the GPU.
    pub fn offload(&self) -> bool {
        self.gpu.is_some()
    }

    /// Context parameters with this model's device placement (no GPU ops for a CPU model,
    /// even in a GPU build).
    pub fn context_params(&self) -> LlamaContextParams {
        LlamaContextParams::default()
            .with_op_offload(self.offload())
            .with_offload_kqv(self.offload())
    }

    /// Loads only the vocabulary and chat template (no weights): for tokenizing training data.
    pub fn load_vocab_only(path: &Path) -> Result<Self, InferError> {
        let file = GgufFile::open(path)?;
        file.check_for_llama()?;
        Self::load_vocab_of(&file)
    }

    /// [`Model::load_vocab_only`] for a file the caller has opened and checked with
    /// [`GgufFile::check_for_llama`] (it is not read twice).
    pub(crate) fn load_vocab_of(file: &GgufFile) -> Result<Self, InferError> {
        let path = file.path();
        let backend = crate::llama::backend();
        crate::llama::clear_log_errors();
        let params = LlamaModelParams::default().with_vocab_only(true);
        let inner =
            LlamaModel::load_from_file(backend, path, &params).map_err(|e| InferError::Load {
                path: path.into(),
                msg: crate::llama::last_log_error().unwrap_or_else(|| e.to_string()),
            })?;
        Ok(Model { path: path.into(), inner, gpu: None, gpu_layers: 0 })
    }

    /// Loads a LoRA adapter (GGUF) for this model.
    /// The file is first validated against this model with grit's reader
    /// ([`crate::adapter::validate_for_base`]): llama.cpp sees only adapters that fit.
    pub fn load_adapter(&mut self, path: &Path) -> Result<LlamaLoraAdapter, InferError> {
        self.load_checked_adapter(path).map(|(lora, _)| lora)
    }

    /// [`Model::load_adapter`], also returning grit's validated reading of the file (A, B,
    /// ranks and scales) for callers that use its values.
    pub fn load_checked_adapter(
        &mut self,
        path: &Path,
    ) -> Result<(LlamaLoraAdapter, crate::adapter::Adapter), InferError> {
        let adapter = crate::adapter::validate_for_base(path, &self.path)
            .map_err(|e| InferError::InvalidAdapter(Box::new(e)))?;
        crate::llama::clear_log_errors();
        let lora = self.inner.lora_adapter_init(path).map_err(|e| InferError::Adapter {
            path: path.into(),
            msg: crate::llama::last_log_error().unwrap_or_else(|| e.to_string()),
        })?;
        Ok((lora, adapter))
    }

    /// llama.cpp's logits at every position ([n_tokens × n_vocab], row-major) of one sequence,
    /// optionally with an adapter at scale 1, in one batch with an F32 KV cache and flash
    /// attention off (as grit's training graph computes): the reference the parity tests and
    /// `bench/adapter_logits.rs` compare against.
    pub fn logits_all(
        &mut self,
        adapter: Option<&Path>,
        tokens: &[i32],
        threads: i32,
    ) -> Result<Vec<f32>, InferError> {
        use llama_cpp_2::context::params::KvCacheType;
        let n = tokens.len();
        let mut lora = adapter.map(|p| self.load_adapter(p)).transpose()?;
        let n_ctx = n.max(1).next_multiple_of(256) as u32;
        let params = self
            .context_params()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_type_k(KvCacheType::F32)
            .with_type_v(KvCacheType::F32)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
        let mut ctx = self
            .inner
            .new_context(crate::llama::backend(), params)
            .map_err(|e| InferError::Context { n_ctx, msg: e.to_string() })?;
        if let Some(l) = lora.as_mut() {
            ctx.lora_adapter_set(l, 1.0).map_err(|e| InferError::Adapter {
                path: adapter.unwrap_or(Path::new("")).into(),
                msg: e.to_string(),
            })?;
        }
        let mut batch = LlamaBatch::new(n, 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch
                .add(LlamaToken(t), i as i32, &[0], true)
                .map_err(|e| InferError::Decode { pos: i, msg: e.to_string() })?;
        }
        ctx.decode(&mut batch).map_err(|e| InferError::Decode { pos: 0, msg: e.to_string() })?;
        Ok((0..n).flat_map(|i| ctx.get_logits_ith(i as i32).to_vec()).collect())
    }

    /// Renders chat messages with the model's own template, ending with the assistant prefix.
    pub fn apply_chat(&self, messages: &[(String, String)]) -> Result<String, InferError> {
        let tmpl = self
            .inner
            .chat_template(None)
            .map_err(|_| InferError::NoChatTemplate(self.path.clone()))?;
        let msgs = messages
            .iter()
            .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InferError::Template(e.into()))?;
        self.inner
            .apply_chat_template(&tmpl, &msgs, true)
            .map_err(|e| InferError::Template(e.into()))
    }

    pub fn has_chat_template(&self) -> bool {
        self.inner.chat_template(None).is_ok()
    }

    /// Tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.inner.n_vocab() as usize
    }

    /// Tokenizes text (BOS added when the model wants it and `add_bos`; special tokens parsed).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<LlamaToken> {
        self.inner.vocab().tokenize(text.as_bytes(), add_bos, true)
    }
}

/// Sampling and length options (defaults: greedy, deterministic).
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: i32,
    pub seed: u32,
    pub stop: Vec<String>,
    /// Do not stop at end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SampleOptions {
    /// Checks ranges; errors name the flag.
    pub fn validate(&self) -> Result<(), InferError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(InferError::Option {
                name: "--temperature",
                msg: format!("{} must be ≥ 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferError::Option {
                name: "--top-p",
                msg: format!("{} must be in (0, 1]", self.top_p),
            });
        }
        if self.top_k < 0 {
            return Err(InferError::Option {
                name: "--top-k",
                msg: format!("{} must be ≥ 0", self.top_k),
            });
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(InferError::Option {
                name: "--stop",
                msg: "an empty stop string would stop at once".into(),
            });
        }
        Ok(())
    }

    fn sampler(&self) -> LlamaSampler {
        self.random_sampler().unwrap_or_else(LlamaSampler::greedy)
    }

    /// The sampling chain (top-k, top-p, temperature, seeded draw); None for greedy
    /// (temperature 0).
    pub(crate) fn random_sampler(&self) -> Option<LlamaSampler> {
        if self.temperature == 0.0 {
            return None;
        }
        let mut chain = Vec::new();
        if self.top_k > 0 {
            chain.push(LlamaSampler::top_k(self.top_k));
        }
        if self.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(self.top_p, 1));
        }
        chain.push(LlamaSampler::temp(self.temperature));
        chain.push(LlamaSampler::dist(self.seed));
        Some(LlamaSampler::chain_simple(chain))
    }
}

/// Context options.
#[derive(Debug, Clone, Default)]
pub struct ContextOptions {
    /// 0 = the model's training context, capped at 4096.
    pub n_ctx: u32,
    /// 0 = all cores.
    pub threads: i32,
}

/// Number of worker threads: `requested`, or every available core.
pub fn resolve_threads(requested: i32) -> i32 {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(1)
    }
}

/// What a generation produced and how fast.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// "stop" (EOS or a stop string) or "length".
    pub finish_reason: &'static str,
    pub prompt_s: f64,
    pub gen_s: f64,
}

impl Generation {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_s.max(1e-9)
    }
    /// Generation speed over the decode steps (the first sampled token comes from the prompt pass).
    pub fn gen_tok_per_s(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / self.gen_s.max(1e-9)
    }
}

/// A decoding session: one llama.cpp context over a loaded model.
pub struct Session<'m> {
    model: &'m Model,
    ctx: LlamaContext<'m>,
    n_ctx: u32,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, opts: &ContextOptions) -> Result<Self, InferError> {
        let n_ctx =
            if opts.n_ctx > 0 { opts.n_ctx } else { model.inner.n_ctx_train().clamp(256, 4096) };
        let threads = resolve_threads(opts.threads);
        let params = model
            .context_params()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx.min(2048))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        crate::llama::clear_log_errors();
        let ctx = model.inner.new_context(crate::llama::backend(), params).map_err(|e| {
            InferError::Context {
                n_ctx,
                msg: crate::llama::last_log_error().unwrap_or_else(|| e.to_string()),
            }
        })?;
        Ok(Session { model, ctx, n_ctx })
    }

    /// Applies one adapter at `scale` (replacing any previous one).
    pub fn set_adapter(
        &mut self,
        adapter: &mut LlamaLoraAdapter,
        scale: f32,
    ) -> Result<(), InferError> {
        self.ctx.lora_adapter_set(adapter, scale).map_err(|e| InferError::Adapter {
            path: PathBuf::from("<adapter>"),
            msg: e.to_string(),
        })
    }

    /// Generates from `prompt` (BOS added as the model wants), streaming text pieces to
    /// `on_text` as they become final. Clears the KV cache first.
    pub fn generate(
        &mut self,
        prompt: &str,
        opts: &SampleOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, InferError> {
        opts.validate()?;
        let tokens = self.model.tokenize(prompt, true);
        if tokens.is_empty() {
            return Err(InferError::Option { name: "--prompt", msg: "the prompt is empty".into() });
        }
        if tokens.len() + opts.max_tokens > self.n_ctx as usize {
            return Err(InferError::PromptTooLong {
                n_prompt: tokens.len(),
                n_ctx: self.n_ctx,
                max_tokens: opts.max_tokens,
            });
        }
        self.ctx.clear_kv_cache();
        let mut sampler = opts.sampler();
        let vocab = self.model.inner.vocab();
        let n_batch = self.ctx.n_batch() as usize;
        let mut gen = Generation {
            prompt_tokens: tokens.len(),
            finish_reason: "length",
            ..Default::default()
        };

        // Prompt, in chunks of n_batch; logits only for the last token.
        let t0 = Instant::now();
        let mut batch = LlamaBatch::new(n_batch.max(1), 1);
        for (ci, chunk) in tokens.chunks(n_batch).enumerate() {
            batch.clear();
            let base = ci * n_batch;
            for (i, &t) in chunk.iter().enumerate() {
                let pos = base + i;
                batch
                    .add(t, pos as i32, &[0], pos + 1 == tokens.len())
                    .map_err(|e| InferError::Decode { pos, msg: e.to_string() })?;
            }
            self.ctx
                .decode(&mut batch)
                .map_err(|e| InferError::Decode { pos: base, msg: e.to_string() })?;
        }
        gen.prompt_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut stream = StopStream::new(&opts.stop);
        let mut piece = Vec::with_capacity(16);
        let mut logits_idx = batch.n_tokens() - 1;
        for n_past in (tokens.len()..).take(opts.max_tokens) {
            let tok = sampler.sample(&self.ctx, logits_idx);
            sampler.accept(tok);
            gen.completion_tokens += 1;
            if vocab.is_eog(tok) && !opts.ignore_eos {
                gen.finish_reason = "stop";
                break;
            }
            piece.clear();
            vocab.token_to_piece_into(tok, &mut piece, false, None);
            if stream.push(&piece, &mut on_text) {
                gen.finish_reason = "stop";
                break;
            }
            if gen.completion_tokens == opts.max_tokens {
                break;
            }
            batch.clear();
            batch
                .add(tok, n_past as i32, &[0], true)
                .map_err(|e| InferError::Decode { pos: n_past, msg: e.to_string() })?;
            self.ctx
                .decode(&mut batch)
                .map_err(|e| InferError::Decode { pos: n_past, msg: e.to_string() })?;
            logits_idx = 0;
        }
        stream.finish(&mut on_text);
        gen.gen_s = t1.elapsed().as_secs_f64();
        gen.text = stream.emitted;
        Ok(gen)
    }
}

/// Turns a stream of token bytes into text pieces: holds back incomplete UTF-8 sequences and
/// any tail that could still become a stop string, and ends at the first stop string.
pub struct StopStream {
    stops: Vec<String>,
    bytes: Vec<u8>,
    pending: String,
    /// Everything handed to the callback so far.
    pub emitted: String,
}

impl StopStream {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.to_vec(),
            bytes: Vec::new(),
            pending: String::new(),
            emitted: String::new(),
        }
    }

    fn emit(&mut self, upto: usize, on_text: &mut impl FnMut(&str)) {
        if upto == 0 {
            return;
        }
        let out: String = self.pending.drain(..upto).collect();
        on_text(&out);
        self.emitted.push_str(&out);
    }

    /// Adds bytes; returns true when a stop string was reached (the text before it is emitted).
    pub fn push(&mut self, piece: &[u8], on_text: &mut impl FnMut(&str)) -> bool {
        self.bytes.extend_from_slice(piece);
        // Move the longest valid UTF-8 prefix into `pending`; invalid bytes become U+FFFD.
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.pending.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: the prefix up to valid_up_to is valid UTF-8.
                    self.pending
                        .push_str(std::str::from_utf8(&self.bytes[..good]).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            self.pending.push('\u{FFFD}');
                            self.bytes.drain(..good + bad);
                        }
                        None => {
                            self.bytes.drain(..good);
                            break; // incomplete sequence: wait for more bytes
                        }
                    }
                }
            }
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.emit(at, on_text);
            self.pending.clear();
            return true;
        }
        // Hold back the longest suffix of `pending` that is a proper prefix of a stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let upto = self.pending.len() - hold;
        self.emit(upto, on_text);
        false
    }

    /// Emits whatever is still held back (end of generation without a stop string).
    pub fn finish(&mut self, on_text: &mut impl FnMut(&str)) {
        if !self.bytes.is_empty() {
            self.pending.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        let n = self.pending.len();
        self.emit(n, on_text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool, Vec<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStream::new(&stops);
        let mut chunks = Vec::new();
        let mut stopped = false;
        for p in pieces {
            if s.push(p, &mut |t: &str| chunks.push(t.to_string())) {
                stopped = true;
                break;
            }
        }
        if !stopped {
            s.finish(&mut |t: &str| chunks.push(t.to_string()));
        }
        (s.emitted, stopped, chunks)
    }

    #[test]
    fn stops_across_pieces_and_holds_back_prefix() {
        let (text, stopped, chunks) = run(&["\n\n"], &[b"Paris", b".\n", b"\nNext"]);
        assert!(stopped);
        assert_eq!(text, "Paris.");
        assert_eq!(chunks, vec!["Paris", "."]);
    }

    #[test]
    fn a_partial_stop_that_does_not_complete_is_emitted() {
        let (text, stopped, _) = run(&["END"], &[b"EN", b"D? no: ENx"]);
        assert!(stopped);
        assert_eq!(text, "");
        let (text, stopped, _) = run(&["END"], &[b"EN", b"x"]);
        assert!(!stopped);
        assert_eq!(text, "ENx");
    }

    #[test]
    fn utf8_split_across_tokens() {
        let e = "é".as_bytes();
        let (text, _, chunks) = run(&[], &[b"caf", &e[..1], &e[1..], b"!"]);
        assert_eq!(text, "café!");
        assert!(chunks.iter().all(|c| !c.contains('\u{FFFD}')));
    }

    #[test]
    fn sample_options_validate_names_flag() {
        let o = SampleOptions { top_p: 0.0, ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("--top-p"));
        let o = SampleOptions { temperature: -1.0, ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("--temperature"));
    }
}
