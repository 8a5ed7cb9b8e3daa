//! grit's side of the Hugging Face PEFT check (`bench/hf_peft_check.sh`): tokenizes a text
//! with the model's llama.cpp tokenizer and writes, for the first N tokens,
//!
//! - `tokens.json`   the token ids;
//! - `base.f32`      llama.cpp's logits without the adapter;
//! - `llama.f32`     llama.cpp's logits with the GGUF adapter applied (what `grit generate` serves);
//! - `graph.f32`     grit's training-graph logits with the same adapter;
//!
//! each [N × n_vocab] little-endian f32. llama.cpp runs with an F32 KV cache and flash
//! attention off, as grit's training graph does.
//!
//! Usage: adapter_logits MODEL.gguf ADAPTER.gguf TEXT_FILE N OUT_DIR

use std::path::{Path, PathBuf};

use grit::adapter::Adapter;
use grit::ggml::{Backend, Context};
use grit::gguf::GgufFile;
use grit::infer::{LoadOptions, Model};
use grit::model::{Batch, GraphOptions, Outputs, TrainGraph, Weights};

fn write_f32(path: &Path, x: &[f32]) -> anyhow::Result<()> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        anyhow::bail!("usage: adapter_logits MODEL.gguf ADAPTER.gguf TEXT_FILE N OUT_DIR");
    }
    let (model_path, adapter_path, text_path) =
        (PathBuf::from(&args[1]), PathBuf::from(&args[2]), PathBuf::from(&args[3]));
    let n: usize = args[4].parse()?;
    let out = PathBuf::from(&args[5]);
    std::fs::create_dir_all(&out)?;
    grit::llama::init_logging(false);
    let threads = grit::infer::resolve_threads(0);

    let mut model = Model::load(&model_path, &LoadOptions::cpu())?;
    let text = std::fs::read_to_string(&text_path)?;
    let toks: Vec<i32> = model.tokenize(&text, true).into_iter().map(|t| t.0).take(n).collect();
    anyhow::ensure!(toks.len() == n, "{} has only {} tokens", text_path.display(), toks.len());
    std::fs::write(out.join("tokens.json"), serde_json::to_vec(&toks)?)?;

    write_f32(&out.join("base.f32"), &model.logits_all(None, &toks, threads)?)?;
    write_f32(&out.join("llama.f32"), &model.logits_all(Some(&adapter_path), &toks, threads)?)?;

    let file = GgufFile::open(&model_path)?;
    let mut backend = Backend::cpu(threads as usize)?;
    let weights = Weights::load(&file, &backend)?;
    let adapter = Adapter::read_gguf(&adapter_path)?;
    let lora = adapter.to_lora_set(&weights, &backend)?;
    let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), false))?;
    let g = TrainGraph::build(&ctx, &weights, Some(&lora), n, GraphOptions::logits(Outputs::All));
    let mut run = backend.compute(&g.graph)?;
    g.set_inputs(&mut run, &Batch::causal(&toks, &[], &[])?)?;
    run.run()?;
    write_f32(&out.join("graph.f32"), &run.read_f32(g.logits)?)?;
    eprintln!(
        "adapter_logits: {n} tokens, vocab {}, written to {}",
        weights.hparams.n_vocab,
        out.display()
    );
    Ok(())
}
