//! K-FAC preconditioning of the LoRA gradients (docs/GRIT.md §3).
//!
//! Per module, every `invert_every` steps on the host: the damped inverses of the two
//! factors, λ chosen by [`damping`]; then each step, in the optimizer graph before clipping:
//!
//! ```text
//!   textbook  (default):  ∇B ← ∇B · (Σ_a + λ_a I)⁻¹     ∇A ← (Σ_g + λ_g I)⁻¹ · ∇A
//!   reference (option):   ∇B ← ∇B · (Σ_g + λ_g I)⁻¹     ∇A ← (Σ_a + λ_a I)⁻¹ · ∇A
//! ```
//!
//! (∂L/∂B = Σ_t δ_t·u_tᵀ, so Σ_a is B's input covariance; ∂L/∂A = Σ_t g_t·x_tᵀ, so Σ_g is
//! A's output-gradient covariance.) As matrices ∇A is r×d_in and ∇B is d_out×r (PEFT
//! layout); in ggml they are ne = [d_in, r] and ne = [r, d_out] (the same memory).
//!
//! A [`Preconditioner`] holds the two r×r matrices as they are uploaded: `left_a` multiplies
//! ∇A from the left, `right_b` multiplies ∇B from the right. [`precondition`] applies them with
//! ggml `mul_mat`s; [`apply_host`] is the f64 reference.
//!
//! # Damping
//! - relative (default): λ = λ_rel·tr(Σ)/r + λ_abs, per factor, so λ follows the factor's
//!   scale (Σ_g ~1e-11..1e-8 on the default model: an absolute 1e-3 there makes the
//!   g-side preconditioner the scalar 1/λ);
//! - absolute: λ = λ_abs (the reference's 1e-3, or its loss-std rule, see
//!   [`super::schedule`]).
//!
//! The factorization escalates λ × {3, 10, 30, 100, 300} on failure
//! ([`super::linalg::cholesky_damped`]). A factor for which no damping works, or whose λ
//! is 0 and which is singular (e.g. Σ_g while B is still exactly 0 after init, with
//! λ_abs = 0), gets the identity: it carries no curvature information, and the gradient
//! it would precondition is then 0 too (∇A = Σ_t g_t·x_tᵀ = 0 when g = 0). Such fallbacks
//! are reported in [`FactorInverse::fallback`].

use serde::Serialize;

use crate::ggml::{Computation, Context, GgmlError, Tensor};
use crate::model::LoraSet;

use super::config::{Damping, FactorNorm, GritConfig, Pairing};
use super::linalg;
use super::stats::ModuleKfac;

/// λ for factor `sigma` (r×r): relative λ_rel·tr(Σ)/r + λ_abs, or absolute λ_abs.
/// A negative or non-finite trace counts as 0.
pub fn damping(sigma: &[f64], r: usize, mode: Damping, lambda_rel: f64, lambda_abs: f64) -> f64 {
    match mode {
        Damping::Absolute => lambda_abs,
        Damping::Relative => {
            let t = linalg::trace(sigma, r);
            let t = if t.is_finite() && t > 0.0 { t } else { 0.0 };
            lambda_rel * t / r as f64 + lambda_abs
        }
    }
}

/// Σ / (tr(Σ)/r): the factor with unit mean eigenvalue (`--factor-norm trace`). A factor
/// with no positive finite trace (Σ_g while B is still 0) is returned as it is, and the
/// inversion falls back to the identity for it.
pub fn normalize_trace(sigma: &[f64], r: usize) -> Vec<f64> {
    let m = linalg::trace(sigma, r) / r as f64;
    if m.is_finite() && m > 0.0 {
        sigma.iter().map(|x| x / m).collect()
    } else {
        sigma.to_vec()
    }
}

/// (Σ + λI)⁻¹ of one factor, and how it was obtained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactorInverse {
    /// r×r row-major, symmetric.
    #[serde(skip)]
    pub inverse: Vec<f64>,
    /// The requested λ.
    pub lambda: f64,
    /// The λ that factored (after escalation); equal to `lambda` when `attempt` = 0.
    pub lambda_used: f64,
    /// Escalation step (index into [`linalg::DAMPING_ESCALATION`]).
    pub attempt: usize,
    /// Why the identity was used instead (None: a real inverse).
    pub fallback: Option<String>,
}

