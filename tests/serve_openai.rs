//! `grit serve` driven by the official `openai` Python client (from PyPI). The client is
//! installed into a virtual environment under the target folder on first use (or taken from
//! $GRIT_OPENAI_PYTHON, a python that can `import openai`); the test fails if neither works.

mod serve_util;

use std::path::PathBuf;
use std::process::Command;

use grit::model::Target;
use serde_json::Value;
use serve_util::*;

/// A python with the `openai` package.
fn openai_python() -> PathBuf {
    if let Ok(p) = std::env::var("GRIT_OPENAI_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let ok = |py: &PathBuf| {
        Command::new(py).args(["-c", "import openai"]).status().is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let st = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv (Debian: apt-get install python3-venv)");
        assert!(
            st.success(),
            "python3 -m venv {} failed (Debian: apt-get install python3-venv)",
            venv.display()
        );
        let st = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.40,<3",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "pip install openai failed");
    }
    assert!(ok(&py), "{} cannot import openai", py.display());
    py
}

#[test]
fn the_openai_python_client_works_against_grit_serve() {
    let py = openai_python();
    let dir = tempfile::tempdir().unwrap();
    let a1 = dir.path().join("a1.gguf");
    write_adapter(&a1, 4, &[Target::AttnQ, Target::AttnV], 1);
    let s = Server::start(&[
        "--adapter",
        &format!("a1={}", a1.display()),
        "--adapter-dir",
        dir.path().to_str().unwrap(),
        "--api-key",
        "k3y",
        "--ctx",
        "512",
        "--parallel",
        "2",
    ]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve/openai_client.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(format!("http://{}/v1", s.addr))
        .arg("k3y")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("{}", serde_json::to_string_pretty(&v).unwrap());

    let prompt = "Once upon a time";
    let base_ref = grit_generate(prompt, 24, None);
    let a1_ref = grit_generate(prompt, 24, Some(&a1));
    let name = model().file_stem().unwrap().to_string_lossy().trim_end_matches(".gguf").to_string();
    assert_eq!(v["models"], serde_json::json!([name, "a1"]));
    assert_eq!(v["completion_base"], base_ref.as_str());
    assert_eq!(v["completion_a1"], a1_ref.as_str());
    assert_eq!(v["completion_base_stream"], base_ref.as_str());
    assert_eq!(v["completion_a1_stream"], a1_ref.as_str());
    assert_eq!(v["completion_a1_usage"][1], 24);
    assert_eq!(v["chat"], v["chat_stream"]);
    assert!(!v["chat"].as_str().unwrap().is_empty());
    assert!(v["chat_stream_usage"].as_u64().unwrap() > 0);
    assert_eq!(v["stacked_a1_only"], a1_ref.as_str());
    assert_eq!(v["hot_load_status"], 201);
    assert_eq!(v["models_after_load"].as_array().unwrap().len(), 3);
    assert_eq!(v["completion_hot"], a1_ref.as_str());
    assert_eq!(v["hot_unload_status"], 200);
    for (k, status) in [
        ("unknown_model", 404),
        ("unloaded_adapter", 404),
        ("bad_temperature", 400),
        ("context_overflow", 400),
        ("wrong_key", 401),
    ] {
        assert_eq!(v["errors"][k][1], status, "{k}: {}", v["errors"][k]);
    }
    assert_eq!(v["embedding_dims"], serde_json::json!([576, 576]));
    assert!((v["embedding_norm"].as_f64().unwrap() - 1.0).abs() < 1e-3);
}
