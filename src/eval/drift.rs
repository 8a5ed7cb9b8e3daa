//! Weight-space drift of an adapter: per module ‖s·B·A‖_F (the norm of the weight update the
//! adapter adds), read from a llama.cpp LoRA GGUF; and checkpoints turned into such files.

use std::collections::BTreeMap;
use std::path::Path;

use super::EvalError;
use crate::adapter::Adapter;
use crate::train::checkpoint::Checkpoint;

/// One adapted module of an adapter file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleDrift {
    /// The adapted base tensor, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// ‖s·B·A‖_F, with s the scale llama.cpp applies (alpha/r, or 1 when alpha is 0) times
    /// the user's adapter scale.
    pub norm: f64,
}

/// Drift of a whole adapter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdapterDrift {
    pub modules: Vec<ModuleDrift>,
}

impl AdapterDrift {
    /// √Σ ‖ΔW_m‖²_F.
    pub fn total(&self) -> f64 {
        self.modules.iter().map(|m| m.norm * m.norm).sum::<f64>().sqrt()
    }
    /// Σ r_m·(d_in + d_out).
    pub fn params(&self) -> usize {
        self.modules.iter().map(|m| m.rank * (m.d_in + m.d_out)).sum()
    }
    pub fn per_module(&self) -> BTreeMap<String, f64> {
        self.modules.iter().map(|m| (m.name.clone(), m.norm)).collect()
    }
}

/// ‖s·B·A‖_F for A (r × d_in, row-major) and B (d_out × r, row-major), through the r×r
/// Gram matrices: ‖BA‖² = Σ_jk (BᵀB)_jk (AAᵀ)_kj.
pub fn update_norm(a: &[f32], b: &[f32], r: usize, d_in: usize, d_out: usize, s: f64) -> f64 {
    let mut ga = vec![0f64; r * r];
    let mut gb = vec![0f64; r * r];
    for j in 0..r {
        for k in j..r {
            let x: f64 = (0..d_in).map(|c| a[j * d_in + c] as f64 * a[k * d_in + c] as f64).sum();
            ga[j * r + k] = x;
            ga[k * r + j] = x;
            let y: f64 = (0..d_out).map(|o| b[o * r + j] as f64 * b[o * r + k] as f64).sum();
            gb[j * r + k] = y;
            gb[k * r + j] = y;
        }
    }
    let sq: f64 = ga.iter().zip(&gb).map(|(x, y)| x * y).sum();
    s.abs() * sq.max(0.0).sqrt()
}

/// The drift of every module of `adapter` at the user's scale (times each module's alpha/r).
pub fn adapter_drift(adapter: &Adapter, user_scale: f32) -> AdapterDrift {
    let mut modules: Vec<ModuleDrift> = adapter
        .modules
        .iter()
        .map(|m| ModuleDrift {
            // A is [r × d_in] and B [d_out × r], row-major, as in the GGUF file.
            norm: update_norm(
                &m.a,
                &m.b,
                m.rank,
                m.d_in,
                m.d_out,
                m.scale as f64 * user_scale as f64,
            ),
            name: m.base.clone(),
            rank: m.rank,
            d_in: m.d_in,
            d_out: m.d_out,
        })
        .collect();
    modules.sort_by_key(|x| module_order(&x.name));
    AdapterDrift { modules }
}

/// Sort key of a module name: its [`crate::model::ModuleId`] (layer, then target in graph
/// order), names that are not `blk.L.target.weight` last; then the name.
pub fn module_order(name: &str) -> (bool, Option<crate::model::ModuleId>, String) {
    let id = crate::model::ModuleId::parse(name);
    (id.is_none(), id, name.to_string())
}

