//! `grit report`: one self-contained HTML page (inline SVG from `plotters`, no scripts, no
//! network) with plots of one or more training runs overlaid, and optionally one PNG of all
//! plots (the same SVG rasterized by `resvg`).
//!
//! Plots (each a `<figure class="plot" id=...>` with a title): train and eval loss
//! (`plot-loss`), learning rate (`plot-lr`), throughput (`plot-tokens-per-s`), trainable
//! parameters over time (`plot-trainable-params`), drift ‖s·B·A‖_F per module
//! (`plot-drift`), and per run a heatmap of the rank of every module over time
//! (`plot-rank-<k>`, k = the run's position on the command line).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::eval::drift::module_order;
use crate::rundir::{GritEvent, MetricsRow};

/// Why a report could not be made; names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {msg}", .0.display(), msg = .1)]
    Run(PathBuf, String),
    #[error(transparent)]
    RunDir(#[from] crate::rundir::RunDirError),
    #[error("plot {id}: {source}")]
    Plot { id: String, source: crate::BoxError },
    #[error("{}: {source}", .path.display())]
    Write { path: PathBuf, source: crate::fetch::FetchError },
    #[error("--png: {0}")]
    Png(String),
    #[error("--png: {what}: {source}")]
    PngRender { what: &'static str, source: crate::BoxError },
}

/// One training run as read from its folder.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub name: String,
    pub method: String,
    pub rank: usize,
    /// Per step: (step, loss, lr, tokens/s).
    pub steps: Vec<(f64, f64, f64, f64)>,
    /// (step, eval loss).
    pub evals: Vec<(f64, f64)>,
    /// Reprojection events: (step, ranks per module, trainable params).
    pub reprojections: Vec<(f64, Vec<f64>, f64)>,
    /// summary.json, when the run finished.
    pub summary: Option<crate::rundir::Summary>,
    /// Module names of the reprojection rows (in adapter order), when they name them.
    pub reproject_modules: Vec<String>,
}

/// A per-module map of a metrics row in adapter order (layer, then target): the module
/// names and their values.
pub fn per_module<T: Copy>(m: &std::collections::BTreeMap<String, T>) -> (Vec<String>, Vec<T>) {
    let mut kv: Vec<(&String, T)> = m.iter().map(|(k, &x)| (k, x)).collect();
    kv.sort_by_key(|(k, _)| module_order(k));
    kv.into_iter().map(|(k, x)| (k.clone(), x)).unzip()
}

