//! Smoke test that the training forward graph supports ggml's backward: LoRA gradients on a
//! tiny F32 model against central finite differences of the graph's own loss (a few of the
//! largest entries per module kind). The full gradient check (all base types, weight-copy
//! modes) belongs to the training engine's tests.

use grit::ggml::{Backend, Computation, Context, Tensor};
use grit::gguf::GgufFile;
use grit::model::{
    write_tiny_model, Batch, GraphOptions, LoraConfig, LoraSet, Outputs, TinySpec, TrainGraph,
    Weights,
};

#[test]
fn lora_gradients_match_finite_differences() {
    let model_path = grit::fetch::default_model_path();
    assert!(
        model_path.exists(),
        "the default model (tokenizer source) is missing at {}",
        model_path.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 64,
        rope_freqs: true,
        seed: 11,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &model_path).unwrap();

    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 2, alpha: 4.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(3, 0.1, 0.1).unwrap();
    lora.mark_params();

    let tokens: Vec<i32> = (0..24).map(|i| (i * 997 + 13) % 5000).collect();
    let rows: Vec<i32> = (4..23).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    let batch = Batch::causal(&tokens, &rows, &labels).unwrap();

    let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), true)).unwrap();
    let mut g = TrainGraph::build(
        &ctx,
        &weights,
        Some(&lora),
        tokens.len(),
        GraphOptions::loss(Outputs::Rows(rows.len())),
    );
    assert_eq!(g.taps.len(), lora.modules().len());
    g.graph.build_backward_expand(&ctx);
    let mut run = backend.compute(&g.graph).unwrap();
    g.set_inputs(&mut run, &batch).unwrap();
    let loss_tensor = g.loss.unwrap();
    let l0 = run_loss(&mut run, loss_tensor);
    println!("loss {l0}");

    let eps = 1e-2f32;
    let mut worst = 0f32;
    // Check the first layer's modules: A and B of each target.
    for (i, m) in lora.modules().iter().enumerate().filter(|(_, m)| m.layer == 0) {
        for which in ["A", "B"] {
            let t = if which == "A" { lora.a(m) } else { lora.b(m) };
            let _ = run_loss(&mut run, loss_tensor);
            let grad = run.read_f32(g.graph.grad(t).expect("gradient exists")).unwrap();
            let mut order: Vec<usize> = (0..grad.len()).collect();
            order.sort_by(|&x, &y| grad[y].abs().total_cmp(&grad[x].abs()));
            let mut values =
                if which == "A" { lora.read_a(i).unwrap() } else { lora.read_b(i).unwrap() };
            for &k in order.iter().take(3) {
                let v = values[k];
                let mut at = |x: f32| {
                    values[k] = x;
                    if which == "A" {
                        lora.write_a(i, &values).unwrap()
                    } else {
                        lora.write_b(i, &values).unwrap()
                    }
                };
                at(v + eps);
                let lp = run_loss(&mut run, loss_tensor);
                at(v - eps);
                let lm = run_loss(&mut run, loss_tensor);
                at(v);
                let fd = (lp - lm) / (2.0 * eps);
                let rel = (fd - grad[k]).abs() / grad[k].abs().max(1e-3);
                worst = worst.max(rel);
                println!(
                    "{} {which}[{k}]: analytic {:+.5e} finite difference {:+.5e} rel err {rel:.2e}",
                    m.base_name(),
                    grad[k],
                    fd
                );
            }
        }
    }
    println!("worst relative error {worst:.2e}");
    assert!(
        worst < 5e-3,
        "LoRA gradients disagree with finite differences (worst relative error {worst})"
    );
}

/// One forward + backward run; returns the loss.
fn run_loss<'a>(run: &mut Computation<'_, 'a>, loss: Tensor<'a>) -> f32 {
    run.reset_grads();
    run.run().unwrap();
    run.read_f32(loss).unwrap()[0]
}

