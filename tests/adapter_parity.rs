//! Exported adapters reproduce training: for a LoRA adapter and a GRIT adapter (after rank
//! cuts) trained with `grit train`, llama.cpp's logits with the GGUF adapter applied equal
//! grit's training-graph logits with the same adapter on the same 256 tokens, and so do the
//! logits of the model `grit merge --type f16` writes. Each case also checks that the adapter
//! moves the logits far more than the bound (it is really applied).
//!
//! Model: the tiny Q4_1 LLaMA of tests/common (128 wide, 2 layers, GQA 4/2 heads), so that a
//! few training steps move the logits a lot in seconds on 2 cores. 256 tokens: llama.cpp's
//! KV view then has the same length as grit's attention, and the Q4_1 kernels are the same
//! in both engines (tests/forward_parity.rs measured bit-identical logits there).

use std::path::Path;

use grit::adapter::Adapter;
use grit::ggml::Context;
use grit::gguf::GgufFile;
use grit::infer::Model;
use grit::model::{Batch, GraphOptions, Outputs, TrainGraph, Weights};
use grit::train::copies::FrozenCopies;

mod common;
use common::{grit, ok, plays, rows, tiny_model, tiny_model_of};

const N_TOKENS: usize = 256;

fn threads() -> i32 {
    grit::infer::resolve_threads(0).min(4)
}

/// llama.cpp's logits at every position, optionally with an adapter (scale 1).
fn llama_cpp_logits(model_path: &Path, adapter: Option<&Path>, tokens: &[i32]) -> Vec<f32> {
    let mut model =
        Model::load(model_path, &common::load_options()).expect("llama.cpp loads the model");
    common::llama_cpp_logits(&mut model, adapter, tokens, threads())
}

/// grit's training-graph logits with the adapter read back from `adapter` (GGUF).
fn grit_logits(model_path: &Path, adapter: &Path, tokens: &[i32]) -> Vec<f32> {
    let file = GgufFile::open(model_path).unwrap();
    let mut backend = common::backend(threads() as usize);
    let weights = Weights::load(&file, &backend).unwrap();
    let lora = Adapter::read_gguf(adapter).unwrap().to_lora_set(&weights, &backend).unwrap();
    let ctx = Context::new(TrainGraph::capacity(&weights, Some(&lora), false)).unwrap();
    let g = TrainGraph::build(
        &ctx,
        &weights,
        Some(&lora),
        tokens.len(),
        GraphOptions::logits(Outputs::All),
    );
    // llama.cpp multiplies AMX copies of the weights where the CPU has AMX: so does grit here.
    let copies = FrozenCopies::llama_cpp_kernels(&weights, &backend).unwrap();
    grit::ggml::use_forward_copies(&g.graph, &copies.map(&weights));
    let mut run = backend.compute(&g.graph).unwrap();
    g.set_inputs(&mut run, &Batch::causal(tokens, &[], &[]).unwrap()).unwrap();
    run.run().unwrap();
    run.read_f32(g.logits).unwrap()
}

fn tokens(model_path: &Path) -> Vec<i32> {
    let model = Model::load_vocab_only(model_path).unwrap();
    let text = std::fs::read_to_string(plays().join("macbeth.txt")).unwrap();
    let t: Vec<i32> = model.tokenize(&text[..4000], true).into_iter().map(|t| t.0).collect();
    assert!(t.len() >= N_TOKENS);
    t[..N_TOKENS].to_vec()
}

/// (max |Δ|, rms Δ).
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let (mut max, mut sq) = (0f32, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (x - y).abs();
        max = max.max(if d.is_nan() { f32::INFINITY } else { d });
        sq += (d as f64).powi(2);
    }
    (max, (sq / a.len() as f64).sqrt() as f32)
}

