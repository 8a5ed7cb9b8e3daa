//! Model files: a mutant of a tiny model either fails to load with an error or loads and
//! decodes. An abort inside llama.cpp/ggml (or a panic) is a finding.
#![no_main]

#[path = "common.rs"]
mod common;

use grit::infer::{LoadOptions, Model};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let e = common::env();
    let mut files = [e.model_bytes.clone()];
    common::apply_edits(&mut files, &[e.model_header], data);
    let path = e.dir.path().join("mutant-model.gguf");
    std::fs::write(&path, &files[0]).unwrap();
    match Model::load(&path, &LoadOptions::cpu()) {
        Ok(mut m) => {
            // What loads must also run: a short decode with every logit.
            if let Err(err) = m.logits_all(None, &[1, 2, 3, 4], 1) {
                assert!(!err.to_string().is_empty());
            }
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});
