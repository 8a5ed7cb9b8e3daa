//! `grit inspect`: what a GGUF adapter, a PEFT folder or a (merged or base) model holds.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{load_any, Adapter, AdapterError, Provenance};
use crate::gguf::GgufFile;
use crate::model::Target;

/// What `grit inspect` found (`--json` prints it as serialized, with a `kind` tag; the text
/// form is its `Display`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Inspection {
    Adapter(AdapterReport),
    Model(ModelReport),
}

/// An adapter: its totals, ranks per layer and target, and every module.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterReport {
    /// `gguf` or `peft`.
    pub format: &'static str,
    pub path: Option<PathBuf>,
    pub architecture: String,
    pub alpha: Option<f32>,
    pub scale_folded: bool,
    pub modules: usize,
    pub parameters: usize,
    pub rank_min: Option<usize>,
    pub rank_max: Option<usize>,
    pub distinct_ranks: usize,
    /// Modules per stored type.
    pub dtypes: BTreeMap<String, usize>,
    /// Modules per scale (as printed).
    pub scales: BTreeMap<String, usize>,
    /// The targets present, in graph order.
    pub targets: Vec<&'static str>,
    pub rank_table: Vec<RankRow>,
    pub per_target: BTreeMap<String, TargetTotal>,
    pub provenance: Provenance,
    pub module_list: Vec<ModuleReport>,
}

/// One layer's rank per target.
#[derive(Debug, Clone, Serialize)]
pub struct RankRow {
    pub layer: usize,
    pub ranks: BTreeMap<&'static str, usize>,
}

/// Modules and parameters of one target (or of a module outside the known targets).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TargetTotal {
    pub modules: usize,
    pub params: usize,
}

/// One module of the adapter.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub name: String,
    pub layer: Option<usize>,
    pub target: Option<&'static str>,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub scale: f32,
    pub dtype: String,
    pub params: usize,
}

/// A model file: its totals and, for a model grit merged, what was merged into it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub path: PathBuf,
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub parameters: u64,
    pub tensors: usize,
    pub tensor_types: BTreeMap<String, usize>,
    pub file_bytes: u64,
    pub merged: Option<MergedInto>,
}

/// The `grit.merged.*` keys of a merged model, as stored (text).
#[derive(Debug, Clone, Serialize)]
pub struct MergedInto {
    pub adapter: Option<String>,
    pub adapter_sha256: Option<String>,
    pub scale: Option<String>,
    pub modules: Option<String>,
    #[serde(rename = "type")]
    pub ty: Option<String>,
    pub method: Option<String>,
}

/// Describes `path`: a PEFT folder, a GGUF adapter, or a model.
pub fn inspect(path: &Path, base: Option<&Path>) -> Result<Inspection, AdapterError> {
    if path.is_dir() {
        return Ok(Inspection::Adapter(AdapterReport::of(&load_any(path, base)?, "peft")));
    }
    let f = GgufFile::open(path)?;
    if f.get_str("general.type").ok().as_deref() == Some("adapter") {
        return Ok(Inspection::Adapter(AdapterReport::of(&Adapter::read_gguf(path)?, "gguf")));
    }
    Ok(Inspection::Model(ModelReport::of(&f)))
}

impl AdapterReport {
    fn of(a: &Adapter, format: &'static str) -> Self {
        let targets: Vec<&'static str> = Target::ALL
            .into_iter()
            .filter(|t| a.modules.iter().any(|m| m.target == Some(*t)))
            .map(Target::name)
            .collect();
        let mut rows: BTreeMap<usize, BTreeMap<&'static str, usize>> = BTreeMap::new();
        let mut per_target: BTreeMap<String, TargetTotal> = BTreeMap::new();
        let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
        let mut scales: BTreeMap<String, usize> = BTreeMap::new();
        let mut module_list = Vec::new();
        for m in &a.modules {
            if let (Some(l), Some(t)) = (m.layer, m.target) {
                rows.entry(l).or_default().insert(t.name(), m.rank);
            }
            let key = m.target.map_or_else(|| m.base.clone(), |t| t.name().to_string());
            let e = per_target.entry(key).or_default();
            e.modules += 1;
            e.params += m.n_params();
            *dtypes.entry(m.dtype.clone()).or_default() += 1;
            *scales.entry(format!("{}", m.scale)).or_default() += 1;
            module_list.push(ModuleReport {
                name: m.base.clone(),
                layer: m.layer,
                target: m.target.map(Target::name),
                rank: m.rank,
                d_in: m.d_in,
                d_out: m.d_out,
                scale: m.scale,
                dtype: m.dtype.clone(),
                params: m.n_params(),
            });
        }
        let ranks = || a.modules.iter().map(|m| m.rank);
        AdapterReport {
            format,
            path: a.source.clone(),
            architecture: a.arch.clone(),
            alpha: a.file_alpha,
            scale_folded: a.scale_folded,
            modules: a.modules.len(),
            parameters: a.n_params(),
            rank_min: ranks().min(),
            rank_max: ranks().max(),
            distinct_ranks: ranks().collect::<BTreeSet<_>>().len(),
            dtypes,
            scales,
            targets,
            rank_table: rows.into_iter().map(|(layer, ranks)| RankRow { layer, ranks }).collect(),
            per_target,
            provenance: a.provenance.clone(),
            module_list,
        }
    }
}

