//! `grit export`, `grit merge`, `grit inspect`: adapters out of grit and into other tools.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::adapter::{self, merge::MergeType, Adapter, AdapterDtype};

/// An adapter file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// llama.cpp's GGUF LoRA adapter (one file).
    Gguf,
    /// A Hugging Face PEFT folder (adapter_model.safetensors + adapter_config.json).
    Peft,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The adapter to convert: a GGUF adapter file or a PEFT folder.
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// Where to write it: a folder for --to peft, a .gguf file for --to gguf.
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Format of IN (default: a folder is PEFT, a file is GGUF).
    #[arg(long, value_name = "FORMAT")]
    pub from: Option<Format>,
    /// Format to write.
    #[arg(long, value_name = "FORMAT")]
    pub to: Format,
    /// The base model (GGUF): supplies the architecture, head counts and provenance when the
    /// input lacks them, and every module's shape is checked against it.
    #[arg(short, long, value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// Element type of a GGUF output.
    #[arg(long, value_enum, default_value_t = AdapterDtype::F32)]
    pub dtype: AdapterDtype,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model (GGUF). Default: SmolLM2-135M-Instruct Q4_1.
    #[arg(short, long, value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// The adapter to merge: a GGUF adapter file or a PEFT folder.
    #[arg(long, value_name = "A.gguf")]
    pub adapter: PathBuf,
    /// Multiplier on the adapter (like `generate --adapter-scale`).
    #[arg(long, default_value_t = 1.0, value_parser = super::adapter_scale)]
    pub scale: f32,
    /// Output GGUF model.
    #[arg(short, long, value_name = "OUT.gguf")]
    pub out: PathBuf,
    /// Type of the merged tensors (the others are copied unchanged); `same` re-quantizes each
    /// to its base type.
    #[arg(long = "type", value_enum, default_value_t = MergeType::F16)]
    pub ty: MergeType,
    /// Convert every other matrix of the model to --type as well (e.g. `--type f32
    /// --convert-all --scale 0` writes the base dequantized).
    #[arg(long)]
    pub convert_all: bool,
    /// Refuse an adapter whose recorded base model differs from --model (default: warn).
    #[arg(long)]
    pub strict: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Print what was merged as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A GGUF adapter, a PEFT folder, or a (merged or base) GGUF model.
    pub path: PathBuf,
    /// Base model, for a PEFT folder that does not record its architecture.
    #[arg(short, long, value_name = "M.gguf")]
    pub model: Option<PathBuf>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,
}

fn refuse_existing(out: &std::path::Path, overwrite: bool) -> Result<()> {
    if out.exists() && !overwrite {
        bail!("{}: already exists; pass --overwrite to replace it", out.display());
    }
    Ok(())
}

/// Warns (or fails with `strict`) when the adapter's recorded base differs from `base`.
pub fn provenance_check(
    p: &adapter::Provenance,
    adapter_path: &std::path::Path,
    base: &std::path::Path,
    strict: bool,
) -> Result<()> {
    match adapter::check_provenance(p, adapter_path, base, base_mismatch(strict)) {
        Ok(Some(msg)) => eprintln!("grit: warning: {msg}"),
        Ok(None) => {}
        Err(e) => bail!("{e} (--strict)"),
    }
    Ok(())
}

/// `--strict` as the library's policy.
pub fn base_mismatch(strict: bool) -> adapter::BaseMismatch {
    if strict {
        adapter::BaseMismatch::Refuse
    } else {
        adapter::BaseMismatch::Warn
    }
}

pub fn export(a: ExportArgs) -> Result<()> {
    let from = a.from.unwrap_or(if a.input.is_dir() { Format::Peft } else { Format::Gguf });
    refuse_existing(&a.output, a.overwrite)?;
    let mut ad: Adapter = match from {
        Format::Peft => adapter::peft::read_peft(&a.input, a.model.as_deref())?,
        Format::Gguf => {
            if a.input.is_dir() {
                bail!("{}: is a folder; pass --from peft for a PEFT folder", a.input.display());
            }
            Adapter::read_gguf(&a.input)?
        }
    };
    if let Some(m) = &a.model {
        let f = crate::gguf::GgufFile::open(m)?;
        ad.check_fits(&f)?;
        if from == Format::Gguf {
            let base = adapter::Provenance::for_base(m, "", None)?;
            provenance_check(&ad.provenance, &a.input, m, false)?;
            let p = &mut ad.provenance;
            p.n_head = p.n_head.or(base.n_head);
            p.n_head_kv = p.n_head_kv.or(base.n_head_kv);
            if p.base_sha256.is_none() {
                p.base_name = base.base_name;
                p.base_sha256 = base.base_sha256;
                p.base_size = base.base_size;
                p.base_file = base.base_file;
            }
        }
    }
    match a.to {
        Format::Peft => adapter::peft::write_peft(&ad, &a.output)?,
        Format::Gguf => ad.write_gguf(&a.output, a.dtype)?,
    }
    let ranks: std::collections::BTreeSet<usize> = ad.modules.iter().map(|m| m.rank).collect();
    eprintln!(
        "grit: wrote {} ({} modules, {} parameters, ranks {:?})",
        a.output.display(),
        ad.modules.len(),
        ad.n_params(),
        ranks
    );
    Ok(())
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let base = match &a.model {
        Some(p) => p.clone(),
        None => crate::fetch::ensure_default_model()?,
    };
    refuse_existing(&a.out, a.overwrite)?;
    if a.out.canonicalize().ok().is_some_and(|o| base.canonicalize().ok() == Some(o)) {
        bail!(
            "{}: --out is the base model itself; write the merged model elsewhere",
            a.out.display()
        );
    }
    let ad = adapter::load_any(&a.adapter, Some(&base))?;
    provenance_check(&ad.provenance, &a.adapter, &base, a.strict)?;
    let t0 = std::time::Instant::now();
    let rep = adapter::merge::merge(&base, &ad, a.scale, a.ty, a.convert_all, &a.out)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(
                &serde_json::json!({"out": a.out, "report": rep, "seconds": t0.elapsed().as_secs_f64()})
            )?
        );
    } else {
        let types: Vec<String> =
            rep.merged_types.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        println!(
            "{}: merged {} tensors ({}), converted {}, copied {}, {:.1} MiB, {:.1} s",
            a.out.display(),
            rep.merged_tensors,
            types.join(", "),
            rep.converted_tensors,
            rep.copied_tensors,
            rep.bytes as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let v = adapter::inspect::inspect(&a.path, a.model.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{v}");
    }
    Ok(())
}
