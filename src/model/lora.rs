//! LoRA adapter parameters: per target module an A [d_in, r] and a B [r, d_out] (ggml shapes,
//! llama.cpp's adapter layout) and a scale s, so that the module computes W0·x + s·B·(A·x).

use std::collections::HashMap;

use crate::ggml::{Backend, Capacity, Context, Tensor, TensorId};

use super::weights::{GateUp, Layer, Qkv, Weights};
use super::ModelError;

/// A linear module LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    AttnQ,
    AttnK,
    AttnV,
    /// The fused query/key/value projection (`attn_qkv`, PEFT's `qkv_proj`).
    AttnQkv,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl Target {
    /// Every target, in graph order (also grit's default set: every linear map of a block,
    /// see [`Target::resolve`]). On Phi-3 `ffn_up` is the fused gate/up projection.
    pub const ALL: [Target; 8] = [
        Target::AttnQ,
        Target::AttnK,
        Target::AttnV,
        Target::AttnQkv,
        Target::AttnOutput,
        Target::FfnGate,
        Target::FfnUp,
        Target::FfnDown,
    ];

    /// The GGUF tensor stem (`attn_q`, ..., `ffn_down`), also the `--targets` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Target::AttnQ => "attn_q",
            Target::AttnK => "attn_k",
            Target::AttnV => "attn_v",
            Target::AttnQkv => "attn_qkv",
            Target::AttnOutput => "attn_output",
            Target::FfnGate => "ffn_gate",
            Target::FfnUp => "ffn_up",
            Target::FfnDown => "ffn_down",
        }
    }

    /// Parses a target name; PEFT's names (q_proj, ..., down_proj, Phi-3's qkv_proj and
    /// gate_up_proj) are accepted too.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        Ok(match s.trim() {
            "attn_q" | "q_proj" => Target::AttnQ,
            "attn_k" | "k_proj" => Target::AttnK,
            "attn_v" | "v_proj" => Target::AttnV,
            "attn_qkv" | "qkv_proj" => Target::AttnQkv,
            "attn_output" | "o_proj" => Target::AttnOutput,
            "ffn_gate" | "gate_proj" => Target::FfnGate,
            "ffn_up" | "up_proj" | "gate_up_proj" => Target::FfnUp,
            "ffn_down" | "down_proj" => Target::FfnDown,
            other => {
                return Err(ModelError::Lora(format!(
                    "unknown target module '{other}' (expected one of attn_q, attn_k, attn_v, attn_qkv, attn_output, ffn_gate, ffn_up, ffn_down)"
                )))
            }
        })
    }

    /// The frozen weight this target adapts in a layer (None when the layer has no such
    /// tensor: q/k/v of a fused `attn_qkv`, `attn_qkv` of separate ones, Phi-3's gate).
    pub fn weight<T: Copy>(self, l: &Layer<T>) -> Option<T> {
        match (self, l.qkv, l.gate_up) {
            (Target::AttnQ, Qkv::Split { q, .. }, _) => Some(q),
            (Target::AttnK, Qkv::Split { k, .. }, _) => Some(k),
            (Target::AttnV, Qkv::Split { v, .. }, _) => Some(v),
            (Target::AttnQkv, Qkv::Fused { qkv, .. }, _) => Some(qkv),
            (Target::AttnOutput, ..) => Some(l.attn_output),
            (Target::FfnGate, _, GateUp::Split { gate, .. }) => Some(gate),
            (Target::FfnUp, _, GateUp::Split { up, .. } | GateUp::Fused { up }) => Some(up),
            (Target::FfnDown, ..) => Some(l.ffn_down),
            _ => None,
        }
    }

    /// The targets a request means on a block laid out like `l`, in graph order. Where the
    /// model fuses tensors the request names the fused one: `attn_q`, `attn_k` and `attn_v`
    /// together (or `attn_qkv`) adapt a fused `attn_qkv`; `attn_qkv` on separate projections
    /// adapts all three; `ffn_gate` with `ffn_up` adapts Phi-3's fused `ffn_up`. A request
    /// that would adapt more than it names (one of q/k/v of a fused tensor, the gate alone) is
    /// refused with the tensor to ask for.
    pub fn resolve<T: Copy>(requested: &[Target], l: &Layer<T>) -> Result<Vec<Target>, ModelError> {
        let has = |t: Target| requested.contains(&t);
        let mut out = std::collections::BTreeSet::new();
        for &t in requested {
            let resolved: &[Target] = match (t, l.qkv, l.gate_up) {
                (Target::AttnQ | Target::AttnK | Target::AttnV, Qkv::Fused { .. }, _) => {
                    let whole = has(Target::AttnQkv)
                        || [Target::AttnQ, Target::AttnK, Target::AttnV].into_iter().all(has);
                    if !whole {
                        return Err(ModelError::Lora(format!(
                            "the model fuses the query, key and value projections in one tensor (attn_qkv): target '{t}' alone cannot be adapted; target attn_qkv (or attn_q, attn_k and attn_v together)"
                        )));
                    }
                    &[Target::AttnQkv]
                }
                (Target::AttnQkv, Qkv::Split { .. }, _) => {
                    &[Target::AttnQ, Target::AttnK, Target::AttnV]
                }
                (Target::FfnGate, _, GateUp::Fused { .. }) => {
                    if !has(Target::FfnUp) {
                        return Err(ModelError::Lora(
                            "the model fuses the gate and up projections in one tensor (ffn_up, PEFT's gate_up_proj): 'ffn_gate' alone cannot be adapted; target ffn_up (or ffn_gate and ffn_up together)".into(),
                        ));
                    }
                    &[Target::FfnUp]
                }
                _ => std::slice::from_ref(&t),
            };
            out.extend(resolved.iter().copied());
        }
        Ok(out.into_iter().collect())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A uniform LoRA configuration (same rank and alpha for every adapted module).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub targets: Vec<Target>,
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA: scale alpha/√r instead of alpha/r.
    pub rslora: bool,
    /// Layers to adapt (None = all).
    pub layers: Option<Vec<usize>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            targets: Target::ALL.to_vec(),
            rank: 16,
            alpha: 32.0,
            rslora: false,
            layers: None,
        }
    }
}

