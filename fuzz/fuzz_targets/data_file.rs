//! Training data: any bytes, as a JSONL, JSON or text file, load with the default model's
//! tokenizer or fail with an error that names the file (`grit train`, `--dry-run`).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;

use grit::data::{load_file, DataConfig};
use grit::infer::Model;

fn tokenizer() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load_vocab_only(&common::env().model).expect("the tiny model's vocabulary loads")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    let e = common::env();
    let name = ["d.jsonl", "d.json", "d.txt"][kind as usize % 3];
    let path = e.dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    let cfg =
        DataConfig { max_seq_len: 64, skip_bad_rows: kind & 0x80 != 0, ..DataConfig::default() };
    match load_file(&path, tokenizer(), &cfg) {
        Ok(ds) => assert!(!ds.is_empty(), "Ok with no examples"),
        Err(err) => {
            let msg = err.to_string();
            assert!(msg.contains(name), "the error does not name the file: {msg}");
        }
    }
});
