//! `grit train`: data → graphs → steps → checkpoints, metrics, adapter and summary.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{self, DataConfig, Dataset, Sequence};
use crate::ggml::{Backend, BackendOptions, Context};
use crate::gguf::GgufFile;
use crate::model::{
    Arch, Batch, LoraConfig, LoraSet, ModelError, Outputs, Target, TrainGraph, Weights,
};
use crate::rundir;

use super::checkpoint::{self, Checkpoint, NamedTensor};
use super::config::{ConfigError, Method, TrainConfig};
use super::copies::FrozenCopies;
use super::engine::{
    self, AdamStep, OptGraph, OptOptions, OptState, StepGraph, StepOptions, SLOT_NAMES,
};
use super::grit_run::{self, GritCheckpoint, GritRun};
use super::metrics::MetricsWriter;
use super::schedule::lr_at;

/// Why training stopped early. Messages name the file, flag or step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ggml(#[from] crate::ggml::GgmlError),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error("{p}: {msg}", p = .0.display(), msg = .1)]
    Io(PathBuf, String),
    /// A checkpoint that reads but does not fit this run (state fields, module count, shapes).
    #[error("checkpoint step {step} in {p}: {msg}", p = .dir.display())]
    CheckpointMismatch { dir: PathBuf, step: usize, msg: String },
    #[error("{p}: the output folder is not empty; pass --overwrite to replace its run or --resume {p} to continue it", p = .0.display())]
    OutNotEmpty(PathBuf),
    #[error("no training data: pass --data FILE (JSONL or .txt)")]
    NoData,
    #[error("training needs about {need_mib} MiB but only {avail_mib} MiB are available; {hint}")]
    Memory { need_mib: u64, avail_mib: u64, hint: String },
    #[error("training needs about {need_mib} MiB of {device} memory but only {avail_mib} MiB are free; {hint}")]
    DeviceMemory { device: String, need_mib: u64, avail_mib: u64, hint: String },
    #[error("the loss became {loss} at step {step}; lower --lr or check the data")]
    NonFinite { step: usize, loss: f32 },
    #[error("{p}: no checkpoint to resume from (the run saves them with --save-every N or on Ctrl-C)", p = .0.display())]
    NothingToResume(PathBuf),
    #[error("interrupted at step {step}; checkpoint saved in {p}; continue with --resume {out}", p = .dir.display(), out = .out.display())]
    Interrupted { step: usize, dir: PathBuf, out: PathBuf },
}

fn io(p: &Path, e: impl ToString) -> TrainError {
    TrainError::Io(p.into(), e.to_string())
}

/// How `grit train` was asked to run (beyond the configuration).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    pub overwrite: bool,
    /// Continue the run in `out` from its latest checkpoint.
    pub resume: bool,
    pub dry_run: bool,
    /// Stop (as if interrupted, checkpoint included) after this step — for tests of resume.
    pub stop_after: Option<usize>,
    /// Write the sequences the run will train on to this JSON file first.
    pub dump_tokens: Option<PathBuf>,
    /// Time every node of the training steps and print the breakdown at the end.
    pub profile: bool,
    /// Set from outside (the CLI's Ctrl-C handler) to stop the run at the end of the current
    /// step, with a checkpoint and the adapter written as at a normal end.
    pub cancel: Arc<AtomicBool>,
}

/// What [`train`] did: a run, or (`dry_run`) only read and checked the data.
#[derive(Debug)]
pub enum Outcome {
    Trained(Summary),
    DryRun { train: data::DataStats, eval: Option<data::DataStats> },
}

pub use crate::rundir::Summary;

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}
/// Current resident memory (VmRSS), bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}
fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
/// MemAvailable from /proc/meminfo, bytes (None where unknown).
pub fn mem_available_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| k * 1024)
}

/// Turns `seqs` into one graph batch: each sequence padded to `seq_len`, placed one after the
/// other, with a block-diagonal causal mask (per sequence and per packed example) and the
/// trained rows and their labels.
pub fn make_batch(seqs: &[Sequence], seq_len: usize, pad: i32) -> Batch {
    let n = seqs.len() * seq_len;
    let mut b = Batch {
        tokens: Vec::with_capacity(n),
        positions: Vec::with_capacity(n),
        mask: vec![f32::NEG_INFINITY; n * n],
        rows: Vec::new(),
        labels: Vec::new(),
    };
    for (k, s) in seqs.iter().enumerate() {
        let mut s = s.clone();
        s.pad_to(seq_len, pad);
        let off = k * seq_len;
        let m = data::causal_segment_mask(&s);
        for q in 0..seq_len {
            b.mask[(off + q) * n + off..(off + q) * n + off + seq_len]
                .copy_from_slice(&m[q * seq_len..(q + 1) * seq_len]);
        }
        b.tokens.extend_from_slice(&s.tokens);
        b.positions.extend_from_slice(&s.pos);
        for (i, &w) in s.loss_mask.iter().enumerate() {
            if w > 0.0 {
                b.rows.push((off + i) as i32);
                b.labels.push(s.labels[i]);
            }
        }
    }
    b
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// Writes `bytes` to `path` atomically (temporary sibling + rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::fetch::write_atomic(path, bytes).map_err(|e| io(path, e))
}

