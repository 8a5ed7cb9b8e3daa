//! A step graph whose modules have many different ranks allocates and runs: this exact rank
//! mix (a GRIT run's ranks after its third cut, Hamlet, λ_rel 10) once aborted the process
//! inside ggml's allocator ("out of free blocks") until small nodes were kept allocated.

use grit::ggml::{Backend, Context};
use grit::gguf::GgufFile;
use grit::grit::GritConfig;
use grit::model::{GraphOptions, LoraSet, Outputs, TrainGraph, Weights};
use grit::train::config::WeightCopies;
use grit::train::copies::FrozenCopies;
use grit::train::engine::{self, OptState, StepGraph, StepOptions};

/// Ranks per layer, one hex digit per module in graph order (`Weights::targets`).
const RANKS: &str = "4444457 4444988 5444994 4444999 454487a 4664557 4444556 6644577 6544546 4444544 4444447 4445454 4444448 4446456 4444444 4444444 4444444 4444444 4444444 4444444 4444444 4444444 4444444 6644444 4444444 4444444 4444444 4444444 4444444 4444444";

#[test]
fn many_distinct_ranks_do_not_fragment_the_allocator() {
    let model = grit::fetch::ensure_default_model().unwrap();
    let mut backend = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&model).unwrap(), &backend).unwrap();
    let scale = 32.0 / 16.0;
    let mut specs = Vec::new();
    for (layer, digits) in RANKS.split(' ').enumerate() {
        for (t, c) in weights.targets().into_iter().zip(digits.chars()) {
            specs.push((layer, t, c.to_digit(16).unwrap() as usize, scale));
        }
    }
    let lora = LoraSet::with_modules(&weights, &specs, &backend).unwrap();
    let opt = OptState::new(&lora, &backend).unwrap();
    let copies = FrozenCopies::build(&weights, WeightCopies::F16, false, &backend).unwrap();
    let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
    let grit = GritConfig::default();
    let sg = StepGraph::build(
        &ctx,
        &weights,
        &lora,
        &copies,
        &opt,
        256,
        256,
        StepOptions { grit: Some(&grit), ..Default::default() },
    );
    let run = backend.compute(&sg.graph);
    assert!(run.is_ok(), "allocation failed: {:?}", run.err());
    drop(run);
    eprintln!(
        "kept {} small nodes ({} KiB); compute buffer {} MiB",
        sg.kept.0,
        sg.kept.1 >> 10,
        backend.compute_buffer_bytes() >> 20
    );
    assert!(sg.kept.0 > 0);
    // The evaluation graph and GRIT's optimizer graph (preconditioning, grafting) of the same
    // adapter allocate too.
    let ectx = Context::new(engine::eval_capacity(&weights, &lora)).unwrap();
    let eval = TrainGraph::build(
        &ectx,
        &weights,
        Some(&lora),
        256,
        GraphOptions::loss(Outputs::Rows(255)),
    );
    assert!(backend.compute(&eval.graph).is_ok());
    let octx = Context::new(engine::opt_capacity(&lora)).unwrap();
    let og = engine::OptGraph::build(
        &octx,
        &lora,
        &opt,
        &engine::OptOptions { precondition: true, graft: true, ..Default::default() },
    );
    assert!(backend.compute(&og.graph).is_ok());
}

/// Random rank mixes like GRIT's after a few cuts (most modules at the minimum, the rest
/// spread up to 16; a few token counts): every step graph allocates.
#[test]
fn random_rank_mixes_allocate() {
    let model = grit::fetch::ensure_default_model().unwrap();
    let backend0 = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&model).unwrap(), &backend0).unwrap();
    let copies = FrozenCopies::build(&weights, WeightCopies::F16, false, &backend0).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (case, n_tokens) in [256usize, 128, 200, 256, 64, 256].into_iter().enumerate() {
        let mut specs = Vec::new();
        for layer in 0..30 {
            for t in weights.targets() {
                let x = next();
                let rank = if x % 4 != 0 { 4 } else { 4 + ((x >> 8) % 13) as usize };
                specs.push((layer, t, rank, 2.0));
            }
        }
        let lora = LoraSet::with_modules(&weights, &specs, &backend0).unwrap();
        let opt = OptState::new(&lora, &backend0).unwrap();
        let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
        let grit = GritConfig::default();
        let sg = StepGraph::build(
            &ctx,
            &weights,
            &lora,
            &copies,
            &opt,
            n_tokens,
            n_tokens - 1,
            StepOptions { grit: Some(&grit).filter(|_| case % 2 == 0), ..Default::default() },
        );
        let mut backend = Backend::cpu(2).unwrap();
        assert!(backend.compute(&sg.graph).is_ok(), "case {case}: allocation failed");
    }
}

