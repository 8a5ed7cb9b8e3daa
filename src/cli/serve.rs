//! `grit serve` flags.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::serve::{adapters::parse_spec, ServeConfig};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Name clients use for the base model (default: the model file name without .gguf; "base" always works too).
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 = any free port; the address is logged).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint except /health.
    #[arg(long, env = "GRIT_API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow browser requests from this origin (repeatable; `*` = any).
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Without --api-key, a host name clients may use besides loopback names and IP addresses
    /// (repeatable; the `Host` header is checked against DNS rebinding).
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Most adapters loaded at once (start adapters included); more loads get 409.
    #[arg(long, default_value_t = 32)]
    pub max_adapters: usize,
    /// Refuse adapters (at start and loaded at runtime) whose recorded base model (name,
    /// sha256) differs from --model (default: a warning in the log).
    #[arg(long)]
    pub strict: bool,
    /// A LoRA adapter served under a name, NAME=PATH.gguf (repeatable). Clients pick it with "model": NAME.
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    pub adapters: Vec<String>,
    /// Serve each --adapter merged into its own copy of the base model (full base speed, one
    /// model copy in memory per adapter) instead of applying it at runtime. Merged adapters
    /// cannot be stacked or unloaded; runtime loads (POST /v1/adapters) stay runtime adapters.
    #[arg(long)]
    pub merge_adapters: bool,
    /// Type of the merged tensors with --merge-adapters (same = each keeps the base's type).
    #[arg(long, value_enum, default_value = "same", requires = "merge_adapters")]
    pub merge_type: crate::adapter::merge::MergeType,
    /// Allow loading adapters at runtime (POST /v1/adapters), only from files inside this folder.
    #[arg(long, value_name = "DIR")]
    pub adapter_dir: Option<PathBuf>,
    /// Context length per request (prompt + completion); 0 = the model's, capped at 4096.
    #[arg(long, default_value_t = 2048)]
    pub ctx: u32,
    /// Requests decoded together in one batch per adapter set.
    #[arg(long, default_value_t = 8)]
    pub parallel: u32,
    /// Adapter sets that have a context (and decode concurrently) at once.
    #[arg(long, default_value_t = 4)]
    pub max_contexts: usize,
    /// Requests that may wait for a slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most tokens per decode call (prompt chunks and other requests' tokens together).
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// Worker threads (default: all cores).
    #[arg(short, long, default_value_t = 0)]
    pub threads: i32,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Seconds a request may take, waiting included; then it ends with 504 (or an error event).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Seconds shutdown (SIGINT/SIGTERM) waits for in-flight requests before cancelling them.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
}

fn secs(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0) {
        anyhow::bail!("{flag} {v}: must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn run(a: ServeArgs) -> Result<()> {
    let adapters = a
        .adapters
        .iter()
        .map(|s| parse_spec(s))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let cfg = ServeConfig {
        model: a.model.resolve()?,
        model_name: a.model_name,
        gpu_layers: a.model.gpu_layers,
        device: a.model.device,
        host: a.host,
        port: a.port,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        cors_origins: a.cors_origins,
        allowed_hosts: a.allowed_hosts,
        max_adapters: a.max_adapters,
        base_mismatch: super::adapter::base_mismatch(a.strict),
        body_limit: a.body_limit,
        timeout: secs("--timeout", a.timeout)?,
        shutdown_grace: secs("--shutdown-grace", a.shutdown_grace)?,
        adapters,
        merge: a.merge_adapters.then_some(a.merge_type),
        adapter_dir: a.adapter_dir,
        n_ctx: a.ctx,
        parallel: a.parallel,
        max_contexts: a.max_contexts,
        queue: a.queue,
        threads: a.threads,
        n_batch: a.batch,
    };
    crate::serve::serve(cfg)?;
    Ok(())
}