/// Runs a training job as configured.
pub fn train(mut cfg: TrainConfig, opts: RunOptions) -> Result<Outcome, TrainError> {
    cfg.validate()?;
    let is_grit = cfg.method == Method::Grit;
    let data_path = cfg.data.clone().ok_or(TrainError::NoData)?;
    let model_path = match &cfg.model {
        Some(p) => p.clone(),
        None => crate::fetch::ensure_default_model()?,
    };
    cfg.model = Some(model_path.clone());

    // Model file, architecture, tokenizer (vocab only: the weights are loaded by grit).
    let file = GgufFile::open(&model_path)?;
    Arch::parse(&file.architecture()?)?; // refuse untrainable architectures before loading data
    let tok = crate::infer::Model::load_vocab_only(&model_path)?;

    // Data.
    let dcfg = DataConfig {
        max_seq_len: cfg.max_seq_len,
        train_on_prompt: cfg.train_on_prompt,
        skip_bad_rows: cfg.skip_bad_rows,
        seed: cfg.seed,
        pack: true,
    };
    let train_ds = data::load_file(&data_path, &tok, &dcfg)?;
    let (train_ds, eval_ds): (Dataset, Option<Dataset>) =
        match (&cfg.eval_data, cfg.eval_split > 0.0) {
            (Some(p), _) => (train_ds, Some(data::load_file(p, &tok, &dcfg)?)),
            (None, true) => {
                let (t, e) = data::split_eval(train_ds, cfg.eval_split, cfg.seed)?;
                (t, Some(e))
            }
            (None, false) => (train_ds, None),
        };
    if opts.dry_run {
        return Ok(Outcome::DryRun {
            train: train_ds.stats.clone(),
            eval: eval_ds.map(|e| e.stats),
        });
    }

    // Output folder.
    let out = opts.out.clone();
    if opts.resume {
        if !out.join(rundir::CONFIG).is_file() {
            return Err(TrainError::NothingToResume(out));
        }
    } else if out.exists() && !is_empty_dir(&out) {
        if !opts.overwrite {
            return Err(TrainError::OutNotEmpty(out));
        }
        for f in [rundir::ADAPTER, rundir::METRICS, rundir::SUMMARY, rundir::CONFIG] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(out.join(rundir::CHECKPOINTS));
    }
    std::fs::create_dir_all(&out).map_err(|e| io(&out, e))?;
    write_atomic(&out.join(rundir::CONFIG), cfg.to_toml().as_bytes())?;
    let ckpt_dir = out.join(rundir::CHECKPOINTS);

    // The checkpoint to resume from (its shapes decide the adapters' ranks).
    let resume_ck = if opts.resume {
        let step = *checkpoint::list_steps(&ckpt_dir)
            .last()
            .ok_or_else(|| TrainError::NothingToResume(out.clone()))?;
        Some(Checkpoint::load(&checkpoint::step_dir(&ckpt_dir, step))?)
    } else {
        None
    };
    let grit_ck: Option<GritCheckpoint> = match (&resume_ck, is_grit) {
        (Some(ck), true) => {
            Some(serde_json::from_value(ck.state["grit"].clone()).map_err(|e| {
                TrainError::CheckpointMismatch {
                    dir: ckpt_dir.clone(),
                    step: ck.step,
                    msg: format!("state.json: field 'grit': {e}"),
                }
            })?)
        }
        _ => None,
    };

    let mut batcher = data::Batcher::new(&train_ds, cfg.batch_size)?;
    let total_steps = cfg.steps.unwrap_or_else(|| {
        let epochs = cfg.epochs.unwrap_or(1.0);
        ((epochs * batcher.batches_per_epoch() as f64) / cfg.grad_accum as f64).ceil().max(1.0)
            as usize
    });
    // GRIT's first cut as a share of this run's length.
    cfg.grit.resolve_first_cut(total_steps);

    // Backend, frozen weights, adapters, optimizer state.
    let mut backend = Backend::new(BackendOptions { device: cfg.device, n_threads: cfg.threads })?;
    let weights = Weights::load(&file, &backend)?;
    drop(file);
    let targets = cfg.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let lcfg =
        LoraConfig { targets, rank: cfg.rank, alpha: cfg.alpha, rslora: cfg.rslora, layers: None };
    let mut lora = LoraSet::new(&weights, &lcfg, &backend)?;
    lora.init(cfg.seed)?;
    let mut grit: Option<GritRun> = is_grit.then(|| GritRun::new(&cfg.grit, &lora, cfg.rank));
    if let Some(gck) = grit_ck {
        // The checkpoint's per-module ranks; every scale stays that of the initial rank.
        if gck.ranks.len() != lora.modules().len() {
            let msg =
                format!("it has {} modules, this run {}", gck.ranks.len(), lora.modules().len());
            return Err(TrainError::CheckpointMismatch {
                dir: ckpt_dir.clone(),
                step: resume_ck.as_ref().map_or(0, |c| c.step),
                msg,
            });
        }
        let specs: Vec<_> = lora
            .modules()
            .iter()
            .zip(&gck.ranks)
            .map(|(m, &r)| (m.layer, m.target, r, m.scale))
            .collect();
        lora = LoraSet::with_modules(&weights, &specs, &backend)?;
        grit = Some(GritRun::from_checkpoint(&cfg.grit, gck, cfg.rank));
    }
    lora.mark_params();
    let mut opt = OptState::new(&lora, &backend)?;
    let copies = FrozenCopies::build(&weights, cfg.weight_copies, cfg.forward_copy, &backend)?;

    let eval_seqs: Vec<Sequence> = eval_ds.as_ref().map(data::pack).unwrap_or_default();
    if let Some(path) = &opts.dump_tokens {
        let mut b = batcher.clone();
        let n = total_steps * cfg.grad_accum;
        let seqs: Vec<serde_json::Value> = (0..n)
            .flat_map(|_| b.next_batch())
            .map(|s| serde_json::json!({"tokens": s.tokens, "labels": s.labels, "loss_mask": s.loss_mask, "segment": s.segment, "pos": s.pos}))
            .collect();
        let doc = serde_json::json!({"sequences": seqs, "seq_len": cfg.max_seq_len});
        write_atomic(path, doc.to_string().as_bytes())?;
    }
    let pad = tok_eos(&train_ds);

    // Resume: parameters, optimizer state, data position, step.
    let mut start_step = 0usize;
    let mut elapsed_before = 0.0f64;
    let mut eval_initial: Option<f32> = None;
    let mut metrics =
        if let Some(ck) = resume_ck {
            let step = ck.step;
            restore(&ck, &ckpt_dir, &lora, &opt)?;
            let pos: data::DataPosition = serde_json::from_value(ck.state["data"].clone())
                .map_err(|e| TrainError::CheckpointMismatch {
                    dir: ckpt_dir.clone(),
                    step,
                    msg: format!("state.json: field 'data': {e}"),
                })?;
            batcher.restore(pos)?;
            start_step = step;
            elapsed_before = ck.state["elapsed_s"].as_f64().unwrap_or(0.0);
            eval_initial = ck.state["eval_loss_initial"].as_f64().map(|x| x as f32);
            eprintln!("grit: resuming {} from step {step}", out.display());
            MetricsWriter::resume(&out.join(rundir::METRICS), step)
                .map_err(|e| io(&out.join(rundir::METRICS), e))?
        } else {
            MetricsWriter::create(&out.join(rundir::METRICS))
                .map_err(|e| io(&out.join(rundir::METRICS), e))?
        };

    let interrupted = opts.cancel.clone();

    eprintln!(
        "grit: {} · {} modules · {} trainable parameters · {} steps · {} sequences/epoch · weight copies {:?} ({} MiB) · device {}",
        weights.hparams.arch.name(),
        lora.modules().len(),
        lora.n_params(),
        total_steps,
        batcher.sequences_per_epoch(),
        copies.mode(),
        copies.bytes() >> 20,
        backend.label()
    );

    let t_start = Instant::now();
    let mut last_eval: Option<f32> = None;
    // Device bytes of the largest evaluation compute buffer (GPU: the evaluation's own context
    // holds it while the training buffers stay allocated).
    let eval_buffer = std::cell::Cell::new(0usize);
    let evaluate = |backend: &mut Backend,
                    lora: &LoraSet,
                    step: usize,
                    metrics: &mut MetricsWriter|
     -> Result<Option<f32>, TrainError> {
        if eval_seqs.is_empty() {
            return Ok(None);
        }
        // On a GPU the evaluation runs in a backend context and scheduler of its own, dropped
        // with its compute buffer afterwards, and the training context's buffers are left
        // alone. On lavapipe, evaluating in the training backend's context corrupted the host
        // heap during the next training step (tiny and default models, LoRA and GRIT, every
        // run): the step graph made the allocator free the eval-sized buffer while the Vulkan
        // context went on being used; see docs/ENGINE.md.
        let (loss, tokens) = if backend.is_gpu() {
            let mut own =
                Backend::new(BackendOptions { device: cfg.device, n_threads: cfg.threads })?;
            let r = run_eval(
                &mut own,
                &weights,
                lora,
                &eval_seqs,
                cfg.max_seq_len,
                pad,
                cfg.eval_tokens,
            )?;
            eval_buffer.set(eval_buffer.get().max(own.primary_compute_buffer_bytes()));
            r
        } else {
            run_eval(backend, &weights, lora, &eval_seqs, cfg.max_seq_len, pad, cfg.eval_tokens)?
        };
        metrics
            .write(&serde_json::json!({"step": step, "eval_loss": loss, "eval_tokens": tokens}))
            .map_err(|e| io(metrics.path(), e))?;
        Ok(Some(loss))
    };
    if start_step == 0 {
        last_eval = evaluate(&mut backend, &lora, 0, &mut metrics)?;
        eval_initial = last_eval;
        if let Some(l) = last_eval {
            eprintln!("grit: step 0 eval loss {l:.4}");
        }
    }

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:24}] {msg} · ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start_step as u64);

    if opts.profile {
        backend.start_profile(engine::categorize);
    }
    let mut step = start_step;
    let mut losses: Vec<f32> = Vec::new();
    let mut tok_rates: Vec<f64> = Vec::new();
    let mut pending: Option<Batch> = None;
    let mut memory_checked = false;
    // The step being accumulated: micro-batches done, loss sum, tokens, start time.
    let (mut micro, mut loss_sum, mut tokens, mut t0) = (0usize, 0f32, 0usize, Instant::now());
    // GRIT: adapters and optimizer state with new shapes, swapped in at the next shape epoch.
    let mut replacement: Option<grit_run::Replacement> = None;
    let mut first_epoch = true;
    'shapes: while step < total_steps {
        // On a GPU each shape epoch after the first gets a fresh backend context, freed
        // before the buffers the previous epoch computed with (GRIT's replaced adapters and
        // optimizer state, an outgrown compute buffer): see `Backend::renew`.
        if backend.is_gpu() && !first_epoch {
            backend.renew()?;
        }
        first_epoch = false;
        if let Some((l, o)) = replacement.take() {
            lora = l;
            opt = o;
            lora.mark_params();
        }
        let loss_scale = engine::loss_scale(cfg.batch_size * cfg.max_seq_len);
        let opt_ctx = Context::new(engine::opt_capacity(&lora))?;
        let opt_graph = OptGraph::build(
            &opt_ctx,
            &lora,
            &opt,
            &OptOptions {
                n_micro: cfg.grad_accum,
                max_grad_norm: cfg.max_grad_norm,
                precondition: is_grit,
                graft: is_grit && cfg.grit.graft,
                loss_scale,
            },
        );
        // The step graph is rebuilt only when the batch shape (tokens, trained rows) changes.
        let first = pending
            .take()
            .unwrap_or_else(|| make_batch(&batcher.next_batch(), cfg.max_seq_len, pad));
        let key = (first.n_tokens(), first.n_rows());
        let ctx = Context::new(engine::step_capacity(&weights, &lora))?;
        let sg = StepGraph::build_with(
            &ctx,
            &weights,
            &lora,
            &copies,
            &opt,
            key.0,
            key.1,
            StepOptions {
                loss_scale,
                grit: is_grit.then_some(&cfg.grit),
                dropout: cfg.dropout > 0.0,
                recompute: cfg.recompute(),
                fuse_attention: true,
            },
        );
        if !memory_checked {
            memory_checked = true;
            eprintln!(
                "grit: step graph: {} nodes; frozen backward rewritten: {} with persistent copies, {} transient; {} forward matmuls on faster exact splits/copies; {} nodes recomputed in the backward; {} small nodes kept allocated ({:.1} MiB)",
                sg.graph.n_nodes(),
                sg.rewritten.0,
                sg.rewritten.1,
                sg.forward_rewritten,
                sg.recomputed,
                sg.kept.0,
                sg.kept.1 as f64 / (1 << 20) as f64
            );
            if backend.is_gpu() {
                log_cpu_fallback(&backend, &sg.graph);
            }
            drop(backend.compute(&sg.graph)?);
            let compute = backend.compute_buffer_bytes();
            if opts.profile {
                let p = crate::ggml::profile::peak_memory(&sg.graph);
                eprintln!(
                    "grit: profile: peak of live intermediate tensors {} MiB at node {} of {} (inputs/outputs {} MiB); largest:",
                    p.bytes >> 20,
                    p.at_node,
                    sg.graph.n_nodes(),
                    p.pinned_bytes >> 20
                );
                let mut by_op: std::collections::BTreeMap<String, (usize, usize)> =
                    Default::default();
                for (_, op, b) in &p.live {
                    let e = by_op.entry(op.clone()).or_default();
                    e.0 += b;
                    e.1 += 1;
                }
                let mut ops: Vec<_> = by_op.into_iter().collect();
                ops.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
                for (op, (b, k)) in ops.iter().take(12) {
                    eprintln!(
                        "  {op:>16}: {:>6.1} MiB in {k} tensors",
                        *b as f64 / (1 << 20) as f64
                    );
                }
                for (name, op, b) in p.live.iter().take(8) {
                    eprintln!("  {name} ({op}): {:.1} MiB", *b as f64 / (1 << 20) as f64);
                }
            }
            eprintln!(
                "grit: memory: base weights {} MiB, weight copies {} MiB, adapters + optimizer state {} MiB, step compute buffer {} MiB",
                weights.bytes() >> 20,
                copies.bytes() >> 20,
                (4 * lora.n_params() + opt.bytes()) >> 20,
                compute >> 20
            );
            check_memory(&weights, &copies, &lora, &opt, compute)?;
            if let Some(gpu) = backend.gpu() {
                check_device_memory(
                    gpu,
                    &weights,
                    &copies,
                    &lora,
                    &opt,
                    backend.primary_compute_buffer_bytes() + eval_buffer.get(),
                )?;
            }
        }
        let mut next = Some(first);
        loop {
            let batch = next
                .take()
                .unwrap_or_else(|| make_batch(&batcher.next_batch(), cfg.max_seq_len, pad));
            if (batch.n_tokens(), batch.n_rows()) != key {
                pending = Some(batch);
                continue 'shapes;
            }
            {
                let mut run = backend.compute(&sg.graph)?;
                sg.train.set_inputs(&mut run, &batch)?;
                sg.train.set_dropout(
                    &mut run,
                    cfg.dropout,
                    cfg.seed,
                    step as u64 + 1,
                    micro as u64,
                )?;
                sg.set_seeds(&mut run)?;
                let mut n_counted = 0;
                if let (Some(st), Some(g)) = (&sg.stats, &grit) {
                    let (w, n) = crate::grit::stats::token_weights(batch.n_tokens(), &batch.rows);
                    n_counted = n;
                    st.set_weights(&mut run, &w)?;
                    if let Some((reg, _)) = &sg.reg {
                        reg.set(
                            &mut run,
                            crate::grit::schedule::reg_ramp(step + 1, g.cfg.reg_warmup),
                            &g.coeffs,
                        )?;
                    }
                }
                run.run()?;
                if let (Some(st), Some(g)) = (&sg.stats, &mut grit) {
                    if g.schedule.kfac_due(step + 1, &g.cfg) {
                        g.accumulate(&st.read(&run)?, n_counted);
                    }
                }
                let l = run.read_f32(sg.train.loss.expect("loss"))?[0];
                if !l.is_finite() {
                    return Err(TrainError::NonFinite { step: step + 1, loss: l });
                }
                loss_sum += l;
                tokens += batch.tokens.len();
                micro += 1;
            }
            if micro < cfg.grad_accum {
                continue;
            }

            // Optimizer step: mean gradient, clipping, AdamW (one graph).
            let loss = loss_sum / cfg.grad_accum as f32;
            let lr = lr_at(cfg.lr_schedule, cfg.lr, cfg.warmup, step, total_steps);
            let adam = AdamStep {
                lr,
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
                t: step as u64 + 1,
            };
            if let Some(g) = &mut grit {
                if g.schedule.kfac_due(step + 1, &g.cfg) {
                    g.commit();
                }
            }
            let grad_norm = {
                let mut run = backend.compute(&opt_graph.graph)?;
                if let (Some(pi), Some(g)) = (&opt_graph.precond, &grit) {
                    pi.set(&mut run, &g.step_precond(step + 1))?;
                }
                run.write_f32(opt_graph.adamw, &adam.params())?;
                run.write_f32(opt_graph.max_norm, &[cfg.max_grad_norm])?;
                run.run()?;
                run.read_f32(opt_graph.norm)?[0]
            };
            opt.zero_grads()?;
            step += 1;
            let dt = t0.elapsed().as_secs_f64();
            let tps = tokens as f64 / dt;
            losses.push(loss);
            tok_rates.push(tps);
            let elapsed = elapsed_before + t_start.elapsed().as_secs_f64();
            metrics
                .write(&serde_json::json!({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tps, "elapsed_s": elapsed}))
                .map_err(|e| io(metrics.path(), e))?;
            bar.set_message(format!(
                "loss {loss:.4} · lr {lr:.2e} · {tps:.0} tok/s · {} MiB",
                rss_bytes() >> 20
            ));
            bar.set_position(step as u64);

            // GRIT events after the step: inversion, reprojection (new shapes: swapped in below).
            if let Some(g) = &mut grit {
                g.schedule.record_loss(loss as f64);
                if g.schedule.invert_due(step) {
                    let row = g.invert(step);
                    metrics.write(&row).map_err(|e| io(metrics.path(), e))?;
                }
                if g.schedule.reproject_due(step, &g.cfg) {
                    let (row, new) = g.reproject(step, &weights, &lora, &opt, &backend)?;
                    log_line(
                        &bar,
                        format!(
                            "step {step}: reprojection: {} modules cut, {} trainable parameters",
                            row["modules_cut"], row["trainable_params"]
                        ),
                    );
                    metrics.write(&row).map_err(|e| io(metrics.path(), e))?;
                    replacement = new;
                }
            }
            let (cur_lora, cur_opt) = match &replacement {
                Some((l, o)) => (l, o),
                None => (&lora, &opt),
            };

            let is_last = step == total_steps;
            if (cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every)) || is_last {
                last_eval = evaluate(&mut backend, cur_lora, step, &mut metrics)?;
                if let Some(l) = last_eval {
                    log_line(&bar, format!("step {step}: eval loss {l:.4}"));
                }
            }
            let stop_here = opts.stop_after == Some(step) && !is_last;
            let ctrl_c = interrupted.load(Ordering::SeqCst) && !is_last;
            if (cfg.save_every > 0 && step.is_multiple_of(cfg.save_every) && !is_last)
                || stop_here
                || ctrl_c
            {
                let mut state = serde_json::json!({
                    "data": batcher.position(),
                    "elapsed_s": elapsed,
                    "eval_loss_initial": eval_initial,
                    "total_steps": total_steps,
                });
                if let Some(g) = &grit {
                    state["grit"] = serde_json::to_value(g.checkpoint(cur_lora))
                        .map_err(|e| io(&ckpt_dir, e))?;
                }
                let dir = snapshot(step, cur_lora, cur_opt, state).save(&ckpt_dir)?;
                if let Some(k) = cfg.keep_checkpoints {
                    checkpoint::prune(&ckpt_dir, k)?;
                }
                if stop_here || ctrl_c {
                    bar.abandon();
                    return Err(TrainError::Interrupted { step, dir, out });
                }
            }
            (micro, loss_sum, tokens, t0) = (0, 0.0, 0, Instant::now());
            if is_last {
                break 'shapes;
            }
            if replacement.is_some() {
                continue 'shapes;
            }
        }
    }
    bar.finish_and_clear();
    if let Some(p) = backend.profile() {
        let n = (step - start_step).max(1) as f64;
        eprintln!(
            "where the time of {} steps went (per step: {:.3} s; evaluation included):\n{}",
            step - start_step,
            p.total_s / n,
            p.table()
        );
    }

    if let Some((l, o)) = replacement.take() {
        lora = l;
        opt = o;
    }
    drop(opt);

    // Adapter, summary. GRIT's scales are those of the initial rank (not alpha/r of the
    // current rank), so they are folded into B.
    // The adapter file carries provenance (base name/sha256, method, hyper-parameters) and
    // reproduces every module's scale exactly (see crate::adapter).
    let method = if is_grit { "grit" } else { "lora" };
    let prov = crate::adapter::Provenance::for_base(&model_path, method, Some(cfg.to_toml()))
        .map_err(|e| io(&model_path, e))?;
    crate::adapter::Adapter::from_lora_set(&lora, weights.hparams.arch.name(), prov)
        .and_then(|a| a.write_gguf(&out.join(rundir::ADAPTER), crate::adapter::AdapterDtype::F32))
        .map_err(|e| io(&out.join(rundir::ADAPTER), e))?;

    let mut drift_per_module = std::collections::BTreeMap::new();
    for (i, m) in lora.modules().iter().enumerate() {
        drift_per_module.insert(m.base_name(), grit_run::drift(&lora, i)?);
    }
    let drift_total = drift_per_module.values().map(|d| d * d).sum::<f64>().sqrt();
    let tail = &losses[losses.len().saturating_sub(10)..];
    let mut rates = tok_rates.clone();
    rates.sort_by(f64::total_cmp);
    let summary = Summary {
        method: cfg.method,
        base_model: model_path.display().to_string(),
        targets: cfg.targets.clone(),
        rank_per_module: lora.modules().iter().map(|m| (m.base_name(), m.rank)).collect(),
        trainable_params: lora.n_params(),
        steps: step,
        train_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f32>() / tail.len() as f32),
        eval_loss: last_eval,
        eval_loss_initial: eval_initial,
        tokens_per_s: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
        peak_rss_bytes: peak_rss_bytes(),
        wall_s: elapsed_before + t_start.elapsed().as_secs_f64(),
        weight_copies: cfg.weight_copies,
        trainable_params_initial: grit.as_ref().map(|g| g.params_initial),
        trainable_params_final: grit.as_ref().map(|_| lora.n_params()),
        inversions: grit.as_ref().map(|g| g.schedule.inversions),
        reprojections: grit.as_ref().map(|g| g.schedule.reprojections),
        drift_per_module,
        drift_total,
    };
    summary.write(&out)?;
    Ok(Outcome::Trained(summary))
}

