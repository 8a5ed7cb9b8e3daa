//! GRIT's regularizers (docs/GRIT.md §4), as graph nodes added to the loss:
//!
//! ```text
//!   ramp · ( λ_K · Σ_m [ tr(Σ_a·A·Aᵀ) + tr(Σ_g·Bᵀ·B) ]
//!          + λ_R · Σ_m [ ‖(I − P_a)·A‖²_F + ‖B·(I − P_g)‖²_F ] )
//! ```
//!
//! with A r×d_in, B d_out×r, Σ and P r×r and constant for the backward (graph inputs), and
//! `ramp` = min(1, step / reg_warmup) ([`super::schedule::reg_ramp`]).
//!
//! # One matrix per side
//! P = V·Vᵀ with orthonormal V is an orthogonal projector, so Q = I − P is one too
//! (Qᵀ = Q, Q² = Q) and
//!
//! ```text
//!   ‖Q_a·A‖²_F = tr(Aᵀ·Q_a·Q_a·A) = tr(Q_a·A·Aᵀ)      ‖B·Q_g‖²_F = tr(Q_g·Bᵀ·B)
//! ```
//!
//! Both terms are therefore traces against the same Gram matrices, and per module
//!
//! ```text
//!   penalty = tr(C_a·A·Aᵀ) + tr(C_g·Bᵀ·B),   C_a = λ_K·Σ_a + λ_R·(I − P_a),
//!                                            C_g = λ_K·Σ_g + λ_R·(I − P_g)
//! ```
//!
//! so one r×r input per side carries both terms ([`coefficients`]). Without a soft
//! reprojection (none yet, or hard cuts, after which P is the identity in the kept basis)
//! the projection term is 0. [`penalty_host`] evaluates the literal formula in f64 for tests.
//!
//! # In ggml
//! - tr(C_a·A·Aᵀ) = sum(C_a ⊙ mul_mat(A, A)): A is ne = [d_in, r], and mul_mat(A, A) contracts
//!   over d_in: entry `(i, j) = Σ_c A[i][c]·A[j][c] = (A·Aᵀ)[i][j]` (symmetric, so the
//!   elementwise product with the symmetric C_a sums to the trace of the product).
//! - tr(C_g·Bᵀ·B) = Σ_o b_oᵀ·C_g·b_o with b_o row o of B: mul_mat(C_g, B) (B ne = [r, d_out])
//!   gives column o = C_g·b_o, then sum(mul_mat(C_g, B) ⊙ B).
//!
//! # Adding it to the loss
//! Either mark [`RegGraph::loss`] as a second loss of the training graph
//! (`Tensor::set_loss` before `build_backward_expand`): ggml seeds every loss's gradient
//! with 1, so the parameter gradients are those of CE + penalty, and the reported CE stays
//! separate (with a rebuilt graph, set both losses' `grad_acc` to 1); or add it to the CE
//! node and mark the sum as the only loss.

use crate::ggml::{Computation, Context, GgmlError, Tensor};
use crate::model::LoraSet;

use super::linalg;
use super::stats::ModuleKfac;

/// tr(C_a·A·Aᵀ) + tr(C_g·Bᵀ·B) for one module, F32 `[1]`. `a` ne = [d_in, r], `b` ne =
/// [r, d_out], `c_a`, `c_g` F32 [r, r] symmetric.
pub fn module_penalty<'g>(
    ctx: &'g Context,
    a: Tensor<'g>,
    b: Tensor<'g>,
    c_a: Tensor<'g>,
    c_g: Tensor<'g>,
) -> Tensor<'g> {
    let r = a.ne()[1];
    assert!(
        b.ne()[0] == r && c_a.ne()[..2] == [r, r] && c_g.ne()[..2] == [r, r],
        "module_penalty: A {a:?}, B {b:?}, C {c_a:?} / {c_g:?}"
    );
    let aat = ctx.mul_mat(a, a); // [r, r] = A·Aᵀ
    let ta = ctx.sum(ctx.mul(aat, c_a)); // tr(C_a·A·Aᵀ)
    let cb = ctx.mul_mat(c_g, b); // [r, d_out]: column o = C_g·b_o
    let tb = ctx.sum(ctx.mul(cb, b)); // Σ_o b_oᵀ·C_g·b_o = tr(C_g·Bᵀ·B)
    ctx.add(ta, tb)
}