impl LoraConfig {
    /// The scale of a module of rank `r` (see [`lora_scale`]).
    pub fn scale(&self, r: usize) -> f32 {
        lora_scale(self.alpha, r, self.rslora)
    }
}

/// A LoRA module's scale: alpha/r, or alpha/√r with rsLoRA (PEFT's `use_rslora`).
pub fn lora_scale(alpha: f32, rank: usize, rslora: bool) -> f32 {
    if rslora {
        alpha / (rank as f32).sqrt()
    } else {
        alpha / rank as f32
    }
}

/// Which module of the model an adapter pair adapts: a target in a layer. Its name is the
/// adapted GGUF tensor's, `blk.L.target.weight`; it orders by layer, then target in graph
/// order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId {
    pub layer: usize,
    pub target: Target,
}

impl ModuleId {
    /// Parses `blk.L.target.weight` (None for any other name).
    pub fn parse(name: &str) -> Option<ModuleId> {
        let rest = name.strip_prefix("blk.")?;
        let (n, rest) = rest.split_once('.')?;
        let t = rest.strip_suffix(".weight")?;
        let target = Target::ALL.into_iter().find(|x| x.name() == t)?;
        Some(ModuleId { layer: n.parse().ok()?, target })
    }
}

impl std::fmt::Display for ModuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blk.{}.{}.weight", self.layer, self.target.name())
    }
}

/// One adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub layer: usize,
    pub target: Target,
    pub rank: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub scale: f32,
    a: TensorId,
    b: TensorId,
}

impl LoraModule {
    pub fn id(&self) -> ModuleId {
        ModuleId { layer: self.layer, target: self.target }
    }
    /// The adapted base tensor's name, e.g. `blk.3.attn_q.weight`.
    pub fn base_name(&self) -> String {
        self.id().to_string()
    }
    /// Trainable parameters (r·(d_in + d_out)).
    pub fn n_params(&self) -> usize {
        self.rank * (self.d_in + self.d_out)
    }
}

