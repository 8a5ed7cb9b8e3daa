//! `grit report` rendered by headless Chromium: every plot the report lists is present,
//! laid out with a non-empty size, and has drawn (non-white) pixels in a screenshot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{grit, ok};

/// A run folder shaped like `grit train --out`: metrics.jsonl, config.toml, summary.json.
fn fake_run(dir: &Path, method: &str, base_loss: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let modules: Vec<String> = (0..3)
        .flat_map(|l| ["attn_q", "attn_v", "ffn_down"].map(|t| format!("blk.{l}.{t}.weight")))
        .collect();
    let mut m = String::new();
    for s in 1..=60 {
        let lr = 2e-4 * (s as f64 / 10.0).min(1.0);
        m.push_str(&format!(
            "{{\"step\":{s},\"loss\":{},\"lr\":{lr},\"grad_norm\":1.0,\"tokens\":256,\"tokens_per_s\":{},\"elapsed_s\":{}}}\n",
            base_loss - 0.8 * (1.0 - (-(s as f64) / 20.0).exp()),
            90.0 + (s % 7) as f64,
            s * 3
        ));
        if s % 20 == 0 {
            m.push_str(&format!(
                "{{\"step\":{s},\"eval_loss\":{},\"eval_tokens\":2048}}\n",
                base_loss + 0.1 - 0.5 * s as f64 / 60.0
            ));
        }
        if method == "grit" && s % 20 == 10 {
            let ranks: serde_json::Map<String, serde_json::Value> = modules
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), serde_json::json!(16 - (s / 10) - i % 4)))
                .collect();
            let params: u64 = ranks.values().map(|r| r.as_u64().unwrap() * 1152).sum();
            let row = serde_json::json!({"step": s, "event": "reproject", "ranks": ranks, "eff_rank": ranks, "trainable_params": params});
            m.push_str(&format!("{row}\n"));
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), m).unwrap();
    std::fs::write(dir.join("config.toml"), format!("method = \"{method}\"\nrank = 16\n")).unwrap();
    let drift: serde_json::Map<String, serde_json::Value> = modules
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), serde_json::json!(0.05 + 0.01 * i as f64)))
        .collect();
    let ranks: serde_json::Map<String, serde_json::Value> =
        modules.iter().map(|n| (n.clone(), serde_json::json!(16))).collect();
    let summary = serde_json::json!({
        "method": method, "trainable_params": 16 * 1152 * modules.len(), "tokens_per_s": 93.0, "train_loss": base_loss - 0.7,
        "drift_per_module": drift, "drift_total": 0.3, "rank_per_module": ranks, "steps": 60,
        "base_model": "model.gguf", "targets": ["attn_q"], "peak_rss_bytes": 1, "wall_s": 1.0, "weight_copies": "q8_0",
        "eval_loss": null, "eval_loss_initial": null,
    });
    std::fs::write(dir.join("summary.json"), summary.to_string()).unwrap();
}

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return PathBuf::from(p);
    }
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(o) = Command::new("sh").args(["-c", &format!("command -v {c}")]).output() {
            let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && !p.is_empty() {
                return PathBuf::from(p);
            }
        }
    }
    panic!("headless Chromium is needed for this test: install it with scripts/install-deps.sh (Debian package chromium) or set CHROMIUM");
}

