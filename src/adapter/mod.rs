//! Adapter files: an in-memory model of a LoRA adapter (per-module A, B, rank and the exact
//! scale applied at inference), read from and written to llama.cpp's GGUF adapter format and
//! Hugging Face PEFT folders, merged into a base model, and described by `grit inspect`.
//!
//! # Layout and scales
//! A module adapts a base weight W of ggml shape ne = [d_in, d_out] (d_out rows of d_in) as
//! W·x + s·B·(A·x). A is stored as r rows of d_in values (ggml ne [d_in, r], torch [r, d_in]),
//! B as d_out rows of r values (ggml ne [r, d_out], torch [d_out, r]): the same bytes in
//! llama.cpp's GGUF and in PEFT's safetensors, so no transposition happens anywhere.
//!
//! llama.cpp has one `adapter.lora.alpha` per file and applies alpha/r_t to the tensor pair t
//! of rank r_t (alpha = 0 means scale 1). [`Adapter::write_gguf`] writes that alpha when every
//! module's scale is exactly alpha/r_t in f32 (uniform LoRA); otherwise (rsLoRA, GRIT after
//! rank cuts, mixed alphas) it multiplies each B by its scale and writes alpha = 0, which is
//! exact up to one f32 rounding per element. PEFT's config carries r and lora_alpha per module
//! (`rank_pattern`, `alpha_pattern`), so a PEFT export writes alpha_t = s_t·r_t and keeps B.
//!
//! # Provenance
//! grit writes `grit.*` keys into the adapters it makes: the base model's `general.name`,
//! sha256 and file size, its architecture's head counts (needed for the q/k row permutation
//! of PEFT conversion), the training method and hyper-parameters, and grit's version.
//! [`check_base`] compares them with the model an adapter is loaded on.

pub mod inspect;
pub mod merge;
pub mod peft;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::ggml::{GgufWriter, Type};
use crate::gguf::GgufFile;
use crate::model::{LoraSet, ModuleId, Target};

/// Why an adapter could not be read, written, converted or merged. Messages name the file,
/// tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Ggml(#[from] crate::ggml::GgmlError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{p}: {msg}", p = .0.display(), msg = .1)]
    Io(PathBuf, String),
    #[error("{p}: not a LoRA adapter: {msg}", p = .0.display(), msg = .1)]
    NotAdapter(PathBuf, String),
    #[error("{p}: {msg}", p = .0.display(), msg = .1)]
    Invalid(PathBuf, String),
    #[error("{p}: tensor '{tensor}' has type {dtype}; adapters must be f32, f16, bf16 or q8_0", p = .path.display())]
    Dtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{p}: '{tensor}' has no {missing} (every LoRA module needs both halves)", p = .path.display())]
    MissingHalf { path: PathBuf, tensor: String, missing: &'static str },
    #[error("{a}: the adapter is for architecture '{adapter}' but the base model {b} is '{base}'", a = .path.display(), b = .base_path.display())]
    Architecture { path: PathBuf, adapter: String, base: String, base_path: PathBuf },
    #[error("{p}: '{tensor}': {msg} (is this adapter for another base model?)", p = .path.display())]
    Shape { path: PathBuf, tensor: String, msg: String },
    /// The adapter records another base model and the policy is [`BaseMismatch::Refuse`].
    #[error("{0}")]
    OtherBase(String),
}

fn io(p: &Path, e: impl ToString) -> AdapterError {
    AdapterError::Io(p.to_path_buf(), e.to_string())
}

/// Element type of the tensors of a written adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterDtype {
    F32,
    F16,
    /// 8-bit blocks (Q8_0) where a tensor's rows are a multiple of 32 values (lora_a, and
    /// lora_b at ranks that are multiples of 32), F16 otherwise: the smallest adapter that
    /// keeps its effect (serving reads every adapter byte per token, so size is decode time).
    #[value(name = "q8_0")]
    Q8_0,
}

