//! `grit inspect`: what a GGUF adapter, a PEFT folder or a (merged or base) model holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use super::{load_any, Adapter, AdapterError};
use crate::gguf::GgufFile;
use crate::model::Target;

/// Describes `path` as one JSON value (the shape `grit inspect --json` prints).
pub fn inspect(path: &Path, base: Option<&Path>) -> Result<Value, AdapterError> {
    if path.is_dir() {
        return Ok(describe_adapter(&load_any(path, base)?, "peft"));
    }
    let f = GgufFile::open(path)?;
    if f.get_str("general.type").ok().as_deref() == Some("adapter") {
        return Ok(describe_adapter(&Adapter::read_gguf(path)?, "gguf"));
    }
    Ok(describe_model(&f))
}

fn describe_adapter(a: &Adapter, format: &str) -> Value {
    let targets: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|t| a.modules.iter().any(|m| m.target == Some(*t)))
        .collect();
    let mut rows: BTreeMap<usize, BTreeMap<&str, usize>> = BTreeMap::new();
    let mut per_target: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut scales: BTreeMap<String, usize> = BTreeMap::new();
    let mut modules = Vec::new();
    for m in &a.modules {
        if let (Some(l), Some(t)) = (m.layer, m.target) {
            rows.entry(l).or_default().insert(t.name(), m.rank);
        }
        let key = m.target.map_or_else(|| m.base.clone(), |t| t.name().to_string());
        let e = per_target.entry(key).or_default();
        e.0 += 1;
        e.1 += m.n_params();
        *dtypes.entry(m.dtype.clone()).or_default() += 1;
        *scales.entry(format!("{}", m.scale)).or_default() += 1;
        modules.push(json!({
            "name": m.base, "layer": m.layer, "target": m.target.map(|t| t.name()), "rank": m.rank,
            "d_in": m.d_in, "d_out": m.d_out, "scale": m.scale, "dtype": m.dtype, "params": m.n_params(),
        }));
    }
    let ranks: Vec<usize> = a.modules.iter().map(|m| m.rank).collect();
    json!({
        "kind": "adapter",
        "format": format,
        "path": a.source,
        "architecture": a.arch,
        "alpha": a.file_alpha,
        "scale_folded": a.scale_folded,
        "modules": a.modules.len(),
        "parameters": a.n_params(),
        "rank_min": ranks.iter().min(),
        "rank_max": ranks.iter().max(),
        "distinct_ranks": ranks.iter().collect::<std::collections::BTreeSet<_>>().len(),
        "dtypes": dtypes,
        "scales": scales,
        "targets": targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "rank_table": rows.iter().map(|(l, r)| json!({"layer": l, "ranks": r})).collect::<Vec<_>>(),
        "per_target": per_target.iter().map(|(k, (n, p))| (k.clone(), json!({"modules": n, "params": p}))).collect::<serde_json::Map<_, _>>(),
        "provenance": a.provenance,
        "module_list": modules,
    })
}

fn describe_model(f: &GgufFile) -> Value {
    let s = |k: &str| {
        f.get(k).map(|v| match v {
            crate::gguf::Value::Str(s) => Value::String(s),
            v => Value::String(v.to_string()),
        })
    };
    let merged = f.get("grit.merged.scale").map(|_| {
        json!({
            "adapter": s("grit.merged.adapter"),
            "adapter_sha256": s("grit.merged.adapter_sha256"),
            "scale": s("grit.merged.scale"),
            "modules": s("grit.merged.modules"),
            "type": s("grit.merged.type"),
            "method": s("grit.method"),
        })
    });
    json!({
        "kind": "model",
        "path": f.path(),
        "architecture": f.architecture().ok(),
        "name": f.get_str("general.name").ok(),
        "parameters": f.n_params(),
        "tensors": f.tensors().len(),
        "tensor_types": f.type_histogram().into_iter().collect::<BTreeMap<_, _>>(),
        "file_bytes": f.file_len(),
        "merged": merged,
    })
}

