//! GRIT's graph parts on a tiny random F32 model, against independent f64 host computations:
//! - Σ_a, Σ_g read back from the graph on a batch with masked (untrained) tokens;
//! - g = ∂L/∂u itself, through a finite-difference directional derivative of the loss;
//! - preconditioned gradients for both pairings and both damping modes;
//! - the regularizer's value and gradients, alone and as a second loss next to the CE.

use grit::ggml::{Backend, Capacity, Computation, Context, Tensor};
use grit::gguf::GgufFile;
use grit::grit::config::{Damping, GritConfig, KfacStats, Pairing};
use grit::grit::linalg;
use grit::grit::precondition::{self, PrecondInputs, Preconditioner};
use grit::grit::regularize::{self, RegGraph};
use grit::grit::stats::{token_weights, KfacState, StatsGraph};
use grit::model::{
    write_tiny_model, Batch, GraphOptions, LoraConfig, LoraSet, Outputs, TinySpec, TrainGraph,
    Weights,
};

fn tiny_model(dir: &std::path::Path) -> std::path::PathBuf {
    let tok = grit::fetch::ensure_default_model().expect("default model (tokenizer source)");
    let path = dir.join("tiny.gguf");
    let spec = TinySpec {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        seed: 21,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &tok).unwrap();
    path
}

/// 24 tokens; trained rows 6..=13 and 17..=21: tokens 0..=5 (a "prompt"), 14..=16 (masked
/// turn) and 22..=23 are not trained.
fn masked_batch() -> Batch {
    let tokens: Vec<i32> = (0..24).map(|i| (i * 769 + 41) % 4000 + 10).collect();
    let rows: Vec<i32> = (6..14).chain(17..22).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    Batch::causal(&tokens, &rows, &labels).unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// Σ_t∈S v_t·v_tᵀ / |S| for v r×n (column t = token t), row-major r×r.
fn host_gram(v: &[f64], r: usize, n: usize, tokens: &[usize]) -> Vec<f64> {
    let mut s = vec![0.0; r * r];
    for &t in tokens {
        for i in 0..r {
            for j in 0..r {
                s[i * r + j] += v[i * n + t] * v[j * n + t];
            }
        }
    }
    s.iter().map(|x| x / tokens.len() as f64).collect()
}

/// ggml [r, n] (ne0 = r) data → row-major r×n (row i = rank coordinate, column t = token).
fn rank_major(d: &[f32], r: usize, n: usize) -> Vec<f64> {
    let mut m = vec![0.0; r * n];
    for t in 0..n {
        for i in 0..r {
            m[i * n + t] = d[t * r + i] as f64;
        }
    }
    m
}

fn run_loss<'a>(run: &mut Computation<'_, 'a>, loss: Tensor<'a>) -> f64 {
    run.reset_grads();
    run.run().unwrap();
    run.read_f32(loss).unwrap()[0] as f64
}

