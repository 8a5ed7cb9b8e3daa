//! Gradient checks of the training engine on tiny random models: the LoRA gradients that a
//! training step accumulates (forward, ggml backward with the frozen-matmul input gradients
//! rewritten, accumulation) against central finite differences of the loss, for F32, Q4_0,
//! Q4_1, Q8_0 and Q4_K base weights in every `--weight-copies` mode; and the rewritten
//! backward against ggml's stock autodiff on an F32 model.
//!
//! With `GRIT_DEVICE=gpu` (a GPU build; in CI on Vulkan over lavapipe) the training step runs
//! on the GPU, each base type in one copy mode, against finite differences on the CPU.

mod common;
use std::io::{Read, Seek, SeekFrom};

use grit::ggml::{dequantize, Backend, Context, GgufWriter, Type};
use grit::gguf::GgufFile;
use grit::model::{
    write_tiny_model, Arch, Batch, GraphOptions, LoraConfig, LoraSet, Outputs, TinySpec,
    TinyWindow, TrainGraph, Weights,
};
use grit::train::config::WeightCopies;
use grit::train::copies::{Forward, FrozenCopies};
use grit::train::engine::{self, OptState, StepGraph, StepOptions};

fn tokenizer_source() -> std::path::PathBuf {
    grit::fetch::ensure_default_model().expect("default model (tokenizer source)")
}

fn tiny(dir: &std::path::Path, arch: Arch, ty: Type, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("tiny-{}-{}.gguf", arch.name(), ty.name()));
    // n_embd 256 so that K-quants (blocks of 256) fit every matrix row.
    let spec = TinySpec {
        arch,
        // Qwen3's and Gemma 3's heads are wider than n_embd / n_head, as in the real models.
        head_dim: matches!(arch, Arch::Qwen3 | Arch::Gemma3).then_some(128),
        // Gemma 3: layer 0 slides over 8 tokens (of the batch's 24), layer 1 is global.
        sliding_window: (arch == Arch::Gemma3).then_some(TinyWindow {
            window: 8,
            pattern: 2,
            rope_freq_base: 1000.0,
        }),
        n_embd: 256,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 512,
        weight_type: ty,
        tied_output: false,
        seed,
        ..TinySpec::default()
    };
    write_tiny_model(&path, &spec, &tokenizer_source()).unwrap();
    path
}

/// The F32 twin of a GGUF model: every tensor dequantized, metadata copied. Its loss is a
/// smooth function of the adapter, so finite differences on it are clean.
fn f32_twin(path: &std::path::Path) -> std::path::PathBuf {
    let g = GgufFile::open(path).unwrap();
    let mut w = GgufWriter::new();
    w.copy_keys_from(path, |_| true).unwrap();
    let mut f = std::fs::File::open(path).unwrap();
    for t in g.tensors() {
        let mut raw = vec![0u8; t.size as usize];
        f.seek(SeekFrom::Start(g.data_offset() + t.offset)).unwrap();
        f.read_exact(&mut raw).unwrap();
        let x = dequantize(Type(t.ggml_type), &raw, t.n_elements() as usize).unwrap();
        let dims = t.ne.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
        w.add_f32(&t.name, &t.ne[..dims], &x).unwrap();
    }
    let out = path.with_extension("f32.gguf");
    w.write(&out).unwrap();
    out
}

fn batch() -> Batch {
    let tokens: Vec<i32> = (0..24).map(|i| (i * 997 + 13) % 5000).collect();
    let rows: Vec<i32> = (3..23).collect();
    let labels: Vec<i32> = rows.iter().map(|&r| tokens[r as usize + 1]).collect();
    Batch::causal(&tokens, &rows, &labels).unwrap()
}

/// Accumulated gradients (A and B) per module.
type Grads = Vec<(Vec<f32>, Vec<f32>)>;

/// Runs one training micro-step; returns the accumulated gradients (A and B per module).
fn step_grads(
    backend: &mut Backend,
    weights: &Weights,
    lora: &LoraSet,
    copies: &FrozenCopies,
    opt: &OptState,
    b: &Batch,
) -> Grads {
    step_grads_with(backend, weights, lora, copies, opt, b, StepOptions::default()).0
}

