//! Smoke test that the training forward graph supports ggml's backward: LoRA gradients on a
//! tiny F32 model against central finite differences of the graph's own loss (a few of the
//! largest entries per module kind). The full gradient check (all base types, weight-copy
//! modes) belongs to the training engine's tests.

use grit::ggml::{Backend, Computation, Context, Tensor};
use grit::gguf::GgufFile;
use grit::model::{write_tiny_model, Batch, LoraConfig, LoraSet, Outputs, TinySpec, TrainGraph, Weights};

#[test]
fn lora_gradients_match_finite_differences() {
    let model_path = grit::fetch::default_model_path();
    assert!(model_path.exists(), "the default model (tokenizer source) is missing at {}", model_path.display());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec { n_embd: 32, n_layer: 2, n_head: 4, n_head_kv: 2, n_ff: 64, rope_freqs: true, seed: 11, ..TinySpec::default() };
    write_tiny_model(&path, &spec, &model_path).unwrap();

    let mut backend = Backend::cpu(0).unwrap();
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(&weights, &LoraConfig { rank: 2, alpha: 4.0, ..LoraConfig::default() }, &backend).unwrap();
    lora.randomize(3, 0.1, 0.1).unwrap();
    lora.mark_params();

    let tokens: Vec<i32> = (0..24).map(|i| (i * 997 + 13) % 5000).collect();
    let rows: Vec<i32> = (4..23).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    let batch = Batch::causal(&tokens, &rows, &labels).unwrap();

    let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), true)).unwrap();
    let mut g = TrainGraph::build(&ctx, &weights, Some(&lora), tokens.len(), Outputs::Rows(rows.len()), true);
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
            let mut values = if which == "A" { lora.read_a(i).unwrap() } else { lora.read_b(i).unwrap() };
            for &k in order.iter().take(3) {
                let v = values[k];
                let mut at = |x: f32| {
                    values[k] = x;
                    if which == "A" { lora.write_a(i, &values).unwrap() } else { lora.write_b(i, &values).unwrap() }
                };
                at(v + eps);
                let lp = run_loss(&mut run, loss_tensor);
                at(v - eps);
                let lm = run_loss(&mut run, loss_tensor);
                at(v);
                let fd = (lp - lm) / (2.0 * eps);
                let rel = (fd - grad[k]).abs() / grad[k].abs().max(1e-3);
                worst = worst.max(rel);
                println!("{} {which}[{k}]: analytic {:+.5e} finite difference {:+.5e} rel err {rel:.2e}", m.base_name(), grad[k], fd);
            }
        }
    }
    println!("worst relative error {worst:.2e}");
    assert!(worst < 5e-3, "LoRA gradients disagree with finite differences (worst relative error {worst})");
}

/// One forward + backward run; returns the loss.
fn run_loss<'a>(run: &mut Computation<'_, 'a>, loss: Tensor<'a>) -> f32 {
    run.reset_grads();
    run.run().unwrap();
    run.read_f32(loss).unwrap()[0]
}