#[test]
fn kfac_statistics_from_the_graph_match_the_host_on_a_masked_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(5, 0.1, 0.1).unwrap(); // B ≠ 0, so g ≠ 0
    lora.mark_params();
    let b = masked_batch();
    let n = b.n_tokens();

    let cap = TrainGraph::capacity(&weights, Some(&lora), true);
    let ctx = Context::new(Capacity::graph(cap.tensors + 2000, 2 * cap.graph_nodes, true)).unwrap();
    let mut g = TrainGraph::build(
        &ctx,
        &weights,
        Some(&lora),
        n,
        GraphOptions::loss(Outputs::Rows(b.n_rows())),
    );
    g.graph.build_backward_expand(&ctx);
    let stats = StatsGraph::build(&ctx, &g.graph, &g.taps, &lora);
    assert_eq!(stats.modules.len(), lora.modules().len());
    for t in stats.outputs() {
        g.graph.build_forward_expand(t);
    }
    for m in &stats.modules {
        m.u.set_output();
        m.g.set_output();
    }
    for tap in &g.taps {
        tap.x.set_output();
    }
    let mut run = backend.compute(&g.graph).unwrap();
    g.set_inputs(&mut run, &b).unwrap();
    let (w, n_counted) = token_weights(n, &b.rows);
    assert_eq!(n_counted, 13);
    stats.set_weights(&mut run, &w).unwrap();
    let loss = g.loss.unwrap();
    let l0 = run_loss(&mut run, loss);
    let sigmas = stats.read(&run).unwrap();

    let counted: Vec<usize> = b.rows.iter().map(|&r| r as usize).collect();
    let masked: Vec<usize> = (0..n).filter(|t| !counted.contains(t)).collect();
    let (mut worst_a, mut worst_g, mut worst_u) = (0f64, 0f64, 0f64);
    let mut masked_effect = f64::INFINITY;
    let mut prompt_g = 0f64;
    let mut fd_worst = 0f64;
    for (k, sm) in stats.modules.iter().enumerate() {
        let m = &lora.modules()[sm.module];
        let r = m.rank;
        let tap = g.taps.iter().find(|t| t.layer == m.layer && t.target == m.target).unwrap();
        // u on the host: A (r×d_in) · x (x read back, ggml [d_in, n]).
        let a: Vec<f64> = lora.read_a(sm.module).unwrap().iter().map(|&v| v as f64).collect();
        let xg = run.read_f32(tap.x).unwrap();
        let x = linalg::transpose(&xg.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, m.d_in); // d_in×n
        let u = linalg::matmul(&a, &x, r, m.d_in, n); // r×n
        let u_graph = rank_major(&run.read_f32(sm.u).unwrap(), r, n);
        worst_u = worst_u.max(max_abs_diff(&u, &u_graph) / linalg::max_abs(&u));
        let gm = rank_major(&run.read_f32(sm.g).unwrap(), r, n); // r×n, ∂L/∂u
        let (sa, sg) = (host_gram(&u, r, n, &counted), host_gram(&gm, r, n, &counted));
        let ga: Vec<f64> = sigmas[k].0.iter().map(|&v| v as f64).collect();
        let gg: Vec<f64> = sigmas[k].1.iter().map(|&v| v as f64).collect();
        worst_a = worst_a.max(max_abs_diff(&sa, &ga) / linalg::max_abs(&sa));
        worst_g = worst_g.max(max_abs_diff(&sg, &gg) / linalg::max_abs(&sg));
        // The masked tokens matter: the statistics over every token differ.
        let all: Vec<usize> = (0..n).collect();
        masked_effect =
            masked_effect.min(max_abs_diff(&host_gram(&u, r, n, &all), &sa) / linalg::max_abs(&sa));
        // Prompt tokens do get a gradient (later trained tokens attend to them) — excluded
        // by the weights, not by being zero.
        prompt_g = prompt_g.max(
            masked
                .iter()
                .filter(|&&t| t < 6)
                .map(|&t| (0..r).map(|i| gm[i * n + t].abs()).fold(0.0, f64::max))
                .fold(0.0, f64::max)
                / linalg::max_abs(&gm),
        );

        // g itself against finite differences (layer 0): along Δ = ∇A/‖∇A‖ with
        // ∇A = Σ_t g_t·x_tᵀ from the read-back g and x, dL/dε = ‖∇A‖_F.
        if m.layer == 0 {
            let grad_a = linalg::matmul(&gm, &linalg::transpose(&x, m.d_in, n), r, n, m.d_in); // r×d_in
            let norm = grad_a.iter().map(|v| v * v).sum::<f64>().sqrt();
            let a32 = lora.read_a(sm.module).unwrap();
            let eps = 1e-2;
            let at = |e: f64| -> Vec<f32> {
                a32.iter().zip(&grad_a).map(|(&v, &d)| (v as f64 + e * d / norm) as f32).collect()
            };
            lora.write_a(sm.module, &at(eps)).unwrap();
            let lp = run_loss(&mut run, loss);
            lora.write_a(sm.module, &at(-eps)).unwrap();
            let lm = run_loss(&mut run, loss);
            lora.write_a(sm.module, &a32).unwrap();
            run_loss(&mut run, loss); // restore every node's value for the next modules' reads
            let fd = (lp - lm) / (2.0 * eps);
            let rel = (fd - norm).abs() / norm;
            println!(
                "{}: dL/dε finite difference {fd:.6e}, Σ_t gᵀΔx {norm:.6e}, rel err {rel:.2e}",
                m.base_name()
            );
            fd_worst = fd_worst.max(rel);
        }
    }
    assert!((run_loss(&mut run, loss) - l0).abs() < 1e-6, "A was not restored");
    println!("loss {l0:.4}; {} modules, {n_counted} of {n} tokens counted", stats.modules.len());
    println!("worst relative error: u {worst_u:.2e}, Σ_a {worst_a:.2e}, Σ_g {worst_g:.2e}; g finite differences {fd_worst:.2e}");
    println!("smallest effect of the masked tokens on Σ_a {masked_effect:.2e}; largest |g| on prompt tokens (relative) {prompt_g:.2e}");
    // f32 graph sums over ≤ 24 tokens vs f64: ~1e-7 relative; bound 1e-5.
    assert!(
        worst_u < 1e-5 && worst_a < 1e-5 && worst_g < 1e-5,
        "graph statistics differ from the host"
    );
    assert!(fd_worst < 1e-2, "g disagrees with finite differences of the loss ({fd_worst:.2e})");
    assert!(
        masked_effect > 1e-3,
        "masked tokens should change the statistics if they were counted"
    );
    assert!(prompt_g > 1e-3, "prompt tokens should carry gradient (excluded only by the weights)");

    // Host accumulation of the graph's statistics: EMA over two steps with β = 0.95.
    let mut kfac = KfacState::new(&lora, KfacStats::Ema, 0.95);
    for (i, (sa, sg)) in sigmas.iter().enumerate() {
        kfac.accumulate(stats.modules[i].module, sa, sg, n_counted, 1.0);
    }
    kfac.commit();
    assert_eq!(kfac.modules[0].sigma_a[0], sigmas[0].0[0] as f64);
}

