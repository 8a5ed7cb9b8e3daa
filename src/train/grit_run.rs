//! `--method grit` in the training loop: the host-side state of GRIT (K-FAC statistics,
//! event schedule, preconditioners, regularizer coefficients), the events that follow a step
//! (inversion, reprojection with real rank cuts) and their checkpoint form.
//!
//! The call sequence is the one documented in [`crate::grit`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ggml::Backend;
use crate::grit::{
    regularize,
    reproject::{global_ranks, gram_b, Spectrum},
    stats, GritConfig, KfacState, Preconditioner, RankScope, Schedule,
};
use crate::model::{LoraSet, ModelError, Weights};
use crate::rundir::{DampingReport, GritEvent, InvertRow, MetricsRow, ReprojectRow};

use super::engine::OptState;

/// GRIT's host-side state during a run.
pub struct GritRun {
    pub cfg: GritConfig,
    /// The rank every module started with (`--rank`): the default rank ceiling.
    pub initial_rank: usize,
    pub kfac: KfacState,
    pub schedule: Schedule,
    /// Per module: the current damped inverses (identity until the first inversion).
    pub precond: Vec<Preconditioner>,
    /// Whether `precond` holds inverses (an inversion happened).
    pub inverted: bool,
    /// Per module: the regularizer coefficients (C_a, C_g).
    pub coeffs: Vec<(Vec<f64>, Vec<f64>)>,
    /// Σ_m r_m·(d_in + d_out) at step 0.
    pub params_initial: usize,
}

/// The checkpoint form of [`GritRun`] (in `state.json` under `"grit"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GritCheckpoint {
    /// Per module (LoraSet order): the current rank.
    pub ranks: Vec<usize>,
    pub kfac: KfacState,
    pub schedule: Schedule,
    /// Per module: (left_a, right_b), r×r row-major each.
    pub precond: Vec<(Vec<f64>, Vec<f64>)>,
    pub inverted: bool,
    pub params_initial: usize,
}

/// A LoRA set and optimizer state with new shapes (after a reprojection).
pub type Replacement = (LoraSet, OptState);

impl GritRun {
    /// A fresh state for `lora` (every module at `initial_rank`).
    pub fn new(cfg: &GritConfig, lora: &LoraSet, initial_rank: usize) -> Self {
        let kfac = KfacState::new(lora, cfg.kfac_stats, cfg.kfac_beta);
        let precond = lora.modules().iter().map(|m| Preconditioner::identity(m.rank)).collect();
        let mut g = GritRun {
            cfg: cfg.clone(),
            initial_rank,
            kfac,
            schedule: Schedule::new(cfg),
            precond,
            inverted: false,
            coeffs: Vec::new(),
            params_initial: lora.n_params(),
        };
        g.update_coeffs();
        g
    }

    /// The state saved in a checkpoint, restored (`cfg` is the run's configuration).
    pub fn from_checkpoint(cfg: &GritConfig, ck: GritCheckpoint, initial_rank: usize) -> Self {
        let precond = ck
            .precond
            .into_iter()
            .zip(&ck.ranks)
            .map(|((a, b), &r)| {
                let mut p = Preconditioner::identity(r);
                p.left_a = a;
                p.right_b = b;
                p
            })
            .collect();
        let mut g = GritRun {
            cfg: cfg.clone(),
            initial_rank,
            kfac: ck.kfac,
            schedule: ck.schedule,
            precond,
            inverted: ck.inverted,
            coeffs: Vec::new(),
            params_initial: ck.params_initial,
        };
        g.update_coeffs();
        g
    }

    pub fn checkpoint(&self, lora: &LoraSet) -> GritCheckpoint {
        GritCheckpoint {
            ranks: lora.modules().iter().map(|m| m.rank).collect(),
            kfac: self.kfac.clone(),
            schedule: self.schedule.clone(),
            precond: self.precond.iter().map(|p| (p.left_a.clone(), p.right_b.clone())).collect(),
            inverted: self.inverted,
            params_initial: self.params_initial,
        }
    }

    /// Recomputes the regularizer coefficients from the current statistics.
    pub fn update_coeffs(&mut self) {
        self.coeffs = self
            .kfac
            .modules
            .iter()
            .map(|m| regularize::coefficients(m, self.cfg.lambda_k, self.cfg.lambda_r))
            .collect();
    }

