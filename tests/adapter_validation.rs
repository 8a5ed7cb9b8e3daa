//! Untrusted adapter files: every entry point that hands an adapter to llama.cpp validates it
//! with grit's reader first. Each bad file below is refused with a message naming the file and
//! what is wrong, by `grit generate`, `grit eval`, `grit merge` and `grit serve` (at start and
//! through `POST /v1/adapters`), and the server keeps answering.

mod serve_util;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use grit::ggml::Type;
use serde_json::json;
use serve_util::Server;

const D: i64 = 576; // SmolLM2-135M's n_embd: attn_q is 576×576.
const R: i64 = 4;

/// A LoRA adapter GGUF (version 3, written byte by byte here so that it can hold what grit's
/// own writer refuses, such as a zero dimension) with (name, type, ne, bytes) tensors.
fn write(path: &Path, arch: &str, tensors: &[(&str, Type, Vec<i64>, Vec<u8>)]) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    const ALIGN: usize = 32;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(4u64.to_le_bytes());
    for (k, v) in
        [("general.architecture", arch), ("general.type", "adapter"), ("adapter.type", "lora")]
    {
        string(&mut out, k);
        out.extend(8u32.to_le_bytes()); // string
        string(&mut out, v);
    }
    string(&mut out, "adapter.lora.alpha");
    out.extend(6u32.to_le_bytes()); // float32
    out.extend(8f32.to_le_bytes());
    let mut offset = 0usize;
    for (name, ty, ne, data) in tensors {
        string(&mut out, name);
        out.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.0.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += data.len().next_multiple_of(ALIGN);
    }
    for (_, _, _, data) in tensors {
        out.resize(out.len().next_multiple_of(ALIGN), 0);
        out.extend(data);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    std::fs::write(path, out).unwrap();
}

fn f32s(n: i64, f: impl Fn(i64) -> f32) -> Vec<u8> {
    (0..n).flat_map(|i| f(i).to_le_bytes()).collect()
}

fn small(i: i64) -> f32 {
    ((i * 7 % 13) as f32 - 6.0) * 0.002
}

/// attn_q of layer 0 as an F32 pair [D, R]·[R, D], with `a` changed by `edit`.
fn pair(
    a_ne: Vec<i64>,
    b_ne: Vec<i64>,
    a: Vec<u8>,
) -> Vec<(&'static str, Type, Vec<i64>, Vec<u8>)> {
    let nb: i64 = b_ne.iter().product();
    vec![
        ("blk.0.attn_q.weight.lora_a", Type::F32, a_ne, a),
        ("blk.0.attn_q.weight.lora_b", Type::F32, b_ne, f32s(nb, small)),
    ]
}

/// The bad adapters: (file name, what the error must say).
fn bad_adapters(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    let mut add = |name: &str,
                   what: &'static str,
                   arch: &str,
                   tensors: Vec<(&'static str, Type, Vec<i64>, Vec<u8>)>| {
        let p = dir.join(name);
        write(&p, arch, &tensors);
        out.push((p, what));
    };
    add(
        "three_d.gguf",
        "do not form",
        "llama",
        pair(vec![D, R, 2], vec![R, D], f32s(D * R * 2, small)),
    );
    let i32s: Vec<u8> = (0..D * R).flat_map(|i| (i as i32).to_le_bytes()).collect();
    add("i32.gguf", "has type i32", "llama", {
        let mut t = pair(vec![D, R], vec![R, D], vec![]);
        t[0] = ("blk.0.attn_q.weight.lora_a", Type::I32, vec![D, R], i32s);
        t
    });
    let f64s: Vec<u8> = (0..D * R).flat_map(|i| (small(i) as f64).to_le_bytes()).collect();
    add("f64.gguf", "has type f64", "llama", {
        let mut t = pair(vec![D, R], vec![R, D], vec![]);
        t[0] = ("blk.0.attn_q.weight.lora_a", Type::F64, vec![D, R], f64s);
        t
    });
    let q4 = vec![0u8; Type::Q4_0.row_size(D as usize).unwrap() * R as usize];
    add("q4_0.gguf", "has type q4_0", "llama", {
        let mut t = pair(vec![D, R], vec![R, D], vec![]);
        t[0] = ("blk.0.attn_q.weight.lora_a", Type::Q4_0, vec![D, R], q4);
        t
    });
    add(
        "nan.gguf",
        "NaN",
        "llama",
        pair(vec![D, R], vec![R, D], f32s(D * R, |i| if i == 77 { f32::NAN } else { small(i) })),
    );
    add(
        "inf.gguf",
        "inf",
        "llama",
        pair(
            vec![D, R],
            vec![R, D],
            f32s(D * R, |i| if i == 5 { f32::INFINITY } else { small(i) }),
        ),
    );
    add(
        "rank0.gguf",
        "rank and sizes must be at least 1",
        "llama",
        pair(vec![D, 0], vec![0, D], vec![]),
    );
    add(
        "dims.gguf",
        "is this adapter for another base model",
        "llama",
        pair(vec![D - 64, R], vec![R, D], f32s((D - 64) * R, small)),
    );
    add(
        "qwen2.gguf",
        "architecture 'qwen2'",
        "qwen2",
        pair(vec![D, R], vec![R, D], f32s(D * R, small)),
    );
    add("no_such_layer.gguf", "has no such tensor", "llama", {
        let mut t = pair(vec![D, R], vec![R, D], f32s(D * R, small));
        t[0].0 = "blk.99.attn_q.weight.lora_a";
        t[1].0 = "blk.99.attn_q.weight.lora_b";
        t
    });
    // A good adapter cut short.
    let good = dir.join("good.gguf");
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() * 2 / 3]).unwrap();
    out.push((p, "truncated"));
    out
}

