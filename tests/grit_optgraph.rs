//! The trainer's optimizer graph with GRIT preconditioning (`OptGraph::build` with `OptOptions::precondition`): with
//! identity preconditioners it steps exactly as LoRA's graph; with real ones, the gradient
//! norm it clips by is that of the mean gradients preconditioned on the host.

use grit::ggml::{Backend, Context};
use grit::gguf::GgufFile;
use grit::grit::linalg;
use grit::grit::precondition::{self, Preconditioner};
use grit::grit::{Damping, Pairing};
use grit::model::{write_tiny_model, LoraConfig, LoraSet, TinySpec, Weights};
use grit::train::engine::{self, AdamStep, OptGraph, OptOptions, OptState};

#[test]
fn preconditioned_optimizer_step() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_embd: 64,
        n_layer: 1,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        seed: 3,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &grit::fetch::ensure_default_model().unwrap()).unwrap();
    let mut backend = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let r = 4;
    let n_micro = 2;
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: r, alpha: 8.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    let mut rng = 7u64;
    let mut rnd = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let n = lora.modules().len();
    let init: Vec<(Vec<f32>, Vec<f32>)> = lora
        .modules()
        .iter()
        .map(|m| {
            (
                (0..m.d_in * r).map(|_| 0.1 * rnd() as f32).collect(),
                (0..m.d_out * r).map(|_| 0.1 * rnd() as f32).collect(),
            )
        })
        .collect();
    let accs: Vec<(Vec<f32>, Vec<f32>)> = lora
        .modules()
        .iter()
        .map(|m| {
            (
                (0..m.d_in * r).map(|_| 1e-2 * rnd() as f32).collect(),
                (0..m.d_out * r).map(|_| 1e-2 * rnd() as f32).collect(),
            )
        })
        .collect();
    let adam = AdamStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, t: 1 };

    // One optimizer step; returns (norm, parameters after).
    let mut step =
        |precond: Option<&[Preconditioner]>, graft: bool| -> (f32, Vec<(Vec<f32>, Vec<f32>)>) {
            let opt = OptState::new(&lora, &backend).unwrap();
            for i in 0..n {
                lora.write_a(i, &init[i].0).unwrap();
                lora.write_b(i, &init[i].1).unwrap();
                opt.write(i, 2, &accs[i].0).unwrap();
                opt.write(i, 5, &accs[i].1).unwrap();
            }
            lora.mark_params();
            let ctx = Context::new(engine::opt_capacity(&lora)).unwrap();
            let g = OptGraph::build(
                &ctx,
                &lora,
                &opt,
                &OptOptions {
                    n_micro,
                    max_grad_norm: 1e6,
                    precondition: precond.is_some(),
                    graft,
                    loss_scale: 1.0,
                },
            );
            let mut run = backend.compute(&g.graph).unwrap();
            if let (Some(pi), Some(p)) = (&g.precond, precond) {
                pi.set(&mut run, p).unwrap();
            }
            run.write_f32(g.adamw, &adam.params()).unwrap();
            run.write_f32(g.max_norm, &[1e6]).unwrap();
            run.run().unwrap();
            let norm = run.read_f32(g.norm).unwrap()[0];
            drop(run);
            (norm, (0..n).map(|i| (lora.read_a(i).unwrap(), lora.read_b(i).unwrap())).collect())
        };
    let plain = step(None, false);
    let ident: Vec<Preconditioner> = (0..n).map(|_| Preconditioner::identity(r)).collect();
    let with_identity = step(Some(&ident), false);
    assert_eq!(plain, with_identity, "identity preconditioning changed the step");

    let spd = |rnd: &mut dyn FnMut() -> f64, scale: f64| {
        let x: Vec<f64> = (0..r * 12).map(|_| rnd()).collect();
        linalg::matmul(&x, &linalg::transpose(&x, r, 12), r, 12, r)
            .into_iter()
            .map(|v| v * scale)
            .collect::<Vec<f64>>()
    };
    let p: Vec<Preconditioner> = (0..n)
        .map(|_| {
            Preconditioner::new(
                &spd(&mut rnd, 0.1),
                &spd(&mut rnd, 1e-9),
                r,
                Pairing::Textbook,
                Damping::Relative,
                0.1,
                0.0,
            )
        })
        .collect();
    let (norm, after) = step(Some(&p), false);
    let mut sq = 0f64;
    for (i, m) in lora.modules().iter().enumerate() {
        let mean = |v: &[f32]| v.iter().map(|x| x / n_micro as f32).collect::<Vec<f32>>();
        let (ha, hb) =
            precondition::apply_host(&p[i], &mean(&accs[i].0), &mean(&accs[i].1), m.d_in, m.d_out);
        sq += ha.iter().chain(&hb).map(|v| v * v).sum::<f64>();
    }
    let host = sq.sqrt();
    println!("norm: plain {} · preconditioned graph {norm} · host {host}", plain.0);
    assert!(((norm as f64 - host) / host).abs() < 1e-4, "graph norm {norm} vs host {host}");
    assert!(
        (norm - plain.0).abs() > 1e-3 * plain.0,
        "preconditioning did not change the gradients"
    );
    assert_ne!(after, plain.1);

    // Grafting: each module's preconditioned ∇A and ∇B are rescaled to the raw norms, so the
    // global norm is the raw one while the parameters move differently (Adam's first step
    // is elementwise g/|g|: a changed direction shows up as changed signs).
    let (g_norm, g_after) = step(Some(&p), true);
    assert!(
        ((g_norm - plain.0) / plain.0).abs() < 1e-5,
        "grafted norm {g_norm} vs raw {}",
        plain.0
    );
    assert_ne!(g_after, plain.1, "grafting undid the preconditioning");
    let id_graft = step(Some(&ident), true);
    assert!((id_graft.0 - plain.0).abs() <= 1e-6 * plain.0);
}