/// Preconditioning in the graph, per module of a LoRA set, against the f64 host reference,
/// for both pairings and both damping modes. Factors as in the spec's measurement: Σ_a O(1),
/// Σ_g ~1e-10.
#[test]
fn preconditioned_gradients_match_the_host_for_both_pairings_and_dampings() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 16, alpha: 32.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();

    let ctx = Context::new(Capacity::graph(64 + 10 * lora.modules().len(), 512, false)).unwrap();
    let mut graph = ctx.new_graph(512, false);
    let inputs = PrecondInputs::new(&ctx, &lora);
    let mut nodes = Vec::new();
    for (i, m) in lora.modules().iter().enumerate() {
        let ga = ctx.new_f32(&format!("ga{i}"), &[m.d_in as i64, m.rank as i64]).set_input();
        let gb = ctx.new_f32(&format!("gb{i}"), &[m.rank as i64, m.d_out as i64]).set_input();
        let (pa, pb) = inputs.modules[i];
        let (oa, ob) = precondition::precondition(&ctx, ga, gb, pa, pb);
        graph.build_forward_expand(oa.set_output());
        graph.build_forward_expand(ob.set_output());
        nodes.push((ga, gb, oa, ob));
    }
    let mut rng = 1u64;
    let mut rnd = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let r = 16;
    let spd = |rnd: &mut dyn FnMut() -> f64, scale: f64| {
        let x: Vec<f64> = (0..r * 40).map(|_| rnd()).collect();
        let s = linalg::matmul(&x, &linalg::transpose(&x, r, 40), r, 40, r);
        // A decaying spectrum: scale row/column i by 1/(1+i).
        (0..r * r).map(|k| s[k] * scale / ((1 + k / r) * (1 + k % r)) as f64).collect::<Vec<f64>>()
    };
    let kfac: Vec<(Vec<f64>, Vec<f64>)> = (0..lora.modules().len())
        .map(|_| (spd(&mut rnd, 1.0 / 40.0), spd(&mut rnd, 1e-10 / 40.0)))
        .collect();
    let grads: Vec<(Vec<f32>, Vec<f32>)> = lora
        .modules()
        .iter()
        .map(|m| {
            (
                (0..m.d_in * r).map(|_| 1e-3 * rnd() as f32).collect(),
                (0..m.d_out * r).map(|_| 1e-3 * rnd() as f32).collect(),
            )
        })
        .collect();

    let mut run = backend.compute(&graph).unwrap();
    for (i, (ga, gb, _, _)) in nodes.iter().enumerate() {
        run.write_f32(*ga, &grads[i].0).unwrap();
        run.write_f32(*gb, &grads[i].1).unwrap();
    }
    let mut worst = 0f64;
    for pairing in [Pairing::Textbook, Pairing::Reference] {
        for damping in [Damping::Relative, Damping::Absolute] {
            let cfg = GritConfig { kfac_pairing: pairing, damping, ..GritConfig::default() };
            let p: Vec<Preconditioner> = kfac
                .iter()
                .map(|(sa, sg)| {
                    Preconditioner::new(
                        sa,
                        sg,
                        r,
                        pairing,
                        damping,
                        cfg.damping_rel,
                        cfg.lambda_abs(),
                    )
                })
                .collect();
            inputs.set(&mut run, &p).unwrap();
            run.run().unwrap();
            let mut w = 0f64;
            for (i, m) in lora.modules().iter().enumerate() {
                let (ha, hb) =
                    precondition::apply_host(&p[i], &grads[i].0, &grads[i].1, m.d_in, m.d_out);
                let oa: Vec<f64> =
                    run.read_f32(nodes[i].2).unwrap().iter().map(|&v| v as f64).collect();
                let ob: Vec<f64> =
                    run.read_f32(nodes[i].3).unwrap().iter().map(|&v| v as f64).collect();
                w = w
                    .max(max_abs_diff(&ha, &oa) / linalg::max_abs(&ha))
                    .max(max_abs_diff(&hb, &ob) / linalg::max_abs(&hb));
            }
            let (la, lg) = (p[0].inv_a.lambda_used, p[0].inv_g.lambda_used);
            println!("{pairing:?} / {damping:?}: λ_a {la:.2e} λ_g {lg:.2e}; worst relative difference graph vs host {w:.2e}");
            worst = worst.max(w);
        }
    }
    // f32 inputs (inverses rounded to f32) and f32 accumulation over r = 16 terms.
    assert!(worst < 1e-5, "graph preconditioning differs from the host reference ({worst:.2e})");
}

