//! The HTTP side of `grit serve`: OpenAI-compatible routes, adapter management, errors in
//! OpenAI's JSON format, Bearer auth, the local-server guard (Host and Origin checks without
//! a key, see [`LocalGuard`]), CORS, body limit, one log line per request.

use super::openai::{
    Choice, Completion, Deleted, Delta, Embedding, EmbeddingData, EmbeddingUsage, ErrorBody,
    ErrorDetail, List, Message, ModelCard, Usage,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use super::engine::{Cmd, EmbedJob, Event, Failure, GenJob, Sampling, Shared};
use super::{ServeConfig, ServeError};
use crate::infer::Model;

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct AppState {
    pub model: Arc<Model>,
    pub base_name: String,
    pub created: u64,
    pub registry: RwLock<super::adapters::Registry>,
    pub tx: Mutex<std::sync::mpsc::Sender<Cmd>>,
    pub shared: Arc<Shared>,
    pub n_ctx_seq: u32,
    pub queue_cap: usize,
    pub timeout: Duration,
    pub adapter_dir: Option<PathBuf>,
    pub api_key: Option<String>,
    pub guard: LocalGuard,
    pub max_adapters: usize,
    pub base_mismatch: crate::adapter::BaseMismatch,
    pub next_id: AtomicUsize,
}

type St = Arc<AppState>;

impl AppState {
    fn send(&self, cmd: Cmd) -> Result<(), ApiError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.send(cmd).map_err(|_| ApiError::server("the inference thread has stopped"))
    }
    fn registry(&self) -> std::sync::RwLockReadGuard<'_, super::adapters::Registry> {
        self.registry.read().unwrap_or_else(|p| p.into_inner())
    }
    fn registry_mut(&self) -> std::sync::RwLockWriteGuard<'_, super::adapters::Registry> {
        self.registry.write().unwrap_or_else(|p| p.into_inner())
    }
    fn new_id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", unix_now(), self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error reply in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }
    fn bad(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.to_string());
        e
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn not_found_model(name: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{name}` does not exist (see GET /v1/models)"),
        );
        e.param = Some("model".into());
        e.code("model_not_found")
    }
    fn server(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", msg)
    }
    fn from_failure(f: Failure) -> Self {
        match f {
            Failure::AdapterGone(n) => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("adapter `{n}` was unloaded before the request started"),
            )
            .code("model_not_found"),
            Failure::Timeout => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "the request took longer than the server's --timeout",
            )
            .code("timeout"),
            Failure::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )
            .code("shutting_down"),
            Failure::Internal(m) => Self::server(m),
        }
    }
    fn body(&self) -> Value {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_value(body).expect("an error body serializes")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r.extensions_mut().insert(LogNote(self.message.clone()));
        r
    }
}

/// Text added to the request's log line.
#[derive(Clone)]
struct LogNote(String);

/// The body as JSON, with OpenAI-style errors for an oversized or malformed body.
fn parse_body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "the request body is larger than the server's --body-limit",
            )
            .code("request_too_large")
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("cannot read the request body: {}", rej.body_text()),
            )
        }
    })?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("malformed JSON in the request body: {e}"),
        )
        .code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request body must be a JSON object",
        )),
    }
}

// Typed field access with errors that name the field.
fn opt_f64(m: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| ApiError::bad(k, format!("`{k}` must be a number")))
        }
    }
}
fn opt_i64(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(k, format!("`{k}` must be an integer"))),
    }
}
fn opt_bool(m: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| ApiError::bad(k, format!("`{k}` must be true or false"))),
    }
}
fn opt_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_str().map(Some).ok_or_else(|| ApiError::bad(k, format!("`{k}` must be a string")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// What a generation request asks for, after validation.
struct GenParams {
    model: String,
    /// Engine model index (0 = base; a merged adapter's own copy otherwise).
    model_idx: usize,
    adapters: Vec<(u64, f32)>,
    adapter_names: Vec<String>,
    sampling: Sampling,
    max_tokens_given: bool,
    stream: bool,
    include_usage: bool,
}

/// Resolves `model` and `adapters` into the adapter set: `model` is the base model's name,
/// `"base"`, or an adapter's name (applied at scale 1); `adapters` stacks more, each
/// `{"name": .., "scale": ..}` (scale default 1). A merged adapter (`--merge-adapters`) is a
/// model of its own: it is chosen through `model` and cannot be stacked.
fn resolve_adapters(
    st: &AppState,
    m: &Map<String, Value>,
) -> Result<(String, usize, Vec<(u64, f32)>, Vec<String>), ApiError> {
    let model = opt_str(m, "model")?.unwrap_or("base").to_string();
    let reg = st.registry();
    let mut set: Vec<(u64, f32, String)> = Vec::new();
    let mut model_idx = 0;
    if model != "base" && model != st.base_name {
        match reg.by_name.get(&model) {
            Some(e) => match e.merged {
                Some(idx) => model_idx = idx,
                None => set.push((e.id, 1.0, model.clone())),
            },
            None => return Err(ApiError::not_found_model(&model)),
        }
    }
    match m.get("adapters") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, it) in items.iter().enumerate() {
                let p = format!("adapters[{i}]");
                let (name, scale) = match it {
                    Value::String(s) => (s.as_str(), 1.0),
                    Value::Object(o) => {
                        let name = opt_str(o, "name")
                            .map_err(|_| ApiError::bad(&p, format!("`{p}.name` must be a string")))?
                            .ok_or_else(|| ApiError::bad(&p, format!("`{p}` needs a \"name\"")))?;
                        let scale = opt_f64(o, "scale")
                            .map_err(|_| {
                                ApiError::bad(&p, format!("`{p}.scale` must be a number"))
                            })?
                            .unwrap_or(1.0);
                        (name, scale)
                    }
                    _ => {
                        return Err(ApiError::bad(
                            &p,
                            format!("`{p}` must be {{\"name\": .., \"scale\": ..}} or a name"),
                        ))
                    }
                };
                if !scale.is_finite() || scale.abs() > 100.0 {
                    return Err(ApiError::bad(
                        &p,
                        format!("`{p}.scale` {scale} must be a finite number in [-100, 100]"),
                    ));
                }
                let e = reg.by_name.get(name).ok_or_else(|| {
                    let mut e = ApiError::not_found_model(name);
                    e.message = format!("The adapter `{name}` is not loaded (see GET /v1/models)");
                    e.param = Some(p.clone());
                    e
                })?;
                if e.merged.is_some() || model_idx != 0 {
                    let merged = if e.merged.is_some() { name } else { model.as_str() };
                    return Err(ApiError::bad(
                        &p,
                        format!("adapter `{merged}` is served merged into its own model copy (--merge-adapters) and cannot be stacked with other adapters"),
                    )
                    .code("adapter_merged"));
                }
                if set.iter().any(|(id, _, _)| *id == e.id) {
                    return Err(ApiError::bad(
                        &p,
                        format!("adapter `{name}` is listed twice (the `model` counts)"),
                    ));
                }
                set.push((e.id, scale as f32, name.to_string()));
            }
        }
        Some(_) => {
            return Err(ApiError::bad(
                "adapters",
                "`adapters` must be a list of {\"name\": .., \"scale\": ..}",
            ))
        }
    }
    set.sort_by_key(|(id, _, _)| *id);
    let names = set.iter().map(|(_, _, n)| n.clone()).collect();
    Ok((model, model_idx, set.into_iter().map(|(id, s, _)| (id, s)).collect(), names))
}

/// Refuses the OpenAI options grit serve does not implement (n > 1, logprobs, echo,
/// best_of > 1), naming the field.
fn refuse_unsupported(m: &Map<String, Value>) -> Result<(), ApiError> {
    if let Some(n) = opt_i64(m, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", format!("`n` {n}: only n = 1 is supported")));
        }
    }
    for k in ["logprobs", "echo"] {
        if let Some(v) = m.get(k) {
            if v.as_bool() == Some(true) || v.as_i64().is_some_and(|x| x > 0) {
                return Err(ApiError::bad(k, format!("`{k}` is not supported by grit serve")));
            }
        }
    }
    if let Some(b) = opt_i64(m, "best_of")? {
        if b != 1 {
            return Err(ApiError::bad("best_of", "`best_of` must be 1"));
        }
    }
    Ok(())
}

/// The request's `seed`, or one drawn from the clock and the request counter.
fn request_seed(st: &AppState, m: &Map<String, Value>) -> Result<u32, ApiError> {
    let seed = match opt_i64(m, "seed")? {
        Some(s) if (0..=u32::MAX as i64).contains(&s) => s as u32,
        Some(s) => {
            return Err(ApiError::bad(
                "seed",
                format!("`seed` {s} must be between 0 and {}", u32::MAX),
            ))
        }
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            t ^ (st.next_id.load(Ordering::Relaxed) as u32).wrapping_mul(2654435761)
        }
    };
    Ok(seed)
}

/// `stop`: a string or a list of at most 4 non-empty strings.
fn stop_strings(m: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let v: Option<Vec<String>> = a.iter().map(|x| x.as_str().map(str::to_string)).collect();
            v.ok_or_else(|| ApiError::bad("stop", "`stop` must be a string or a list of strings"))?
        }
        Some(_) => {
            return Err(ApiError::bad("stop", "`stop` must be a string or a list of strings"))
        }
    };
    if stop.len() > 4 {
        return Err(ApiError::bad("stop", "`stop` takes at most 4 strings"));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad("stop", "`stop` strings must not be empty"));
    }
    Ok(stop)
}

fn gen_params(st: &AppState, m: &Map<String, Value>) -> Result<GenParams, ApiError> {
    let (model, model_idx, adapters, adapter_names) = resolve_adapters(st, m)?;
    refuse_unsupported(m)?;
    let temperature = opt_f64(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!("`temperature` {temperature} must be between 0 and 2"),
        ));
    }
    let top_p = opt_f64(m, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", format!("`top_p` {top_p} must be in (0, 1]")));
    }
    let top_k = opt_i64(m, "top_k")?.unwrap_or(0);
    if !(0..=i32::MAX as i64).contains(&top_k) {
        return Err(ApiError::bad("top_k", format!("`top_k` {top_k} must be ≥ 0")));
    }
    let seed = request_seed(st, m)?;
    let stop = stop_strings(m)?;
    let mt = match opt_i64(m, "max_completion_tokens")? {
        Some(v) => Some(("max_completion_tokens", v)),
        None => opt_i64(m, "max_tokens")?.map(|v| ("max_tokens", v)),
    };
    if let Some((k, v)) = mt {
        if v < 1 {
            return Err(ApiError::bad(k, format!("`{k}` {v} must be at least 1")));
        }
    }
    let stream = opt_bool(m, "stream")?.unwrap_or(false);
    let include_usage = match m.get("stream_options") {
        Some(Value::Object(o)) => opt_bool(o, "include_usage")?.unwrap_or(false),
        None | Some(Value::Null) => false,
        Some(_) => {
            return Err(ApiError::bad("stream_options", "`stream_options` must be an object"))
        }
    };
    Ok(GenParams {
        model,
        model_idx,
        adapters,
        adapter_names,
        sampling: Sampling {
            max_tokens: mt.map(|(_, v)| v as usize).unwrap_or(0),
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k as i32,
            seed,
            stop,
            ignore_eos: opt_bool(m, "ignore_eos")?.unwrap_or(false),
        },
        max_tokens_given: mt.is_some(),
        stream,
        include_usage,
    })
}

/// Chat messages → (role, text) pairs; content may be a string or a list of text parts.
fn chat_messages(m: &Map<String, Value>) -> Result<Vec<(String, String)>, ApiError> {
    let msgs = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::bad("messages", "`messages` must not be empty"))
        }
        None => return Err(ApiError::bad("messages", "`messages` is required")),
        Some(_) => {
            return Err(ApiError::bad(
                "messages",
                "`messages` must be a list of {\"role\", \"content\"} objects",
            ))
        }
    };
    let mut out = Vec::with_capacity(msgs.len());
    for (i, msg) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let o =
            msg.as_object().ok_or_else(|| ApiError::bad(&p, format!("`{p}` must be an object")))?;
        let role = o
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(&p, format!("`{p}.role` must be a string")))?;
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            "developer" => "system",
            other => {
                return Err(ApiError::bad(
                    &p,
                    format!(
                    "`{p}.role` {other:?} is not one of system, developer, user, assistant, tool"
                ),
                ))
            }
        };
        let content = match o.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => return Err(ApiError::bad(&p, format!("`{p}.content[{j}]`: only {{\"type\": \"text\", \"text\": ..}} parts are supported"))),
                    }
                }
                s
            }
            Some(_) => {
                return Err(ApiError::bad(
                    &p,
                    format!("`{p}.content` must be a string or a list of text parts"),
                ))
            }
        };
        out.push((role.to_string(), content));
    }
    Ok(out)
}

/// The completion prompt: a string, a one-string list, or a list of token ids.
fn completion_prompt(
    st: &AppState,
    m: &Map<String, Value>,
) -> Result<Vec<llama_cpp_2::token::LlamaToken>, ApiError> {
    let n_vocab = st.model.inner.n_vocab();
    let from_ids = |a: &[Value]| -> Result<Vec<llama_cpp_2::token::LlamaToken>, ApiError> {
        a.iter()
            .map(|x| match x.as_i64() {
                Some(t) if t >= 0 && t < n_vocab as i64 => {
                    Ok(llama_cpp_2::token::LlamaToken(t as i32))
                }
                _ => Err(ApiError::bad(
                    "prompt",
                    format!("`prompt` token ids must be integers in [0, {n_vocab})"),
                )),
            })
            .collect()
    };
    let toks = match m.get("prompt") {
        None | Some(Value::Null) => return Err(ApiError::bad("prompt", "`prompt` is required")),
        Some(Value::String(s)) => st.model.tokenize(s, true),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            st.model.tokenize(a[0].as_str().unwrap_or_default(), true)
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => from_ids(a)?,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_array() => {
            from_ids(a[0].as_array().map(Vec::as_slice).unwrap_or_default())?
        }
        Some(Value::Array(a)) if a.len() > 1 => {
            return Err(ApiError::bad("prompt", "`prompt`: one prompt per request (n = 1)"))
        }
        Some(_) => {
            return Err(ApiError::bad(
                "prompt",
                "`prompt` must be a string, a list with one string, or a list of token ids",
            ))
        }
    };
    Ok(toks)
}

// ---------------------------------------------------------------------------------------------
// Generation

/// Sets the cancel flag when dropped: the client went away (or the reply is done).
struct CancelOnDrop(Arc<AtomicBool>);
impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The request's log line and metrics, written when the reply (or stream) ends.
struct GenLog {
    st: St,
    endpoint: &'static str,
    model: String,
    stream: bool,
    start: Instant,
    status: u16,
    prompt_tokens: usize,
    completion_tokens: usize,
    finish: &'static str,
    done: bool,
}

impl Drop for GenLog {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let finish = if self.done { self.finish } else { "cancelled" };
        // 499: the client closed the connection before the reply was complete.
        let status = if self.done { self.status } else { 499 };
        eprintln!(
            "grit serve: POST {} {} model={} stream={} prompt={} completion={} finish={} {:.1}ms",
            self.endpoint,
            status,
            self.model,
            self.stream,
            self.prompt_tokens,
            self.completion_tokens,
            finish,
            secs * 1e3
        );
        self.st.shared.metrics.request(self.endpoint, status);
        if self.done && self.status == 200 {
            self.st.shared.metrics.generation(
                &self.model,
                self.prompt_tokens,
                self.completion_tokens,
                secs,
            );
        }
    }
}

/// Marks a response whose log line the handler writes itself.
#[derive(Clone, Copy)]
struct SelfLogged;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(st): State<St>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let r = async {
        let m = parse_body(body)?;
        let p = gen_params(&st, &m)?;
        let msgs = chat_messages(&m)?;
        if !st.model.has_chat_template() {
            return Err(ApiError::bad(
                "messages",
                "this model has no chat template: use /v1/completions",
            ));
        }
        let prompt =
            st.model.apply_chat(&msgs).map_err(|e| ApiError::bad("messages", e.to_string()))?;
        let toks = st.model.tokenize(&prompt, true);
        Ok((p, toks))
    }
    .await;
    match r {
        Ok((p, toks)) => generate(st, Kind::Chat, p, toks, start).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<St>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let r = (|| {
        let m = parse_body(body)?;
        if m.get("suffix").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad("suffix", "`suffix` is not supported by grit serve"));
        }
        let p = gen_params(&st, &m)?;
        let toks = completion_prompt(&st, &m)?;
        Ok((p, toks))
    })();
    match r {
        Ok((p, toks)) => generate(st, Kind::Completion, p, toks, start).await,
        Err(e) => e.into_response(),
    }
}

fn context_check(st: &AppState, p: &mut GenParams, n_prompt: usize) -> Result<(), ApiError> {
    let n_ctx = st.n_ctx_seq as usize;
    if n_prompt == 0 {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if n_prompt >= n_ctx {
        return Err(ApiError::bad("messages", format!("This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens"))
            .code("context_length_exceeded"));
    }
    if p.max_tokens_given {
        if n_prompt + p.sampling.max_tokens > n_ctx {
            return Err(ApiError::bad(
                "max_tokens",
                format!(
                    "This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens and max_tokens asks for {} more",
                    p.sampling.max_tokens
                ),
            )
            .code("context_length_exceeded"));
        }
    } else {
        p.sampling.max_tokens = n_ctx - n_prompt;
    }
    Ok(())
}

/// Reserves a place in the bounded queue (generations and embeddings alike; the engine
/// gives it back when the request starts) or answers 429.
fn reserve_queue(st: &AppState) -> Result<(), ApiError> {
    let q = st.shared.queued.fetch_add(1, Ordering::SeqCst);
    if q >= st.queue_cap {
        st.shared.queued.fetch_sub(1, Ordering::SeqCst);
        st.shared.metrics.queue_full();
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy: {q} requests are waiting (--queue {}); retry later",
                st.queue_cap
            ),
        )
        .code("queue_full");
        e.retry_after = Some(1);
        return Err(e);
    }
    Ok(())
}

async fn generate(
    st: St,
    kind: Kind,
    mut p: GenParams,
    toks: Vec<llama_cpp_2::token::LlamaToken>,
    start: Instant,
) -> Response {
    if let Err(mut e) = context_check(&st, &mut p, toks.len()) {
        if kind == Kind::Completion && e.param.as_deref() == Some("messages") {
            e.param = Some("prompt".into());
        }
        return e.into_response();
    }
    if let Err(e) = reserve_queue(&st) {
        return e.into_response();
    }
    let (etx, erx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let n_prompt = toks.len();
    let job = GenJob {
        tokens: toks,
        model: p.model_idx,
        adapters: p.adapters.clone(),
        adapter_names: p.adapter_names.clone(),
        sampling: p.sampling.clone(),
        events: etx,
        cancel: cancel.clone(),
        deadline: start + st.timeout,
    };
    if let Err(e) = st.send(Cmd::Generate(Box::new(job))) {
        st.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return e.into_response();
    }
    let endpoint = if kind == Kind::Chat { "/v1/chat/completions" } else { "/v1/completions" };
    let log = GenLog {
        st: st.clone(),
        endpoint,
        model: p.model.clone(),
        stream: p.stream,
        start,
        status: 200,
        prompt_tokens: n_prompt,
        completion_tokens: 0,
        finish: "",
        done: false,
    };
    let guard = CancelOnDrop(cancel);
    let id = st.new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    if p.stream {
        stream_reply(kind, p, id, erx, guard, log)
    } else {
        full_reply(kind, p, id, erx, guard, log).await
    }
}

async fn full_reply(
    kind: Kind,
    p: GenParams,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    mut log: GenLog,
) -> Response {
    let mut text = String::new();
    let created = unix_now();
    loop {
        match rx.recv().await {
            Some(Event::Text(t, n)) => {
                text.push_str(&t);
                log.completion_tokens = n;
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                log.prompt_tokens = prompt_tokens;
                log.completion_tokens = completion_tokens;
                log.finish = finish_reason;
                log.done = true;
                drop(guard);
                let (choice, object) = match kind {
                    Kind::Chat => (
                        Choice::Message {
                            index: 0,
                            message: Message { role: "assistant", content: &text },
                            logprobs: None,
                            finish_reason,
                        },
                        "chat.completion",
                    ),
                    Kind::Completion => (
                        Choice::Text {
                            index: 0,
                            text: &text,
                            logprobs: None,
                            finish_reason: Some(finish_reason),
                        },
                        "text_completion",
                    ),
                };
                let body = Completion {
                    id: &id,
                    object,
                    created,
                    model: &p.model,
                    choices: vec![choice],
                    system_fingerprint: Completion::fingerprint(),
                    usage: Some(Some(Usage::new(prompt_tokens, completion_tokens))),
                };
                let mut r = axum::Json(body).into_response();
                r.extensions_mut().insert(SelfLogged);
                return r;
            }
            Some(Event::Failed(f)) => {
                let e = ApiError::from_failure(f);
                log.status = e.status.as_u16();
                log.done = true;
                log.finish = "error";
                let mut r = e.into_response();
                r.extensions_mut().insert(SelfLogged);
                return r;
            }
            None => {
                let e = ApiError::server("the inference thread stopped");
                log.status = 500;
                log.done = true;
                log.finish = "error";
                let mut r = e.into_response();
                r.extensions_mut().insert(SelfLogged);
                return r;
            }
        }
    }
}

struct StreamState {
    kind: Kind,
    model: String,
    id: String,
    created: u64,
    include_usage: bool,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Pending SSE frames (a final chunk may be followed by a usage chunk and [DONE]).
    out: std::collections::VecDeque<String>,
    sent_role: bool,
    finished: bool,
    _guard: CancelOnDrop,
    log: GenLog,
}

impl StreamState {
    fn object(&self) -> &'static str {
        if self.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        }
    }

    /// An SSE frame with one chunk: for a chat `delta` (text in `content`), for a completion
    /// the text itself.
    fn chunk(&self, delta: Delta<'_>, finish: Option<&str>) -> String {
        let choice = match self.kind {
            Kind::Chat => Choice::Delta { index: 0, delta, logprobs: None, finish_reason: finish },
            Kind::Completion => Choice::Text {
                index: 0,
                text: delta.content.unwrap_or(""),
                logprobs: None,
                finish_reason: finish,
            },
        };
        self.frame(&Completion {
            id: &self.id,
            object: self.object(),
            created: self.created,
            model: &self.model,
            choices: vec![choice],
            system_fingerprint: Completion::fingerprint(),
            usage: self.include_usage.then_some(None),
        })
    }

    /// The chunk after the last one when the client asked for usage: no choices, the counts.
    fn usage_chunk(&self, usage: Usage) -> String {
        self.frame(&Completion {
            id: &self.id,
            object: self.object(),
            created: self.created,
            model: &self.model,
            choices: Vec::new(),
            system_fingerprint: None,
            usage: Some(Some(usage)),
        })
    }

    fn frame(&self, c: &Completion<'_>) -> String {
        format!("data: {}\n\n", serde_json::to_string(c).expect("a chunk serializes"))
    }
}

fn stream_reply(
    kind: Kind,
    p: GenParams,
    id: String,
    rx: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    log: GenLog,
) -> Response {
    let mut s = StreamState {
        kind,
        model: p.model,
        id,
        created: unix_now(),
        include_usage: p.include_usage,
        rx,
        out: Default::default(),
        sent_role: false,
        finished: false,
        _guard: guard,
        log,
    };
    if kind == Kind::Chat {
        let c = s.chunk(Delta { role: Some("assistant"), content: Some("") }, None);
        s.out.push_back(c);
        s.sent_role = true;
    }
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(frame) = s.out.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), s));
            }
            if s.finished {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Text(t, n)) => {
                    s.log.completion_tokens = n;
                    let c = s.chunk(Delta { role: None, content: Some(&t) }, None);
                    s.out.push_back(c);
                }
                Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                    let c = s.chunk(Delta::default(), Some(finish_reason));
                    s.out.push_back(c);
                    if s.include_usage {
                        let c = s.usage_chunk(Usage::new(prompt_tokens, completion_tokens));
                        s.out.push_back(c);
                    }
                    s.out.push_back("data: [DONE]\n\n".into());
                    s.log.prompt_tokens = prompt_tokens;
                    s.log.completion_tokens = completion_tokens;
                    s.log.finish = finish_reason;
                    s.log.done = true;
                    s.finished = true;
                }
                Some(Event::Failed(f)) => {
                    let e = ApiError::from_failure(f);
                    s.out.push_back(format!("data: {}\n\n", e.body()));
                    s.out.push_back("data: [DONE]\n\n".into());
                    s.log.status = e.status.as_u16();
                    s.log.finish = "error";
                    s.log.done = true;
                    s.finished = true;
                }
                None => {
                    let e = ApiError::server("the inference thread stopped");
                    s.out.push_back(format!("data: {}\n\n", e.body()));
                    s.log.status = 500;
                    s.log.done = true;
                    s.finished = true;
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r.extensions_mut().insert(SelfLogged);
    r
}

// ---------------------------------------------------------------------------------------------
// Embeddings

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        o.push(T[(n >> 18) as usize & 63] as char);
        o.push(T[(n >> 12) as usize & 63] as char);
        o.push(if c.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        o.push(if c.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    o
}

/// `input` of an embeddings request as token lists: a string, a list of strings, a list of
/// token ids or a list of such lists; at most 256 items, each non-empty and within the
/// context.
fn embedding_inputs(
    st: &AppState,
    m: &Map<String, Value>,
) -> Result<Vec<Vec<llama_cpp_2::token::LlamaToken>>, ApiError> {
    let n_vocab = st.model.inner.n_vocab() as i64;
    let ids = |a: &[Value]| -> Result<Vec<llama_cpp_2::token::LlamaToken>, ApiError> {
        a.iter()
            .map(|x| match x.as_i64() {
                Some(t) if (0..n_vocab).contains(&t) => {
                    Ok(llama_cpp_2::token::LlamaToken(t as i32))
                }
                _ => Err(ApiError::bad(
                    "input",
                    format!("`input` token ids must be integers in [0, {n_vocab})"),
                )),
            })
            .collect()
    };
    let inputs: Vec<Vec<llama_cpp_2::token::LlamaToken>> = match m.get("input") {
        Some(Value::String(s)) => vec![st.model.tokenize(s, true)],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
            a.iter().map(|s| st.model.tokenize(s.as_str().unwrap_or_default(), true)).collect()
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => vec![ids(a)?],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| ids(x.as_array().map(Vec::as_slice).unwrap_or_default()))
            .collect::<Result<_, _>>()?,
        None | Some(Value::Null) => return Err(ApiError::bad("input", "`input` is required")),
        _ => {
            return Err(ApiError::bad(
                "input",
                "`input` must be a string, a list of strings, or token ids",
            ))
        }
    };
    if inputs.len() > 256 {
        return Err(ApiError::bad("input", "`input` takes at most 256 items"));
    }
    for (i, t) in inputs.iter().enumerate() {
        if t.is_empty() {
            return Err(ApiError::bad("input", format!("`input[{i}]` is empty")));
        }
        if t.len() > st.n_ctx_seq as usize {
            return Err(ApiError::bad(
                "input",
                format!(
                    "`input[{i}]` has {} tokens, more than the context of {}",
                    t.len(),
                    st.n_ctx_seq
                ),
            )
            .code("context_length_exceeded"));
        }
    }
    Ok(inputs)
}

async fn embeddings(
    State(st): State<St>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = parse_body(body)?;
    let (model, model_idx, adapters, _) = resolve_adapters(&st, &m)?;
    let b64 = match opt_str(&m, "encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(o) => {
            return Err(ApiError::bad(
                "encoding_format",
                format!("`encoding_format` {o:?} must be \"float\" or \"base64\""),
            ))
        }
    };
    if m.get("dimensions").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad(
            "dimensions",
            "`dimensions` is not supported: the embedding size is the model's",
        ));
    }
    let inputs = embedding_inputs(&st, &m)?;
    let n_tokens: usize = inputs.iter().map(Vec::len).sum();
    // The same queue, deadline and cancellation as generation: the engine decodes one input
    // per pass between generation steps, stops at the deadline (504), and stops when this
    // handler is dropped because the client went away.
    reserve_queue(&st)?;
    let (rtx, rrx) = oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let job = EmbedJob {
        inputs,
        model: model_idx,
        adapters,
        reply: rtx,
        cancel,
        deadline: Instant::now() + st.timeout,
    };
    if let Err(e) = st.send(Cmd::Embed(Box::new(job))) {
        st.shared.queued.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    let vecs = rrx
        .await
        .map_err(|_| ApiError::server("the inference thread stopped"))?
        .map_err(ApiError::from_failure)?;
    let data: Vec<Embedding> = vecs
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if b64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingData::Base64(base64(&bytes))
            } else {
                EmbeddingData::Floats(v)
            };
            Embedding { object: "embedding", index, embedding }
        })
        .collect();
    let usage = EmbeddingUsage { prompt_tokens: n_tokens, total_tokens: n_tokens };
    Ok(axum::Json(List { model: Some(model), usage: Some(usage), ..List::of(data) })
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// Models and adapters

/// The base model's card.
fn base_card(st: &AppState) -> ModelCard {
    ModelCard {
        id: st.base_name.clone(),
        object: "model",
        created: st.created,
        owned_by: "grit",
        parent: None,
        root: st.base_name.clone(),
        path: None,
        merged: None,
    }
}

/// An adapter's card: a model whose parent is the base.
fn adapter_obj(st: &AppState, id: &str, e: &super::adapters::AdapterEntry) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        parent: Some(st.base_name.clone()),
        created: e.created,
        path: Some(e.path.clone()),
        merged: Some(e.merged.is_some()),
        ..base_card(st)
    }
}

async fn list_models(State(st): State<St>) -> Response {
    let mut data = vec![base_card(&st)];
    for (name, e) in &st.registry().by_name {
        data.push(adapter_obj(&st, name, e));
    }
    axum::Json(List::of(data)).into_response()
}

/// A path segment (model or adapter name); one that is not UTF-8 gets an OpenAI-shaped 400.
fn path_segment(p: Result<UrlPath<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|UrlPath(s)| s).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid path: {}", e.body_text()),
        )
        .code("invalid_path")
    })
}

async fn get_model(
    State(st): State<St>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path_segment(id)?;
    if id == st.base_name || id == "base" {
        return Ok(axum::Json(base_card(&st)).into_response());
    }
    let reg = st.registry();
    let e = reg.by_name.get(&id).ok_or_else(|| ApiError::not_found_model(&id))?;
    Ok(axum::Json(adapter_obj(&st, &id, e)).into_response())
}

async fn load_adapter(
    State(st): State<St>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let m = parse_body(body)?;
    let Some(dir) = st.adapter_dir.clone() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "loading adapters at runtime is off: start grit serve with --adapter-dir DIR",
        )
        .code("adapter_dir_not_set"));
    };
    let name = opt_str(&m, "name")?
        .ok_or_else(|| ApiError::bad("name", "`name` is required"))?
        .to_string();
    let path = opt_str(&m, "path")?
        .ok_or_else(|| {
            ApiError::bad("path", "`path` is required (relative to the adapter folder)")
        })?
        .to_string();
    super::adapters::check_name(&name, &[st.base_name.as_str(), "base"])
        .map_err(|e| ApiError::bad("name", e))?;
    if st.registry().by_name.contains_key(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "an adapter named `{name}` is already loaded; DELETE /v1/adapters/{name} first"
            ),
        )
        .code("adapter_exists"));
    }
    let loaded = st.registry().by_name.len();
    if loaded >= st.max_adapters {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("{loaded} adapters are loaded, the most this server takes (--max-adapters {}); DELETE /v1/adapters/NAME one first", st.max_adapters),
        )
        .code("too_many_adapters"));
    }
    let real =
        super::adapters::resolve_in_dir(&dir, &path).map_err(|e| ApiError::bad("path", e))?;
    let (check, base, policy) = (real.clone(), st.model.path.clone(), st.base_mismatch);
    let (_, warning) = tokio::task::spawn_blocking(move || {
        crate::adapter::validate_with_provenance(&check, &base, policy)
    })
    .await
    .map_err(|e| ApiError::server(e.to_string()))?
    .map_err(|e| {
        ApiError::bad("path", format!("cannot load adapter: {e}")).code("invalid_adapter")
    })?;
    if let Some(w) = warning {
        eprintln!("grit serve: warning: {w}");
    }
    let id = st.registry_mut().next_id();
    let (rtx, rrx) = oneshot::channel();
    st.send(Cmd::LoadAdapter { id, path: real.clone(), reply: rtx })?;
    rrx.await.map_err(|_| ApiError::server("the inference thread stopped"))?.map_err(|e| {
        ApiError::bad("path", format!("cannot load adapter: {e}")).code("invalid_adapter")
    })?;
    let created = unix_now();
    {
        let mut reg = st.registry_mut();
        if reg.by_name.contains_key(&name) {
            drop(reg);
            st.send(Cmd::UnloadAdapter { id })?;
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                format!("an adapter named `{name}` was loaded meanwhile"),
            )
            .code("adapter_exists"));
        }
        reg.by_name.insert(
            name.clone(),
            super::adapters::AdapterEntry { id, path: real.clone(), created, merged: None },
        );
    }
    eprintln!("grit serve: adapter {name} ← {}", real.display());
    let mut r = (
        StatusCode::CREATED,
        axum::Json(adapter_obj(
            &st,
            &name,
            &super::adapters::AdapterEntry { id, path: real.clone(), created, merged: None },
        )),
    )
        .into_response();
    r.extensions_mut().insert(LogNote(format!("loaded {name}")));
    Ok(r)
}

async fn unload_adapter(
    State(st): State<St>,
    name: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path_segment(name)?;
    if st.registry().by_name.get(&name).is_some_and(|e| e.merged.is_some()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("adapter `{name}` is served merged (--merge-adapters): its model copy stays until the server stops"),
        )
        .code("adapter_merged"));
    }
    let e = st.registry_mut().by_name.remove(&name).ok_or_else(|| {
        let mut e = ApiError::not_found_model(&name);
        e.message = format!("no adapter named `{name}` is loaded");
        e.param = None;
        e.code("adapter_not_found")
    })?;
    st.send(Cmd::UnloadAdapter { id: e.id })?;
    eprintln!("grit serve: adapter {name} unloaded");
    Ok(axum::Json(Deleted { id: name, object: "model", deleted: true }).into_response())
}

async fn list_adapters(State(st): State<St>) -> Response {
    let data: Vec<ModelCard> =
        st.registry().by_name.iter().map(|(n, e)| adapter_obj(&st, n, e)).collect();
    axum::Json(List::of(data)).into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<St>) -> Response {
    let body = st.shared.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
    .code("unknown_url")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

// ---------------------------------------------------------------------------------------------
// Middleware

async fn auth(State(st): State<St>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path() != "/health" && req.method() != Method::OPTIONS {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|k| constant_time_eq(k.trim().as_bytes(), key.as_bytes()));
            if !ok {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    "missing or wrong API key: send `Authorization: Bearer KEY`",
                )
                .code("invalid_api_key")
                .into_response();
            }
        }
    }
    next.run(req).await
}

/// What a server without an API key accepts, as trusted local servers do it: without a key,
/// anyone who can reach the port may use it, and a web page in the user's browser can reach a
/// loopback port. Two attacks are refused:
/// - DNS rebinding (a page's own host name re-pointed at 127.0.0.1, so the browser treats the
///   server as same-origin and reads its answers): the `Host` header must be an IP address, a
///   loopback name (`localhost`, `*.localhost`), the `--host` name or an `--allowed-host`.
/// - Cross-site requests (a page POSTing to the server; `text/plain` needs no preflight): a
///   request with an `Origin` is refused unless that origin is allowed (`--cors-origin`) or is
///   the server itself, and a POST body must be `application/json`, which a page can only send
///   cross-site after a CORS preflight the server does not grant.
///
/// With `--api-key` neither check applies (a page cannot attach the key without a preflight).
/// `/health` stays open.
#[derive(Debug, Clone)]
pub struct LocalGuard {
    /// Lower-case host names accepted besides IP addresses and loopback names.
    hosts: Vec<String>,
    /// Allowed origins (`*` = any).
    origins: Vec<String>,
}

impl LocalGuard {
    pub fn new(host: &str, allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        let mut hosts: Vec<String> =
            allowed_hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        hosts.push(host.trim().to_ascii_lowercase());
        LocalGuard { hosts, origins: cors_origins.to_vec() }
    }

    /// The host name of a `Host` header value (`name`, `name:port`, `[v6]:port`).
    fn host_name(value: &str) -> &str {
        let v = value.trim();
        if let Some(rest) = v.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        match v.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => v,
        }
    }

    fn host_allowed(&self, value: &str) -> bool {
        let name = Self::host_name(value).trim_end_matches('.').to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.contains(&name)
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if self.origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin)) {
            return true;
        }
        // Same origin: the page was served from this very address.
        let authority = origin.split_once("://").map(|(_, a)| a);
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }

    /// Checks one request's headers (no API key configured).
    fn check(&self, method: &Method, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        let text = |h: header::HeaderName| headers.get(h).map(|v| v.to_str().unwrap_or("\u{fffd}"));
        let host = text(header::HOST);
        if let Some(h) = host {
            if !self.host_allowed(h) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    format!(
                        "Host {h:?} is not allowed: without --api-key this server answers only loopback names and IP addresses \
                         (a web page could reach it by DNS rebinding); start it with --allowed-host NAME or --api-key KEY"
                    ),
                )
                .code("host_not_allowed"));
            }
        }
        let origin = text(header::ORIGIN);
        if let Some(o) = origin {
            if !self.origin_allowed(o, host) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    format!("requests from web pages (Origin {o:?}) are refused without --api-key; allow that page with --cors-origin {o}"),
                )
                .code("origin_not_allowed"));
            }
        }
        if *method == Method::POST && origin.is_none() {
            let ct = text(header::CONTENT_TYPE).unwrap_or("");
            let media = ct.split(';').next().unwrap_or("").trim();
            if !media.eq_ignore_ascii_case("application/json") {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    format!("Content-Type {ct:?}: send JSON with `Content-Type: application/json`"),
                )
                .code("unsupported_content_type"));
            }
        }
        Ok(())
    }
}

async fn local_guard(State(st): State<St>, req: Request, next: Next) -> Response {
    if st.api_key.is_none() && req.uri().path() != "/health" {
        if let Err(e) = st.guard.check(req.method(), req.headers()) {
            return e.into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One log line per request (generations write theirs when they end) and the request counter.
async fn log_requests(State(st): State<St>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    if r.extensions().get::<SelfLogged>().is_none() {
        let note =
            r.extensions().get::<LogNote>().map(|n| format!(" — {}", n.0)).unwrap_or_default();
        eprintln!(
            "grit serve: {method} {path} {} {:.1}ms{note}",
            r.status().as_u16(),
            start.elapsed().as_secs_f64() * 1e3
        );
        let endpoint = match path.as_str() {
            p if p.starts_with("/v1/adapters/") => "/v1/adapters/{name}",
            p if p.starts_with("/v1/models/") => "/v1/models/{id}",
            "/health"
            | "/metrics"
            | "/v1/models"
            | "/v1/adapters"
            | "/v1/embeddings"
            | "/v1/completions"
            | "/v1/chat/completions" => path.as_str(),
            _ => "other",
        };
        st.shared.metrics.request(endpoint, r.status().as_u16());
    }
    r
}

/// The routes with every layer, not bound to a socket.
pub fn router(st: St, cfg: &ServeConfig) -> Result<Router, ServeError> {
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(cfg.body_limit))
        .layer(middleware::from_fn_with_state(st.clone(), auth))
        .layer(middleware::from_fn_with_state(st.clone(), local_guard))
        .layer(middleware::from_fn_with_state(st.clone(), log_requests))
        .with_state(st.clone());
    if !cfg.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, Any, CorsLayer};
        let origin = if cfg.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            let list = cfg
                .cors_origins
                .iter()
                .map(|o| {
                    HeaderValue::from_str(o).map_err(|_| {
                        ServeError::Option(format!("--cors-origin {o:?}: not a valid origin"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(list)
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
                .allow_headers(Any)
                .max_age(Duration::from_secs(3600)),
        );
    }
    Ok(app)
}

/// Binds and serves until SIGINT/SIGTERM, then lets in-flight requests finish for the grace
/// period and cancels the rest.
pub async fn run(
    st: St,
    cfg: &ServeConfig,
    tx: std::sync::mpsc::Sender<Cmd>,
) -> Result<(), ServeError> {
    let app = router(st.clone(), cfg)?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|err| ServeError::Bind { addr: addr.clone(), err })?;
    let local = listener.local_addr()?;
    eprintln!(
        "grit serve: {} on http://{local} (context {} per request, {} parallel per adapter set, up to {} adapter sets, queue {})",
        st.base_name, st.n_ctx_seq, cfg.parallel, cfg.max_contexts, cfg.queue
    );
    let grace = cfg.shutdown_grace;
    let shutdown = async move {
        wait_for_signal().await;
        eprintln!(
            "grit serve: shutting down: finishing in-flight requests (at most {:.0} s)",
            grace.as_secs_f64()
        );
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            eprintln!("grit serve: grace period over: cancelling the requests still running");
            let _ = tx.send(Cmd::CancelAll);
        });
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    eprintln!("grit serve: stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_local_guard_refuses_rebinding_and_cross_site_requests() {
        use axum::http::HeaderMap;
        let guard =
            LocalGuard::new("127.0.0.1", &["my-box.lan".into()], &["http://app.example".into()]);
        let check = |method: Method, pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_str(v).unwrap());
            }
            guard.check(&method, &h).map_err(|e| e.code.unwrap_or_default())
        };
        let json = ("content-type", "application/json; charset=utf-8");
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:8080",
            "10.0.0.7",
            "my-box.lan:8080",
        ] {
            assert_eq!(check(Method::POST, &[("host", host), json]), Ok(()), "{host}");
        }
        for host in ["rebind.evil.example", "rebind.evil.example:8080", "localhost.evil.example"] {
            assert_eq!(check(Method::GET, &[("host", host)]), Err("host_not_allowed"), "{host}");
        }
        // Cross-site: a foreign Origin, or a POST body that is not JSON (no preflight needed).
        assert_eq!(
            check(
                Method::POST,
                &[("host", "127.0.0.1:8080"), ("origin", "http://evil.example"), json]
            ),
            Err("origin_not_allowed")
        );
        assert_eq!(
            check(Method::POST, &[("host", "127.0.0.1:8080"), ("content-type", "text/plain")]),
            Err("unsupported_content_type")
        );
        assert_eq!(
            check(Method::POST, &[("host", "127.0.0.1:8080")]),
            Err("unsupported_content_type")
        );
        // The configured origin and the server's own origin are allowed; GETs need no body type.
        assert_eq!(
            check(
                Method::POST,
                &[
                    ("host", "127.0.0.1:8080"),
                    ("origin", "http://app.example"),
                    ("content-type", "text/plain")
                ]
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Method::POST,
                &[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080"), json]
            ),
            Ok(())
        );
        assert_eq!(check(Method::GET, &[("host", "127.0.0.1:8080")]), Ok(()));
    }

    #[test]
    fn errors_have_openai_shape() {
        let e = ApiError::bad("top_p", "`top_p` 2 must be in (0, 1]");
        let v = e.body();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "top_p");
        assert!(v["error"]["message"].as_str().unwrap().contains("top_p"));
    }
}