impl Run {
    /// Reads `dir/metrics.jsonl` (required), `config.toml` and `summary.json` (when present).
    pub fn load(dir: &Path) -> Result<Run, ReportError> {
        let mp = dir.join(crate::rundir::METRICS);
        let rows = match crate::rundir::read_metrics(dir) {
            Err(crate::rundir::RunDirError::Io { source, .. }) => {
                let msg = format!("{source} (is this a grit run folder?)");
                return Err(ReportError::Run(mp, msg));
            }
            r => r?,
        };
        let mut run = Run {
            dir: dir.to_path_buf(),
            name: dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| dir.display().to_string()),
            method: "lora".into(),
            rank: 0,
            steps: Vec::new(),
            evals: Vec::new(),
            reprojections: Vec::new(),
            summary: None,
            reproject_modules: Vec::new(),
        };
        for row in rows {
            match row {
                MetricsRow::Event(GritEvent::Reproject(r)) => {
                    let (names, ranks) = per_module(&r.ranks);
                    let ranks = ranks.into_iter().map(|k| k as f64).collect();
                    if run.reproject_modules.is_empty() {
                        run.reproject_modules = names;
                    }
                    run.reprojections.push((r.step as f64, ranks, r.trainable_params as f64));
                }
                MetricsRow::Step(r) => {
                    run.steps.push((r.step as f64, r.loss, r.lr, r.tokens_per_s))
                }
                MetricsRow::Eval(r) => run.evals.push((r.step as f64, r.eval_loss)),
                MetricsRow::Event(GritEvent::Invert(_)) => {}
            }
        }
        if let Ok(t) = std::fs::read_to_string(dir.join(crate::rundir::CONFIG)) {
            if let Ok(cfg) = toml::from_str::<toml::Value>(&t) {
                if let Some(m) = cfg.get("method").and_then(|m| m.as_str()) {
                    run.method = m.to_string();
                }
                run.rank = cfg.get("rank").and_then(|r| r.as_integer()).unwrap_or(0) as usize;
            }
        }
        run.summary = crate::rundir::Summary::read(dir)?;
        if run.steps.is_empty() {
            return Err(ReportError::Run(mp, "no training steps recorded yet".into()));
        }
        Ok(run)
    }

    fn label(&self) -> String {
        format!("{} ({})", self.name, self.method)
    }

    fn last_step(&self) -> f64 {
        self.steps.iter().map(|s| s.0).fold(0.0, f64::max)
    }

    /// Module names in adapter order (layer, then target), from summary.json.
    pub fn modules(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .summary
            .as_ref()
            .map(|s| {
                if s.rank_per_module.is_empty() {
                    s.drift_per_module.keys().cloned().collect()
                } else {
                    s.rank_per_module.keys().cloned().collect()
                }
            })
            .unwrap_or_default();
        if names.is_empty() {
            names = self.reproject_modules.clone();
        }
        names.sort_by_key(|n| module_order(n));
        names
    }

    /// Trainable parameters over time: (step, params) at the start and at each change.
    fn params_over_time(&self) -> Vec<(f64, f64)> {
        let s = self.summary.as_ref();
        let initial = s.map(|s| s.initial_params() as f64);
        let mut v = Vec::new();
        if let Some(p) = initial.or_else(|| (self.reprojections.is_empty()).then_some(f64::NAN)) {
            if p.is_finite() {
                v.push((0.0, p));
            }
        }
        for (step, _, p) in &self.reprojections {
            if p.is_finite() {
                v.push((*step, *p));
            }
        }
        if let Some(&(_, p)) = v.last() {
            v.push((self.last_step(), p));
        }
        v
    }

    /// Rank of every module over time: (from step, to step, ranks).
    fn rank_intervals(&self) -> Vec<(f64, f64, Vec<f64>)> {
        let n =
            self.modules().len().max(self.reprojections.first().map(|r| r.1.len()).unwrap_or(0));
        let end = self.last_step();
        let mut v = Vec::new();
        let mut from = 0.0;
        let mut cur = vec![self.rank as f64; n];
        for (step, ranks, _) in &self.reprojections {
            if *step > from {
                v.push((from, *step, cur.clone()));
            }
            from = *step;
            cur = ranks.clone();
        }
        if end > from {
            v.push((from, end, cur));
        }
        v
    }
}

/// One plot: its element id, title and SVG.
#[derive(Debug, Clone)]
pub struct Plot {
    pub id: String,
    pub title: String,
    pub svg: String,
    /// A line under the plot (what is missing, how to read it).
    pub note: Option<String>,
}

/// All plots of a report, and the runs' summary table.
#[derive(Debug, Clone)]
pub struct Report {
    pub runs: Vec<Run>,
    pub plots: Vec<Plot>,
}

const W: u32 = 900;
const H: u32 = 420;

