//! Learning-rate schedules: linear warmup, then cosine, linear decay or constant.

use super::config::LrSchedule;

/// The learning rate for optimizer step `step` (0-based) of `total` steps.
/// Warmup ramps linearly from lr/(warmup+1) (never exactly 0: ggml's AdamW wants lr > 0) to lr;
/// cosine and linear decay to 0 at the end (the last step keeps a small positive rate).
pub fn lr_at(schedule: LrSchedule, lr: f32, warmup: usize, step: usize, total: usize) -> f32 {
    if step < warmup {
        return lr * (step + 1) as f32 / (warmup + 1) as f32;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let factor = match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::Linear => 1.0 - progress,
        LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    // Keep it strictly positive.
    (lr as f64 * factor).max(lr as f64 * 1e-4) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let lr = 1e-3;
        assert!((lr_at(LrSchedule::Cosine, lr, 10, 0, 100) - lr / 11.0).abs() < 1e-9);
        assert!((lr_at(LrSchedule::Cosine, lr, 10, 9, 100) - lr * 10.0 / 11.0).abs() < 1e-9);
        assert!((lr_at(LrSchedule::Cosine, lr, 10, 10, 100) - lr).abs() < 1e-9);
        assert!((lr_at(LrSchedule::Cosine, lr, 10, 55, 100) - lr / 2.0).abs() < 1e-6);
        assert!(lr_at(LrSchedule::Cosine, lr, 10, 99, 100) > 0.0);
        assert!((lr_at(LrSchedule::Linear, lr, 0, 50, 100) - lr / 2.0).abs() < 1e-9);
        assert_eq!(lr_at(LrSchedule::Constant, lr, 0, 99, 100), lr);
    }
}