/// The trainable LoRA parameters of a model, in a backend buffer (F32).
pub struct LoraSet {
    ctx: Context,
    modules: Vec<LoraModule>,
    index: HashMap<(usize, Target), usize>,
}

impl std::fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraSet")
            .field("modules", &self.modules.len())
            .field("params", &self.n_params())
            .finish()
    }
}

impl LoraSet {
    /// Adapters for `cfg` over `weights` (A and B allocated, zero; call [`LoraSet::init`]).
    pub fn new(weights: &Weights, cfg: &LoraConfig, backend: &Backend) -> Result<Self, ModelError> {
        if cfg.rank == 0 {
            return Err(ModelError::Lora("rank must be at least 1".into()));
        }
        if cfg.targets.is_empty() {
            return Err(ModelError::Lora("no target modules".into()));
        }
        if !(cfg.alpha.is_finite()) {
            return Err(ModelError::Lora(format!("alpha {} is not a finite number", cfg.alpha)));
        }
        let n_layer = weights.hparams.n_layer;
        let layers: Vec<usize> = match &cfg.layers {
            Some(l) => {
                if let Some(&bad) = l.iter().find(|&&i| i >= n_layer) {
                    return Err(ModelError::Lora(format!(
                        "layer {bad} does not exist (the model has {n_layer})"
                    )));
                }
                l.clone()
            }
            None => (0..n_layer).collect(),
        };
        let targets = Target::resolve(&cfg.targets, &weights.layer(0))?;
        let mut specs = Vec::new();
        for &layer in &layers {
            for &target in &targets {
                specs.push((layer, target, cfg.rank, cfg.scale(cfg.rank)));
            }
        }
        Self::with_modules(weights, &specs, backend)
    }