/// Writes a checkpoint's adapter (A, B of every module, each with scale `scale`) as a
/// llama.cpp LoRA GGUF, atomically, through [`Adapter::write_gguf`].
pub fn checkpoint_to_gguf(
    ck: &Checkpoint,
    arch: &str,
    scale: f32,
    out: &Path,
) -> Result<(), EvalError> {
    let err = |m: String| EvalError::Adapter(out.into(), m);
    let mut modules = Vec::new();
    for t in &ck.tensors {
        let Some(base) = t.name.strip_suffix(".lora_a") else {
            continue;
        };
        let b = ck
            .tensor(&format!("{base}.lora_b"))
            .ok_or_else(|| err(format!("checkpoint step {}: {base}.lora_b is missing", ck.step)))?;
        // Checkpoint shapes (row-major): A [r, d_in], B [d_out, r].
        let (&[r, d_in], &[d_out, rb]) = (t.shape.as_slice(), b.shape.as_slice()) else {
            return Err(err(format!(
                "checkpoint step {}: {base}: unexpected shapes {:?} / {:?}",
                ck.step, t.shape, b.shape
            )));
        };
        if r != rb {
            return Err(err(format!(
                "checkpoint step {}: {base}: ranks {r} and {rb} differ",
                ck.step
            )));
        }
        let id = crate::model::ModuleId::parse(base);
        modules.push(crate::adapter::AdapterModule {
            base: base.to_string(),
            layer: id.map(|m| m.layer),
            target: id.map(|m| m.target),
            rank: r,
            d_in,
            d_out,
            scale,
            a: t.data.clone(),
            b: b.data.clone(),
            dtype: "f32".into(),
        });
    }
    if modules.is_empty() {
        return Err(err(format!("checkpoint step {} holds no adapter tensors", ck.step)));
    }
    let adapter = Adapter {
        arch: arch.to_string(),
        modules,
        provenance: Default::default(),
        source: None,
        file_alpha: None,
        scale_folded: false,
    };
    Ok(adapter.write_gguf(out, crate::adapter::AdapterDtype::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_norm_matches_the_dense_product() {
        let (r, d_in, d_out) = (3, 5, 4);
        let a: Vec<f32> = (0..r * d_in).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..d_out * r).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let mut dense = 0f64;
        for o in 0..d_out {
            for c in 0..d_in {
                let v: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * d_in + c] as f64).sum();
                dense += v * v;
            }
        }
        let got = update_norm(&a, &b, r, d_in, d_out, 2.0);
        assert!((got - 2.0 * dense.sqrt()).abs() < 1e-9 * got, "{got} vs {}", 2.0 * dense.sqrt());
    }

    #[test]
    fn modules_sort_by_layer_then_target() {
        let mut v = vec!["blk.10.attn_q.weight", "blk.2.ffn_down.weight", "blk.2.attn_q.weight"];
        v.sort_by_key(|n| module_order(n));
        assert_eq!(v, vec!["blk.2.attn_q.weight", "blk.2.ffn_down.weight", "blk.10.attn_q.weight"]);
    }

    #[test]
    fn checkpoints_round_trip_through_gguf() {
        use crate::train::checkpoint::NamedTensor;
        let a = NamedTensor {
            name: "blk.0.attn_q.weight.lora_a".into(),
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        let b = NamedTensor {
            name: "blk.0.attn_q.weight.lora_b".into(),
            shape: vec![4, 2],
            data: vec![0.5; 8],
        };
        let ck =
            Checkpoint { step: 7, tensors: vec![a.clone(), b.clone()], state: Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ck.gguf");
        checkpoint_to_gguf(&ck, "llama", 2.0, &p).unwrap();
        let d = adapter_drift(&Adapter::read_gguf(&p).unwrap(), 1.0);
        assert_eq!(d.modules.len(), 1);
        assert_eq!((d.modules[0].rank, d.modules[0].d_in, d.modules[0].d_out), (2, 3, 4));
        assert_eq!(d.params(), 2 * 7);
        let want = update_norm(&a.data, &b.data, 2, 3, 4, 2.0);
        assert!((d.total() - want).abs() < 1e-9 * want);
    }
}
