//! Fisher-guided reprojection with dynamic rank (docs/GRIT.md §5), on host copies of A and B.
//!
//! Per module, from its statistics:
//! 1. eigh(Σ_a) = V_a·diag(λ_1 ≥ … ≥ λ_r)·V_aᵀ;
//! 2. each eigenvector v_j gets a signal ([`direction_signal`]): λ_j (default) or the
//!    update's output energy λ_j·‖B·v_j‖²; k = the fewest directions, strongest signal first,
//!    holding a share τ (`rank_energy`) of the total, clamped to [rank_min, min(r, rank_max)]
//!    ([`rank_by_energy`]); τ is a share of what each event finds (default) or, with the run
//!    budget, of what the module held before its first cut: a later cut needs τ / (share kept
//!    so far). Before `rank_start`, k = r;
//! 3. B's basis: the top-k eigenvectors V_g,k of Σ_g (two-sided, default) or V_a,k;
//! 4. the cut, written as A_new = Lᵀ·A and B_new = B·W:
//!    - hard (default): L = V_a,k (r×k), W = V_g,k·(V_g,kᵀ·V_a,k) (r×k), so A_new is k×d_in,
//!      B_new is d_out×k and B_new·A_new = B·P_g·P_a·A, the reference's product
//!      (P = V·Vᵀ), with tensors that really shrink;
//!    - soft (the reference): L = P_a, W = P_g (r×r): A ← P_a·A, B ← B·P_g, shapes kept,
//!      and P_a, P_g are kept for the λ_R regularizer;
//!    - k = r (nothing to cut, e.g. before `rank_start`): L = W = I, nothing changes
//!      ([`Cut::is_noop`]; a hard cut would only rotate the rank coordinates).
//!
//! The scale s of the module is not touched: the trainer keeps the module's current scale
//! (that of its initial rank) when it rebuilds the LoRA set, so the function does not jump.
//!
//! # Everything else follows from u' = Lᵀ·u and g' = Wᵀ·g
//! With A_new = Lᵀ·A the new rank-space activation is u' = A_new·x = Lᵀ·u; with B_new = B·W
//! the new g' = s·B_newᵀ·δ = Wᵀ·(s·Bᵀ·δ) = Wᵀ·g (same x and δ). Hence
//! - statistics: Σ_a' = Lᵀ·Σ_a·L, Σ_g' = Wᵀ·Σ_g·W ([`Cut::apply_stats`]). For a hard cut
//!   Σ_a' = diag(λ_1..λ_k) and, one-sided, Σ_g' = V_a,kᵀ·Σ_g·V_a,k as docs/GRIT.md states;
//!   two-sided, W = P_g·V_a,k, so Σ_g' = V_a,kᵀ·P_g·Σ_g·P_g·V_a,k: the spec's
//!   V_a,kᵀ·Σ_g·V_a,k without the part of Σ_g outside the kept V_g,k (which the new B can no
//!   longer produce). Counts and update numbers carry over (the EMA continues).
//! - gradients: ∂L/∂A_new = Σ_t g'_t·x_tᵀ = Wᵀ·∂L/∂A and ∂L/∂B_new = Σ_t δ_t·(s·u'_t)ᵀ =
//!   ∂L/∂B·L.
//!
//! # Adam moments of a reprojected module ([`Cut::apply_moments_a`], [`Cut::apply_moments_b`])
//! - First moments are linear averages of past gradients, so they transform like the
//!   gradients: m_A' = Wᵀ·m_A, m_B' = m_B·L. This is exactly the average the new
//!   parameters would hold for the same gradient history.
//! - Second moments average squared coordinates and are not linear. If the rank-space
//!   coordinates of a gradient are uncorrelated, `E[(Wᵀg)_j²] = Σ_i W_ij²·E[g_i²]`, so
//!   v_A' = (W∘W)ᵀ·v_A and v_B' = v_B·(L∘L) (∘: elementwise square). This keeps v ≥ 0 and at
//!   the scale of the gradients. Resetting v instead would be harmful: ggml's AdamW applies
//!   one global bias correction 1/(1 − β2^t), so a zeroed v after one step is corrected by
//!   ≈ 1 instead of 1/(1 − β2), and the first update after a cut would be up to
//!   1/√(1 − β2) ≈ 31× too large (β2 = 0.999).
//! - Gradient accumulators hold no history across steps: zero them.
//!
//! # Layouts
//! A is row-major r×d_in and B row-major d_out×r: the memory of ggml's A [d_in, r] and
//! B [r, d_out], as `LoraSet::read_a/read_b` return them and `write_a/write_b` take them; the
//! Adam moments of A and B (OptState slots) have the same layouts.

use serde::Serialize;

use super::config::{GritConfig, RankBudget, RankCut, RankSignal};
use super::linalg;
use super::stats::ModuleKfac;

/// A spectrum value as energy: negative (rounding) and non-finite values count as 0.
fn energy_of(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v
    } else {
        0.0
    }
}

/// The fewest k with (λ_1 + … + λ_k) ≥ τ·(λ_1 + … + λ_n), clamped to [lo, hi] (lo is lowered
/// to hi if it exceeds it). Eigenvalues must be descending; negative ones (rounding) count
/// as 0. A spectrum with no energy gives hi.
pub fn rank_by_energy(values: &[f64], tau: f64, lo: usize, hi: usize) -> usize {
    let hi = hi.min(values.len()).max(1);
    let lo = lo.clamp(1, hi);
    let pos: Vec<f64> = values.iter().map(|&v| energy_of(v)).collect();
    let total: f64 = pos.iter().sum();
    if total <= 0.0 {
        return hi;
    }
    let mut cum = 0.0;
    let mut k = pos.len();
    for (j, &v) in pos.iter().enumerate() {
        cum += v;
        if cum >= tau * total {
            k = j + 1;
            break;
        }
    }
    k.clamp(lo, hi)
}

/// Share of the (non-negative) spectrum held by the first k eigenvalues (1 for no energy).
pub fn captured_energy(values: &[f64], k: usize) -> f64 {
    let total: f64 = values.iter().map(|&v| energy_of(v)).sum();
    if total <= 0.0 {
        return 1.0;
    }
    values.iter().take(k).map(|&v| energy_of(v)).sum::<f64>() / total
}

