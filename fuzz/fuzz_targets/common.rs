//! What every fuzz target shares: a tiny model and adapter made once per process, and the
//! edit language that turns the fuzzer's bytes into a mutant of a good file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use grit::ggml::Backend;
use grit::gguf::GgufFile;
use grit::model::{write_tiny_model, LoraConfig, LoraSet, Target, TinySpec, Weights};

pub struct Env {
    /// Keeps the folder alive for the whole run.
    pub dir: tempfile::TempDir,
    /// A tiny random llama model with the default model's tokenizer.
    pub model: PathBuf,
    pub model_bytes: Vec<u8>,
    /// Metadata and tensor infos of `model` (everything before the tensor data).
    pub model_header: usize,
    /// A good rank-4 adapter for `model` (q and v projections of every layer).
    pub adapter: PathBuf,
    pub adapter_bytes: Vec<u8>,
    pub adapter_header: usize,
}

pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        grit::llama::init_logging(false);
        let dir = tempfile::tempdir().expect("temporary folder");
        let model = dir.path().join("tiny.gguf");
        let from =
            grit::fetch::ensure_default_model().expect("the default model (run `grit fetch` once)");
        write_tiny_model(&model, &TinySpec::default(), &from).expect("tiny model");
        let adapter = dir.path().join("good.gguf");
        write_adapter(&model, &adapter);
        let header = |p: &Path| GgufFile::open(p).expect("reads back").data_offset() as usize;
        Env {
            model_bytes: std::fs::read(&model).unwrap(),
            model_header: header(&model),
            adapter_bytes: std::fs::read(&adapter).unwrap(),
            adapter_header: header(&adapter),
            dir,
            model,
            adapter,
        }
    })
}

fn write_adapter(model: &Path, out: &Path) {
    let backend = Backend::cpu(1).unwrap();
    let weights = Weights::load(&GgufFile::open(model).unwrap(), &backend).unwrap();
    let cfg = LoraConfig {
        targets: vec![Target::AttnQ, Target::AttnV],
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    };
    let lora = LoraSet::new(&weights, &cfg, &backend).unwrap();
    lora.randomize(7, 0.04, 0.04).unwrap();
    grit::adapter::Adapter::from_lora_set(&lora, weights.hparams.arch.name(), Default::default())
        .unwrap()
        .write_gguf(out, grit::adapter::AdapterDtype::F32)
        .unwrap();
}

/// Applies the fuzzer's bytes to `files` as edits, one 8-byte record each (at most 16):
/// `[op, file, pos: u16 LE ×2 = u32, value: 2 bytes]`. The position lands in the first
/// `focus[file]` bytes (a header) unless op's top bit is set. Ops: flip a bit, write a byte,
/// write an extreme u32 or u64, truncate, duplicate a chunk, delete a chunk.
pub fn apply_edits(files: &mut [Vec<u8>], focus: &[usize], data: &[u8]) {
    for rec in data.chunks_exact(8).take(16) {
        let (op, f) = (rec[0], rec[1] as usize % files.len());
        let b = &mut files[f];
        if b.is_empty() {
            continue;
        }
        let span = if op & 0x80 != 0 { b.len() } else { focus[f].clamp(1, b.len()) };
        let pos = u32::from_le_bytes([rec[2], rec[3], rec[4], rec[5]]) as usize % span;
        let v = u16::from_le_bytes([rec[6], rec[7]]);
        const EXTREME: [u64; 8] = [0, 1, 0xffff_ffff, u64::MAX, 1 << 40, 63, 64, 1 << 31];
        match op & 0x7 {
            0 => b[pos] ^= 1 << (v % 8),
            1 => b[pos] = v as u8,
            2 | 3 => {
                let width = if op & 0x7 == 2 { 4 } else { 8 };
                let x = EXTREME[v as usize % EXTREME.len()].to_le_bytes();
                let end = (pos + width).min(b.len());
                b[pos..end].copy_from_slice(&x[..end - pos]);
            }
            4 => b.truncate(pos),
            5 => {
                let len = 1 + v as usize % 64;
                let chunk = b[pos..(pos + len).min(b.len())].to_vec();
                let at = (pos + (v as usize >> 6)) % b.len();
                b.splice(at..at, chunk);
            }
            6 => {
                let end = (pos + 1 + v as usize % 64).min(b.len());
                b.drain(pos..end);
            }
            _ => b.insert(pos, v as u8),
        }
    }
}
