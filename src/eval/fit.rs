//! The forgetting law of docs/GRIT.md §8 fitted to a run's checkpoints:
//!
//! ```text
//! L(D) = L0 + a·D^β + E                      (the power law in fine-tuning tokens D)
//! L(D) = L0 + a·D^β / (1 + γ_r·r_eff(D)) + E  (with the curvature factor, where the run
//!                                              recorded effective ranks)
//! ```
//!
//! L0 is the base model's loss on the general set (measured, D = 0); `a`, `β`, `E` (and
//! `γ_r`) are fitted by least squares. For fixed nonlinear parameters (β, γ_r) the model is
//! linear in (a, E), solved in closed form; β (and γ_r) are found by a grid search refined by
//! golden-section search. In the factor Ξ = (1 + γ_r·r_eff)(1 + γ_a·ρ_align)(1 + γ_p·π_proj)
//! only the rank term can be fitted from one run (ρ_align and π_proj are not recorded), and
//! with N fixed the exponent α is not identifiable, so it is taken as 1 (N^α folds into a).

use serde::Serialize;

use super::EvalError;

/// Fewest points (checkpoints with D > 0) a fit accepts.
pub const MIN_POINTS: usize = 5;

/// A fitted forgetting law.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LawFit {
    pub l0: f64,
    pub a: f64,
    pub beta: f64,
    pub e: f64,
    /// γ_r of the curvature factor (None for the plain power law).
    pub gamma_r: Option<f64>,
    /// Coefficient of determination over the fitted points.
    pub r2: f64,
    pub rmse: f64,
    pub n: usize,
}

impl LawFit {
    /// The law's prediction at `d` tokens (with effective rank `r_eff` for the curvature form).
    pub fn predict(&self, d: f64, r_eff: f64) -> f64 {
        let xi = 1.0 + self.gamma_r.unwrap_or(0.0) * r_eff;
        self.l0 + self.a * d.powf(self.beta) / xi + self.e
    }
}

/// Least squares of y ≈ a·x + e: (a, e, sse).
fn linear(x: &[f64], y: &[f64]) -> (f64, f64, f64) {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let sxx: f64 = x.iter().map(|v| (v - mx) * (v - mx)).sum();
    let sxy: f64 = x.iter().zip(y).map(|(u, v)| (u - mx) * (v - my)).sum();
    let a = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let e = my - a * mx;
    let sse = x.iter().zip(y).map(|(u, v)| (v - a * u - e).powi(2)).sum();
    (a, e, sse)
}

/// Minimizes `f` over [lo, hi]: a grid of `n` points, then golden-section search around the best.
fn minimize(lo: f64, hi: f64, n: usize, f: impl Fn(f64) -> f64) -> f64 {
    let step = (hi - lo) / (n - 1) as f64;
    let best =
        (0..n).map(|i| lo + step * i as f64).min_by(|a, b| f(*a).total_cmp(&f(*b))).unwrap_or(lo);
    let (mut a, mut b) = ((best - step).max(lo), (best + step).min(hi));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..60 {
        let c = b - g * (b - a);
        let d = a + g * (b - a);
        if f(c) < f(d) {
            b = d;
        } else {
            a = c;
        }
    }
    let m = (a + b) / 2.0;
    if f(m) <= f(best) {
        m
    } else {
        best
    }
}