/// A log line above the progress bar, or plainly on stderr when the bar is hidden (not a
/// terminal), so logs keep the evaluations.
fn log_line(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("grit: {line}");
    } else {
        bar.println(line);
    }
}

fn tok_eos(ds: &Dataset) -> i32 {
    ds.eos
}

/// Refuses to start when the run would not fit in available memory.
/// Bytes a run holds while it trains: base weights, weight copies, adapters with optimizer
/// state, and the step's compute buffer.
fn run_bytes(
    weights: &Weights,
    copies: &FrozenCopies,
    lora: &LoraSet,
    opt: &OptState,
    compute: usize,
) -> u64 {
    (weights.bytes() + copies.bytes() + 4 * lora.n_params() + opt.bytes() + compute) as u64
}

fn check_memory(
    weights: &Weights,
    copies: &FrozenCopies,
    lora: &LoraSet,
    opt: &OptState,
    compute: usize,
) -> Result<(), TrainError> {
    let need = run_bytes(weights, copies, lora, opt, compute);
    let Some(avail) = mem_available_bytes() else {
        return Ok(());
    };
    // What is already resident counts as available to us.
    let avail = avail + rss_bytes();
    if need > avail {
        let hint = if copies.bytes() > 0 {
            "lower --max-seq-len or --batch-size, or use --weight-copies none".to_string()
        } else {
            "lower --max-seq-len or --batch-size".to_string()
        };
        return Err(TrainError::Memory { need_mib: need >> 20, avail_mib: avail >> 20, hint });
    }
    Ok(())
}

