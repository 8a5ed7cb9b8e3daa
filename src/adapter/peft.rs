//! Hugging Face PEFT folders: `adapter_model.safetensors` + `adapter_config.json`.
//!
//! Module names: grit's `blk.N.attn_q.weight` is PEFT's
//! `base_model.model.model.layers.N.self_attn.q_proj` (`lora_A.weight` [r, d_in] and
//! `lora_B.weight` [d_out, r], the same bytes as the GGUF tensors). Per-module ranks and scales
//! go into `rank_pattern` / `alpha_pattern` keyed by the module's full name
//! (`model.layers.N.self_attn.q_proj`), with alpha_t = s_t·r_t so that PEFT's alpha/r is
//! exactly the scale s_t grit applies.
//!
//! Row order: llama.cpp's HF→GGUF conversion permutes the rows of attn_q and attn_k of the
//! `llama` architecture (per head, the interleaved rotary pairs are regrouped: GGUF row
//! h·hd + 2i + j is HF row h·hd + j·hd/2 + i, with n_head heads for q and n_head_kv for k).
//! lora_B of those modules holds output rows, so it is un-permuted going to PEFT and permuted
//! coming back. `qwen2` is converted without a permutation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use super::{io, Adapter, AdapterError, AdapterModule, Provenance};
use crate::gguf::GgufFile;
use crate::model::{Arch, Target};

pub const WEIGHTS: &str = "adapter_model.safetensors";
pub const CONFIG: &str = "adapter_config.json";
const KEY_ARCH: &str = "grit.architecture";

/// The Hugging Face module path of a target inside a decoder layer of `arch` (Phi-3's fused
/// `ffn_up` is its `gate_up_proj`).
pub fn hf_module(arch: Arch, target: Target) -> &'static str {
    match target {
        Target::AttnQ => "self_attn.q_proj",
        Target::AttnK => "self_attn.k_proj",
        Target::AttnV => "self_attn.v_proj",
        Target::AttnQkv => "self_attn.qkv_proj",
        Target::AttnOutput => "self_attn.o_proj",
        Target::FfnGate => "mlp.gate_proj",
        Target::FfnUp if arch.fused_gate_up() => "mlp.gate_up_proj",
        Target::FfnUp => "mlp.up_proj",
        Target::FfnDown => "mlp.down_proj",
    }
}

/// `model.layers.N.self_attn.q_proj`: the name PEFT's patterns are matched against.
pub fn hf_name(arch: Arch, layer: usize, target: Target) -> String {
    format!("model.layers.{layer}.{}", hf_module(arch, target))
}

/// The architecture an adapter was trained on (those grit trains; others are refused).
fn arch_of(arch: &str, path: &Path) -> Result<Arch, AdapterError> {
    Arch::parse(arch).map_err(|_| {
        AdapterError::Invalid(
            path.into(),
            format!(
                "PEFT conversion supports the {} architectures, not '{arch}'",
                Arch::ALL.map(Arch::name).join(", ")
            ),
        )
    })
}

/// Whether llama.cpp's HF→GGUF converter permutes this architecture's q/k rows.
fn permutes_qk(arch: &str, path: &Path) -> Result<bool, AdapterError> {
    Ok(arch_of(arch, path)?.permutes_qk())
}

/// Heads to permute B's rows over, for a module of `target` (None: no permutation).
fn perm_heads(
    arch: &str,
    target: Option<Target>,
    prov: &Provenance,
    path: &Path,
) -> Result<Option<usize>, AdapterError> {
    if !permutes_qk(arch, path)? {
        return Ok(None);
    }
    let n = match target {
        Some(Target::AttnQ) => prov.n_head,
        Some(Target::AttnK) => prov.n_head_kv,
        _ => return Ok(None),
    };
    n.map(|n| Some(n as usize)).ok_or_else(|| {
        AdapterError::Invalid(
            path.into(),
            "the llama q/k row permutation needs the base model's head counts, which this adapter does not record: pass --model BASE.gguf".into(),
        )
    })
}

