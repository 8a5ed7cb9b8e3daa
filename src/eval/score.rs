//! Scoring token sequences on llama.cpp (llama-cpp-2): one context per evaluated row (the
//! base, or the base with one adapter), full-vocabulary logits at the scored positions,
//! negative log-likelihood and KL(base ‖ adapted) per token, and greedy generation.

use std::num::NonZeroU32;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaLoraAdapter;
use llama_cpp_2::token::LlamaToken;

use super::EvalError;
use crate::infer::{resolve_threads, Model, StopStream};

/// A token sequence and the positions whose next-token prediction is scored: position `j`
/// scores `tokens[j + 1]` from `tokens[..=j]` (every `j < tokens.len() - 1`, increasing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredSeq {
    pub tokens: Vec<i32>,
    pub targets: Vec<usize>,
}

/// Sums over scored tokens for one row.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Acc {
    /// Σ −log p(target).
    pub nll: f64,
    /// Scored tokens.
    pub n: usize,
    /// Σ KL(base ‖ this row) over the same tokens (0 for the base row).
    pub kl: f64,
}

impl Acc {
    pub fn loss(&self) -> f64 {
        self.nll / self.n.max(1) as f64
    }
    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }
    pub fn mean_kl(&self) -> f64 {
        self.kl / self.n.max(1) as f64
    }
}

/// log-softmax of a logits row, in f64 for the reductions (stored as f32).
pub fn log_softmax(z: &[f32], out: &mut Vec<f32>) {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = z.iter().map(|&x| ((x - m) as f64).exp()).sum();
    let lse = m as f64 + s.ln();
    out.clear();
    out.extend(z.iter().map(|&x| (x as f64 - lse) as f32));
}

/// KL(p ‖ q) = Σ p·(log p − log q) from two log-probability rows.
pub fn kl_from_logprobs(lp: &[f32], lq: &[f32]) -> f64 {
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| {
            let p = (a as f64).exp();
            if p > 0.0 {
                p * (a as f64 - b as f64)
            } else {
                0.0
            }
        })
        .sum::<f64>()
        .max(0.0)
}

/// One llama.cpp context over the model, optionally with one adapter applied.
pub struct Scorer<'m> {
    model: &'m Model,
    ctx: LlamaContext<'m>,
    n_ctx: usize,
    /// The adapter applied now (index into the caller's adapters).
    current: Option<usize>,
}

impl<'m> Scorer<'m> {
    /// A context of `n_ctx` tokens over the bare model.
    pub fn new(model: &'m Model, n_ctx: usize, threads: i32) -> Result<Self, EvalError> {
        let threads = resolve_threads(threads);
        let n = n_ctx as u32;
        let params = model
            .context_params()
            .with_n_ctx(NonZeroU32::new(n))
            .with_n_batch(n)
            .with_n_ubatch(n.min(512))
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        crate::llama::clear_log_errors();
        let ctx = model.inner.new_context(crate::llama::backend(), params).map_err(|e| {
            EvalError::Llama(format!(
                "cannot create a llama.cpp context of {n_ctx} tokens: {}",
                crate::llama::last_log_error().unwrap_or_else(|| e.to_string())
            ))
        })?;
        Ok(Scorer { model, ctx, n_ctx, current: None })
    }