/// Says which ops of `graph` the GPU backend lacks (ggml's scheduler runs them on the CPU,
/// with copies between the devices around each), or that every node runs on the GPU.
fn log_cpu_fallback(backend: &Backend, graph: &crate::ggml::Graph<'_>) {
    let nodes = backend.cpu_fallback_nodes(graph);
    if nodes.is_empty() {
        eprintln!("grit: every node of the step graph runs on {}", backend.name());
        return;
    }
    let mut by_op: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (op, _) in &nodes {
        *by_op.entry(op).or_default() += 1;
    }
    let ops: Vec<String> = by_op.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
    eprintln!(
        "grit: {} step-graph nodes run on the CPU ({} lacks them): {}",
        nodes.len(),
        backend.name(),
        ops.join(", ")
    );
}

/// Refuses to start when the run would not fit in the GPU's memory (as free when grit
/// started): base weights, weight copies, adapters with optimizer state, the GPU's share of
/// the step's compute buffer and the evaluation's compute buffer all live there.
fn check_device_memory(
    gpu: &crate::ggml::DeviceInfo,
    weights: &Weights,
    copies: &FrozenCopies,
    lora: &LoraSet,
    opt: &OptState,
    compute: usize,
) -> Result<(), TrainError> {
    let need = run_bytes(weights, copies, lora, opt, compute);
    let avail = gpu.memory_free as u64;
    eprintln!(
        "grit: device memory: {} MiB needed of {} MiB free on {}",
        need >> 20,
        avail >> 20,
        gpu.name
    );
    if avail > 0 && need > avail {
        let mut hint = String::from("lower --max-seq-len or --batch-size");
        if copies.bytes() > 0 {
            hint.push_str(", use --weight-copies none (dequantized per layer in the backward)");
        }
        hint.push_str(&format!(
            ", or train with --device cpu (weights {} MiB, copies {} MiB, step and eval compute buffers {} MiB)",
            weights.bytes() >> 20,
            copies.bytes() >> 20,
            compute >> 20
        ));
        return Err(TrainError::DeviceMemory {
            device: gpu.name.clone(),
            need_mib: need >> 20,
            avail_mib: avail >> 20,
            hint,
        });
    }
    Ok(())
}

