//! Packing examples into training sequences, the attention mask that keeps packed examples
//! apart, and the seeded, resumable batch order.
//!
//! Packing happens once per dataset: the examples are shuffled with the data seed, then
//! placed best-fit (into the open sequence with the least room that still fits them, else a
//! new one) into sequences of at most `max_seq_len` tokens. An example is never split (those
//! longer than `max_seq_len` were truncated at load). Each epoch visits the packed sequences
//! in a fresh seeded permutation, so the number of sequences per epoch is fixed and a data
//! position `(epoch, index)` names the next sequence exactly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DataError, Dataset, Example};

/// One training sequence of `n ≤ max_seq_len` tokens (several examples when packed).
///
/// All vectors have length `n`. The training graph predicts `labels[i]` from `tokens[..=i]`
/// (restricted to the same segment); `loss_mask[i]` is 1.0 when that prediction is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    /// Input token ids, `[n]`.
    pub tokens: Vec<i32>,
    /// The next token of the same example, `[n]`; at the last token of an example (no next
    /// token in its segment) EOS, which is never trained.
    pub labels: Vec<i32>,
    /// 1.0 where `labels[i]` is trained (the label is a trained token of the same example),
    /// else 0.0, `[n]`.
    pub loss_mask: Vec<f32>,
    /// Segment (example) index within this sequence, `[n]`, starting at 0 and increasing.
    pub segment: Vec<u32>,
    /// Position of the token within its segment, `[n]` (RoPE positions restart per example).
    pub pos: Vec<i32>,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of trained predictions (`loss_mask` ones).
    pub fn n_trained(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// Number of segments (packed examples).
    pub fn n_segments(&self) -> usize {
        self.segment.last().map_or(0, |&s| s as usize + 1)
    }

    /// Builds the sequence of `examples` packed in order; `eos` labels the last token of each.
    pub fn from_examples(examples: &[&Example], eos: i32) -> Self {
        let n: usize = examples.iter().map(|e| e.tokens.len()).sum();
        let mut s = Sequence {
            tokens: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            loss_mask: Vec::with_capacity(n),
            segment: Vec::with_capacity(n),
            pos: Vec::with_capacity(n),
        };
        for (seg, e) in examples.iter().enumerate() {
            let len = e.tokens.len();
            for j in 0..len {
                s.tokens.push(e.tokens[j]);
                if j + 1 < len {
                    s.labels.push(e.tokens[j + 1]);
                    s.loss_mask.push(if e.trained[j + 1] { 1.0 } else { 0.0 });
                } else {
                    s.labels.push(eos);
                    s.loss_mask.push(0.0);
                }
                s.segment.push(seg as u32);
                s.pos.push(j as i32);
            }
        }
        s
    }

    /// Pads to `n` tokens with `pad` (for fixed graph shapes): the padding is one extra
    /// segment that is never trained. Does nothing when already `n` or longer.
    pub fn pad_to(&mut self, n: usize, pad: i32) {
        if self.len() >= n {
            return;
        }
        let seg = self.n_segments() as u32;
        for j in 0..n - self.len() {
            self.tokens.push(pad);
            self.labels.push(pad);
            self.loss_mask.push(0.0);
            self.segment.push(seg);
            self.pos.push(j as i32);
        }
    }
}

/// The additive attention mask of `seq`, `[n, n]` row-major: `mask[q * n + k]` is 0.0 when
/// query token `q` may attend to key token `k` (`k ≤ q` and the same segment), else
/// `f32::NEG_INFINITY`. Rows are queries and the contiguous axis is keys, which is the
/// layout of ggml's `soft_max_ext` mask (`ne = [n_kv, n_q]`). The diagonal is always 0, so
/// no row is fully masked.
pub fn causal_segment_mask(seq: &Sequence) -> Vec<f32> {
    let n = seq.len();
    let mut m = vec![f32::NEG_INFINITY; n * n];
    for q in 0..n {
        let sq = seq.segment[q];
        // Segments are contiguous: walk back from the diagonal while the segment holds.
        let mut k = q + 1;
        while k > 0 && seq.segment[k - 1] == sq {
            k -= 1;
            m[q * n + k] = 0.0;
        }
    }
    m
}

