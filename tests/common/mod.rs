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

/// llama.cpp's logits at every position ([n_tokens × n_vocab]); see `Model::logits_all`.
pub fn llama_cpp_logits(model: &mut grit::infer::Model, adapter: Option<&Path>, tokens: &[i32], threads: i32) -> Vec<f32> {
    model.logits_all(adapter, tokens, threads).expect("llama.cpp logits")
}
