//! `grit export` both ways, `grit inspect`, and the errors of adapter handling, through the
//! binary on tiny models:
//! - GGUF → PEFT → GGUF is bit-exact in values (F32) and keeps per-tensor ranks and scales,
//!   for a GRIT-like adapter (mixed ranks, scale of the initial rank) and a uniform LoRA one;
//! - the PEFT folder holds HF names, rank_pattern/alpha_pattern with alpha/r = the scale, and
//!   lora_B of attn_q/attn_k in Hugging Face row order (llama's permutation undone);
//! - clear one-line errors: another architecture, mismatched shapes, missing halves,
//!   unsupported dtypes; the provenance warning and `--strict`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use grit::adapter::{Adapter, AdapterDtype, Provenance};
use grit::ggml::{Backend, Type};
use grit::gguf::GgufFile;
use grit::model::{write_tiny_model, LoraSet, Target, TinySpec, Weights};
use safetensors::tensor::{Dtype, TensorView};

mod common;
use common::{grit, ok, tiny_model};

/// A failing run: exit status 1 (not a panic or signal), one `error:` line naming `what`.
fn fails(args: &[&str], what: &[&str]) -> String {
    let o = grit().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a clean failure of {args:?}, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    for w in what {
        assert!(line.contains(w), "error line lacks '{w}': {line}");
    }
    println!("{args:?} → {line}");
    line.to_string()
}