/// (Σ + λI)⁻¹ with escalating damping, or the identity (see the module docs).
pub fn damped_inverse(sigma: &[f64], r: usize, lambda: f64) -> FactorInverse {
    match linalg::inverse_spd(sigma, r, lambda) {
        Ok((inverse, d)) => FactorInverse {
            inverse,
            lambda,
            lambda_used: d.lambda,
            attempt: d.attempt,
            fallback: None,
        },
        Err(e) => FactorInverse {
            inverse: linalg::identity(r),
            lambda,
            lambda_used: 0.0,
            attempt: linalg::DAMPING_ESCALATION.len(),
            fallback: Some(e.to_string()),
        },
    }
}

/// The two matrices that precondition one module's gradients.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preconditioner {
    pub rank: usize,
    /// ∇A ← left_a · ∇A (r×r, symmetric).
    #[serde(skip)]
    pub left_a: Vec<f64>,
    /// ∇B ← ∇B · right_b (r×r, symmetric).
    #[serde(skip)]
    pub right_b: Vec<f64>,
    /// How (Σ_a + λI)⁻¹ was obtained.
    pub inv_a: FactorInverse,
    /// How (Σ_g + λI)⁻¹ was obtained.
    pub inv_g: FactorInverse,
}

impl Preconditioner {
    /// No preconditioning (before `ng_warmup`, or before the first inversion).
    pub fn identity(rank: usize) -> Self {
        let id = FactorInverse {
            inverse: linalg::identity(rank),
            lambda: 0.0,
            lambda_used: 0.0,
            attempt: 0,
            fallback: Some("identity".into()),
        };
        Preconditioner {
            rank,
            left_a: linalg::identity(rank),
            right_b: linalg::identity(rank),
            inv_a: id.clone(),
            inv_g: id,
        }
    }

    /// Inverts both factors of a module with damping `mode` and pairs them.
    pub fn new(
        sigma_a: &[f64],
        sigma_g: &[f64],
        r: usize,
        pairing: Pairing,
        mode: Damping,
        lambda_rel: f64,
        lambda_abs: f64,
    ) -> Self {
        let inv_a = damped_inverse(sigma_a, r, damping(sigma_a, r, mode, lambda_rel, lambda_abs));
        let inv_g = damped_inverse(sigma_g, r, damping(sigma_g, r, mode, lambda_rel, lambda_abs));
        let (left_a, right_b) = match pairing {
            Pairing::Textbook => (inv_g.inverse.clone(), inv_a.inverse.clone()),
            Pairing::Reference => (inv_a.inverse.clone(), inv_g.inverse.clone()),
        };
        Preconditioner { rank: r, left_a, right_b, inv_a, inv_g }
    }

    /// For a module's statistics with the configured normalization, pairing and damping;
    /// `lambda_abs` is the current λ_abs (the config's, or the schedule's adaptive one in
    /// absolute mode).
    pub fn for_module(m: &ModuleKfac, cfg: &GritConfig, lambda_abs: f64) -> Self {
        match cfg.factor_norm {
            FactorNorm::None => Self::new(
                &m.sigma_a,
                &m.sigma_g,
                m.rank,
                cfg.kfac_pairing,
                cfg.damping,
                cfg.damping_rel,
                lambda_abs,
            ),
            FactorNorm::Trace => {
                let (sa, sg) =
                    (normalize_trace(&m.sigma_a, m.rank), normalize_trace(&m.sigma_g, m.rank));
                Self::new(
                    &sa,
                    &sg,
                    m.rank,
                    cfg.kfac_pairing,
                    cfg.damping,
                    cfg.damping_rel,
                    lambda_abs,
                )
            }
        }
    }

    /// `left_a` as uploaded (F32, r×r).
    pub fn left_a_f32(&self) -> Vec<f32> {
        self.left_a.iter().map(|&x| x as f32).collect()
    }
    /// `right_b` as uploaded (F32, r×r).
    pub fn right_b_f32(&self) -> Vec<f32> {
        self.right_b.iter().map(|&x| x as f32).collect()
    }
}

/// The f64 reference: (left_a·∇A, ∇B·right_b) for ∇A r×d_in and ∇B d_out×r, row-major
/// (the memory of ggml's [d_in, r] and [r, d_out]).
pub fn apply_host(
    p: &Preconditioner,
    grad_a: &[f32],
    grad_b: &[f32],
    d_in: usize,
    d_out: usize,
) -> (Vec<f64>, Vec<f64>) {
    let r = p.rank;
    let ga: Vec<f64> = grad_a.iter().map(|&x| x as f64).collect();
    let gb: Vec<f64> = grad_b.iter().map(|&x| x as f64).collect();
    (linalg::matmul(&p.left_a, &ga, r, r, d_in), linalg::matmul(&gb, &p.right_b, d_out, r, r))
}