/// exp(H(p)) with p = λ/Σλ over the positive eigenvalues: between 1 (one direction) and n
/// (a flat spectrum). 0 for no energy.
pub fn effective_rank(values: &[f64]) -> f64 {
    let pos: Vec<f64> = values.iter().map(|&v| energy_of(v)).filter(|&v| v > 0.0).collect();
    let total: f64 = pos.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    let h: f64 = pos.iter().map(|v| v / total).map(|p| -p * p.ln()).sum();
    h.exp()
}

/// What one module's reprojection did (a `metrics.jsonl` row holds these per module).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReprojectReport {
    /// The adapted base tensor, e.g. `blk.3.attn_q.weight`.
    pub module: String,
    pub rank_before: usize,
    /// The module's rank after the cut (k for hard cuts; unchanged r for soft ones).
    pub rank_after: usize,
    /// Directions kept (k).
    pub kept: usize,
    /// Share of the rank rule's signal (`--rank-signal`: the update's output energy, or
    /// Σ_a's eigenvalues) in the kept directions.
    pub energy: f64,
    /// exp(H(λ/Σλ)) of Σ_a's spectrum (before the cut).
    pub eff_rank: f64,
    /// Share of Σ_g's energy in B's kept basis (= that of V_a,k when one-sided).
    pub energy_g: f64,
    /// Σ_a's eigenvalues, descending (before the cut).
    pub eigenvalues: Vec<f64>,
}

/// A planned reprojection of one module: A_new = Lᵀ·A, B_new = B·W (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    pub kind: RankCut,
    /// Rank before.
    pub r: usize,
    /// Directions kept.
    pub k: usize,
    /// r×n row-major, n = the new rank (k hard, r soft).
    pub l: Vec<f64>,
    /// r×n row-major.
    pub w: Vec<f64>,
    /// P_a, P_g to keep for the λ_R term (soft cuts; None after a hard cut).
    pub proj_a: Option<Vec<f64>>,
    pub proj_g: Option<Vec<f64>>,
    pub report: ReprojectReport,
}

/// A module's directions, strongest signal first, before its rank is chosen
/// ([`Spectrum::of`]): [`Spectrum::module_rank`] applies τ to this module alone,
/// [`global_ranks`] to every module at once, and [`Spectrum::cut`] makes the cut for a k.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub name: String,
    /// Rank before.
    pub r: usize,
    /// The rank rule's signal per direction, descending (negative rounding counts as 0).
    pub signal: Vec<f64>,
    /// r×r row-major; column j is direction j's column of L (A_new = Lᵀ·A).
    l: Vec<f64>,
    /// How B's basis is made for the kept directions.
    basis: Basis,
    /// Σ_a's eigenvalues, descending (for the report).
    eigenvalues: Vec<f64>,
    /// Σ_g (r×r), for the report's share of it that B keeps.
    sigma_g: Vec<f64>,
    /// What the module kept at earlier cuts (the run budget).
    retained: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum Basis {
    /// B's basis is A's: W = V_a,k.
    OneSided,
    /// W = P_g,k·V_a,k with P_g,k from the top-k eigenvectors of Σ_g.
    TwoSided(linalg::Eigh),
    /// W given per direction (r×r row-major, column j for direction j): the Fisher cut.
    Paired(Vec<f64>),
}

impl Spectrum {
    /// The directions of module `m` and their signals. `gram_b` is BᵀB (r×r row-major) of
    /// the module's current B, for the output-energy signal. None for a module without
    /// statistics (no update yet, or Σ_a with no energy).
    pub fn of(m: &ModuleKfac, gram_b: &[f64], cfg: &GritConfig) -> Option<Spectrum> {
        let r = m.rank;
        assert_eq!(
            gram_b.len(),
            r * r,
            "Spectrum::of: BᵀB of {} values for rank {r}",
            gram_b.len()
        );
        let energy = linalg::trace(&m.sigma_a, r);
        if m.updates == 0 || energy.is_nan() || energy <= 0.0 {
            return None;
        }
        let ea = linalg::eigh(&m.sigma_a, r);
        let (signal, l, basis) = match cfg.rank_signal {
            RankSignal::Fisher => fisher_directions(&ea, &m.sigma_g),
            signal_kind => {
                let signal = direction_signal(&ea, gram_b, signal_kind == RankSignal::Output);
                // Directions by descending signal (ties: by eigenvalue order).
                let mut order: Vec<usize> = (0..r).collect();
                order.sort_by(|&i, &j| signal[j].total_cmp(&signal[i]).then(i.cmp(&j)));
                let l = (0..r)
                    .flat_map(|i| order.iter().map(move |&j| (i, j)))
                    .map(|(i, j)| ea.vectors[i * r + j])
                    .collect();
                let basis = if cfg.two_sided {
                    Basis::TwoSided(linalg::eigh(&m.sigma_g, r))
                } else {
                    Basis::OneSided
                };
                (order.iter().map(|&j| signal[j]).collect(), l, basis)
            }
        };
        Some(Spectrum {
            name: m.name.clone(),
            r,
            signal,
            l,
            basis,
            eigenvalues: ea.values,
            sigma_g: m.sigma_g.clone(),
            retained: m.retained,
        })
    }

    /// k by τ over this module's own signal (`--rank-scope module`), clamped to
    /// [rank_min, min(r, rank_max)]; r before `rank_start`. `initial_rank` bounds the rank
    /// when `cfg.rank_max` is None.
    pub fn module_rank(&self, cfg: &GritConfig, step: usize, initial_rank: usize) -> usize {
        if step < cfg.rank_start() {
            return self.r;
        }
        let tau = match cfg.rank_budget {
            RankBudget::Run => (cfg.rank_energy / self.retained.max(f64::MIN_POSITIVE)).min(1.0),
            RankBudget::Event => cfg.rank_energy,
        };
        rank_by_energy(&self.signal, tau, cfg.rank_min, self.rank_cap(cfg, initial_rank))
    }

    /// The largest rank the module may keep: min(r, rank_max or the initial rank).
    fn rank_cap(&self, cfg: &GritConfig, initial_rank: usize) -> usize {
        self.r.min(cfg.rank_max.unwrap_or(initial_rank))
    }