/// Fits L(D) = L0 + a·D^β/(1 + γ_r·r_eff) + E to `points` (D, L) with `l0` the base loss.
/// `r_eff` (one per point) enables the curvature factor; None fits the plain power law.
pub fn fit_law(l0: f64, points: &[(f64, f64)], r_eff: Option<&[f64]>) -> Result<LawFit, EvalError> {
    let pts: Vec<(usize, f64, f64)> =
        points.iter().enumerate().filter(|(_, p)| p.0 > 0.0).map(|(i, p)| (i, p.0, p.1)).collect();
    let need = MIN_POINTS + usize::from(r_eff.is_some());
    if pts.len() < need {
        return Err(EvalError::Retention(format!(
            "the forgetting-law fit needs at least {need} checkpoints with D > 0, got {}",
            pts.len()
        )));
    }
    if pts.iter().any(|p| !p.1.is_finite() || !p.2.is_finite()) || !l0.is_finite() {
        return Err(EvalError::Retention("a loss or token count is not finite".into()));
    }
    // Scale D so that D^β stays well conditioned (a is reported for D in tokens).
    let d_ref = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let y: Vec<f64> = pts.iter().map(|p| p.2 - l0).collect();
    let rr: Vec<f64> = match r_eff {
        Some(r) => pts.iter().map(|p| r.get(p.0).copied().unwrap_or(0.0)).collect(),
        None => vec![0.0; pts.len()],
    };
    let sse_at = |beta: f64, gamma: f64| -> (f64, f64, f64) {
        let x: Vec<f64> = pts
            .iter()
            .zip(&rr)
            .map(|(p, r)| (p.1 / d_ref).powf(beta) / (1.0 + gamma * r))
            .collect();
        linear(&x, &y)
    };
    let best_beta = |gamma: f64| minimize(1e-3, 3.0, 61, |b| sse_at(b, gamma).2);
    let gamma = match r_eff {
        // γ_r on a log scale: γ = 10^t, t ∈ [−4, 2] (γ from 1e-4 to 100).
        Some(_) => {
            let t = minimize(-4.0, 2.0, 25, |t| {
                let g = 10f64.powf(t);
                sse_at(best_beta(g), g).2
            });
            Some(10f64.powf(t))
        }
        None => None,
    };
    let g = gamma.unwrap_or(0.0);
    let beta = best_beta(g);
    let (a_scaled, e, sse) = sse_at(beta, g);
    let my = y.iter().sum::<f64>() / y.len() as f64;
    let sst: f64 = y.iter().map(|v| (v - my).powi(2)).sum();
    let r2 = if sst > 0.0 {
        1.0 - sse / sst
    } else if sse == 0.0 {
        1.0
    } else {
        0.0
    };
    Ok(LawFit {
        l0,
        a: a_scaled / d_ref.powf(beta),
        beta,
        e,
        gamma_r: gamma,
        r2,
        rmse: (sse / y.len() as f64).sqrt(),
        n: y.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_power_law() {
        // L = 2 + 3e-4·D^0.6 + 0.05 at D = 1k..64k tokens.
        let pts: Vec<(f64, f64)> = (0..7)
            .map(|i| {
                let d = 1000.0 * 2f64.powi(i);
                (d, 2.0 + 3e-4 * d.powf(0.6) + 0.05)
            })
            .collect();
        let f = fit_law(2.0, &pts, None).unwrap();
        assert!((f.beta - 0.6).abs() < 1e-3, "{f:?}");
        assert!((f.a - 3e-4).abs() < 3e-6, "{f:?}");
        assert!((f.e - 0.05).abs() < 1e-4, "{f:?}");
        assert!(f.r2 > 0.999999 && f.rmse < 1e-6, "{f:?}");
        assert_eq!(f.n, 7);
        assert!((f.predict(5000.0, 0.0) - (2.05 + 3e-4 * 5000f64.powf(0.6))).abs() < 1e-4);
    }

    #[test]
    fn noisy_points_give_a_worse_but_sane_fit() {
        let noise = [0.01, -0.012, 0.008, -0.006, 0.011, -0.009];
        let pts: Vec<(f64, f64)> = (0..6)
            .map(|i| {
                let d = 2000.0 * (i + 1) as f64;
                (d, 3.0 + 0.002 * d.powf(0.5) + noise[i])
            })
            .collect();
        let f = fit_law(3.0, &pts, None).unwrap();
        assert!(f.r2 > 0.9 && f.r2 < 1.0, "{f:?}");
        assert!(f.rmse > 1e-3 && f.rmse < 0.02, "{f:?}");
    }

    #[test]
    fn recovers_the_curvature_factor() {
        let (a, beta, e, gamma) = (0.01, 0.5, 0.02, 0.1);
        let r = [16.0, 14.0, 10.0, 8.0, 6.0, 5.0, 5.0, 4.0];
        let pts: Vec<(f64, f64)> = r
            .iter()
            .enumerate()
            .map(|(i, &re)| {
                let d = 1000.0 * (i + 1) as f64;
                (d, 1.5 + a * d.powf(beta) / (1.0 + gamma * re) + e)
            })
            .collect();
        let f = fit_law(1.5, &pts, Some(&r)).unwrap();
        assert!((f.gamma_r.unwrap() - gamma).abs() < 0.01, "{f:?}");
        assert!((f.beta - beta).abs() < 0.02, "{f:?}");
        assert!(f.r2 > 0.9999, "{f:?}");
    }

    #[test]
    fn too_few_points_are_refused() {
        let pts = [(0.0, 2.0), (100.0, 2.1), (200.0, 2.2), (300.0, 2.25), (400.0, 2.3)];
        let e = fit_law(2.0, &pts, None).unwrap_err().to_string();
        assert!(e.contains("at least 5") && e.contains("got 4"), "{e}");
    }
}
