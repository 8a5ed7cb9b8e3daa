//! The scheduler: one thread owns the model's contexts and the loaded adapters and decodes.
//!
//! Requests that use the same adapter set (the same adapters with the same scales) share a
//! *lane*: one llama.cpp context with `parallel` sequences, decoded together in one batch per
//! step (continuous batching: a request joins or leaves the batch at any step, prompts are
//! prefilled in the same batch as other requests' next tokens). Requests with another adapter
//! set get their own lane; every step visits every busy lane in turn, so they all progress. At
//! most `max_lanes` lanes exist; when a request needs a new one and none is idle, the least
//! loaded lane stops admitting requests until it drains, so no request waits indefinitely.
//!
//! The engine holds one or more models: index 0 is the base model (runtime adapters load
//! against it); with `--merge-adapters` every start adapter is a merged copy of the base at its
//! own index, and a lane belongs to one model.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

use crate::infer::StopStream;
use crate::llama::multi::{Adapter, Batch, Context, ContextConfig};

use super::metrics::Metrics;

/// Sampling parameters of one request (validated by the HTTP layer): the same options as
/// `grit generate`'s.
pub type Sampling = crate::infer::SampleOptions;

/// What a generation reports to its HTTP handler.
#[derive(Debug)]
pub enum Event {
    /// Final text, in order (stop strings and incomplete UTF-8 held back), and the number of
    /// tokens generated so far.
    Text(String, usize),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(Failure),
}

/// Why the engine could not finish a request.
#[derive(Debug, Clone)]
pub enum Failure {
    /// An adapter of the request was unloaded before the request started.
    AdapterGone(String),
    Timeout,
    ShuttingDown,
    Internal(String),
}

/// One generation request.
pub struct GenJob {
    pub tokens: Vec<LlamaToken>,
    /// Which model decodes it (0 = the base; others are merged adapters).
    pub model: usize,
    /// Adapter ids and scales (sorted by id; the lane key).
    pub adapters: Vec<(u64, f32)>,
    /// The adapters' names, for messages.
    pub adapter_names: Vec<String>,
    pub sampling: Sampling,
    pub events: mpsc::UnboundedSender<Event>,
    /// Set when the client went away: the generation stops at the next step.
    pub cancel: Arc<AtomicBool>,
    pub deadline: Instant,
}

/// One embeddings request (all inputs, one adapter set).
pub struct EmbedJob {
    pub inputs: Vec<Vec<LlamaToken>>,
    pub model: usize,
    pub adapters: Vec<(u64, f32)>,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, Failure>>,
    /// Set when the client went away: the job stops before its next input.
    pub cancel: Arc<AtomicBool>,
    /// When the request must be done (`--timeout`, waiting included).
    pub deadline: Instant,
}

/// An embeddings request in progress: one input is decoded per engine pass, between
/// generation steps, so a large request neither stalls the streams nor outlives its deadline.
struct EmbedWork {
    job: Box<EmbedJob>,
    out: Vec<Vec<f32>>,
    /// Whether it has left the queue (`Shared::queued`).
    started: bool,
}

/// Messages to the engine thread.
pub enum Cmd {
    Generate(Box<GenJob>),
    Embed(Box<EmbedJob>),
    /// Load an adapter file under this id; replies with its metadata or llama.cpp's error.
    LoadAdapter {
        id: u64,
        path: std::path::PathBuf,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Forget an adapter: free it once no running request uses it.
    UnloadAdapter {
        id: u64,
    },
    /// Fail every waiting and running request (end of the shutdown grace period).
    CancelAll,
    /// Finish: the thread returns.
    Exit,
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub n_ctx_seq: u32,
    pub parallel: u32,
    pub max_lanes: usize,
    pub n_batch: u32,
    pub threads: i32,
    /// Ops and KV caches on the GPU (the model was loaded onto one).
    pub offload: bool,
}

/// State the HTTP side reads.
pub struct Shared {
    /// Requests submitted and not yet running (bounded by the queue size).
    pub queued: AtomicUsize,
    pub metrics: Arc<Metrics>,
}

struct Slot {
    job: Box<GenJob>,
    /// Prompt tokens already in the KV cache.
    n_prompt_done: usize,
    /// Next position in the sequence.
    pos: i32,
    /// The token to feed next (after the prompt).
    next: Option<LlamaToken>,
    /// Batch index of this slot's logits in the last decode.
    logits_idx: Option<i32>,
    sampler: Option<LlamaSampler>,
    stream: StopStream,
    completion_tokens: usize,
}

struct Lane<'m> {
    key: LaneKey,
    ctx: Context<'m>,
    batch: Batch,
    slots: Vec<Option<Slot>>,
    /// No new requests (another adapter set waits for a lane).
    draining: bool,
    last_used: Instant,
}

