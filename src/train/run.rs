//! `grit train`: a [`Trainer`] driven through named phases.
//!
//! [`train`] reads the inputs ([`Inputs::load`]: model file, tokenizer, data; a dry run stops
//! there), prepares the run ([`Trainer::prepare`]: output folder, checkpoint to resume from,
//! backend, frozen weights, adapters, optimizer state, metrics), runs it ([`Trainer::run`])
//! and writes the adapter and summary ([`Trainer::finish`]).
//!
//! A run is a sequence of *shape epochs*: the step graph and the optimizer graph are built for
//! one batch shape and one set of adapter shapes, and rebuilt when either changes (a batch
//! with another token or trained-row count; GRIT's reprojection swapping in adapters of new
//! ranks). Inside an epoch every optimizer step is [`Trainer::micro_step`] × `--grad-accum`,
//! then [`Trainer::optimizer_step`], then [`Trainer::after_step`] (GRIT's events, evaluation,
//! checkpoint). The frozen weights ([`Frozen`]) and the current adapters ([`Params`]) live
//! outside the trainer because the graphs borrow them for the epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{self, DataConfig, Dataset, Sequence};
use crate::ggml::{Backend, BackendOptions, Context};
use crate::gguf::GgufFile;
use crate::model::{Arch, Batch, LoraConfig, LoraSet, ModelError, Target, Weights};
use crate::rundir::{self, EvalRow, MetricsRow, MetricsWriter, StepRow};