fn train(model: &Path, out: &Path, extra: &[&str]) {
    let p = plays();
    let mut args: Vec<String> = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        p.join("hamlet.txt").to_str().unwrap(),
        "--eval-every",
        "0",
        "--max-seq-len",
        "64",
        "--threads",
        "2",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--lr",
        "1e-2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(grit().args(&args).output().unwrap());
}

/// GRIT flags for a short run with real rank cuts: `steps` steps, statistics every step,
/// inversions every 2, reprojections every `every` steps from step `every` (rank start
/// `every`), τ 0.5 down to rank 1, on Σ_a's spectrum (`--rank-signal input`: on the tiny
/// model it leaves modules at different ranks, which the export must carry; the default Fisher
/// signal keeps one direction of each).
fn grit_with_cuts(steps: u32, every: u32) -> Vec<String> {
    let (steps, every) = (steps.to_string(), every.to_string());
    [
        "--method",
        "grit",
        "--steps",
        &steps,
        "--kfac-every",
        "1",
        "--invert-every",
        "2",
        "--reproject-every",
        &every,
        "--reproject-warmup",
        &every,
        "--rank-start",
        &every,
        "--rank-energy",
        "0.5",
        "--rank-min",
        "1",
        "--rank-signal",
        "input",
    ]
    .map(String::from)
    .to_vec()
}

/// Bounds: llama.cpp with the adapter vs grit's graph (max, rms); the merged F16 model vs
/// grit's graph: max, and rms relative to the floor (the base itself stored as F16 against
/// the base: the part of the difference that F16 storage and F16 kernels alone cause); and
/// the adapter's effect must exceed `effect_factor` × the floor's rms.
struct Bounds {
    adapter: (f32, f32),
    merged_max: f32,
    merged_vs_floor: f32,
    effect_factor: f32,
}

