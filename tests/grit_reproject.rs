//! A hard cut on a tiny F32 model: with adapters whose A and B have rank k < r (so Σ_a and
//! Σ_g have rank k and the dropped energy is zero), the cut keeps the rank the energy rule
//! gives, and the model with the rebuilt, smaller LoRA set produces the same logits; the
//! statistics rotated on the host equal those the new graph measures. With a τ that drops
//! energy, the kept product equals B·P_g·P_a·A.

use grit::ggml::{Backend, Capacity, Context};
use grit::gguf::GgufFile;
use grit::grit::config::{GritConfig, KfacStats, RankCut, RankSignal};
use grit::grit::linalg;
use grit::grit::reproject::gram_b;
use grit::grit::reproject::{rank_by_energy, Cut};
use grit::grit::stats::{token_weights, KfacState, StatsGraph};
use grit::model::{
    write_tiny_model, Batch, GraphOptions, LoraConfig, LoraSet, Outputs, TinySpec, TrainGraph,
    Weights,
};

fn rnd_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed ^ 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            scale * (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
        })
        .collect()
}

fn batch() -> Batch {
    let tokens: Vec<i32> = (0..32).map(|i| (i * 1237 + 77) % 6000 + 5).collect();
    let rows: Vec<i32> = (2..31).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    Batch::causal(&tokens, &rows, &labels).unwrap()
}

/// Logits [n_vocab × n_tokens] of the model with `lora`.
fn logits(backend: &mut Backend, weights: &Weights, lora: Option<&LoraSet>, b: &Batch) -> Vec<f32> {
    let ctx = Context::new(TrainGraph::capacity(weights, lora, false)).unwrap();
    let g =
        TrainGraph::build(&ctx, weights, lora, b.n_tokens(), GraphOptions::logits(Outputs::All));
    let mut run = backend.compute(&g.graph).unwrap();
    let mut bb = b.clone();
    bb.labels.clear();
    g.set_inputs(&mut run, &bb).unwrap();
    run.run().unwrap();
    run.read_f32(g.logits).unwrap()
}

/// Σ_a, Σ_g of every module (LoraSet order) measured by the graph on `b`.
fn measure(
    backend: &mut Backend,
    weights: &Weights,
    lora: &LoraSet,
    b: &Batch,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    lora.mark_params();
    let cap = TrainGraph::capacity(weights, Some(lora), true);
    let ctx = Context::new(Capacity::graph(cap.tensors + 2000, 2 * cap.graph_nodes, true)).unwrap();
    let mut g = TrainGraph::build(
        &ctx,
        weights,
        Some(lora),
        b.n_tokens(),
        GraphOptions::loss(Outputs::Rows(b.n_rows())),
    );
    g.graph.build_backward_expand(&ctx);
    let stats = StatsGraph::build(&ctx, &g.graph, &g.taps, lora);
    for t in stats.outputs() {
        g.graph.build_forward_expand(t);
    }
    let mut run = backend.compute(&g.graph).unwrap();
    g.set_inputs(&mut run, b).unwrap();
    stats.set_weights(&mut run, &token_weights(b.n_tokens(), &b.rows).0).unwrap();
    run.reset_grads();
    run.run().unwrap();
    stats.read(&run).unwrap()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let d = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    d / a.iter().fold(0f64, |m, x| m.max(x.abs() as f64))
}

