//! Small dense linear algebra in f64 on the host, for GRIT's rank-space matrices (r ≤ 64).
//!
//! Matrices are row-major `Vec<f64>` (`a[i * cols + j]` is row i, column j). Square r×r
//! matrices are passed with their size `n`. Everything here is O(r³) at most and runs on the
//! host between training steps (inversions, reprojections); nothing is on the hot path.
//!
//! - [`cholesky`] / [`cholesky_damped`]: L·Lᵀ = S (+ λ·I), with GRIT's escalating damping:
//!   on failure retry with λ × 3, 10, 30, 100, 300 (docs/GRIT.md §3) and report the λ used.
//! - [`inverse_spd`] / [`inverse_from_cholesky`]: (S + λI)⁻¹ from the factor.
//! - [`eigh`]: symmetric eigendecomposition by cyclic Jacobi rotations, eigenvalues in
//!   descending order, eigenvectors as the columns of V (S = V·diag(λ)·Vᵀ).

/// The damping multipliers tried in turn by [`cholesky_damped`]: λ, then λ × 3, 10, 30, 100, 300.
pub const DAMPING_ESCALATION: [f64; 6] = [1.0, 3.0, 10.0, 30.0, 100.0, 300.0];

/// The n×n identity.
pub fn identity(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        m[i * n + i] = 1.0;
    }
    m
}

/// Product of `a` (m×k) and `b` (k×n) → m×n.
pub fn matmul(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * k, "matmul: a is not {m}×{k}");
    assert_eq!(b.len(), k * n, "matmul: b is not {k}×{n}");
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p];
            if x == 0.0 {
                continue;
            }
            let (brow, crow) = (&b[p * n..(p + 1) * n], &mut c[i * n..(i + 1) * n]);
            for j in 0..n {
                crow[j] += x * brow[j];
            }
        }
    }
    c
}

/// Transpose of `a` (m×n) → n×m.
pub fn transpose(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * n, "transpose: a is not {m}×{n}");
    let mut t = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            t[j * m + i] = a[i * n + j];
        }
    }
    t
}

/// aᵀ·b for a (k×m) and b (k×n) → m×n.
pub fn matmul_tn(a: &[f64], b: &[f64], k: usize, m: usize, n: usize) -> Vec<f64> {
    matmul(&transpose(a, k, m), b, m, k, n)
}

/// Vᵀ·S·V for S (n×n) and V (n×k) → k×k (a change of basis of a symmetric matrix).
pub fn congruence(s: &[f64], v: &[f64], n: usize, k: usize) -> Vec<f64> {
    let sv = matmul(s, v, n, n, k);
    symmetrize(&matmul_tn(v, &sv, n, k, k), k)
}

/// Trace of a square n×n matrix.
pub fn trace(a: &[f64], n: usize) -> f64 {
    (0..n).map(|i| a[i * n + i]).sum()
}

/// (A + Aᵀ)/2.
pub fn symmetrize(a: &[f64], n: usize) -> Vec<f64> {
    let mut s = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            s[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    s
}

/// A + λ·I.
pub fn add_diag(a: &[f64], n: usize, lambda: f64) -> Vec<f64> {
    let mut s = a.to_vec();
    for i in 0..n {
        s[i * n + i] += lambda;
    }
    s
}

/// Largest absolute entry (0 for an empty matrix).
pub fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// The lower-triangular Cholesky factor L of a symmetric matrix S (n×n), S = L·Lᵀ, or None
/// when S is not (numerically) positive definite: a pivot that is not finite or not above
/// `n · ε · max_i S_ii` (ε = f64::EPSILON) counts as a failure, so a factor that exists
/// only through rounding noise is rejected. Only the lower triangle of S is read.
pub fn cholesky(s: &[f64], n: usize) -> Option<Vec<f64>> {
    assert_eq!(s.len(), n * n, "cholesky: not {n}×{n}");
    let max_diag = (0..n).fold(0.0f64, |m, i| m.max(s[i * n + i].abs()));
    let tiny = n as f64 * f64::EPSILON * max_diag;
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let mut d = s[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if !d.is_finite() || d <= tiny {
            return None;
        }
        let djj = d.sqrt();
        l[j * n + j] = djj;
        for i in j + 1..n {
            let mut x = s[i * n + j];
            for k in 0..j {
                x -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = x / djj;
        }
    }
    Some(l)
}

/// A successful damped factorization: L·Lᵀ = S + λ·I.
#[derive(Debug, Clone, PartialEq)]
pub struct Damped {
    /// Lower-triangular factor, n×n.
    pub l: Vec<f64>,
    /// The damping actually used (the requested λ times one of [`DAMPING_ESCALATION`]).
    pub lambda: f64,
    /// Index into [`DAMPING_ESCALATION`] (0 = the requested λ worked).
    pub attempt: usize,
}

/// Why a damped factorization failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinalgError {
    #[error(
        "matrix is not positive definite even with damping {lambda_max:e} (requested {lambda:e})"
    )]
    NotPositiveDefinite { lambda: f64, lambda_max: f64 },
    #[error("matrix has a non-finite entry")]
    NonFinite,
}

