//! Cross-entropy against label ids (CPU kernels).
//!
//! ggml's `cross_entropy_loss` compares the logits with a one-hot matrix of the same shape,
//! [n_vocab, n_rows]: an input of n_vocab × n_rows floats that the host builds and copies
//! every step (50 MB at 256 rows of a 49k vocabulary, 200 MB at 1024), which the loss's
//! backward keeps alive until it runs. These kernels read the label ids instead ([n_rows]
//! i32): `cross_entropy_rows` gives each row's −log softmax(x)[id], and
//! `cross_entropy_back_ids` the gradient (softmax(x) − onehot(id))·g/n_rows that ggml's
//! `cross_entropy_loss_back` computes, with the fused attention kernels' softmax pieces
//! (`max_of`, `exp_sub_sum`). The graph pass that swaps them in is [`super::passes::loss`].

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::attention::{exp_sub_sum, max_of};
use super::context::{Context, Tensor, Type};
use super::extra::thread_share;

impl Context {
    /// Per row r of `logits` [n_vocab, n_rows]: −log softmax(logits[:, r])[ids[r]], F32
    /// [n_rows]. A custom op: the CPU backend only.
    pub(crate) fn cross_entropy_rows<'a>(
        &'a self,
        logits: Tensor<'a>,
        ids: Tensor<'a>,
    ) -> Tensor<'a> {
        check(logits, ids);
        self.custom_op(&[logits, ids], Type::F32, [logits.ne()[1], 1, 1], ce_rows_kernel, 0)
            .set_name("ce_rows")
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
        self.custom_op(&[grad, logits, ids], Type::F32, [ne[0], ne[1], 1], ce_back_kernel, 0)
            .set_name("ce_back_ids")
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
        let (r0, r1) = thread_share((*logits).ne[1] as usize, ith, nth);
        let mut e = vec![0f32; (*logits).ne[0] as usize];
        for r in r0..r1 {
            let (x, id) = row(logits, ids, r);
            let max = max_of(x);
            e.copy_from_slice(x);
            let sum = exp_sub_sum(&mut e, max) as f64;
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
        let (r0, r1) = thread_share(n, ith, nth);
        for r in r0..r1 {
            let (x, id) = row(logits, ids, r);
            let o = std::slice::from_raw_parts_mut(out.add(r * v), v);
            o.copy_from_slice(x);
            let sum = exp_sub_sum(o, max_of(x));
            let scale = d / sum;
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