/// [`step_grads`] with step-graph options; also returns the backend's compute buffer bytes.
fn step_grads_with(
    backend: &mut Backend,
    weights: &Weights,
    lora: &LoraSet,
    copies: &FrozenCopies,
    opt: &OptState,
    b: &Batch,
    o: StepOptions<'_>,
) -> (Grads, usize) {
    opt.zero_grads().unwrap();
    let ctx = Context::new(engine::step_capacity(weights, lora)).unwrap();
    // At the loss scale a run uses (the accumulators then hold S × the gradients).
    let o = StepOptions { loss_scale: engine::loss_scale(b.n_rows()), ..o };
    let sg = StepGraph::build(&ctx, weights, lora, copies, opt, b.n_tokens(), b.n_rows(), o);
    let expect =
        if copies.mode() == WeightCopies::None { (0, sg.rewritten.1) } else { (sg.rewritten.0, 0) };
    assert!(expect.0 + expect.1 > 0, "no frozen backward was rewritten");
    if o.recompute {
        // The CPU's fused attention kernels take the attention with recomputation too.
        let fused = (0..sg.graph.n_nodes()).any(|i| sg.graph.node(i).name() == "attn_fused_back");
        assert_eq!(fused, o.fuse_attention && !backend.is_gpu(), "fused attention backward");
    }
    let mut run = backend.compute(&sg.graph).unwrap();
    sg.train.set_inputs(&mut run, b).unwrap();
    sg.set_seeds(&mut run).unwrap();
    run.run().unwrap();
    drop(run);
    let bytes = backend.compute_buffer_bytes();
    let unscale = |v: Vec<f32>| v.into_iter().map(|g| g / o.loss_scale).collect::<Vec<f32>>();
    (
        (0..lora.modules().len())
            .map(|i| (unscale(opt.read(i, 2).unwrap()), unscale(opt.read(i, 5).unwrap())))
            .collect(),
        bytes,
    )
}

/// Activation recomputation (`--recompute`, the default with `--weight-copies none`) runs the
/// same ops on the same inputs: the gradients must not change in a single bit, in the
/// transient and in a persistent copy mode. (Its memory saving is checked on the default
/// model in `step_graph_ranks.rs`; this tiny model's step is dominated by its logits.)
#[test]
fn recomputed_activations_give_identical_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), Arch::Llama, Type::Q4_1, 11);
    let mut backend = common::backend(2);
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() },
        &backend,
    )
    .unwrap();
    lora.randomize(5, 0.05, 0.05).unwrap();
    lora.mark_params();
    let opt = OptState::new(&lora, &backend).unwrap();
    let b = batch();
    // With the fused attention kernels (CPU) and with ggml's own attention ops: the same
    // attention on both sides (the two round differently: tests/fused_attention.rs).
    for (mode, fuse_attention) in [
        (WeightCopies::None, true),
        (WeightCopies::Q8_0, true),
        (WeightCopies::None, false),
        (WeightCopies::Q8_0, false),
    ] {
        let copies = FrozenCopies::build(&weights, mode, false, &backend).unwrap();
        let (kept, _) = step_grads_with(
            &mut backend,
            &weights,
            &lora,
            &copies,
            &opt,
            &b,
            StepOptions { fuse_attention, ..Default::default() },
        );
        let (re, _) = step_grads_with(
            &mut backend,
            &weights,
            &lora,
            &copies,
            &opt,
            &b,
            StepOptions { recompute: true, fuse_attention, ..Default::default() },
        );
        assert!(
            kept.iter().flat_map(|(a, b)| a.iter().chain(b)).any(|&g| g != 0.0),
            "{mode:?}, fused {fuse_attention}: zero gradients"
        );
        for (i, (k, r)) in kept.iter().zip(&re).enumerate() {
            assert!(
                k.0 == r.0 && k.1 == r.1,
                "{mode:?}, fused {fuse_attention}: module {i}: recomputation changed the gradients"
            );
        }
    }
}