/// Cholesky of S + λ·I with GRIT's escalating damping: λ, 3λ, 10λ, 30λ, 100λ, 300λ
/// ([`DAMPING_ESCALATION`]), the first that factors. λ must be ≥ 0; with λ = 0 only S itself
/// is tried (every multiple of 0 is 0).
pub fn cholesky_damped(s: &[f64], n: usize, lambda: f64) -> Result<Damped, LinalgError> {
    assert!(lambda >= 0.0, "cholesky_damped: negative damping {lambda}");
    if s.iter().any(|x| !x.is_finite()) || !lambda.is_finite() {
        return Err(LinalgError::NonFinite);
    }
    let tries: &[f64] = if lambda == 0.0 { &DAMPING_ESCALATION[..1] } else { &DAMPING_ESCALATION };
    for (attempt, &f) in tries.iter().enumerate() {
        let lam = lambda * f;
        if let Some(l) = cholesky(&add_diag(s, n, lam), n) {
            return Ok(Damped { l, lambda: lam, attempt });
        }
    }
    Err(LinalgError::NotPositiveDefinite {
        lambda,
        lambda_max: lambda * DAMPING_ESCALATION[DAMPING_ESCALATION.len() - 1],
    })
}

/// (L·Lᵀ)⁻¹ from a lower-triangular Cholesky factor L (n×n): L⁻¹ by forward substitution,
/// then L⁻ᵀ·L⁻¹. The result is exactly symmetric.
pub fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(l.len(), n * n, "inverse_from_cholesky: not {n}×{n}");
    // Z = L⁻¹ (lower triangular): L·Z = I, column by column.
    let mut z = vec![0.0; n * n];
    for c in 0..n {
        for i in c..n {
            let mut x = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                x -= l[i * n + k] * z[k * n + c];
            }
            z[i * n + c] = x / l[i * n + i];
        }
    }
    // S⁻¹ = Zᵀ·Z: (i, j) = Σ_k Z[k][i]·Z[k][j], k ≥ max(i, j).
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut x = 0.0;
            for k in i..n {
                x += z[k * n + i] * z[k * n + j];
            }
            inv[i * n + j] = x;
            inv[j * n + i] = x;
        }
    }
    inv
}

/// (S + λ·I)⁻¹ with escalating damping; returns the inverse and the factorization record.
pub fn inverse_spd(s: &[f64], n: usize, lambda: f64) -> Result<(Vec<f64>, Damped), LinalgError> {
    let d = cholesky_damped(s, n, lambda)?;
    Ok((inverse_from_cholesky(&d.l, n), d))
}

/// An orthonormal basis (r×k', row-major, k' ≤ k) of the column span of `w` (r×k), by
/// modified Gram–Schmidt; columns that add less than 1e-12 of their own norm are left out.
pub fn orthonormal_columns(w: &[f64], r: usize, k: usize) -> Vec<f64> {
    assert_eq!(w.len(), r * k, "orthonormal_columns: not {r}×{k}");
    let mut cols: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let mut c: Vec<f64> = (0..r).map(|i| w[i * k + j]).collect();
        let norm0 = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        for q in &cols {
            let d: f64 = q.iter().zip(&c).map(|(a, b)| a * b).sum();
            c.iter_mut().zip(q).for_each(|(x, y)| *x -= d * y);
        }
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 * norm0 && norm > 0.0 {
            cols.push(c.iter().map(|x| x / norm).collect());
        }
    }
    let kq = cols.len();
    (0..r * kq).map(|x| cols[x % kq][x / kq]).collect()
}

/// A symmetric eigendecomposition S = V·diag(values)·Vᵀ.
#[derive(Debug, Clone, PartialEq)]
pub struct Eigh {
    pub n: usize,
    /// Eigenvalues, descending.
    pub values: Vec<f64>,
    /// Row-major n×n; column j (`vectors[i * n + j]`, i = 0..n) is the unit eigenvector of
    /// `values[j]`, with its largest-magnitude component positive (a deterministic sign).
    pub vectors: Vec<f64>,
    /// Jacobi sweeps used.
    pub sweeps: usize,
}