/// Permutes the `d_out` rows (each `row` values long) of `b` from HF order to GGUF order
/// (`to_gguf`) or back, over `n_head` heads.
pub fn permute_rows(
    b: &[f32],
    row: usize,
    n_head: usize,
    to_gguf: bool,
    what: &str,
    path: &Path,
) -> Result<Vec<f32>, AdapterError> {
    let d_out = b.len() / row.max(1);
    if n_head == 0 || !d_out.is_multiple_of(n_head) || !(d_out / n_head).is_multiple_of(2) {
        return Err(AdapterError::Shape {
            path: path.into(),
            tensor: what.into(),
            msg: format!("{d_out} output rows do not split into {n_head} heads of an even size"),
        });
    }
    let hd = d_out / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; b.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let g = h * hd + 2 * i + j;
                let f = h * hd + j * half + i;
                let (dst, src) = if to_gguf { (g, f) } else { (f, g) };
                out[dst * row..(dst + 1) * row].copy_from_slice(&b[src * row..(src + 1) * row]);
            }
        }
    }
    Ok(out)
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The most frequent value (ties: the smallest), for PEFT's default r and lora_alpha.
fn mode<T: Ord + Copy>(xs: impl Iterator<Item = T>) -> Option<T> {
    let mut count = BTreeMap::new();
    for x in xs {
        *count.entry(x).or_insert(0usize) += 1;
    }
    let best = count.values().copied().max()?;
    count.into_iter().find(|&(_, c)| c == best).map(|(x, _)| x)
}

/// Writes `adapter` as a PEFT folder `dir` (created if needed; each file written atomically).
pub fn write_peft(adapter: &Adapter, dir: &Path) -> Result<(), AdapterError> {
    let src = adapter.path_or("<adapter>");
    let arch = arch_of(&adapter.arch, &src)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rank_of = BTreeMap::new();
    let mut alpha_of = BTreeMap::new();
    for m in &adapter.modules {
        let (Some(layer), Some(target)) = (m.layer, m.target) else {
            return Err(AdapterError::Invalid(
                src.clone(),
                format!("'{}' has no Hugging Face PEFT module name grit knows", m.base),
            ));
        };
        let name = hf_name(arch, layer, target);
        let b = match perm_heads(&adapter.arch, Some(target), &adapter.provenance, &src)? {
            Some(n) => permute_rows(&m.b, m.rank, n, false, &m.base, &src)?,
            None => m.b.clone(),
        };
        tensors.push((
            format!("base_model.model.{name}.lora_A.weight"),
            vec![m.rank, m.d_in],
            f32_bytes(&m.a),
        ));
        tensors.push((
            format!("base_model.model.{name}.lora_B.weight"),
            vec![m.d_out, m.rank],
            f32_bytes(&b),
        ));
        rank_of.insert(name.clone(), m.rank);
        // alpha_t = s_t·r_t exactly in f64 (an f32 times a small integer), so alpha/r = s_t.
        alpha_of.insert(name, m.scale as f64 * m.rank as f64);
    }
    let r = mode(rank_of.values().copied()).unwrap_or(8);
    let alpha =
        mode(alpha_of.values().map(|a| a.to_bits())).map(f64::from_bits).unwrap_or(r as f64);
    let p = &adapter.provenance;
    let config = PeftConfig {
        peft_type: Some("LORA".into()),
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some(p.base_name.clone().unwrap_or_default()),
        r,
        lora_alpha: alpha,
        rank_pattern: rank_of
            .iter()
            .filter(|(_, &x)| x != r)
            .map(|(k, &x)| (k.clone(), x))
            .collect(),
        alpha_pattern: alpha_of
            .iter()
            .filter(|(_, &x)| x != alpha)
            .map(|(k, &x)| (k.clone(), x))
            .collect(),
        // Full module names: PEFT adapts exactly the modules this adapter has.
        target_modules: Some(Value::from(rank_of.keys().cloned().collect::<Vec<_>>())),
        lora_dropout: Some(0.0),
        bias: Some("none".into()),
        fan_in_fan_out: Some(false),
        use_rslora: Some(false),
        use_dora: Some(false),
        init_lora_weights: Some(Value::Bool(true)),
        inference_mode: Some(true),
        modules_to_save: None,
        layers_to_transform: None,
        layers_pattern: None,
        revision: None,
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(KEY_ARCH.to_string(), adapter.arch.clone());
    if adapter.scale_folded {
        meta.insert(super::KEY_SCALE_FOLDED.to_string(), "true".to_string());
    }
    for (k, v) in p.pairs() {
        meta.insert(k.to_string(), v);
    }
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in &tensors {
        let v = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| io(dir, format!("tensor {name}: {e}")))?;
        views.push((name.clone(), v));
    }
    let bytes = safetensors::serialize(views, &Some(meta)).map_err(|e| io(dir, e))?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let wpath = dir.join(WEIGHTS);
    crate::fetch::write_atomic(&wpath, &bytes).map_err(|e| io(&wpath, e))?;
    let cpath = dir.join(CONFIG);
    let text = serde_json::to_string_pretty(&config).map_err(|e| io(&cpath, e))?;
    crate::fetch::write_atomic(&cpath, text.as_bytes()).map_err(|e| io(&cpath, e))?;
    Ok(())
}

