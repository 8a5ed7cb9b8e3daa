//! `grit train --method grit` end to end through the binary, on a tiny random model with
//! small event intervals: inversion and reprojection rows, real rank cuts (fewer trainable
//! parameters, an adapter with per-module ranks that llama.cpp loads), and `--resume` across
//! a cut reproducing the uninterrupted run.

use std::collections::BTreeSet;
use std::path::Path;

mod common;
use common::{grit, ok, plays, rows, tiny_model};

fn train_args(model: &Path, out: &Path) -> Vec<String> {
    let p = plays();
    [
        "train",
        "--method",
        "grit",
        "--model",
        model.to_str().unwrap(),
        "--data",
        p.join("hamlet.txt").to_str().unwrap(),
        "--eval-data",
        p.join("macbeth.txt").to_str().unwrap(),
        "--eval-tokens",
        "256",
        "--eval-every",
        "4",
        "--steps",
        "10",
        "--save-every",
        "4",
        "--max-seq-len",
        "64",
        "--threads",
        "2",
        "--rank",
        "8",
        "--lr",
        "1e-3",
        "--kfac-every",
        "1",
        "--invert-every",
        "2",
        "--reproject-every",
        "4",
        "--reproject-warmup",
        "4",
        "--rank-start",
        "4",
        "--rank-energy",
        "0.5",
        // Σ_a's spectrum: on this tiny model τ = 0.5 then leaves modules at different ranks
        // (the Fisher default keeps one direction of each).
        "--rank-signal",
        "input",
        "--rank-min",
        "1",
        "--reg-warmup",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn grit_cuts_ranks_exports_and_resumes_across_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());

    let a = dir.path().join("a");
    ok(grit().args(train_args(&model, &a)).output().unwrap());
    let ra = rows(&a);
    let events = |kind: &str| ra.iter().filter(|r| r["event"] == kind).cloned().collect::<Vec<_>>();
    let inv = events("invert");
    let rep = events("reproject");
    for r in inv
        .iter()
        .chain(&rep)
        .chain(ra.iter().filter(|r| r.get("loss").is_some() || r.get("eval_loss").is_some()))
    {
        println!("{r}");
    }
    assert!(inv.len() >= 3, "inversion rows: {inv:?}");
    assert!(inv.iter().all(|r| r.get("damping").is_some()));
    assert!(rep.len() >= 2, "reprojection rows: {rep:?}");
    assert_eq!(rep[0]["step"], 4);
    for r in &rep {
        for k in ["ranks", "energy", "eff_rank", "trainable_params"] {
            assert!(r.get(k).is_some(), "reprojection row lacks {k}: {r}");
        }
        assert_eq!(r["ranks"].as_object().unwrap().len(), 14);
    }
    assert_eq!(ra.iter().filter(|r| r.get("loss").is_some()).count(), 10);
    assert!(ra.iter().filter_map(|r| r["loss"].as_f64()).all(f64::is_finite));

    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    println!("summary: {s}");
    let (p0, p1) = (
        s["trainable_params_initial"].as_u64().unwrap(),
        s["trainable_params_final"].as_u64().unwrap(),
    );
    assert!(p1 < p0, "no parameter reduction: {p0} → {p1}");
    let ranks: BTreeSet<u64> =
        s["rank_per_module"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).collect();
    assert!(ranks.len() >= 2, "every module has the same rank: {ranks:?}");
    assert!(
        s["inversions"].as_u64().unwrap() >= 3 && s["reprojections"].as_u64().unwrap() >= 2,
        "{s}"
    );
    assert!(
        s["drift_per_module"].as_object().unwrap().len() == 14
            && s["drift_total"].as_f64().unwrap() > 0.0
    );

    // The adapter keeps each module's rank; llama.cpp loads and generates with it.
    let f = grit::gguf::GgufFile::open(a.join("adapter.gguf")).unwrap();
    let adapter_ranks: BTreeSet<i64> =
        f.tensors().iter().filter(|t| t.name.ends_with(".lora_a")).map(|t| t.ne[1]).collect();
    assert!(adapter_ranks.len() >= 2, "adapter ranks {adapter_ranks:?}");
    let o = ok(grit()
        .args([
            "generate",
            "--prompt",
            "To be",
            "--max-tokens",
            "4",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            a.join("adapter.gguf").to_str().unwrap(),
        ])
        .output()
        .unwrap());
    assert!(!o.stdout.is_empty());

    // Stopped (checkpoint saved) right at the first cut and just after it, then resumed: the
    // same rows as uninterrupted.
    for stop in [4, 5] {
        let b = dir.path().join(format!("b{stop}"));
        let o = grit()
            .args(train_args(&model, &b))
            .env("GRIT_STOP_AFTER_STEP", stop.to_string())
            .output()
            .unwrap();
        assert!(!o.status.success(), "the run was meant to stop at step {stop}");
        ok(grit().args(["train", "--resume", b.to_str().unwrap()]).output().unwrap());
        assert_eq!(rows(&b), ra, "resume from step {stop} differs from the uninterrupted run");
    }
}

