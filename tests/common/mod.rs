//! Helpers shared by the `grit train` CLI tests (a tiny Q4_1 model, the plays, metrics rows).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use grit::ggml::Type;
use grit::model::{write_tiny_model, TinySpec};

pub fn grit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grit"))
}

pub fn plays() -> PathBuf {
    grit::fetch::ensure_shakespeare().expect("shakespeare plays")
}

pub fn tiny_model(dir: &Path) -> PathBuf {
    tiny_model_of(dir, grit::model::Arch::Llama)
}

/// The tiny Q4_1 model of [`tiny_model`] in another architecture (`tiny-{arch}.gguf`; the
/// llama one is `tiny.gguf`).
pub fn tiny_model_of(dir: &Path, arch: grit::model::Arch) -> PathBuf {
    let path = match arch {
        grit::model::Arch::Llama => dir.join("tiny.gguf"),
        a => dir.join(format!("tiny-{}.gguf", a.name())),
    };
    let spec = tiny_spec(arch);
    write_tiny_model(&path, &spec, &grit::fetch::ensure_default_model().unwrap()).unwrap();
    path
}

/// The spec of [`tiny_model_of`]'s models (seed 1).
pub fn tiny_spec(arch: grit::model::Arch) -> TinySpec {
    TinySpec {
        arch,
        // Qwen3's and Gemma 3's heads are wider than n_embd / n_head (Qwen3-0.6B: 1024
        // wide, 16 × 128; Gemma-3-270M: 640 wide, 4 × 256).
        head_dim: matches!(arch, grit::model::Arch::Qwen3 | grit::model::Arch::Gemma3)
            .then_some(64),
        // Gemma 3: layer 0 slides over 16 tokens, layer 1 is global.
        sliding_window: (arch == grit::model::Arch::Gemma3).then_some(grit::model::TinyWindow {
            window: 16,
            pattern: 2,
            rope_freq_base: 1000.0,
        }),
        n_embd: 128,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 256,
        weight_type: Type::Q4_1,
        seed: 1,
        ..TinySpec::default()
    }
}

pub fn ok(o: Output) -> Output {
    // The status names a signal (a crash inside C code leaves no message of its own).
    assert!(
        o.status.success(),
        "grit failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// metrics.jsonl rows without the timing fields (which differ between runs).
pub fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("elapsed_s");
            v
        })
        .collect()
}

/// llama.cpp's logits at every position ([n_tokens × n_vocab]); see `Model::logits_all`.
pub fn llama_cpp_logits(
    model: &mut grit::infer::Model,
    adapter: Option<&Path>,
    tokens: &[i32],
    threads: i32,
) -> Vec<f32> {
    model.logits_all(adapter, tokens, threads).expect("llama.cpp logits")
}

/// The device the backend-generic tests run on: `GRIT_DEVICE=gpu` runs them on the GPU of a
/// GPU build (and fails when there is none: never a silent CPU run); unset or `cpu`, the CPU.
/// The same variable sets `--device` of the `grit` commands the tests start.
pub fn test_device() -> grit::ggml::Device {
    match std::env::var("GRIT_DEVICE").as_deref() {
        Ok("gpu") => grit::ggml::Device::Gpu,
        Ok("auto") => grit::ggml::Device::Auto,
        Ok("cpu") | Ok("") | Err(_) => grit::ggml::Device::Cpu,
        Ok(other) => panic!("GRIT_DEVICE={other}: expected cpu, gpu or auto"),
    }
}

/// A backend on [`test_device`] with `threads` CPU threads (0 = all cores).
pub fn backend(threads: usize) -> grit::ggml::Backend {
    let b = grit::ggml::Backend::new(grit::ggml::BackendOptions {
        device: test_device(),
        n_threads: threads,
    })
    .expect("the test device");
    if test_device() == grit::ggml::Device::Gpu {
        assert!(b.is_gpu(), "GRIT_DEVICE=gpu but the backend is {}", b.name());
    }
    b
}

/// llama.cpp's load options on [`test_device`] (the parity references run where grit runs).
pub fn load_options() -> grit::infer::LoadOptions {
    match test_device() {
        grit::ggml::Device::Cpu => grit::infer::LoadOptions::cpu(),
        d => grit::infer::LoadOptions { n_gpu_layers: 999, device: d },
    }
}

/// One JSON-aware mutation for the fuzz tests: somewhere in `v`, a field is removed, replaced
/// by `wild(rng)` or mutated further, an array element is mutated or one appended, a scalar is
/// replaced, or one of `new_keys` is added to an object.
pub fn mutate_json(
    v: &mut serde_json::Value,
    rng: &mut grit::data::SplitMix64,
    new_keys: &[&str],
    wild: &dyn Fn(&mut grit::data::SplitMix64) -> serde_json::Value,
) {
    use serde_json::Value;
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(3) > 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = keys[rng.below(keys.len() as u64) as usize].clone();
            match rng.below(4) {
                0 => {
                    m.remove(&k);
                }
                1 => {
                    m.insert(k, wild(rng));
                }
                _ => mutate_json(m.get_mut(&k).expect("key"), rng, new_keys, wild),
            }
        }
        Value::Object(m) => {
            m.insert(new_keys[rng.below(new_keys.len() as u64) as usize].into(), wild(rng));
        }
        Value::Array(a) if !a.is_empty() && rng.below(3) > 0 => {
            let i = rng.below(a.len() as u64) as usize;
            mutate_json(&mut a[i], rng, new_keys, wild);
        }
        Value::Array(a) => a.push(wild(rng)),
        other => *other = wild(rng),
    }
}
