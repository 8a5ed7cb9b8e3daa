//! PEFT folders (adapter_config.json + adapter_model.safetensors): a mutant of a good folder
//! reads against the base model or fails with an error (`export`, `merge`, `inspect`, `serve`).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use grit::adapter::peft::{read_peft, write_peft, CONFIG, WEIGHTS};

/// The good folder's (config, weights, weights header length).
fn seed() -> &'static (Vec<u8>, Vec<u8>, usize) {
    static S: OnceLock<(Vec<u8>, Vec<u8>, usize)> = OnceLock::new();
    S.get_or_init(|| {
        let e = common::env();
        let dir = e.dir.path().join("good-peft");
        let mut adapter = grit::adapter::Adapter::read_gguf(&e.adapter).unwrap();
        // Head counts for the llama q/k row permutation (what `grit train` records).
        let spec = grit::model::TinySpec::default();
        (adapter.provenance.n_head, adapter.provenance.n_head_kv) =
            (Some(spec.n_head as u32), Some(spec.n_head_kv as u32));
        write_peft(&adapter, &dir).unwrap();
        read_peft(&dir, Some(&e.model)).expect("the good folder reads");
        let w = std::fs::read(dir.join(WEIGHTS)).unwrap();
        let header = 8 + u64::from_le_bytes(w[..8].try_into().unwrap()) as usize;
        (std::fs::read(dir.join(CONFIG)).unwrap(), w, header)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let e = common::env();
    let (config, weights, header) = seed();
    let mut files = [config.clone(), weights.clone()];
    common::apply_edits(&mut files, &[config.len(), *header], data);
    let dir = e.dir.path().join("mutant-peft");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CONFIG), &files[0]).unwrap();
    std::fs::write(dir.join(WEIGHTS), &files[1]).unwrap();
    if let Err(err) = read_peft(&dir, Some(&e.model)) {
        assert!(!err.to_string().is_empty());
    }
});