#[test]
fn hard_cut_with_zero_dropped_energy_keeps_the_logits() {
    let tok = grit::fetch::ensure_default_model().expect("default model (tokenizer source)");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        seed: 3,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &tok).unwrap();
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let (r, k_true) = (8usize, 3usize);
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: r, alpha: 16.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    // A = C·D (r×k · k×d_in) and B = E·F (d_out×k · k×r): rank k each, so u = A·x and
    // g = s·Bᵀ·δ live in k-dimensional subspaces.
    for (i, m) in lora.modules().iter().enumerate() {
        let s = 10 * i as u64;
        let a = linalg::matmul(
            &rnd_vec(s + 1, r * k_true, 1.0),
            &rnd_vec(s + 2, k_true * m.d_in, 0.3 / (m.d_in as f64).sqrt()),
            r,
            k_true,
            m.d_in,
        );
        let b = linalg::matmul(
            &rnd_vec(s + 3, m.d_out * k_true, 0.2),
            &rnd_vec(s + 4, k_true * r, 1.0),
            m.d_out,
            k_true,
            r,
        );
        lora.write_a(i, &a.iter().map(|&v| v as f32).collect::<Vec<_>>()).unwrap();
        lora.write_b(i, &b.iter().map(|&v| v as f32).collect::<Vec<_>>()).unwrap();
    }
    let b = batch();
    let base = logits(&mut backend, &weights, None, &b);
    let before = logits(&mut backend, &weights, Some(&lora), &b);
    let adapter_effect = rel_diff(&before, &base);

    let sig = measure(&mut backend, &weights, &lora, &b);
    let n_counted = token_weights(b.n_tokens(), &b.rows).1;
    let mut kfac = KfacState::new(&lora, KfacStats::Ema, 0.95);
    for (i, (sa, sg)) in sig.iter().enumerate() {
        kfac.accumulate(i, sa, sg, n_counted, 1.0);
    }
    kfac.commit();

    for two_sided in [true, false] {
        let cfg = GritConfig {
            rank_energy: 0.9999,
            rank_min: 2,
            rank_start: Some(0),
            rank_cut: RankCut::Hard,
            two_sided,
            rank_signal: RankSignal::Input,
            ..GritConfig::default()
        };
        let mut specs = Vec::new();
        let mut new_data = Vec::new();
        let mut rotated = kfac.clone();
        for (i, m) in lora.modules().iter().enumerate() {
            let gb = gram_b(&lora.read_b(i).unwrap(), m.d_out, r);
            let cut =
                Cut::plan(&kfac.modules[i], &gb, &cfg, 100, r).expect("module has statistics");
            let values = linalg::eigh(&kfac.modules[i].sigma_a, r).values;
            assert_eq!(
                cut.k,
                rank_by_energy(&values, cfg.rank_energy, cfg.rank_min, r),
                "{}: rank differs from the energy rule",
                m.base_name()
            );
            assert_eq!(
                cut.k,
                k_true,
                "{}: Σ_a has rank {k_true}, eigenvalues {values:?}",
                m.base_name()
            );
            assert!(cut.report.energy >= 0.9999);
            specs.push((m.layer, m.target, cut.new_rank(), m.scale));
            new_data.push((
                cut.apply_a(&lora.read_a(i).unwrap(), m.d_in),
                cut.apply_b(&lora.read_b(i).unwrap(), m.d_out),
            ));
            cut.apply_stats(&mut rotated.modules[i]);
        }
        let small = LoraSet::with_modules(&weights, &specs, &backend).unwrap();
        for (i, (a, bb)) in new_data.iter().enumerate() {
            small.write_a(i, a).unwrap();
            small.write_b(i, bb).unwrap();
        }
        assert_eq!(small.n_params() * r, lora.n_params() * k_true);
        let after = logits(&mut backend, &weights, Some(&small), &b);
        let change = rel_diff(&before, &after);

        // The new graph's statistics equal the host-rotated ones (u' = Lᵀu, g' = Wᵀg).
        let sig2 = measure(&mut backend, &weights, &small, &b);
        let mut worst_rot = 0f64;
        for (i, (sa, sg)) in sig2.iter().enumerate() {
            let m = &rotated.modules[i];
            for (graph, host) in [(sa, &m.sigma_a), (sg, &m.sigma_g)] {
                let host32: Vec<f32> = host.iter().map(|&v| v as f32).collect();
                worst_rot = worst_rot.max(rel_diff(&host32, graph));
            }
        }
        println!(
            "two_sided {two_sided}: params {} → {}; adapter moves logits by {adapter_effect:.2e} (rel), the cut by {change:.2e}; rotated Σ vs new graph {worst_rot:.2e}",
            lora.n_params(),
            small.n_params()
        );
        assert!(adapter_effect > 1e-2, "the adapter should matter ({adapter_effect:.2e})");
        assert!(change < 1e-5, "logits changed by {change:.2e} at a cut with no dropped energy");
        assert!(
            worst_rot < 1e-4,
            "rotated statistics differ from the new graph's ({worst_rot:.2e})"
        );
    }

    // A τ that drops energy: k from the energy rule, B'·A' = B·P_g·P_a·A.
    let cfg = GritConfig {
        rank_energy: 0.7,
        rank_min: 1,
        rank_start: Some(0),
        rank_signal: RankSignal::Input,
        ..GritConfig::default()
    };
    let mut ks = Vec::new();
    let mut worst = 0f64;
    for (i, m) in lora.modules().iter().enumerate() {
        let km = &kfac.modules[i];
        let cut =
            Cut::plan(km, &gram_b(&lora.read_b(i).unwrap(), m.d_out, r), &cfg, 100, r).unwrap();
        let ea = linalg::eigh(&km.sigma_a, r);
        let k = rank_by_energy(&ea.values, 0.7, 1, r);
        assert_eq!(cut.k, k);
        ks.push(k);
        let (va, vg) = (ea.top(k), linalg::eigh(&km.sigma_g, r).top(k));
        let p = |v: &[f64]| linalg::matmul(v, &linalg::transpose(v, r, k), r, k, r);
        let a: Vec<f64> = lora.read_a(i).unwrap().iter().map(|&v| v as f64).collect();
        let bm: Vec<f64> = lora.read_b(i).unwrap().iter().map(|&v| v as f64).collect();
        let want = linalg::matmul(
            &linalg::matmul(&linalg::matmul(&bm, &p(&vg), m.d_out, r, r), &p(&va), m.d_out, r, r),
            &a,
            m.d_out,
            r,
            m.d_in,
        );
        let an: Vec<f64> =
            cut.apply_a(&lora.read_a(i).unwrap(), m.d_in).iter().map(|&v| v as f64).collect();
        let bn: Vec<f64> =
            cut.apply_b(&lora.read_b(i).unwrap(), m.d_out).iter().map(|&v| v as f64).collect();
        let got = linalg::matmul(&bn, &an, m.d_out, k, m.d_in);
        let d = want.iter().zip(&got).fold(0f64, |mx, (x, y)| mx.max((x - y).abs()));
        worst = worst.max(d / linalg::max_abs(&want));
    }
    println!("τ = 0.7: kept ranks {ks:?}; worst |B'A' − B·P_g·P_a·A| / max {worst:.2e}");
    assert!(ks.iter().all(|&k| k < k_true));
    assert!(worst < 1e-6);
}