/// Worst relative error of the largest gradient entries of layer 0's modules (whose
/// gradients pass through every frozen backward of the model) against central finite
/// differences. The gradient comes from a training step on the `ty` model with copy mode
/// `mode`; the finite differences from its F32 twin (same weights, dequantized), because the
/// quantized forward rounds activations to 8 bits and is not smooth at the scale of `eps`.
fn check(arch: Arch, seed: u64, ty: Type, mode: WeightCopies, eps: f32) -> f64 {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), arch, ty, seed);
    let twin = if ty == Type::F32 { path.clone() } else { f32_twin(&path) };
    let mut backend = common::backend(0);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() };
    let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(&weights, &cfg, &backend).unwrap();
    lora.randomize(3, 0.05, 0.05).unwrap();
    lora.mark_params();
    let opt = OptState::new(&lora, &backend).unwrap();
    let copies = FrozenCopies::build(&weights, mode, false, &backend).unwrap();
    let b = batch();
    let grads = step_grads(&mut backend, &weights, &lora, &copies, &opt, &b);

    // The finite differences always on the CPU backend: they need a loss that is smooth at
    // the scale of `eps`, which ggml-vulkan's forward-only graph is not: it rounds strided
    // matmul operands to F16 where the device has F16 arithmetic (on lavapipe the loss, 34.46,
    // then moved unevenly by ~1e-3 around the point: 23 % error on the F32 model; 6 % with
    // GGML_VK_DISABLE_F16=1; 5e-4 on the CPU). The gradient under test is the GPU step's.
    let mut cpu = Backend::cpu(0).unwrap();
    let tw = Weights::load(&GgufFile::open(&twin).unwrap(), &cpu).unwrap();
    let tl = LoraSet::new(&tw, &cfg, &cpu).unwrap();
    tl.randomize(3, 0.05, 0.05).unwrap();

    // One forward graph of the twin, allocated once; each loss evaluation rewrites one
    // adapter entry (a persistent tensor) and runs it again, rather than building and
    // allocating a graph per evaluation.
    let ctx = Context::new(engine::eval_capacity(&tw, &tl)).unwrap();
    let g = TrainGraph::build(
        &ctx,
        &tw,
        Some(&tl),
        b.n_tokens(),
        // Built as for a backward: Gemma 3's GELU is then the exact function (ggml's CPU GELU
        // reads an F16 table, a staircase at the scale of eps), whose derivative the step's
        // backward computes.
        GraphOptions::loss(Outputs::Rows(b.n_rows())).for_backward(),
    );
    let loss_t = g.loss.expect("eval graph has a loss");
    let mut run = cpu.compute(&g.graph).unwrap();
    g.set_inputs(&mut run, &b).unwrap();
    let mut loss = || {
        run.run().unwrap();
        run.read_f32(loss_t).unwrap()[0] as f64
    };

    let mut worst = 0f64;
    for (i, m) in lora.modules().iter().enumerate().filter(|(_, m)| m.layer == 0) {
        assert_eq!(tl.modules()[i].base_name(), m.base_name());
        for which in 0..2 {
            let g = if which == 0 { &grads[i].0 } else { &grads[i].1 };
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&x, &y| g[y].abs().total_cmp(&g[x].abs()));
            let mut values = if which == 0 { tl.read_a(i).unwrap() } else { tl.read_b(i).unwrap() };
            for &k in order.iter().take(2) {
                let v = values[k];
                let mut eval_at = |x: f32, values: &mut Vec<f32>| {
                    values[k] = x;
                    if which == 0 {
                        tl.write_a(i, values).unwrap()
                    } else {
                        tl.write_b(i, values).unwrap()
                    }
                    loss()
                };
                let lp = eval_at(v + eps, &mut values);
                let lm = eval_at(v - eps, &mut values);
                eval_at(v, &mut values);
                let fd = (lp - lm) / (2.0 * eps as f64);
                let rel = (fd - g[k] as f64).abs() / (g[k] as f64).abs().max(1e-4);
                worst = worst.max(rel);
            }
        }
    }
    println!(
        "{} {:>5} base, copies {:?}: worst relative error {worst:.2e} ({:.1} s)",
        arch.name(),
        ty.name(),
        mode,
        t0.elapsed().as_secs_f64()
    );
    worst
}