/// The preconditioned gradients in the graph: `left_a`·∇A and ∇B·`right_b`.
///
/// - `grad_a`: F32 ne = [d_in, r] (∇A as r×d_in); `grad_b`: F32 ne = [r, d_out] (∇B as d_out×r);
/// - `left_a`, `right_b`: F32 [r, r], symmetric (row-major or column-major is the same).
///
/// ggml's `mul_mat(a, b)` contracts over `ne[0]`: `mul_mat(a [k, m], b [k, n]) → [m, n]` with
/// entry `(m, n) = Σ_k a[k, m]·b[k, n]`.
/// - ∇A' = M·∇A: a = cont(transpose(∇A)) [r, d_in], b = M [r, r] → [d_in, r], entry
///   `(c, i) = Σ_j ∇A[j][c]·M[i][j] = (M·∇A)[i][c]` (M symmetric).
/// - ∇B' = ∇B·N: a = N [r, r], b = ∇B [r, d_out] → [r, d_out], entry (i, o) =
///   `Σ_j N[i][j]·∇B[o][j] = (∇B·N)[o][i]` (N symmetric).
pub fn precondition<'g>(
    ctx: &'g Context,
    grad_a: Tensor<'g>,
    grad_b: Tensor<'g>,
    left_a: Tensor<'g>,
    right_b: Tensor<'g>,
) -> (Tensor<'g>, Tensor<'g>) {
    let (na, nb) = (grad_a.ne(), grad_b.ne());
    let r = na[1];
    assert!(
        nb[0] == r && na[2] == 1 && nb[2] == 1,
        "precondition: ∇A {grad_a:?} and ∇B {grad_b:?} do not share a rank"
    );
    assert!(
        left_a.ne()[..2] == [r, r] && right_b.ne()[..2] == [r, r],
        "precondition: {left_a:?} / {right_b:?} are not {r}×{r}"
    );
    let ga_t = ctx.cont(ctx.transpose(grad_a)); // [r, d_in]
    let ga = ctx.mul_mat(ga_t, left_a); // [d_in, r]
    let gb = ctx.mul_mat(right_b, grad_b); // [r, d_out]
    (ga, gb)
}

/// The uploaded preconditioner matrices of every module of a LoRA set (graph inputs).
#[derive(Debug)]
pub struct PrecondInputs<'g> {
    /// Per module (LoraSet order): (left_a, right_b), F32 [r, r] each.
    pub modules: Vec<(Tensor<'g>, Tensor<'g>)>,
}

impl<'g> PrecondInputs<'g> {
    /// Tensor objects per module (inputs and ops of [`precondition`]).
    pub const TENSORS_PER_MODULE: usize = 6;

    /// Creates the inputs in `ctx` (F32 [r, r], marked as inputs).
    pub fn new(ctx: &'g Context, lora: &LoraSet) -> Self {
        let modules = lora
            .modules()
            .iter()
            .map(|m| {
                let r = m.rank as i64;
                let base = m.base_name();
                (
                    ctx.new_f32(&format!("{base}.grit_pa"), &[r, r]).set_input(),
                    ctx.new_f32(&format!("{base}.grit_pb"), &[r, r]).set_input(),
                )
            })
            .collect();
        PrecondInputs { modules }
    }