/// Which examples go into which sequence: lists of example indices, in packing order.
/// With `pack` false every example is its own sequence, in file order.
pub fn plan(lengths: &[usize], max_seq_len: usize, pack: bool, seed: u64) -> Vec<Vec<usize>> {
    if !pack {
        return (0..lengths.len()).map(|i| vec![i]).collect();
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    SplitMix64::stream(seed, STREAM_PACK, 0).shuffle(&mut order);
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
    // room left → indices of open bins with that room (lowest index first: deterministic).
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i].min(max_seq_len);
        let found = by_room.range(len..).next().map(|(&room, list)| (room, list[0]));
        let b = match found {
            Some((room, b)) => {
                if let Some(list) = by_room.get_mut(&room) {
                    list.remove(0);
                    if list.is_empty() {
                        by_room.remove(&room);
                    }
                }
                b
            }
            None => {
                bins.push((Vec::new(), 0));
                bins.len() - 1
            }
        };
        bins[b].0.push(i);
        bins[b].1 += len;
        let room = max_seq_len - bins[b].1;
        if room > 0 {
            let list = by_room.entry(room).or_default();
            let at = list.partition_point(|&x| x < b);
            list.insert(at, b);
        }
    }
    bins.into_iter().map(|(v, _)| v).collect()
}

/// Packs `ds` into sequences with its own configuration (`max_seq_len`, `pack`, `seed`), in
/// packing order. Evaluation reads these in order; training goes through a [`Batcher`].
pub fn pack(ds: &Dataset) -> Vec<Sequence> {
    let lengths: Vec<usize> = ds.examples.iter().map(|e| e.tokens.len()).collect();
    plan(&lengths, ds.config.max_seq_len, ds.config.pack, ds.config.seed)
        .iter()
        .map(|bin| {
            let ex: Vec<&Example> = bin.iter().map(|&i| &ds.examples[i]).collect();
            Sequence::from_examples(&ex, ds.eos)
        })
        .collect()
}

/// Where the data stream stands: the next sequence is number `index` (0-based) of epoch
/// `epoch`'s permutation. Saved in checkpoints; [`Batcher::restore`] continues from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: u64,
    /// Hash of the packed data and seed the position refers to; 0 = not checked.
    #[serde(default)]
    pub fingerprint: u64,
}

/// Yields batches of packed sequences in a seeded order that is reshuffled every epoch.
/// Same data + same seed ⇒ same batches; [`Batcher::position`] / [`Batcher::restore`] resume
/// exactly. A batch that crosses the end of an epoch continues with the next epoch's order.
#[derive(Debug, Clone)]
pub struct Batcher {
    seqs: Vec<Sequence>,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    index: u64,
    /// Permutation of `seqs` for `epoch`.
    order: Vec<usize>,
    fingerprint: u64,
}

impl Batcher {
    /// Packs `ds` (with the configuration it was loaded with) for batches of `batch_size`
    /// sequences. Errors when there is nothing to train or `batch_size` is 0.
    pub fn new(ds: &Dataset, batch_size: usize) -> Result<Self, DataError> {
        if batch_size == 0 {
            return Err(DataError::Config {
                name: "--batch-size",
                msg: "must be at least 1".into(),
            });
        }
        let seqs = pack(ds);
        if seqs.is_empty() {
            return Err(DataError::Empty {
                what: ds.stats.files.join(", "),
                why: "no training sequences".into(),
            });
        }
        let seed = ds.config.seed;
        let fingerprint = fingerprint(&seqs, seed);
        let mut b =
            Batcher { seqs, batch_size, seed, epoch: 0, index: 0, order: Vec::new(), fingerprint };
        b.order = b.permutation(0);
        Ok(b)
    }

    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.seqs.len()).collect();
        SplitMix64::stream(self.seed, STREAM_EPOCH, epoch).shuffle(&mut order);
        order
    }

    /// The next `batch_size` sequences.
    pub fn next_batch(&mut self) -> Vec<Sequence> {
        let mut out = Vec::with_capacity(self.batch_size);
        for _ in 0..self.batch_size {
            if self.index as usize >= self.seqs.len() {
                self.epoch += 1;
                self.index = 0;
                self.order = self.permutation(self.epoch);
            }
            out.push(self.seqs[self.order[self.index as usize]].clone());
            self.index += 1;
        }
        out
    }

    /// The position of the next sequence (what a checkpoint saves).
    pub fn position(&self) -> DataPosition {
        // After the last sequence of an epoch, report the start of the next one.
        if self.index as usize >= self.seqs.len() {
            DataPosition { epoch: self.epoch + 1, index: 0, fingerprint: self.fingerprint }
        } else {
            DataPosition { epoch: self.epoch, index: self.index, fingerprint: self.fingerprint }
        }
    }

    /// Continues from a saved position. Errors when it does not fit this data (an index past
    /// the epoch, or a fingerprint of other data or another seed).
    pub fn restore(&mut self, p: DataPosition) -> Result<(), DataError> {
        if p.fingerprint != 0 && p.fingerprint != self.fingerprint {
            return Err(DataError::Position(format!(
                "the checkpoint's data fingerprint {:016x} differs from this data's {:016x} (other data, --max-seq-len or --seed?)",
                p.fingerprint, self.fingerprint
            )));
        }
        if p.index as usize > self.seqs.len() {
            return Err(DataError::Position(format!(
                "index {} is past the {} sequences of an epoch",
                p.index,
                self.seqs.len()
            )));
        }
        self.epoch = p.epoch;
        self.index = p.index;
        self.order = self.permutation(p.epoch);
        Ok(())
    }

    pub fn sequences_per_epoch(&self) -> usize {
        self.seqs.len()
    }

    /// Batches per epoch (the last one may reach into the next epoch).
    pub fn batches_per_epoch(&self) -> usize {
        self.seqs.len().div_ceil(self.batch_size)
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The packed sequences, in packing order.
    pub fn sequences(&self) -> &[Sequence] {
        &self.seqs
    }

    /// Fraction of epochs done, for progress reports.
    pub fn epochs_done(&self) -> f64 {
        self.epoch as f64 + self.index as f64 / self.seqs.len() as f64
    }
}

