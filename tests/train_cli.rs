//! `grit train` end to end through the binary, on a tiny random model (fast): outputs,
//! bit-for-bit determinism, resume after SIGKILL and after Ctrl-C, refusing a non-empty
//! --out, and clear errors for bad input.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{grit, ok, plays, rows, tiny_model};

fn train_args(model: &Path, out: &Path) -> Vec<String> {
    let p = plays();
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        p.join("hamlet.txt").to_str().unwrap(),
        "--eval-data",
        p.join("macbeth.txt").to_str().unwrap(),
        "--eval-tokens",
        "512",
        "--eval-every",
        "4",
        "--steps",
        "12",
        "--save-every",
        "4",
        "--max-seq-len",
        "64",
        "--threads",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn last_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

fn run_until(model: &Path, out: &Path, step: u64, signal: i32) {
    let mut child = grit()
        .args(train_args(model, out))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while last_step(out) < step {
        assert!(t0.elapsed() < Duration::from_secs(300), "training never reached step {step}");
        assert!(child.try_wait().unwrap().is_none(), "training ended before step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was meant to be stopped");
}

#[test]
fn outputs_determinism_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());

    // Uninterrupted reference run.
    let a = dir.path().join("a");
    ok(grit().args(train_args(&model, &a)).output().unwrap());
    for f in ["adapter.gguf", "metrics.jsonl", "summary.json", "config.toml"] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("summary.json")).unwrap()).unwrap();
    for k in [
        "method",
        "base_model",
        "targets",
        "rank_per_module",
        "trainable_params",
        "steps",
        "train_loss",
        "eval_loss",
        "peak_rss_bytes",
        "wall_s",
    ] {
        assert!(summary.get(k).is_some(), "summary.json lacks {k}");
    }
    assert_eq!(summary["steps"], 12);
    assert_eq!(summary["rank_per_module"].as_object().unwrap().len(), 2 * 7);
    let ra = rows(&a);
    let train_rows = ra.iter().filter(|r| r.get("loss").is_some()).count();
    let eval_rows: Vec<_> = ra
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_rows, 12);
    assert_eq!(eval_rows, vec![0, 4, 8, 12]);
    for r in ra.iter().filter(|r| r.get("loss").is_some()) {
        for k in ["step", "loss", "lr", "grad_norm", "tokens"] {
            assert!(r.get(k).is_some(), "metrics row lacks {k}: {r}");
        }
    }
    // The checkpoints at 4 and 8 (not at the last step: the adapter is the final state).
    assert!(a.join("checkpoints/step-4").is_dir() && a.join("checkpoints/step-8").is_dir());

    // Same seed, same data: the same losses, bit for bit.
    let a2 = dir.path().join("a2");
    ok(grit().args(train_args(&model, &a2)).output().unwrap());
    assert_eq!(rows(&a2), ra, "two identical runs differ");

    // A non-empty --out is refused.
    let o = grit().args(train_args(&model, &a)).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--overwrite"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Killed with SIGKILL between checkpoints, then resumed: the same rows as uninterrupted.
    let b = dir.path().join("b");
    run_until(&model, &b, 6, libc::SIGKILL);
    ok(grit().args(["train", "--resume", b.to_str().unwrap()]).output().unwrap());
    assert_eq!(rows(&b), ra, "resume after SIGKILL differs from the uninterrupted run");

    // Ctrl-C: a checkpoint is saved at the current step and the run resumes from it.
    let c = dir.path().join("c");
    run_until(&model, &c, 5, libc::SIGINT);
    let steps = grit::train::checkpoint::list_steps(&c.join("checkpoints"));
    assert!(steps.iter().any(|&s| s >= 5), "Ctrl-C saved no checkpoint: {steps:?}");
    ok(grit().args(["train", "--resume", c.to_str().unwrap()]).output().unwrap());
    assert_eq!(rows(&c), ra, "resume after Ctrl-C differs from the uninterrupted run");
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"messages\": [{\"role\": \"user\"}]}\n").unwrap();
    let out = dir.path().join("o");
    let o = grit()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.jsonl:2") && err.contains("content"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = grit()
        .args([
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--rank",
            "0",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rank"));

    let o = grit()
        .args([
            "train",
            "--data",
            bad.to_str().unwrap(),
            "--dry-run",
            "--skip-bad-rows",
            "--model",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.to_lowercase().contains("skipped"), "{text}");

    // The library's dry run returns the statistics (it neither prints nor exits the process).
    let cfg = grit::train::config::TrainConfig {
        model: Some(model.clone()),
        data: Some(bad.clone()),
        skip_bad_rows: true,
        ..Default::default()
    };
    let opts = grit::train::run::RunOptions {
        out: dir.path().join("unused"),
        overwrite: false,
        resume: false,
        dry_run: true,
        stop_after: None,
        dump_tokens: None,
        profile: false,
        cancel: Default::default(),
    };
    match grit::train::run::train(cfg, opts).unwrap() {
        grit::train::run::Outcome::DryRun { train, eval } => {
            assert!(train.examples >= 1 && train.skipped_rows >= 1, "{train:?}");
            assert!(eval.is_none());
        }
        other => panic!("a dry run trained: {other:?}"),
    }
    assert!(!dir.path().join("unused").exists(), "a dry run writes nothing");
}

/// `--dropout p`: deterministic for a seed (masks are drawn from (seed, step, micro-batch)),
/// different from the run without dropout, and resumable to the same rows.
#[test]
fn dropout_is_seeded_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let args = |out: &Path, p: &str| {
        let mut a = train_args(&model, out);
        a.extend(["--dropout".to_string(), p.to_string()]);
        a
    };
    let (a, b, c, z) =
        (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"), dir.path().join("z"));
    ok(grit().args(args(&a, "0.2")).output().unwrap());
    ok(grit().args(args(&b, "0.2")).output().unwrap());
    ok(grit().args(args(&z, "0")).output().unwrap());
    let (ra, rz) = (rows(&a), rows(&z));
    assert_eq!(rows(&b), ra, "two dropout runs with one seed differ");
    let losses =
        |r: &[serde_json::Value]| r.iter().filter_map(|x| x["loss"].as_f64()).collect::<Vec<_>>();
    assert_eq!(
        losses(&ra)[0],
        losses(&rz)[0],
        "step 1 starts from B = 0: dropout cannot change its loss"
    );
    assert_ne!(losses(&ra), losses(&rz), "--dropout 0.2 trained exactly like --dropout 0");
    let cfg = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(cfg.contains("dropout = 0.2"), "{cfg}");
    // Stopped after step 5 (a checkpoint there), resumed: the same rows as uninterrupted.
    let o = grit().args(args(&c, "0.2")).env("GRIT_STOP_AFTER_STEP", "5").output().unwrap();
    assert!(!o.status.success(), "the run was meant to stop after step 5");
    ok(grit().args(["train", "--resume", c.to_str().unwrap()]).output().unwrap());
    assert_eq!(rows(&c), ra, "resume with dropout differs from the uninterrupted run");
}