/// The regularizer of a whole LoRA set: inputs and the scalar loss node.
#[derive(Debug)]
pub struct RegGraph<'g> {
    /// F32 `[1]` input: the warm-up ramp factor in \[0, 1\].
    pub ramp: Tensor<'g>,
    /// Per module (LoraSet order): (C_a, C_g) inputs, F32 [r, r].
    pub modules: Vec<(Tensor<'g>, Tensor<'g>)>,
    /// F32 `[1]`: ramp · Σ_m penalty_m (marked as an output).
    pub loss: Tensor<'g>,
}

impl<'g> RegGraph<'g> {
    /// Tensor objects per module (for capacity planning).
    pub const TENSORS_PER_MODULE: usize = 10;

    /// Builds the penalty over every module of `lora` (A and B as the graph uses them).
    pub fn build(ctx: &'g Context, lora: &'g LoraSet) -> Self {
        let ramp = ctx.new_f32("grit.reg_ramp", &[1]).set_input();
        let mut modules = Vec::new();
        let mut total: Option<Tensor<'g>> = None;
        for m in lora.modules() {
            let r = m.rank as i64;
            let base = m.base_name();
            let c_a = ctx.new_f32(&format!("{base}.grit_ca"), &[r, r]).set_input();
            let c_g = ctx.new_f32(&format!("{base}.grit_cg"), &[r, r]).set_input();
            let p = module_penalty(ctx, lora.a(m), lora.b(m), c_a, c_g);
            total = Some(match total {
                Some(t) => ctx.add(t, p),
                None => p,
            });
            modules.push((c_a, c_g));
        }
        let total = total.expect("RegGraph::build: no modules");
        let loss = ctx.mul(total, ramp).set_name("grit.reg_loss").set_output();
        RegGraph { ramp, modules, loss }
    }

