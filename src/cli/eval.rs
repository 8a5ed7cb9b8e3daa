//! `grit eval` and `grit report`: flags, the human table and the JSON document.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::eval::{EvalOptions, EvalReport};

/// `grit eval`: the base model and each adapter on the same data.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LoRA adapter (GGUF) to evaluate beside the base; repeat for several rows.
    #[arg(long, value_name = "A.gguf")]
    pub adapter: Vec<PathBuf>,
    /// Scale applied to every adapter.
    #[arg(long, default_value_t = 1.0, value_parser = super::adapter_scale)]
    pub adapter_scale: f32,
    /// Refuse an adapter whose recorded base model (name, sha256) differs from --model
    /// (default: warn).
    #[arg(long)]
    pub strict: bool,
    /// Loss/perplexity set: plain text (llama.cpp's windows: --ctx tokens, BOS first, second
    /// half scored) or JSONL/JSON rows (grit train's formats and masking).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// General-text set for functional drift: KL(base ‖ adapted) and perplexity change there
    /// (the general_* fields).
    #[arg(long, value_name = "FILE")]
    pub general: Option<PathBuf>,
    /// Task JSONL with references for accuracy: prompt+answer, messages (last assistant
    /// turn = reference), instruction+output, or prompt+choices+answer (multiple choice).
    #[arg(long, value_name = "FILE")]
    pub task: Option<PathBuf>,
    /// Evaluate every kept checkpoint (and the final adapter) of this training run on --data,
    /// and fit the forgetting law L(D) = L0 + a·D^β + E (needs at least 5 checkpoints).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "adapter")]
    pub retention: Option<PathBuf>,
    /// Window / context length in tokens (JSONL examples are cut at this length).
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most N windows or examples of each set (0 = all), the first ones.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_examples: usize,
    /// Evaluate at most N examples of the --general set (0 = as --max-examples).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub general_max_examples: usize,
    /// Score at most N task rows (0 = all).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_task_rows: usize,
    /// Task generation: at most this many new tokens per answer.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Task generation: stop before this string (repeatable).
    #[arg(long, value_name = "S")]
    pub stop: Vec<String>,
    /// Score prompts too (JSONL sets), like grit train --train-on-prompt.
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Skip malformed JSONL rows (counted) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Worker threads (default: all cores).
    #[arg(short, long, default_value_t = 0)]
    pub threads: i32,
    /// Print one JSON document {"rows": [...]} (base first) and nothing else on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `grit report`: an HTML page with plots for one or more runs.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Training run folders (grit train --out); several are overlaid.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The HTML file to write (self-contained: inline SVG, no network).
    #[arg(long, default_value = "report.html", value_name = "FILE")]
    pub out: PathBuf,
    /// Also write every plot into one PNG image.
    #[arg(long, value_name = "FILE.png")]
    pub png: Option<PathBuf>,
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let opts = EvalOptions {
        model: a.model.resolve()?,
        gpu_layers: a.model.gpu_layers,
        device: a.model.device,
        adapters: a.adapter.clone(),
        adapter_scale: a.adapter_scale,
        base_mismatch: super::adapter::base_mismatch(a.strict),
        data: a.data.clone(),
        general: a.general.clone(),
        task: a.task.clone(),
        ctx: a.ctx,
        max_examples: a.max_examples,
        general_max_examples: a.general_max_examples,
        max_task_rows: a.max_task_rows,
        max_new_tokens: a.max_new_tokens,
        stop: a.stop.clone(),
        train_on_prompt: a.train_on_prompt,
        skip_bad_rows: a.skip_bad_rows,
        threads: a.threads,
        progress: true,
    };
    let rep = match &a.retention {
        Some(run) => crate::eval::retention(&opts, run)?,
        None => crate::eval::evaluate(&opts)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    } else {
        print!("{}", table(&rep));
    }
    Ok(())
}

fn opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        Some(x) => format!("{x}"),
        None => "-".into(),
    }
}

