//! The fused CPU attention kernels (`ggml::attention`, used by the training step graph on the
//! CPU backend) against ggml's own ops and autodiff: same output, same ∂Q/∂K/∂V, on the
//! model's attention layout (GQA, causal mask with a packing boundary, rows of all lengths).

use std::time::Instant;

use grit::ggml::{rebuild_backward, Backend, Capacity, Context, FrozenMap, Tensor};

struct Run {
    out: Vec<f32>,
    grads: Vec<Vec<f32>>,
    attention: usize,
    seconds: f64,
}

fn rnd(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

fn run(fused: bool, d: i64, h: i64, g: i64, t: i64, boundary: i64, reps: usize) -> Run {
    let mut backend = Backend::cpu(2).unwrap();
    let ctx =
        Context::new(Capacity { tensors: 512, graphs: 2, graph_nodes: 4096, grads: true }).unwrap();
    let q = ctx.new_f32("q", &[d, h, t]).set_input().set_param();
    let k = ctx.new_f32("k", &[d, g, t]).set_input().set_param();
    let v = ctx.new_f32("v", &[d, g, t]).set_input().set_param();
    let mask = ctx.new_f32("mask", &[t, t]).set_input();
    let r = ctx.new_f32("r", &[d * h, t]).set_input();
    let scale = 1.0 / (d as f32).sqrt();
    // As in model::llama's attention.
    let qc = ctx.cont(ctx.permute(q, [0, 2, 1, 3])); // [d, t, h]
    let kp = ctx.permute(k, [0, 2, 1, 3]); // [d, t, g]
    let kq = ctx.mul_mat(kp, qc); // [t, t, h]
    let p = ctx.soft_max_ext(kq, Some(mask), scale, 0.0);
    let vt = ctx.cont(ctx.transpose(ctx.permute(v, [0, 2, 1, 3]))); // [t, d, g]
    let o = ctx.mul_mat(vt, p); // [d, t, h]
    let o2 = ctx.cont_2d(ctx.permute(o, [0, 2, 1, 3]), d * h, t).set_output();
    let loss = ctx.sum(ctx.mul(o2, r)).set_loss().set_output();
    let mut graph = ctx.new_graph(4096, true);
    graph.build_forward_expand(loss);
    graph.build_backward_expand(&ctx);
    let seed_t = graph.grad_acc(loss).unwrap().set_input();
    let grads: Vec<Tensor> =
        [q, k, v].iter().map(|&x| ctx.cont(graph.grad(x).unwrap()).set_output()).collect();
    let mut map = FrozenMap::new();
    map.cpu_kernels = fused;
    let extra: Vec<Tensor> = grads.clone();
    let (graph, stats) = rebuild_backward(&ctx, &graph, &map, &extra, None);
    let mut c = backend.compute(&graph).unwrap();
    let mut seed = 5u64;
    for (x, n) in [(q, d * h * t), (k, d * g * t), (v, d * g * t), (r, d * h * t)] {
        let data: Vec<f32> = (0..n).map(|_| rnd(&mut seed)).collect();
        c.write_f32(x, &data).unwrap();
    }
    let mut m = vec![f32::NEG_INFINITY; (t * t) as usize];
    for i in 0..t {
        let start = if i >= boundary { boundary } else { 0 };
        for j in start..=i {
            m[(i * t + j) as usize] = 0.0;
        }
    }
    c.write_f32(mask, &m).unwrap();
    c.write_f32(seed_t, &[1.0]).unwrap();
    c.run().unwrap();
    let t0 = Instant::now();
    for _ in 0..reps {
        c.run().unwrap();
    }
    let seconds = t0.elapsed().as_secs_f64() / reps.max(1) as f64;
    Run {
        out: c.read_f32(o2).unwrap(),
        grads: grads.iter().map(|&x| c.read_f32(x).unwrap()).collect(),
        attention: stats.attention,
        seconds,
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn fused_attention_matches_ggml_ops_and_autodiff() {
    for (d, h, g, t, boundary) in [(64, 9, 3, 256, 100), (16, 4, 2, 37, 20), (8, 2, 2, 5, 5)] {
        let stock = run(false, d, h, g, t, boundary, 0);
        let fused = run(true, d, h, g, t, boundary, 0);
        assert_eq!(stock.attention, 0);
        assert_eq!(fused.attention, 1, "the pattern was not fused");
        let e = max_rel(&fused.out, &stock.out);
        assert!(e < 1e-5, "output: max error {e} (relative to the largest value)");
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(fused.grads.iter().zip(&stock.grads)) {
            let e = max_rel(a, b);
            assert!(
                e < 1e-4,
                "∂{name}: max error {e} (relative to the largest value), shape {d}x{h}x{t}"
            );
        }
    }
}

/// Timing on the default model's shape (ignored: run with --ignored --nocapture).
#[test]
#[ignore]
fn fused_attention_speed() {
    let stock = run(false, 64, 9, 3, 256, 0, 20);
    let fused = run(true, 64, 9, 3, 256, 0, 50);
    println!(
        "one layer forward + backward: ggml ops {:.2} ms, fused {:.2} ms ({:.2}x)",
        stock.seconds * 1e3,
        fused.seconds * 1e3,
        stock.seconds / fused.seconds
    );
}