fn range(vals: impl Iterator<Item = f64>, zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        let d = if hi.abs() > 0.0 { hi.abs() * 0.1 } else { 1.0 };
        return (lo - d, hi + d);
    }
    let pad = (hi - lo) * 0.05;
    (if zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

type Series = (String, RGBColor, Vec<(f64, f64)>, bool);

/// A line chart of several series (name, colour, points, with markers).
fn line_chart(
    id: &str,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    zero: bool,
) -> Result<String, ReportError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| ReportError::Plot {
        id: id.into(),
        source: e,
    };
    let (x0, x1) = range(series.iter().flat_map(|s| s.2.iter().map(|p| p.0)), true);
    let (y0, y1) = range(series.iter().flat_map(|s| s.2.iter().map(|p| p.1)), zero);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.into()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(e.into()))?;
        let yfmt = |y: &f64| tick(*y, y1.abs().max(y0.abs()));
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| tick(*x, x1))
            .y_label_formatter(&yfmt)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(e.into()))?;
        let mut drawn = 0;
        for (name, c, pts, markers) in series {
            let c = *c;
            let pts: Vec<(f64, f64)> =
                pts.iter().copied().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
            if pts.is_empty() {
                continue;
            }
            drawn += 1;
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(|e| err(e.into()))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            if *markers {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .map_err(|e| err(e.into()))?;
            }
        }
        if drawn > 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(e.into()))?;
        } else {
            let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
            chart
                .draw_series(std::iter::once(Text::new(
                    "no data yet",
                    (cx, cy),
                    ("sans-serif", 18).into_font().color(&BLACK),
                )))
                .map_err(|e| err(e.into()))?;
        }
        root.present().map_err(|e| err(e.into()))?;
    }
    Ok(svg)
}