impl Lane<'_> {
    fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.is_none())
    }
}

/// A lane serves one model with one adapter set (ids and the scales' bits).
type LaneKey = (usize, Vec<(u64, u32)>);

fn lane_key(model: usize, adapters: &[(u64, f32)]) -> LaneKey {
    (model, adapters.iter().map(|(id, s)| (*id, s.to_bits())).collect())
}

fn make_sampler(s: &Sampling) -> Option<LlamaSampler> {
    s.random_sampler() // None: greedy, argmax over the logits
}

/// The first index of the largest logit (llama.cpp's greedy sampler picks the same).
fn argmax(logits: &[f32]) -> LlamaToken {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    LlamaToken(best as i32)
}

fn sample(logits: &[f32], sampler: &mut Option<LlamaSampler>) -> LlamaToken {
    match sampler {
        None => argmax(logits),
        Some(s) => {
            let mut arr = LlamaTokenDataArray::from_iter(
                logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
                false,
            );
            arr.apply_sampler(s);
            let tok = arr.selected_token().unwrap_or_else(|| argmax(logits));
            s.accept(tok);
            tok
        }
    }
}

/// Runs the engine until [`Cmd::Exit`] (or every sender is gone). `models[0]` is the base
/// model; the others (merged adapters) share its vocabulary.
///
/// Each pass: take commands ([`Engine::take_commands`]; block briefly when idle), free
/// unloaded adapters ([`Engine::unload`]), one embeddings input ([`Engine::embed_step`]),
/// admit waiting requests to lanes ([`Engine::admit`]), one decode step per busy lane
/// ([`Engine::decode_lanes`]).
pub fn run(models: &[&LlamaModel], cfg: EngineConfig, rx: Receiver<Cmd>, shared: Arc<Shared>) {
    let mut engine = Engine {
        models,
        vocab: models[0].vocab(),
        cfg,
        metrics: shared.metrics.clone(),
        shared,
        lanes: Vec::new(),
        embed_ctx: None,
        adapters: HashMap::new(),
        unloading: Vec::new(),
        embeds: VecDeque::new(),
        waiting: VecDeque::new(),
        piece: Vec::with_capacity(32),
    };
    while engine.take_commands(&rx) {
        engine.unload();
        engine.embed_step();
        engine.admit();
        engine.decode_lanes();
    }
    engine.shut_down();
}

/// The engine thread's state.
struct Engine<'m> {
    models: &'m [&'m LlamaModel],
    /// The base model's vocabulary (merged models share it).
    vocab: llama_cpp_2::vocab::LlamaVocab<'m>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    // Fields drop in declaration order: every context (lanes, embeddings) before the
    // adapters it may use.
    lanes: Vec<Lane<'m>>,
    embed_ctx: Option<(usize, Context<'m>)>,
    adapters: HashMap<u64, Adapter<'m>>,
    /// Adapters to free once no lane or embeddings request uses them.
    unloading: Vec<u64>,
    embeds: VecDeque<EmbedWork>,
    waiting: VecDeque<Box<GenJob>>,
    /// Scratch for a token's text.
    piece: Vec<u8>,
}

fn fail(job: &GenJob, f: Failure) {
    let _ = job.events.send(Event::Failed(f));
}

/// Where an admitted request goes.
enum Placement {
    Lane(usize),
    /// No lane can take it now: it stays in the queue.
    Wait,
    /// A lane could not be made: the request failed.
    Failed,
}

