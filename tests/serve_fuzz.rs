//! Untrusted request bodies: a bounded, deterministic mutation fuzz of the OpenAI endpoints'
//! JSON bodies against a running `grit serve`. Every answer must be a well-formed response —
//! a success, or an error in OpenAI's shape with a 4xx/5xx status the API documents — and the
//! server must still be alive at the end.

mod serve_util;

mod common;

use grit::data::SplitMix64;
use grit::model::Target;
use serde_json::{json, Value};
use serve_util::{http, write_adapter, Server};

/// Valid requests to start from: (path, body).
fn seeds() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "Once upon", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 3}),
        ),
        (
            "/v1/completions",
            json!({"model": "a1", "prompt": [1, 2, 3], "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 3, "top_k": 5}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "adapters": [{"name": "a1", "scale": 0.5}]}),
        ),
        ("/v1/embeddings", json!({"input": ["hello", "world"], "encoding_format": "base64"})),
        ("/v1/embeddings", json!({"input": [[1, 2, 3]], "model": "a1"})),
        ("/v1/adapters", json!({"name": "x1", "path": "a1.gguf"})),
    ]
}

/// A random JSON value of a type the API does not expect (or does).
fn wild(rng: &mut SplitMix64) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => json!(-1),
        2 => json!(1e308),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!("x".repeat(rng.below(5000) as usize)),
        6 => json!([]),
        7 => json!({}),
        8 => json!([[[[[[1]]]]]]),
        9 => json!(true),
        10 => json!(0.0),
        _ => json!("\u{0}\u{fffd}☃"),
    }
}

fn mutate(v: &mut Value, rng: &mut SplitMix64) {
    common::mutate_json(
        v,
        rng,
        &[
            "model",
            "max_tokens",
            "n",
            "logprobs",
            "tools",
            "adapters",
            "input",
            "messages",
            "stream",
            "dimensions",
        ],
        &wild,
    );
}

#[test]
fn mutated_request_bodies_get_well_formed_answers() {
    let dir = tempfile::tempdir().unwrap();
    write_adapter(&dir.path().join("a1.gguf"), 4, &[Target::AttnQ], 1);
    let a1 = format!("a1={}", dir.path().join("a1.gguf").display());
    let adir = dir.path().to_str().unwrap();
    let s = Server::start(&[
        "--adapter",
        &a1,
        "--adapter-dir",
        adir,
        "--ctx",
        "256",
        "--timeout",
        "3",
        "--parallel",
        "2",
    ]);
    let mut rng = SplitMix64::new(0x6874_7470);
    let n: usize =
        std::env::var("GRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(250);
    let seeds = seeds();
    let mut by_status = std::collections::BTreeMap::new();
    for case in 0..n {
        let (path, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
        let mut body = seed.clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut body, &mut rng);
        }
        let mut text = body.to_string();
        // Some cases are broken at the byte level: truncated, or a byte flipped.
        match rng.below(8) {
            0 => {
                let cut = rng.below(text.len() as u64 + 1) as usize;
                text = String::from_utf8_lossy(&text.as_bytes()[..cut]).into_owned();
            }
            1 if !text.is_empty() => {
                let mut b = text.into_bytes();
                let i = rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << rng.below(7);
                text = String::from_utf8_lossy(&b).into_owned();
            }
            _ => {}
        }
        let r = http(&s.addr, "POST", path, Some(&text), &[]);
        *by_status.entry(r.status).or_insert(0) += 1;
        assert!(
            [200, 201, 400, 404, 409, 413, 504].contains(&r.status),
            "case {case} {path} {text}: {} {}",
            r.status,
            r.body
        );
        let sse = r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        if !sse {
            let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| {
                panic!("case {case} {path} {text}: not JSON ({e}): {}", r.body)
            });
            if r.status >= 400 {
                assert!(
                    v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "case {case}: {}",
                    r.body
                );
                assert!(v["error"]["type"].is_string(), "case {case}: {}", r.body);
            }
        }
        if *path == "/v1/adapters" && r.status == 201 {
            // Keep the adapter count bounded: unload what a mutant loaded.
            let name = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["name"].as_str().map(str::to_string))
                .unwrap_or_default();
            http(&s.addr, "DELETE", &format!("/v1/adapters/{name}"), None, &[]);
        }
    }
    eprintln!("mutated request bodies: {n} cases, answers by status {by_status:?}");
    assert_eq!(http(&s.addr, "GET", "/health", None, &[]).status, 200);
    let r = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": "Hi", "max_tokens": 2}).to_string()),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
}