/// FNV-1a over the packed sequences and the seed.
fn fingerprint(seqs: &[Sequence], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(seed);
    eat(seqs.len() as u64);
    for s in seqs {
        eat(s.len() as u64);
        for (&t, &m) in s.tokens.iter().zip(&s.loss_mask) {
            eat(((t as u32 as u64) << 1) | (m > 0.0) as u64);
        }
    }
    h.max(1)
}

pub(crate) const STREAM_PACK: u64 = 0x5041_434b; // "PACK"
pub(crate) const STREAM_EPOCH: u64 = 0x4550_4f43; // "EPOC"
pub(crate) const STREAM_SPLIT: u64 = 0x5350_4c54; // "SPLT"

pub use crate::rng::SplitMix64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataConfig, DataStats, Format};

    fn ex(len: usize, first: i32) -> Example {
        let tokens: Vec<i32> = (0..len as i32).map(|k| first + k).collect();
        let mut trained = vec![true; len];
        trained[0] = false;
        Example { tokens, trained, format: Format::Text, truncated: 0 }
    }

    fn dataset(lengths: &[usize], max: usize, seed: u64) -> Dataset {
        let examples: Vec<Example> =
            lengths.iter().enumerate().map(|(i, &l)| ex(l, 1000 * (i as i32 + 1))).collect();
        let config = DataConfig { max_seq_len: max, seed, ..DataConfig::default() };
        let mut ds = Dataset { examples, stats: DataStats::default(), config, eos: 2 };
        ds.refresh_stats();
        ds
    }

    #[test]
    fn packing_respects_max_len_and_never_splits() {
        let lengths = [5, 3, 8, 2, 7, 1, 4, 6, 8, 3];
        let bins = plan(&lengths, 8, true, 3);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 8);
        }
        // 47 tokens need at least 6 bins of 8; best-fit gets close.
        assert!(bins.len() <= 7, "{bins:?}");
        assert_eq!(plan(&lengths, 8, true, 3), bins, "deterministic");
        assert_eq!(plan(&lengths, 8, false, 3).len(), lengths.len());
    }

    #[test]
    fn sequences_carry_labels_masks_segments_positions() {
        let ds = dataset(&[3, 4], 8, 0);
        let seqs = pack(&ds);
        assert_eq!(seqs.len(), 1);
        let s = &seqs[0];
        assert_eq!(s.len(), 7);
        assert_eq!(s.n_segments(), 2);
        // Which example came first depends on the pack shuffle; check by segment.
        let first_len = s.segment.iter().filter(|&&g| g == 0).count();
        let (a, b) = if first_len == 3 { (1000, 2000) } else { (2000, 1000) };
        let la = first_len;
        let expect_tokens: Vec<i32> =
            (0..la as i32).map(|k| a + k).chain((0..(7 - la) as i32).map(|k| b + k)).collect();
        assert_eq!(s.tokens, expect_tokens);
        for i in 0..7 {
            let last_of_seg = i + 1 == la || i + 1 == 7;
            if last_of_seg {
                assert_eq!(s.labels[i], 2);
                assert_eq!(s.loss_mask[i], 0.0);
            } else {
                assert_eq!(s.labels[i], s.tokens[i + 1]);
                assert_eq!(s.loss_mask[i], 1.0);
            }
            assert_eq!(s.pos[i], if i < la { i as i32 } else { (i - la) as i32 });
        }
        assert_eq!(s.n_trained(), 5);
    }

    #[test]
    fn loss_mask_follows_the_label_token() {
        let e = Example {
            tokens: vec![5, 6, 7, 8],
            trained: vec![false, false, true, true],
            format: Format::Chat,
            truncated: 0,
        };
        let s = Sequence::from_examples(&[&e], 2);
        assert_eq!(s.labels, vec![6, 7, 8, 2]);
        assert_eq!(s.loss_mask, vec![0.0, 1.0, 1.0, 0.0]);
    }

    #[test]
    fn segment_mask_is_causal_and_blocks_other_examples() {
        let e1 = ex(2, 10);
        let e2 = ex(3, 20);
        let mut s = Sequence::from_examples(&[&e1, &e2], 2);
        let m = causal_segment_mask(&s);
        let n = 5;
        let allowed = |q: usize, k: usize| m[q * n + k] == 0.0;
        for q in 0..n {
            for k in 0..n {
                let same = (q < 2) == (k < 2);
                assert_eq!(allowed(q, k), k <= q && same, "q={q} k={k}");
                if !allowed(q, k) {
                    assert_eq!(m[q * n + k], f32::NEG_INFINITY);
                }
            }
        }
        s.pad_to(7, 0);
        assert_eq!(s.len(), 7);
        assert_eq!(s.segment[5..], [2, 2]);
        assert_eq!(s.loss_mask[5..], [0.0, 0.0]);
        let m = causal_segment_mask(&s);
        assert_eq!(m[6 * 7 + 5], 0.0);
        assert_eq!(m[6 * 7 + 4], f32::NEG_INFINITY);
    }

    #[test]
    fn batches_are_deterministic_and_reshuffled_per_epoch() {
        let lengths: Vec<usize> = (0..20).map(|i| 3 + i % 5).collect();
        let ds = dataset(&lengths, 8, 42);
        let mut a = Batcher::new(&ds, 3).unwrap();
        let mut b = Batcher::new(&ds, 3).unwrap();
        let n = a.sequences_per_epoch();
        let run_a: Vec<Vec<Sequence>> = (0..10).map(|_| a.next_batch()).collect();
        let run_b: Vec<Vec<Sequence>> = (0..10).map(|_| b.next_batch()).collect();
        assert_eq!(run_a, run_b);
        // Epoch 0 and epoch 1 visit every sequence once, in different orders.
        let mut c = Batcher::new(&ds, 1).unwrap();
        let e0: Vec<Sequence> = (0..n).map(|_| c.next_batch().remove(0)).collect();
        let e1: Vec<Sequence> = (0..n).map(|_| c.next_batch().remove(0)).collect();
        assert_ne!(e0, e1);
        let key = |v: &[Sequence]| {
            let mut k: Vec<Vec<i32>> = v.iter().map(|s| s.tokens.clone()).collect();
            k.sort();
            k
        };
        assert_eq!(key(&e0), key(&e1));
        assert_eq!(key(&e0), key(c.sequences()));
        // Another seed, another order.
        let ds2 = dataset(&lengths, 8, 43);
        let mut d = Batcher::new(&ds2, 3).unwrap();
        let run_d: Vec<Vec<Sequence>> = (0..10).map(|_| d.next_batch()).collect();
        assert_ne!(run_a, run_d);
    }

    #[test]
    fn position_save_and_restore_continue_exactly() {
        let lengths: Vec<usize> = (0..17).map(|i| 2 + i % 7).collect();
        let ds = dataset(&lengths, 8, 5);
        let mut a = Batcher::new(&ds, 2).unwrap();
        for _ in 0..13 {
            a.next_batch();
        }
        let p = a.position();
        let json = serde_json::to_string(&p).unwrap();
        let p2: DataPosition = serde_json::from_str(&json).unwrap();
        assert_eq!(p, p2);
        let rest_a: Vec<Vec<Sequence>> = (0..9).map(|_| a.next_batch()).collect();
        let mut b = Batcher::new(&ds, 2).unwrap();
        b.restore(p2).unwrap();
        let rest_b: Vec<Vec<Sequence>> = (0..9).map(|_| b.next_batch()).collect();
        assert_eq!(rest_a, rest_b);
        // A position without fingerprint is accepted; one of other data is refused.
        b.restore(DataPosition { epoch: 1, index: 0, fingerprint: 0 }).unwrap();
        let other = dataset(&lengths, 8, 6);
        let mut c = Batcher::new(&other, 2).unwrap();
        let e = c.restore(p).unwrap_err().to_string();
        assert!(e.contains("fingerprint"), "{e}");
        let e = c
            .restore(DataPosition { epoch: 0, index: 10_000, fingerprint: 0 })
            .unwrap_err()
            .to_string();
        assert!(e.contains("past"), "{e}");
        // A position exactly at an epoch end reads as the next epoch's start.
        let mut d = Batcher::new(&ds, 1).unwrap();
        for _ in 0..d.sequences_per_epoch() {
            d.next_batch();
        }
        assert_eq!((d.position().epoch, d.position().index), (1, 0));
    }

    #[test]
    fn batcher_refuses_empty_data_and_zero_batch() {
        let ds = dataset(&[], 8, 0);
        assert!(Batcher::new(&ds, 1).is_err());
        let ds = dataset(&[3], 8, 0);
        assert!(Batcher::new(&ds, 0).unwrap_err().to_string().contains("--batch-size"));
    }
}