#[test]
fn lora_gradients_match_finite_differences_for_every_base_type_and_copy_mode() {
    // Bounds: F32 bases are limited by f32 finite differences (~1e-3). Quantized bases add
    // ggml's 8-bit quantization of activations inside quantized matmuls (the computed loss is
    // piecewise constant at a fine scale; the analytic gradient is that of the smooth model),
    // and Q8_0/F16 backward copies add their own rounding of Wᵀ.
    // On the CPU every base type in every copy mode. On a GPU (GRIT_DEVICE=gpu; in CI on
    // lavapipe, ~15 s a case there) every base type in one copy mode, the modes spread over
    // the types: the copy kernels are the same ggml ops for every base type.
    let cpu = common::test_device() == grit::ggml::Device::Cpu;
    let cases: Vec<(Type, WeightCopies)> = if cpu {
        let modes = [WeightCopies::None, WeightCopies::Q8_0, WeightCopies::F16, WeightCopies::F32];
        [Type::F32, Type::Q4_0, Type::Q4_1, Type::Q8_0, Type::Q4_K]
            .into_iter()
            .flat_map(|t| modes.map(|m| (t, m)))
            .collect()
    } else {
        vec![
            (Type::F32, WeightCopies::F32),
            (Type::Q4_0, WeightCopies::Q8_0),
            (Type::Q4_1, WeightCopies::None),
            (Type::Q8_0, WeightCopies::F16),
            (Type::Q4_K, WeightCopies::Q8_0),
        ]
    };
    let mut failures = Vec::new();
    for (ty, mode) in cases {
        let bound = match (ty, mode) {
            (Type::F32, WeightCopies::F32 | WeightCopies::F16) => 5e-3,
            // `none`: F16 copies on a GPU, Q8_0 (the q8_0 mode's bytes) on the CPU.
            (Type::F32, WeightCopies::None) if !cpu => 5e-3,
            (Type::F32, _) => 3e-2, // Q8_0 rounding of Wᵀ
            _ => 1e-1,              // 8-bit activations in the quantized forward (measured 3–6 %)
        };
        let worst = check(Arch::Llama, 7, ty, mode, 1e-2);
        if !(worst < bound) {
            failures.push(format!("{} / {mode:?}: {worst:.3e} ≥ {bound:.0e}", ty.name()));
        }
    }
    assert!(failures.is_empty(), "gradient check failed: {failures:?}");
}

/// The same check through the training engine for the other architectures (their graphs differ
/// from llama's in RoPE layout, biases, Qwen3's per-head q/k norms, Phi-3's fused qkv and
/// gate/up tensors and Gemma 3's GEGLU, extra norms and sliding window), on an F32 base and on a quantized one with the default copies. The
/// quantized case compares the gradient of a forward with 8-bit activations against finite
/// differences of the F32 twin, so its error is that rounding, which varies with the random
/// model: Q4_1/Q8_0 measured 2.4–6.4 % (qwen2) and 3.3–7.0 % (qwen3, wide heads) over seeds
/// 7–10, 3.2 % (phi3, seed 7), 1.7 % (gemma3); the F32 bases check to 7.5e-4 on the CPU
/// (2.4e-3 on lavapipe), Gemma 3 to 2.9e-3: its finite differences are noisier (1.7e-2 with
/// eps 3e-3, 1.7e-3 with 3e-2: the f32 loss's rounding, not the gradient). Gemma 3's tiny
/// model has a sliding-window layer and a global one, and its step runs ggml's GEGLU forward
/// with the backward of the exact GELU (see `ggml::passes::geglu`).
#[test]
fn other_architectures_gradients_match_finite_differences() {
    let mut failures = Vec::new();
    for arch in Arch::ALL.into_iter().filter(|&a| a != Arch::Llama) {
        for (ty, mode, bound) in
            [(Type::F32, WeightCopies::F32, 5e-3), (Type::Q4_1, WeightCopies::Q8_0, 1e-1)]
        {
            let worst = check(arch, 7, ty, mode, 1e-2);
            if !(worst < bound) {
                failures.push(format!("{} {} / {mode:?}: {worst:.3e}", arch.name(), ty.name()));
            }
        }
    }
    assert!(failures.is_empty(), "gradient check failed: {failures:?}");
}