/// Mean loss over the eval sequences (weighted by trained rows), reading at most
/// `max_tokens` tokens (at least one sequence).
fn run_eval(
    backend: &mut Backend,
    weights: &Weights,
    lora: &LoraSet,
    seqs: &[Sequence],
    seq_len: usize,
    pad: i32,
    max_tokens: usize,
) -> Result<(f32, usize), TrainError> {
    let mut total = 0f64;
    let mut rows = 0usize;
    let mut tokens = 0usize;
    let mut batches = Vec::new();
    for s in seqs {
        if tokens > 0 && tokens + s.len() > max_tokens {
            break;
        }
        let batch = make_batch(std::slice::from_ref(s), seq_len, pad);
        if batch.n_rows() > 0 {
            tokens += s.len();
            batches.push(batch);
        }
    }
    // One graph per run of batches with the same number of trained rows.
    let mut i = 0;
    while i < batches.len() {
        let n_rows = batches[i].n_rows();
        let ctx = Context::new(engine::eval_capacity(weights, lora))?;
        let g = TrainGraph::build(
            &ctx,
            weights,
            Some(lora),
            batches[i].n_tokens(),
            Outputs::Rows(n_rows),
            true,
        );
        while i < batches.len() && batches[i].n_rows() == n_rows {
            let l = engine::eval_batch(backend, &g, &batches[i])?;
            total += l as f64 * n_rows as f64;
            rows += n_rows;
            i += 1;
        }
    }
    Ok(((total / rows.max(1) as f64) as f32, tokens))
}

