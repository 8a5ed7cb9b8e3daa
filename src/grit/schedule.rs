//! When GRIT's events happen (docs/docs/GRIT.md §3–5): statistics every `kfac_every` steps, inversions
//! and reprojections at adaptive intervals, the regularizer ramp and the reference's
//! loss-driven damping.
//!
//! Steps are counted 1-based: step t is the t-th optimizer step, and the `*_due` questions are
//! asked about the step being run (statistics, preconditioning) or just completed
//! (inversion, reprojection: their results apply from the next step).
//!
//! # Adaptive intervals, once per event
//! The reference adjusts its intervals after every step, which compounds into a random walk.
//! grit adjusts each interval once per event of its kind: after an inversion the inversion
//! interval, after a reprojection the reprojection interval, by [`trend_factor`]: × 1.5 when
//! the mean of the last 10 losses is below 0.99 × the mean of the 10 before (training
//! progresses: curvature changes less, refresh less often), else × 0.75; clamped to
//! [1, 1000] (K-FAC inversions) and [1, 2000] (reprojections). With fewer than 20 losses the
//! interval is kept. The next event is due `round(interval)` steps after this one.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::{Damping, GritConfig};

/// Losses kept for the trend (2 × 10) and the damping rule (20).
pub const LOSS_WINDOW: usize = 20;
/// Clamp of the inversion interval.
pub const INVERT_INTERVAL: (f64, f64) = (1.0, 1000.0);
/// Clamp of the reprojection interval.
pub const REPROJECT_INTERVAL: (f64, f64) = (1.0, 2000.0);

/// × 1.5 if mean(last 10) < 0.99 × mean(previous 10), else × 0.75; None with < 20 losses.
pub fn trend_factor(losses: &[f64]) -> Option<f64> {
    if losses.len() < 20 {
        return None;
    }
    let n = losses.len();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (prev, last) = (mean(&losses[n - 20..n - 10]), mean(&losses[n - 10..]));
    Some(if last < 0.99 * prev { 1.5 } else { 0.75 })
}

/// The reference's damping: clip(0.001 + std(last 20 losses), 1e-6, 0.01), with the
/// population standard deviation (ddof = 0). None with fewer than 2 losses.
pub fn loss_std_damping(losses: &[f64]) -> Option<f64> {
    let s = &losses[losses.len().saturating_sub(LOSS_WINDOW)..];
    if s.len() < 2 {
        return None;
    }
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    let std = (s.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / s.len() as f64).sqrt();
    Some((0.001 + std).clamp(1e-6, 0.01))
}

/// The regularizers' ramp at step t: min(1, t / warmup) (1 when warmup = 0).
pub fn reg_ramp(step: usize, warmup: usize) -> f64 {
    if warmup == 0 {
        1.0
    } else {
        (step as f64 / warmup as f64).min(1.0)
    }
}

/// What an event changed (for `metrics.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct IntervalChange {
    pub step: usize,
    /// The interval before and after the adjustment (steps, unrounded).
    pub before: f64,
    pub after: f64,
    /// The step at which the next event of this kind is due.
    pub next: usize,
}

/// The event clock and its state (checkpointed with serde, so `--resume` continues the
/// adapted intervals and damping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Current inversion interval (steps; adaptive).
    pub invert_every: f64,
    /// Current reprojection interval (steps; adaptive).
    pub reproject_every: f64,
    /// The step at which the next inversion is due.
    pub next_invert: usize,
    /// The step at which the next reprojection is due.
    pub next_reproject: usize,
    /// The last [`LOSS_WINDOW`] training losses.
    pub losses: VecDeque<f64>,
    /// λ_abs in use (absolute damping: the config's, then the loss-std rule if enabled).
    pub lambda_abs: f64,
    pub inversions: usize,
    pub reprojections: usize,
}

impl Schedule {
    /// The first inversion is due at step `invert_every`, the first reprojection at
    /// max(`reproject_every`, `reproject_warmup`).
    pub fn new(cfg: &GritConfig) -> Self {
        Schedule {
            invert_every: cfg.invert_every as f64,
            reproject_every: cfg.reproject_every as f64,
            next_invert: cfg.invert_every.max(1),
            next_reproject: cfg.reproject_every.max(cfg.reproject_warmup()).max(1),
            losses: VecDeque::with_capacity(LOSS_WINDOW),
            lambda_abs: cfg.lambda_abs(),
            inversions: 0,
            reprojections: 0,
        }
    }

    /// Records the training loss of a completed step.
    pub fn record_loss(&mut self, loss: f64) {
        if self.losses.len() == LOSS_WINDOW {
            self.losses.pop_front();
        }
        self.losses.push_back(loss);
    }

    /// Whether step t collects statistics: t = 1, 1 + kfac_every, 1 + 2·kfac_every, …
    /// (so the first inversion already has data).
    pub fn kfac_due(&self, step: usize, cfg: &GritConfig) -> bool {
        step >= 1 && (step - 1).is_multiple_of(cfg.kfac_every.max(1))
    }
    /// Whether step t's gradients are preconditioned (t > ng_warmup; the trainer uses the
    /// identity before the first inversion).
    pub fn precondition_active(&self, step: usize, cfg: &GritConfig) -> bool {
        step > cfg.ng_warmup
    }
    /// Whether the inverses are recomputed after step t.
    pub fn invert_due(&self, step: usize) -> bool {
        step >= self.next_invert
    }
    /// Whether a reprojection follows step t.
    pub fn reproject_due(&self, step: usize, cfg: &GritConfig) -> bool {
        step >= cfg.reproject_warmup() && step >= self.next_reproject
    }

