//! Requests to `grit serve`, in process: the fuzzer picks the endpoint, the headers and the
//! body bytes. Every answer must be a success or an error in OpenAI's shape with a status the
//! API documents, and the server must go on answering. A panic or an abort is a finding.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request};
use grit::serve::{ServeConfig, Server};
use tower::ServiceExt;

struct Live {
    server: Server,
    rt: tokio::runtime::Runtime,
}

fn live() -> &'static Live {
    static L: OnceLock<Live> = OnceLock::new();
    L.get_or_init(|| {
        let e = common::env();
        let cfg = ServeConfig {
            model: e.model.clone(),
            model_name: Some("base".into()),
            gpu_layers: 0,
            device: grit::ggml::Device::Cpu,
            host: "127.0.0.1".into(),
            port: 0,
            api_key: None,
            cors_origins: vec!["http://ok.example".into()],
            allowed_hosts: vec![],
            max_adapters: 4,
            base_mismatch: grit::adapter::BaseMismatch::Warn,
            body_limit: 1 << 20,
            timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(1),
            adapters: vec![("a1".into(), e.adapter.clone())],
            merge: None,
            adapter_dir: Some(e.dir.path().to_path_buf()),
            n_ctx: 256,
            parallel: 2,
            max_contexts: 2,
            queue: 8,
            threads: 1,
            n_batch: 256,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Live { server: Server::start(cfg).expect("the server starts"), rt }
    })
}

const ENDPOINTS: [(&str, &str); 9] = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/adapters"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/a1"),
    ("DELETE", "/v1/adapters/"),
    ("GET", "/metrics"),
    ("PUT", "/v1/completions"),
];

async fn send(
    app: axum::Router,
    method: &str,
    path: &str,
    headers: u8,
    body: Vec<u8>,
) -> (u16, bool, Vec<u8>) {
    let mut req =
        Request::builder().method(Method::from_bytes(method.as_bytes()).unwrap()).uri(path);
    // Bits of `headers`: JSON content type, an Origin (allowed or not), a foreign Host.
    req = req.header(
        header::HOST,
        if headers & 8 != 0 { "rebind.evil.example" } else { "127.0.0.1:8080" },
    );
    if headers & 1 == 0 {
        req = req.header(header::CONTENT_TYPE, "application/json");
    } else if headers & 2 != 0 {
        req = req.header(header::CONTENT_TYPE, "text/plain");
    }
    if headers & 4 != 0 {
        req = req.header(
            header::ORIGIN,
            if headers & 16 != 0 { "http://ok.example" } else { "http://evil.example" },
        );
    }
    let r = app.oneshot(req.body(Body::from(body)).unwrap()).await.expect("the router answers");
    let sse = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    let status = r.status().as_u16();
    let bytes =
        axum::body::to_bytes(r.into_body(), 64 << 20).await.expect("the body reads to the end");
    (status, sse, bytes.to_vec())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&[which, headers], body)) = data.split_first_chunk::<2>() else { return };
    let l = live();
    let (method, path) = ENDPOINTS[which as usize % ENDPOINTS.len()];
    // A name segment from the body's first bytes, percent-encoded as a client sends it.
    let path = if path.ends_with('/') {
        let seg: String = body[..body.len().min(8)]
            .iter()
            .map(|&b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("{path}{seg}")
    } else {
        path.to_string()
    };
    let app = l.server.router().unwrap();
    let (status, sse, bytes) = l.rt.block_on(send(app, method, &path, headers, body.to_vec()));
    assert!(
        [200, 201, 400, 403, 404, 405, 409, 413, 415, 429, 504].contains(&status),
        "{method} {path}: status {status}"
    );
    if !sse {
        let v: serde_json::Value = if path == "/metrics" && status == 200 {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{method} {path}: {status} not JSON ({e})"))
        };
        if status >= 400 {
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{status}: {v}");
            assert!(v["error"]["type"].is_string(), "{status}: {v}");
        }
        if path == "/v1/adapters" && status == 201 {
            // Keep the adapter count bounded: unload what an input loaded.
            if let Some(name) = v["id"].as_str().or(v["name"].as_str()) {
                let app = l.server.router().unwrap();
                l.rt.block_on(send(app, "DELETE", &format!("/v1/adapters/{name}"), 0, vec![]));
            }
        }
    }
});