/// Where an adapter came from: recorded in the files grit writes (all optional when reading
/// files made elsewhere).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Provenance {
    /// The base model's `general.name`.
    pub base_name: Option<String>,
    /// sha256 (hex) of the base model file.
    pub base_sha256: Option<String>,
    /// Size of the base model file in bytes.
    pub base_size: Option<u64>,
    /// The base model's file name (informative only).
    pub base_file: Option<String>,
    /// Attention heads and KV heads of the base (for the llama q/k row permutation).
    pub n_head: Option<u32>,
    pub n_head_kv: Option<u32>,
    /// `lora`, `grit`, or `peft` for imported adapters.
    pub method: Option<String>,
    /// The training configuration (TOML), or the PEFT config an adapter was imported from.
    pub hparams: Option<String>,
    /// grit's version when the file was written.
    pub grit_version: Option<String>,
}

impl Provenance {
    /// The provenance of an adapter for the base model `base` (name, sha256, size, heads).
    pub fn for_base(
        base: &Path,
        method: &str,
        hparams: Option<String>,
    ) -> Result<Self, AdapterError> {
        let f = GgufFile::open(base)?;
        let arch = f.architecture()?;
        let sha = base_sha256(base)?;
        Ok(Provenance {
            base_name: f.get_str("general.name").ok(),
            base_sha256: Some(sha),
            base_size: Some(f.file_len()),
            base_file: base.file_name().map(|n| n.to_string_lossy().into_owned()),
            n_head: f.get_u64(&format!("{arch}.attention.head_count")).ok().map(|v| v as u32),
            n_head_kv: f
                .get_u64(&format!("{arch}.attention.head_count_kv"))
                .or_else(|_| f.get_u64(&format!("{arch}.attention.head_count")))
                .ok()
                .map(|v| v as u32),
            method: Some(method.to_string()),
            hparams,
            grit_version: Some(crate::VERSION.to_string()),
        })
    }

    /// Key/value pairs as written into GGUF metadata and PEFT safetensors metadata.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        let mut push = |k: &'static str, x: &Option<String>| {
            if let Some(x) = x {
                v.push((k, x.clone()));
            }
        };
        push(KEY_BASE_NAME, &self.base_name);
        push(KEY_BASE_SHA256, &self.base_sha256);
        push(KEY_BASE_FILE, &self.base_file);
        push(KEY_METHOD, &self.method);
        push(KEY_HPARAMS, &self.hparams);
        push(KEY_VERSION, &self.grit_version);
        push(KEY_BASE_SIZE, &self.base_size.map(|x| x.to_string()));
        push(KEY_N_HEAD, &self.n_head.map(|x| x.to_string()));
        push(KEY_N_HEAD_KV, &self.n_head_kv.map(|x| x.to_string()));
        v
    }

    /// Reads the pairs back (unknown keys ignored, malformed numbers dropped).
    fn from_pairs<'a>(mut get: impl FnMut(&str) -> Option<String> + 'a) -> Self {
        Provenance {
            base_name: get(KEY_BASE_NAME),
            base_sha256: get(KEY_BASE_SHA256),
            base_size: get(KEY_BASE_SIZE).and_then(|s| s.parse().ok()),
            base_file: get(KEY_BASE_FILE),
            n_head: get(KEY_N_HEAD).and_then(|s| s.parse().ok()),
            n_head_kv: get(KEY_N_HEAD_KV).and_then(|s| s.parse().ok()),
            method: get(KEY_METHOD),
            hparams: get(KEY_HPARAMS),
            grit_version: get(KEY_VERSION),
        }
    }
}

const KEY_BASE_NAME: &str = "grit.base.name";
const KEY_BASE_SHA256: &str = "grit.base.sha256";
const KEY_BASE_SIZE: &str = "grit.base.size";
const KEY_BASE_FILE: &str = "grit.base.file";
const KEY_N_HEAD: &str = "grit.base.head_count";
const KEY_N_HEAD_KV: &str = "grit.base.head_count_kv";
const KEY_METHOD: &str = "grit.method";
const KEY_HPARAMS: &str = "grit.hparams";
const KEY_VERSION: &str = "grit.version";
/// Set when the scales were multiplied into B (alpha = 0 in the file).
const KEY_SCALE_FOLDED: &str = "grit.scale_folded";