impl<'m> Engine<'m> {
    /// Takes every queued command; blocks up to 250 ms for one when there is nothing to do.
    /// Returns false when the engine must stop ([`Cmd::Exit`] or every sender gone).
    fn take_commands(&mut self, rx: &Receiver<Cmd>) -> bool {
        let busy = self.lanes.iter().any(|l| l.active() > 0) || !self.embeds.is_empty();
        let mut first = true;
        loop {
            let cmd = if busy || !first || !self.waiting.is_empty() {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => return true,
                }
            } else {
                match rx.recv_timeout(Duration::from_millis(250)) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => return true,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            };
            first = false;
            match cmd {
                Cmd::Generate(job) => self.waiting.push_back(job),
                Cmd::Embed(job) => self.embeds.push_back(EmbedWork {
                    out: Vec::with_capacity(job.inputs.len()),
                    job,
                    started: false,
                }),
                Cmd::LoadAdapter { id, path, reply } => {
                    let r = Adapter::load(self.models[0], &path).map_err(|e| e.to_string());
                    let r = r.map(|a| {
                        self.adapters.insert(id, a);
                    });
                    let _ = reply.send(r);
                }
                Cmd::UnloadAdapter { id } => self.unloading.push(id),
                Cmd::CancelAll => self.cancel_all(),
                Cmd::Exit => return false,
            }
        }
    }

    /// Fails every waiting and running request.
    fn cancel_all(&mut self) {
        for e in self.embeds.drain(..) {
            if !e.started {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
            let _ = e.job.reply.send(Err(Failure::ShuttingDown));
        }
        for job in self.waiting.drain(..) {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            fail(&job, Failure::ShuttingDown);
        }
        for lane in self.lanes.iter_mut() {
            for s in lane.slots.iter_mut() {
                if let Some(slot) = s.take() {
                    fail(&slot.job, Failure::ShuttingDown);
                }
            }
        }
        for lane in self.lanes.iter_mut() {
            for i in 0..lane.slots.len() {
                lane.ctx.clear_seq(i as i32);
            }
        }
    }

    /// Drops idle lanes that use an unloading adapter, then frees every unloading adapter
    /// nothing uses any more.
    fn unload(&mut self) {
        if self.unloading.is_empty() {
            return;
        }
        let unloading = &self.unloading;
        self.lanes
            .retain(|l| !(l.active() == 0 && l.key.1.iter().any(|(id, _)| unloading.contains(id))));
        if let Some((_, ctx)) = self.embed_ctx.as_mut() {
            let _ = ctx.set_adapters(&[]);
        }
        let (lanes, embeds, adapters) = (&self.lanes, &self.embeds, &mut self.adapters);
        self.unloading.retain(|id| {
            let in_use = lanes.iter().any(|l| l.key.1.iter().any(|(a, _)| a == id))
                || embeds.iter().any(|e| e.job.adapters.iter().any(|(a, _)| a == id));
            if !in_use {
                adapters.remove(id);
            }
            in_use
        });
    }

    /// Embeddings: one input of the oldest request per pass.
    fn embed_step(&mut self) {
        let Some(e) = self.embeds.front_mut() else {
            return;
        };
        if !e.started {
            e.started = true;
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
        // None: keep going; Some(None): cancelled, no reply; Some(Some(r)): reply r.
        let reply = if e.job.cancel.load(Ordering::Relaxed) {
            Some(None)
        } else if Instant::now() >= e.job.deadline {
            Some(Some(Err(Failure::Timeout)))
        } else {
            let toks = &e.job.inputs[e.out.len()];
            let r = match self.models.get(e.job.model) {
                Some(m) => embed_one(
                    m,
                    e.job.model,
                    &self.cfg,
                    &mut self.embed_ctx,
                    &self.adapters,
                    toks,
                    &e.job.adapters,
                ),
                None => Err(Failure::Internal(format!("no model {}", e.job.model))),
            };
            match r {
                Ok(v) => {
                    e.out.push(v);
                    (e.out.len() == e.job.inputs.len())
                        .then(|| Some(Ok(std::mem::take(&mut e.out))))
                }
                Err(f) => Some(Some(Err(f))),
            }
        };
        if let Some(reply) = reply {
            let e = self.embeds.pop_front().expect("front exists");
            if let Some(r) = reply {
                let _ = e.job.reply.send(r);
            }
        }
    }

    /// Admission, first come first served: expired and cancelled requests leave, requests
    /// whose adapter is gone fail, the others take a free slot of their lane (a new lane when
    /// there is room) or wait.
    fn admit(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let job = &self.waiting[i];
            if job.cancel.load(Ordering::Relaxed) || Instant::now() >= job.deadline {
                let job = self.dequeue(i);
                if !job.cancel.load(Ordering::Relaxed) {
                    fail(&job, Failure::Timeout);
                }
                continue;
            }
            if let Some(gone) = job
                .adapters
                .iter()
                .position(|(id, _)| !self.adapters.contains_key(id) || self.unloading.contains(id))
            {
                let job = self.dequeue(i);
                let name = job.adapter_names.get(gone).cloned().unwrap_or_default();
                fail(&job, Failure::AdapterGone(name));
                continue;
            }
            match self.place(i) {
                Placement::Lane(li) => {
                    let job = self.dequeue(i);
                    let lane = &mut self.lanes[li];
                    let si = lane.free_slot().expect("lane has a free slot");
                    lane.ctx.clear_seq(si as i32);
                    lane.last_used = Instant::now();
                    let sampler = make_sampler(&job.sampling);
                    let stream = StopStream::new(&job.sampling.stop);
                    lane.slots[si] = Some(Slot {
                        job,
                        n_prompt_done: 0,
                        pos: 0,
                        next: None,
                        logits_idx: None,
                        sampler,
                        stream,
                        completion_tokens: 0,
                    });
                }
                Placement::Wait => i += 1,
                Placement::Failed => {}
            }
        }
        // Drained lanes go away so the waiting adapter set gets its lane next round.
        self.lanes.retain(|l| !(l.draining && l.active() == 0));
    }

    /// Removes waiting request `i` from the queue.
    fn dequeue(&mut self, i: usize) -> Box<GenJob> {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        self.waiting.remove(i).expect("index in range")
    }

    /// The lane for waiting request `i`: one of its adapter set with a free slot, else a new
    /// one when there is room (evicting an idle lane, or asking the least loaded lane to
    /// drain when none is idle). A lane that cannot be made fails the request (dequeued).
    fn place(&mut self, i: usize) -> Placement {
        let job = &self.waiting[i];
        let key = lane_key(job.model, &job.adapters);
        if let Some(li) =
            self.lanes.iter().position(|l| l.key == key && !l.draining && l.free_slot().is_some())
        {
            return Placement::Lane(li);
        }
        if self.lanes.iter().any(|l| l.key == key && !l.draining) {
            return Placement::Wait; // its lane is full
        }
        let lanes = &mut self.lanes;
        if lanes.len() >= self.cfg.max_lanes {
            if let Some(idle) = lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| l.active() == 0)
                .min_by_key(|(_, l)| l.last_used)
                .map(|(i, _)| i)
            {
                lanes.remove(idle);
            } else if !lanes.iter().any(|l| l.draining) {
                if let Some(l) = lanes.iter_mut().min_by_key(|l| l.active()) {
                    l.draining = true;
                }
            }
        }
        if lanes.len() >= self.cfg.max_lanes {
            return Placement::Wait;
        }
        let lane = match self.models.get(job.model) {
            Some(m) => new_lane(m, &self.cfg, &self.adapters, &job.adapters, key),
            None => Err(format!("no model {}", job.model)),
        };
        match lane {
            Ok(l) => {
                self.lanes.push(l);
                Placement::Lane(self.lanes.len() - 1)
            }
            Err(e) => {
                let job = self.dequeue(i);
                fail(&job, Failure::Internal(e));
                Placement::Failed
            }
        }
    }

    /// One decode step per busy lane, then the engine's gauges.
    fn decode_lanes(&mut self) {
        let mut active_total = 0;
        for lane in self.lanes.iter_mut() {
            decode_lane(lane, &self.vocab, &mut self.piece, &self.metrics);
            active_total += lane.active();
        }
        self.metrics.set_engine_state(
            self.shared.queued.load(Ordering::SeqCst),
            active_total,
            self.lanes.len(),
            self.adapters.len(),
        );
    }

    /// Shutdown: fail whatever is left; contexts are freed before adapters (field order).
    fn shut_down(mut self) {
        for e in self.embeds.drain(..) {
            let _ = e.job.reply.send(Err(Failure::ShuttingDown));
        }
        for job in self.waiting.drain(..) {
            fail(&job, Failure::ShuttingDown);
        }
        for lane in self.lanes.iter_mut() {
            for slot in lane.slots.iter_mut().filter_map(|s| s.take()) {
                fail(&slot.job, Failure::ShuttingDown);
            }
        }
    }
}