/// A checkpoint of the current parameters and optimizer state.
fn snapshot(step: usize, lora: &LoraSet, opt: &OptState, state: serde_json::Value) -> Checkpoint {
    let mut tensors = Vec::new();
    for (i, m) in lora.modules().iter().enumerate() {
        let base = m.base_name();
        let a_shape = vec![m.rank, m.d_in];
        let b_shape = vec![m.d_out, m.rank];
        tensors.push(NamedTensor {
            name: format!("{base}.lora_a"),
            shape: a_shape.clone(),
            data: lora.read_a(i).unwrap_or_default(),
        });
        tensors.push(NamedTensor {
            name: format!("{base}.lora_b"),
            shape: b_shape.clone(),
            data: lora.read_b(i).unwrap_or_default(),
        });
        for (k, name) in SLOT_NAMES.iter().enumerate() {
            let shape = if k < 3 { a_shape.clone() } else { b_shape.clone() };
            tensors.push(NamedTensor {
                name: format!("{base}.{name}"),
                shape,
                data: opt.read(i, k).unwrap_or_default(),
            });
        }
    }
    Checkpoint { step, tensors, state }
}

/// Restores parameters and optimizer state from a checkpoint (shapes are checked).
fn restore(ck: &Checkpoint, dir: &Path, lora: &LoraSet, opt: &OptState) -> Result<(), TrainError> {
    let mismatch =
        |msg: String| TrainError::CheckpointMismatch { dir: dir.to_path_buf(), step: ck.step, msg };
    let get = |name: String, len: usize| -> Result<&Vec<f32>, TrainError> {
        let t = ck.tensor(&name).ok_or_else(|| mismatch(format!("tensor '{name}' is missing")))?;
        if t.data.len() != len {
            return Err(mismatch(format!("tensor '{name}' has {} values, this run needs {len} (another rank or target list?)", t.data.len())));
        }
        Ok(&t.data)
    };
    for (i, m) in lora.modules().iter().enumerate() {
        let base = m.base_name();
        let (na, nb) = (m.rank * m.d_in, m.rank * m.d_out);
        lora.write_a(i, get(format!("{base}.lora_a"), na)?)?;
        lora.write_b(i, get(format!("{base}.lora_b"), nb)?)?;
        for (k, name) in SLOT_NAMES.iter().enumerate() {
            let n = if k < 3 { na } else { nb };
            opt.write(i, k, get(format!("{base}.{name}"), n)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_block_diagonal_with_trained_rows() {
        let s = Sequence {
            tokens: vec![5, 6, 7],
            labels: vec![6, 7, 2],
            loss_mask: vec![1.0, 1.0, 0.0],
            segment: vec![0, 0, 0],
            pos: vec![0, 1, 2],
        };
        let t = Sequence {
            tokens: vec![8, 9],
            labels: vec![9, 2],
            loss_mask: vec![1.0, 0.0],
            segment: vec![0, 0],
            pos: vec![0, 1],
        };
        let b = make_batch(&[s, t], 4, 0);
        assert_eq!(b.tokens, vec![5, 6, 7, 0, 8, 9, 0, 0]);
        assert_eq!(b.positions, vec![0, 1, 2, 0, 0, 1, 0, 1]);
        assert_eq!(b.rows, vec![0, 1, 4]);
        assert_eq!(b.labels, vec![6, 7, 9]);
        let n = 8;
        let ok = |q: usize, k: usize| b.mask[q * n + k] == 0.0;
        assert!(ok(2, 0) && !ok(0, 2), "causal inside the first sequence");
        assert!(!ok(4, 2) && !ok(4, 3), "the second sequence cannot see the first");
        assert!(ok(5, 4) && ok(3, 3) && !ok(3, 2), "padding is its own segment");
        b.validate(Some(10)).unwrap();
    }
}