impl ModelReport {
    fn of(f: &GgufFile) -> Self {
        let s = |k: &str| {
            f.get(k).map(|v| match v {
                crate::gguf::Value::Str(s) => s,
                v => v.to_string(),
            })
        };
        let merged = f.get("grit.merged.scale").map(|_| MergedInto {
            adapter: s("grit.merged.adapter"),
            adapter_sha256: s("grit.merged.adapter_sha256"),
            scale: s("grit.merged.scale"),
            modules: s("grit.merged.modules"),
            ty: s("grit.merged.type"),
            method: s("grit.method"),
        });
        ModelReport {
            path: f.path().into(),
            architecture: f.architecture().ok(),
            name: f.get_str("general.name").ok(),
            parameters: f.n_params(),
            tensors: f.tensors().len(),
            tensor_types: f.type_histogram().into_iter().collect(),
            file_bytes: f.file_len(),
            merged,
        }
    }
}

/// `type ×count, …` of a count map.
fn counts(m: &BTreeMap<String, usize>) -> String {
    m.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
}

/// An optional value, or `-`.
fn or_dash<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inspection::Adapter(a) => a.fmt(f),
            Inspection::Model(m) => m.fmt(f),
        }
    }
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model        {}", self.path.display())?;
        writeln!(f, "architecture {}", or_dash(&self.architecture))?;
        writeln!(f, "name         {}", or_dash(&self.name))?;
        writeln!(f, "parameters   {}", self.parameters)?;
        writeln!(f, "tensor types {}", counts(&self.tensor_types))?;
        match &self.merged {
            None => writeln!(f, "merged       no (a base model)"),
            Some(m) => writeln!(
                f,
                "merged       yes: {} modules of {} at scale {} ({}; adapter sha256 {})",
                or_dash(&m.modules),
                or_dash(&m.adapter),
                or_dash(&m.scale),
                or_dash(&m.ty),
                or_dash(&m.adapter_sha256)
            ),
        }
    }
}

impl fmt::Display for AdapterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.as_ref().map(|p| p.display().to_string());
        writeln!(f, "adapter      {} ({})", or_dash(&path), self.format)?;
        writeln!(f, "architecture {}", self.architecture)?;
        writeln!(
            f,
            "modules      {}, parameters {}, ranks {}..{} ({} distinct)",
            self.modules,
            self.parameters,
            or_dash(&self.rank_min),
            or_dash(&self.rank_max),
            self.distinct_ranks
        )?;
        let alpha = self.alpha.map(|a| format!("; file alpha {a}")).unwrap_or_default();
        let folded = if self.scale_folded { " (training scales folded into B)" } else { "" };
        writeln!(f, "scales       {}{alpha}{folded}", counts(&self.scales))?;
        writeln!(f, "dtypes       {}", counts(&self.dtypes))?;
        let p = &self.provenance;
        writeln!(
            f,
            "provenance   base {} (sha256 {}), method {}, grit {}",
            or_dash(&p.base_name),
            or_dash(&p.base_sha256),
            or_dash(&p.method),
            or_dash(&p.grit_version)
        )?;
        if !self.targets.is_empty() {
            self.fmt_rank_table(f)?;
        }
        writeln!(f, "\nper target:")?;
        for (t, x) in &self.per_target {
            writeln!(f, "  {t:<12} {:>4} modules {:>10} params", x.modules, x.params)?;
        }
        Ok(())
    }
}

impl AdapterReport {
    /// Rank per layer and target, with each layer's parameters.
    fn fmt_rank_table(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\nrank per layer:")?;
        write!(f, "{:>5}", "layer")?;
        for t in &self.targets {
            write!(f, " {t:>11}")?;
        }
        writeln!(f, " {:>9}", "params")?;
        let params: BTreeMap<(usize, &str), usize> = self
            .module_list
            .iter()
            .filter_map(|m| Some(((m.layer?, m.target?), m.params)))
            .collect();
        for row in &self.rank_table {
            write!(f, "{:>5}", row.layer)?;
            let mut total = 0;
            for &t in &self.targets {
                match row.ranks.get(t) {
                    Some(r) => {
                        write!(f, " {r:>11}")?;
                        total += params.get(&(row.layer, t)).copied().unwrap_or(0);
                    }
                    None => write!(f, " {:>11}", "-")?,
                }
            }
            writeln!(f, " {total:>9}")?;
        }
        Ok(())
    }
}
