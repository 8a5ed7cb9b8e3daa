//! Untrusted training data: a bounded, deterministic mutation fuzz of JSONL/JSON/text files
//! through `data::load_file` with the default model's tokenizer (what `grit train` and
//! `--dry-run` read). Each mutant loads or fails with an error naming the file; a panic fails.

mod common;

use grit::data::{load_file, DataConfig, SplitMix64};
use grit::infer::{LoadOptions, Model};
use serde_json::{json, Value};

fn seed_rows() -> Vec<Value> {
    vec![
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}),
        json!({"prompt": "Translate: cat", "completion": "chat"}),
        json!({"text": "To be, or not to be, that is the question."}),
        json!({"instruction": "Add", "input": "2 and 2", "output": "4"}),
        json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}),
    ]
}

fn wild(rng: &mut SplitMix64) -> Value {
    match rng.below(10) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(1e308),
        3 => json!("x".repeat(rng.below(3000) as usize)),
        4 => json!([]),
        5 => json!({}),
        6 => json!([[["deep"]]]),
        7 => json!(true),
        8 => json!({"role": "wizard", "content": 3}),
        _ => json!("\u{0}\u{fffd}<|im_end|>"),
    }
}

fn mutate(v: &mut Value, rng: &mut SplitMix64) {
    common::mutate_json(v, rng, &["messages", "prompt", "text", "role", "content"], &wild);
}

#[test]
fn mutated_data_files_load_or_fail_cleanly() {
    let model =
        Model::load(&grit::fetch::ensure_default_model().unwrap(), &LoadOptions::cpu()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(0x6461_7461);
    let n: usize =
        std::env::var("GRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let (mut ok, mut refused) = (0, 0);
    for case in 0..n {
        let mut rows = seed_rows();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(rows.len() as u64) as usize;
            mutate(&mut rows[i], &mut rng);
        }
        // One file kind per case: JSONL, a JSON array, or plain text; some broken at the byte level.
        let (name, mut bytes) = match rng.below(3) {
            0 => (
                "d.jsonl",
                rows.iter().map(|r| r.to_string() + "\n").collect::<String>().into_bytes(),
            ),
            1 => ("d.json", Value::Array(rows).to_string().into_bytes()),
            _ => (
                "d.txt",
                rows.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n\n").into_bytes(),
            ),
        };
        match rng.below(6) {
            0 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
            1 if !bytes.is_empty() => {
                let i = rng.below(bytes.len() as u64) as usize;
                bytes[i] ^= 1 << rng.below(8);
            }
            _ => {}
        }
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        for skip_bad_rows in [false, true] {
            let cfg = DataConfig { max_seq_len: 64, skip_bad_rows, ..DataConfig::default() };
            match load_file(&path, &model, &cfg) {
                Ok(ds) => {
                    ok += 1;
                    assert!(!ds.is_empty(), "case {case}: Ok with no examples");
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(name),
                        "case {case}: the error does not name the file: {msg}"
                    );
                    refused += 1;
                }
            }
        }
    }
    eprintln!("mutated data files: {n} cases × 2, {ok} loaded, {refused} refused");
}