/// sha256 of a model file. A `<file>.sha256` stamp written by `grit fetch` (hash, size,
/// mtime) is trusted while size and mtime still match; otherwise the file is hashed.
pub fn base_sha256(path: &Path) -> Result<String, AdapterError> {
    let mut stamp = path.as_os_str().to_owned();
    stamp.push(".sha256");
    if let (Ok(s), Ok(m)) = (std::fs::read_to_string(PathBuf::from(stamp)), std::fs::metadata(path))
    {
        let f: Vec<&str> = s.split_whitespace().collect();
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos().to_string());
        if f.len() == 3
            && f[0].len() == 64
            && f[1] == m.len().to_string()
            && Some(f[2].to_string()) == mtime
        {
            return Ok(f[0].to_string());
        }
    }
    crate::fetch::sha256_file(path).map_err(|e| io(path, e))
}

/// One adapted module: the base tensor it adapts, A, B and the scale applied at inference.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    /// The adapted base tensor, e.g. `blk.3.attn_q.weight`.
    pub base: String,
    /// Layer and target when `base` is one of grit's targets (`blk.N.<target>.weight`).
    pub layer: Option<usize>,
    pub target: Option<Target>,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// The scale s of W·x + s·B·(A·x).
    pub scale: f32,
    /// A: r rows of d_in values.
    pub a: Vec<f32>,
    /// B: d_out rows of r values.
    pub b: Vec<f32>,
    /// The element type the tensors were stored with (`f32`, `f16`, `bf16`).
    pub dtype: String,
}

impl AdapterModule {
    pub fn n_params(&self) -> usize {
        self.rank * (self.d_in + self.d_out)
    }
}

/// A LoRA adapter in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// `general.architecture` of the base model.
    pub arch: String,
    pub modules: Vec<AdapterModule>,
    pub provenance: Provenance,
    /// Where it was read from (for messages).
    pub source: Option<PathBuf>,
    /// The file's `adapter.lora.alpha` (GGUF) when it was read from one.
    pub file_alpha: Option<f32>,
    /// The scales were folded into B in the file this was read from.
    pub scale_folded: bool,
}

impl Adapter {
    /// Total parameters (Σ r·(d_in + d_out)).
    pub fn n_params(&self) -> usize {
        self.modules.iter().map(AdapterModule::n_params).sum()
    }

    fn path_or(&self, fallback: &str) -> PathBuf {
        self.source.clone().unwrap_or_else(|| PathBuf::from(fallback))
    }

    /// The adapter held by `lora` (values read from its backend buffer), for a base model of
    /// architecture `arch`.
    pub fn from_lora_set(
        lora: &LoraSet,
        arch: &str,
        provenance: Provenance,
    ) -> Result<Self, AdapterError> {
        let mut modules = Vec::with_capacity(lora.modules().len());
        for (i, m) in lora.modules().iter().enumerate() {
            modules.push(AdapterModule {
                base: m.base_name(),
                layer: Some(m.layer),
                target: Some(m.target),
                rank: m.rank,
                d_in: m.d_in,
                d_out: m.d_out,
                scale: m.scale,
                a: lora.read_a(i)?,
                b: lora.read_b(i)?,
                dtype: "f32".into(),
            });
        }
        Ok(Adapter {
            arch: arch.into(),
            modules,
            provenance,
            source: None,
            file_alpha: None,
            scale_folded: false,
        })
    }

    /// A [`LoraSet`] over `weights` holding this adapter (ranks, scales, values), e.g. to run
    /// grit's training graph with it. Shapes are checked against the base.
    pub fn to_lora_set(
        &self,
        weights: &crate::model::Weights,
        backend: &crate::ggml::Backend,
    ) -> Result<LoraSet, AdapterError> {
        let path = self.path_or("<adapter>");
        let mut specs = Vec::with_capacity(self.modules.len());
        for m in &self.modules {
            let (Some(layer), Some(target)) = (m.layer, m.target) else {
                return Err(AdapterError::Invalid(
                    path,
                    format!("'{}' is not a module grit's training graph adapts", m.base),
                ));
            };
            specs.push((layer, target, m.rank, m.scale));
        }
        let set = LoraSet::with_modules(weights, &specs, backend)?;
        for (i, (m, lm)) in self.modules.iter().zip(set.modules()).enumerate() {
            if (lm.d_in, lm.d_out) != (m.d_in, m.d_out) {
                return Err(AdapterError::Shape {
                    path: path.clone(),
                    tensor: m.base.clone(),
                    msg: format!(
                        "adapter is {}×{} (d_in×d_out) but the base tensor is {}×{}",
                        m.d_in, m.d_out, lm.d_in, lm.d_out
                    ),
                });
            }
            set.write_a(i, &m.a)?;
            set.write_b(i, &m.b)?;
        }
        Ok(set)
    }

