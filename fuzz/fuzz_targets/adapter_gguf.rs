//! Adapter files: a mutant of a good adapter is refused by grit's validation or loads in
//! llama.cpp and decodes (what `generate`, `eval` and `serve` do with it).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Mutex, OnceLock};

use grit::infer::{LoadOptions, Model};

fn base() -> &'static Mutex<Model> {
    static M: OnceLock<Mutex<Model>> = OnceLock::new();
    M.get_or_init(|| {
        Mutex::new(
            Model::load(&common::env().model, &LoadOptions::cpu()).expect("the tiny model loads"),
        )
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let e = common::env();
    let mut files = [e.adapter_bytes.clone()];
    common::apply_edits(&mut files, &[e.adapter_header], data);
    let path = e.dir.path().join("mutant-adapter.gguf");
    std::fs::write(&path, &files[0]).unwrap();
    let mut m = base().lock().unwrap();
    match m.load_checked_adapter(&path) {
        Ok(_) => {
            if let Err(err) = m.logits_all(Some(&path), &[1, 2, 3, 4], 1) {
                assert!(!err.to_string().is_empty());
            }
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
});
