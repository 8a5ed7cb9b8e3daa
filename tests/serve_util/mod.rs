//! Helpers for the `grit serve` tests: start the real binary on a loopback port, plain HTTP/1.1
//! over a TcpStream, random adapters for the default model.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use grit::ggml::Backend;
use grit::gguf::GgufFile;
use grit::model::{LoraConfig, LoraSet, Target, Weights};
use serde_json::Value;

pub fn model() -> PathBuf {
    grit::fetch::ensure_default_model().expect("default model")
}

/// Writes a random LoRA adapter for the default model (small values: it changes greedy text).
pub fn write_adapter(path: &Path, rank: usize, targets: &[Target], seed: u64) {
    let backend = Backend::cpu(1).unwrap();
    let weights = Weights::load(&GgufFile::open(model()).unwrap(), &backend).unwrap();
    let cfg = LoraConfig {
        targets: targets.to_vec(),
        rank,
        alpha: 2.0 * rank as f32,
        ..LoraConfig::default()
    };
    let lora = LoraSet::new(&weights, &cfg, &backend).unwrap();
    lora.randomize(seed, 0.04, 0.04).unwrap();
    grit::adapter::Adapter::from_lora_set(&lora, weights.hparams.arch.name(), Default::default())
        .unwrap()
        .write_gguf(path, grit::adapter::AdapterDtype::F32)
        .unwrap();
}

/// A running `grit serve`; SIGTERM + wait on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_grit"));
        cmd.arg("serve").arg("--port").arg("0").args(["--threads", "1"]).args(args);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start grit serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[server] {line}");
                if let Some(i) = line.find(" on http://") {
                    let rest = &line[i + " on http://".len()..];
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    if let Some(t) = tx.take() {
                        let _ = t.send(addr);
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("grit serve did not start: {:?}", log.lock().unwrap());
            }
        };
        Server { child, addr, log }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        http(&self.addr, method, path, body.map(|b| b.to_string()).as_deref(), &[])
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.req("POST", path, Some(body))
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("grit serve did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
    /// An OpenAI error body: (type, param, message).
    pub fn error(&self) -> (String, Option<String>, String) {
        let v = self.json();
        let e = &v["error"];
        assert!(e.is_object(), "not an OpenAI error body: {}", self.body);
        (
            e["type"].as_str().unwrap().to_string(),
            e["param"].as_str().map(str::to_string),
            e["message"].as_str().unwrap().to_string(),
        )
    }
}

/// One HTTP/1.1 request (Connection: close); the body is de-chunked.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = body.unwrap_or("");
    // Host and Content-Type default to the address and JSON unless `headers` gives them.
    let given = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !given("host") {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        if !given("content-type") {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let n =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        out
    } else {
        rest.to_vec()
    };
    Resp { status, headers, body: String::from_utf8_lossy(&body).to_string() }
}

/// `grit generate` (greedy) for the same prompt/adapter: the reference text.
pub fn grit_generate(prompt: &str, n: usize, adapter: Option<&Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_grit"));
    cmd.args([
        "generate",
        "--json",
        "--threads",
        "1",
        "--ctx",
        "512",
        "-n",
        &n.to_string(),
        "--prompt",
        prompt,
    ]);
    if let Some(a) = adapter {
        cmd.arg("--adapter").arg(a);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "grit generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}
