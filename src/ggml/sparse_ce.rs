//! Cross-entropy against label ids (CPU kernels).
//!
//! ggml's `cross_entropy_loss` compares the logits with a one-hot matrix of the same shape,
//! [n_vocab, n_rows]: an input of n_vocab × n_rows floats that the host builds and copies
//! every step (50 MB at 256 rows of a 49k vocabulary, 200 MB at 1024), which the loss's
//! backward keeps alive until it runs. These kernels read the label ids instead ([n_rows]
//! i32): `cross_entropy_rows` gives each row's −log softmax(x)[id], and
//! `cross_entropy_back_ids` the gradient (softmax(x) − onehot(id))·g/n_rows that ggml's
//! `cross_entropy_loss_back` computes. The graph pass that swaps them in is
//! [`super::passes::loss`].

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor, Type};

impl Context {
    /// Per row r of `logits` [n_vocab, n_rows]: −log softmax(logits[:, r])[ids[r]], F32
    /// [n_rows]. A custom op: the CPU backend only.
    pub(crate) fn cross_entropy_rows<'a>(
        &'a self,
        logits: Tensor<'a>,
        ids: Tensor<'a>,
    ) -> Tensor<'a> {
        check(logits, ids);
        self.ce_op(&[logits, ids], [logits.ne()[1], 1], ce_rows_kernel).set_name("ce_rows")
    }

    /// ∂(g·mean_r CE_r)/∂logits = (softmax − onehot(ids))·g/n_rows, F32 [n_vocab, n_rows],
    /// with g the scalar `grad`. A custom op: the CPU backend only.
    pub(crate) fn cross_entropy_back_ids<'a>(
        &'a self,
        grad: Tensor<'a>,
        logits: Tensor<'a>,
        ids: Tensor<'a>,
    ) -> Tensor<'a> {
        check(logits, ids);
        assert!(
            grad.ty() == Type::F32 && grad.ne() == [1, 1, 1, 1],
            "cross_entropy_back_ids: gradient {grad:?} is not an F32 scalar"
        );
        let ne = logits.ne();
        self.ce_op(&[grad, logits, ids], [ne[0], ne[1]], ce_back_kernel).set_name("ce_back_ids")
    }

    fn ce_op<'a>(
        &'a self,
        args: &[Tensor<'a>],
        ne: [i64; 2],
        kernel: unsafe extern "C" fn(*mut sys::ggml_tensor, c_int, c_int, *mut c_void),
    ) -> Tensor<'a> {
        self.room(1);
        let mut raw: Vec<_> = args.iter().map(|t| t.raw()).collect();
        // SAFETY: live context with room for one tensor; the argument array outlives the call
        // (ggml copies the pointers into src); the kernel reads these sources with the shapes
        // `check` verified and writes its own F32 result of shape `ne`. No user data.
        self.wrap(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                sys::GGML_TYPE_F32,
                ne[0],
                ne[1],
                1,
                1,
                raw.as_mut_ptr(),
                raw.len() as c_int,
                Some(kernel),
                -1,
                std::ptr::null_mut(),
            )
        })
    }
}

/// `logits` is contiguous F32 [n_vocab, n_rows], `ids` I32 [n_rows].
fn check(logits: Tensor<'_>, ids: Tensor<'_>) {
    let ne = logits.ne();
    assert!(
        logits.ty() == Type::F32
            && logits.is_contiguous()
            && ne[2] == 1
            && ne[3] == 1
            && ids.ty() == Type::I32
            && ids.ne() == [ne[1], 1, 1, 1],
        "cross entropy with ids: logits {logits:?}, ids {ids:?}"
    );
}

/// e^x for x ≤ 0 (inputs are x − max), to ~1 ulp, in a form the compiler vectorizes:
/// x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to r⁷ (error < 1e-8), 2ⁿ
/// written into the exponent. Below −87 it returns e^−87 ≈ 1.6e-38 (a normal float) instead
/// of smaller values: nothing next to the row's maximum, whose term is 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    f32::from_bits(((n as i32 + 127) << 23) as u32) * p
}

/// The row's maximum and Σ e^(x − max) (16 lanes in f32, summed in f64 at the end); with
/// `out`, the terms e^(x − max) are written there too.
fn softmax_sums(x: &[f32], mut out: Option<&mut [f32]>) -> (f32, f64) {
    let mut max = f32::NEG_INFINITY;
    for &v in x {
        max = if v > max { v } else { max };
    }
    let mut lanes = [0f32; 16];
    for (c, chunk) in x.chunks(16).enumerate() {
        for (l, &v) in chunk.iter().enumerate() {
            let e = exp_nonpositive(v - max);
            lanes[l] += e;
            if let Some(o) = out.as_deref_mut() {
                o[c * 16 + l] = e;
            }
        }
    }
    (max, lanes.iter().map(|&s| s as f64).sum())
}

/// The share `[start, end)` of `n` rows thread `ith` of `nth` takes.
fn share(n: usize, ith: c_int, nth: c_int) -> (usize, usize) {
    let (ith, nth) = (ith as usize, nth.max(1) as usize);
    (n * ith / nth, n * (ith + 1) / nth)
}

