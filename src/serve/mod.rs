//! `grit serve`: an OpenAI-compatible HTTP server over llama.cpp with many LoRA adapters.
//!
//! - [`http`]: the axum routes (OpenAI API, adapters, health, metrics), errors, auth, logs.
//! - [`engine`]: the scheduler thread (continuous batching per adapter set).
//! - [`adapters`]: adapter names and the `--adapter-dir` rules.
//! - [`metrics`]: Prometheus counters.

pub mod adapters;
pub mod engine;
mod http;
pub mod metrics;
pub mod openai;

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::infer::{InferError, LoadOptions, Model};

/// Why the server could not start. Runtime problems are answered per request instead.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error("{0}")]
    Option(String),
    #[error("--adapter {name}={}: {msg}", .path.display())]
    Adapter { name: String, path: PathBuf, msg: String },
    #[error("cannot listen on {addr}: {err}")]
    Bind { addr: String, err: std::io::Error },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything `grit serve` needs (the CLI fills it in).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// The name clients use for the base model (default: the file name without `.gguf`).
    pub model_name: Option<String>,
    pub gpu_layers: u32,
    /// Where the model runs (`--device`).
    pub device: crate::ggml::Device,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Allowed CORS origins (`*` = any); empty = no CORS headers. Without an API key, requests
    /// carrying any other `Origin` are refused.
    pub cors_origins: Vec<String>,
    /// Without an API key, the host names accepted in `Host` besides loopback names, IP
    /// addresses and `host` (see [`http::LocalGuard`]).
    pub allowed_hosts: Vec<String>,
    /// Most adapters loaded at once (start adapters included).
    pub max_adapters: usize,
    /// An adapter (at start or loaded at runtime) whose recorded base model differs from
    /// `model`: a warning in the log, or refused.
    pub base_mismatch: crate::adapter::BaseMismatch,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Longest a generation may take, queueing included.
    pub timeout: Duration,
    /// How long shutdown waits for in-flight requests before cancelling them.
    pub shutdown_grace: Duration,
    /// `NAME=PATH` adapters loaded at start.
    pub adapters: Vec<(String, PathBuf)>,
    /// `Some(type)`: every start adapter is merged into its own copy of the base (tensors of
    /// this type) and served as a model of its own, instead of being applied at runtime.
    pub merge: Option<crate::adapter::merge::MergeType>,
    /// The only folder runtime loads (`POST /v1/adapters`) may read from.
    pub adapter_dir: Option<PathBuf>,
    /// Context length per request (prompt + completion); 0 = the model's, capped at 4096.
    pub n_ctx: u32,
    /// Requests decoded together per adapter set.
    pub parallel: u32,
    /// Adapter sets with a context at once.
    pub max_contexts: usize,
    /// Requests that may wait for a slot before new ones get 429.
    pub queue: usize,
    /// Worker threads for llama.cpp (0 = all cores).
    pub threads: i32,
    /// Most tokens per decode call.
    pub n_batch: u32,
}

/// Loads the model and the start adapters, then serves until SIGINT/SIGTERM.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    Server::start(cfg)?.run()
}

/// A started server: the model and the start adapters loaded and the inference thread
/// running, ready to listen ([`Server::run`]) or to answer requests in process
/// ([`Server::router`], which the fuzz targets drive). Dropping it stops the inference thread.
pub struct Server {
    state: Arc<http::AppState>,
    tx: std::sync::mpsc::Sender<engine::Cmd>,
    engine: Option<std::thread::JoinHandle<()>>,
    cfg: ServeConfig,
}