/// A tick label: integers without decimals, large numbers with k/M, small ones in e-notation.
fn tick(v: f64, scale: f64) -> String {
    let a = scale.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 20.0 {
        format!("{v:.0}")
    } else if a >= 0.1 || v == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

/// Trailing moving average over `k` points (to show a noisy per-step loss).
fn smooth(pts: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    (0..pts.len())
        .map(|i| {
            let lo = i.saturating_sub(k - 1);
            let w = &pts[lo..=i];
            (pts[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}

/// Colour of a rank relative to the largest (dark blue → yellow).
fn rank_color(frac: f64) -> RGBColor {
    let f = frac.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(lerp(48.0, 253.0), lerp(18.0, 231.0), lerp(140.0, 37.0))
}

fn heatmap(id: &str, title: &str, run: &Run) -> Result<(String, Option<String>), ReportError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| ReportError::Plot {
        id: id.into(),
        source: e,
    };
    let iv = run.rank_intervals();
    let n_mod = iv.iter().map(|i| i.2.len()).max().unwrap_or(0).max(1);
    let max_rank = iv.iter().flat_map(|i| i.2.iter().copied()).fold(1.0, f64::max);
    let modules = run.modules();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.into()))?;
        let (main, bar) = root.split_horizontally(W - 100);
        let x1 = run.last_step().max(1.0);
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(110)
            .build_cartesian_2d(0.0..x1, 0.0..n_mod as f64)
            .map_err(|e| err(e.into()))?;
        if modules.is_empty() && iv.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "module ranks not known yet (no summary.json)",
                    (x1 * 0.2, 0.5),
                    ("sans-serif", 16).into_font().color(&BLACK),
                )))
                .map_err(|e| err(e.into()))?;
        }
        let labels = modules.clone();
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("module (layer-major)")
            .y_label_formatter(&|y| {
                let k = y.floor() as usize;
                labels
                    .get(k)
                    .map(|n| n.trim_start_matches("blk.").trim_end_matches(".weight").to_string())
                    .unwrap_or_else(|| format!("{k}"))
            })
            .draw()
            .map_err(|e| err(e.into()))?;
        let cells = iv.iter().flat_map(|(a, b, ranks)| {
            ranks.iter().enumerate().map(move |(m, r)| {
                Rectangle::new(
                    [(*a, m as f64), (*b, m as f64 + 1.0)],
                    rank_color(r / max_rank).filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(|e| err(e.into()))?;
        // Colour bar, in pixels of its own area: bottom = rank 0, top = the largest rank.
        let (top, bottom) = (44i32, H as i32 - 52);
        let y_of = |r: f64| bottom - ((bottom - top) as f64 * r / max_rank).round() as i32;
        let bands = 40;
        for i in 0..bands {
            let (a, b) =
                (max_rank * i as f64 / bands as f64, max_rank * (i + 1) as f64 / bands as f64);
            bar.draw(&Rectangle::new(
                [(8, y_of(b)), (32, y_of(a))],
                rank_color(b / max_rank).filled(),
            ))
            .map_err(|e| err(e.into()))?;
        }
        let style = ("sans-serif", 13).into_font().color(&BLACK);
        for k in 0..=4 {
            let r = max_rank * k as f64 / 4.0;
            bar.draw(&Text::new(format!("{r:.0}"), (38, y_of(r) - 6), style.clone()))
                .map_err(|e| err(e.into()))?;
        }
        bar.draw(&Text::new("rank", (8, top - 20), style)).map_err(|e| err(e.into()))?;
        root.present().map_err(|e| err(e.into()))?;
    }
    let note = if run.reprojections.is_empty() {
        Some(format!(
            "{}: no reprojection events; every module keeps rank {} for the whole run.",
            run.name, run.rank
        ))
    } else {
        Some(format!(
            "{}: {} reprojection events; ranks between {} and {}.",
            run.name,
            run.reprojections.len(),
            iv.iter().flat_map(|i| i.2.iter().copied()).fold(f64::INFINITY, f64::min),
            max_rank
        ))
    };
    Ok((svg, note))
}

impl Report {
    /// Makes every plot for `runs` (overlaid where they share axes).
    pub fn build(runs: &[Run]) -> Result<Report, ReportError> {
        let mut plots = Vec::new();
        let mut push = |id: &str, title: &str, svg: String, note: Option<String>| {
            plots.push(Plot { id: id.into(), title: title.into(), svg, note })
        };

        let mut loss: Vec<Series> = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            let raw: Vec<(f64, f64)> = r.steps.iter().map(|s| (s.0, s.1)).collect();
            loss.push((
                format!("{} train (mean of 10 steps)", r.label()),
                color(i),
                smooth(&raw, 10),
                false,
            ));
            if !r.evals.is_empty() {
                loss.push((format!("{} eval", r.label()), color(i), r.evals.clone(), true));
            }
        }
        let t = "Training and evaluation loss";
        push(
            "plot-loss",
            t,
            line_chart("plot-loss", t, "step", "loss (nats/token)", &loss, false)?,
            Some("Lines: training loss, trailing mean over 10 steps; dots: evaluation loss on the held-out set.".into()),
        );

        let lr: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (r.label(), color(i), r.steps.iter().map(|s| (s.0, s.2)).collect(), false)
            })
            .collect();
        let t = "Learning rate";
        push("plot-lr", t, line_chart("plot-lr", t, "step", "learning rate", &lr, true)?, None);

        let tps: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (r.label(), color(i), r.steps.iter().map(|s| (s.0, s.3)).collect(), false)
            })
            .collect();
        let t = "Training throughput";
        push(
            "plot-tokens-per-s",
            t,
            line_chart("plot-tokens-per-s", t, "step", "tokens/s", &tps, true)?,
            None,
        );

        let params: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.label(), color(i), r.params_over_time(), true))
            .collect();
        let t = "Trainable parameters over time";
        let missing: Vec<String> = runs
            .iter()
            .filter(|r| r.params_over_time().is_empty())
            .map(|r| r.name.clone())
            .collect();
        let note = (!missing.is_empty()).then(|| {
            format!(
                "Not known yet for {} (no summary.json and no reprojection).",
                missing.join(", ")
            )
        });
        push(
            "plot-trainable-params",
            t,
            line_chart("plot-trainable-params", t, "step", "Σ r·(d_in + d_out)", &params, true)?,
            note,
        );

        let drift: Vec<Series> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let d = r.summary.as_ref().map(|s| &s.drift_per_module).map(|m| {
                    let mut v: Vec<(String, f64)> =
                        m.iter().map(|(k, x)| (k.clone(), *x)).collect();
                    v.sort_by_key(|(k, _)| module_order(k));
                    v.into_iter().enumerate().map(|(j, (_, x))| (j as f64, x)).collect()
                });
                (r.label(), color(i), d.unwrap_or_default(), false)
            })
            .collect();
        let t = "Drift per module ‖s·B·A‖_F";
        let missing: Vec<String> =
            runs.iter().filter(|r| r.summary.is_none()).map(|r| r.name.clone()).collect();
        let mut note = String::from("x: module index, layer-major (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down within a layer; fused tensors in their place).");
        if !missing.is_empty() {
            note.push_str(&format!(
                " Not available for {} (the run has not finished: no summary.json).",
                missing.join(", ")
            ));
        }
        push(
            "plot-drift",
            t,
            line_chart("plot-drift", t, "module", "‖s·B·A‖_F", &drift, true)?,
            Some(note),
        );

        for (k, r) in runs.iter().enumerate() {
            let id = format!("plot-rank-{k}");
            let t = format!("Rank per module over time: {}", r.label());
            let (svg, note) = heatmap(&id, &t, r)?;
            push(&id, &t, svg, note);
        }
        Ok(Report { runs: runs.to_vec(), plots })
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The HTML page.
pub fn html(rep: &Report) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>grit report</title>\n<style>\n");
    h.push_str("body{font-family:sans-serif;margin:24px;color:#222;max-width:960px}table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}figure.plot{margin:24px 0;border:1px solid #ddd;padding:8px}figure.plot h2{font-size:16px;margin:4px 0 8px}figcaption{font-size:13px;color:#555}\n");
    h.push_str("</style></head><body>\n");
    h.push_str(&format!(
        "<h1>grit report</h1>\n<p>grit {} · {} run(s)</p>\n",
        crate::VERSION,
        rep.runs.len()
    ));
    h.push_str("<table id=\"runs\"><tr><th>run</th><th>method</th><th>steps</th><th>final train loss</th><th>eval loss</th><th>tokens/s</th><th>trainable params</th><th>drift ‖ΔW‖_F</th></tr>\n");
    for r in &rep.runs {
        let s = r.summary.as_ref();
        let f =
            |x: Option<f64>, p: usize| x.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
        let eval = r.evals.last().map(|e| format!("{:.4}", e.1)).unwrap_or_else(|| "-".into());
        let params = s.map(|s| s.final_params().to_string()).unwrap_or_else(|| "-".into());
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&r.name),
            esc(&r.method),
            r.last_step(),
            f(s.and_then(|s| s.train_loss).map(f64::from), 4),
            eval,
            f(s.map(|s| s.tokens_per_s), 1),
            params,
            f(s.map(|s| s.drift_total), 4)
        ));
    }
    h.push_str("</table>\n");
    for p in &rep.plots {
        h.push_str(&format!(
            "<figure class=\"plot\" id=\"{}\">\n<h2>{}</h2>\n",
            esc(&p.id),
            esc(&p.title)
        ));
        // The SVG's own XML declaration, if any, cannot appear inside HTML.
        let svg = p.svg.trim_start();
        let svg = if svg.starts_with("<?xml") {
            svg.split_once("?>").map(|x| x.1).unwrap_or(svg)
        } else {
            svg
        };
        h.push_str(svg);
        if let Some(n) = &p.note {
            h.push_str(&format!("\n<figcaption>{}</figcaption>", esc(n)));
        }
        h.push_str("\n</figure>\n");
    }
    h.push_str("</body></html>\n");
    h
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    crate::fetch::write_atomic(path, bytes)
        .map_err(|source| ReportError::Write { path: path.into(), source })
}