    /// Checks that this adapter fits the base model `base`: same architecture, every adapted
    /// tensor present with matching shape.
    pub fn check_fits(&self, base: &GgufFile) -> Result<(), AdapterError> {
        let arch = base.architecture()?;
        if arch != self.arch {
            return Err(AdapterError::Architecture {
                path: self.path_or("<adapter>"),
                adapter: self.arch.clone(),
                base: arch,
                base_path: base.path().into(),
            });
        }
        let path = self.path_or("<adapter>");
        for m in &self.modules {
            let t = base.tensor(&m.base).ok_or_else(|| AdapterError::Shape {
                path: path.clone(),
                tensor: m.base.clone(),
                msg: format!("the base model {} has no such tensor", base.path().display()),
            })?;
            if t.ne[0] as usize != m.d_in
                || t.ne[1] as usize != m.d_out
                || t.ne[2] > 1
                || t.ne[3] > 1
            {
                return Err(AdapterError::Shape {
                    path: path.clone(),
                    tensor: m.base.clone(),
                    msg: format!(
                        "adapter is {}×{} (d_in×d_out) but the base tensor is {}×{}",
                        m.d_in, m.d_out, t.ne[0], t.ne[1]
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads a GGUF LoRA adapter (llama.cpp's format; f32, f16 or bf16 tensors).
    pub fn read_gguf(path: &Path) -> Result<Self, AdapterError> {
        let f = GgufFile::open(path)?;
        let (arch, alpha) = adapter_header(&f, path)?;
        let mut file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        let mut read = |name: &str| read_adapter_tensor(&f, &mut file, path, name);
        let mut modules = Vec::new();
        let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
        for name in &names {
            if let Some(base) = name.strip_suffix(".lora_b") {
                if !names.iter().any(|n| n == &format!("{base}.lora_a")) {
                    return Err(AdapterError::MissingHalf {
                        path: path.into(),
                        tensor: base.into(),
                        missing: "lora_a",
                    });
                }
                continue;
            }
            let Some(base) = name.strip_suffix(".lora_a") else {
                return Err(AdapterError::Invalid(
                    path.into(),
                    format!("tensor '{name}' is neither a .lora_a nor a .lora_b"),
                ));
            };
            let bname = format!("{base}.lora_b");
            if !names.contains(&bname) {
                return Err(AdapterError::MissingHalf {
                    path: path.into(),
                    tensor: base.into(),
                    missing: "lora_b",
                });
            }
            // Shapes first, from the tensor infos: nothing is read from a file whose tensors
            // do not form a [d_in, r]·[r, d_out] pair.
            let (rank, d_in, d_out) = pair_shape(&f, path, base, name, &bname)?;
            let (a, adt) = read(name)?;
            let (b, bdt) = read(&bname)?;
            let id = ModuleId::parse(base);
            let (layer, target) = (id.map(|m| m.layer), id.map(|m| m.target));
            modules.push(AdapterModule {
                base: base.into(),
                layer,
                target,
                rank,
                d_in,
                d_out,
                // llama.cpp's rule: alpha/r of this pair, or 1 when alpha is 0.
                scale: if alpha != 0.0 { alpha / rank as f32 } else { 1.0 },
                a,
                b,
                dtype: if adt == bdt { adt } else { format!("{adt}/{bdt}") },
            });
        }
        if modules.is_empty() {
            return Err(AdapterError::NotAdapter(
                path.into(),
                "it holds no .lora_a/.lora_b tensors".into(),
            ));
        }
        let provenance = Provenance::from_pairs(|k| match f.get(k)? {
            crate::gguf::Value::Str(s) => Some(s),
            v => Some(v.to_string()),
        });
        let scale_folded = matches!(f.get(KEY_SCALE_FOLDED), Some(crate::gguf::Value::Bool(true)));
        let adapter = Adapter {
            arch,
            modules,
            provenance,
            source: Some(path.into()),
            file_alpha: Some(alpha),
            scale_folded,
        };
        adapter.check_values()?;
        Ok(adapter)
    }

    /// Checks what a reader cannot see in the shapes: every scale and every value of A and B
    /// finite (one NaN or Inf turns every output of the adapted layer into garbage).
    pub fn check_values(&self) -> Result<(), AdapterError> {
        let path = self.path_or("<adapter>");
        for m in &self.modules {
            if !m.scale.is_finite() {
                return Err(AdapterError::Invalid(
                    path,
                    format!("'{}' has scale {} (alpha/r); it must be finite", m.base, m.scale),
                ));
            }
            for (half, values) in [("lora_a", &m.a), ("lora_b", &m.b)] {
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    let what = format!(
                        "'{}' {half} holds {} at element {i}; an adapter's values must be finite",
                        m.base, values[i]
                    );
                    return Err(AdapterError::Invalid(path, what));
                }
            }
        }
        Ok(())
    }

    /// The global alpha that reproduces every module's scale exactly as llama.cpp computes it
    /// (alpha/r in f32), if there is one.
    pub fn uniform_alpha(&self) -> Option<f32> {
        let first = self.modules.first()?;
        let alpha = first.scale * first.rank as f32;
        (alpha != 0.0
            && alpha.is_finite()
            && self.modules.iter().all(|m| alpha / m.rank as f32 == m.scale))
        .then_some(alpha)
    }

    /// Writes the adapter in llama.cpp's GGUF LoRA format, atomically (temporary sibling,
    /// rename). See the module docs for how scales are carried.
    pub fn write_gguf(&self, path: &Path, dtype: AdapterDtype) -> Result<(), AdapterError> {
        for m in &self.modules {
            if m.a.len() != m.rank * m.d_in || m.b.len() != m.d_out * m.rank || m.rank == 0 {
                return Err(AdapterError::Shape {
                    path: path.into(),
                    tensor: m.base.clone(),
                    msg: format!(
                        "A holds {} and B {} values for rank {} and {}×{}",
                        m.a.len(),
                        m.b.len(),
                        m.rank,
                        m.d_in,
                        m.d_out
                    ),
                });
            }
        }
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", &self.arch);
        w.set_str("general.type", "adapter");
        w.set_str("general.name", "grit LoRA adapter");
        w.set_str("adapter.type", "lora");
        let all_one = self.modules.iter().all(|m| m.scale == 1.0);
        let (alpha, fold) = match self.uniform_alpha() {
            Some(a) if !all_one => (a, false),
            _ => (0.0, !all_one),
        };
        w.set_f32("adapter.lora.alpha", alpha);
        w.set_bool(KEY_SCALE_FOLDED, fold || self.scale_folded);
        for (k, v) in self.provenance.pairs() {
            w.set_str(k, &v);
        }
        // Element type of a tensor with rows of `n` values.
        let ty = |n: usize| match dtype {
            AdapterDtype::F32 => Type::F32,
            AdapterDtype::F16 => Type::F16,
            AdapterDtype::Q8_0 if n.is_multiple_of(32) => Type::Q8_0,
            AdapterDtype::Q8_0 => Type::F16,
        };
        for m in &self.modules {
            let b: Vec<f32> =
                if fold { m.b.iter().map(|x| x * m.scale).collect() } else { m.b.clone() };
            let (ta, tb) = (ty(m.d_in), ty(m.rank));
            w.add_tensor(
                &format!("{}.lora_a", m.base),
                ta,
                &[m.d_in as i64, m.rank as i64],
                crate::ggml::quantize(ta, &m.a, m.d_in)?,
            )?;
            w.add_tensor(
                &format!("{}.lora_b", m.base),
                tb,
                &[m.rank as i64, m.d_out as i64],
                crate::ggml::quantize(tb, &b, m.rank)?,
            )?;
        }
        Ok(w.write_atomic(path)?)
    }
}

/// An adapter GGUF's header: `general.type = adapter`, `adapter.type = lora`, the base
/// architecture and a finite `adapter.lora.alpha` (0 when absent).
fn adapter_header(f: &GgufFile, path: &Path) -> Result<(String, f32), AdapterError> {
    let ty = f.get_str("general.type").unwrap_or_default();
    if ty != "adapter" {
        return Err(AdapterError::NotAdapter(
            path.into(),
            format!("general.type is '{ty}', expected 'adapter'"),
        ));
    }
    let aty = f.get_str("adapter.type").unwrap_or_default();
    if aty != "lora" {
        return Err(AdapterError::NotAdapter(
            path.into(),
            format!("adapter.type is '{aty}', expected 'lora'"),
        ));
    }
    let arch = f.architecture()?;
    let alpha = match f.get("adapter.lora.alpha") {
        None => 0.0,
        Some(crate::gguf::Value::F64(v)) => v as f32,
        Some(v) => {
            return Err(AdapterError::Invalid(
                path.into(),
                format!("adapter.lora.alpha is {v}, expected a float32"),
            ))
        }
    };
    if !alpha.is_finite() {
        return Err(AdapterError::Invalid(
            path.into(),
            format!("adapter.lora.alpha is {alpha}, expected a finite number"),
        ));
    }
    Ok((arch, alpha))
}

/// One adapter tensor, dequantized to f32, with its type's name (f32, f16, bf16 or q8_0).
fn read_adapter_tensor(
    f: &GgufFile,
    file: &mut std::fs::File,
    path: &Path,
    name: &str,
) -> Result<(Vec<f32>, String), AdapterError> {
    let t = f
        .tensor(name)
        .ok_or_else(|| AdapterError::Invalid(path.into(), format!("no tensor '{name}'")))?;
    let ty = Type(t.ggml_type);
    if ![Type::F32, Type::F16, Type::BF16, Type::Q8_0].contains(&ty) {
        return Err(AdapterError::Dtype {
            path: path.into(),
            tensor: name.into(),
            dtype: t.type_name(),
        });
    }
    let mut bytes = vec![0u8; t.size as usize];
    file.seek(SeekFrom::Start(f.data_offset() + t.offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| io(path, e))?;
    let n = t.n_elements() as usize;
    let bytes = &bytes[..ty.row_size(n).unwrap_or(bytes.len()).min(bytes.len())];
    Ok((crate::ggml::dequantize(ty, bytes, n)?, t.type_name()))
}

/// (rank, d_in, d_out) of the pair `a_name` [d_in, r] · `b_name` [r, d_out], from the tensor
/// infos alone; anything else (more dimensions, mismatched or zero sizes) is refused.
fn pair_shape(
    f: &GgufFile,
    path: &Path,
    base: &str,
    a_name: &str,
    b_name: &str,
) -> Result<(usize, usize, usize), AdapterError> {
    let ne = |n: &str| f.tensor(n).map(|t| t.ne).unwrap_or_default();
    let (ane, bne) = (ne(a_name), ne(b_name));
    let err = |msg: String| AdapterError::Shape { path: path.into(), tensor: base.into(), msg };
    if ane[2] > 1 || ane[3] > 1 || bne[2] > 1 || bne[3] > 1 || ane[1] != bne[0] {
        return Err(err(format!(
            "lora_a {:?} and lora_b {:?} do not form a [d_in, r]·[r, d_out] pair",
            &ane[..2],
            &bne[..2]
        )));
    }
    if ane[1] == 0 || ane[0] == 0 || bne[1] == 0 {
        return Err(err(format!(
            "lora_a {:?} and lora_b {:?} hold no values (rank and sizes must be at least 1)",
            &ane[..2],
            &bne[..2]
        )));
    }
    Ok((ane[1] as usize, ane[0] as usize, bne[1] as usize))
}

/// Reads the GGUF adapter at `path` and checks it against the base model at `base`: grit's
/// own reader refuses what llama.cpp would assert on, crash on or silently compute garbage
/// with (tensors that are not 2-D pairs, other types, rank 0, NaN/Inf, a non-finite alpha),
/// and [`Adapter::check_fits`] refuses another architecture, a tensor the base lacks and a
/// shape that differs. Every path that hands an adapter file to llama.cpp calls this first.
pub fn validate_for_base(path: &Path, base: &Path) -> Result<Adapter, AdapterError> {
    let adapter = Adapter::read_gguf(path)?;
    adapter.check_fits(&GgufFile::open(base)?)?;
    Ok(adapter)
}

/// Reads an adapter from a GGUF file or a PEFT folder (`base` helps a PEFT folder that lacks
/// grit's metadata: architecture and head counts).
pub fn load_any(path: &Path, base: Option<&Path>) -> Result<Adapter, AdapterError> {
    if path.is_dir() {
        peft::read_peft(path, base)
    } else {
        Adapter::read_gguf(path)
    }
}

/// The provenance recorded in a GGUF adapter (metadata only; tensors are not read).
pub fn gguf_provenance(path: &Path) -> Result<Provenance, AdapterError> {
    let f = GgufFile::open(path)?;
    Ok(Provenance::from_pairs(|k| match f.get(k)? {
        crate::gguf::Value::Str(s) => Some(s),
        v => Some(v.to_string()),
    }))
}

/// Compares an adapter's provenance `p` (of the adapter at `adapter_path`) with the base
/// model `base` it is being applied to. Returns the differences as one message (None when
/// they agree or the adapter records nothing).
pub fn check_base(
    p: &Provenance,
    adapter_path: &Path,
    base: &Path,
) -> Result<Option<String>, AdapterError> {
    if p.base_name.is_none() && p.base_sha256.is_none() {
        return Ok(None);
    }
    let f = GgufFile::open(base)?;
    let mut diffs = Vec::new();
    let name = f.get_str("general.name").ok();
    if let Some(want) = &p.base_name {
        if name.as_deref() != Some(want.as_str()) {
            diffs.push(format!(
                "name '{}' (adapter trained on '{want}')",
                name.as_deref().unwrap_or("<none>")
            ));
        }
    }
    if let Some(want) = &p.base_sha256 {
        let size_differs = p.base_size.is_some_and(|s| s != f.file_len());
        let got = if size_differs { None } else { Some(base_sha256(base)?) };
        if got.as_deref() != Some(want.as_str()) {
            diffs.push(format!(
                "sha256 {} (adapter trained on {})",
                got.as_deref().map(short).unwrap_or("differs (other file size)"),
                short(want)
            ));
        }
    }
    Ok((!diffs.is_empty()).then(|| {
        format!(
            "{a}: adapter made for another base model: {b} has {d}",
            a = adapter_path.display(),
            b = base.display(),
            d = diffs.join(", ")
        )
    }))
}

/// What to do with an adapter whose recorded base model differs from the model it is applied
/// to: warn (the default: a fine-tune of the same weights under another name still works) or
/// refuse (`--strict`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BaseMismatch {
    #[default]
    Warn,
    Refuse,
}

/// [`check_base`] under a policy: `Ok(None)` when the adapter's recorded base agrees with
/// `base` (or it records none), `Ok(Some(warning))` for the caller to report, and
/// [`AdapterError::OtherBase`] when the policy refuses. Every command and the server use this.
pub fn check_provenance(
    p: &Provenance,
    adapter_path: &Path,
    base: &Path,
    policy: BaseMismatch,
) -> Result<Option<String>, AdapterError> {
    match (check_base(p, adapter_path, base)?, policy) {
        (Some(msg), BaseMismatch::Refuse) => Err(AdapterError::OtherBase(msg)),
        (other, _) => Ok(other),
    }
}

/// [`validate_for_base`], then [`check_provenance`] under `policy`: the validated adapter and
/// a warning to report, if any (what `grit serve` does with each adapter it loads).
pub fn validate_with_provenance(
    path: &Path,
    base: &Path,
    policy: BaseMismatch,
) -> Result<(Adapter, Option<String>), AdapterError> {
    let adapter = validate_for_base(path, base)?;
    let warning = check_provenance(&adapter.provenance, path, base, policy)?;
    Ok((adapter, warning))
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(ranks: &[usize], scales: &[f32]) -> Adapter {
        let mut modules = Vec::new();
        for (i, (&r, &s)) in ranks.iter().zip(scales).enumerate() {
            let (d_in, d_out) = (8, if i % 2 == 0 { 8 } else { 4 });
            let target = if i % 2 == 0 { Target::AttnQ } else { Target::AttnK };
            let layer = i / 2;
            modules.push(AdapterModule {
                base: format!("blk.{layer}.{}.weight", target.name()),
                layer: Some(layer),
                target: Some(target),
                rank: r,
                d_in,
                d_out,
                scale: s,
                a: (0..r * d_in).map(|k| ((k * 7 + i) as f32 * 0.37).sin()).collect(),
                b: (0..r * d_out).map(|k| ((k * 3 + i) as f32 * 0.11).cos() * 0.1).collect(),
                dtype: "f32".into(),
            });
        }
        Adapter {
            arch: "llama".into(),
            modules,
            provenance: Provenance::default(),
            source: None,
            file_alpha: None,
            scale_folded: false,
        }
    }

    #[test]
    fn base_names() {
        let id = ModuleId { layer: 12, target: Target::FfnDown };
        assert_eq!(ModuleId::parse("blk.12.ffn_down.weight"), Some(id));
        assert_eq!(id.to_string(), "blk.12.ffn_down.weight");
        assert_eq!(ModuleId::parse("output.weight"), None);
        assert_eq!(ModuleId::parse("blk.x.attn_q.weight"), None);
        assert!(id < ModuleId { layer: 13, target: Target::AttnQ });
        assert!(
            ModuleId { layer: 2, target: Target::AttnQ }
                < ModuleId { layer: 2, target: Target::FfnDown }
        );
    }

    #[test]
    fn gguf_round_trip_uniform_alpha_keeps_b() {
        let dir = tempfile::tempdir().unwrap();
        let a = sample(&[4, 4, 4, 4], &[2.0, 2.0, 2.0, 2.0]);
        let p = dir.path().join("a.gguf");
        a.write_gguf(&p, AdapterDtype::F32).unwrap();
        let b = Adapter::read_gguf(&p).unwrap();
        assert_eq!(b.file_alpha, Some(8.0));
        for (x, y) in a.modules.iter().zip(&b.modules) {
            assert_eq!((x.rank, x.scale, &x.a, &x.b), (y.rank, y.scale, &y.a, &y.b));
        }
    }

    #[test]
    fn mixed_ranks_fold_the_scale_into_b() {
        let dir = tempfile::tempdir().unwrap();
        // GRIT after a cut: scale of the initial rank 8 (alpha 16) on ranks 8, 3, 5, 1.
        let a = sample(&[8, 3, 5, 1], &[2.0, 2.0, 2.0, 2.0]);
        assert_eq!(a.uniform_alpha(), None);
        let p = dir.path().join("a.gguf");
        a.write_gguf(&p, AdapterDtype::F32).unwrap();
        let b = Adapter::read_gguf(&p).unwrap();
        assert_eq!(b.file_alpha, Some(0.0));
        assert!(b.scale_folded);
        for (x, y) in a.modules.iter().zip(&b.modules) {
            assert_eq!(y.scale, 1.0);
            assert_eq!(x.a, y.a);
            let want: Vec<f32> = x.b.iter().map(|v| v * x.scale).collect();
            assert_eq!(want, y.b);
        }
        // F16 output: values rounded to f16.
        let p16 = dir.path().join("a16.gguf");
        a.write_gguf(&p16, AdapterDtype::F16).unwrap();
        let c = Adapter::read_gguf(&p16).unwrap();
        assert_eq!(c.modules[0].dtype, "f16");
        let err = a.modules[0]
            .a
            .iter()
            .zip(&c.modules[0].a)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-3 && err > 0.0, "{err}");
    }

    #[test]
    fn missing_half_and_bad_dtype_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("half.gguf");
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.set_str("general.type", "adapter");
        w.set_str("adapter.type", "lora");
        w.set_f32("adapter.lora.alpha", 0.0);
        w.add_f32("blk.0.attn_q.weight.lora_a", &[8, 2], &[0.0; 16]).unwrap();
        w.write(&p).unwrap();
        let e = Adapter::read_gguf(&p).unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_q.weight") && e.contains("lora_b"), "{e}");

        let p = dir.path().join("q.gguf");
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.set_str("general.type", "adapter");
        w.set_str("adapter.type", "lora");
        w.add_tensor(
            "blk.0.attn_q.weight.lora_a",
            Type::Q4_0,
            &[32, 2],
            crate::ggml::quantize(Type::Q4_0, &[0.5; 64], 32).unwrap(),
        )
        .unwrap();
        w.add_f32("blk.0.attn_q.weight.lora_b", &[2, 4], &[0.0; 8]).unwrap();
        w.write(&p).unwrap();
        let e = Adapter::read_gguf(&p).unwrap_err().to_string();
        assert!(e.contains("q4_0") && e.contains("lora_a"), "{e}");
    }
}