    /// The cut that keeps the first `k` directions.
    pub fn cut(&self, k: usize, cfg: &GritConfig) -> Cut {
        let r = self.r;
        assert!((1..=r).contains(&k), "Spectrum::cut: keep {k} of {r} directions");
        // r×k: the kept columns of L, strongest signal first.
        let first = |m: &[f64]| -> Vec<f64> {
            (0..r).flat_map(|i| m[i * r..i * r + k].iter().copied()).collect()
        };
        let va = first(&self.l);
        // B's kept basis, and the share of Σ_g's energy in it.
        let (w, proj_g, energy_g) = match &self.basis {
            Basis::OneSided => (va.clone(), None, captured_share(&self.sigma_g, &va, r, k)),
            Basis::TwoSided(eg) => {
                let vg = eg.top(k);
                let p_g = linalg::matmul(&vg, &linalg::transpose(&vg, r, k), r, k, r);
                let w = linalg::matmul(&p_g, &va, r, r, k);
                (w, Some(p_g), captured_energy(&eg.values, k))
            }
            Basis::Paired(w) => {
                let w = first(w);
                let q = linalg::orthonormal_columns(&w, r, k);
                let share = captured_share(&self.sigma_g, &q, r, q.len() / r);
                (w, None, share)
            }
        };
        let (l, w, n, proj_a, proj_g) = match cfg.rank_cut {
            // Nothing is cut (k = r, where P_g = P_a = I): keep A and B as they are rather
            // than rotating them into the eigenbasis, which changes neither the function nor
            // the parameter count, and would only perturb Adam's per-coordinate v.
            _ if k == r => (linalg::identity(r), linalg::identity(r), r, None, None),
            RankCut::Hard => (va, w, k, None, None),
            RankCut::Soft => {
                let p_a = linalg::matmul(&va, &linalg::transpose(&va, r, k), r, k, r);
                let p_g = proj_g.unwrap_or_else(|| p_a.clone());
                (p_a.clone(), p_g.clone(), r, Some(p_a), Some(p_g))
            }
        };
        let report = ReprojectReport {
            module: self.name.clone(),
            rank_before: r,
            rank_after: n,
            kept: k,
            energy: captured_energy(&self.signal, k),
            eff_rank: effective_rank(&self.eigenvalues),
            energy_g,
            eigenvalues: self.eigenvalues.clone(),
        };
        Cut { kind: cfg.rank_cut, r, k, l, w, proj_a, proj_g, report }
    }
}

/// The Fisher directions of a module (`--rank-signal fisher`). Under K-FAC the loss cost of
/// changing the update by B·D·A (D r×r, in rank space) is ½·‖Σ_g^½·D·Σ_a^½‖²_F, so the best
/// rank-k update replaces the identity between B and A by P = Σ_a^½·Q_k·Q_kᵀ·Σ_a^-½, with Q
/// the eigenvectors of N = Σ_a^½·Σ_g·Σ_a^½ (the right singular vectors of Σ_g^½·Σ_a^½), and
/// the cut costs the sum of the dropped eigenvalues of N: those are the signal. As A_new = Lᵀ·A,
/// B_new = B·W: L = c·Σ_a^-½·Q, W = Σ_a^½·Q / c, with c² = tr(Σ_a)/r so the new rank-space
/// inputs keep the old mean variance (Σ_a' = c²·I). Directions of Σ_a with no energy
/// (≤ 1e-12 of the largest) carry no input and are left out of Σ_a^-½.
fn fisher_directions(ea: &linalg::Eigh, sigma_g: &[f64]) -> (Vec<f64>, Vec<f64>, Basis) {
    let r = ea.n;
    let top = ea.values[0].max(0.0);
    let spectral = |f: &dyn Fn(f64) -> f64| {
        let d: Vec<f64> = ea.values.iter().map(|&v| f(v)).collect();
        let vd: Vec<f64> = (0..r * r).map(|x| ea.vectors[x] * d[x % r]).collect();
        linalg::matmul(&vd, &linalg::transpose(&ea.vectors, r, r), r, r, r)
    };
    let sqrt_a = spectral(&|v| v.max(0.0).sqrt());
    let isqrt_a = spectral(&|v| if v > 1e-12 * top { 1.0 / v.sqrt() } else { 0.0 });
    let n = linalg::matmul(&linalg::matmul(&sqrt_a, sigma_g, r, r, r), &sqrt_a, r, r, r);
    let en = linalg::eigh(&n, r);
    let c = (ea.values.iter().map(|v| v.max(0.0)).sum::<f64>() / r as f64).sqrt();
    let l: Vec<f64> =
        linalg::matmul(&isqrt_a, &en.vectors, r, r, r).iter().map(|x| x * c).collect();
    let w: Vec<f64> = linalg::matmul(&sqrt_a, &en.vectors, r, r, r).iter().map(|x| x / c).collect();
    (en.values.iter().map(|v| v.max(0.0)).collect(), l, Basis::Paired(w))
}

/// The share of tr(Σ) (r×r) inside the span of the orthonormal columns `q` (r×k):
/// tr(qᵀ·Σ·q)/tr(Σ) (1 for Σ with no energy).
fn captured_share(sigma: &[f64], q: &[f64], r: usize, k: usize) -> f64 {
    let total = linalg::trace(sigma, r);
    if total > 0.0 {
        linalg::trace(&linalg::congruence(sigma, q, r, k), k) / total
    } else {
        1.0
    }
}