use super::batch::{make_batch, run_eval};
use super::checkpoint::{self, Checkpoint, LoopState, NamedTensor};
use super::config::{ConfigError, Method, TrainConfig};
use super::copies::FrozenCopies;
use super::engine::{
    self, AdamStep, OptGraph, OptOptions, OptState, StepGraph, StepOptions, SLOT_NAMES,
};
use super::grit_run::{self, GritRun};
use super::memory;
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
    #[error(transparent)]
    Adapter(#[from] crate::adapter::AdapterError),
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot encode: {source}", .path.display())]
    Encode { path: PathBuf, source: serde_json::Error },
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

/// Runs a training job as configured.
pub fn train(mut cfg: TrainConfig, opts: RunOptions) -> Result<Outcome, TrainError> {
    cfg.validate()?;
    let inputs = Inputs::load(&mut cfg)?;
    if opts.dry_run {
        return Ok(Outcome::DryRun {
            train: inputs.train.stats.clone(),
            eval: inputs.eval.map(|e| e.stats),
        });
    }
    let (mut trainer, frozen, params) = Trainer::prepare(cfg, opts, inputs)?;
    let params = trainer.run(&frozen, params)?;
    trainer.finish(&frozen, params).map(Outcome::Trained)
}

/// What a run reads before anything is built: the model file and the tokenized data.
struct Inputs {
    model_path: PathBuf,
    file: GgufFile,
    train: Dataset,
    eval: Option<Dataset>,
}

impl Inputs {
    /// Opens the model (the default one when `cfg.model` is unset, which it then names),
    /// refuses an untrainable architecture before the data is read, and loads the training
    /// and evaluation data with the model's tokenizer.
    fn load(cfg: &mut TrainConfig) -> Result<Inputs, TrainError> {
        let data_path = cfg.data.clone().ok_or(TrainError::NoData)?;
        let model_path = match &cfg.model {
            Some(p) => p.clone(),
            None => crate::fetch::ensure_default_model()?,
        };
        cfg.model = Some(model_path.clone());
        let file = GgufFile::open(&model_path)?;
        Arch::parse(&file.architecture()?)?;
        // Vocabulary only: the weights are loaded by grit. The file is read once.
        file.check_for_llama()?;
        let tok = crate::infer::Model::load_vocab_of(&file)?;
        let dcfg = DataConfig {
            max_seq_len: cfg.max_seq_len,
            train_on_prompt: cfg.train_on_prompt,
            skip_bad_rows: cfg.skip_bad_rows,
            seed: cfg.seed,
            pack: true,
        };
        let train = data::load_file(&data_path, &tok, &dcfg)?;
        let (train, eval) = match (&cfg.eval_data, cfg.eval_split > 0.0) {
            (Some(p), _) => (train, Some(data::load_file(p, &tok, &dcfg)?)),
            (None, true) => {
                let (t, e) = data::split_eval(train, cfg.eval_split, cfg.seed)?;
                (t, Some(e))
            }
            (None, false) => (train, None),
        };
        Ok(Inputs { model_path, file, train, eval })
    }
}

/// What stays fixed for the whole run: the quantized base weights and their copies.
pub struct Frozen {
    pub weights: Weights,
    pub copies: FrozenCopies,
}

/// The trainable adapters and their optimizer state (replaced when GRIT changes ranks).
pub struct Params {
    pub lora: LoraSet,
    pub opt: OptState,
}

/// The optimizer step being accumulated from micro-batches.
struct Accum {
    micro: usize,
    loss_sum: f32,
    tokens: usize,
    t0: Instant,
}

impl Accum {
    fn new() -> Self {
        Accum { micro: 0, loss_sum: 0.0, tokens: 0, t0: Instant::now() }
    }
}

/// How a shape epoch ended.
enum EpochEnd {
    /// The next batch or the adapters have other shapes: build new graphs.
    Reshape,
    /// The last step is done.
    Done,
}

/// The mutable state of a run between its phases.
pub struct Trainer {
    cfg: TrainConfig,
    opts: RunOptions,
    model_path: PathBuf,
    ckpt_dir: PathBuf,
    backend: Backend,
    grit: Option<GritRun>,
    /// GRIT: adapters of new ranks, swapped in at the next shape epoch.
    replacement: Option<Params>,
    batcher: data::Batcher,
    /// A batch drawn that did not fit the last epoch's graphs.
    pending: Option<Batch>,
    pad: i32,
    eval_seqs: Vec<Sequence>,
    /// Device bytes of the largest evaluation compute buffer (GPU: the evaluation's own
    /// context holds it while the training buffers stay allocated).
    eval_buffer: usize,
    metrics: MetricsWriter,
    bar: ProgressBar,
    total_steps: usize,
    start_step: usize,
    step: usize,
    accum: Accum,
    epochs: usize,
    t_start: Instant,
    elapsed_before: f64,
    eval_initial: Option<f32>,
    last_eval: Option<f32>,
    losses: Vec<f32>,
    tok_rates: Vec<f64>,
}

/// The last checkpoint in the run folder `out`.
fn latest_checkpoint(out: &Path, ckpt_dir: &Path) -> Result<Checkpoint, TrainError> {
    let step = *checkpoint::list_steps(ckpt_dir)
        .last()
        .ok_or_else(|| TrainError::NothingToResume(out.to_path_buf()))?;
    Ok(Checkpoint::load(&checkpoint::step_dir(ckpt_dir, step))?)
}

/// The run's optimizer steps: `--steps`, else `--epochs` (default 1) of micro-batches.
fn run_length(cfg: &TrainConfig, batcher: &data::Batcher) -> usize {
    cfg.steps.unwrap_or_else(|| {
        let epochs = cfg.epochs.unwrap_or(1.0);
        let micro = epochs * batcher.batches_per_epoch() as f64;
        (micro / cfg.grad_accum as f64).ceil().max(1.0) as usize
    })
}

/// Where the frozen weights' copies and the step run, for the start line.
fn placement(copies: &FrozenCopies, backend: &Backend) -> String {
    format!(
        "weight copies {:?} ({} MiB) · device {}",
        copies.mode(),
        copies.bytes() >> 20,
        backend.label()
    )
}

impl Trainer {
    /// Output folder, the checkpoint to resume from, backend, frozen weights, adapters (at
    /// the checkpoint's ranks), optimizer state, metrics; restores a resumed run's state and
    /// evaluates step 0 of a new one.
    fn prepare(
        mut cfg: TrainConfig,
        opts: RunOptions,
        inputs: Inputs,
    ) -> Result<(Trainer, Frozen, Params), TrainError> {
        let Inputs { model_path, file, train: train_ds, eval: eval_ds } = inputs;
        let out = opts.out.clone();
        prepare_out_dir(&opts)?;
        crate::fetch::write_atomic(&out.join(rundir::CONFIG), cfg.to_toml().as_bytes())?;
        let ckpt_dir = out.join(rundir::CHECKPOINTS);
        // The checkpoint to resume from (its shapes decide the adapters' ranks).
        let resume = if opts.resume { Some(latest_checkpoint(&out, &ckpt_dir)?) } else { None };

        let mut batcher = data::Batcher::new(&train_ds, cfg.batch_size)?;
        let total_steps = run_length(&cfg, &batcher);
        // GRIT's first cut as a share of this run's length.
        cfg.grit.resolve_first_cut(total_steps);

        let backend = Backend::new(BackendOptions { device: cfg.device, n_threads: cfg.threads })?;
        let weights = Weights::load(&file, &backend)?;
        weights.check_sequence_length(cfg.max_seq_len)?;
        drop(file);
        let (lora, grit) = build_adapters(&cfg, &weights, &backend, resume.as_ref(), &ckpt_dir)?;
        let opt = OptState::new(&lora, &backend)?;
        let copies = FrozenCopies::build(&weights, cfg.weight_copies, cfg.forward_copy, &backend)?;
        if let Some(path) = &opts.dump_tokens {
            dump_tokens(path, &batcher, total_steps * cfg.grad_accum, cfg.max_seq_len)?;
        }

        // Resume: parameters, optimizer state, data position, step.
        let (mut start_step, mut elapsed_before, mut eval_initial) = (0, 0.0, None);
        let metrics = if let Some(ck) = &resume {
            restore(ck, &ckpt_dir, &lora, &opt)?;
            batcher.restore(ck.state.data)?;
            start_step = ck.step;
            elapsed_before = ck.state.elapsed_s;
            eval_initial = ck.state.eval_loss_initial;
            eprintln!("grit: resuming {} from step {start_step}", out.display());
            MetricsWriter::resume(&out, start_step)?
        } else {
            MetricsWriter::create(&out)?
        };
        eprintln!(
            "grit: {} · {} modules · {} trainable parameters · {} steps · {} sequences/epoch · {}",
            weights.hparams.arch.name(),
            lora.modules().len(),
            lora.n_params(),
            total_steps,
            batcher.sequences_per_epoch(),
            placement(&copies, &backend)
        );
        let mut trainer = Trainer {
            opts,
            model_path,
            ckpt_dir,
            backend,
            grit,
            replacement: None,
            batcher,
            pending: None,
            pad: train_ds.eos,
            eval_seqs: eval_ds.as_ref().map(data::pack).unwrap_or_default(),
            eval_buffer: 0,
            metrics,
            bar: progress_bar(total_steps, start_step),
            total_steps,
            start_step,
            step: start_step,
            accum: Accum::new(),
            epochs: 0,
            t_start: Instant::now(),
            elapsed_before,
            eval_initial,
            last_eval: None,
            losses: Vec::new(),
            tok_rates: Vec::new(),
            cfg,
        };
        let frozen = Frozen { weights, copies };
        if start_step == 0 {
            trainer.last_eval = trainer.evaluate(&frozen.weights, &lora, 0)?;
            trainer.eval_initial = trainer.last_eval;
            if let Some(l) = trainer.last_eval {
                eprintln!("grit: step 0 eval loss {l:.4}");
            }
        }
        trainer.bar.reset_elapsed();
        Ok((trainer, frozen, Params { lora, opt }))
    }

    /// Trains to the last step, one shape epoch after another; returns the final adapters.
    fn run(&mut self, frozen: &Frozen, mut params: Params) -> Result<Params, TrainError> {
        if self.opts.profile {
            self.backend.start_profile(engine::categorize);
        }
        while self.step < self.total_steps {
            if let Some(p) = self.replacement.take() {
                params = p;
                params.lora.mark_params();
            }
            if let EpochEnd::Done = self.shape_epoch(frozen, &params)? {
                break;
            }
        }
        self.bar.finish_and_clear();
        if let Some(p) = self.backend.profile() {
            let n = self.step - self.start_step;
            eprintln!(
                "where the time of {n} steps went (per step: {:.3} s; evaluation included):\n{}",
                p.total_s / n.max(1) as f64,
                p.table()
            );
        }
        Ok(self.replacement.take().unwrap_or(params))
    }

    /// Builds the graphs for the next batch's shape and the current adapters and trains with
    /// them until a shape changes or the run ends.
    fn shape_epoch(&mut self, frozen: &Frozen, params: &Params) -> Result<EpochEnd, TrainError> {
        // On a GPU each shape epoch after the first gets a fresh backend context, freed before
        // the buffers the previous epoch computed with (GRIT's replaced adapters and optimizer
        // state, an outgrown compute buffer): see `Backend::renew`.
        if self.backend.is_gpu() && self.epochs > 0 {
            self.backend.renew()?;
        }
        // The step graph is rebuilt only when the batch shape (tokens, trained rows) changes.
        let first = match self.pending.take() {
            Some(b) => b,
            None => self.next_batch(),
        };
        let shape = (first.n_tokens(), first.n_rows());
        let (cfg, is_grit) = (&self.cfg, self.cfg.method == Method::Grit);
        let loss_scale = engine::loss_scale(cfg.batch_size * cfg.max_seq_len);
        let opt_ctx = Context::new(engine::opt_capacity(&params.lora))?;
        let opt_options = OptOptions {
            n_micro: cfg.grad_accum,
            max_grad_norm: cfg.max_grad_norm,
            precondition: is_grit,
            graft: is_grit && cfg.grit.graft,
            loss_scale,
        };
        let opt_graph = OptGraph::build(&opt_ctx, &params.lora, &params.opt, &opt_options);
        let ctx = Context::new(engine::step_capacity(&frozen.weights, &params.lora))?;
        let step_options = StepOptions {
            loss_scale,
            grit: is_grit.then_some(&cfg.grit),
            dropout: cfg.dropout > 0.0,
            recompute: cfg.recompute(),
            fuse_attention: true,
        };
        let sg = StepGraph::build(
            &ctx,
            &frozen.weights,
            &params.lora,
            &frozen.copies,
            &params.opt,
            shape.0,
            shape.1,
            step_options,
        );
        if self.epochs == 0 {
            self.check_first_graph(frozen, params, &sg)?;
        }
        self.epochs += 1;
        let mut next = Some(first);
        loop {
            let batch = match next.take() {
                Some(b) => b,
                None => self.next_batch(),
            };
            if (batch.n_tokens(), batch.n_rows()) != shape {
                self.pending = Some(batch);
                return Ok(EpochEnd::Reshape);
            }
            self.micro_step(&sg, &batch)?;
            if self.accum.micro < self.cfg.grad_accum {
                continue;
            }
            let loss = self.optimizer_step(&opt_graph)?;
            self.after_step(frozen, params, loss)?;
            if self.step == self.total_steps {
                return Ok(EpochEnd::Done);
            }
            if self.replacement.is_some() {
                return Ok(EpochEnd::Reshape);
            }
        }
    }

    fn next_batch(&mut self) -> Batch {
        make_batch(&self.batcher.next_batch(), self.cfg.max_seq_len, self.pad)
    }

    /// Once, on the first step graph: its size and rewrites, the GPU's CPU fallbacks, the
    /// compute buffer (allocated by one empty compute), `--profile`'s tensor peak, and whether
    /// the run fits in host and device memory.
    fn check_first_graph(
        &mut self,
        frozen: &Frozen,
        params: &Params,
        sg: &StepGraph<'_>,
    ) -> Result<(), TrainError> {
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
        if self.backend.is_gpu() {
            memory::log_cpu_fallback(&self.backend, &sg.graph);
        }
        drop(self.backend.compute(&sg.graph)?);
        let compute = self.backend.compute_buffer_bytes();
        if self.opts.profile {
            memory::print_live_tensor_peak(&sg.graph);
        }
        let (w, c, lora, opt) = (&frozen.weights, &frozen.copies, &params.lora, &params.opt);
        let mut f = memory::Footprint::of(w, c, lora, opt, compute);
        eprintln!(
            "grit: memory: base weights {} MiB, weight copies {} MiB, adapters + optimizer state {} MiB, step compute buffer {} MiB",
            f.weights >> 20,
            f.copies >> 20,
            f.adapters >> 20,
            f.compute >> 20
        );
        memory::check_memory(&f)?;
        if let Some(gpu) = self.backend.gpu() {
            f.compute = self.backend.primary_compute_buffer_bytes() + self.eval_buffer;
            memory::check_device_memory(gpu, &f)?;
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch: gradients accumulate in the optimizer state,
    /// GRIT's statistics in its host state.
    fn micro_step(&mut self, sg: &StepGraph<'_>, batch: &Batch) -> Result<(), TrainError> {
        let (cfg, step, micro) = (&self.cfg, self.step, self.accum.micro);
        let mut run = self.backend.compute(&sg.graph)?;
        sg.train.set_inputs(&mut run, batch)?;
        sg.train.set_dropout(&mut run, cfg.dropout, cfg.seed, step as u64 + 1, micro as u64)?;
        sg.set_seeds(&mut run)?;
        let mut n_counted = 0;
        if let (Some(st), Some(g)) = (&sg.stats, &self.grit) {
            let (w, n) = crate::grit::stats::token_weights(batch.n_tokens(), &batch.rows);
            n_counted = n;
            st.set_weights(&mut run, &w)?;
            if let Some((reg, _)) = &sg.reg {
                let ramp = crate::grit::schedule::reg_ramp(step + 1, g.cfg.reg_warmup);
                reg.set(&mut run, ramp, &g.coeffs)?;
            }
        }
        run.run()?;
        if let (Some(st), Some(g)) = (&sg.stats, &mut self.grit) {
            if g.schedule.kfac_due(step + 1, &g.cfg) {
                g.accumulate(&st.read(&run)?, n_counted);
            }
        }
        let l = run.read_f32(sg.train.loss.expect("loss"))?[0];
        if !l.is_finite() {
            return Err(TrainError::NonFinite { step: step + 1, loss: l });
        }
        self.accum.loss_sum += l;
        self.accum.tokens += batch.tokens.len();
        self.accum.micro += 1;
        Ok(())
    }

    /// Mean gradient, GRIT's preconditioning, clipping and AdamW (one graph); the step's
    /// metrics row. Returns the step's mean loss.
    fn optimizer_step(&mut self, og: &OptGraph<'_>) -> Result<f32, TrainError> {
        let cfg = &self.cfg;
        let step = self.step;
        let loss = self.accum.loss_sum / cfg.grad_accum as f32;
        let lr = lr_at(cfg.lr_schedule, cfg.lr, cfg.warmup, step, self.total_steps);
        let adam = AdamStep {
            lr,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            t: step as u64 + 1,
        };
        if let Some(g) = &mut self.grit {
            if g.schedule.kfac_due(step + 1, &g.cfg) {
                g.commit();
            }
        }
        let grad_norm = {
            let mut run = self.backend.compute(&og.graph)?;
            if let (Some(pi), Some(g)) = (&og.precond, &self.grit) {
                pi.set(&mut run, &g.step_precond(step + 1))?;
            }
            run.write_f32(og.adamw, &adam.params())?;
            run.write_f32(og.max_norm, &[cfg.max_grad_norm])?;
            run.run()?;
            run.read_f32(og.norm)?[0]
        };
        self.step += 1;
        let tokens = self.accum.tokens;
        let tps = tokens as f64 / self.accum.t0.elapsed().as_secs_f64();
        self.losses.push(loss);
        self.tok_rates.push(tps);
        let row = StepRow {
            elapsed_s: self.elapsed(),
            grad_norm: grad_norm as f64,
            loss: loss as f64,
            lr: lr as f64,
            step: self.step,
            tokens,
            tokens_per_s: tps,
        };
        self.metrics.write(&MetricsRow::Step(row))?;
        self.bar.set_message(format!(
            "loss {loss:.4} · lr {lr:.2e} · {tps:.0} tok/s · {} MiB",
            memory::rss_bytes() >> 20
        ));
        self.bar.set_position(self.step as u64);
        Ok(loss)
    }

    /// Seconds trained so far (across resumes).
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.t_start.elapsed().as_secs_f64()
    }

    /// After an optimizer step: zero the gradients, GRIT's events, evaluation, checkpoint.
    fn after_step(
        &mut self,
        frozen: &Frozen,
        params: &Params,
        loss: f32,
    ) -> Result<(), TrainError> {
        params.opt.zero_grads()?;
        self.grit_events(frozen, params, loss)?;
        // Evaluation and checkpoints see the adapters the next step will train.
        let current = self.replacement.take();
        let cur = current.as_ref().unwrap_or(params);
        let res = self.evaluate_and_save(&frozen.weights, cur);
        self.replacement = current;
        res?;
        self.accum = Accum::new();
        Ok(())
    }

    /// GRIT's events after a step: inversion, then reprojection (adapters of new ranks are
    /// kept in `replacement` and swapped in at the next shape epoch).
    fn grit_events(
        &mut self,
        frozen: &Frozen,
        params: &Params,
        loss: f32,
    ) -> Result<(), TrainError> {
        let Some(g) = &mut self.grit else {
            return Ok(());
        };
        let step = self.step;
        g.schedule.record_loss(loss as f64);
        if g.schedule.invert_due(step) {
            let row = g.invert(step);
            self.metrics.write(&row)?;
        }
        if g.schedule.reproject_due(step, &g.cfg) {
            let (row, new) =
                g.reproject(step, &frozen.weights, &params.lora, &params.opt, &self.backend)?;
            log_line(
                &self.bar,
                format!(
                    "step {step}: reprojection: {} modules cut, {} trainable parameters",
                    row.modules_cut, row.trainable_params
                ),
            );
            self.metrics.write(&MetricsRow::Event(rundir::GritEvent::Reproject(row)))?;
            self.replacement = new.map(|(lora, opt)| Params { lora, opt });
        }
        Ok(())
    }

    /// The evaluation due after this step (every `--eval-every` and at the end), then the
    /// checkpoint due (every `--save-every`, at `stop_after`, on cancellation).
    fn evaluate_and_save(&mut self, weights: &Weights, cur: &Params) -> Result<(), TrainError> {
        let step = self.step;
        let is_last = step == self.total_steps;
        let every = self.cfg.eval_every;
        if (every > 0 && step.is_multiple_of(every)) || is_last {
            self.last_eval = self.evaluate(weights, &cur.lora, step)?;
            if let Some(l) = self.last_eval {
                log_line(&self.bar, format!("step {step}: eval loss {l:.4}"));
            }
        }
        let stop_here = self.opts.stop_after == Some(step) && !is_last;
        let cancelled = self.opts.cancel.load(Ordering::SeqCst) && !is_last;
        let every = self.cfg.save_every;
        if (every > 0 && step.is_multiple_of(every) && !is_last) || stop_here || cancelled {
            let state = LoopState {
                data: self.batcher.position(),
                elapsed_s: self.elapsed(),
                eval_loss_initial: self.eval_initial,
                total_steps: self.total_steps,
                grit: self.grit.as_ref().map(|g| g.checkpoint(&cur.lora)),
            };
            let dir = snapshot(step, cur, state)?.save(&self.ckpt_dir)?;
            if let Some(k) = self.cfg.keep_checkpoints {
                checkpoint::prune(&self.ckpt_dir, k)?;
            }
            if stop_here || cancelled {
                self.bar.abandon();
                let out = self.opts.out.clone();
                return Err(TrainError::Interrupted { step, dir, out });
            }
        }
        Ok(())
    }

    /// The in-training evaluation loss of `lora` after `step` (None without evaluation data),
    /// with its metrics row.
    fn evaluate(
        &mut self,
        weights: &Weights,
        lora: &LoraSet,
        step: usize,
    ) -> Result<Option<f32>, TrainError> {
        if self.eval_seqs.is_empty() {
            return Ok(None);
        }
        let (seqs, seq_len, pad, max) =
            (&self.eval_seqs, self.cfg.max_seq_len, self.pad, self.cfg.eval_tokens);
        // On a GPU the evaluation runs in a backend context and scheduler of its own, dropped
        // with its compute buffer afterwards, and the training context's buffers are left
        // alone. On lavapipe, evaluating in the training backend's context corrupted the host
        // heap during the next training step (tiny and default models, LoRA and GRIT, every
        // run): the step graph made the allocator free the eval-sized buffer while the Vulkan
        // context went on being used; see docs/ENGINE.md.
        let (loss, tokens) = if self.backend.is_gpu() {
            let options = BackendOptions { device: self.cfg.device, n_threads: self.cfg.threads };
            let mut own = Backend::new(options)?;
            let r = run_eval(&mut own, weights, lora, seqs, seq_len, pad, max)?;
            self.eval_buffer = self.eval_buffer.max(own.primary_compute_buffer_bytes());
            r
        } else {
            run_eval(&mut self.backend, weights, lora, seqs, seq_len, pad, max)?
        };
        let row = EvalRow { eval_loss: loss as f64, eval_tokens: tokens, step };
        self.metrics.write(&MetricsRow::Eval(row))?;
        Ok(Some(loss))
    }

    /// Writes the adapter (with provenance) and the summary.
    fn finish(self, frozen: &Frozen, params: Params) -> Result<Summary, TrainError> {
        let Params { lora, opt } = params;
        drop(opt);
        let cfg = &self.cfg;
        let out = &self.opts.out;
        // GRIT's scales are those of the initial rank (not alpha/r of the current rank); the
        // adapter file reproduces every module's scale exactly and carries provenance (base
        // name/sha256, method, hyper-parameters): see crate::adapter.
        let method = if cfg.method == Method::Grit { "grit" } else { "lora" };
        let prov =
            crate::adapter::Provenance::for_base(&self.model_path, method, Some(cfg.to_toml()))?;
        let arch = frozen.weights.hparams.arch.name();
        crate::adapter::Adapter::from_lora_set(&lora, arch, prov)?
            .write_gguf(&out.join(rundir::ADAPTER), crate::adapter::AdapterDtype::F32)?;

        let mut drift_per_module = std::collections::BTreeMap::new();
        for (i, m) in lora.modules().iter().enumerate() {
            drift_per_module.insert(m.base_name(), grit_run::drift(&lora, i)?);
        }
        let drift_total = drift_per_module.values().map(|d| d * d).sum::<f64>().sqrt();
        let tail = &self.losses[self.losses.len().saturating_sub(10)..];
        let mut rates = self.tok_rates.clone();
        rates.sort_by(f64::total_cmp);
        let grit = self.grit.as_ref();
        let summary = Summary {
            method: cfg.method,
            base_model: self.model_path.display().to_string(),
            targets: adapted_targets(&lora),
            rank_per_module: lora.modules().iter().map(|m| (m.base_name(), m.rank)).collect(),
            trainable_params: lora.n_params(),
            steps: self.step,
            train_loss: (!tail.is_empty()).then(|| tail.iter().sum::<f32>() / tail.len() as f32),
            eval_loss: self.last_eval,
            eval_loss_initial: self.eval_initial,
            tokens_per_s: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            peak_rss_bytes: memory::peak_rss_bytes(),
            wall_s: self.elapsed(),
            weight_copies: cfg.weight_copies,
            trainable_params_initial: grit.map(|g| g.params_initial),
            trainable_params_final: grit.map(|_| lora.n_params()),
            inversions: grit.map(|g| g.schedule.inversions),
            reprojections: grit.map(|g| g.schedule.reprojections),
            drift_per_module,
            drift_total,
        };
        summary.write(out)?;
        Ok(summary)
    }
}

/// Makes `opts.out` ready: a resumed run needs its configuration there; a new run needs an
/// empty or absent folder, or `--overwrite` (which removes the previous run's files).
fn prepare_out_dir(opts: &RunOptions) -> Result<(), TrainError> {
    let out = &opts.out;
    if opts.resume {
        if !out.join(rundir::CONFIG).is_file() {
            return Err(TrainError::NothingToResume(out.clone()));
        }
    } else if out.exists() && !is_empty_dir(out) {
        if !opts.overwrite {
            return Err(TrainError::OutNotEmpty(out.clone()));
        }
        for f in [rundir::ADAPTER, rundir::METRICS, rundir::SUMMARY, rundir::CONFIG] {
            let _ = std::fs::remove_file(out.join(f));
        }
        let _ = std::fs::remove_dir_all(out.join(rundir::CHECKPOINTS));
    }
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io { path: out.clone(), source })
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

/// The targets a run adapted, in graph order: the requested ones as the model has them (its
/// fused tensors where it fuses them).
fn adapted_targets(lora: &LoraSet) -> Vec<String> {
    let set: std::collections::BTreeSet<Target> = lora.modules().iter().map(|m| m.target).collect();
    set.into_iter().map(|t| t.name().to_string()).collect()
}

/// The adapters a run starts from (every module at `--rank`, initialized from the seed, or
/// at a resumed GRIT checkpoint's ranks; every scale stays that of the initial rank) and
/// GRIT's host state.
fn build_adapters(
    cfg: &TrainConfig,
    weights: &Weights,
    backend: &Backend,
    resume: Option<&Checkpoint>,
    ckpt_dir: &Path,
) -> Result<(LoraSet, Option<GritRun>), TrainError> {
    let targets = cfg.targets.iter().map(|t| Target::parse(t)).collect::<Result<Vec<_>, _>>()?;
    let lcfg =
        LoraConfig { targets, rank: cfg.rank, alpha: cfg.alpha, rslora: cfg.rslora, layers: None };
    let mut lora = LoraSet::new(weights, &lcfg, backend)?;
    lora.init(cfg.seed)?;
    let mut grit = (cfg.method == Method::Grit).then(|| GritRun::new(&cfg.grit, &lora, cfg.rank));
    if let (Some(ck), Some(_)) = (resume, &grit) {
        let mismatch = |msg: String| TrainError::CheckpointMismatch {
            dir: ckpt_dir.to_path_buf(),
            step: ck.step,
            msg,
        };
        let gck = ck.state.grit.clone().ok_or_else(|| {
            mismatch(
                "state.json has no GRIT state (was the run started with --method lora?)".into(),
            )
        })?;
        if gck.ranks.len() != lora.modules().len() {
            let n = lora.modules().len();
            return Err(mismatch(format!("it has {} modules, this run {n}", gck.ranks.len())));
        }
        let specs: Vec<_> = lora
            .modules()
            .iter()
            .zip(&gck.ranks)
            .map(|(m, &r)| (m.layer, m.target, r, m.scale))
            .collect();
        lora = LoraSet::with_modules(weights, &specs, backend)?;
        grit = Some(GritRun::from_checkpoint(&cfg.grit, gck, cfg.rank));
    }
    lora.mark_params();
    Ok((lora, grit))
}

/// `--dump-tokens`: the sequences the run will train on, in order, as JSON.
fn dump_tokens(
    path: &Path,
    batcher: &data::Batcher,
    micro_batches: usize,
    seq_len: usize,
) -> Result<(), TrainError> {
    #[derive(serde::Serialize)]
    struct Dump<'a> {
        sequences: &'a [Sequence],
        seq_len: usize,
    }
    let mut b = batcher.clone();
    let seqs: Vec<Sequence> = (0..micro_batches).flat_map(|_| b.next_batch()).collect();
    let doc = serde_json::to_vec(&Dump { sequences: &seqs, seq_len })
        .map_err(|source| TrainError::Encode { path: path.into(), source })?;
    Ok(crate::fetch::write_atomic(path, &doc)?)
}

fn progress_bar(total_steps: usize, start_step: usize) -> ProgressBar {
    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:24}] {msg} · ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start_step as u64);
    bar
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

/// A checkpoint of the current parameters and optimizer state.
fn snapshot(step: usize, p: &Params, state: LoopState) -> Result<Checkpoint, TrainError> {
    let mut tensors = Vec::new();
    for (i, m) in p.lora.modules().iter().enumerate() {
        let base = m.base_name();
        let a_shape = vec![m.rank, m.d_in];
        let b_shape = vec![m.d_out, m.rank];
        let name = format!("{base}.lora_a");
        tensors.push(NamedTensor { name, shape: a_shape.clone(), data: p.lora.read_a(i)? });
        let name = format!("{base}.lora_b");
        tensors.push(NamedTensor { name, shape: b_shape.clone(), data: p.lora.read_b(i)? });
        for (k, name) in SLOT_NAMES.iter().enumerate() {
            let shape = if k < 3 { a_shape.clone() } else { b_shape.clone() };
            let name = format!("{base}.{name}");
            tensors.push(NamedTensor { name, shape, data: p.opt.read(i, k)? });
        }
    }
    Ok(Checkpoint { step, tensors, state })
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
