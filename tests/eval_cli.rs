//! `grit eval` on the default model: perplexity against a reference computed here from
//! llama.cpp's own logits, the JSON shape, adapters (KL, drift), accuracy and retention.

mod common;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use common::{grit, ok, plays};
use grit::train::checkpoint::{Checkpoint, NamedTensor};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

/// Windows of Hamlet scored by the perplexity test (512 tokens each; the first ones).
const HAMLET_WINDOWS: usize = 10;

fn eval_json(args: &[&str]) -> serde_json::Value {
    let o = ok(grit().arg("eval").args(args).arg("--json").output().unwrap());
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "--json prints one line: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// llama.cpp's perplexity (tools/perplexity) over the first `n_windows` chunks of `n_ctx`
/// tokens, written out here independently of grit's code: the text is tokenized with the
/// model's special tokens (BOS), each chunk's first token becomes BOS, logits are computed
/// for every position, and the second half of each chunk is scored.
fn reference_perplexity(
    model_path: &Path,
    text: &str,
    n_ctx: usize,
    n_windows: usize,
) -> (f64, usize) {
    let backend = grit::llama::backend();
    let model =
        LlamaModel::load_from_file(backend, model_path, &LlamaModelParams::default()).unwrap();
    let vocab = model.vocab();
    let tokens = vocab.tokenize(text.as_bytes(), true, false);
    let add_bos = vocab.should_add_bos();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx as u32))
        .with_n_batch(n_ctx as u32)
        .with_n_threads(2)
        .with_n_threads_batch(2);
    let mut ctx = model.new_context(backend, params).unwrap();
    let n_chunks = (tokens.len() / n_ctx).min(n_windows);
    let (mut nll, mut count) = (0f64, 0usize);
    for c in 0..n_chunks {
        let start = c * n_ctx;
        ctx.clear_kv_cache();
        let mut batch = LlamaBatch::new(n_ctx, 1);
        for j in 0..n_ctx {
            let t = if j == 0 && add_bos { vocab.bos() } else { tokens[start + j] };
            batch.add(t, j as i32, &[0], true).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        for j in n_ctx / 2..n_ctx - 1 {
            let z = ctx.get_logits_ith(j as i32);
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - z[tokens[start + j + 1].0 as usize] as f64;
            count += 1;
        }
    }
    ((nll / count as f64).exp(), count)
}