/// Soft cuts (the reference: shapes kept, λ_R active) with gradient accumulation, the
/// reference pairing and absolute damping: the run completes, reprojects without changing
/// the parameter count, and reports its events.
#[test]
fn grit_soft_cut_with_accumulation_and_reference_options() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("soft");
    let mut args = train_args(&model, &out);
    let steps = args.iter().position(|a| a == "--steps").unwrap();
    args[steps + 1] = "5".into();
    let ev = args.iter().position(|a| a == "--eval-every").unwrap();
    args[ev + 1] = "0".into();
    args.extend(
        [
            "--rank-cut",
            "soft",
            "--grad-accum",
            "2",
            "--kfac-pairing",
            "reference",
            "--damping",
            "absolute",
            "--lambda-r",
            "1e-2",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    ok(grit().args(&args).output().unwrap());
    let r = rows(&out);
    assert!(
        r.iter().any(|x| x["event"] == "reproject" && x["step"] == 4),
        "no reprojection at step 4"
    );
    assert!(r.iter().filter(|x| x["event"] == "invert").count() >= 2);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        s["trainable_params_final"], s["trainable_params_initial"],
        "a soft cut keeps the shapes"
    );
    assert!(s["rank_per_module"].as_object().unwrap().values().all(|v| v == 8));
    assert!(r.iter().filter_map(|x| x["loss"].as_f64()).all(f64::is_finite));
}

/// Without `--reproject-warmup`/`--rank-start`, the first reprojection and rank cut come at
/// `--first-cut` × the run's steps (default 0.7 of the run); explicit steps still win.
#[test]
fn the_first_cut_comes_at_a_share_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let first_reprojection = |name: &str, share: Option<&str>| {
        let out = dir.path().join(name);
        let mut args = train_args(&model, &out);
        // Drop the explicit first-cut steps (flag and value), and run the default signal.
        for flag in ["--reproject-warmup", "--rank-start", "--rank-signal"] {
            let i = args.iter().position(|a| a == flag).unwrap();
            args.drain(i..i + 2);
        }
        if let Some(s) = share {
            args.extend(["--first-cut".to_string(), s.to_string()]);
        }
        ok(grit().args(&args).output().unwrap());
        rows(&out).iter().find(|r| r["event"] == "reproject").map(|r| r["step"].as_u64().unwrap())
    };
    // 10 steps, --reproject-every 4: the first event at max(4, share × 10).
    assert_eq!(first_reprojection("default", None), Some(7));
    // The default Fisher cut shrank the adapter (τ = 0.5, rank-min 1 from rank 8).
    let s: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("default/summary.json")).unwrap(),
    )
    .unwrap();
    assert!(s["trainable_params_final"].as_u64() < s["trainable_params_initial"].as_u64(), "{s}");
    assert_eq!(first_reprojection("half", Some("0.5")), Some(5));
    let o = grit()
        .args(["train", "--method", "grit", "--first-cut", "1.5", "--dry-run", "--data", "x.txt"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("first_cut"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