fn grit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grit"))
}

/// Exit status 1, one `error:` line naming `file` and saying `what`, no panic, no abort.
fn refused(o: &Output, file: &Path, what: &str, cmd: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{cmd} {}: expected exit 1, got {} (a signal means a crash in C code); stderr:\n{err}",
        file.display(),
        o.status
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{cmd}: no error line:\n{err}"));
    assert!(
        line.contains(&file.display().to_string()),
        "{cmd}: the error does not name {}: {line}",
        file.display()
    );
    assert!(
        line.contains(what),
        "{cmd} {}: the error does not say '{what}': {line}",
        file.display()
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_adapters_are_refused_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write(&good, "llama", &pair(vec![D, R], vec![R, D], f32s(D * R, small)));
    let text = dir.path().join("eval.txt");
    std::fs::write(&text, "To be, or not to be, that is the question. ".repeat(20)).unwrap();
    let out = dir.path().join("merged.gguf");
    // The well-formed control goes through every command.
    let gen = |a: &Path| {
        grit()
            .args([
                "generate",
                "--prompt",
                "Hello",
                "--max-tokens",
                "2",
                "--threads",
                "1",
                "--adapter",
            ])
            .arg(a)
            .output()
            .unwrap()
    };
    let eval = |a: &Path| {
        grit()
            .args(["eval", "--ctx", "32", "--threads", "1", "--data"])
            .arg(&text)
            .arg("--adapter")
            .arg(a)
            .output()
            .unwrap()
    };
    let merge = |a: &Path| {
        grit().args(["merge", "--adapter"]).arg(a).arg("--out").arg(&out).output().unwrap()
    };
    for (cmd, o) in [("generate", gen(&good)), ("eval", eval(&good)), ("merge", merge(&good))] {
        assert!(
            o.status.success(),
            "{cmd} with a good adapter: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    std::fs::remove_file(&out).unwrap();
    for (bad, what) in bad_adapters(dir.path()) {
        refused(&gen(&bad), &bad, what, "generate");
        refused(&eval(&bad), &bad, what, "eval");
        refused(&merge(&bad), &bad, what, "merge");
        assert!(!out.exists(), "merge wrote {} from {}", out.display(), bad.display());
    }
    // A NaN scale is refused by the argument parser.
    let o = grit()
        .args(["generate", "--prompt", "x", "--adapter-scale", "NaN", "--adapter"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("finite"));
}

#[test]
fn the_server_refuses_bad_adapters_and_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let adir = dir.path().join("adapters");
    std::fs::create_dir(&adir).unwrap();
    let good = adir.join("good.gguf");
    write(&good, "llama", &pair(vec![D, R], vec![R, D], f32s(D * R, small)));
    let bad = bad_adapters(&adir);
    // At start: refused with the adapter's name and file, before anything is served.
    let o = grit()
        .args(["serve", "--port", "0", "--threads", "1", "--adapter"])
        .arg(format!("x={}", bad[0].0.display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(bad[0].1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // At run time: 400 invalid_adapter for each, and generation goes on with the good one.
    let s = Server::start(&[
        "--adapter-dir",
        adir.to_str().unwrap(),
        "--ctx",
        "256",
        "--max-adapters",
        "2",
    ]);
    let r = s.post("/v1/adapters", &json!({"name": "good", "path": "good.gguf"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let ask = |model: &str| {
        s.post(
            "/v1/completions",
            &json!({"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}),
        )
    };
    for (i, (path, what)) in bad.iter().enumerate() {
        let name = format!("bad{i}");
        let file = path.file_name().unwrap().to_str().unwrap();
        let r = s.post("/v1/adapters", &json!({"name": name, "path": file}));
        assert_eq!(r.status, 400, "{file}: {}", r.body);
        let (_, _, msg) = r.error();
        assert_eq!(r.json()["error"]["code"], "invalid_adapter", "{file}: {}", r.body);
        assert!(msg.contains(what), "{file}: {msg}");
        // The name was never registered, and the server still generates.
        assert_eq!(ask(&name).status, 404, "{file}");
        let r = ask("good");
        assert_eq!(r.status, 200, "after {file}: {}", r.body);
    }
    // Failed loads took no place: a second good adapter fits, a third is over --max-adapters.
    assert_eq!(s.post("/v1/adapters", &json!({"name": "good2", "path": "good.gguf"})).status, 201);
    let r = s.post("/v1/adapters", &json!({"name": "good3", "path": "good.gguf"}));
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "too_many_adapters");
}

/// A bounded, deterministic mutation fuzz of adapter files through the path every command
/// uses (grit's validation, then llama.cpp's loader for what passes): byte flips (mostly in
/// the header and tensor infos), extreme integers written over header fields, truncations and
/// duplicated chunks of a good adapter. Each mutant must load or fail with an error: a panic
/// fails this test and an abort inside C code kills it.
#[test]
fn mutated_adapters_load_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write(&good, "llama", &pair(vec![D, R], vec![R, D], f32s(D * R, small)));
    let seed = std::fs::read(&good).unwrap();
    let header = seed.len() - (2 * D * R * 4) as usize; // metadata and tensor infos, padded
    let mut model = grit::infer::Model::load(
        &serve_util::model(),
        &grit::infer::LoadOptions { n_gpu_layers: 0, device: grit::ggml::Device::Cpu },
    )
    .unwrap();
    let mut rng = grit::data::SplitMix64::new(0x6164_6170);
    let n: usize =
        std::env::var("GRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let (mut loaded, mut refused) = (0, 0);
    let path = dir.path().join("mutant.gguf");
    for case in 0..n {
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(4) {
            let head = header.min(b.len());
            if head < 16 {
                break;
            }
            match rng.below(10) {
                0..=4 => {
                    let at = if rng.below(4) > 0 {
                        rng.below(head as u64)
                    } else {
                        rng.below(b.len() as u64)
                    } as usize;
                    b[at] ^= 1 << rng.below(8);
                }
                5 | 6 => {
                    let v: u64 =
                        [0, 1, 0xffff_ffff, u64::MAX, 1 << 40, 63, 64][rng.below(7) as usize];
                    let at = (rng.below((head - 8) as u64) as usize) & !3;
                    let width = if rng.below(2) == 0 { 4 } else { 8 };
                    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                }
                7 | 8 => b.truncate(rng.below(b.len() as u64) as usize),
                _ => {
                    let (from, len) =
                        (rng.below(b.len() as u64) as usize, 1 + rng.below(64) as usize);
                    let chunk: Vec<u8> = b[from..(from + len).min(b.len())].to_vec();
                    let at = rng.below(b.len() as u64) as usize;
                    b.splice(at..at, chunk);
                }
            }
        }
        std::fs::write(&path, &b).unwrap();
        match model.load_adapter(&path) {
            Ok(_) => loaded += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "case {case}");
                refused += 1;
            }
        }
    }
    eprintln!("mutated adapters: {n} cases, {loaded} loaded, {refused} refused");
    assert!(refused > n / 2, "most mutants must be refused ({refused} of {n})");
}

/// The same for PEFT folders (what `grit export --to gguf`, `merge`, `inspect` and
/// `serve --merge-adapters` read): byte mutations of the safetensors file (mostly its JSON
/// header) and of adapter_config.json, through grit's PEFT reader against the base model.
#[test]
fn mutated_peft_folders_load_or_fail_cleanly() {
    use grit::adapter::peft::{read_peft, write_peft, CONFIG, WEIGHTS};
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    // attn_v: no q/k row permutation, so no head counts are needed to write PEFT.
    let v_out = 192;
    write(
        &good,
        "llama",
        &[
            ("blk.0.attn_v.weight.lora_a", Type::F32, vec![D, R], f32s(D * R, small)),
            ("blk.0.attn_v.weight.lora_b", Type::F32, vec![R, v_out], f32s(R * v_out, small)),
        ],
    );
    let base = serve_util::model();
    let peft = dir.path().join("peft");
    write_peft(&grit::adapter::Adapter::read_gguf(&good).unwrap(), &peft).unwrap();
    read_peft(&peft, Some(&base)).expect("the unmutated folder reads");
    let (weights, config) =
        (std::fs::read(peft.join(WEIGHTS)).unwrap(), std::fs::read(peft.join(CONFIG)).unwrap());
    let header = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut rng = grit::data::SplitMix64::new(0x7065_6674);
    let n: usize =
        std::env::var("GRIT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let (mut loaded, mut refused) = (0, 0);
    for case in 0..n {
        let (mut w, mut c) = (weights.clone(), config.clone());
        for _ in 0..1 + rng.below(3) {
            let (buf, span) =
                if rng.below(3) == 0 { (&mut c, config.len()) } else { (&mut w, header) };
            match rng.below(4) {
                0 if buf.len() > 1 => buf.truncate(rng.below(buf.len() as u64) as usize),
                _ => {
                    let at = rng.below(span.min(buf.len()).max(1) as u64) as usize;
                    if at < buf.len() {
                        buf[at] = [b'0', b'9', b'"', b',', b'[', b'-', 0xff, buf[at] ^ 1]
                            [rng.below(8) as usize];
                    }
                }
            }
        }
        std::fs::write(peft.join(WEIGHTS), &w).unwrap();
        std::fs::write(peft.join(CONFIG), &c).unwrap();
        match read_peft(&peft, Some(&base)) {
            Ok(_) => loaded += 1,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "case {case}");
                refused += 1;
            }
        }
    }
    eprintln!("mutated PEFT folders: {n} cases, {loaded} loaded, {refused} refused");
}
