//! Graph batches from packed sequences, and the in-training evaluation that scores them.

use crate::data::{self, Sequence};
use crate::ggml::{Backend, Context};
use crate::model::{Batch, GraphOptions, LoraSet, Outputs, TrainGraph, Weights};

use super::engine;
use super::run::TrainError;

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

/// Mean loss over the eval sequences (weighted by trained rows), reading at most
/// `max_tokens` tokens (at least one sequence).
pub(super) fn run_eval(
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
            GraphOptions::loss(Outputs::Rows(n_rows)),
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