/// The ranks of one budget over every module (`--rank-scope global`): each module keeps its
/// first `rank_min` directions; the others are taken by signal per trainable parameter
/// (`cost`: d_in + d_out, what one direction of the module costs), strongest first, until
/// the kept signal reaches τ of the total over all modules. Directions above a module's cap
/// (min(r, rank_max or `initial_rank`)) are never kept but count in the total. None entries
/// (modules without statistics) stay None; before `rank_start` every module keeps r.
pub fn global_ranks(
    spectra: &[Option<(&Spectrum, usize)>],
    cfg: &GritConfig,
    step: usize,
    initial_rank: usize,
) -> Vec<Option<usize>> {
    if step < cfg.rank_start() {
        return spectra.iter().map(|s| s.map(|(sp, _)| sp.r)).collect();
    }
    let bounds: Vec<Option<(usize, usize)>> = spectra
        .iter()
        .map(|s| {
            s.map(|(sp, _)| {
                let hi = sp.rank_cap(cfg, initial_rank).max(1);
                (cfg.rank_min.clamp(1, hi), hi)
            })
        })
        .collect();
    let total: f64 =
        spectra.iter().flatten().flat_map(|(sp, _)| sp.signal.iter()).map(|&v| energy_of(v)).sum();
    if total <= 0.0 {
        return bounds.iter().map(|b| b.map(|(_, hi)| hi)).collect();
    }
    let mut ks: Vec<Option<usize>> = bounds.iter().map(|b| b.map(|(lo, _)| lo)).collect();
    let mut kept: f64 = spectra
        .iter()
        .zip(&ks)
        .filter_map(|(s, k)| {
            Some(s.as_ref()?.0.signal[..(*k)?].iter().map(|&v| energy_of(v)).sum::<f64>())
        })
        .sum();
    // Candidates beyond the floor, by signal per parameter (within a module that order is
    // the signal's own, so a module's kept directions are always its first k).
    let mut cand: Vec<(f64, usize, usize)> = Vec::new();
    for (i, (s, b)) in spectra.iter().zip(&bounds).enumerate() {
        if let (Some((sp, cost)), Some((lo, hi))) = (s, b) {
            for j in *lo..*hi {
                cand.push((energy_of(sp.signal[j]) / (*cost).max(1) as f64, i, j));
            }
        }
    }
    cand.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    for (_, i, j) in cand {
        if kept >= cfg.rank_energy * total {
            break;
        }
        let sp = spectra[i].as_ref().map(|s| s.0).expect("a candidate has a spectrum");
        kept += energy_of(sp.signal[j]);
        ks[i] = Some(j + 1);
    }
    ks
}

impl Cut {
    /// Plans the reprojection of module `m` at optimizer step `step` (1-based count of
    /// completed steps) with τ over the module's own signal: [`Spectrum::of`],
    /// [`Spectrum::module_rank`], [`Spectrum::cut`]. Returns None for a module without
    /// statistics.
    pub fn plan(
        m: &ModuleKfac,
        gram_b: &[f64],
        cfg: &GritConfig,
        step: usize,
        initial_rank: usize,
    ) -> Option<Cut> {
        let s = Spectrum::of(m, gram_b, cfg)?;
        Some(s.cut(s.module_rank(cfg, step, initial_rank), cfg))
    }

    /// The module's rank after the cut (the shapes of the new A and B).
    pub fn new_rank(&self) -> usize {
        self.l.len() / self.r
    }

    /// Whether the cut keeps every direction (k = r): A, B, moments and statistics stay as
    /// they are (L = W = I), so the trainer can skip rebuilding the module. The report is
    /// still meaningful.
    pub fn is_noop(&self) -> bool {
        self.k == self.r
    }

    /// A_new = Lᵀ·A: A r×d_in → n×d_in (row-major, f32).
    pub fn apply_a(&self, a: &[f32], d_in: usize) -> Vec<f32> {
        left_t(&self.l, self.r, self.new_rank(), a, d_in)
    }
    /// B_new = B·W: B d_out×r → d_out×n (row-major, f32).
    pub fn apply_b(&self, b: &[f32], d_out: usize) -> Vec<f32> {
        right(b, d_out, &self.w, self.r, self.new_rank())
    }
    /// Adam moments of A (r×d_in each): m' = Wᵀ·m, v' = (W∘W)ᵀ·v.
    pub fn apply_moments_a(&self, m: &[f32], v: &[f32], d_in: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.new_rank();
        let w2: Vec<f64> = self.w.iter().map(|x| x * x).collect();
        (left_t(&self.w, self.r, n, m, d_in), left_t(&w2, self.r, n, v, d_in))
    }
    /// Adam moments of B (d_out×r each): m' = m·L, v' = v·(L∘L).
    pub fn apply_moments_b(&self, m: &[f32], v: &[f32], d_out: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.new_rank();
        let l2: Vec<f64> = self.l.iter().map(|x| x * x).collect();
        (right(m, d_out, &self.l, self.r, n), right(v, d_out, &l2, self.r, n))
    }
    /// Rotates the module's statistics into the new coordinates: Σ_a' = Lᵀ·Σ_a·L,
    /// Σ_g' = Wᵀ·Σ_g·W; stores P_a, P_g (soft) or clears them (hard).
    pub fn apply_stats(&self, m: &mut ModuleKfac) {
        assert_eq!(
            m.rank, self.r,
            "Cut::apply_stats: module has rank {}, the cut was planned for {}",
            m.rank, self.r
        );
        let n = self.new_rank();
        let sa = linalg::congruence(&m.sigma_a, &self.l, self.r, n);
        let sg = linalg::congruence(&m.sigma_g, &self.w, self.r, n);
        m.set_factors(n, sa, sg);
        m.proj_a = self.proj_a.clone();
        m.proj_g = self.proj_g.clone();
        if !self.is_noop() {
            m.retained *= self.report.energy;
        }
    }
}

/// BᵀB (r×r row-major, f64) of B (d_out×r row-major): for the rank rule's output-energy signal
/// ([`Cut::plan`]).
pub fn gram_b(b: &[f32], d_out: usize, r: usize) -> Vec<f64> {
    assert_eq!(b.len(), d_out * r, "gram_b: {} values, expected {d_out}×{r}", b.len());
    let b: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    linalg::matmul_tn(&b, &b, d_out, r, r)
}

/// Per eigenvector v_j of Σ_a (the columns of `ea`), what the rank rule weighs: λ_j
/// (input, `output` false) or λ_j·v_jᵀ·(BᵀB)·v_j = λ_j·‖B·v_j‖² (output; these sum to
/// tr(BᵀB·Σ_a) = E‖B·u‖², and the directions kept by a cut keep exactly their sum). Negative
/// eigenvalues (rounding) count as 0. (The Fisher signal has directions of its own:
/// [`Spectrum::of`].)
pub fn direction_signal(ea: &linalg::Eigh, gram_b: &[f64], output: bool) -> Vec<f64> {
    let r = ea.n;
    (0..r)
        .map(|j| {
            let lambda = ea.values[j].max(0.0);
            if !output {
                lambda
            } else {
                {
                    let v = |i: usize| ea.vectors[i * r + j];
                    let q: f64 = (0..r)
                        .map(|i| v(i) * (0..r).map(|c| gram_b[i * r + c] * v(c)).sum::<f64>())
                        .sum();
                    lambda * q.max(0.0)
                }
            }
        })
        .collect()
}