    /// The preconditioners step t uses: the inverses once computed and after `ng_warmup`,
    /// else the identity.
    pub fn step_precond(&self, step: usize) -> Vec<Preconditioner> {
        if self.inverted && self.schedule.precondition_active(step, &self.cfg) {
            self.precond.clone()
        } else {
            self.precond.iter().map(|p| Preconditioner::identity(p.rank)).collect()
        }
    }

    /// Folds one micro-batch's statistics in (`sigmas` in module order).
    pub fn accumulate(&mut self, sigmas: &[stats::FactorPair], n_counted: usize) {
        for (i, (sa, sg)) in sigmas.iter().enumerate() {
            self.kfac.accumulate(i, sa, sg, n_counted, 1.0);
        }
    }

    /// Ends a statistics step.
    pub fn commit(&mut self) {
        self.kfac.commit();
        self.update_coeffs();
    }

    /// Recomputes every module's damped inverses after step t; returns the metrics row.
    pub fn invert(&mut self, step: usize) -> MetricsRow {
        self.precond = self
            .kfac
            .modules
            .iter()
            .map(|m| Preconditioner::for_module(m, &self.cfg, self.schedule.lambda_abs))
            .collect();
        self.inverted = true;
        let n = self.precond.len().max(1) as f64;
        let mean_a = self.precond.iter().map(|p| p.inv_a.lambda_used).sum::<f64>() / n;
        let mean_g = self.precond.iter().map(|p| p.inv_g.lambda_used).sum::<f64>() / n;
        let escalated =
            self.precond.iter().filter(|p| p.inv_a.attempt > 0 || p.inv_g.attempt > 0).count();
        let fallbacks = self
            .precond
            .iter()
            .filter(|p| p.inv_a.fallback.is_some() || p.inv_g.fallback.is_some())
            .count();
        let lambda_abs = self.schedule.lambda_abs;
        let change = self.schedule.on_inversion(step, &self.cfg);
        MetricsRow::Event(GritEvent::Invert(InvertRow {
            damping: DampingReport {
                escalated,
                fallbacks,
                lambda_abs,
                mean_sigma_a: mean_a,
                mean_sigma_g: mean_g,
                mode: self.cfg.damping,
            },
            interval: change.after,
            next: change.next,
            step,
        }))
    }