/// The regularizer's value and gradients against the host formulas, alone and as a second
/// loss beside the CE (gradients add up).
#[test]
fn regularizer_value_and_gradients_match_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(8, 0.1, 0.1).unwrap();
    lora.mark_params();
    let r = 4;
    let (lambda_k, lambda_r, ramp) = (0.5, 0.3, 0.7);

    // Statistics and projectors: half the modules with soft-cut projectors (λ_R active).
    let mut kfac = KfacState::new(&lora, KfacStats::Ema, 0.95);
    for (i, m) in kfac.modules.iter_mut().enumerate() {
        let x: Vec<f64> =
            (0..r * 6).map(|k| (((k * 37 + i * 11) % 17) as f64 - 8.0) / 8.0).collect();
        m.sigma_a = linalg::matmul(&x, &linalg::transpose(&x, r, 6), r, 6, r);
        m.sigma_g = m.sigma_a.iter().map(|v| v * 0.01).collect();
        if i % 2 == 0 {
            let v = linalg::eigh(&m.sigma_a, r).top(2);
            m.proj_a = Some(linalg::matmul(&v, &linalg::transpose(&v, r, 2), r, 2, r));
            let v = linalg::eigh(&x[..r * r], r).top(3);
            m.proj_g = Some(linalg::matmul(&v, &linalg::transpose(&v, r, 3), r, 3, r));
        }
    }
    let coeffs: Vec<(Vec<f64>, Vec<f64>)> =
        kfac.modules.iter().map(|m| regularize::coefficients(m, lambda_k, lambda_r)).collect();

    // Alone.
    let ctx = Context::new(Capacity::graph(4096, 4096, true)).unwrap();
    let mut graph = ctx.new_graph(4096, true);
    let reg = RegGraph::build(&ctx, &lora);
    reg.loss.set_loss();
    graph.build_forward_expand(reg.loss);
    graph.build_backward_expand(&ctx);
    let mut run = backend.compute(&graph).unwrap();
    reg.set(&mut run, ramp, &coeffs).unwrap();
    let value = run_loss(&mut run, reg.loss);
    let mut want = 0.0;
    let mut worst_grad = 0f64;
    let mut reg_grads = Vec::new();
    for (i, m) in lora.modules().iter().enumerate() {
        let (a, b) = (lora.read_a(i).unwrap(), lora.read_b(i).unwrap());
        want += ramp
            * regularize::penalty_host(
                &a,
                &b,
                r,
                m.d_in,
                m.d_out,
                &kfac.modules[i],
                lambda_k,
                lambda_r,
            );
        let (ha, hb) =
            regularize::penalty_grads_host(&a, &b, r, m.d_in, m.d_out, &coeffs[i].0, &coeffs[i].1);
        let ga: Vec<f64> = run
            .read_f32(graph.grad(lora.a(m)).unwrap())
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let gb: Vec<f64> = run
            .read_f32(graph.grad(lora.b(m)).unwrap())
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (ha, hb): (Vec<f64>, Vec<f64>) =
            (ha.iter().map(|v| v * ramp).collect(), hb.iter().map(|v| v * ramp).collect());
        worst_grad = worst_grad
            .max(max_abs_diff(&ha, &ga) / linalg::max_abs(&ha))
            .max(max_abs_diff(&hb, &gb) / linalg::max_abs(&hb));
        reg_grads.push((ga, gb));
    }
    drop(run);
    let rel = (value - want).abs() / want.abs();
    println!("regularizer {value:.6e} (host {want:.6e}, rel {rel:.2e}); worst gradient rel diff {worst_grad:.2e}");
    assert!(rel < 1e-5 && worst_grad < 1e-5);

    // As a second loss next to the CE: gradients = CE gradients + regularizer gradients.
    let b = masked_batch();
    let grads_of = |backend: &mut Backend, with_reg: bool| -> Vec<(Vec<f64>, Vec<f64>)> {
        let cap = TrainGraph::capacity(&weights, Some(&lora), true);
        let ctx = Context::new(Capacity::graph(cap.tensors + 2000, cap.graph_nodes + 2000, true))
            .unwrap();
        let mut g = TrainGraph::build(
            &ctx,
            &weights,
            Some(&lora),
            b.n_tokens(),
            GraphOptions::loss(Outputs::Rows(b.n_rows())),
        );
        let reg = with_reg.then(|| {
            let reg = RegGraph::build(&ctx, &lora);
            reg.loss.set_loss();
            g.graph.build_forward_expand(reg.loss);
            reg
        });
        g.graph.build_backward_expand(&ctx);
        let mut run = backend.compute(&g.graph).unwrap();
        g.set_inputs(&mut run, &b).unwrap();
        if let Some(reg) = &reg {
            reg.set(&mut run, ramp, &coeffs).unwrap();
        }
        run.reset_grads();
        run.run().unwrap();
        lora.modules()
            .iter()
            .map(|m| {
                let rd = |t| {
                    run.read_f32(g.graph.grad(t).unwrap())
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect::<Vec<f64>>()
                };
                (rd(lora.a(m)), rd(lora.b(m)))
            })
            .collect()
    };
    let ce = grads_of(&mut backend, false);
    let both = grads_of(&mut backend, true);
    let mut worst_sum = 0f64;
    for i in 0..ce.len() {
        for (c, rg, t) in
            [(&ce[i].0, &reg_grads[i].0, &both[i].0), (&ce[i].1, &reg_grads[i].1, &both[i].1)]
        {
            let sum: Vec<f64> = c.iter().zip(rg).map(|(x, y)| x + y).collect();
            worst_sum = worst_sum.max(max_abs_diff(&sum, t) / linalg::max_abs(&sum));
        }
    }
    println!("CE + regularizer as two losses: worst rel diff to the sum of the separate gradients {worst_sum:.2e}");
    assert!(worst_sum < 1e-5);
}

