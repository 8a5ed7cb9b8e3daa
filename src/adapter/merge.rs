//! `grit merge`: W' = W + k·s·B·A for every adapted tensor (k the user's `--scale`, s the
//! module's scale), re-quantized as asked; every other tensor and all metadata are copied
//! unchanged, so the result is a standalone model llama.cpp (or grit) loads like the base.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{io, Adapter, AdapterError};
use crate::ggml::{GgufWriter, Type};
use crate::gguf::GgufFile;

/// The element type of merged tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MergeType {
    /// Each merged tensor keeps its base type (re-quantized after the merge).
    Same,
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    Q4K,
}

impl MergeType {
    fn ggml(self, base: Type) -> Type {
        match self {
            MergeType::Same => base,
            MergeType::F32 => Type::F32,
            MergeType::F16 => Type::F16,
            MergeType::Q8_0 => Type::Q8_0,
            MergeType::Q4_0 => Type::Q4_0,
            MergeType::Q4_1 => Type::Q4_1,
            MergeType::Q4K => Type::Q4_K,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeReport {
    pub merged_tensors: usize,
    pub copied_tensors: usize,
    /// Tensors not adapted but converted to the output type (`--convert-all`).
    pub converted_tensors: usize,
    /// Type of the merged tensors (by tensor type name → count).
    pub merged_types: std::collections::BTreeMap<String, usize>,
    pub bytes: u64,
}

fn read_bytes(file: &mut std::fs::File, g: &GgufFile, name: &str) -> Result<Vec<u8>, AdapterError> {
    let t = g
        .tensor(name)
        .ok_or_else(|| AdapterError::Invalid(g.path().into(), format!("no tensor '{name}'")))?;
    let mut bytes = vec![0u8; t.size as usize];
    file.seek(SeekFrom::Start(g.data_offset() + t.offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| io(g.path(), e))?;
    Ok(bytes)
}

/// Adds k·s·B·A to `w` (d_out rows of d_in values).
fn add_delta(w: &mut [f32], a: &[f32], b: &[f32], rank: usize, d_in: usize, k: f32) {
    let mut row = vec![0f32; d_in];
    for (o, wrow) in w.chunks_exact_mut(d_in).enumerate() {
        row.iter_mut().for_each(|x| *x = 0.0);
        for r in 0..rank {
            let c = b[o * rank + r];
            if c != 0.0 {
                for (x, &av) in row.iter_mut().zip(&a[r * d_in..(r + 1) * d_in]) {
                    *x += c * av;
                }
            }
        }
        for (x, d) in wrow.iter_mut().zip(&row) {
            *x += k * d;
        }
    }
}

/// Merges `adapter` at `scale` into the model `base` and writes `out` atomically.
/// With `convert_all`, every other matrix (2-D tensor) is converted to `ty` as well.
pub fn merge(
    base: &Path,
    adapter: &Adapter,
    scale: f32,
    ty: MergeType,
    convert_all: bool,
    out: &Path,
) -> Result<MergeReport, AdapterError> {
    if !scale.is_finite() {
        return Err(AdapterError::Invalid(
            base.into(),
            format!("--scale {scale} is not a finite number"),
        ));
    }
    let g = GgufFile::open(base)?;
    adapter.check_fits(&g)?;
    let mut w = GgufWriter::new();
    w.copy_keys_from(base, |_| true)?;
    w.set_str(
        "grit.merged.adapter",
        &adapter.source.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
    );
    if let Some(src) = adapter.source.as_deref().filter(|p| p.is_file()) {
        w.set_str(
            "grit.merged.adapter_sha256",
            &crate::fetch::sha256_file(src).map_err(|e| io(src, e))?,
        );
    }
    w.set_f32("grit.merged.scale", scale);
    w.set_u32("grit.merged.modules", adapter.modules.len() as u32);
    w.set_str("grit.merged.type", &format!("{ty:?}").to_lowercase());
    if let Some(m) = &adapter.provenance.method {
        w.set_str("grit.method", m);
    }
    w.set_str("grit.version", crate::VERSION);
    let mut file = std::fs::File::open(base).map_err(|e| io(base, e))?;
    let mut rep = MergeReport {
        merged_tensors: 0,
        copied_tensors: 0,
        converted_tensors: 0,
        merged_types: Default::default(),
        bytes: 0,
    };
    for t in g.tensors() {
        let bytes = read_bytes(&mut file, &g, &t.name)?;
        let Some(m) = adapter.modules.iter().find(|m| m.base == t.name) else {
            let (src, dst) = (Type(t.ggml_type), ty.ggml(Type(t.ggml_type)));
            if convert_all && t.ne[1] > 1 && t.ne[2] <= 1 && src != dst {
                if !src.can_dequantize() && src != Type::F32 {
                    return Err(AdapterError::Dtype {
                        path: base.into(),
                        tensor: t.name.clone(),
                        dtype: t.type_name(),
                    });
                }
                let v = crate::ggml::dequantize(src, &bytes, t.n_elements() as usize)?;
                let q = crate::ggml::quantize(dst, &v, t.ne[0] as usize).map_err(|e| {
                    AdapterError::Invalid(
                        base.into(),
                        format!("tensor '{}': {e}; choose another --type", t.name),
                    )
                })?;
                w.add_tensor(&t.name, dst, &t.ne, q)?;
                rep.converted_tensors += 1;
                continue;
            }
            w.add_tensor(&t.name, Type(t.ggml_type), &t.ne, bytes)?;
            rep.copied_tensors += 1;
            continue;
        };
        let base_ty = Type(t.ggml_type);
        if !base_ty.can_dequantize() && base_ty != Type::F32 {
            return Err(AdapterError::Dtype {
                path: base.into(),
                tensor: t.name.clone(),
                dtype: t.type_name(),
            });
        }
        let n = t.n_elements() as usize;
        let mut wv = crate::ggml::dequantize(base_ty, &bytes, n)?;
        add_delta(&mut wv, &m.a, &m.b, m.rank, m.d_in, scale * m.scale);
        let out_ty = ty.ggml(base_ty);
        let q = crate::ggml::quantize(out_ty, &wv, m.d_in).map_err(|e| {
            AdapterError::Invalid(
                base.into(),
                format!("tensor '{}' ({}×{}): {e}; choose another --type", t.name, m.d_in, m.d_out),
            )
        })?;
        *rep.merged_types.entry(out_ty.name()).or_default() += 1;
        w.add_tensor(&t.name, out_ty, &t.ne, q)?;
        rep.merged_tensors += 1;
    }
    w.write_atomic(out)?;
    rep.bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_b_times_a() {
        // d_in 3, d_out 2, rank 2.
        let a = [1., 2., 3., 4., 5., 6.]; // rows of A: [1 2 3], [4 5 6]
        let b = [1., 0., 0.5, 2.]; // rows of B: [1 0], [0.5 2]
        let mut w = vec![0f32; 6];
        add_delta(&mut w, &a, &b, 2, 3, 2.0);
        assert_eq!(w, vec![2., 4., 6., 2.0 * (0.5 + 8.0), 2.0 * (1.0 + 10.0), 2.0 * (1.5 + 12.0)]);
    }
}