/// One decode step of a lane: cancelled and timed-out requests leave, then one batch of
/// every decoding sequence's next token and prompt chunks in the room left, then sampling.
fn decode_lane(
    lane: &mut Lane<'_>,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    piece: &mut Vec<u8>,
    metrics: &Metrics,
) {
    for (si, s) in lane.slots.iter_mut().enumerate() {
        let drop_it = match s {
            Some(slot) if slot.job.cancel.load(Ordering::Relaxed) => true,
            Some(slot) if Instant::now() >= slot.job.deadline => {
                fail(&slot.job, Failure::Timeout);
                true
            }
            _ => false,
        };
        if drop_it {
            *s = None;
            lane.ctx.clear_seq(si as i32);
        }
    }
    if lane.active() == 0 {
        return;
    }
    lane.last_used = Instant::now();
    fill_batch(lane);
    if lane.batch.is_empty() {
        return;
    }
    let t0 = Instant::now();
    if let Err(e) = lane.ctx.decode(&lane.batch) {
        let msg = e.to_string();
        for (si, s) in lane.slots.iter_mut().enumerate() {
            if let Some(slot) = s.take() {
                fail(&slot.job, Failure::Internal(msg.clone()));
                lane.ctx.clear_seq(si as i32);
            }
        }
        return;
    }
    metrics.observe_decode(lane.batch.len(), t0.elapsed().as_secs_f64());
    for (si, s) in lane.slots.iter_mut().enumerate() {
        let Some(slot) = s else { continue };
        let Some(idx) = slot.logits_idx else { continue };
        if slot.next.is_some() {
            slot.pos += 1;
        } else {
            slot.pos = slot.job.tokens.len() as i32;
        }
        let Some(logits) = lane.ctx.logits(idx) else {
            fail(&slot.job, Failure::Internal(format!("no logits for batch entry {idx}")));
            *s = None;
            lane.ctx.clear_seq(si as i32);
            continue;
        };
        let tok = sample(logits, &mut slot.sampler);
        match next_token(slot, tok, vocab, piece) {
            None => slot.next = Some(tok),
            Some(reason) => {
                finish(slot, reason);
                *s = None;
                lane.ctx.clear_seq(si as i32);
            }
        }
    }
}

