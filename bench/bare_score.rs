//! The bare llama-cpp-2 scoring loop: load the model (and optionally a LoRA adapter), tokenize
//! a text file, cut it into windows of CTX tokens, and decode each window in one batch with
//! logits at every position, reading every logits row (its maximum). It uses none of grit's
//! code, so the evaluation benchmark (bench/eval_speed.sh) can compare `grit eval` against the
//! decode work that any scorer has to do, in the same run.
//!
//! Usage: bare_score MODEL.gguf TEXT_FILE CTX WINDOWS THREADS [ADAPTER.gguf]
//! With an adapter the windows are decoded twice, without it and with it (what `grit eval`
//! does for the base row and one adapter row). Prints one JSON line: windows, tokens decoded,
//! seconds (decode only, and with the load).

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t_start = Instant::now();
    let args: Vec<String> = std::env::args().collect();
    if !(6..=7).contains(&args.len()) {
        return Err("usage: bare_score MODEL.gguf TEXT_FILE CTX WINDOWS THREADS [ADAPTER]".into());
    }
    let (path, text_path) = (&args[1], &args[2]);
    let n_ctx: usize = args[3].parse()?;
    let n_windows: usize = args[4].parse()?;
    let threads: i32 = args[5].parse()?;

    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let mut model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())?;
    // The adapter is made before the context borrows the model, and outlives it.
    let mut adapter = args.get(6).map(|a| model.lora_adapter_init(a)).transpose()?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_batch(n_ctx as u32)
        .with_n_ubatch(n_ctx as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params)?;
    let text = std::fs::read_to_string(text_path)?;
    let tokens = model.vocab().tokenize(text.as_bytes(), true, true);
    let windows: Vec<_> = tokens.chunks_exact(n_ctx).take(n_windows).collect();

    let t0 = Instant::now();
    let mut batch = LlamaBatch::new(n_ctx, 1);
    let mut checksum = 0f64;
    let passes = if adapter.is_some() { 2 } else { 1 };
    for pass in 0..passes {
        if pass == 1 {
            if let Some(a) = adapter.as_mut() {
                ctx.lora_adapter_set(a, 1.0)?;
            }
        }
        for w in &windows {
            ctx.clear_kv_cache();
            batch.clear();
            for (i, &t) in w.iter().enumerate() {
                batch.add(t, i as i32, &[0], true)?;
            }
            ctx.decode(&mut batch)?;
            for i in 0..w.len() {
                let row = ctx.get_logits_ith(i as i32);
                checksum += row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            }
        }
    }
    let decode_s = t0.elapsed().as_secs_f64();
    let n = passes * windows.len() * n_ctx;
    println!(
        "{{\"windows\":{},\"tokens\":{n},\"decode_s\":{decode_s:.3},\"total_s\":{:.3},\"tokens_per_s\":{:.3},\"checksum\":{checksum:.3}}}",
        windows.len(),
        t_start.elapsed().as_secs_f64(),
        n as f64 / decode_s
    );
    Ok(())
}
