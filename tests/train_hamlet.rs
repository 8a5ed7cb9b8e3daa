//! The training acceptance run on the real default model: LoRA with default flags for 40 steps
//! on Hamlet, evaluated on Macbeth, must end with eval loss ≤ 0.97 × the step-0 eval loss;
//! and the adapter it exports must load and generate through llama.cpp. (~6 minutes on 2 cores.)

use std::process::Command;

fn grit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grit"))
}

#[test]
fn lora_on_hamlet_improves_macbeth_and_exports_a_working_adapter() {
    let plays = grit::fetch::ensure_shakespeare().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = grit()
        .args(["train", "--method", "lora", "--data"])
        .arg(plays.join("hamlet.txt"))
        .arg("--eval-data")
        .arg(plays.join("macbeth.txt"))
        .args(["--steps", "40", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let evals: Vec<(u64, f64)> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["eval_loss"].as_f64().unwrap()))
        .collect();
    let (first, last) = (evals.first().unwrap(), evals.last().unwrap());
    println!("eval loss: {evals:?}; ratio {:.4}", last.1 / first.1);
    assert_eq!((first.0, last.0), (0, 40));
    assert!(last.1 <= 0.97 * first.1, "eval loss {} is not ≤ 0.97 × {}", last.1, first.1);

    // The adapter loads in llama.cpp and changes what the model says.
    let prompt =
        ["generate", "--prompt", "HAMLET. To be, or not to be,", "--max-tokens", "16", "--json"];
    let base = grit().args(prompt).output().unwrap();
    let tuned =
        grit().args(prompt).arg("--adapter").arg(out.join("adapter.gguf")).output().unwrap();
    assert!(tuned.status.success(), "{}", String::from_utf8_lossy(&tuned.stderr));
    let text = |o: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    println!("base: {:?}\ntuned: {:?}", text(&base), text(&tuned));
    assert_ne!(text(&base), text(&tuned), "the adapter changes nothing");
}