/// LoRA dropout: the adapter reads mask ⊙ x. All-ones masks give exactly the graph without
/// dropout; drawn masks (p = 0.5) change the loss and the LoRA gradients (the mask is a
/// constant factor, so the gradient path is the plain one checked above).
#[test]
fn lora_dropout_masks_the_adapter_input() {
    let model_path = grit::fetch::default_model_path();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        n_embd: 32,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 64,
        seed: 5,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &model_path).unwrap();
    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 2, alpha: 4.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(3, 0.1, 0.1).unwrap();
    lora.mark_params();
    let tokens: Vec<i32> = (0..16).map(|i| (i * 389 + 7) % 5000).collect();
    let rows: Vec<i32> = (0..15).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    let batch = Batch::causal(&tokens, &rows, &labels).unwrap();

    let loss_and_grad = |dropout: Option<f32>| -> (f32, Vec<f32>) {
        let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), true)).unwrap();
        let mut g = TrainGraph::build(
            &ctx,
            &weights,
            Some(&lora),
            tokens.len(),
            GraphOptions {
                outputs: Outputs::Rows(rows.len()),
                loss: true,
                dropout: dropout.is_some(),
                backward: true,
            },
        );
        // q/k/v share one mask, gate/up another: 4 distinct inputs per layer.
        assert_eq!(g.dropout.len(), if dropout.is_some() { 4 * spec.n_layer } else { 0 });
        g.build_backward(&ctx);
        let mut backend = Backend::cpu(0).unwrap();
        let mut run = backend.compute(&g.graph).unwrap();
        g.set_inputs(&mut run, &batch).unwrap();
        match dropout {
            Some(p) if p > 0.0 => g.set_dropout(&mut run, p, 0, 1, 0).unwrap(),
            Some(_) => {
                for d in &g.dropout {
                    let ne = d.mask.ne();
                    run.write_f32(d.mask, &vec![1.0; (ne[0] * ne[1]) as usize]).unwrap();
                }
            }
            None => {}
        }
        let l = run_loss(&mut run, g.loss.unwrap());
        let m = &lora.modules()[0];
        (l, run.read_f32(g.graph.grad(lora.a(m)).unwrap()).unwrap())
    };
    let (l_none, g_none) = loss_and_grad(None);
    let (l_ones, g_ones) = loss_and_grad(Some(0.0));
    let (l_half, g_half) = loss_and_grad(Some(0.5));
    assert_eq!(l_none.to_bits(), l_ones.to_bits(), "all-ones masks must be the identity");
    assert_eq!(g_none, g_ones);
    assert!(
        (l_half - l_none).abs() > 1e-5,
        "dropout did not change the loss: {l_none} vs {l_half}"
    );
    let diff = g_none.iter().zip(&g_half).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-6, "dropout did not change ∇A");
    let _ = &mut backend;
}

#[test]
fn dropout_masks_are_inverted_seeded_and_independent() {
    let p = 0.25f32;
    let m = grit::model::dropout_mask(100_000, p, 7, 3, 0, 1);
    let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / m.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert!(m.iter().all(|&x| x == 0.0 || (x - 1.0 / 0.75).abs() < 1e-6));
    let mean = m.iter().map(|&x| x as f64).sum::<f64>() / m.len() as f64;
    assert!((mean - 1.0).abs() < 0.01, "inverted dropout keeps the mean: {mean}");
    assert_eq!(m, grit::model::dropout_mask(100_000, p, 7, 3, 0, 1), "same stream, same mask");
    for other in [
        grit::model::dropout_mask(100_000, p, 8, 3, 0, 1),
        grit::model::dropout_mask(100_000, p, 7, 4, 0, 1),
        grit::model::dropout_mask(100_000, p, 7, 3, 1, 1),
        grit::model::dropout_mask(100_000, p, 7, 3, 0, 2),
    ] {
        assert_ne!(m, other);
    }
}