/// Mᵀ·X for M r×n (f64) and X r×cols (f32) → n×cols (f32).
fn left_t(mat: &[f64], r: usize, n: usize, x: &[f32], cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), r * cols, "left_t: {} values, expected {r}×{cols}", x.len());
    let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    linalg::matmul_tn(mat, &xf, r, n, cols).into_iter().map(|v| v as f32).collect()
}

/// X·M for X rows×r (f32) and M r×n (f64) → rows×n (f32).
fn right(x: &[f32], rows: usize, mat: &[f64], r: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * r, "right: {} values, expected {rows}×{r}", x.len());
    let xf: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    linalg::matmul(&xf, mat, rows, r, n).into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grit::config::{KfacStats, RankScope};
    use crate::grit::stats::KfacState;

    #[test]
    fn energy_rule_and_spectrum_measures() {
        let v = [4.0, 3.0, 2.0, 1.0]; // cumulative shares 0.4, 0.7, 0.9, 1.0
        assert_eq!(rank_by_energy(&v, 0.4, 1, 4), 1);
        assert_eq!(rank_by_energy(&v, 0.41, 1, 4), 2);
        assert_eq!(rank_by_energy(&v, 0.7, 1, 4), 2);
        assert_eq!(rank_by_energy(&v, 0.9, 1, 4), 3);
        assert_eq!(rank_by_energy(&v, 0.95, 1, 4), 4);
        assert_eq!(rank_by_energy(&v, 0.4, 3, 4), 3); // clamped up to rank_min
        assert_eq!(rank_by_energy(&v, 1.0, 1, 2), 2); // clamped down to rank_max
        assert_eq!(rank_by_energy(&v, 0.5, 8, 3), 3); // rank_min above the bound
        assert_eq!(rank_by_energy(&[0.0; 3], 0.9, 1, 3), 3);
        assert_eq!(rank_by_energy(&[1.0, -1e-18, -1e-17], 0.999, 1, 3), 1);
        assert!((captured_energy(&v, 2) - 0.7).abs() < 1e-15);
        assert!((effective_rank(&[1.0; 8]) - 8.0).abs() < 1e-12);
        assert!((effective_rank(&[5.0, 0.0, 0.0]) - 1.0).abs() < 1e-15);
        assert_eq!(effective_rank(&[0.0, 0.0]), 0.0);
    }

    fn rnd(seed: u64, n: usize) -> Vec<f64> {
        let mut s = seed ^ 0x9e3779b97f4a7c15;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    /// A module with statistics from synthetic u and g samples (t tokens), plus A and B.
    fn setup(
        r: usize,
        d_in: usize,
        d_out: usize,
        t: usize,
    ) -> (ModuleKfac, Vec<f32>, Vec<f32>, Vec<f64>, Vec<f64>) {
        // u = A·x with x random, g random with a decaying spectrum.
        let a: Vec<f32> = rnd(1, r * d_in)
            .iter()
            .enumerate()
            .map(|(i, &v)| (v * (1.0 / (1.0 + (i / d_in) as f64))) as f32)
            .collect();
        let b: Vec<f32> = rnd(2, d_out * r).iter().map(|&v| v as f32).collect();
        let x = rnd(3, d_in * t); // d_in×t
        let af: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let u = linalg::matmul(&af, &x, r, d_in, t); // r×t
        let g: Vec<f64> =
            rnd(4, r * t).iter().enumerate().map(|(i, &v)| v / (1.0 + (i / t) as f64)).collect();
        let gram = |v: &[f64]| {
            linalg::matmul(v, &linalg::transpose(v, r, t), r, t, r)
                .iter()
                .map(|x| x / t as f64)
                .collect::<Vec<_>>()
        };
        let mut st =
            KfacState::with_modules([("blk.0.attn_q.weight".to_string(), r)], KfacStats::Ema, 0.95);
        let (sa, sg) = (gram(&u), gram(&g));
        st.accumulate(
            0,
            &sa.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            &sg.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            t,
            1.0,
        );
        st.commit();
        (st.modules.remove(0), a, b, u, g)
    }

    #[test]
    fn hard_cut_equals_the_projected_product_and_rotates_everything_consistently() {
        let (r, d_in, d_out, t) = (8, 12, 10, 40);
        for two_sided in [true, false] {
            let (m, a, b, u, g) = setup(r, d_in, d_out, t);
            let cfg = GritConfig {
                rank_energy: 0.8,
                rank_min: 2,
                two_sided,
                rank_signal: RankSignal::Input,
                ..GritConfig::default()
            };
            let gb = gram_b(&b, d_out, r);
            let cut = Cut::plan(&m, &gb, &cfg, 100, r).unwrap();
            let k = cut.k;
            let ea = linalg::eigh(&m.sigma_a, r);
            assert_eq!(k, rank_by_energy(&ea.values, 0.8, 2, r));
            assert!(k < r, "the test spectrum should be cut (k = {k})");
            assert_eq!(cut.new_rank(), k);
            let (an, bn) = (cut.apply_a(&a, d_in), cut.apply_b(&b, d_out));
            assert_eq!((an.len(), bn.len()), (k * d_in, d_out * k));
            // B_new·A_new = B·P_g·P_a·A (f64 host), to float tolerance.
            let va = ea.top(k);
            let vg = if two_sided { linalg::eigh(&m.sigma_g, r).top(k) } else { va.clone() };
            let p = |v: &[f64]| linalg::matmul(v, &linalg::transpose(v, r, k), r, k, r);
            let af: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            let bf: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            let want = linalg::matmul(
                &linalg::matmul(&linalg::matmul(&bf, &p(&vg), d_out, r, r), &p(&va), d_out, r, r),
                &af,
                d_out,
                r,
                d_in,
            );
            let got = linalg::matmul(
                &bn.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &an.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                d_out,
                k,
                d_in,
            );
            let scale = linalg::max_abs(&want);
            let err =
                linalg::max_abs(&want.iter().zip(&got).map(|(x, y)| x - y).collect::<Vec<_>>());
            assert!(
                err <= 1e-6 * scale,
                "two_sided {two_sided}: |B'A' − B·P_g·P_a·A| = {err:e} (scale {scale:e})"
            );
            // The soft cut gives the same product with the shapes kept.
            let soft =
                Cut::plan(&m, &gb, &GritConfig { rank_cut: RankCut::Soft, ..cfg.clone() }, 100, r)
                    .unwrap();
            assert_eq!(soft.new_rank(), r);
            let (asf, bsf) = (soft.apply_a(&a, d_in), soft.apply_b(&b, d_out));
            let got_s = linalg::matmul(
                &bsf.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &asf.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                d_out,
                r,
                d_in,
            );
            let err_s =
                linalg::max_abs(&want.iter().zip(&got_s).map(|(x, y)| x - y).collect::<Vec<_>>());
            assert!(err_s <= 1e-6 * scale);
            // Rotated statistics = statistics of the rotated samples u' = Lᵀu, g' = Wᵀg.
            let mut m2 = m.clone();
            cut.apply_stats(&mut m2);
            assert_eq!(m2.rank, k);
            let u2 = linalg::matmul_tn(&cut.l, &u, r, k, t);
            let g2 = linalg::matmul_tn(&cut.w, &g, r, k, t);
            let gram = |v: &[f64]| {
                linalg::matmul(v, &linalg::transpose(v, k, t), k, t, k)
                    .iter()
                    .map(|x| x / t as f64)
                    .collect::<Vec<_>>()
            };
            for (s, want) in [(&m2.sigma_a, gram(&u2)), (&m2.sigma_g, gram(&g2))] {
                let e =
                    linalg::max_abs(&s.iter().zip(&want).map(|(x, y)| x - y).collect::<Vec<_>>());
                assert!(e <= 1e-6 * linalg::max_abs(&want), "rotated Σ differs by {e:e}");
            }
            // Σ_a' is diagonal with the kept eigenvalues.
            for i in 0..k {
                assert!((m2.sigma_a[i * k + i] - ea.values[i]).abs() <= 1e-6 * ea.values[0]);
            }
            if !two_sided {
                // One-sided: Σ_g' = V_a,kᵀ·Σ_g·V_a,k exactly as docs/GRIT.md states.
                let spec = linalg::congruence(&m.sigma_g, &va, r, k);
                assert!(
                    linalg::max_abs(
                        &spec.iter().zip(&m2.sigma_g).map(|(x, y)| x - y).collect::<Vec<_>>()
                    ) < 1e-12
                );
            }
            // Moments: first moments transform like the gradients; second stay non-negative.
            let ga: Vec<f32> = rnd(7, r * d_in).iter().map(|&v| v as f32).collect();
            let v2: Vec<f32> = ga.iter().map(|x| x * x).collect();
            let (ma, va2) = cut.apply_moments_a(&ga, &v2, d_in);
            assert_eq!(ma, left_t(&cut.w, r, k, &ga, d_in));
            assert!(va2.iter().all(|&x| x >= 0.0) && va2.len() == k * d_in);
            let gb: Vec<f32> = rnd(8, d_out * r).iter().map(|&v| v as f32).collect();
            let (mb, vb) =
                cut.apply_moments_b(&gb, &gb.iter().map(|x| x * x).collect::<Vec<_>>(), d_out);
            assert_eq!(mb, right(&gb, d_out, &cut.l, r, k));
            assert!(vb.iter().all(|&x| x >= 0.0) && vb.len() == d_out * k);
        }
    }

    #[test]
    fn no_cut_before_rank_start_and_none_without_statistics() {
        let (m, a, b, _, _) = setup(6, 9, 7, 30);
        let cfg = GritConfig {
            rank_energy: 0.5,
            rank_min: 1,
            rank_start: Some(50),
            two_sided: false,
            rank_signal: RankSignal::Input,
            ..GritConfig::default()
        };
        let gb = gram_b(&b, 7, 6);
        let cut = Cut::plan(&m, &gb, &cfg, 49, 6).unwrap();
        assert_eq!(cut.new_rank(), 6);
        assert!(cut.is_noop() && cut.l == linalg::identity(6) && cut.w == linalg::identity(6));
        assert!(cut.report.energy == 1.0 && cut.report.eff_rank > 1.0 && cut.report.eff_rank < 6.0);
        // k = r: nothing changes, the product is unchanged.
        let (an, bn) = (cut.apply_a(&a, 9), cut.apply_b(&b, 7));
        let prod = |b: &[f32], a: &[f32], k| {
            linalg::matmul(
                &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                7,
                k,
                9,
            )
        };
        let (p0, p1) = (prod(&b, &a, 6), prod(&bn, &an, 6));
        assert!(
            linalg::max_abs(&p0.iter().zip(&p1).map(|(x, y)| x - y).collect::<Vec<_>>()) < 1e-5
        );
        assert!(Cut::plan(&m, &gb, &cfg, 50, 6).unwrap().new_rank() < 6);
        // rank_max caps from rank_start on.
        let capped = Cut::plan(
            &m,
            &gb,
            &GritConfig { rank_energy: 1.0, rank_max: Some(3), ..cfg.clone() },
            50,
            6,
        )
        .unwrap();
        assert_eq!(capped.new_rank(), 3);
        assert!(Cut::plan(&ModuleKfac::new("x".into(), 4), &linalg::identity(4), &cfg, 100, 4)
            .is_none());
    }

    /// A module whose Σ_a is diag(`values`) (eigenvectors: the unit vectors), from one
    /// committed statistics update.
    fn diagonal_module(values: &[f64]) -> ModuleKfac {
        let r = values.len();
        let mut sa = vec![0f32; r * r];
        for (j, &v) in values.iter().enumerate() {
            sa[j * r + j] = v as f32;
        }
        let mut st =
            KfacState::with_modules([("blk.0.attn_q.weight".to_string(), r)], KfacStats::Ema, 0.95);
        st.accumulate(0, &sa, &sa, 1, 1.0);
        st.commit();
        st.modules.remove(0)
    }

    /// Indices j of the unit vectors e_j that the cut keeps (A_new = Lᵀ·A: column c of L).
    fn kept_units(cut: &Cut) -> Vec<usize> {
        let (r, n) = (cut.r, cut.new_rank());
        (0..n)
            .map(|c| (0..r).find(|&i| cut.l[i * n + c].abs() > 0.999).expect("a unit vector"))
            .collect()
    }

    #[test]
    fn the_output_signal_weighs_what_b_does_with_each_direction() {
        // Σ_a = diag(4, 3, 2, 1); B (d_out = 3) ignores the two strongest input directions.
        let m = diagonal_module(&[4.0, 3.0, 2.0, 1.0]);
        let b: Vec<f32> = vec![0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let gb = gram_b(&b, 3, 4);
        // Signals λ_j·‖B·e_j‖²: 0, 0, 2·5 = 10, 1·1.25 = 1.25; their sum is tr(BᵀB·Σ_a) = E‖B·u‖².
        let ea = linalg::eigh(&m.sigma_a, 4);
        let sig = direction_signal(&ea, &gb, true);
        assert!(
            sig.iter().zip([0.0, 0.0, 10.0, 1.25]).all(|(x, y)| (x - y).abs() < 1e-9),
            "{sig:?}"
        );
        let tr: f64 =
            (0..4).map(|i| (0..4).map(|c| gb[i * 4 + c] * m.sigma_a[c * 4 + i]).sum::<f64>()).sum();
        assert!((sig.iter().sum::<f64>() - tr).abs() < 1e-9);
        let cfg = GritConfig {
            rank_energy: 0.85,
            rank_min: 1,
            rank_start: Some(0),
            two_sided: false,
            rank_signal: RankSignal::Output,
            ..GritConfig::default()
        };
        // Output: 10 / 11.25 = 0.89 ≥ 0.85 → keep e_2 only. Input: 4, 3 → 0.7 < 0.85, + 2 → 0.9 → e_0, e_1, e_2.
        let out = Cut::plan(&m, &gb, &cfg, 1, 4).unwrap();
        assert_eq!(kept_units(&out), vec![2]);
        assert!((out.report.energy - 10.0 / 11.25).abs() < 1e-9);
        let inp =
            Cut::plan(&m, &gb, &GritConfig { rank_signal: RankSignal::Input, ..cfg.clone() }, 1, 4)
                .unwrap();
        assert_eq!(kept_units(&inp), vec![0, 1, 2]);
        // While B is zero the update has no output energy: nothing is cut.
        assert!(Cut::plan(&m, &[0.0; 16], &cfg, 1, 4).unwrap().is_noop());
    }

    #[test]
    fn the_run_budget_does_not_ratchet_and_the_event_budget_does() {
        // Input signal for round numbers: Σ_a = diag(5, 2, 2, 1), τ = 0.7.
        let m = diagonal_module(&[5.0, 2.0, 2.0, 1.0]);
        let gb = linalg::identity(4);
        let run = GritConfig {
            rank_energy: 0.7,
            rank_min: 1,
            rank_start: Some(0),
            two_sided: false,
            rank_signal: RankSignal::Input,
            rank_budget: RankBudget::Run,
            ..GritConfig::default()
        };
        let event = GritConfig { rank_budget: RankBudget::Event, ..run.clone() };
        for cfg in [&run, &event] {
            let first = Cut::plan(&m, &gb, cfg, 1, 4).unwrap();
            assert_eq!(first.k, 2, "(5 + 2) / 10 = 0.7");
            let mut m2 = m.clone();
            first.apply_stats(&mut m2);
            assert!((m2.retained - 0.7).abs() < 1e-12);
            // The same statistics again: Σ_a' = diag(5, 2). The run budget needs 0.7 / 0.7 = all
            // of it (k = 2, no cut); the event budget takes 0.7 of the rest, 5 / 7 = 0.71 (k = 1).
            let second = Cut::plan(&m2, &linalg::identity(2), cfg, 2, 4).unwrap();
            let want = if cfg.rank_budget == RankBudget::Run { 2 } else { 1 };
            assert_eq!(second.k, want, "{:?}", cfg.rank_budget);
        }
        // At the end of its budget (kept 0.7 = τ) a module can still lose directions that carry
        // no signal: the cut is free, and the share kept stays 0.7.
        let mut m3 = diagonal_module(&[1.0, 0.0]);
        m3.retained = 0.7;
        let c = Cut::plan(&m3, &linalg::identity(2), &run, 3, 4).unwrap();
        assert_eq!(c.k, 1, "a direction with no signal is dropped at no cost");
        let mut m4 = m3.clone();
        c.apply_stats(&mut m4);
        assert!((m4.retained - 0.7).abs() < 1e-12);
    }

    /// tr(Σ_g·(I − P)·Σ_a·(I − P)ᵀ): the K-FAC Fisher cost of replacing B·A by B·P·A.
    fn fisher_cost(m: &ModuleKfac, p: &[f64]) -> f64 {
        let r = m.rank;
        let d: Vec<f64> = linalg::identity(r).iter().zip(p).map(|(i, p)| i - p).collect();
        let dsa = linalg::matmul(&d, &m.sigma_a, r, r, r);
        let inner = linalg::matmul(&dsa, &linalg::transpose(&d, r, r), r, r, r);
        linalg::trace(&linalg::matmul(&m.sigma_g, &inner, r, r, r), r)
    }

    #[test]
    fn the_fisher_cut_is_the_best_rank_k_update_in_the_fisher_metric() {
        let (r, d_in, d_out, t) = (8, 12, 10, 40);
        let (m, a, b, _, _) = setup(r, d_in, d_out, t);
        let gb = gram_b(&b, d_out, r);
        let cfg = GritConfig {
            rank_energy: 0.8,
            rank_min: 2,
            rank_start: Some(0),
            rank_signal: RankSignal::Fisher,
            ..GritConfig::default()
        };
        let spec = Spectrum::of(&m, &gb, &cfg).unwrap();
        let total: f64 = spec.signal.iter().sum();
        assert!(spec.signal.windows(2).all(|w| w[0] >= w[1]) && total > 0.0);
        let cut = Cut::plan(&m, &gb, &cfg, 1, r).unwrap();
        let k = cut.k;
        assert_eq!(k, rank_by_energy(&spec.signal, 0.8, 2, r));
        assert!(k < r, "the test spectrum should be cut (k = {k})");
        // P = W·Lᵀ: what the cut leaves between B and A.
        let p = linalg::matmul(&cut.w, &linalg::transpose(&cut.l, r, k), r, k, r);
        let cost = fisher_cost(&m, &p);
        let dropped: f64 = spec.signal[k..].iter().sum();
        assert!((cost - dropped).abs() <= 1e-9 * total, "cost {cost:e}, dropped {dropped:e}");
        // No other rank-k cut does better: the eigenvector cuts of the input signal (one- and
        // two-sided) and random projections cost more.
        for two_sided in [true, false] {
            let other = Spectrum::of(
                &m,
                &gb,
                &GritConfig { rank_signal: RankSignal::Input, two_sided, ..cfg.clone() },
            )
            .unwrap()
            .cut(k, &cfg);
            let po = linalg::matmul(&other.w, &linalg::transpose(&other.l, r, k), r, k, r);
            assert!(fisher_cost(&m, &po) > cost * (1.0 + 1e-9), "two_sided {two_sided}");
        }
        for seed in 0..5 {
            let q = linalg::orthonormal_columns(&rnd(20 + seed, r * k), r, k);
            let pq = linalg::matmul(&q, &linalg::transpose(&q, r, k), r, k, r);
            assert!(fisher_cost(&m, &pq) > cost);
        }
        // The new adapter is that product, and its statistics are Σ_a' = c²·I (c² = tr Σ_a / r)
        // and Σ_g' = diag(kept signal) / c².
        let (an, bn) = (cut.apply_a(&a, d_in), cut.apply_b(&b, d_out));
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let got = linalg::matmul(&f(&bn), &f(&an), d_out, k, d_in);
        let want = linalg::matmul(&linalg::matmul(&f(&b), &p, d_out, r, r), &f(&a), d_out, r, d_in);
        let scale = linalg::max_abs(&want);
        let err = linalg::max_abs(&want.iter().zip(&got).map(|(x, y)| x - y).collect::<Vec<_>>());
        assert!(err <= 1e-5 * scale, "|B'A' − B·P·A| = {err:e} (scale {scale:e})");
        let mut m2 = m.clone();
        cut.apply_stats(&mut m2);
        let c2 = linalg::trace(&m.sigma_a, r) / r as f64;
        for i in 0..k {
            for j in 0..k {
                let (sa, sg) = (m2.sigma_a[i * k + j], m2.sigma_g[i * k + j]);
                let (wa, wg) = if i == j { (c2, spec.signal[i] / c2) } else { (0.0, 0.0) };
                assert!((sa - wa).abs() <= 1e-6 * c2, "Σ_a'[{i},{j}] = {sa}");
                assert!((sg - wg).abs() <= 1e-6 * spec.signal[0] / c2, "Σ_g'[{i},{j}] = {sg}");
            }
        }
        // While B is zero (Σ_g = 0) nothing has a cost and nothing is cut.
        let mut m0 = m.clone();
        m0.sigma_g = vec![0.0; r * r];
        assert!(Cut::plan(&m0, &gb, &cfg, 1, r).unwrap().is_noop());
    }

    #[test]
    fn a_global_budget_keeps_signal_per_parameter_across_modules() {
        let spec = |name: &str, signal: Vec<f64>| Spectrum {
            name: name.into(),
            r: signal.len(),
            l: linalg::identity(signal.len()),
            basis: Basis::OneSided,
            eigenvalues: signal.clone(),
            sigma_g: linalg::identity(signal.len()),
            retained: 1.0,
            signal,
        };
        // Totals: 13 + 8 = 21. Floors (rank_min 1) keep 8 + 6 = 14; per parameter the next
        // directions are a1 (4), then a2, a3 and b1 (0.5 each; ties go to the first module).
        let (a, b) = (spec("a", vec![8.0, 4.0, 0.5, 0.5]), spec("b", vec![6.0, 1.0, 0.5, 0.5]));
        let set = [Some((&a, 1)), None, Some((&b, 2))];
        let cfg = GritConfig {
            rank_min: 1,
            rank_start: Some(10),
            rank_signal: RankSignal::Fisher,
            rank_scope: RankScope::Global,
            ..GritConfig::default()
        };
        let ranks = |tau: f64, step: usize| {
            global_ranks(&set, &GritConfig { rank_energy: tau, ..cfg.clone() }, step, 4)
        };
        assert_eq!(ranks(0.85, 10), vec![Some(2), None, Some(1)], "14 + 4 = 18 ≥ 17.85");
        assert_eq!(ranks(0.9, 10), vec![Some(4), None, Some(1)], "18 + 0.5 + 0.5 ≥ 18.9");
        assert_eq!(ranks(0.93, 10), vec![Some(4), None, Some(2)], "19 + 1 ≥ 19.53");
        assert_eq!(ranks(1.0, 10), vec![Some(4), None, Some(4)]);
        assert_eq!(ranks(0.5, 10), vec![Some(1), None, Some(1)], "the floors");
        assert_eq!(ranks(0.5, 9), vec![Some(4), None, Some(4)], "before rank_start");
        // rank_max caps (the capped directions still count in the total).
        let capped = GritConfig { rank_energy: 1.0, rank_max: Some(3), ..cfg.clone() };
        assert_eq!(global_ranks(&set, &capped, 10, 4), vec![Some(3), None, Some(3)]);
        // A global budget needs the Fisher signal and the event budget.
        assert!(cfg.validate().is_ok());
        assert!(GritConfig { rank_signal: RankSignal::Output, ..cfg.clone() }.validate().is_err());
        assert!(GritConfig { rank_budget: RankBudget::Run, ..cfg.clone() }.validate().is_err());
        assert!(GritConfig { rank_cut: RankCut::Soft, rank_scope: RankScope::Module, ..cfg }
            .validate()
            .is_err());
    }
}