/// The step graph's compute buffer on the default model at 256 tokens, per configuration:
/// activation recomputation must cut it by more than half (measured: 474 → 173 MiB with
/// `--weight-copies none`), and dropping the views the rewritten backward no longer reads
/// must keep gradients from being pinned (the persistent-copy graph without recomputation
/// stays at its activation peak, well under 0.55 GiB).
#[test]
fn recomputation_halves_the_step_memory() {
    let model = grit::fetch::ensure_default_model().unwrap();
    let backend0 = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&model).unwrap(), &backend0).unwrap();
    let lora = LoraSet::new(&weights, &grit::model::LoraConfig::default(), &backend0).unwrap();
    let opt = OptState::new(&lora, &backend0).unwrap();
    let mut sizes = Vec::new();
    for (mode, recompute) in [
        (WeightCopies::None, false),
        (WeightCopies::None, true),
        (WeightCopies::Q8_0, false),
        (WeightCopies::Q8_0, true),
    ] {
        let copies = FrozenCopies::build(&weights, mode, false, &backend0).unwrap();
        let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
        let sg = StepGraph::build(
            &ctx,
            &weights,
            &lora,
            &copies,
            &opt,
            256,
            256,
            StepOptions { recompute, ..Default::default() },
        );
        assert_eq!(sg.recomputed > 0, recompute);
        let mut backend = Backend::cpu(2).unwrap();
        drop(backend.compute(&sg.graph).unwrap());
        let mib = backend.compute_buffer_bytes() >> 20;
        eprintln!("{mode:?}, recompute {recompute}: step compute buffer {mib} MiB");
        sizes.push(mib);
    }
    // none with recomputation runs the fused attention kernels, whose graph keeps its small
    // nodes at the start of the buffer (see `Graph::keep_small_nodes`): a little over half.
    assert!(
        sizes[1] * 100 < sizes[0] * 55,
        "none: recomputation {} MiB vs {} MiB kept",
        sizes[1],
        sizes[0]
    );
    assert!(
        sizes[3] * 2 < sizes[2],
        "q8_0: recomputation {} MiB vs {} MiB kept",
        sizes[3],
        sizes[2]
    );
    assert!(sizes[2] < 550, "q8_0 without recomputation: {} MiB", sizes[2]);
}

/// The step graphs of the default configurations (LoRA and GRIT, default q8_0 copies with the
/// Q4_1 split, and `none` with recomputation) allocate at several sequence lengths. GRIT at
/// 128 tokens (the README's demo) once aborted in ggml's allocator ("out of free blocks")
/// when the loss scale was undone per parameter inside the step graph (same configuration).
#[test]
fn default_configurations_allocate() {
    let model = grit::fetch::ensure_default_model().unwrap();
    let backend0 = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&model).unwrap(), &backend0).unwrap();
    let lora = LoraSet::new(&weights, &grit::model::LoraConfig::default(), &backend0).unwrap();
    let opt = OptState::new(&lora, &backend0).unwrap();
    let grit = GritConfig::default();
    for (mode, recompute) in [(WeightCopies::Q8_0, false), (WeightCopies::None, true)] {
        let copies = FrozenCopies::build(&weights, mode, false, &backend0).unwrap();
        for n_tokens in [64usize, 128, 256, 512] {
            for with_grit in [false, true] {
                let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
                let o = StepOptions {
                    loss_scale: engine::loss_scale(n_tokens),
                    grit: with_grit.then_some(&grit),
                    dropout: false,
                    recompute,
                    fuse_attention: true,
                };
                let sg = StepGraph::build(
                    &ctx,
                    &weights,
                    &lora,
                    &copies,
                    &opt,
                    n_tokens,
                    n_tokens - 1,
                    o,
                );
                let mut backend = Backend::cpu(2).unwrap();
                let run = backend.compute(&sg.graph);
                assert!(
                    run.is_ok(),
                    "{mode:?}, {n_tokens} tokens, grit {with_grit}: {:?}",
                    run.err()
                );
            }
        }
    }
}

/// The GPU form of GRIT's step graph (ggml's own ops, no CPU kernels: what a Vulkan run
/// builds) at 8 tokens allocates: there the factors' gradients ([d, r]) are as large as the
/// activations and, freed among them, once aborted a Vulkan run inside ggml's allocator
/// ("out of free blocks") at its first step; they are kept allocated now
/// (`engine::small_node_bytes`). The allocator is the same on the CPU backend.
#[test]
fn gpu_form_grit_step_graph_allocates_at_few_tokens() {
    let model = grit::fetch::ensure_default_model().unwrap();
    let mut backend = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(&model).unwrap(), &backend).unwrap();
    let lora = LoraSet::new(
        &weights,
        &grit::model::LoraConfig { rank: 4, alpha: 16.0, ..Default::default() },
        &backend,
    )
    .unwrap();
    lora.init(3).unwrap();
    let opt = OptState::new(&lora, &backend).unwrap();
    let copies =
        FrozenCopies::build(&weights, WeightCopies::Q8_0, false, &backend).unwrap().portable();
    let grit = GritConfig::default();
    for n_tokens in [8, 16] {
        let ctx = Context::new(engine::step_capacity(&weights, &lora)).unwrap();
        let o = StepOptions {
            grit: Some(&grit),
            loss_scale: engine::loss_scale(n_tokens),
            ..Default::default()
        };
        let sg = StepGraph::build(&ctx, &weights, &lora, &copies, &opt, n_tokens, n_tokens - 1, o);
        assert!(grit::ggml::cpu_only_nodes(&sg.graph).is_empty());
        let run = backend.compute(&sg.graph);
        assert!(run.is_ok(), "{n_tokens} tokens: allocation failed: {:?}", run.err());
    }
}