/// Writes the HTML page atomically.
pub fn write_html(rep: &Report, path: &Path) -> Result<(), ReportError> {
    write_file(path, html(rep).as_bytes())
}

/// All plots stacked into one SVG (for the PNG).
fn stacked_svg(rep: &Report) -> String {
    let n = rep.plots.len() as u32;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">\n", H * n, H * n);
    for (i, p) in rep.plots.iter().enumerate() {
        let body = p.svg.trim_start();
        let body = if body.starts_with("<?xml") {
            body.split_once("?>").map(|x| x.1).unwrap_or(body)
        } else {
            body
        };
        // Nested <svg> placed at its row.
        let body = body.replacen("<svg ", &format!("<svg x=\"0\" y=\"{}\" ", H * i as u32), 1);
        s.push_str(&body);
        s.push('\n');
    }
    s.push_str("</svg>\n");
    s
}

/// Rasterizes every plot into one PNG (fonts from the system; refuses without any).
pub fn write_png(rep: &Report, path: &Path) -> Result<(), ReportError> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    {
        let db = opt.fontdb_mut();
        db.load_system_fonts();
        let families: Vec<String> =
            db.faces().flat_map(|f| f.families.iter().map(|x| x.0.clone())).collect();
        if families.is_empty() {
            return Err(ReportError::Png("no fonts found on this system for the plot text; install one (e.g. apt-get install fonts-dejavu-core)".into()));
        }
        let pick = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica"]
            .iter()
            .map(|s| s.to_string())
            .find(|f| families.contains(f))
            .unwrap_or_else(|| families[0].clone());
        db.set_sans_serif_family(pick);
    }
    let tree = usvg::Tree::from_str(&stacked_svg(rep), &opt)
        .map_err(|e| ReportError::PngRender { what: "SVG", source: e.into() })?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| ReportError::Png("empty image".into()))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    let png = pixmap
        .encode_png()
        .map_err(|e| ReportError::PngRender { what: "encoding", source: e.into() })?;
    write_file(path, &png)
}