fn run_chromium(profile: &Path, args: &[String]) -> std::process::Output {
    let o = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium");
    assert!(o.status.success(), "chromium failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// One plot's layout as Chromium computed it: id, page rectangle, drawn SVG elements.
#[derive(Debug)]
struct Layout {
    id: String,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    drawn: u64,
    title: String,
}

#[test]
fn report_renders_in_headless_chromium_with_every_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, gritrun) = (dir.path().join("demo-lora"), dir.path().join("demo-grit"));
    fake_run(&lora, "lora", 3.6);
    fake_run(&gritrun, "grit", 3.6);
    let html = dir.path().join("report.html");
    let png = dir.path().join("report.png");
    ok(grit()
        .args([
            "report",
            lora.to_str().unwrap(),
            gritrun.to_str().unwrap(),
            "--out",
            html.to_str().unwrap(),
            "--png",
            png.to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("<script") && !page.contains("src=\"http") && !page.contains("href=\"http"),
        "self-contained, no scripts or network"
    );
    let ids = grit::report::plot_ids(2);

    // A copy of the page with a probe that writes the layout of every plot into the DOM.
    let probe = r#"<script>
addEventListener('load', () => {
  const out = [];
  for (const f of document.querySelectorAll('figure.plot')) {
    const svg = f.querySelector('svg');
    const r = svg ? svg.getBoundingClientRect() : {x: 0, y: 0, width: 0, height: 0};
    let drawn = 0;
    if (svg) for (const e of svg.querySelectorAll('polyline,path,rect,circle,line,text')) {
      const b = e.getBoundingClientRect();
      if (b.width > 0 || b.height > 0) drawn++;
    }
    const t = f.querySelector('h2');
    out.push([f.id, r.x + scrollX, r.y + scrollY, r.width, r.height, drawn, t ? t.textContent : '']);
  }
  const pre = document.createElement('pre');
  pre.id = 'layout';
  pre.textContent = JSON.stringify({plots: out, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script></body>"#;
    let probed = dir.path().join("probed.html");
    std::fs::write(&probed, page.replace("</body>", probe)).unwrap();
    let profile = dir.path().join("profile");
    let url = format!("file://{}", probed.display());
    let o = run_chromium(
        &profile,
        &[
            "--window-size=1000,1000".into(),
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    );
    let dom = String::from_utf8_lossy(&o.stdout);
    let start =
        dom.find("<pre id=\"layout\">").expect("the probe ran") + "<pre id=\"layout\">".len();
    let end = start + dom[start..].find("</pre>").unwrap();
    let js = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    let v: serde_json::Value = serde_json::from_str(&js).unwrap_or_else(|e| panic!("{e}: {js}"));
    let layouts: Vec<Layout> = v["plots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Layout {
            id: p[0].as_str().unwrap().to_string(),
            x: p[1].as_f64().unwrap(),
            y: p[2].as_f64().unwrap(),
            w: p[3].as_f64().unwrap(),
            h: p[4].as_f64().unwrap(),
            drawn: p[5].as_u64().unwrap(),
            title: p[6].as_str().unwrap().to_string(),
        })
        .collect();
    let got: Vec<&str> = layouts.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(
        got,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "every listed plot, in order"
    );
    for l in &layouts {
        assert!(l.w >= 400.0 && l.h >= 200.0, "{} has no size: {l:?}", l.id);
        assert!(l.drawn >= 10, "{} draws nothing: {l:?}", l.id);
        assert!(!l.title.is_empty(), "{} has no title", l.id);
    }

    // Screenshot of the whole page: every plot's rectangle has drawn pixels.
    let height = v["height"].as_f64().unwrap().ceil() as u32 + 20;
    let shot = dir.path().join("shot.png");
    run_chromium(
        &profile,
        &[
            format!("--window-size=1000,{height}"),
            format!("--screenshot={}", shot.display()),
            "--virtual-time-budget=5000".into(),
            url,
        ],
    );
    let img = grit::report::load_png(&shot).expect("a PNG screenshot");
    assert!(img.width >= 900 && img.height >= height - 40, "{}x{}", img.width, img.height);
    for l in &layouts {
        let (x0, y0) = (l.x.max(0.0) as u32, l.y.max(0.0) as u32);
        let (x1, y1) = (((l.x + l.w) as u32).min(img.width), ((l.y + l.h) as u32).min(img.height));
        let frac = img.ink_fraction(x0, y0, x1, y1);
        assert!(frac > 0.01 && frac < 0.95, "{}: {:.3} of its pixels are drawn", l.id, frac);
    }

    // --png: one image with every plot stacked.
    let img = grit::report::load_png(&png).unwrap();
    assert_eq!((img.width, img.height), (900, 420 * ids.len() as u32));
    for k in 0..ids.len() as u32 {
        let frac = img.ink_fraction(0, 420 * k, 900, 420 * (k + 1));
        assert!(frac > 0.01, "plot {k} of the PNG is blank ({frac})");
    }
}