/// The human table (and the retention fits).
pub fn table(rep: &EvalReport) -> String {
    let rows = &rep.rows;
    let has_data = rows.iter().any(|r| r.loss.is_some());
    let has_general = rows.iter().any(|r| r.general_loss.is_some());
    let has_acc = rows.iter().any(|r| r.accuracy.is_some());
    let has_tps = rows.iter().any(|r| r.train_tokens_per_s.is_some());
    let has_d = rows.iter().any(|r| r.train_tokens.is_some());
    let mut head: Vec<&str> = vec!["name"];
    if has_d {
        head.extend(["step", "D tokens"]);
    }
    if has_data {
        head.extend(["tokens", "loss", "ppl", "Δppl", "KL"]);
    }
    if has_general {
        head.extend(["gen loss", "gen ppl", "gen Δppl", "gen KL"]);
    }
    if has_acc {
        head.extend(["exact", "norm", "contains", "choice"]);
    }
    head.extend(["‖ΔW‖_F", "params"]);
    if has_tps {
        head.push("train tok/s");
    }
    let mut cells: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for r in rows {
        let mut c = vec![r.name.clone()];
        if has_d {
            c.push(r.step.map(|s| s.to_string()).unwrap_or_else(|| "0".into()));
            c.push(r.train_tokens.map(|s| s.to_string()).unwrap_or_else(|| "0".into()));
        }
        if has_data {
            c.extend([
                r.tokens.to_string(),
                opt(r.loss, 4),
                opt(r.perplexity, 3),
                opt(r.perplexity_change, 3),
                opt(r.kl, 4),
            ]);
        }
        if has_general {
            c.extend([
                opt(r.general_loss, 4),
                opt(r.general_perplexity, 3),
                opt(r.general_perplexity_change, 3),
                opt(r.general_kl, 4),
            ]);
        }
        if has_acc {
            match &r.accuracy {
                Some(a) => {
                    let g = |x: f64| {
                        if a.n > 0 {
                            format!("{:.1}%", 100.0 * x)
                        } else {
                            "-".into()
                        }
                    };
                    c.extend([g(a.exact), g(a.normalized), g(a.contains)]);
                    c.push(if a.choice_n > 0 {
                        format!("{:.1}%", 100.0 * a.choice)
                    } else {
                        "-".into()
                    });
                }
                None => c.extend(["-".into(), "-".into(), "-".into(), "-".into()]),
            }
        }
        c.push(opt(r.drift_total, 4));
        c.push(r.trainable_params.map(|p| p.to_string()).unwrap_or_else(|| "-".into()));
        if has_tps {
            c.push(opt(r.train_tokens_per_s, 1));
        }
        cells.push(c);
    }
    let ncol = cells[0].len();
    let widths: Vec<usize> =
        (0..ncol).map(|j| cells.iter().map(|r| r[j].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, r) in cells.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let pad = widths[j] - s.chars().count();
                if j == 0 {
                    format!("{s}{}", " ".repeat(pad))
                } else {
                    format!("{}{s}", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (ncol - 1)));
            out.push('\n');
        }
    }
    if let Some(ret) = &rep.retention {
        let f = &ret.power_law;
        out.push_str(&format!(
            "\nforgetting law (docs/GRIT.md §8) on {} points: L(D) = L0 + a·D^β + E\n  L0 = {:.4} (base)  a = {:.4e}  β = {:.4}  E = {:.4}  R² = {:.4}  RMSE = {:.4}\n",
            f.n, f.l0, f.a, f.beta, f.e, f.r2, f.rmse
        ));
        if let Some(c) = &ret.curvature {
            out.push_str(&format!(
                "with the curvature factor: L(D) = L0 + a·D^β / (1 + γ_r·r_eff) + E\n  a = {:.4e}  β = {:.4}  E = {:.4}  γ_r = {:.4}  R² = {:.4}  RMSE = {:.4}\n",
                c.a,
                c.beta,
                c.e,
                c.gamma_r.unwrap_or(0.0),
                c.r2,
                c.rmse
            ));
        }
        if let Some(n) = &ret.curvature_note {
            out.push_str(&format!("  ({n})\n"));
        }
    }
    out
}

pub fn report_cmd(a: ReportArgs) -> Result<()> {
    let runs = a.runs.iter().map(|r| crate::report::Run::load(r)).collect::<Result<Vec<_>, _>>()?;
    let rep = crate::report::Report::build(&runs)?;
    crate::report::write_html(&rep, &a.out)?;
    println!("report      {} ({} plots)", a.out.display(), rep.plots.len());
    if let Some(p) = &a.png {
        crate::report::write_png(&rep, p)?;
        println!("png         {}", p.display());
    }
    Ok(())
}