    /// Uploads the ramp factor and each module's (C_a, C_g) ([`coefficients`]).
    pub fn set(
        &self,
        run: &mut Computation<'_, 'g>,
        ramp: f64,
        coeffs: &[(Vec<f64>, Vec<f64>)],
    ) -> Result<(), GgmlError> {
        assert_eq!(
            coeffs.len(),
            self.modules.len(),
            "RegGraph::set: {} coefficient pairs for {} modules",
            coeffs.len(),
            self.modules.len()
        );
        run.write_f32(self.ramp, &[ramp as f32])?;
        for (&(ta, tg), (ca, cg)) in self.modules.iter().zip(coeffs) {
            run.write_f32(ta, &ca.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
            run.write_f32(tg, &cg.iter().map(|&x| x as f32).collect::<Vec<_>>())?;
        }
        Ok(())
    }
}

/// C_a = λ_K·Σ_a + λ_R·(I − P_a) and C_g = λ_K·Σ_g + λ_R·(I − P_g) of one module
/// (P = identity when the module has no projector: the λ_R term vanishes).
pub fn coefficients(m: &ModuleKfac, lambda_k: f64, lambda_r: f64) -> (Vec<f64>, Vec<f64>) {
    let r = m.rank;
    let side = |sigma: &[f64], proj: &Option<Vec<f64>>| -> Vec<f64> {
        let mut c: Vec<f64> = sigma.iter().map(|&s| lambda_k * s).collect();
        if let Some(p) = proj {
            let q = linalg::symmetrize(p, r);
            for i in 0..r {
                for j in 0..r {
                    let id = if i == j { 1.0 } else { 0.0 };
                    c[i * r + j] += lambda_r * (id - q[i * r + j]);
                }
            }
        }
        linalg::symmetrize(&c, r)
    };
    (side(&m.sigma_a, &m.proj_a), side(&m.sigma_g, &m.proj_g))
}

/// The literal formula for one module in f64 (tests): λ_K·[tr(Σ_a·A·Aᵀ) + tr(Σ_g·Bᵀ·B)] +
/// λ_R·[‖(I − P_a)·A‖²_F + ‖B·(I − P_g)‖²_F], A r×d_in and B d_out×r row-major, P = None
/// meaning the identity.
#[allow(clippy::too_many_arguments)]
pub fn penalty_host(
    a: &[f32],
    b: &[f32],
    r: usize,
    d_in: usize,
    d_out: usize,
    m: &ModuleKfac,
    lambda_k: f64,
    lambda_r: f64,
) -> f64 {
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let aat = linalg::matmul(&a, &linalg::transpose(&a, r, d_in), r, d_in, r);
    let btb = linalg::matmul_tn(&b, &b, d_out, r, r);
    let curv = linalg::trace(&linalg::matmul(&m.sigma_a, &aat, r, r, r), r)
        + linalg::trace(&linalg::matmul(&m.sigma_g, &btb, r, r, r), r);
    let frob2 = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>();
    let q = |p: &Option<Vec<f64>>| -> Vec<f64> {
        match p {
            Some(p) => (0..r * r).map(|k| if k / r == k % r { 1.0 } else { 0.0 } - p[k]).collect(),
            None => vec![0.0; r * r],
        }
    };
    let proj = frob2(&linalg::matmul(&q(&m.proj_a), &a, r, r, d_in))
        + frob2(&linalg::matmul(&b, &q(&m.proj_g), d_out, r, r));
    lambda_k * curv + lambda_r * proj
}

/// ∂penalty/∂A = 2·C_a·A (r×d_in) and ∂penalty/∂B = 2·B·C_g (d_out×r) in f64 (tests).
pub fn penalty_grads_host(
    a: &[f32],
    b: &[f32],
    r: usize,
    d_in: usize,
    d_out: usize,
    c_a: &[f64],
    c_g: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let a: Vec<f64> = a.iter().map(|&x| 2.0 * x as f64).collect();
    let b: Vec<f64> = b.iter().map(|&x| 2.0 * x as f64).collect();
    (linalg::matmul(c_a, &a, r, r, d_in), linalg::matmul(&b, c_g, d_out, r, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_reproduce_the_literal_formula() {
        // tr(C_a·A·Aᵀ) + tr(C_g·Bᵀ·B) with the combined C equals the two-term formula.
        let (r, d_in, d_out) = (4, 7, 5);
        let f = |k: usize, s: u64| ((k as u64 * 2654435761 + s) % 1000) as f32 / 500.0 - 1.0;
        let a: Vec<f32> = (0..r * d_in).map(|k| f(k, 1)).collect();
        let b: Vec<f32> = (0..d_out * r).map(|k| f(k, 2)).collect();
        let x: Vec<f64> = (0..r * r).map(|k| f(k, 3) as f64).collect();
        let mut m = ModuleKfac::new("m".into(), r);
        m.sigma_a = linalg::matmul(&x, &linalg::transpose(&x, r, r), r, r, r);
        m.sigma_g = linalg::identity(r).iter().map(|v| v * 0.5).collect();
        let e = linalg::eigh(&m.sigma_a, r);
        let v = e.top(2);
        m.proj_a = Some(linalg::matmul(&v, &linalg::transpose(&v, r, 2), r, 2, r));
        let v = linalg::eigh(&x, r).top(3);
        m.proj_g = Some(linalg::matmul(&v, &linalg::transpose(&v, r, 3), r, 3, r));
        let (ca, cg) = coefficients(&m, 1e-2, 3e-2);
        let af: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let bf: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let aat = linalg::matmul(&af, &linalg::transpose(&af, r, d_in), r, d_in, r);
        let btb = linalg::matmul_tn(&bf, &bf, d_out, r, r);
        let combined = linalg::trace(&linalg::matmul(&ca, &aat, r, r, r), r)
            + linalg::trace(&linalg::matmul(&cg, &btb, r, r, r), r);
        let literal = penalty_host(&a, &b, r, d_in, d_out, &m, 1e-2, 3e-2);
        assert!(
            (combined - literal).abs() < 1e-12 * literal.abs().max(1.0),
            "{combined} vs {literal}"
        );
    }
}
