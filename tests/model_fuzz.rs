//! Untrusted model files: what grit hands to llama.cpp's loader must not abort the process.
//! A bounded, deterministic mutation fuzz of a tiny model's header (metadata, tokenizer,
//! tensor infos) through `infer::Model::load` (`grit generate`, `chat`, `eval`, `serve`), and
//! the regressions it found.

mod common;

use std::path::Path;

/// Header bytes of the GGUF at `path` (everything before the tensor data).
fn header_len(path: &Path) -> usize {
    grit::gguf::GgufFile::open(path).unwrap().data_offset() as usize
}

/// A mutant of the tiny model loads or fails with an error; a panic fails this test and an
/// abort inside llama.cpp kills it.
#[test]
fn mutated_models_load_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::tiny_model(dir.path());
    let seed = std::fs::read(&good).unwrap();
    let header = header_len(&good);
    let mut rng = grit::data::SplitMix64::new(0x6d6f_6465);
    let n: usize =
        std::env::var("GRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let path = dir.path().join("mutant.gguf");
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..n {
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(header as u64) as usize;
            if rng.below(2) == 0 {
                b[at] ^= 1 << rng.below(8);
            } else {
                let v: u32 = [0, 1, 0xffff_ffff, 63, 64, 1 << 20][rng.below(6) as usize];
                let at = at.min(header - 4) & !3;
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        std::fs::write(&path, &b).unwrap();
        match grit::infer::Model::load(&path, &grit::infer::LoadOptions::cpu()) {
            Ok(_) => loaded += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "case {case}");
                refused += 1;
            }
        }
    }
    eprintln!("mutated models: {n} cases, {loaded} loaded, {refused} refused");
}

/// Found by the fuzz: a tokenizer with a token listed twice made llama.cpp abort
/// (`GGML_ASSERT(id_to_token.size() == token_to_id.size())`); grit refuses it first.
#[test]
fn a_token_listed_twice_is_refused_not_aborted_on() {
    let dir = tempfile::tempdir().unwrap();
    let good = common::tiny_model(dir.path());
    let mut b = std::fs::read(&good).unwrap();
    // The one-character token "b" (u64 length 1, then the byte) becomes a second "a".
    let key = b"tokenizer.ggml.tokens";
    let from = b.windows(key.len()).position(|w| w == key).unwrap();
    let mut pat = 1u64.to_le_bytes().to_vec();
    pat.push(b'b');
    let at = from
        + b[from..].windows(pat.len()).position(|w| w == pat.as_slice()).expect("a token \"b\"");
    b[at + 8] = b'a';
    let bad = dir.path().join("dup.gguf");
    std::fs::write(&bad, &b).unwrap();
    let err = match grit::infer::Model::load(&bad, &grit::infer::LoadOptions::cpu()) {
        Ok(_) => panic!("a model with a duplicate token loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("appears twice") && err.contains("dup.gguf"), "{err}");
    // The command line says the same in one line.
    let o =
        common::grit().args(["generate", "--prompt", "x", "--model"]).arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("appears twice"));
}