/// Reads row `r` of the contiguous F32 logits and its label id.
///
/// # Safety
/// `logits` must be a live, allocated, contiguous F32 [n_vocab, n_rows] tensor and `ids` a
/// live, allocated I32 [n_rows] one, with `r` < n_rows.
unsafe fn row<'t>(
    logits: *const sys::ggml_tensor,
    ids: *const sys::ggml_tensor,
    r: usize,
) -> (&'t [f32], usize) {
    // SAFETY: per the contract.
    unsafe {
        let v = (*logits).ne[0] as usize;
        let x = std::slice::from_raw_parts(((*logits).data as *const f32).add(r * v), v);
        let id = *((*ids).data as *const i32).add(r);
        (x, id as usize)
    }
}

/// The kernel of [`Context::cross_entropy_rows`].
unsafe extern "C" fn ce_rows_kernel(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _: *mut c_void,
) {
    // SAFETY: ggml calls this with `dst` (F32 [n_rows], allocated) whose sources are the
    // logits and ids `check` verified (allocated); label ids were checked against the
    // vocabulary when the batch was made (`Batch::validate`) and are clamped here anyway;
    // threads write disjoint rows.
    unsafe {
        let (logits, ids) = ((*dst).src[0], (*dst).src[1]);
        let out = (*dst).data as *mut f32;
        let (r0, r1) = share((*logits).ne[1] as usize, ith, nth);
        for r in r0..r1 {
            let (x, id) = row(logits, ids, r);
            let (max, sum) = softmax_sums(x, None);
            *out.add(r) = ((max as f64 + sum.ln()) - x[id.min(x.len() - 1)] as f64) as f32;
        }
    }
}

/// The kernel of [`Context::cross_entropy_back_ids`].
unsafe extern "C" fn ce_back_kernel(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _: *mut c_void,
) {
    // SAFETY: as in `ce_rows_kernel`; `dst` is F32 [n_vocab, n_rows], contiguous, src[0] the
    // F32 scalar gradient; each thread writes its own rows.
    unsafe {
        let (grad, logits, ids) = ((*dst).src[0], (*dst).src[1], (*dst).src[2]);
        let (v, n) = ((*logits).ne[0] as usize, (*logits).ne[1] as usize);
        let d = *((*grad).data as *const f32) / n as f32;
        let out = (*dst).data as *mut f32;
        let (r0, r1) = share(n, ith, nth);
        for r in r0..r1 {
            let (x, id) = row(logits, ids, r);
            let o = std::slice::from_raw_parts_mut(out.add(r * v), v);
            let (_, sum) = softmax_sums(x, Some(o));
            let scale = (d as f64 / sum) as f32;
            for e in o.iter_mut() {
                *e *= scale;
            }
            o[id.min(v - 1)] -= d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Backend, Capacity};
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_of_std() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (a, b) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 2.5e-7, "relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// Loss and gradient equal ggml's one-hot cross-entropy (odd vocabulary and row counts,
    /// large logits, 1 and 3 threads).
    #[test]
    fn ids_kernels_match_ggmls_one_hot_loss() {
        let (v, n) = (1003usize, 7usize);
        let x: Vec<f32> =
            (0..v * n).map(|i| ((i * 7919 % 2003) as f32 / 100.0 - 10.0) * 1.5).collect();
        let ids: Vec<i32> = (0..n).map(|r| ((r * 389 + 5) % v) as i32).collect();
        let mut one_hot = vec![0f32; v * n];
        for (r, &t) in ids.iter().enumerate() {
            one_hot[r * v + t as usize] = 1.0;
        }
        for threads in [1, 3] {
            let mut backend = Backend::cpu(threads).unwrap();
            let ctx = Context::new(Capacity::graph(16, 32, false)).unwrap();
            let logits = ctx.new_f32("logits", &[v as i64, n as i64]).set_input();
            let labels = ctx.new_f32("labels", &[v as i64, n as i64]).set_input();
            let id_t = ctx.new_i32("ids", n).set_input();
            let g = ctx.new_f32("g", &[1]).set_input();
            let stock = ctx.cross_entropy_loss(logits, labels).set_output();
            let stock_back = ctx.cross_entropy_loss_back(g, logits, labels).set_output();
            let rows = ctx.cross_entropy_rows(logits, id_t).set_output();
            let back = ctx.cross_entropy_back_ids(g, logits, id_t).set_output();
            let mut graph = ctx.new_graph(32, false);
            for t in [stock, stock_back, rows, back] {
                graph.build_forward_expand(t);
            }
            let mut run = backend.compute(&graph).unwrap();
            run.write_f32(logits, &x).unwrap();
            run.write_f32(labels, &one_hot).unwrap();
            run.write_i32(id_t, &ids).unwrap();
            run.write_f32(g, &[2.5]).unwrap();
            run.run().unwrap();
            let mean =
                run.read_f32(rows).unwrap().iter().map(|&l| l as f64).sum::<f64>() / n as f64;
            let want = run.read_f32(stock).unwrap()[0] as f64;
            assert!((mean - want).abs() < 1e-5 * want.abs(), "loss {mean} vs ggml's {want}");
            let (a, b) = (run.read_f32(back).unwrap(), run.read_f32(stock_back).unwrap());
            let worst = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-7, "{threads} threads: gradient differs by {worst:e}");
        }
    }
}