impl Server {
    /// Checks the options, loads the model (and merges or loads the start adapters) and starts
    /// the inference thread.
    pub fn start(cfg: ServeConfig) -> Result<Server, ServeError> {
        check_options(&cfg)?;
        let load = LoadOptions { n_gpu_layers: cfg.gpu_layers, device: cfg.device };
        let model = Arc::new(Model::load(&cfg.model, &load)?);
        eprintln!("grit serve: device {}", model.device_label());
        let base_name = base_name(&cfg);
        for (name, path) in &cfg.adapters {
            adapters::check_name(name, &[base_name.as_str(), "base"]).map_err(|msg| {
                ServeError::Adapter { name: name.clone(), path: path.clone(), msg }
            })?;
        }
        // --merge-adapters: each start adapter becomes a merged model copy (index 1, 2, ...).
        let mut models = vec![model.clone()];
        let merged = match cfg.merge {
            Some(ty) => merge_start_adapters(&cfg, ty, &mut models)?,
            None => Vec::new(),
        };
        let n_ctx_train = model.inner.n_ctx_train();
        let n_ctx = if cfg.n_ctx > 0 { cfg.n_ctx } else { n_ctx_train.clamp(256, 4096) };
        // llama.cpp rounds each sequence's context up to a multiple of 256.
        let n_ctx_seq = n_ctx.div_ceil(256) * 256;
        let shared = Arc::new(engine::Shared {
            queued: AtomicUsize::new(0),
            metrics: Arc::new(metrics::Metrics::default()),
        });
        let ecfg = engine::EngineConfig {
            n_ctx_seq,
            parallel: cfg.parallel,
            max_lanes: cfg.max_contexts,
            n_batch: cfg.n_batch,
            threads: crate::infer::resolve_threads(cfg.threads),
            offload: model.offload(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let engine_shared = shared.clone();
        let engine = std::thread::Builder::new().name("grit-engine".into()).spawn(move || {
            let refs: Vec<&llama_cpp_2::model::LlamaModel> =
                models.iter().map(|m| &m.inner).collect();
            engine::run(&refs, ecfg, rx, engine_shared)
        })?;
        // From here an error drops `tx`, which stops the inference thread.
        let mut registry = adapters::Registry::default();
        for (name, path, idx) in merged {
            let id = registry.next_id();
            let created = http::unix_now();
            let entry = adapters::AdapterEntry { id, path, created, merged: Some(idx) };
            registry.by_name.insert(name, entry);
        }
        if cfg.merge.is_none() {
            load_start_adapters(&cfg, &tx, &mut registry)?;
        }
        let state = Arc::new(http::AppState {
            model: model.clone(),
            base_name,
            created: http::unix_now(),
            registry: RwLock::new(registry),
            tx: std::sync::Mutex::new(tx.clone()),
            shared,
            n_ctx_seq,
            queue_cap: cfg.queue,
            timeout: cfg.timeout,
            adapter_dir: cfg.adapter_dir.clone(),
            api_key: cfg.api_key.clone(),
            guard: http::LocalGuard::new(&cfg.host, &cfg.allowed_hosts, &cfg.cors_origins),
            max_adapters: cfg.max_adapters,
            base_mismatch: cfg.base_mismatch,
            next_id: AtomicUsize::new(1),
        });
        Ok(Server { state, tx, engine: Some(engine), cfg })
    }

    /// The HTTP routes with every layer (auth, the local guard, limits, logs, CORS), not bound
    /// to a socket.
    pub fn router(&self) -> Result<axum::Router, ServeError> {
        http::router(self.state.clone(), &self.cfg)
    }

    /// Binds and serves until SIGINT/SIGTERM (see [`http::run`]).
    pub fn run(self) -> Result<(), ServeError> {
        let threads =
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 4);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?;
        rt.block_on(http::run(self.state.clone(), &self.cfg, self.tx.clone()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.tx.send(engine::Cmd::Exit);
        if let Some(e) = self.engine.take() {
            let _ = e.join();
        }
    }
}

/// Refuses options the server cannot run with, naming the flag.
fn check_options(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.parallel == 0 || cfg.parallel > 256 {
        return Err(ServeError::Option(format!(
            "--parallel {}: must be between 1 and 256",
            cfg.parallel
        )));
    }
    if cfg.max_contexts == 0 {
        return Err(ServeError::Option("--max-contexts 0: at least one context is needed".into()));
    }
    if cfg.n_batch < 1 {
        return Err(ServeError::Option("--batch 0: must be at least 1".into()));
    }
    if let Some(d) = &cfg.adapter_dir {
        if !d.is_dir() {
            return Err(ServeError::Option(format!("--adapter-dir {}: not a folder", d.display())));
        }
    }
    if cfg.adapters.len() > cfg.max_adapters {
        return Err(ServeError::Option(format!(
            "{} --adapter flags but --max-adapters {}",
            cfg.adapters.len(),
            cfg.max_adapters
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, path) in &cfg.adapters {
        if !seen.insert(name.clone()) {
            return Err(ServeError::Adapter {
                name: name.clone(),
                path: path.clone(),
                msg: "the name is used twice".into(),
            });
        }
    }
    Ok(())
}

/// The name clients use for the base model: `--model-name`, or the model file's name.
fn base_name(cfg: &ServeConfig) -> String {
    cfg.model_name.clone().unwrap_or_else(|| {
        let f = cfg
            .model
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        f.strip_suffix(".gguf").map(str::to_string).unwrap_or(f)
    })
}

/// `--merge-adapters`: merges each start adapter into a copy of the base, loads it as a model
/// of its own (appended to `models`) and returns (name, file, model index) per adapter.
fn merge_start_adapters(
    cfg: &ServeConfig,
    ty: crate::adapter::merge::MergeType,
    models: &mut Vec<Arc<Model>>,
) -> Result<Vec<(String, PathBuf, usize)>, ServeError> {
    let mut merged = Vec::new();
    let dir = crate::tempdir::TempDir::new_in(&std::env::temp_dir(), "grit-serve")?;
    for (name, path) in &cfg.adapters {
        let err = |msg: String| ServeError::Adapter { name: name.clone(), path: path.clone(), msg };
        let t0 = std::time::Instant::now();
        let ad =
            crate::adapter::load_any(path, Some(&cfg.model)).map_err(|e| err(e.to_string()))?;
        let out = dir.path().join(format!("{name}.gguf"));
        crate::adapter::merge::merge(&cfg.model, &ad, 1.0, ty, false, &out)
            .map_err(|e| err(e.to_string()))?;
        let load = LoadOptions { n_gpu_layers: cfg.gpu_layers, device: cfg.device };
        let m = Model::load(&out, &load).map_err(|e| err(e.to_string()))?;
        models.push(Arc::new(m));
        merged.push((name.clone(), path.clone(), models.len() - 1));
        eprintln!(
            "grit serve: adapter {name} ← {} (merged, {ty:?} tensors, {:.1} s)",
            path.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    // The merged files go as soon as they are loaded, so nothing is left behind even if the
    // server is killed: llama.cpp has mapped or read them, and on Unix a mapping outlives the
    // file's name.
    drop(dir);
    Ok(merged)
}

/// Validates each start adapter against the base (provenance: warn, or refuse with
/// `--strict`) and loads it on the inference thread under a new id.
fn load_start_adapters(
    cfg: &ServeConfig,
    tx: &std::sync::mpsc::Sender<engine::Cmd>,
    registry: &mut adapters::Registry,
) -> Result<(), ServeError> {
    for (name, path) in &cfg.adapters {
        let err = |msg: String| ServeError::Adapter { name: name.clone(), path: path.clone(), msg };
        let (_, warning) =
            crate::adapter::validate_with_provenance(path, &cfg.model, cfg.base_mismatch)
                .map_err(|e| err(e.to_string()))?;
        if let Some(w) = warning {
            eprintln!("grit serve: warning: {w}");
        }
        let id = registry.next_id();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let _ = tx.send(engine::Cmd::LoadAdapter { id, path: path.clone(), reply: rtx });
        match rrx.blocking_recv() {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => return Err(err(msg)),
            Err(_) => return Err(ServeError::Option("the inference thread stopped".into())),
        }
        let created = http::unix_now();
        let entry = adapters::AdapterEntry { id, path: path.clone(), created, merged: None };
        registry.by_name.insert(name.clone(), entry);
        eprintln!("grit serve: adapter {name} ← {}", path.display());
    }
    Ok(())
}
