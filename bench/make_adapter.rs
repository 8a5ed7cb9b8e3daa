//! Writes a random (non-zero) LoRA adapter for a model, in llama.cpp's GGUF format, for the
//! serving tests and benchmarks: `make_adapter MODEL.gguf OUT.gguf RANK TARGETS SEED [STD]`, where
//! TARGETS is a comma list of grit module names (attn_q,attn_k,attn_v,attn_output,ffn_gate,
//! ffn_up,ffn_down) or `all`.

use std::path::Path;

use grit::ggml::Backend;
use grit::gguf::GgufFile;
use grit::model::Weights;
use grit::model::{LoraConfig, LoraSet, Target};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 && args.len() != 7 {
        return Err("usage: make_adapter MODEL.gguf OUT.gguf RANK TARGETS SEED [STD]".into());
    }
    let std: f32 = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(0.02);
    let rank: usize = args[3].parse()?;
    let targets = if args[4] == "all" {
        Target::ALL.to_vec()
    } else {
        args[4].split(',').map(Target::parse).collect::<Result<Vec<_>, _>>()?
    };
    let seed: u64 = args[5].parse()?;
    let backend = Backend::cpu(1)?;
    let weights = Weights::load(&GgufFile::open(Path::new(&args[1]))?, &backend)?;
    let cfg = LoraConfig { targets, rank, alpha: 2.0 * rank as f32, ..LoraConfig::default() };
    let lora = LoraSet::new(&weights, &cfg, &backend)?;
    // Small values: the adapter changes greedy outputs without wrecking the model.
    lora.randomize(seed, std, std)?;
    grit::adapter::Adapter::from_lora_set(&lora, weights.hparams.arch.name(), Default::default())?
        .write_gguf(Path::new(&args[2]), grit::adapter::AdapterDtype::F32)?;
    println!("{}", args[2]);
    Ok(())
}