#[test]
fn hamlet_perplexity_matches_llama_cpp_within_one_percent() {
    let hamlet = plays().join("hamlet.txt");
    let model = grit::fetch::ensure_default_model().unwrap();
    let n = HAMLET_WINDOWS.to_string();
    let v = eval_json(&[
        "--data",
        hamlet.to_str().unwrap(),
        "--ctx",
        "512",
        "--max-examples",
        &n,
        "--threads",
        "2",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let base = &rows[0];
    assert_eq!(base["name"], "base");
    assert!(base["adapter"].is_null());
    let text = std::fs::read_to_string(&hamlet).unwrap();
    let (ppl_ref, count) = reference_perplexity(&model, &text, 512, HAMLET_WINDOWS);
    assert_eq!(base["tokens"].as_u64().unwrap() as usize, count);
    assert_eq!(count, HAMLET_WINDOWS * 255);
    let ppl = base["perplexity"].as_f64().unwrap();
    let rel = (ppl - ppl_ref).abs() / ppl_ref;
    eprintln!(
        "hamlet: grit {ppl:.4}, reference {ppl_ref:.4} over {count} tokens (rel. diff {rel:.2e})"
    );
    assert!(rel < 0.01, "grit {ppl} vs llama.cpp reference {ppl_ref}");
    assert!((base["loss"].as_f64().unwrap() - ppl.ln()).abs() < 1e-9);
    assert!(ppl > 5.0 && ppl < 200.0, "{ppl}");
}

/// A LoRA adapter for the default model over `modules` of layer 0, with B·A scaled by `mag`.
fn synthetic_checkpoint(step: usize, mag: f32) -> Checkpoint {
    let mut tensors = Vec::new();
    for (name, d_in, d_out) in [("attn_q", 576, 576), ("ffn_down", 1536, 576)] {
        let r = 4;
        let a: Vec<f32> =
            (0..r * d_in).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.2).collect();
        let b: Vec<f32> =
            (0..d_out * r).map(|i| ((i * 53 % 97) as f32 / 97.0 - 0.5) * mag).collect();
        tensors.push(NamedTensor {
            name: format!("blk.0.{name}.weight.lora_a"),
            shape: vec![r, d_in],
            data: a,
        });
        tensors.push(NamedTensor {
            name: format!("blk.0.{name}.weight.lora_b"),
            shape: vec![d_out, r],
            data: b,
        });
    }
    Checkpoint { step, tensors, state: Default::default() }
}

fn short_text(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(plays().join("macbeth.txt")).unwrap();
    let p = dir.join("macbeth-head.txt");
    std::fs::write(&p, &text[..6000]).unwrap();
    p
}

#[test]
fn adapters_rows_drift_kl_and_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let ad = dir.path().join("synthetic.gguf");
    grit::eval::drift::checkpoint_to_gguf(&synthetic_checkpoint(1, 4.0), "llama", 1.0, &ad)
        .unwrap();
    let text = short_text(dir.path());
    let task = dir.path().join("task.jsonl");
    std::fs::write(
        &task,
        concat!(
            "{\"prompt\": \"The capital of France is\", \"answer\": \"Paris\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"What is 2+2? Answer with a number.\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\n",
            "{\"prompt\": \"The opposite of hot is\", \"choices\": [\" cold\", \" purple\"], \"answer\": 0}\n",
        ),
    )
    .unwrap();
    let v = eval_json(&[
        "--data",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--max-examples",
        "4",
        "--adapter",
        ad.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--threads",
        "2",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let (base, a) = (&rows[0], &rows[1]);
    for r in rows {
        for k in [
            "name",
            "adapter",
            "tokens",
            "loss",
            "perplexity",
            "kl",
            "perplexity_change",
            "drift_total",
            "trainable_params",
            "accuracy",
        ] {
            assert!(r.get(k).is_some(), "row lacks {k}: {r}");
        }
    }
    assert_eq!(base["name"], "base");
    assert_eq!(a["name"], "synthetic");
    assert_eq!(base["tokens"], a["tokens"]);
    assert_eq!(base["tokens"].as_u64().unwrap(), 4 * 63);
    assert_eq!(base["kl"].as_f64().unwrap(), 0.0);
    let kl = a["kl"].as_f64().unwrap();
    assert!(kl > 1e-4, "a strong adapter changes the distribution: KL {kl}");
    let dppl = a["perplexity"].as_f64().unwrap() - base["perplexity"].as_f64().unwrap();
    assert!((a["perplexity_change"].as_f64().unwrap() - dppl).abs() < 1e-9);
    // Weight drift: two modules of rank 4, the norm matches the direct computation.
    assert_eq!(a["trainable_params"].as_u64().unwrap(), 4 * (576 + 576) + 4 * (1536 + 576));
    let per = a["drift_per_module"].as_object().unwrap();
    assert_eq!(per.len(), 2);
    let ck = synthetic_checkpoint(1, 4.0);
    let want =
        grit::eval::drift::update_norm(&ck.tensors[0].data, &ck.tensors[1].data, 4, 576, 576, 1.0);
    assert!((per["blk.0.attn_q.weight"].as_f64().unwrap() - want).abs() < 1e-6 * want);
    assert_eq!(base["drift_total"].as_f64().unwrap(), 0.0);
    // Accuracy: two generation items and one multiple-choice item per row.
    let acc = &base["accuracy"];
    assert_eq!((acc["n"].as_u64(), acc["choice_n"].as_u64()), (Some(2), Some(1)));
    assert_eq!(acc["contains"].as_f64().unwrap(), 1.0, "the base model knows Paris and 4: {acc}");
    assert_eq!(acc["choice"].as_f64().unwrap(), 1.0, "cold, not purple: {acc}");

    // The human table names every row.
    let o = ok(grit()
        .args([
            "eval",
            "--data",
            text.to_str().unwrap(),
            "--ctx",
            "128",
            "--max-examples",
            "1",
            "--adapter",
            ad.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let t = String::from_utf8(o.stdout).unwrap();
    assert!(
        t.lines().next().unwrap().contains("loss") && t.contains("base") && t.contains("synthetic"),
        "{t}"
    );
}

fn fake_run(dir: &Path, n_checkpoints: usize) {
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::write(dir.join("config.toml"), "method = \"lora\"\nrank = 4\nalpha = 4.0\n").unwrap();
    let mut m = String::new();
    for s in 1..=10 * n_checkpoints {
        m.push_str(&format!("{{\"step\":{s},\"loss\":3.0,\"lr\":1e-4,\"grad_norm\":1.0,\"tokens\":100,\"tokens_per_s\":50.0,\"elapsed_s\":1.0}}\n"));
    }
    std::fs::write(dir.join("metrics.jsonl"), m).unwrap();
    for k in 1..=n_checkpoints {
        synthetic_checkpoint(10 * k, 0.6 * (k as f32).sqrt())
            .save(&dir.join("checkpoints"))
            .unwrap();
    }
}

#[test]
fn retention_fits_the_forgetting_law_over_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let text = short_text(dir.path());
    let run = dir.path().join("run");
    fake_run(&run, 5);
    let v = eval_json(&[
        "--retention",
        run.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--max-examples",
        "2",
        "--threads",
        "2",
    ]);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "base + 5 checkpoints");
    let d: Vec<u64> = rows.iter().map(|r| r["train_tokens"].as_u64().unwrap()).collect();
    assert_eq!(d, vec![0, 1000, 2000, 3000, 4000, 5000]);
    assert!(rows[1]["adapter"].as_str().unwrap().ends_with("step-10"));
    let drift: Vec<f64> = rows[1..].iter().map(|r| r["drift_total"].as_f64().unwrap()).collect();
    assert!(drift.windows(2).all(|w| w[1] > w[0]), "{drift:?}");
    let f = &v["retention"]["power_law"];
    assert_eq!(f["n"], 5);
    assert_eq!(f["l0"].as_f64().unwrap(), rows[0]["loss"].as_f64().unwrap());
    for k in ["a", "beta", "e", "r2", "rmse"] {
        assert!(f[k].as_f64().is_some_and(f64::is_finite), "{k}: {f}");
    }
    assert!(v["retention"]["curvature"].is_null());

    // Four checkpoints: refused, saying how many are needed.
    let run4 = dir.path().join("run4");
    fake_run(&run4, 4);
    let o = grit()
        .args([
            "eval",
            "--retention",
            run4.to_str().unwrap(),
            "--data",
            text.to_str().unwrap(),
            "--ctx",
            "128",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("4 kept checkpoint") && e.contains("at least 5"), "{e}");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    let o = grit().args(["eval", "--data", bad.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.jsonl:2") && e.contains("'text'"), "{e}");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "To be, or not to be.").unwrap();
    let o = grit().args(["eval", "--data", short.to_str().unwrap()]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("short.txt") && e.contains("--ctx"), "{e}");
    let task = dir.path().join("t.jsonl");
    std::fs::write(&task, "{\"prompt\": \"x\", \"choices\": [\"a\", \"b\"], \"answer\": 5}\n")
        .unwrap();
    let o = grit().args(["eval", "--task", task.to_str().unwrap()]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("t.jsonl:1") && e.contains("answer"), "{e}");
    let o = grit().args(["eval"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--data"));
}
