//! The bare llama-cpp-2 decode loop: load, tokenize, decode the prompt in one batch, then
//! greedy-decode N tokens one at a time. It uses none of grit's code, so the generation
//! benchmark (bench/generate.sh) can compare `grit generate` against it in the same run.
//!
//! Usage: bare_decode MODEL.gguf PROMPT N_TOKENS THREADS
//! Prints one JSON line: prompt/generation token counts and tokens per second.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: bare_decode MODEL.gguf PROMPT N_TOKENS THREADS".into());
    }
    let (path, prompt) = (&args[1], &args[2]);
    let n_gen: usize = args[3].parse()?;
    let threads: i32 = args[4].parse()?;

    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())?;
    let n_ctx = 2048u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params)?;
    let vocab = model.vocab();
    let tokens = vocab.tokenize(prompt.as_bytes(), true, true);

    let t0 = Instant::now();
    let mut batch = LlamaBatch::new(n_ctx as usize, 1);
    for (i, &t) in tokens.iter().enumerate() {
        batch.add(t, i as i32, &[0], i + 1 == tokens.len())?;
    }
    ctx.decode(&mut batch)?;
    let prompt_s = t0.elapsed().as_secs_f64();

    let mut sampler = LlamaSampler::greedy();
    let t1 = Instant::now();
    let mut idx = batch.n_tokens() - 1;
    let mut text = Vec::new();
    for (i, pos) in (0..n_gen).zip(tokens.len() as i32..) {
        let tok = sampler.sample(&ctx, idx);
        sampler.accept(tok);
        vocab.token_to_piece_into(tok, &mut text, false, None);
        if i + 1 == n_gen {
            break;
        }
        batch.clear();
        batch.add(tok, pos, &[0], true)?;
        ctx.decode(&mut batch)?;
        idx = 0;
    }
    let gen_s = t1.elapsed().as_secs_f64();
    println!(
        "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"prompt_tokens_per_s\":{:.3},\"gen_tokens_per_s\":{:.3},\"text_bytes\":{}}}",
        tokens.len(),
        n_gen,
        tokens.len() as f64 / prompt_s,
        (n_gen.saturating_sub(1)) as f64 / gen_s,
        text.len()
    );
    Ok(())
}