/// The rewritten backward against ggml's stock autodiff (out_prod through the frozen weight,
/// which the CPU backend computes exactly for quantized weights, just slowly), on the same
/// model: an F32 copy must agree to float rounding, the F16/Q8_0 copies to their precision.
#[test]
fn rewritten_backward_equals_stock_autodiff() {
    let cpu = common::test_device() == grit::ggml::Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for ty in [Type::F32, Type::Q4_0, Type::Q4_1, Type::Q8_0, Type::Q4_K] {
        let path = tiny(dir.path(), Arch::Llama, ty, 5);
        let mut backend = common::backend(0);
        let weights = Weights::load(&GgufFile::open(&path).unwrap(), &backend).unwrap();
        let lora = LoraSet::new(
            &weights,
            &LoraConfig { rank: 4, alpha: 8.0, ..LoraConfig::default() },
            &backend,
        )
        .unwrap();
        lora.randomize(9, 0.05, 0.05).unwrap();
        lora.mark_params();
        let opt = OptState::new(&lora, &backend).unwrap();
        let b = batch();

        let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
        let mut g = TrainGraph::build(
            &ctx,
            &weights,
            Some(&lora),
            b.n_tokens(),
            GraphOptions::loss(Outputs::Rows(b.n_rows())),
        );
        g.graph.build_backward_expand(&ctx);
        let mut run = backend.compute(&g.graph).unwrap();
        g.set_inputs(&mut run, &b).unwrap();
        run.reset_grads();
        run.run().unwrap();
        let stock: Vec<(Vec<f32>, Vec<f32>)> = lora
            .modules()
            .iter()
            .map(|m| {
                (
                    run.read_f32(g.graph.grad(lora.a(m)).unwrap()).unwrap(),
                    run.read_f32(g.graph.grad(lora.b(m)).unwrap()).unwrap(),
                )
            })
            .collect();
        drop(run);

        // `none` makes Q8_0 copies on the CPU (the q8_0 mode's bytes), F16 ones on a GPU.
        let transient = if cpu { 3e-2 } else { 5e-3 };
        for (mode, bound) in [
            (WeightCopies::F32, 1e-5f32),
            (WeightCopies::F16, 5e-3),
            (WeightCopies::None, transient),
            (WeightCopies::Q8_0, 3e-2),
        ] {
            // The stored weights in the forward, as stock autodiff multiplies them (the exact
            // Q4_1 split rounds activations like Q4_0, not Q4_1: see the FD test for it).
            let copies =
                FrozenCopies::build_with(&weights, mode, Forward::Stored, &backend).unwrap();
            // ggml's own attention ops, as on the stock side: the fused kernels round
            // differently, and on the Q8_0 base that moves activations across Q8_0 rounding
            // steps (1.4e-2 here); they are checked by tests/fused_attention.rs and, with the
            // whole step, by the finite-difference test above.
            let ours = step_grads_with(
                &mut backend,
                &weights,
                &lora,
                &copies,
                &opt,
                &b,
                StepOptions { fuse_attention: false, ..Default::default() },
            )
            .0;
            // Per module and factor: ‖ours − stock‖ / ‖stock‖.
            let rel = |s: &[f32], o: &[f32]| {
                let d: f64 = s.iter().zip(o).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let n: f64 = s.iter().map(|x| (*x as f64).powi(2)).sum();
                (d / n.max(1e-30)).sqrt() as f32
            };
            let worst = stock
                .iter()
                .zip(&ours)
                .map(|(s, o)| rel(&s.0, &o.0).max(rel(&s.1, &o.1)))
                .fold(0f32, f32::max);
            println!("{:>5} base, copies {mode:?}: worst relative difference to stock autodiff {worst:.2e}", ty.name());
            if !(worst < bound) {
                failures.push(format!("{} / {mode:?}: {worst:.2e} ≥ {bound:.0e}", ty.name()));
            }
        }
    }
    assert!(failures.is_empty(), "rewritten backward differs from stock autodiff: {failures:?}");
}