/// The human-readable report of [`inspect`]'s value.
pub fn render(v: &Value) -> String {
    let mut o = String::new();
    let str_of = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    if v["kind"] == "model" {
        let _ = writeln!(o, "model        {}", str_of(&v["path"]));
        let _ = writeln!(o, "architecture {}", str_of(&v["architecture"]));
        let _ = writeln!(o, "name         {}", str_of(&v["name"]));
        let _ = writeln!(o, "parameters   {}", v["parameters"]);
        let types: Vec<String> = v["tensor_types"]
            .as_object()
            .map(|m| m.iter().map(|(k, n)| format!("{k} ×{n}")).collect())
            .unwrap_or_default();
        let _ = writeln!(o, "tensor types {}", types.join(", "));
        match &v["merged"] {
            Value::Null => {
                let _ = writeln!(o, "merged       no (a base model)");
            }
            m => {
                let _ = writeln!(
                    o,
                    "merged       yes: {} modules of {} at scale {} ({}; adapter sha256 {})",
                    str_of(&m["modules"]),
                    str_of(&m["adapter"]),
                    str_of(&m["scale"]),
                    str_of(&m["type"]),
                    str_of(&m["adapter_sha256"])
                );
            }
        }
        return o;
    }
    let _ = writeln!(o, "adapter      {} ({})", str_of(&v["path"]), str_of(&v["format"]));
    let _ = writeln!(o, "architecture {}", str_of(&v["architecture"]));
    let _ = writeln!(
        o,
        "modules      {}, parameters {}, ranks {}..{} ({} distinct)",
        v["modules"], v["parameters"], v["rank_min"], v["rank_max"], v["distinct_ranks"]
    );
    let scales: Vec<String> = v["scales"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} ×{n}")).collect())
        .unwrap_or_default();
    let alpha =
        if v["alpha"].is_null() { String::new() } else { format!("; file alpha {}", v["alpha"]) };
    let folded = if v["scale_folded"] == true { " (training scales folded into B)" } else { "" };
    let _ = writeln!(o, "scales       {}{alpha}{folded}", scales.join(", "));
    let dtypes: Vec<String> = v["dtypes"]
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} ×{n}")).collect())
        .unwrap_or_default();
    let _ = writeln!(o, "dtypes       {}", dtypes.join(", "));
    let p = &v["provenance"];
    let _ = writeln!(
        o,
        "provenance   base {} (sha256 {}), method {}, grit {}",
        str_of(&p["base_name"]),
        str_of(&p["base_sha256"]),
        str_of(&p["method"]),
        str_of(&p["grit_version"])
    );
    let targets: Vec<String> =
        v["targets"].as_array().map(|a| a.iter().map(str_of).collect()).unwrap_or_default();
    if !targets.is_empty() {
        let _ = writeln!(o, "\nrank per layer:");
        let _ = write!(o, "{:>5}", "layer");
        for t in &targets {
            let _ = write!(o, " {t:>11}");
        }
        let _ = writeln!(o, " {:>9}", "params");
        let dims: BTreeMap<(u64, String), u64> = v["module_list"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some((
                            (m["layer"].as_u64()?, m["target"].as_str()?.to_string()),
                            m["params"].as_u64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for row in v["rank_table"].as_array().into_iter().flatten() {
            let l = row["layer"].as_u64().unwrap_or(0);
            let _ = write!(o, "{l:>5}");
            let mut params = 0;
            for t in &targets {
                match row["ranks"][t.as_str()].as_u64() {
                    Some(r) => {
                        let _ = write!(o, " {r:>11}");
                        params += dims.get(&(l, t.clone())).copied().unwrap_or(0);
                    }
                    None => {
                        let _ = write!(o, " {:>11}", "-");
                    }
                }
            }
            let _ = writeln!(o, " {params:>9}");
        }
    }
    let _ = writeln!(o, "\nper target:");
    for (t, x) in v["per_target"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "  {t:<12} {:>4} modules {:>10} params", x["modules"], x["params"]);
    }
    o
}