    /// Applies `adapters[k]` at `scale` (replacing any other), or with `None` the bare model.
    pub fn use_adapter(
        &mut self,
        adapters: &mut [LlamaLoraAdapter],
        which: Option<usize>,
        scale: f32,
    ) -> Result<(), EvalError> {
        if which == self.current {
            return Ok(());
        }
        match which {
            Some(k) => self
                .ctx
                .lora_adapter_set(&mut adapters[k], scale)
                .map_err(|e| EvalError::Llama(format!("cannot apply the adapter: {e}")))?,
            // llama-cpp-2 clears every adapter of the context; the argument is not used.
            None => self
                .ctx
                .lora_adapter_remove(&mut adapters[0])
                .map_err(|e| EvalError::Llama(format!("cannot remove the adapter: {e}")))?,
        }
        self.current = which;
        Ok(())
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Decodes `tokens` from position 0 (cache cleared), asking logits at `want` (increasing
    /// positions), and calls `f(k, logits)` for the k-th wanted position.
    pub fn logits(
        &mut self,
        tokens: &[i32],
        want: &[usize],
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), EvalError> {
        if tokens.len() > self.n_ctx {
            return Err(EvalError::Llama(format!(
                "a sequence of {} tokens exceeds the context of {}",
                tokens.len(),
                self.n_ctx
            )));
        }
        self.ctx.clear_kv_cache();
        let n_batch = self.ctx.n_batch() as usize;
        let mut batch = LlamaBatch::new(n_batch.max(1), 1);
        let mut w = 0usize;
        for (ci, chunk) in tokens.chunks(n_batch).enumerate() {
            batch.clear();
            let base = ci * n_batch;
            let first_w = w;
            for (i, &t) in chunk.iter().enumerate() {
                let pos = base + i;
                let out = w < want.len() && want[w] == pos;
                if out {
                    w += 1;
                }
                batch
                    .add(LlamaToken(t), pos as i32, &[0], out)
                    .map_err(|e| EvalError::Llama(format!("batch: {e}")))?;
            }
            self.ctx
                .decode(&mut batch)
                .map_err(|e| EvalError::Llama(format!("decode failed at token {base}: {e}")))?;
            // Read this chunk's outputs by their index in the batch.
            let mut k = first_w;
            for (i, _) in chunk.iter().enumerate() {
                if k < w && want[k] == base + i {
                    f(k, self.ctx.get_logits_ith(i as i32));
                    k += 1;
                }
            }
        }
        if w != want.len() {
            return Err(EvalError::Llama(format!(
                "scored position {} lies outside a sequence of {} tokens",
                want[w],
                tokens.len()
            )));
        }
        Ok(())
    }

    /// Log-likelihood Σ log p(continuation | context) (context non-empty).
    pub fn loglik(&mut self, context: &[i32], continuation: &[i32]) -> Result<f64, EvalError> {
        if context.is_empty() || continuation.is_empty() {
            return Ok(0.0);
        }
        let mut all = context.to_vec();
        all.extend_from_slice(continuation);
        let want: Vec<usize> = (context.len() - 1..all.len() - 1).collect();
        let mut lp = Vec::new();
        let mut sum = 0.0;
        self.logits(&all, &want, |k, z| {
            log_softmax(z, &mut lp);
            sum += lp[all[want[k] + 1] as usize] as f64;
        })?;
        Ok(sum)
    }

    /// Greedy continuation of `prompt` (tokens), at most `max_new` tokens, ending at an
    /// end-of-generation token or before the first stop string.
    pub fn greedy(
        &mut self,
        prompt: &[i32],
        max_new: usize,
        stop: &[String],
    ) -> Result<String, EvalError> {
        if prompt.is_empty() {
            return Err(EvalError::Llama("empty prompt".into()));
        }
        if prompt.len() + max_new > self.n_ctx {
            return Err(EvalError::Llama(format!(
                "a prompt of {} tokens plus {max_new} new tokens exceeds the context of {} (raise --ctx)",
                prompt.len(),
                self.n_ctx
            )));
        }
        let vocab = self.model.inner.vocab();
        let mut next = 0i32;
        self.logits(prompt, &[prompt.len() - 1], |_, z| next = argmax(z))?;
        let mut stream = StopStream::new(stop);
        let mut batch = LlamaBatch::new(1, 1);
        let mut piece = Vec::new();
        for (i, pos) in (0..max_new).zip(prompt.len()..) {
            let tok = LlamaToken(next);
            if vocab.is_eog(tok) {
                break;
            }
            piece.clear();
            vocab.token_to_piece_into(tok, &mut piece, false, None);
            if stream.push(&piece, &mut |_| {}) || i + 1 == max_new {
                break;
            }
            batch.clear();
            batch
                .add(tok, pos as i32, &[0], true)
                .map_err(|e| EvalError::Llama(format!("batch: {e}")))?;
            self.ctx
                .decode(&mut batch)
                .map_err(|e| EvalError::Llama(format!("decode failed at token {pos}: {e}")))?;
            next = argmax(self.ctx.get_logits_ith(0));
        }
        stream.finish(&mut |_| {});
        Ok(stream.emitted)
    }
}

fn argmax(z: &[f32]) -> i32 {
    let mut best = 0usize;
    for (i, &x) in z.iter().enumerate() {
        if x > z[best] {
            best = i;
        }
    }
    best as i32
}

/// Scores `seqs` with the bare model (row 0, the KL reference) and with each of `adapters`
/// at `scale` (rows 1..), one sequence at a time, and returns one sum per row.
/// `progress(done, total)` is called after each sequence.
pub fn score_all(
    scorer: &mut Scorer<'_>,
    adapters: &mut [LlamaLoraAdapter],
    scale: f32,
    seqs: &[ScoredSeq],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Acc>, EvalError> {
    let mut accs = vec![Acc::default(); adapters.len() + 1];
    let mut base_lp: Vec<Vec<f32>> = Vec::new();
    let mut lp = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        if s.targets.is_empty() {
            continue;
        }
        base_lp.resize_with(s.targets.len(), Vec::new);
        for (r, acc) in accs.iter_mut().enumerate() {
            scorer.use_adapter(adapters, r.checked_sub(1), scale)?;
            let base_lp = &mut base_lp;
            scorer.logits(&s.tokens, &s.targets, |k, z| {
                let target = s.tokens[s.targets[k] + 1] as usize;
                if r == 0 {
                    log_softmax(z, &mut base_lp[k]);
                    acc.nll -= base_lp[k][target] as f64;
                } else {
                    log_softmax(z, &mut lp);
                    acc.nll -= lp[target] as f64;
                    acc.kl += kl_from_logprobs(&base_lp[k], &lp);
                }
                acc.n += 1;
            })?;
        }
        progress(si + 1, seqs.len());
    }
    Ok(accs)
}

/// llama.cpp's perplexity windows over a tokenized text (`tokens` as tokenized with BOS
/// when the model adds one): consecutive, non-overlapping chunks of `n_ctx` tokens; the
/// first token of each chunk is replaced by BOS (when `bos` is given); only the second half
/// is scored: positions `n_ctx/2 .. n_ctx-1`, i.e. `n_ctx - 1 - n_ctx/2` tokens per chunk.
/// A tail shorter than `n_ctx` is not scored.
pub fn text_windows(tokens: &[i32], n_ctx: usize, bos: Option<i32>) -> Vec<ScoredSeq> {
    if n_ctx < 2 {
        return Vec::new();
    }
    let first = n_ctx / 2;
    tokens
        .chunks_exact(n_ctx)
        .map(|c| {
            let mut t = c.to_vec();
            if let Some(b) = bos {
                t[0] = b;
            }
            ScoredSeq { tokens: t, targets: (first..n_ctx - 1).collect() }
        })
        .collect()
}

/// The scored positions of a training example: `j` where `trained[j + 1]`.
pub fn example_targets(trained: &[bool]) -> Vec<usize> {
    (0..trained.len().saturating_sub(1)).filter(|&j| trained[j + 1]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_llama_cpp() {
        let toks: Vec<i32> = (100..100 + 21).collect();
        let w = text_windows(&toks, 8, Some(1));
        assert_eq!(w.len(), 2); // 21 / 8, the tail of 5 dropped
        assert_eq!(w[0].tokens, vec![1, 101, 102, 103, 104, 105, 106, 107]);
        assert_eq!(w[1].tokens, vec![1, 109, 110, 111, 112, 113, 114, 115]);
        assert_eq!(w[0].targets, vec![4, 5, 6]); // n_ctx - 1 - n_ctx/2 = 3 scored tokens
        let w = text_windows(&toks, 8, None);
        assert_eq!(w[1].tokens[0], 108);
        assert!(text_windows(&toks[..7], 8, None).is_empty());
    }

    #[test]
    fn targets_of_examples() {
        assert_eq!(example_targets(&[false, false, true, true, false, true]), vec![1, 2, 4]);
        assert!(example_targets(&[false]).is_empty());
    }

    #[test]
    fn softmax_and_kl() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        log_softmax(&[0.0, 0.0], &mut a);
        assert!((a[0] as f64 - 0.5f64.ln()).abs() < 1e-6);
        log_softmax(&[1.0, 0.0], &mut b);
        // KL([.5,.5] ‖ [e/(1+e), 1/(1+e)])
        let q0 = 1f64.exp() / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5f64 / q0).ln() + 0.5 * (0.5 / (1.0 - q0)).ln();
        assert!((kl_from_logprobs(&a, &b) - want).abs() < 1e-6);
        assert_eq!(kl_from_logprobs(&a, &a), 0.0);
    }
}