    /// Uploads one preconditioner per module.
    pub fn set(
        &self,
        run: &mut Computation<'_, 'g>,
        p: &[Preconditioner],
    ) -> Result<(), GgmlError> {
        assert_eq!(
            p.len(),
            self.modules.len(),
            "PrecondInputs::set: {} preconditioners for {} modules",
            p.len(),
            self.modules.len()
        );
        for (&(a, b), p) in self.modules.iter().zip(p) {
            run.write_f32(a, &p.left_a_f32())?;
            run.write_f32(b, &p.right_b_f32())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(seed: u64, r: usize, scale: f64) -> Vec<f64> {
        let x: Vec<f64> = (0..r * (r + 2))
            .map(|k| (((k as u64 + 1) * (seed * 7919 + 13) % 1009) as f64 / 1009.0) - 0.5)
            .collect();
        let s = linalg::matmul(&x, &linalg::transpose(&x, r, r + 2), r, r + 2, r);
        s.iter().map(|v| v * scale).collect()
    }

    #[test]
    fn damping_modes() {
        let s = vec![2.0, 0.0, 0.0, 4.0];
        assert!((damping(&s, 2, Damping::Relative, 0.1, 0.0) - 0.3).abs() < 1e-15);
        assert!((damping(&s, 2, Damping::Relative, 0.1, 1.0) - 1.3).abs() < 1e-15);
        assert_eq!(damping(&s, 2, Damping::Absolute, 0.1, 1e-3), 1e-3);
        assert_eq!(damping(&[0.0; 4], 2, Damping::Relative, 0.1, 0.0), 0.0);
    }

    #[test]
    fn pairings_and_inverses() {
        let r = 5;
        let (sa, sg) = (spd(1, r, 1.0), spd(2, r, 1e-10));
        for mode in [Damping::Relative, Damping::Absolute] {
            let lambda_abs = if mode == Damping::Absolute { 1e-3 } else { 0.0 };
            let t = Preconditioner::new(&sa, &sg, r, Pairing::Textbook, mode, 0.1, lambda_abs);
            let f = Preconditioner::new(&sa, &sg, r, Pairing::Reference, mode, 0.1, lambda_abs);
            assert_eq!(t.left_a, f.right_b);
            assert_eq!(t.right_b, f.left_a);
            // (Σ + λ_used I)·inverse = I.
            for (s, inv) in [(&sa, &t.inv_a), (&sg, &t.inv_g)] {
                let p =
                    linalg::matmul(&linalg::add_diag(s, r, inv.lambda_used), &inv.inverse, r, r, r);
                let e = p
                    .iter()
                    .zip(linalg::identity(r))
                    .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
                assert!(e < 1e-9, "{mode:?}: residual {e}");
            }
            if mode == Damping::Absolute {
                // Σ_g ≪ λ: the g-side inverse is ≈ 1/λ · I (the degenerate case of the spec).
                assert!((t.left_a[0] - 1e3).abs() < 1.0);
            } else {
                // Relative: λ_g is ~1e-11, the inverse ~1/tr(Σ_g)·r, not 1/λ_abs.
                assert!(t.inv_g.lambda < 1e-9 && t.left_a[0] > 1e6);
            }
        }
        // Trace normalization: unit mean eigenvalue, so Σ_g of scale 1e-10 and Σ_a of
        // scale 1 give preconditioners of the same size (mean eigenvalue of the inverse
        // between 1/(1 + λ) and 1/λ), and the inverse is invariant to the factor's scale.
        let n = normalize_trace(&sg, r);
        assert!((linalg::trace(&n, r) - r as f64).abs() < 1e-9);
        let cfg = GritConfig::default();
        let module = |a: Vec<f64>, g: Vec<f64>| {
            let mut m = ModuleKfac::new("m".into(), r);
            (m.sigma_a, m.sigma_g) = (a, g);
            m
        };
        let m1 = module(sa.clone(), sg.clone());
        let m2 =
            module(sa.iter().map(|x| x * 1e6).collect(), sg.iter().map(|x| x * 1e-6).collect());
        let (p1, p2) = (
            Preconditioner::for_module(&m1, &cfg, 0.0),
            Preconditioner::for_module(&m2, &cfg, 0.0),
        );
        for (x, y) in p1.left_a.iter().zip(&p2.left_a).chain(p1.right_b.iter().zip(&p2.right_b)) {
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{x} vs {y}");
        }
        // Normalized factor eigenvalues λ_i ≥ 0 with mean 1: the inverse's mean eigenvalue
        // lies between 1/(1 + λ_rel) (Jensen) and 1/λ_rel.
        let (mean_eig, l) = (linalg::trace(&p1.left_a, r) / r as f64, cfg.damping_rel);
        assert!(mean_eig > 1.0 / (1.0 + l) - 1e-9 && mean_eig < 1.0 / l + 1e-9, "{mean_eig}");
        assert!(normalize_trace(&vec![0.0; r * r], r).iter().all(|&x| x == 0.0));
        // A zero factor with λ = 0 falls back to the identity.
        let z = Preconditioner::new(
            &sa,
            &vec![0.0; r * r],
            r,
            Pairing::Textbook,
            Damping::Relative,
            0.1,
            0.0,
        );
        assert!(
            z.inv_g.fallback.is_some()
                && z.left_a == linalg::identity(r)
                && z.inv_a.fallback.is_none()
        );
    }
}
