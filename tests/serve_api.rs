//! `grit serve` over plain HTTP: the real binary on a loopback port, the default model, random
//! adapters. Chat, completion, streaming, adapters by name, stacking, hot load/unload, every
//! error status, greedy equality with `grit generate`, logs, metrics, embeddings.

mod serve_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use grit::model::Target;
use serde_json::{json, Value};
use serve_util::*;

const PROMPT: &str = "Once upon a time";

fn completion_text(s: &Server, body: Value) -> String {
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().unwrap().to_string()
}

fn greedy(model: &str, n: usize) -> Value {
    json!({"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0})
}

#[test]
fn generation_adapters_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let adir = dir.path().join("adapters");
    std::fs::create_dir(&adir).unwrap();
    let a1 = adir.join("a1.gguf");
    let a2 = adir.join("a2.gguf");
    write_adapter(&a1, 4, &[Target::AttnQ, Target::AttnV], 1);
    write_adapter(&a2, 8, &[Target::AttnK, Target::AttnV, Target::FfnDown], 3);
    std::fs::write(adir.join("garbage.gguf"), b"GGUF but not really").unwrap();
    std::fs::write(dir.path().join("outside.gguf"), std::fs::read(&a2).unwrap()).unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.gguf"), adir.join("link.gguf")).unwrap();

    let s = Server::start(&[
        "--adapter",
        &format!("a1={}", a1.display()),
        "--adapter-dir",
        adir.to_str().unwrap(),
        "--ctx",
        "512",
        "--parallel",
        "4",
        "--body-limit",
        "65536",
        "--model-name",
        "smol",
    ]);
    let n = 16;

    // Health and models: base + a1 with its parent.
    assert_eq!(s.get("/health").json()["status"], "ok");
    let models = s.get("/v1/models").json();
    let ids: Vec<&str> =
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smol", "a1"]);
    assert_eq!(models["data"][1]["parent"], "smol");
    assert_eq!(s.get("/v1/models/a1").json()["parent"], "smol");

    // Greedy equality with `grit generate`, without and with an adapter; the adapter matters.
    let base_ref = grit_generate(PROMPT, n, None);
    let a1_ref = grit_generate(PROMPT, n, Some(&a1));
    let a2_ref = grit_generate(PROMPT, n, Some(&a2));
    assert_ne!(base_ref, a1_ref, "the test adapter must change the greedy text");
    assert_ne!(base_ref, a2_ref, "the test adapter must change the greedy text");
    let base = completion_text(&s, greedy("smol", n));
    assert_eq!(base, base_ref, "server greedy text differs from grit generate");
    assert_eq!(completion_text(&s, greedy("base", n)), base_ref, "alias \"base\"");
    let r = s.post("/v1/completions", &greedy("a1", n));
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], a1_ref.as_str(), "adapter by model name");
    assert_eq!(v["model"], "a1");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let pt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), pt + n as u64);

    // Explicit adapter list: a1 at scale 1 is the same as model=a1; scale 0 is the base.
    let t = completion_text(
        &s,
        json!({"model": "smol", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "adapters": [{"name": "a1", "scale": 1.0}]}),
    );
    assert_eq!(t, a1_ref);
    let t = completion_text(
        &s,
        json!({"model": "base", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "adapters": [{"name": "a1", "scale": 0.0}]}),
    );
    assert_eq!(t, base_ref);

    // Streaming: the deltas add up to the non-streamed text; chunks end with [DONE].
    let r = s.post("/v1/completions", &json!({"model": "a1", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "stream": true}));
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut finish = Value::Null;
    for f in &frames[..frames.len() - 1] {
        let v: Value = serde_json::from_str(f).unwrap();
        assert_eq!(v["object"], "text_completion");
        text.push_str(v["choices"][0]["text"].as_str().unwrap());
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(text, a1_ref);
    assert_eq!(finish, "length");

    // Chat, non-streaming and streaming with usage; the same text both ways.
    let chat = json!({"model": "a1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], "max_tokens": 16, "temperature": 0});
    let r = s.post("/v1/chat/completions", &chat);
    let v = r.json();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let chat_text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!chat_text.is_empty());
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    sc["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", &sc);
    let frames = r.sse();
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> =
        frames[..frames.len() - 1].iter().map(|f| serde_json::from_str(f).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, chat_text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], v["usage"]["completion_tokens"]);
    // The same chat through the model's template in `grit generate` (the prompt the server builds).
    let m = grit::infer::Model::load_vocab_only(&model()).unwrap();
    let rendered = m
        .apply_chat(&[
            ("system".into(), "Be brief.".into()),
            ("user".into(), "Name a colour.".into()),
        ])
        .unwrap();
    let reference = grit_generate(&rendered, 16, Some(&a1));
    assert!(reference.starts_with(&chat_text), "chat {chat_text:?} vs grit generate {reference:?}");

    // Stop strings end the text before the stop string.
    let full = completion_text(&s, greedy("smol", n));
    let cut = full.char_indices().nth(10).map(|(i, _)| i).unwrap();
    let stop = full[cut..cut + 3.min(full.len() - cut)].to_string();
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0, "stop": [stop.clone()]}),
    );
    let v = r.json();
    let t = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(t, &full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Seeded sampling is reproducible.
    let samp = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7});
    assert_eq!(completion_text(&s, samp.clone()), completion_text(&s, samp));

    // Hot load: a2 from the adapter folder, then used by name, listed, stacked, unloaded.
    let r = s.post("/v1/adapters", &json!({"name": "a2", "path": "a2.gguf"}));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["parent"], "smol");
    let ids: Vec<String> = s.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["smol", "a1", "a2"]);
    assert_eq!(completion_text(&s, greedy("a2", n)), a2_ref);
    // Stacking: a1 + 2·a2 differs from each alone (at scale 1 a2 barely moves a1's greedy
    // text: the two random adapters' 16 tokens then agree); a1 + a2 at scale 0 is a1.
    let stacked = completion_text(
        &s,
        json!({"model": "a1", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "adapters": [{"name": "a2", "scale": 2.0}]}),
    );
    assert_ne!(stacked, a1_ref);
    assert_ne!(stacked, a2_ref);
    let same = completion_text(
        &s,
        json!({"prompt": PROMPT, "max_tokens": n, "temperature": 0, "adapters": [{"name": "a2", "scale": 2.0}, {"name": "a1", "scale": 1.0}]}),
    );
    assert_eq!(same, stacked, "stacking does not depend on the order of the list");
    let t = completion_text(
        &s,
        json!({"model": "a1", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "adapters": [{"name": "a2", "scale": 0.0}]}),
    );
    assert_eq!(t, a1_ref);
    // Name taken → 409; unload → 200, then 404 for the name as a model and as an adapter.
    let r = s.post("/v1/adapters", &json!({"name": "a2", "path": "a2.gguf"}));
    assert_eq!(r.status, 409, "{}", r.body);
    let r = s.req("DELETE", "/v1/adapters/a2", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(s.post("/v1/completions", &greedy("a2", 4)).status, 404);
    assert_eq!(s.req("DELETE", "/v1/adapters/a2", None).status, 404);
    // Load errors: traversal, symlink out of the folder, not a GGUF adapter, missing fields.
    for (body, what) in [
        (json!({"name": "x", "path": "../outside.gguf"}), ".."),
        (
            json!({"name": "x", "path": dir.path().join("outside.gguf").to_str().unwrap()}),
            "outside",
        ),
        (json!({"name": "x", "path": "link.gguf"}), "outside"),
        (json!({"name": "x", "path": "garbage.gguf"}), "cannot load adapter"),
        (json!({"name": "x", "path": "missing.gguf"}), "missing.gguf"),
        (json!({"name": "bad/name", "path": "a2.gguf"}), "may contain only"),
        (json!({"path": "a2.gguf"}), "`name` is required"),
    ] {
        let r = s.post("/v1/adapters", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let (_, _, msg) = r.error();
        assert!(msg.contains(what), "{body}: {msg}");
    }
    // A valid GGUF that is a model, not an adapter: refused before llama.cpp sees it, the server keeps serving.
    let spec = grit::model::TinySpec {
        n_embd: 64,
        n_layer: 1,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 128,
        weight_type: grit::ggml::Type::F32,
        seed: 1,
        ..Default::default()
    };
    grit::model::write_tiny_model(&adir.join("tiny.gguf"), &spec, &model()).unwrap();
    let r = s.post("/v1/adapters", &json!({"name": "m", "path": "tiny.gguf"}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.error().2.contains("not a LoRA adapter"), "{}", r.body);
    assert_eq!(completion_text(&s, greedy("a1", n)), a1_ref, "still serving after failed loads");
    // Re-load a2 under a new name after the unload.
    let r = s.post(
        "/v1/adapters",
        &json!({"name": "a2b", "path": adir.join("a2.gguf").to_str().unwrap()}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(completion_text(&s, greedy("a2b", n)), a2_ref);

    // Errors in OpenAI's format with the right status.
    let bad = |body: &str, status: u16, param: Option<&str>, what: &str| {
        let r = http(&s.addr, "POST", "/v1/completions", Some(body), &[]);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let (_, p, msg) = r.error();
        assert_eq!(p.as_deref(), param, "{body}: {msg}");
        assert!(msg.contains(what), "{body}: {msg}");
    };
    bad("{\"prompt\": ", 400, None, "malformed JSON");
    bad("[1, 2]", 400, None, "JSON object");
    bad(r#"{"prompt": "x", "temperature": 5}"#, 400, Some("temperature"), "between 0 and 2");
    bad(r#"{"prompt": "x", "temperature": "hot"}"#, 400, Some("temperature"), "number");
    bad(r#"{"prompt": "x", "top_p": 0}"#, 400, Some("top_p"), "(0, 1]");
    bad(r#"{"prompt": "x", "n": 2}"#, 400, Some("n"), "n = 1");
    bad(r#"{"prompt": "x", "max_tokens": 0}"#, 400, Some("max_tokens"), "at least 1");
    bad(r#"{"prompt": "x", "stop": 3}"#, 400, Some("stop"), "string");
    bad(r#"{"prompt": "x", "seed": -1}"#, 400, Some("seed"), "between");
    bad(r#"{"temperature": 0}"#, 400, Some("prompt"), "required");
    bad(r#"{"prompt": "x", "model": "nope"}"#, 404, Some("model"), "nope");
    bad(r#"{"prompt": "x", "adapters": [{"name": "nope"}]}"#, 404, Some("adapters[0]"), "nope");
    bad(
        r#"{"prompt": "x", "adapters": [{"name": "a1", "scale": "big"}]}"#,
        400,
        Some("adapters[0]"),
        "scale",
    );
    bad(r#"{"prompt": "x", "model": "a1", "adapters": ["a1"]}"#, 400, Some("adapters[0]"), "twice");
    // Local-server guard (no API key): DNS rebinding and cross-site requests are refused in
    // OpenAI's error shape, and so is a path segment that is not UTF-8.
    let body = json!({"prompt": PROMPT, "max_tokens": 1}).to_string();
    for (method, path, headers, status, code) in [
        ("GET", "/v1/models", vec![("Host", "rebind.evil.example")], 403, "host_not_allowed"),
        (
            "POST",
            "/v1/completions",
            vec![("Content-Type", "text/plain"), ("Origin", "http://evil.example")],
            403,
            "origin_not_allowed",
        ),
        (
            "POST",
            "/v1/completions",
            vec![("Content-Type", "text/plain")],
            415,
            "unsupported_content_type",
        ),
        ("GET", "/v1/models/%FF", vec![], 400, "invalid_path"),
    ] {
        let r = http(&s.addr, method, path, (method == "POST").then_some(body.as_str()), &headers);
        assert_eq!(r.status, status, "{method} {path} {headers:?}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], code, "{}", r.body);
    }
    assert_eq!(http(&s.addr, "GET", "/v1/models", None, &[("Host", "localhost")]).status, 200);
    // Context overflow: a prompt longer than the context, or prompt + max_tokens beyond it.
    let long = "word ".repeat(700);
    let r = s.post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let r = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": long}], "max_tokens": 4}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let r = s.post("/v1/completions", &json!({"prompt": PROMPT, "max_tokens": 600}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    // Chat errors.
    for (body, param) in [
        (json!({"messages": []}), "messages"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0]"),
        (json!({"messages": "hi"}), "messages"),
    ] {
        let r = s.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error().1.as_deref(), Some(param), "{body}");
    }
    // 413: a body over --body-limit.
    let big = json!({"prompt": "x".repeat(70_000)});
    let r = s.post("/v1/completions", &big);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // 404 for an unknown route, 405 for a wrong method, both as JSON.
    let r = s.get("/v1/nothing");
    assert_eq!(r.status, 404);
    r.error();
    let r = s.get("/v1/completions");
    assert_eq!(r.status, 405);
    r.error();

    // Embeddings, float and base64 (the openai client's default), unit length.
    let r = s.post("/v1/embeddings", &json!({"input": ["hello", "goodbye"], "model": "smol"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let e0: Vec<f64> =
        v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(e0.len(), 576);
    assert!((e0.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-3);
    let r = s.post("/v1/embeddings", &json!({"input": "hello", "encoding_format": "base64"}));
    let b64 = r.json()["data"][0]["embedding"].as_str().unwrap().to_string();
    // 576 floats = 2304 bytes = 3072 base64 characters.
    assert_eq!(b64.len(), 3072);
    assert!(b64.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/'));
    assert_eq!(s.post("/v1/embeddings", &json!({"input": ""})).status, 400);

    // Metrics: Prometheus text with per-model counters.
    let m = s.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for needle in [
        "grit_completion_tokens_total{model=\"a1\"}",
        "grit_request_duration_seconds_bucket{model=\"smol\",le=\"+Inf\"}",
        "grit_queue_depth",
        "grit_http_requests_total{endpoint=\"/v1/completions\",status=\"400\"}",
        "grit_adapters_loaded 2",
    ] {
        assert!(m.body.contains(needle), "metrics lack {needle}:\n{}", m.body);
    }

    // One log line per request: count requests made vs. lines logged.
    let lines = s.log_lines();
    let logged =
        lines.iter().filter(|l| l.starts_with("grit serve: POST /v1/completions ")).count();
    assert!(logged >= 30, "only {logged} completion log lines");
    assert!(lines.iter().any(|l| l.contains("POST /v1/completions 404")));
    assert!(lines.iter().any(|l| l.contains("POST /v1/completions 200 model=a1 stream=true")));
}

/// Auth, CORS, the bounded queue (429 + Retry-After), disconnect cancels, graceful shutdown.
#[test]
fn auth_cors_queue_cancel_shutdown() {
    let mut s = Server::start(&[
        "--api-key",
        "sekret",
        "--cors-origin",
        "http://app.example",
        "--parallel",
        "1",
        "--queue",
        "1",
        "--ctx",
        "512",
        "--shutdown-grace",
        "20",
    ]);
    let auth = [("Authorization", "Bearer sekret")];
    // 401 without or with a wrong key; /health is open.
    let r = http(&s.addr, "GET", "/v1/models", None, &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        http(&s.addr, "GET", "/v1/models", None, &[("Authorization", "Bearer nope")]).status,
        401
    );
    assert_eq!(http(&s.addr, "GET", "/v1/models", None, &auth).status, 200);
    assert_eq!(http(&s.addr, "GET", "/health", None, &[]).status, 200);
    // CORS preflight and simple requests from the allowed origin.
    let r = http(
        &s.addr,
        "OPTIONS",
        "/v1/chat/completions",
        None,
        &[
            ("Origin", "http://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization,content-type"),
        ],
    );
    assert!(r.status == 200 || r.status == 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some("http://app.example"));
    let r = http(
        &s.addr,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", "Bearer sekret"), ("Origin", "http://app.example")],
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("http://app.example"));
    let r = http(
        &s.addr,
        "GET",
        "/v1/models",
        None,
        &[("Authorization", "Bearer sekret"), ("Origin", "http://evil.example")],
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    // With a key, the local-server guard steps aside: any Host, Origin and body type.
    let body = json!({"prompt": PROMPT, "max_tokens": 1}).to_string();
    let r = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(&body),
        &[
            ("Authorization", "Bearer sekret"),
            ("Host", "rebind.evil.example"),
            ("Content-Type", "text/plain"),
            ("Origin", "http://evil.example"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Queue: A streams (the one slot), B waits (the one queue place), C gets 429.
    let long = json!({"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut a = TcpStream::connect(&s.addr).unwrap();
    write!(
        a,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
        long.len()
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"text\"") {
        let n = a.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let addr = s.addr.clone();
    let b = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = http(
            &addr,
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).to_string()),
            &[("Authorization", "Bearer sekret")],
        );
        (r, t0.elapsed())
    });
    // Wait until B is queued.
    let t0 = Instant::now();
    loop {
        let m = http(&s.addr, "GET", "/metrics", None, &auth).body;
        if m.contains("grit_queue_depth 1") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "B never queued:\n{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"prompt": "Hi", "max_tokens": 2}"#),
        &auth,
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    // Disconnect A: its generation stops, so B runs and finishes long before A's 400 tokens.
    drop(a);
    let (rb, _) = b.join().unwrap();
    assert_eq!(rb.status, 200, "{}", rb.body);
    let lines = s.log_lines();
    let a_line = lines.iter().find(|l| l.contains("stream=true")).expect("A's log line");
    assert!(a_line.contains("finish=cancelled") && a_line.contains(" 499 "), "{a_line}");
    // A asked for 400 tokens; everything decoded so far (A's part, B's 4, prompts) is far less.
    let m = http(&s.addr, "GET", "/metrics", None, &auth).body;
    let decoded: f64 = m
        .lines()
        .find(|l| l.starts_with("grit_decode_tokens_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(decoded < 300.0, "A was not cancelled: {decoded} tokens decoded");

    // Graceful shutdown: a streaming request in flight finishes, then the process exits 0.
    let body = json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\"text\"") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let status = s.terminate();
    c.read_to_end(&mut got).unwrap();
    let r = parse_response(&got);
    let frames = r.sse();
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let finish =
        frames.iter().rev().nth(1).map(|f| serde_json::from_str::<Value>(f).unwrap()).unwrap();
    assert_eq!(
        finish["choices"][0]["finish_reason"], "length",
        "the in-flight request finished normally"
    );
    assert!(status.success(), "exit status {status}");
    assert!(s.log_lines().iter().any(|l| l.contains("shutting down")));
}

/// Several requests decode in one batch; different adapter sets run side by side.
#[test]
fn concurrent_requests_batch_and_adapter_sets_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let a1 = dir.path().join("a1.gguf");
    write_adapter(&a1, 4, &[Target::AttnQ, Target::AttnV], 1);
    let s = Server::start(&[
        "--adapter",
        &format!("a1={}", a1.display()),
        "--parallel",
        "4",
        "--ctx",
        "512",
        "--max-contexts",
        "2",
        "--cors-origin",
        "http://app.example",
        "--allowed-host",
        "my-box.lan",
        "--max-adapters",
        "1",
    ]);
    // No key: the configured origin may post any body type, the allowed host name is answered.
    let body = json!({"prompt": "Hi", "max_tokens": 1}).to_string();
    let r = http(
        &s.addr,
        "POST",
        "/v1/completions",
        Some(&body),
        &[("Origin", "http://app.example"), ("Content-Type", "text/plain")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        http(&s.addr, "GET", "/v1/models", None, &[("Host", "my-box.lan:8080")]).status,
        200
    );
    let n = 32;
    let mut handles = Vec::new();
    for i in 0..6 {
        let addr = s.addr.clone();
        let model = if i % 2 == 0 { "base" } else { "a1" };
        handles.push(std::thread::spawn(move || {
            let body =
                json!({"model": model, "prompt": format!("Story {i}: once upon a time"), "max_tokens": n, "temperature": 0, "ignore_eos": true}).to_string();
            let t0 = Instant::now();
            let r = http(&addr, "POST", "/v1/completions", Some(&body), &[]);
            (r, t0.elapsed())
        }));
    }
    for h in handles {
        let (r, _) = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["usage"]["completion_tokens"], n);
    }
    let m = s.get("/metrics").body;
    let get = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let steps = get("grit_decode_steps_total");
    let tokens = get("grit_decode_tokens_total");
    // 6 requests × 32 tokens one at a time would be ≥ 6·31 steps; batching needs far fewer.
    assert!(steps < 6.0 * 31.0 * 0.7, "no batching: {steps} decode steps for {tokens} tokens");
    assert!(m.contains("grit_contexts 2"), "two adapter sets, two contexts:\n{m}");
}

#[test]
fn merged_adapters_are_models_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let a1 = dir.path().join("a1.gguf");
    // Rank 16 on four maps: the merge requantizes to Q4_1, whose steps swallow most of a
    // smaller random adapter (rank 4 on three maps left the 16-token greedy text unchanged on
    // an Intel Xeon with AMX, whose llama.cpp runs other Q4_1 kernels than elsewhere).
    write_adapter(&a1, 16, &[Target::AttnQ, Target::AttnV, Target::FfnUp, Target::FfnDown], 1);
    // Reference: the same merge written by `grit merge`, generated from with `grit generate`.
    let merged = dir.path().join("merged.gguf");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_grit"))
        .args([
            "merge",
            "--type",
            "same",
            "--adapter",
            a1.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "grit merge: {}", String::from_utf8_lossy(&o.stderr));
    let n = 16;
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_grit"))
        .args([
            "generate",
            "--json",
            "--threads",
            "1",
            "--ctx",
            "512",
            "-n",
            &n.to_string(),
            "--prompt",
            PROMPT,
            "--model",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "grit generate: {}", String::from_utf8_lossy(&o.stderr));
    let merged_ref =
        serde_json::from_slice::<Value>(&o.stdout).unwrap()["text"].as_str().unwrap().to_string();
    let base_ref = grit_generate(PROMPT, n, None);
    assert_ne!(merged_ref, base_ref, "the test adapter must change the greedy text");

    let s = Server::start(&[
        "--adapter",
        &format!("a1={}", a1.display()),
        "--merge-adapters",
        "--ctx",
        "512",
        "--parallel",
        "2",
    ]);
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][1]["id"], "a1");
    assert_eq!(models["data"][1]["merged"], true);
    let prefix = format!("grit-serve-{}-", s.child.id());
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "merged copies should be gone once loaded: {left:?}");
    assert_eq!(
        completion_text(&s, greedy("a1", n)),
        merged_ref,
        "merged adapter through the server vs grit generate on the merged model"
    );
    assert_eq!(
        completion_text(&s, greedy("base", n)),
        base_ref,
        "the base model is still served unchanged"
    );

    // Merged adapters are not stackable and not unloadable; both say why.
    let r = s.post(
        "/v1/completions",
        &json!({"model": "base", "prompt": PROMPT, "max_tokens": 2, "adapters": [{"name": "a1"}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("adapter_merged"), "{}", r.body);
    let r = s.req("DELETE", "/v1/adapters/a1", None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("--merge-adapters"), "{}", r.body);

    // Embeddings follow the merged model too.
    let e = |model: &str| {
        s.post("/v1/embeddings", &json!({"model": model, "input": PROMPT})).json()["data"][0]
            ["embedding"]
            .clone()
    };
    assert_ne!(e("a1"), e("base"));
}

#[test]
fn a_request_past_the_timeout_gets_504_and_the_server_goes_on() {
    let mut s = Server::start(&["--ctx", "2048", "--parallel", "1", "--timeout", "0.5"]);
    // 2000 tokens cannot be decoded in half a second on any machine this runs on.
    let body = json!({"model": "base", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": true, "temperature": 0});
    let t0 = Instant::now();
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 504, "{}", r.body);
    let (kind, _, msg) = r.error();
    assert_eq!(kind, "timeout");
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert!(msg.contains("--timeout"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(30), "the timeout took {:?}", t0.elapsed());
    // Streaming: the error arrives as an event before [DONE].
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let r = s.post("/v1/completions", &sb);
    assert_eq!(r.status, 200);
    let ev = r.sse();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{ev:?}");
    assert!(ev[ev.len() - 2].contains("\"timeout\""), "{ev:?}");
    // Embeddings keep the same deadline: 64 inputs of ~600 tokens stop with 504 at an input
    // boundary, not after all of them.
    let t0 = Instant::now();
    let inputs: Vec<String> = (0..64).map(|i| format!("{i} {}", "word ".repeat(600))).collect();
    let r = s.post("/v1/embeddings", &json!({"input": inputs}));
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the embeddings timeout took {:?}",
        t0.elapsed()
    );
    // A short request still succeeds afterwards.
    let r = s.post("/v1/completions", &greedy("base", 2));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s.log_lines().iter().any(|l| l.contains(" 504 ")), "{:?}", s.log_lines());
    s.terminate();
}