    /// Adapters with a rank and scale per module: `(layer, target, rank, scale)`.
    pub fn with_modules(
        weights: &Weights,
        specs: &[(usize, Target, usize, f32)],
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let ctx = Context::new(Capacity::tensors(2 * specs.len().max(1)))?;
        let mut modules = Vec::with_capacity(specs.len());
        let mut index = HashMap::new();
        for &(layer, target, rank, scale) in specs {
            if layer >= weights.hparams.n_layer {
                return Err(ModelError::Lora(format!(
                    "layer {layer} does not exist (the model has {})",
                    weights.hparams.n_layer
                )));
            }
            if rank == 0 {
                return Err(ModelError::Lora(format!(
                    "blk.{layer}.{target}: rank must be at least 1"
                )));
            }
            if index.contains_key(&(layer, target)) {
                return Err(ModelError::Lora(format!("blk.{layer}.{target} is listed twice")));
            }
            let Some(w) = target.weight(&weights.layer(layer)) else {
                return Err(ModelError::Lora(format!(
                    "blk.{layer}.{target}: the model has no such tensor"
                )));
            };
            let (d_in, d_out) = (w.ne()[0] as usize, w.ne()[1] as usize);
            let base = ModuleId { layer, target }.to_string();
            let a = ctx.new_f32(&format!("{base}.lora_a"), &[d_in as i64, rank as i64]); // A: [d_in, r]
            let b = ctx.new_f32(&format!("{base}.lora_b"), &[rank as i64, d_out as i64]); // B: [r, d_out]
            index.insert((layer, target), modules.len());
            modules.push(LoraModule {
                layer,
                target,
                rank,
                d_in,
                d_out,
                scale,
                a: a.id(),
                b: b.id(),
            });
        }
        ctx.allocate(backend.param_buffer_type())?;
        let set = LoraSet { ctx, modules, index };
        for m in &set.modules {
            set.ctx.write_f32(set.a(m), &vec![0.0; m.d_in * m.rank])?;
            set.ctx.write_f32(set.b(m), &vec![0.0; m.rank * m.d_out])?;
        }
        Ok(set)
    }

    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }
    /// The module adapting `target` in `layer`, if any.
    pub fn get(&self, layer: usize, target: Target) -> Option<&LoraModule> {
        self.index.get(&(layer, target)).map(|&i| &self.modules[i])
    }
    /// A [d_in, r].
    pub fn a(&self, m: &LoraModule) -> Tensor<'_> {
        self.ctx.tensor(m.a)
    }
    /// B [r, d_out].
    pub fn b(&self, m: &LoraModule) -> Tensor<'_> {
        self.ctx.tensor(m.b)
    }
    /// Total trainable parameters.
    pub fn n_params(&self) -> usize {
        self.modules.iter().map(LoraModule::n_params).sum()
    }
    /// Changes module `i`'s scale.
    pub fn set_scale(&mut self, i: usize, scale: f32) {
        self.modules[i].scale = scale;
    }

    /// Marks every A and B as a trainable parameter of the graphs they are used in.
    pub fn mark_params(&self) {
        for m in &self.modules {
            self.a(m).set_param();
            self.b(m).set_param();
        }
    }

    /// PEFT's initialisation: A ~ U(−1/√d_in, 1/√d_in) (kaiming_uniform with a = √5), B = 0,
    /// so the adapted model starts equal to the base. Deterministic in `seed`.
    pub fn init(&self, seed: u64) -> Result<(), ModelError> {
        let mut rng = init_rng(seed);
        for m in &self.modules {
            let bound = 1.0 / (m.d_in as f32).sqrt();
            let a: Vec<f32> =
                (0..m.d_in * m.rank).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect();
            self.ctx.write_f32(self.a(m), &a)?;
            self.ctx.write_f32(self.b(m), &vec![0.0; m.rank * m.d_out])?;
        }
        Ok(())
    }

    /// Fills A and B with N(0, std_a²) and N(0, std_b²) values (tests: a non-zero adapter).
    pub fn randomize(&self, seed: u64, std_a: f32, std_b: f32) -> Result<(), ModelError> {
        let mut rng = init_rng(seed);
        for m in &self.modules {
            let a: Vec<f32> = (0..m.d_in * m.rank).map(|_| std_a * rng.normal()).collect();
            let b: Vec<f32> = (0..m.rank * m.d_out).map(|_| std_b * rng.normal()).collect();
            self.ctx.write_f32(self.a(m), &a)?;
            self.ctx.write_f32(self.b(m), &b)?;
        }
        Ok(())
    }

    /// A of module `i`, row-major over ggml's layout (d_in fastest).
    pub fn read_a(&self, i: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.ctx.read_f32(self.a(&self.modules[i]))?)
    }
    pub fn read_b(&self, i: usize) -> Result<Vec<f32>, ModelError> {
        Ok(self.ctx.read_f32(self.b(&self.modules[i]))?)
    }
    pub fn write_a(&self, i: usize, data: &[f32]) -> Result<(), ModelError> {
        Ok(self.ctx.write_f32(self.a(&self.modules[i]), data)?)
    }
    pub fn write_b(&self, i: usize, data: &[f32]) -> Result<(), ModelError> {
        Ok(self.ctx.write_f32(self.b(&self.modules[i]), data)?)
    }
}