impl Eigh {
    /// The first `k` eigenvectors as an n×k matrix (row-major).
    pub fn top(&self, k: usize) -> Vec<f64> {
        let n = self.n;
        assert!(k <= n, "Eigh::top: {k} of {n} vectors");
        let mut v = vec![0.0; n * k];
        for i in 0..n {
            v[i * k..(i + 1) * k].copy_from_slice(&self.vectors[i * n..i * n + k]);
        }
        v
    }
}

/// Symmetric eigendecomposition by cyclic Jacobi rotations (exact to rounding for symmetric
/// input; only the symmetric part (S + Sᵀ)/2 is used). Sweeps until the off-diagonal mass is
/// below 1e-15 of the matrix's Frobenius norm (at most 100 sweeps; r ≤ 64 needs ~10).
pub fn eigh(s: &[f64], n: usize) -> Eigh {
    assert_eq!(s.len(), n * n, "eigh: not {n}×{n}");
    let mut a = symmetrize(s, n);
    let mut v = identity(n);
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut sweeps = 0;
    if norm > 0.0 && norm.is_finite() {
        while sweeps < 100 {
            let off: f64 = (0..n)
                .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i * n + j] * a[i * n + j])
                .sum::<f64>()
                .sqrt();
            if off <= 1e-15 * norm {
                break;
            }
            sweeps += 1;
            for p in 0..n {
                for q in p + 1..n {
                    let apq = a[p * n + q];
                    if apq == 0.0 {
                        continue;
                    }
                    // Rotation angle that zeroes a[p][q] (Golub & Van Loan, sym.schur2).
                    let tau = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                    let t = tau.signum() / (tau.abs() + (1.0 + tau * tau).sqrt());
                    let t = if tau == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (1.0 + t * t).sqrt();
                    let sn = t * c;
                    // A ← Jᵀ·A·J with J the rotation in the (p, q) plane.
                    for k in 0..n {
                        let (akp, akq) = (a[k * n + p], a[k * n + q]);
                        a[k * n + p] = c * akp - sn * akq;
                        a[k * n + q] = sn * akp + c * akq;
                    }
                    for k in 0..n {
                        let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                        a[p * n + k] = c * apk - sn * aqk;
                        a[q * n + k] = sn * apk + c * aqk;
                    }
                    for k in 0..n {
                        let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                        v[k * n + p] = c * vkp - sn * vkq;
                        v[k * n + q] = sn * vkp + c * vkq;
                    }
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| a[y * n + y].total_cmp(&a[x * n + x]));
    let values: Vec<f64> = order.iter().map(|&j| a[j * n + j]).collect();
    let mut vectors = vec![0.0; n * n];
    for (jn, &j) in order.iter().enumerate() {
        // Sign: largest-magnitude component positive.
        let imax =
            (0..n).max_by(|&x, &y| v[x * n + j].abs().total_cmp(&v[y * n + j].abs())).unwrap_or(0);
        let sign = if v[imax * n + j] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..n {
            vectors[i * n + jn] = sign * v[i * n + j];
        }
    }
    Eigh { n, values, vectors, sweeps }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random n×m matrix with entries in [-1, 1).
    pub(crate) fn rand_mat(seed: u64, n: usize, m: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n * m)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> f64 {
        let e = a.iter().zip(b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(e <= tol, "max abs difference {e:e} > {tol:e}");
        e
    }

    #[test]
    fn cholesky_of_a_known_matrix() {
        // Classic example: [[4, 12, -16], [12, 37, -43], [-16, -43, 98]] = L·Lᵀ with
        // L = [[2, 0, 0], [6, 1, 0], [-8, 5, 3]].
        let s = [4.0, 12.0, -16.0, 12.0, 37.0, -43.0, -16.0, -43.0, 98.0];
        let l = cholesky(&s, 3).unwrap();
        close(&l, &[2.0, 0.0, 0.0, 6.0, 1.0, 0.0, -8.0, 5.0, 3.0], 1e-12);
        let inv = inverse_from_cholesky(&l, 3);
        close(&matmul(&s, &inv, 3, 3, 3), &identity(3), 1e-10);
        // (S⁻¹)₃₃ = ((L⁻¹)₃₃)² = 1/9 (L⁻¹ is lower triangular).
        assert!((inv[8] - 1.0 / 9.0).abs() < 1e-12);
    }

    #[test]
    fn cholesky_rejects_indefinite_and_singular() {
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_none()); // eigenvalues 3, -1
        assert!(cholesky(&[1.0, 1.0, 1.0, 1.0], 2).is_none()); // singular (rank 1)
        assert!(cholesky(&[0.0; 4], 2).is_none());
    }

    #[test]
    fn escalating_damping_on_a_singular_matrix() {
        // Rank-1 PSD matrix: S = v·vᵀ. With damping λ it factors at the first try.
        let v = [1.0, 2.0, 3.0];
        let s: Vec<f64> = (0..9).map(|k| v[k / 3] * v[k % 3]).collect();
        let d = cholesky_damped(&s, 3, 1e-3).unwrap();
        assert_eq!((d.attempt, d.lambda), (0, 1e-3));
        // S − 0.05·I has eigenvalues 13.95, −0.05, −0.05: λ = 0.01 needs ×10 (0.1 > 0.05),
        // so attempts 1e-2 (fail), 3e-2 (fail), 1e-1 (works).
        let s2 = add_diag(&s, 3, -0.05);
        let d = cholesky_damped(&s2, 3, 0.01).unwrap();
        assert_eq!(d.attempt, 2);
        assert!((d.lambda - 0.1).abs() < 1e-15);
        let (inv, _) = inverse_spd(&s2, 3, 0.01).unwrap();
        close(&matmul(&add_diag(&s2, 3, 0.1), &inv, 3, 3, 3), &identity(3), 1e-10);
        // −I needs λ > 1: 0.001·300 = 0.3 is not enough.
        let e = cholesky_damped(&add_diag(&[0.0; 9], 3, -1.0), 3, 1e-3).unwrap_err();
        assert!(matches!(e, LinalgError::NotPositiveDefinite { .. }), "{e}");
        // λ = 0 on a singular matrix: one try, fails.
        assert!(cholesky_damped(&s, 3, 0.0).is_err());
        assert!(matches!(
            cholesky_damped(&[f64::NAN, 0.0, 0.0, 1.0], 2, 1.0),
            Err(LinalgError::NonFinite)
        ));
    }

    #[test]
    fn inverse_of_random_spd_matrices() {
        for n in [1, 2, 5, 16, 33, 64] {
            let x = rand_mat(n as u64, n, n + 3);
            let s = matmul(&x, &transpose(&x, n, n + 3), n, n + 3, n); // XXᵀ, SPD
            let (inv, d) = inverse_spd(&s, n, 1e-9).unwrap();
            let p = matmul(&add_diag(&s, n, d.lambda), &inv, n, n, n);
            close(&p, &identity(n), 1e-7);
        }
    }

    #[test]
    fn eigh_of_known_matrices() {
        // [[2, 1], [1, 2]]: eigenvalues 3, 1 with vectors (1, 1)/√2, (1, −1)/√2 (sign: largest
        // component positive; ties go to the first).
        let e = eigh(&[2.0, 1.0, 1.0, 2.0], 2);
        close(&e.values, &[3.0, 1.0], 1e-14);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert!((e.vectors[0] - h).abs() < 1e-14 && (e.vectors[2] - h).abs() < 1e-14);
        assert!(
            (e.vectors[1].abs() - h).abs() < 1e-14 && (e.vectors[1] + e.vectors[3]).abs() < 1e-14
        );
        // Diagonal with a repeated eigenvalue and a zero one.
        let e = eigh(&[0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 5.0], 3);
        close(&e.values, &[5.0, 5.0, 0.0], 0.0);
        // The zero matrix.
        let e = eigh(&[0.0; 16], 4);
        close(&e.values, &[0.0; 4], 0.0);
        close(&e.vectors, &identity(4), 0.0);
    }

    #[test]
    fn eigh_reconstructs_random_symmetric_matrices() {
        for n in [1, 3, 8, 16, 40, 64] {
            let x = rand_mat(100 + n as u64, n, n);
            let s = symmetrize(&x, n);
            let e = eigh(&s, n);
            assert!(e.values.windows(2).all(|w| w[0] >= w[1]), "not descending");
            // VᵀV = I and V·diag·Vᵀ = S.
            close(&matmul_tn(&e.vectors, &e.vectors, n, n, n), &identity(n), 1e-12);
            let mut vd = e.vectors.clone();
            for i in 0..n {
                for j in 0..n {
                    vd[i * n + j] *= e.values[j];
                }
            }
            let back = matmul(&vd, &transpose(&e.vectors, n, n), n, n, n);
            close(&back, &s, 1e-12 * n as f64);
            assert!((e.values.iter().sum::<f64>() - trace(&s, n)).abs() < 1e-10);
            assert!(e.sweeps <= 20, "{} sweeps for n = {n}", e.sweeps);
        }
    }

    #[test]
    fn congruence_is_vt_s_v() {
        let s = symmetrize(&rand_mat(1, 4, 4), 4);
        let v = rand_mat(2, 4, 2);
        let c = congruence(&s, &v, 4, 2);
        let direct = matmul(&transpose(&v, 4, 2), &matmul(&s, &v, 4, 4, 2), 2, 4, 2);
        close(&c, &direct, 1e-14);
    }
}