/// A mixed-rank adapter (ranks 1..=8 over the modules, scale 2 = 16/8 everywhere, like GRIT
/// after cuts) and a uniform one (rank 4, alpha 8), random values, written by grit.
fn write_adapters(model: &Path, dir: &Path) -> (PathBuf, PathBuf) {
    let backend = Backend::cpu(2).unwrap();
    let weights = Weights::load(&GgufFile::open(model).unwrap(), &backend).unwrap();
    let mut specs = Vec::new();
    let mut uni = Vec::new();
    for layer in 0..weights.hparams.n_layer {
        for (k, t) in weights.targets().into_iter().enumerate() {
            specs.push((layer, t, 1 + (layer * 7 + k * 3) % 8, 2.0));
            uni.push((layer, t, 4, 2.0));
        }
    }
    let prov =
        Provenance::for_base(model, "grit", Some("rank = 8\nalpha = 16.0\n".into())).unwrap();
    let mut out = Vec::new();
    for (name, s, seed) in [("mixed.gguf", &specs, 3), ("uniform.gguf", &uni, 4)] {
        let set = LoraSet::with_modules(&weights, s, &backend).unwrap();
        set.randomize(seed, 0.1, 0.1).unwrap();
        let path = dir.join(name);
        Adapter::from_lora_set(&set, "llama", prov.clone())
            .unwrap()
            .write_gguf(&path, AdapterDtype::F32)
            .unwrap();
        out.push(path);
    }
    (out[0].clone(), out[1].clone())
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn gguf_peft_gguf_round_trip_is_bit_exact_and_keeps_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (mixed, uniform) = write_adapters(&model, dir.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();

    for (src, expect_alpha) in [(&mixed, 0.0f32), (&uniform, 8.0)] {
        let peft = dir.path().join(format!("{}-peft", src.file_stem().unwrap().to_string_lossy()));
        let back =
            dir.path().join(format!("{}-back.gguf", src.file_stem().unwrap().to_string_lossy()));
        ok(grit().args(["export", &s(src), "--to", "peft", &s(&peft)]).output().unwrap());
        ok(grit().args(["export", &s(&peft), "--to", "gguf", &s(&back)]).output().unwrap());
        let a = Adapter::read_gguf(src).unwrap();
        let b = Adapter::read_gguf(&back).unwrap();
        assert_eq!(a.file_alpha, Some(expect_alpha));
        assert_eq!(b.file_alpha, a.file_alpha, "{}", src.display());
        assert_eq!(b.provenance, a.provenance);
        assert_eq!(a.modules.len(), b.modules.len());
        for (x, y) in a.modules.iter().zip(&b.modules) {
            assert_eq!((&x.base, x.rank, x.d_in, x.d_out), (&y.base, y.rank, y.d_in, y.d_out));
            assert_eq!(x.scale.to_bits(), y.scale.to_bits(), "{}", x.base);
            assert_eq!(bits(&x.a), bits(&y.a), "{}: A differs", x.base);
            assert_eq!(bits(&x.b), bits(&y.b), "{}: B differs", x.base);
        }
        let ranks: std::collections::BTreeSet<usize> = b.modules.iter().map(|m| m.rank).collect();
        println!(
            "{}: {} modules, ranks {ranks:?}, round trip bit-exact",
            src.display(),
            b.modules.len()
        );

        // What PEFT reads: HF names, r/alpha per module with alpha/r == grit's scale.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let raw = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        for m in &a.modules {
            let (layer, t) = (m.layer.unwrap(), m.target.unwrap());
            let hf = grit::adapter::peft::hf_name(grit::model::Arch::Llama, layer, t);
            let r = cfg["rank_pattern"]
                .get(&hf)
                .and_then(|v| v.as_u64())
                .unwrap_or(cfg["r"].as_u64().unwrap()) as usize;
            let alpha = cfg["alpha_pattern"]
                .get(&hf)
                .and_then(|v| v.as_f64())
                .unwrap_or(cfg["lora_alpha"].as_f64().unwrap());
            assert_eq!(r, m.rank, "{hf}");
            assert_eq!((alpha / r as f64) as f32, m.scale, "{hf}");
            let bt = st.tensor(&format!("base_model.model.{hf}.lora_B.weight")).unwrap();
            assert_eq!(bt.shape(), &[m.d_out, m.rank]);
            let hf_b: Vec<f32> = bt
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // GGUF row h·hd + 2i + j is HF row h·hd + j·hd/2 + i for q (4 heads) and k (2 heads).
            let heads = match t {
                Target::AttnQ => 4,
                Target::AttnK => 2,
                _ => 0,
            };
            if heads == 0 {
                assert_eq!(bits(&hf_b), bits(&m.b), "{hf}");
                continue;
            }
            let hd = m.d_out / heads;
            for h in 0..heads {
                for i in 0..hd / 2 {
                    for j in 0..2 {
                        let (g, f) = (h * hd + 2 * i + j, h * hd + j * hd / 2 + i);
                        assert_eq!(
                            &hf_b[f * m.rank..(f + 1) * m.rank],
                            &m.b[g * m.rank..(g + 1) * m.rank],
                            "{hf} row {f}"
                        );
                    }
                }
            }
            assert_ne!(bits(&hf_b), bits(&m.b), "{hf}: rows were not permuted");
        }
    }

    // F16 on request: values rounded to f16, per-tensor ranks kept, and llama.cpp loads it.
    let f16 = dir.path().join("mixed-f16.gguf");
    ok(grit()
        .args(["export", &s(&mixed), "--to", "gguf", "--dtype", "f16", &s(&f16)])
        .output()
        .unwrap());
    let (x, y) = (Adapter::read_gguf(&mixed).unwrap(), Adapter::read_gguf(&f16).unwrap());
    for (p, q) in x.modules.iter().zip(&y.modules) {
        assert_eq!((p.rank, q.dtype.as_str()), (q.rank, "f16"));
        assert!(
            p.b.iter().zip(&q.b).all(|(u, v)| (u - v).abs() <= 1e-3 * u.abs().max(1e-2)),
            "{}",
            p.base
        );
    }
    ok(grit()
        .args(["generate", "--model", &s(&model), "--adapter", &s(&f16), "-p", "Hi", "-n", "2"])
        .output()
        .unwrap());

    // inspect: the rank table of the mixed adapter, as JSON and as text.
    let o = ok(grit().args(["inspect", &s(&mixed), "--json"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = Adapter::read_gguf(&mixed).unwrap();
    assert_eq!(v["kind"], "adapter");
    assert_eq!(v["parameters"].as_u64().unwrap() as usize, a.n_params());
    assert_eq!(v["rank_table"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["rank_table"][1]["ranks"]["ffn_up"].as_u64().unwrap() as usize,
        a.modules.iter().find(|m| m.base == "blk.1.ffn_up.weight").unwrap().rank
    );
    assert_eq!(v["provenance"]["method"], "grit");
    assert!(v["distinct_ranks"].as_u64().unwrap() >= 5);
    let o = ok(grit().args(["inspect", &s(&mixed)]).output().unwrap());
    let text = String::from_utf8_lossy(&o.stdout);
    println!("{text}");
    assert!(
        text.contains("rank per layer")
            && text.contains("attn_q")
            && text.contains(&a.n_params().to_string())
    );
    // A PEFT folder and a merged model are inspected too.
    let o = ok(grit()
        .args(["inspect", &s(&dir.path().join("mixed-peft")), "--json"])
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["format"].as_str(), v["parameters"].as_u64().unwrap() as usize),
        (Some("peft"), a.n_params())
    );
    let merged = dir.path().join("merged.gguf");
    ok(grit()
        .args([
            "merge",
            "--model",
            &s(&model),
            "--adapter",
            &s(&mixed),
            "--type",
            "q8_0",
            "--out",
            &s(&merged),
        ])
        .output()
        .unwrap());
    let o = ok(grit().args(["inspect", &s(&merged), "--json"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "model");
    assert_eq!(v["merged"]["modules"], "14");
    assert_eq!(v["tensor_types"]["q8_0"].as_u64(), Some(14));
}

/// Rewrites a PEFT folder's safetensors with `edit` applied to the tensor map.
fn edit_peft(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dst.join("adapter_config.json")).unwrap();
    let raw = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&raw).unwrap().1.metadata().clone();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let mut ts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<(String, TensorView<'_>)> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, &meta.map(|m: HashMap<String, String>| m)).unwrap();
    std::fs::write(dst.join("adapter_model.safetensors"), bytes).unwrap();
}

#[test]
fn adapter_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (mixed, _) = write_adapters(&model, dir.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = |n: &str| s(&dir.path().join(n));

    // Another architecture.
    let mut q = Adapter::read_gguf(&mixed).unwrap();
    q.arch = "qwen2".into();
    let qpath = dir.path().join("qwen2.gguf");
    q.write_gguf(&qpath, AdapterDtype::F32).unwrap();
    fails(
        &["merge", "--model", &s(&model), "--adapter", &s(&qpath), "--out", &out("m1.gguf")],
        &["architecture 'qwen2'", "'llama'"],
    );
    fails(&["export", &s(&qpath), "--to", "peft", &out("p1"), "--model", &s(&model)], &["qwen2"]);

    // Mismatched shapes: the adapter of a 128-wide model on a 64-wide one.
    let small = dir.path().join("small.gguf");
    let spec = TinySpec {
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        weight_type: Type::Q4_1,
        seed: 1,
        ..TinySpec::default()
    };
    write_tiny_model(&small, &spec, &grit::fetch::ensure_default_model().unwrap()).unwrap();
    fails(
        &["merge", "--model", &s(&small), "--adapter", &s(&mixed), "--out", &out("m2.gguf")],
        &["blk.0.attn_q.weight", "128×128", "64×64"],
    );
    fails(
        &["export", &s(&mixed), "--to", "peft", &out("p2"), "--model", &s(&small)],
        &["blk.0.attn_q.weight", "another base model"],
    );

    // Missing halves, unsupported dtypes, a rank that disagrees with the config.
    let peft = dir.path().join("peft");
    ok(grit().args(["export", &s(&mixed), "--to", "peft", &s(&peft)]).output().unwrap());
    let half = dir.path().join("peft-half");
    edit_peft(&peft, &half, |ts| {
        ts.retain(|t| t.0 != "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
    });
    fails(
        &["export", &s(&half), "--to", "gguf", &out("h.gguf")],
        &["model.layers.1.mlp.up_proj", "lora_B"],
    );
    let f64_dir = dir.path().join("peft-f64");
    edit_peft(&peft, &f64_dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0.ends_with("layers.0.self_attn.v_proj.lora_A.weight"))
            .unwrap();
        t.1 = Dtype::F64;
        t.2[1] /= 2;
    });
    fails(
        &["export", &s(&f64_dir), "--to", "gguf", &out("f.gguf")],
        &["layers.0.self_attn.v_proj.lora_A", "F64"],
    );
    let mut g = grit::ggml::GgufWriter::new();
    g.set_str("general.architecture", "llama");
    g.set_str("general.type", "adapter");
    g.set_str("adapter.type", "lora");
    g.set_f32("adapter.lora.alpha", 0.0);
    g.add_tensor(
        "blk.0.attn_q.weight.lora_a",
        Type::Q4_0,
        &[128, 2],
        grit::ggml::quantize(Type::Q4_0, &[0.25; 256], 128).unwrap(),
    )
    .unwrap();
    g.add_f32("blk.0.attn_q.weight.lora_b", &[2, 128], &[0.0; 256]).unwrap();
    let q4 = dir.path().join("q4.gguf");
    g.write(&q4).unwrap();
    fails(&["inspect", &s(&q4)], &["blk.0.attn_q.weight.lora_a", "q4_0"]);
    fails(
        &["merge", "--model", &s(&model), "--adapter", &s(&q4), "--out", &out("m3.gguf")],
        &["q4_0"],
    );
    // Not an adapter at all; a PEFT folder without grit's metadata and without --model.
    fails(
        &["export", &s(&model), "--to", "peft", &out("p3")],
        &["not a LoRA adapter", "general.type"],
    );
    let bare = dir.path().join("peft-bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(peft.join("adapter_config.json"), bare.join("adapter_config.json")).unwrap();
    {
        let raw = std::fs::read(peft.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
        let views: Vec<(String, TensorView<'_>)> = st.tensors();
        std::fs::write(
            bare.join("adapter_model.safetensors"),
            safetensors::serialize(views, &None).unwrap(),
        )
        .unwrap();
    }
    fails(&["export", &s(&bare), "--to", "gguf", &out("b.gguf")], &["--model"]);
    // With --model it converts, and matches the folder written with metadata.
    ok(grit()
        .args(["export", &s(&bare), "--to", "gguf", &out("b.gguf"), "--model", &s(&model)])
        .output()
        .unwrap());
    let (x, y) = (
        Adapter::read_gguf(&mixed).unwrap(),
        Adapter::read_gguf(&dir.path().join("b.gguf")).unwrap(),
    );
    assert!(x
        .modules
        .iter()
        .zip(&y.modules)
        .all(|(p, q)| bits(&p.b) == bits(&q.b) && bits(&p.a) == bits(&q.a) && p.rank == q.rank));
    // An existing output is not replaced silently; k-quants need rows of 256.
    fails(&["export", &s(&mixed), "--to", "peft", &s(&peft)], &["already exists", "--overwrite"]);
    fails(
        &[
            "merge",
            "--model",
            &s(&model),
            "--adapter",
            &s(&mixed),
            "--type",
            "q4_k",
            "--out",
            &out("m4.gguf"),
        ],
        &["blk.0.attn_q.weight", "q4_K", "--type"],
    );

    // Provenance: the same shapes, another base (other weights): a warning, an error with --strict.
    let other = dir.path().join("other.gguf");
    let spec = TinySpec { seed: 2, ..common::tiny_spec(grit::model::Arch::Llama) };
    write_tiny_model(&other, &spec, &grit::fetch::ensure_default_model().unwrap()).unwrap();
    let gen = |m: &Path, strict: bool| {
        let mut a = vec![
            "generate".to_string(),
            "--model".into(),
            s(m),
            "--adapter".into(),
            s(&mixed),
            "-p".into(),
            "Hi".into(),
            "-n".into(),
            "2".into(),
        ];
        if strict {
            a.push("--strict".into());
        }
        grit().args(&a).output().unwrap()
    };
    let o = ok(gen(&other, false));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("another base model") && err.contains("sha256"),
        "{err}"
    );
    let o = ok(gen(&model, false));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("warning"));
    let o = gen(&other, true);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--strict"));
    // `eval` and `serve` apply the same check (library: adapter::check_provenance).
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "To be, or not to be, that is the question. ".repeat(20)).unwrap();
    let eval = |strict: bool| {
        let mut a = vec![
            "eval".to_string(),
            "--model".into(),
            s(&other),
            "--adapter".into(),
            s(&mixed),
            "--data".into(),
            s(&text),
        ];
        a.extend(["--ctx", "32", "--max-examples", "1"].map(String::from));
        if strict {
            a.push("--strict".into());
        }
        grit().args(&a).output().unwrap()
    };
    let err = String::from_utf8_lossy(&ok(eval(false)).stderr).into_owned();
    assert!(err.contains("warning") && err.contains("another base model"), "{err}");
    let o = eval(true);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another base model"));
    let o = grit()
        .args([
            "serve",
            "--model",
            &s(&other),
            "--adapter",
            &format!("a={}", s(&mixed)),
            "--strict",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--adapter a=") && err.contains("another base model"), "{err}");
}

#[test]
fn q8_0_adapters_are_small_and_keep_their_values() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (mixed, _) = write_adapters(&model, dir.path());
    let q8 = dir.path().join("q8.gguf");
    ok(grit()
        .args([
            "export",
            mixed.to_str().unwrap(),
            q8.to_str().unwrap(),
            "--to",
            "gguf",
            "--dtype",
            "q8_0",
        ])
        .output()
        .unwrap());
    let (a, b) = (Adapter::read_gguf(&mixed).unwrap(), Adapter::read_gguf(&q8).unwrap());
    assert_eq!(a.modules.len(), b.modules.len());
    for (x, y) in a.modules.iter().zip(&b.modules) {
        assert_eq!((x.rank, x.d_in, x.d_out), (y.rank, y.d_in, y.d_out));
        let (ba, bb) = (
            x.b.iter().map(|v| v * x.scale).collect::<Vec<_>>(),
            y.b.iter().map(|v| v * y.scale).collect::<Vec<_>>(),
        );
        for (u, v) in [(&x.a, &y.a), (&ba, &bb)] {
            let max = u.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = u.iter().zip(v.iter()).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(err <= max / 100.0, "{}: max error {err} vs max |value| {max}", x.base);
        }
    }
    let v: serde_json::Value = serde_json::from_slice(
        &ok(grit().args(["inspect", "--json", q8.to_str().unwrap()]).output().unwrap()).stdout,
    )
    .unwrap();
    assert!(v["dtypes"].as_object().unwrap().keys().any(|k| k.starts_with("q8_0")), "{v}");
    assert!(std::fs::metadata(&q8).unwrap().len() * 2 < std::fs::metadata(&mixed).unwrap().len());
}