/// The lane's batch: decoding sequences first (one token each), then prompt chunks in the
/// room left.
fn fill_batch(lane: &mut Lane<'_>) {
    lane.batch.clear();
    let cap = lane.batch.capacity();
    for (si, s) in lane.slots.iter_mut().enumerate() {
        let Some(slot) = s else { continue };
        slot.logits_idx = None;
        if let Some(tok) = slot.next {
            match lane.batch.add(tok, slot.pos, si as i32, true) {
                Ok(idx) => slot.logits_idx = Some(idx),
                Err(_) => unreachable_full(),
            }
        }
    }
    for (si, s) in lane.slots.iter_mut().enumerate() {
        let Some(slot) = s else { continue };
        if slot.next.is_some() {
            continue;
        }
        let n = slot.job.tokens.len();
        while slot.n_prompt_done < n && lane.batch.len() < cap {
            let p = slot.n_prompt_done;
            let last = p + 1 == n;
            let idx = lane.batch.add(slot.job.tokens[p], p as i32, si as i32, last).unwrap_or(-1);
            if last {
                slot.logits_idx = Some(idx);
            }
            slot.n_prompt_done += 1;
        }
    }
}

/// Streams the sampled token's text; returns why the generation ends, if it does.
fn next_token(
    slot: &mut Slot,
    tok: LlamaToken,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    piece: &mut Vec<u8>,
) -> Option<&'static str> {
    if vocab.is_eog(tok) && !slot.job.sampling.ignore_eos {
        return Some("stop");
    }
    slot.completion_tokens += 1;
    piece.clear();
    vocab.token_to_piece_into(tok, piece, false, None);
    let events = &slot.job.events;
    let mut closed = false;
    let n_done = slot.completion_tokens;
    let stopped = slot.stream.push(piece, &mut |t: &str| {
        if events.send(Event::Text(t.to_string(), n_done)).is_err() {
            closed = true;
        }
    });
    if closed {
        slot.job.cancel.store(true, Ordering::Relaxed);
    }
    if stopped {
        Some("stop")
    } else if slot.completion_tokens >= slot.job.sampling.max_tokens {
        Some("length")
    } else {
        None
    }
}

/// Ends a generation: the held-back text (at the length limit) and the final event.
fn finish(slot: &mut Slot, reason: &'static str) {
    let events = &slot.job.events;
    let n_done = slot.completion_tokens;
    if reason == "length" {
        slot.stream.finish(&mut |t: &str| {
            let _ = events.send(Event::Text(t.to_string(), n_done));
        });
    }
    let _ = events.send(Event::Done {
        finish_reason: reason,
        prompt_tokens: slot.job.tokens.len(),
        completion_tokens: slot.completion_tokens,
    });
}