fn case(name: &str, model: &Path, adapter: &Path, dir: &Path, b: &Bounds) {
    let toks = tokens(model);
    let base = llama_cpp_logits(model, None, &toks);
    let served = llama_cpp_logits(model, Some(adapter), &toks);
    let ours = grit_logits(model, adapter, &toks);
    let merged_path = dir.join(format!("{name}-merged-f16.gguf"));
    ok(grit()
        .args([
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--type",
            "f16",
            "--out",
            merged_path.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let merged = llama_cpp_logits(&merged_path, None, &toks);
    // The floor of the F16 comparison: the base merged at scale 0 (W only rounded to F16,
    // F16 kernels) against grit's graph without an adapter effect.
    let floor_path = dir.join(format!("{name}-scale0-f16.gguf"));
    ok(grit()
        .args([
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--scale",
            "0",
            "--type",
            "f16",
            "--out",
            floor_path.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let floor = diff(&llama_cpp_logits(&floor_path, None, &toks), &base);

    let d_adapter = diff(&served, &ours);
    let d_merged = diff(&merged, &ours);
    let effect = diff(&served, &base);
    let merged_effect = diff(&merged, &base);
    let logit_rms = diff(&base, &vec![0.0; base.len()]).1;
    println!("{name}: {N_TOKENS} tokens, logit rms {logit_rms:.3}");
    println!(
        "  (floor) base as F16 (merge --scale 0) vs base: max {:.3e} rms {:.3e}",
        floor.0, floor.1
    );
    println!(
        "  llama.cpp + GGUF adapter vs grit graph: max {:.3e} rms {:.3e} (bound max {:.1e} rms {:.1e})",
        d_adapter.0, d_adapter.1, b.adapter.0, b.adapter.1
    );
    println!(
        "  llama.cpp merged F16     vs grit graph: max {:.3e} rms {:.3e}",
        d_merged.0, d_merged.1
    );
    println!("  adapter effect (llama.cpp, adapter vs none): max {:.3e} rms {:.3e}; merged vs base rms {:.3e}", effect.0, effect.1, merged_effect.1);
    assert!(
        d_adapter.0 <= b.adapter.0 && d_adapter.1 <= b.adapter.1,
        "{name}: llama.cpp with the adapter is off grit's graph: {d_adapter:?}"
    );
    let merged_rms_bound = b.merged_vs_floor * floor.1 + 0.01;
    println!(
        "  merged bound: max {:.1e}, rms ≤ {:.2}·floor + 0.01 = {merged_rms_bound:.3e}; effect must be ≥ {}× the floor's rms",
        b.merged_max, b.merged_vs_floor, b.effect_factor
    );
    assert!(
        d_merged.0 <= b.merged_max && d_merged.1 <= merged_rms_bound,
        "{name}: the merged F16 model is off grit's graph: {d_merged:?}"
    );
    assert!(
        effect.1 >= b.effect_factor * floor.1 && effect.1 >= 1e4 * b.adapter.1,
        "{name}: the adapter barely changes the logits (rms {})",
        effect.1
    );
    assert!(
        merged_effect.1 >= b.effect_factor * floor.1,
        "{name}: the merged model barely differs from the base (rms {})",
        merged_effect.1
    );
}

#[test]
fn trained_lora_and_grit_adapters_match_llama_cpp_and_merged_f16() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());

    let lora = dir.path().join("lora");
    train(&model, &lora, &["--steps", "8"]);
    let grit_run = dir.path().join("grit");
    let mut flags = grit_with_cuts(10, 4);
    flags.extend(["--reg-warmup".to_string(), "2".to_string()]);
    train(&model, &grit_run, &flags.iter().map(String::as_str).collect::<Vec<_>>());
    // The GRIT adapter has been cut: per-tensor ranks below the initial 8, several distinct.
    let g = Adapter::read_gguf(&grit_run.join("adapter.gguf")).unwrap();
    let ranks: std::collections::BTreeSet<usize> = g.modules.iter().map(|m| m.rank).collect();
    println!("GRIT adapter ranks: {ranks:?}, {} parameters", g.n_params());
    assert!(ranks.len() >= 2 && *ranks.iter().max().unwrap() < 8, "no cut happened: {ranks:?}");
    assert_eq!(g.provenance.method.as_deref(), Some("grit"));

    // Measured on this machine: LoRA and GRIT adapters bit-identical through llama.cpp
    // (max 0). Merged F16 vs grit's graph: max 0.54 / 0.57, rms 0.081 / 0.093 (LoRA / GRIT)
    // at logit rms 5.7, the floor (base as F16) max 0.55, rms 0.091: the whole difference is
    // F16 storage and ggml's F16 matmul (which rounds activations to F16 too) on this small
    // random model. Adapter effects: rms 3.7 (LoRA) and 1.5 (GRIT).
    let b = Bounds {
        adapter: (1e-3, 1e-4),
        merged_max: 1.5,
        merged_vs_floor: 1.25,
        effect_factor: 10.0,
    };
    case("lora", &model, &lora.join("adapter.gguf"), dir.path(), &b);
    case("grit", &model, &grit_run.join("adapter.gguf"), dir.path(), &b);
}

/// The step losses of a run: (mean of the first three, mean of the last three).
fn loss_ends(out: &Path) -> (f64, f64) {
    let losses: Vec<f64> =
        rows(out).iter().filter_map(|r| r.get("grad_norm").and(r["loss"].as_f64())).collect();
    assert!(losses.len() >= 6, "{}: {} step rows", out.display(), losses.len());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&losses[..3]), mean(&losses[losses.len() - 3..]))
}

/// Every trainable architecture besides llama (whose cases are above and in the other suites),
/// end to end on a tiny Q4_1 model of it: `grit info` says trainable; 20 steps of LoRA and of
/// GRIT (with rank cuts) lower the training loss; llama.cpp with each exported adapter gives
/// grit's training-graph logits, and so does the merged F16 model; `grit generate --adapter`
/// runs; the PEFT export reads back bit for bit (PEFT names, no q/k permutation for these).
/// Phi-3's adapters are on its fused tensors (attn_qkv, ffn_up = gate and up), as llama.cpp
/// applies them and PEFT names them.
#[test]
fn every_architecture_trains_exports_and_serves() {
    for arch in grit::model::Arch::ALL.into_iter().filter(|&a| a != grit::model::Arch::Llama) {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model_of(dir.path(), arch);
        let name = arch.name();
        let info = ok(grit().args(["info", model.to_str().unwrap()]).output().unwrap());
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(info.contains(&format!("trainable       yes ({name})")), "{info}");

        let lora = dir.path().join("lora");
        train(&model, &lora, &["--steps", "20"]);
        let grit_run = dir.path().join("grit");
        let flags = grit_with_cuts(20, 5);
        train(&model, &grit_run, &flags.iter().map(String::as_str).collect::<Vec<_>>());
        for run in [&lora, &grit_run] {
            let (first, last) = loss_ends(run);
            println!("{name} {}: loss {first:.3} → {last:.3}", run.display());
            assert!(
                last < first - 0.2,
                "{name}: {} did not learn: {first} → {last}",
                run.display()
            );
        }
        let g = Adapter::read_gguf(&grit_run.join("adapter.gguf")).unwrap();
        assert!(g.modules.iter().any(|m| m.rank < 8), "{name}: GRIT made no cut");
        // The run says what it adapted: Phi-3's fused tensors for the default targets.
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(lora.join("summary.json")).unwrap())
                .unwrap();
        let expected: &[&str] = if arch.fused_gate_up() {
            &["attn_qkv", "attn_output", "ffn_up", "ffn_down"]
        } else {
            &["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        };
        assert_eq!(summary["targets"], serde_json::json!(expected), "{name}");

        // Measured (tiny Q4_1 models, AMD EPYC): llama.cpp with the adapter max 0 against
        // grit's graph, as for llama; merged F16 within the F16 floor.
        let b = Bounds {
            adapter: (1e-3, 1e-4),
            merged_max: 1.5,
            merged_vs_floor: 1.25,
            effect_factor: 10.0,
        };
        for (kind, run) in [("lora", &lora), ("grit", &grit_run)] {
            let adapter = run.join("adapter.gguf");
            case(&format!("{name}-{kind}"), &model, &adapter, dir.path(), &b);
            let out = grit()
                .args(["generate", "--model", model.to_str().unwrap()])
                .args(["--adapter", adapter.to_str().unwrap()])
                .args(["--prompt", "To be, or not to be", "--max-tokens", "4"])
                .output()
                .unwrap();
            ok(out);
            let peft = dir.path().join(format!("{kind}-peft"));
            let back = dir.path().join(format!("{kind}-back.gguf"));
            let s = |p: &Path| p.to_str().unwrap().to_string();
            ok(grit().args(["export", &s(&adapter), "--to", "peft", &s(&peft)]).output().unwrap());
            ok(grit().args(["export", &s(&peft), "--to", "gguf", &s(&back)]).output().unwrap());
            let config = std::fs::read_to_string(peft.join("adapter_config.json")).unwrap();
            // Phi-3's fused tensors are its HF modules qkv_proj and gate_up_proj.
            let hf: &[&str] = if arch.fused_gate_up() {
                &["self_attn.qkv_proj\"", "mlp.gate_up_proj\"", "mlp.down_proj\""]
            } else {
                &["self_attn.q_proj\"", "mlp.up_proj\"", "mlp.down_proj\""]
            };
            for m in hf {
                assert!(config.contains(m), "{name}: PEFT names: {config}");
            }
            let (a, r) =
                (Adapter::read_gguf(&adapter).unwrap(), Adapter::read_gguf(&back).unwrap());
            assert_eq!(a.modules.len(), r.modules.len());
            for (x, y) in a.modules.iter().zip(&r.modules) {
                assert_eq!((&x.base, x.rank), (&y.base, y.rank));
                assert!(x.a == y.a && x.b == y.b, "{name}: {} changed in the round trip", x.base);
            }
        }
    }
}