/// `adapter_config.json`: the fields grit reads and writes (PEFT's `LoraConfig`; unknown
/// fields are ignored on reading, as PEFT adds new ones).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeftConfig {
    #[serde(default)]
    pub peft_type: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The rank of every module not in `rank_pattern`.
    pub r: usize,
    /// alpha of every module not in `alpha_pattern` (scale alpha/r, or alpha/√r with rsLoRA).
    pub lora_alpha: f64,
    /// Module name (or a dotted suffix of one) → rank.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Module name (or a dotted suffix of one) → alpha.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub target_modules: Option<Value>,
    #[serde(default)]
    pub lora_dropout: Option<f64>,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: Option<bool>,
    #[serde(default)]
    pub use_rslora: Option<bool>,
    #[serde(default)]
    pub use_dora: Option<bool>,
    #[serde(default)]
    pub init_lora_weights: Option<Value>,
    #[serde(default)]
    pub inference_mode: Option<bool>,
    #[serde(default)]
    pub modules_to_save: Option<Value>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub layers_pattern: Option<Value>,
    #[serde(default)]
    pub revision: Option<String>,
}

impl PeftConfig {
    /// Reads and checks `path`: a LoRA whose layout llama.cpp's format can hold.
    fn read(path: &Path) -> Result<(PeftConfig, String), AdapterError> {
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        // The error names the field's path (`rank_pattern.<module>`) as well as line and column.
        let de = &mut serde_json::Deserializer::from_str(&text);
        let cfg: PeftConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let msg = match e.path().to_string() {
                root if root == "." => format!("not a PEFT LoRA config: {}", e.inner()),
                field => format!("not a PEFT LoRA config: field '{field}': {}", e.inner()),
            };
            AdapterError::Invalid(path.into(), msg)
        })?;
        let bad = |field: &str, why: String| {
            AdapterError::Invalid(path.into(), format!("field '{field}': {why}"))
        };
        if let Some(t) = cfg.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(bad("peft_type", format!("'{t}' is not LORA")));
        }
        for (field, ok) in [
            ("fan_in_fan_out", cfg.fan_in_fan_out != Some(true)),
            ("use_dora", cfg.use_dora != Some(true)),
            ("bias", cfg.bias.as_deref().is_none_or(|b| b == "none")),
        ] {
            if !ok {
                return Err(bad(field, "not supported by llama.cpp's LoRA format (grit needs fan_in_fan_out false, use_dora false, bias \"none\")".into()));
            }
        }
        if cfg.r == 0 {
            return Err(bad("r", "must be a positive integer".into()));
        }
        Ok((cfg, text))
    }

    /// The rank and alpha of `module` (its pattern entries, else the defaults).
    fn rank_alpha(&self, module: &str) -> (usize, f64) {
        let r = pattern(&self.rank_pattern, module).unwrap_or(self.r);
        (r, pattern(&self.alpha_pattern, module).unwrap_or(self.lora_alpha))
    }
}

/// The value of the first pattern entry that is `module` or a dotted suffix of it.
fn pattern<T: Copy>(pat: &BTreeMap<String, T>, module: &str) -> Option<T> {
    pat.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| *v)
}