/// A decoded RGBA image, for checking rendered plots (tests, `--png` output).
#[derive(Debug, Clone)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    rgba: Vec<u8>,
}

impl Image {
    /// The fraction of pixels in [x0, x1) × [y0, y1) that are not (near) white.
    pub fn ink_fraction(&self, x0: u32, y0: u32, x1: u32, y1: u32) -> f64 {
        let (x1, y1) = (x1.min(self.width), y1.min(self.height));
        if x1 <= x0 || y1 <= y0 {
            return 0.0;
        }
        let mut ink = 0usize;
        for y in y0..y1 {
            for x in x0..x1 {
                let i = 4 * (y as usize * self.width as usize + x as usize);
                if self.rgba[i..i + 3].iter().any(|&c| c < 235) {
                    ink += 1;
                }
            }
        }
        ink as f64 / ((x1 - x0) as f64 * (y1 - y0) as f64)
    }
}

/// Reads a PNG file.
pub fn load_png(path: &Path) -> Result<Image, ReportError> {
    let p = resvg::tiny_skia::Pixmap::load_png(path)
        .map_err(|e| ReportError::Png(format!("{}: {e}", path.display())))?;
    Ok(Image { width: p.width(), height: p.height(), rgba: p.data().to_vec() })
}

/// Ids of the plots a report over `n_runs` runs has (in page order).
pub fn plot_ids(n_runs: usize) -> Vec<String> {
    let mut v: Vec<String> =
        ["plot-loss", "plot-lr", "plot-tokens-per-s", "plot-trainable-params", "plot-drift"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.extend((0..n_runs).map(|k| format!("plot-rank-{k}")));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fake_run(dir: &Path, method: &str, reproject: bool) {
        std::fs::create_dir_all(dir).unwrap();
        let mut m = String::new();
        for s in 1..=20 {
            m.push_str(&format!(
                "{{\"step\":{s},\"loss\":{},\"lr\":{},\"grad_norm\":1.0,\"tokens\":256,\"tokens_per_s\":{},\"elapsed_s\":{s}}}\n",
                4.0 - 0.05 * s as f64,
                1e-4 * s as f64,
                80.0 + s as f64
            ));
            if s % 5 == 0 {
                m.push_str(&format!(
                    "{{\"step\":{s},\"eval_loss\":{},\"eval_tokens\":512}}\n",
                    4.1 - 0.04 * s as f64
                ));
            }
            if reproject && s % 10 == 5 {
                m.push_str(&format!(
                    "{{\"step\":{s},\"event\":\"reproject\",\"ranks\":{{\"blk.0.attn_q.weight\":8,\"blk.0.ffn_down.weight\":{},\"blk.1.attn_q.weight\":4,\"blk.10.attn_q.weight\":16}},\"trainable_params\":{},\"modules_cut\":2,\"interval\":10.0,\"next\":{}}}\n",
                    12 - s / 5,
                    5000 - s * 50,
                    s + 10
                ));
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), m).unwrap();
        std::fs::write(dir.join("config.toml"), format!("method = \"{method}\"\nrank = 16\n"))
            .unwrap();
        let names = [
            "blk.0.attn_q.weight",
            "blk.0.ffn_down.weight",
            "blk.1.attn_q.weight",
            "blk.10.attn_q.weight",
        ];
        let drift: serde_json::Map<String, Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), Value::from(0.1 * (i + 1) as f64)))
            .collect();
        let ranks: serde_json::Map<String, Value> =
            names.iter().map(|n| (n.to_string(), Value::from(16))).collect();
        let s = serde_json::json!({"method": method, "trainable_params": 6000, "tokens_per_s": 90.0, "train_loss": 3.0, "drift_per_module": drift, "drift_total": 0.5, "rank_per_module": ranks,
            "base_model": "model.gguf", "targets": ["attn_q"], "steps": 60, "peak_rss_bytes": 1, "wall_s": 1.0, "weight_copies": "q8_0"});
        std::fs::write(dir.join("summary.json"), s.to_string()).unwrap();
    }

    #[test]
    fn reads_runs_and_draws_every_plot() {
        let dir = tempfile::tempdir().unwrap();
        fake_run(&dir.path().join("lora"), "lora", false);
        fake_run(&dir.path().join("grit"), "grit", true);
        let runs = vec![
            Run::load(&dir.path().join("lora")).unwrap(),
            Run::load(&dir.path().join("grit")).unwrap(),
        ];
        assert_eq!(runs[1].reprojections.len(), 2);
        assert_eq!(runs[0].evals.len(), 4);
        assert_eq!(runs[1].modules()[3], "blk.10.attn_q.weight");
        let iv = runs[1].rank_intervals();
        assert_eq!(iv.len(), 3);
        assert_eq!(iv[0].2, vec![16.0; 4]);
        assert_eq!((iv[1].0, iv[1].1), (5.0, 15.0));
        assert_eq!(iv[2].2, vec![8.0, 9.0, 4.0, 16.0]);
        let p = runs[1].params_over_time();
        assert_eq!(p.first(), Some(&(0.0, 6000.0)));
        assert_eq!(p.last(), Some(&(20.0, 4250.0)));
        let rep = Report::build(&runs).unwrap();
        let ids: Vec<String> = rep.plots.iter().map(|p| p.id.clone()).collect();
        assert_eq!(ids, plot_ids(2));
        let page = html(&rep);
        for id in plot_ids(2) {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(!page.contains("http://") || !page.contains("<script"), "no scripts");
        assert!(!page.contains("<?xml"));
        for p in &rep.plots {
            assert!(
                p.svg.matches("<polyline").count()
                    + p.svg.matches("<rect").count()
                    + p.svg.matches("<path").count()
                    > 3,
                "{} is empty",
                p.id
            );
        }
        let out = dir.path().join("r.html");
        write_html(&rep, &out).unwrap();
        assert!(std::fs::metadata(&out).unwrap().len() > 10_000);
    }

    #[test]
    fn a_folder_without_metrics_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Run::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("grit run folder"), "{e}");
    }
}