/// The trainer's recipe end to end on one micro-step graph: regularizer as a second loss,
/// backward, statistics nodes, then the frozen-backward rewrite with the statistics as extra
/// outputs (both losses' gradients seeded with 1 by hand). Σ_a, Σ_g and the parameter
/// gradients equal those of the plain graph (stock autodiff, `reset_grads`).
#[test]
fn statistics_and_regularizer_survive_the_frozen_backward_rewrite() {
    use grit::train::config::WeightCopies;
    use grit::train::copies::FrozenCopies;

    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(12, 0.1, 0.1).unwrap();
    lora.mark_params();
    // F32 transposed copies: the rewrite is then exact up to summation order.
    let copies = FrozenCopies::build(&weights, WeightCopies::F32, false, &backend).unwrap();
    let b = masked_batch();
    let (w, _) = token_weights(b.n_tokens(), &b.rows);
    let mut kfac = KfacState::new(&lora, KfacStats::Ema, 0.95);
    for m in kfac.modules.iter_mut() {
        m.sigma_a = linalg::identity(4).iter().map(|v| v * 0.3).collect();
        m.sigma_g = linalg::identity(4).iter().map(|v| v * 0.01).collect();
    }
    let coeffs: Vec<(Vec<f64>, Vec<f64>)> =
        kfac.modules.iter().map(|m| regularize::coefficients(m, 1e-2, 0.0)).collect();

    type Out = (Vec<(Vec<f32>, Vec<f32>)>, Vec<(Vec<f32>, Vec<f32>)>, f32, f32);
    let run_graph = |backend: &mut Backend, rewrite: bool| -> Out {
        let cap = TrainGraph::capacity(&weights, Some(&lora), true);
        let ctx =
            Context::new(Capacity::graph(cap.tensors + 4000, 2 * cap.graph_nodes, true)).unwrap();
        let mut g = TrainGraph::build(
            &ctx,
            &weights,
            Some(&lora),
            b.n_tokens(),
            GraphOptions::loss(Outputs::Rows(b.n_rows())),
        );
        let reg = RegGraph::build(&ctx, &lora);
        reg.loss.set_loss();
        g.graph.build_forward_expand(reg.loss);
        g.graph.build_backward_expand(&ctx);
        let stats = StatsGraph::build(&ctx, &g.graph, &g.taps, &lora);
        let loss = g.loss.unwrap();
        let seeds = [
            g.graph.grad_acc(loss).unwrap().set_input(),
            g.graph.grad_acc(reg.loss).unwrap().set_input(),
        ];
        let grads: Vec<(Tensor, Tensor)> = lora
            .modules()
            .iter()
            .map(|m| (g.graph.grad(lora.a(m)).unwrap(), g.graph.grad(lora.b(m)).unwrap()))
            .collect();
        let rebuilt;
        let graph = if rewrite {
            let map = copies.map(&weights);
            let (gr, st) =
                grit::ggml::rebuild_frozen_backward(&ctx, &g.graph, &map, &stats.outputs());
            assert!(st.persistent > 0);
            rebuilt = gr;
            &rebuilt
        } else {
            for t in stats.outputs() {
                g.graph.build_forward_expand(t);
            }
            &g.graph
        };
        let mut run = backend.compute(graph).unwrap();
        g.set_inputs(&mut run, &b).unwrap();
        stats.set_weights(&mut run, &w).unwrap();
        reg.set(&mut run, 1.0, &coeffs).unwrap();
        if rewrite {
            for s in seeds {
                run.write_f32(s, &[1.0]).unwrap();
            }
        } else {
            run.reset_grads();
        }
        run.run().unwrap();
        let gr = grads
            .iter()
            .map(|&(a, bb)| (run.read_f32(a).unwrap(), run.read_f32(bb).unwrap()))
            .collect();
        (
            stats.read(&run).unwrap(),
            gr,
            run.read_f32(loss).unwrap()[0],
            run.read_f32(reg.loss).unwrap()[0],
        )
    };
    let plain = run_graph(&mut backend, false);
    let rewritten = run_graph(&mut backend, true);
    let rel = |a: &[f32], b: &[f32]| {
        let d = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
        d / a.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30)
    };
    let mut worst_s = 0f64;
    let mut worst_g = 0f64;
    for i in 0..plain.0.len() {
        worst_s = worst_s
            .max(rel(&plain.0[i].0, &rewritten.0[i].0))
            .max(rel(&plain.0[i].1, &rewritten.0[i].1));
        worst_g = worst_g
            .max(rel(&plain.1[i].0, &rewritten.1[i].0))
            .max(rel(&plain.1[i].1, &rewritten.1[i].1));
    }
    println!("CE {} / {}, regularizer {} / {}; rewritten vs plain: Σ {worst_s:.2e}, gradients {worst_g:.2e}", plain.2, rewritten.2, plain.3, rewritten.3);
    assert!(
        plain.3 > 0.0
            && (plain.2 - rewritten.2).abs() < 1e-5
            && (plain.3 - rewritten.3).abs() < 1e-6 * plain.3
    );
    assert!(worst_s < 1e-4 && worst_g < 1e-4, "the rewrite changed the statistics or gradients");
}