    /// Reprojects every module with statistics after step t. Returns the metrics row and,
    /// when a module changed, the new LoRA set and optimizer state (the caller swaps them in
    /// and rebuilds its graphs).
    ///
    /// Optimizer moments of a cut module follow the parameters' linear map (see
    /// [`Cut::apply_moments_a`]): the first moment is a linear average of past gradients, so
    /// it is mapped exactly as the gradients of the new coordinates would be; the second
    /// moment is mapped with the squared coefficients (exact for coordinates that are kept
    /// unrotated, a diagonal approximation otherwise). Accumulators are zero between steps.
    pub fn reproject(
        &mut self,
        step: usize,
        weights: &Weights,
        lora: &LoraSet,
        opt: &OptState,
        backend: &Backend,
    ) -> Result<(ReprojectRow, Option<Replacement>), ModelError> {
        let mut specs = Vec::new();
        let mut data = Vec::new();
        let mut changed = false;
        let (mut ranks, mut energy, mut eff_rank) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let mut cut_modules = Vec::new();
        // Every module's directions first: a global budget weighs them all at once.
        let mut bs = Vec::with_capacity(lora.modules().len());
        let mut spectra = Vec::with_capacity(lora.modules().len());
        for (i, m) in lora.modules().iter().enumerate() {
            let b = lora.read_b(i)?;
            spectra.push(Spectrum::of(
                &self.kfac.modules[i],
                &gram_b(&b, m.d_out, m.rank),
                &self.cfg,
            ));
            bs.push(b);
        }
        let ks: Vec<Option<usize>> = match self.cfg.rank_scope {
            RankScope::Module => spectra
                .iter()
                .map(|s| s.as_ref().map(|s| s.module_rank(&self.cfg, step, self.initial_rank)))
                .collect(),
            RankScope::Global => {
                let with_cost: Vec<_> = spectra
                    .iter()
                    .zip(lora.modules())
                    .map(|(s, m)| s.as_ref().map(|s| (s, m.d_in + m.d_out)))
                    .collect();
                global_ranks(&with_cost, &self.cfg, step, self.initial_rank)
            }
        };
        for (i, (m, b)) in lora.modules().iter().zip(bs).enumerate() {
            let name = m.base_name();
            let cut = spectra[i].as_ref().zip(ks[i]).map(|(s, k)| s.cut(k, &self.cfg));
            if let Some(c) = &cut {
                energy.insert(name.clone(), c.report.energy);
                eff_rank.insert(name.clone(), c.report.eff_rank);
            }
            match cut {
                Some(c) if !c.is_noop() => {
                    changed = true;
                    let a = c.apply_a(&lora.read_a(i)?, m.d_in);
                    let b = c.apply_b(&b, m.d_out);
                    let (ma, va) = c.apply_moments_a(&opt.read(i, 0)?, &opt.read(i, 1)?, m.d_in);
                    let (mb, vb) = c.apply_moments_b(&opt.read(i, 3)?, &opt.read(i, 4)?, m.d_out);
                    c.apply_stats(&mut self.kfac.modules[i]);
                    specs.push((m.layer, m.target, c.new_rank(), m.scale));
                    data.push([a, b, ma, va, mb, vb]);
                    cut_modules.push(i);
                }
                _ => {
                    specs.push((m.layer, m.target, m.rank, m.scale));
                    data.push([
                        lora.read_a(i)?,
                        b,
                        opt.read(i, 0)?,
                        opt.read(i, 1)?,
                        opt.read(i, 3)?,
                        opt.read(i, 4)?,
                    ]);
                }
            }
            ranks.insert(name, specs[i].2);
        }
        let replacement = if changed {
            let new = LoraSet::with_modules(weights, &specs, backend)?;
            let new_opt = OptState::new(&new, backend)?;
            for (i, d) in data.iter().enumerate() {
                new.write_a(i, &d[0])?;
                new.write_b(i, &d[1])?;
                for (slot, k) in [(0usize, 2usize), (1, 3), (3, 4), (4, 5)] {
                    new_opt.write(i, slot, &d[k])?;
                }
            }
            for &i in &cut_modules {
                let r = self.kfac.modules[i].rank;
                self.precond[i] = if self.inverted {
                    Preconditioner::for_module(
                        &self.kfac.modules[i],
                        &self.cfg,
                        self.schedule.lambda_abs,
                    )
                } else {
                    Preconditioner::identity(r)
                };
            }
            self.update_coeffs();
            Some((new, new_opt))
        } else {
            None
        };
        let params: usize =
            specs.iter().zip(lora.modules()).map(|(s, m)| s.2 * (m.d_in + m.d_out)).sum();
        let change = self.schedule.on_reprojection(step, &self.cfg);
        let row = ReprojectRow {
            eff_rank,
            energy,
            interval: change.after,
            modules_cut: cut_modules.len(),
            next: change.next,
            ranks,
            step,
            trainable_params: params,
        };
        Ok((row, replacement))
    }
}

/// ‖s·B·A‖_F of module `i` (computed on the host via the r×r Gram matrices).
pub fn drift(lora: &LoraSet, i: usize) -> Result<f64, ModelError> {
    let m = &lora.modules()[i];
    let (a, b) = (lora.read_a(i)?, lora.read_b(i)?);
    let r = m.rank;
    // A r×d_in row-major, B d_out×r row-major. ‖BA‖² = Σ_jk (BᵀB)_jk (AAᵀ)_kj.
    let mut ga = vec![0f64; r * r];
    let mut gb = vec![0f64; r * r];
    for j in 0..r {
        for k in j..r {
            let s: f64 =
                (0..m.d_in).map(|c| a[j * m.d_in + c] as f64 * a[k * m.d_in + c] as f64).sum();
            ga[j * r + k] = s;
            ga[k * r + j] = s;
            let t: f64 = (0..m.d_out).map(|o| b[o * r + j] as f64 * b[o * r + k] as f64).sum();
            gb[j * r + k] = t;
            gb[k * r + j] = t;
        }
    }
    let sq: f64 = (0..r * r).map(|x| ga[x] * gb[x]).sum();
    Ok(m.scale as f64 * sq.max(0.0).sqrt())
}