    /// Call after the inversion that followed step t: adapts the inversion interval (if
    /// enabled), schedules the next one, and in absolute mode with `damping_adaptive` sets
    /// λ_abs by the loss-std rule (used from the next inversion on).
    pub fn on_inversion(&mut self, step: usize, cfg: &GritConfig) -> IntervalChange {
        self.inversions += 1;
        if cfg.damping == Damping::Absolute && cfg.damping_adaptive {
            if let Some(l) = loss_std_damping(self.losses.make_contiguous()) {
                self.lambda_abs = l;
            }
        }
        let before = self.invert_every;
        if cfg.adaptive_intervals {
            if let Some(f) = trend_factor(self.losses.make_contiguous()) {
                self.invert_every = (before * f).clamp(INVERT_INTERVAL.0, INVERT_INTERVAL.1);
            }
        }
        self.next_invert = step + (self.invert_every.round() as usize).max(1);
        IntervalChange { step, before, after: self.invert_every, next: self.next_invert }
    }

    /// Call after the reprojection that followed step t: adapts the reprojection interval
    /// (if enabled) and schedules the next one.
    pub fn on_reprojection(&mut self, step: usize, cfg: &GritConfig) -> IntervalChange {
        self.reprojections += 1;
        let before = self.reproject_every;
        if cfg.adaptive_intervals {
            if let Some(f) = trend_factor(self.losses.make_contiguous()) {
                self.reproject_every =
                    (before * f).clamp(REPROJECT_INTERVAL.0, REPROJECT_INTERVAL.1);
            }
        }
        self.next_reproject = step + (self.reproject_every.round() as usize).max(1);
        IntervalChange { step, before, after: self.reproject_every, next: self.next_reproject }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trend_and_damping_rules() {
        assert_eq!(trend_factor(&[1.0; 19]), None);
        let mut falling: Vec<f64> = vec![2.0; 10];
        falling.extend(vec![1.0; 10]);
        assert_eq!(trend_factor(&falling), Some(1.5));
        assert_eq!(trend_factor(&[1.0; 20]), Some(0.75)); // flat: not below 0.99×
        let mut rising = vec![1.0; 10];
        rising.extend(vec![1.2; 10]);
        assert_eq!(trend_factor(&rising), Some(0.75));
        assert_eq!(loss_std_damping(&[3.0]), None);
        assert!((loss_std_damping(&[1.0, 1.0, 1.0]).unwrap() - 0.001).abs() < 1e-15);
        assert!((loss_std_damping(&[1.0, 1.004]).unwrap() - 0.003).abs() < 1e-12); // std 0.002
        assert_eq!(loss_std_damping(&[0.0, 10.0]), Some(0.01));
        assert_eq!(reg_ramp(0, 30), 0.0);
        assert_eq!(reg_ramp(15, 30), 0.5);
        assert_eq!(reg_ramp(45, 30), 1.0);
        assert_eq!(reg_ramp(0, 0), 1.0);
    }

    #[test]
    fn events_adapt_once_per_event_and_clamp() {
        let cfg = GritConfig::default();
        let mut s = Schedule::new(&cfg);
        assert_eq!((s.next_invert, s.next_reproject), (10, 30));
        assert!(s.kfac_due(1, &cfg) && s.kfac_due(6, &cfg) && !s.kfac_due(5, &cfg));
        assert!(!s.invert_due(9) && s.invert_due(10));
        assert!(!s.reproject_due(29, &cfg) && s.reproject_due(30, &cfg));
        // Few losses: the interval is kept.
        let c = s.on_inversion(10, &cfg);
        assert_eq!((c.before, c.after, c.next), (10.0, 10.0, 20));
        // A falling loss: × 1.5 per event, not per step.
        for i in 0..20 {
            s.record_loss(if i < 10 { 3.0 } else { 2.0 });
        }
        let c = s.on_inversion(20, &cfg);
        assert_eq!((c.after, c.next), (15.0, 35));
        let c = s.on_reprojection(30, &cfg);
        assert_eq!((c.after, c.next), (45.0, 75));
        // Flat: × 0.75 down to the clamp of 1.
        for _ in 0..20 {
            s.record_loss(1.0);
        }
        for _ in 0..50 {
            s.on_inversion(100, &cfg);
        }
        assert_eq!((s.invert_every, s.next_invert), (1.0, 101));
        for i in 0..20 {
            s.record_loss(if i < 10 { 3.0 } else { 1.0 });
        }
        for _ in 0..50 {
            s.on_reprojection(100, &cfg);
        }
        assert_eq!(s.reproject_every, 2000.0);
        assert_eq!(s.inversions, 52);
        // Absolute damping follows the loss std; relative keeps λ_abs.
        let abs = GritConfig { damping: Damping::Absolute, ..GritConfig::default() };
        let mut s = Schedule::new(&abs);
        assert_eq!(s.lambda_abs, 1e-3);
        s.record_loss(1.0);
        s.record_loss(1.004);
        s.on_inversion(10, &abs);
        assert!((s.lambda_abs - 0.003).abs() < 1e-12);
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&j).unwrap(), s);
        let mut r = Schedule::new(&cfg);
        r.record_loss(1.0);
        r.record_loss(2.0);
        r.on_inversion(10, &cfg);
        assert_eq!(r.lambda_abs, 0.0);
        let fixed = GritConfig { adaptive_intervals: false, ..GritConfig::default() };
        let mut f = Schedule::new(&fixed);
        for i in 0..20 {
            f.record_loss(if i < 10 { 3.0 } else { 1.0 });
        }
        assert_eq!(f.on_inversion(10, &fixed).after, 10.0);
    }
}