/// The generator for initialisation and test data: grit's SplitMix64 on a seed offset from
/// the data streams' (so `--seed` draws different numbers for A than for the data order).
pub(crate) fn init_rng(seed: u64) -> crate::rng::SplitMix64 {
    crate::rng::SplitMix64::new(seed ^ 0x6a09_e667_f3bc_c909)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("q_proj").unwrap(), Target::AttnQ);
        assert_eq!(Target::parse("ffn_down").unwrap(), Target::FfnDown);
        assert!(Target::parse("lm_head").unwrap_err().to_string().contains("lm_head"));
        for t in Target::ALL {
            assert_eq!(Target::parse(t.name()).unwrap(), t);
        }
    }

    /// A block of numbered tensors, with fused q/k/v and gate/up or not.
    fn block(fused_qkv: bool, fused_gate_up: bool) -> Layer<u8> {
        Layer {
            attn_norm: 0,
            qkv: if fused_qkv {
                Qkv::Fused { qkv: 4, qkv_b: None }
            } else {
                Qkv::Split { q: 1, k: 2, v: 3, q_b: None, k_b: None, v_b: None }
            },
            attn_output: 5,
            attn_output_b: None,
            attn_q_norm: None,
            attn_k_norm: None,
            attn_post_norm: None,
            ffn_norm: 0,
            gate_up: if fused_gate_up {
                GateUp::Fused { up: 7 }
            } else {
                GateUp::Split { gate: 6, up: 7, gate_b: None, up_b: None }
            },
            ffn_down: 8,
            ffn_down_b: None,
            ffn_post_norm: None,
        }
    }

    #[test]
    fn targets_resolve_to_the_tensors_the_block_has() {
        use Target::*;
        let names = |ts: Vec<Target>| ts.iter().map(|t| t.name()).collect::<Vec<_>>().join(",");
        let (split, phi3) = (block(false, false), block(true, true));
        // Every linear map: 7 tensors, or Phi-3's 4 fused ones.
        let all = Target::resolve(&Target::ALL, &split).unwrap();
        assert_eq!(names(all.clone()), "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down");
        assert_eq!(
            all.iter().map(|t| t.weight(&split).unwrap()).collect::<Vec<_>>(),
            [1, 2, 3, 5, 6, 7, 8]
        );
        let fused = Target::resolve(&Target::ALL, &phi3).unwrap();
        assert_eq!(names(fused.clone()), "attn_qkv,attn_output,ffn_up,ffn_down");
        assert_eq!(
            fused.iter().map(|t| t.weight(&phi3).unwrap()).collect::<Vec<_>>(),
            [4, 5, 7, 8]
        );
        assert_eq!(phi3.matmul_weights(), [4, 5, 7, 8]);
        assert_eq!(split.matmul_weights(), [1, 2, 3, 5, 6, 7, 8]);
        // The 7 separate names mean the same on a fused block; attn_qkv on separate ones q/k/v.
        let seven = [AttnQ, AttnK, AttnV, AttnOutput, FfnGate, FfnUp, FfnDown];
        assert_eq!(Target::resolve(&seven, &phi3).unwrap(), fused);
        assert_eq!(names(Target::resolve(&[AttnQkv], &split).unwrap()), "attn_q,attn_k,attn_v");
        assert_eq!(
            names(Target::resolve(&[FfnUp, AttnOutput], &phi3).unwrap()),
            "attn_output,ffn_up"
        );
        // Requests that would adapt more than they name are refused, naming the fused tensor.
        let e = Target::resolve(&[AttnQ, AttnV], &phi3).unwrap_err().to_string();
        assert!(e.contains("'attn_q' alone") && e.contains("target attn_qkv"), "{e}");
        let e = Target::resolve(&[FfnGate], &phi3).unwrap_err().to_string();
        assert!(e.contains("'ffn_gate' alone") && e.contains("gate_up_proj"), "{e}");
        assert_eq!(AttnQ.weight(&phi3), None);
        assert_eq!(FfnGate.weight(&phi3), None);
        assert_eq!(Target::parse("gate_up_proj").unwrap(), FfnUp);
        assert_eq!(Target::parse("qkv_proj").unwrap(), AttnQkv);
    }

    #[test]
    fn scales() {
        let c = LoraConfig::default();
        assert_eq!(c.scale(16), 2.0);
        let c = LoraConfig { rslora: true, ..c };
        assert_eq!(c.scale(16), 8.0);
    }

    #[test]
    fn rng_is_deterministic_and_sane() {
        let mut a = init_rng(7);
        let mut b = init_rng(7);
        let xs: Vec<f32> = (0..10000).map(|_| a.normal()).collect();
        assert!(xs.iter().zip((0..10000).map(|_| b.normal())).all(|(x, y)| *x == y));
        let mean = xs.iter().sum::<f32>() / xs.len() as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / xs.len() as f32;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