/// Splits `base_model.model.model.layers.N.self_attn.q_proj.lora_A[.adapter].weight` into
/// (`model.layers.N.self_attn.q_proj`, layer, target, is_a).
fn parse_peft_name(name: &str) -> Option<(String, usize, Target, bool)> {
    let parts: Vec<&str> = name.split('.').collect();
    let li = parts.iter().position(|p| *p == "lora_A" || *p == "lora_B")?;
    if *parts.last()? != "weight" || li < 3 {
        return None;
    }
    let is_a = parts[li] == "lora_A";
    let module = parts[..li].join(".");
    let module = module.strip_prefix("base_model.model.").unwrap_or(&module).to_string();
    let proj = parts[li - 1];
    let target = Target::ALL
        .into_iter()
        .find(|&t| Arch::ALL.iter().any(|&a| hf_module(a, t).ends_with(&format!(".{proj}"))))?;
    let lp = parts.iter().position(|p| *p == "layers")?;
    let layer = parts.get(lp + 1)?.parse().ok()?;
    Some((module, layer, target, is_a))
}

fn to_f32(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    path: &Path,
) -> Result<Vec<f32>, AdapterError> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => {
            d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        Dtype::F16 => {
            d.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        Dtype::BF16 => {
            d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        other => {
            return Err(AdapterError::Dtype {
                path: path.into(),
                tensor: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::F16 => "f16",
        Dtype::BF16 => "bf16",
        _ => "other",
    }
}

/// Reads a PEFT folder. The architecture and head counts come from grit's metadata in the
/// safetensors file, or from `base` (which then also decides the provenance and is checked
/// against every module's shape).
pub fn read_peft(dir: &Path, base: Option<&Path>) -> Result<Adapter, AdapterError> {
    let cpath = dir.join(CONFIG);
    let wpath = dir.join(WEIGHTS);
    for p in [&cpath, &wpath] {
        if !p.is_file() {
            return Err(AdapterError::NotAdapter(
                dir.into(),
                format!(
                    "no {} (a PEFT folder holds {CONFIG} and {WEIGHTS})",
                    p.file_name().unwrap_or_default().to_string_lossy()
                ),
            ));
        }
    }
    let (cfg, text) = PeftConfig::read(&cpath)?;
    let raw = std::fs::read(&wpath).map_err(|e| io(&wpath, e))?;
    let st = safetensors::SafeTensors::deserialize(&raw).map_err(|e| {
        AdapterError::Invalid(wpath.clone(), format!("not a safetensors file: {e}"))
    })?;
    let meta = safetensors::SafeTensors::read_metadata(&raw)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .unwrap_or_default();
    let (arch, provenance, base_file) = base_of(dir, &meta, base, &text)?;
    let mut modules = Vec::new();
    for ((layer, target), (module, a_name, b_name)) in pair_halves(&st, &wpath)? {
        let missing = |missing| AdapterError::MissingHalf {
            path: wpath.clone(),
            tensor: module.clone(),
            missing,
        };
        let a_name = a_name.ok_or_else(|| missing("lora_A"))?;
        let b_name = b_name.ok_or_else(|| missing("lora_B"))?;
        let get = |n: &str| {
            st.tensor(n)
                .map_err(|e| AdapterError::Invalid(wpath.clone(), format!("tensor '{n}': {e}")))
        };
        let (av, bv) = (get(&a_name)?, get(&b_name)?);
        let (ash, bsh) = (av.shape().to_vec(), bv.shape().to_vec());
        let shape_err =
            |msg: String| AdapterError::Shape { path: wpath.clone(), tensor: module.clone(), msg };
        if ash.len() != 2 || bsh.len() != 2 || ash[0] != bsh[1] || ash[0] == 0 {
            return Err(shape_err(format!(
                "lora_A {ash:?} and lora_B {bsh:?} do not form an [r, d_in]·[d_out, r] pair"
            )));
        }
        let rank = ash[0];
        let (r_cfg, alpha) = cfg.rank_alpha(&module);
        if r_cfg != rank {
            return Err(shape_err(format!(
                "the tensors have rank {rank} but {CONFIG} gives r = {r_cfg}"
            )));
        }
        let scale = crate::model::lora_scale(alpha as f32, rank, cfg.use_rslora == Some(true));
        let base_name = crate::model::ModuleId { layer, target }.to_string();
        let mut b = to_f32(&bv, &b_name, &wpath)?;
        if let Some(n) = perm_heads(&arch, Some(target), &provenance, dir)? {
            b = permute_rows(&b, rank, n, true, &base_name, &wpath)?;
        }
        let (adt, bdt) = (dtype_name(av.dtype()), dtype_name(bv.dtype()));
        modules.push(AdapterModule {
            base: base_name,
            layer: Some(layer),
            target: Some(target),
            rank,
            d_in: ash[1],
            d_out: bsh[0],
            scale,
            a: to_f32(&av, &a_name, &wpath)?,
            b,
            dtype: if adt == bdt { adt.into() } else { format!("{adt}/{bdt}") },
        });
    }
    // GGUF order: by layer, then target.
    modules.sort_by_key(|m| (m.layer, m.target));
    let scale_folded = meta.get(super::KEY_SCALE_FOLDED).is_some_and(|v| v == "true");
    let adapter = Adapter {
        arch,
        modules,
        provenance,
        source: Some(dir.into()),
        file_alpha: None,
        scale_folded,
    };
    adapter.check_values()?;
    if let Some(f) = &base_file {
        adapter.check_fits(f)?;
    }
    Ok(adapter)
}

/// The base architecture and provenance of a PEFT folder: from the base model when given (its
/// architecture must match what the folder records), else from the folder's metadata (grit
/// writes it; a folder from elsewhere needs the base).
fn base_of(
    dir: &Path,
    meta: &HashMap<String, String>,
    base: Option<&Path>,
    config_text: &str,
) -> Result<(String, Provenance, Option<GgufFile>), AdapterError> {
    let mut provenance = Provenance::from_pairs(|k| meta.get(k).cloned());
    let mut arch = meta.get(KEY_ARCH).cloned();
    let base_file = match base {
        Some(b) => {
            let f = GgufFile::open(b)?;
            let base_arch = f.architecture()?;
            if let Some(a) = &arch {
                if *a != base_arch {
                    return Err(AdapterError::Architecture {
                        path: dir.into(),
                        adapter: a.clone(),
                        base: base_arch,
                        base_path: b.into(),
                    });
                }
            }
            arch = Some(base_arch);
            let method = provenance.method.clone().unwrap_or_else(|| "peft".into());
            let hp = provenance.hparams.clone().or_else(|| Some(config_text.to_string()));
            provenance = Provenance {
                method: Some(method),
                hparams: hp,
                ..Provenance::for_base(b, "peft", None)?
            };
            Some(f)
        }
        None => None,
    };
    let arch = arch.ok_or_else(|| {
        AdapterError::Invalid(dir.into(), "the folder does not record the base architecture (not written by grit): pass --model BASE.gguf".into())
    })?;
    if provenance.method.is_none() {
        provenance.method = Some("peft".into());
    }
    Ok((arch, provenance, base_file))
}

/// The lora_A / lora_B halves of each adapted module: (layer, target) → (PEFT module name,
/// A tensor, B tensor); every tensor must be one of the halves.
#[allow(clippy::type_complexity)]
fn pair_halves(
    st: &safetensors::SafeTensors<'_>,
    wpath: &Path,
) -> Result<BTreeMap<(usize, Target), (String, Option<String>, Option<String>)>, AdapterError> {
    let mut halves: BTreeMap<(usize, Target), (String, Option<String>, Option<String>)> =
        BTreeMap::new();
    for name in st.names() {
        let (module, layer, target, is_a) = parse_peft_name(name).ok_or_else(|| {
            AdapterError::Invalid(
                wpath.into(),
                format!("tensor '{name}' is not a lora_A/lora_B weight of a q/k/v/o/gate/up/down projection in a decoder layer"),
            )
        })?;
        let e = halves.entry((layer, target)).or_insert_with(|| (module, None, None));
        if is_a {
            e.1 = Some(name.clone());
        } else {
            e.2 = Some(name.clone());
        }
    }
    if halves.is_empty() {
        return Err(AdapterError::NotAdapter(
            wpath.into(),
            "it holds no lora_A/lora_B tensors".into(),
        ));
    }
    Ok(halves)
}

/// Target names used by a set of modules (for messages and inspect).
pub fn targets_of(adapter: &Adapter) -> BTreeSet<Target> {
    adapter.modules.iter().filter_map(|m| m.target).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config as PEFT writes it (nulls, a string `init_lora_weights`, fields grit does not
    /// know) reads; patterns give per-module rank and alpha; what llama.cpp's format cannot
    /// hold, or a pattern that is not a number, is refused naming the file and the field.
    #[test]
    fn peft_configs_read_typed_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(CONFIG);
        let read = |json: &str| {
            std::fs::write(&p, json).unwrap();
            PeftConfig::read(&p).map(|(c, _)| c)
        };
        let good = r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
            "rank_pattern": {"layers.1.self_attn.q_proj": 4}, "alpha_pattern": {},
            "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05, "bias": "none",
            "fan_in_fan_out": false, "use_rslora": false, "use_dora": false,
            "init_lora_weights": "gaussian", "modules_to_save": null, "layers_to_transform": null,
            "layers_pattern": null, "revision": null, "megatron_config": null, "loftq_config": {}}"#;
        let c = read(good).unwrap();
        assert_eq!((c.r, c.lora_alpha), (8, 16.0));
        assert_eq!(c.rank_alpha("model.layers.1.self_attn.q_proj"), (4, 16.0));
        assert_eq!(c.rank_alpha("model.layers.2.self_attn.q_proj"), (8, 16.0));
        for (bad, field) in [
            (good.replace(r#""peft_type": "LORA""#, r#""peft_type": "IA3""#), "peft_type"),
            (good.replace(r#""use_dora": false"#, r#""use_dora": true"#), "use_dora"),
            (good.replace(r#""bias": "none""#, r#""bias": "all""#), "bias"),
            (good.replace(r#""r": 8"#, r#""r": 0"#), "'r'"),
            (good.replace(r#"q_proj": 4"#, r#"q_proj": "x""#), "rank_pattern.layers.1"),
            (good.replace(r#""r": 8, "#, ""), "`r`"),
        ] {
            let e = read(&bad).unwrap_err().to_string();
            assert!(e.contains(CONFIG) && e.contains(field), "{field}: {e}");
        }
        // What export writes reads back as the same config.
        let written = PeftConfig { rank_pattern: [("a.q_proj".to_string(), 2)].into(), ..c };
        let back = read(&serde_json::to_string(&written).unwrap()).unwrap();
        assert_eq!(back, written);
    }

    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        // convert_hf_to_gguf's permute on 2 heads of 4 rows: reshape (2, 2, 2), swap the last
        // two axes: rows [0,1,2,3 | 4,5,6,7] → [0,2,1,3 | 4,6,5,7].
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let g = permute_rows(&hf, 1, 2, true, "t", Path::new("x")).unwrap();
        assert_eq!(g, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = permute_rows(&g, 1, 2, false, "t", Path::new("x")).unwrap();
        assert_eq!(back, hf);
        // Rows of 3 values move together.
        let hf: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let g = permute_rows(&hf, 3, 2, true, "t", Path::new("x")).unwrap();
        assert_eq!(&g[3..6], &[6., 7., 8.]);
        assert!(permute_rows(&hf, 3, 3, true, "t", Path::new("x")).is_err());
    }

    #[test]
    fn peft_names() {
        let (m, l, t, a) =
            parse_peft_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight")
                .unwrap();
        assert_eq!(
            (m.as_str(), l, t, a),
            ("model.layers.12.mlp.down_proj", 12, Target::FfnDown, false)
        );
        let (_, _, t, a) = parse_peft_name(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        )
        .unwrap();
        assert_eq!((t, a), (Target::AttnQ, true));
        assert!(parse_peft_name("base_model.model.lm_head.lora_A.weight").is_none());
    }

    #[test]
    fn patterns_match_dotted_suffixes_only() {
        let p: BTreeMap<String, usize> = [("layers.1.self_attn.q_proj".to_string(), 4)].into();
        assert_eq!(pattern(&p, "model.layers.1.self_attn.q_proj"), Some(4));
        assert!(pattern(&p, "model.layers.11.self_attn.q_proj").is_none());
    }
}