/// A full batch here would be a scheduler bug: decoding tokens are added first and never
/// exceed the number of sequences, which is at most the batch size.
fn unreachable_full() {
    debug_assert!(false, "batch overflow while adding decode tokens");
}

fn new_lane<'m>(
    model: &'m LlamaModel,
    cfg: &EngineConfig,
    adapters: &HashMap<u64, Adapter<'m>>,
    set: &[(u64, f32)],
    key: LaneKey,
) -> Result<Lane<'m>, String> {
    let ccfg = ContextConfig {
        n_ctx_seq: cfg.n_ctx_seq,
        n_seq: cfg.parallel,
        n_batch: cfg.n_batch.max(cfg.parallel),
        threads: cfg.threads,
        embeddings: false,
        offload: cfg.offload,
    };
    let mut ctx = Context::new(model, ccfg).map_err(|e| e.to_string())?;
    apply(&mut ctx, adapters, set)?;
    Ok(Lane {
        key,
        batch: Batch::new(ccfg.n_batch as usize, cfg.parallel),
        ctx,
        slots: (0..cfg.parallel).map(|_| None).collect(),
        draining: false,
        last_used: Instant::now(),
    })
}

fn apply<'m>(
    ctx: &mut Context<'m>,
    adapters: &HashMap<u64, Adapter<'m>>,
    set: &[(u64, f32)],
) -> Result<(), String> {
    let mut list = Vec::with_capacity(set.len());
    for (id, scale) in set {
        let a = adapters.get(id).ok_or_else(|| format!("adapter {id} is not loaded"))?;
        list.push((a, *scale));
    }
    ctx.set_adapters(&list).map_err(|e| e.to_string())
}

/// The unit-length mean-pooled embedding of one input (the embeddings context is made for
/// `model_idx` when needed; the adapter set is applied each time, as it may have changed).
fn embed_one<'m>(
    model: &'m LlamaModel,
    model_idx: usize,
    cfg: &EngineConfig,
    ctx: &mut Option<(usize, Context<'m>)>,
    adapters: &HashMap<u64, Adapter<'m>>,
    toks: &[LlamaToken],
    set: &[(u64, f32)],
) -> Result<Vec<f32>, Failure> {
    if ctx.as_ref().is_none_or(|(m, _)| *m != model_idx) {
        *ctx = None; // free the other model's context first
        let ccfg = ContextConfig {
            n_ctx_seq: cfg.n_ctx_seq,
            n_seq: 1,
            n_batch: cfg.n_ctx_seq,
            threads: cfg.threads,
            embeddings: true,
            offload: cfg.offload,
        };
        *ctx = Some((
            model_idx,
            Context::new(model, ccfg).map_err(|e| Failure::Internal(e.to_string()))?,
        ));
    }
    let (_, ctx) = ctx.as_mut().expect("created above");
    apply(ctx, adapters, set).map_err(Failure::Internal)?;
    let mut batch = Batch::new(cfg.n_ctx_seq as usize, 1);
    ctx.clear_seq(0);
    for (p, &t) in toks.iter().enumerate() {
        batch.add(t, p as i32, 0, true).map_err(|e| Failure::Internal(e.to_string()))?;
    }
    let r = ctx.decode(&batch).map_err(|e| Failure::Internal(e.to_string())).and_then(|()| {
        let v = ctx
            .embeddings_seq(0)
            .ok_or_else(|| Failure::Internal("llama.cpp returned no pooled embedding".into()))?;
        // Unit length, as OpenAI's embeddings are.
        let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt().max(1e-12);
        Ok(v.iter().map(|x| (*x as f64 / norm) as f32).collect())
    });
    ctx.clear_seq(0);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]).0, 1);
        assert_eq!(argmax(&[-1.0]).0, 0);
    }

    #[test]
    fn lane_key_tells_scales_apart() {
        assert_ne!(lane_key(0, &[(1, 1.0)]), lane_key(0, &[(1, 0.5)]));
        assert_eq!(lane_key(0, &[(1, 1.0), (2, 0.5)]), lane_key(0, &[(1, 1.0), (2, 0.5)]));
        assert_ne!(lane_key(0, &[]), lane_key(1, &[]));
    }
}
