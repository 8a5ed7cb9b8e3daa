//! Fused causal attention kernels for training step graphs on the CPU backend.
//!
//! The model builds attention from ggml ops (`K·Q`, masked softmax, `V·P`) so that ggml's
//! autodiff derives its backward. Those ops do the whole T×T score matrix per head with
//! dot-product kernels at K = head_dim (mostly per-output overhead) and keep the scores and
//! probabilities of every layer alive from the forward to the backward. The pass
//! [`super::passes::fuse_attention`] finds that pattern, forward and backward, in a graph that
//! already holds its backward, and replaces it with the two custom CPU ops made here: a
//! forward that computes the output row by row (softmax with a running maximum over the
//! unmasked key range only: about half the work with a causal mask), and a backward that
//! recomputes the probabilities and produces ∂Q, ∂K and ∂V in one pass.
//!
//! Shapes (ggml order): q [D, T, H] (contiguous), k [D, T, G] (rows contiguous), vᵀ [T, D, G]
//! (rows contiguous), mask [T, ≥T] F32 (0 or −∞ in practice, any value allowed); query head h
//! reads key/value head h / (H/G), as ggml's broadcasting matmul does.

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor, Type};
use super::extra::CustomKernel;

/// The `i`-th op parameter of `t` read as an f32 (ggml stores soft_max's scale and max_bias
/// as the first two).
pub(crate) fn f32_param(t: Tensor<'_>, i: usize) -> f32 {
    // SAFETY: a live tensor; op_params is plain data (16 i32 slots, `i` bounds-checked).
    unsafe { f32::from_bits((*t.raw()).op_params[i] as u32) }
}

/// Whether the kernels can read `t`: F32 with contiguous rows, at most 3-D.
pub(crate) fn kernel_layout(t: Tensor<'_>) -> bool {
    t.ty() == Type::F32 && t.nb()[0] == 4 && t.ne()[3] == 1
}

/// Shapes of one attention problem: head size, tokens, query heads, key/value heads.
fn problem_shape(q: Tensor<'_>, k: Tensor<'_>, vt: Tensor<'_>, mask: Tensor<'_>) -> [i64; 4] {
    let (qn, kn, vn) = (q.ne(), k.ne(), vt.ne());
    let (d, t, h, g) = (qn[0], qn[1], qn[2], kn[2]);
    assert!(
        kn[0] == d
            && kn[1] == t
            && vn == [t, d, g, 1]
            && g > 0
            && h % g == 0
            && mask.ne()[0] == t
            && mask.ne()[1] >= t
            && mask.ne()[2] == 1
            && [q, k, vt, mask].iter().all(|&x| kernel_layout(x)),
        "fused attention: q {q:?}, k {k:?}, vt {vt:?}, mask {mask:?} do not fit the kernels"
    );
    [d, t, h, g]
}

impl Context {
    /// softmax(scale·Kᵀ·Q + mask) per head, times V: the forward kernel, F32 [D, T, H] (shapes
    /// in the module docs; checked).
    pub(crate) fn fused_attention<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        vt: Tensor<'a>,
        mask: Tensor<'a>,
        scale: f32,
    ) -> Tensor<'a> {
        let [d, t, h, _] = problem_shape(q, k, vt, mask);
        self.attention_op(&[q, k, vt, mask], [d, t, h], attention_forward, scale)
            .set_name("attn_fused")
    }

    /// The backward kernel of [`Context::fused_attention`] for the output gradient `d_o`
    /// [D, T, H]: ∂Q, ∂K and ∂Vᵀ per query head one after another, F32 [D, T, 3·H] (∂Vᵀ's
    /// blocks laid out [T, D] each).
    pub(crate) fn fused_attention_back<'a>(
        &'a self,
        q: Tensor<'a>,
        k: Tensor<'a>,
        vt: Tensor<'a>,
        mask: Tensor<'a>,
        d_o: Tensor<'a>,
        scale: f32,
    ) -> Tensor<'a> {
        let [d, t, h, _] = problem_shape(q, k, vt, mask);
        assert!(
            d_o.ne() == [d, t, h, 1] && kernel_layout(d_o),
            "fused attention backward: ∂O {d_o:?} does not match q {q:?}"
        );
        self.attention_op(&[q, k, vt, mask, d_o], [d, t, 3 * h], attention_backward, scale)
            .set_name("attn_fused_back")
    }

    /// A custom F32 op of shape `ne` computed by `kernel` from `args` (checked by the callers
    /// against the kernel's expectations), with the softmax scale's bits as its user data.
    fn attention_op<'a>(
        &'a self,
        args: &[Tensor<'a>],
        ne: [i64; 3],
        kernel: CustomKernel,
        scale: f32,
    ) -> Tensor<'a> {
        self.custom_op(args, Type::F32, ne, kernel, scale.to_bits() as usize)
    }
}

/// Strided read access to a 3-D F32 tensor whose rows (dim 0) are contiguous.
#[derive(Clone, Copy)]
struct View {
    data: *const u8,
    nb: [usize; 4],
}

impl View {
    /// # Safety
    /// `t` must be a live, allocated F32 tensor with contiguous rows.
    unsafe fn of(t: *const sys::ggml_tensor) -> Self {
        // SAFETY: per the contract.
        unsafe { View { data: (*t).data as *const u8, nb: (*t).nb } }
    }
    /// Row (i1, i2), `n` values.
    ///
    /// # Safety
    /// The indices and `n` must lie inside the tensor.
    unsafe fn row(&self, i1: usize, i2: usize, n: usize) -> &[f32] {
        // SAFETY: per the contract; rows are contiguous F32.
        unsafe {
            std::slice::from_raw_parts(
                self.data.add(i1 * self.nb[1] + i2 * self.nb[2]) as *const f32,
                n,
            )
        }
    }
}

/// e^x for x ≤ 0 (softmax arguments after subtracting the maximum), written so that the
/// compiler vectorizes it (no NaN-aware min/max, no float→int conversion): 2^n · p(r) with
/// n = round(x·log₂e) by the 1.5·2²³ trick, r = x − n·ln 2 and a degree-6 polynomial
/// (relative error ≈ 2e-7); arguments below −87 give 0.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let xc = if x > -87.0 { x } else { -87.0 };
    let tm = xc.mul_add(LOG2E, MAGIC);
    let n = tm - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    // tm's bits are 0x4B40_0000 + n for the small integers n here: 2ⁿ = (n + 127) << 23.
    let pow2 = f32::from_bits(tm.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x > -87.0 {
        p * pow2
    } else {
        0.0
    }
}

const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// y += a·x
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

/// Register-blocked column combination: out[j] = Σ_d c[d]·m[d·stride + lo + j] for j in 0..n
/// (n = `len`); `out` and the rows of `m` may extend past n up to `stride − lo` columns: the
/// last block is then computed whole (the extra values are scratch). Blocks of 32 outputs stay
/// in registers over the whole sum.
#[inline(always)]
fn combine_cols(out: &mut [f32], len: usize, c: &[f32], m: &[f32], stride: usize, lo: usize) {
    const B: usize = 32;
    let room = out.len().min(stride - lo);
    let mut j0 = 0;
    while j0 < len && j0 + B <= room {
        let mut acc = [0f32; B];
        for (dd, &cd) in c.iter().enumerate() {
            let row = &m[dd * stride + lo + j0..dd * stride + lo + j0 + B];
            for l in 0..B {
                acc[l] = cd.mul_add(row[l], acc[l]);
            }
        }
        out[j0..j0 + B].copy_from_slice(&acc);
        j0 += B;
    }
    if j0 < len {
        let tail = &mut out[j0..len];
        tail.fill(0.0);
        for (dd, &cd) in c.iter().enumerate() {
            axpy(tail, cd, &m[dd * stride + lo + j0..dd * stride + lo + len]);
        }
    }
}

/// Register-blocked row combination: out[0..D] = Σ_j c[j]·rows(j) with rows(j) the D values
/// returned by `row(j)`.
#[inline(always)]
fn combine_rows<'r>(out: &mut [f32], c: &[f32], row: impl Fn(usize) -> &'r [f32]) {
    const B: usize = 32;
    let d = out.len();
    let mut c0 = 0;
    while c0 + B <= d {
        let mut acc = [0f32; B];
        for (j, &cj) in c.iter().enumerate() {
            let r = &row(j)[c0..c0 + B];
            for l in 0..B {
                acc[l] = cj.mul_add(r[l], acc[l]);
            }
        }
        out[c0..c0 + B].copy_from_slice(&acc);
        c0 += B;
    }
    if c0 < d {
        let tail = &mut out[c0..];
        tail.fill(0.0);
        for (j, &cj) in c.iter().enumerate() {
            axpy(tail, cj, &row(j)[c0..d]);
        }
    }
}

/// The largest value of a non-empty slice without NaNs.
#[inline(always)]
pub(super) fn max_of(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let c = v.chunks_exact(LANES);
    let mut m = c.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in c {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    for a in acc {
        m = if a > m { a } else { m };
    }
    m
}

/// v ← e^(v − m); returns the sum.
#[inline(always)]
pub(super) fn exp_sub_sum(v: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut c = v.chunks_exact_mut(LANES);
    for x in c.by_ref() {
        for l in 0..LANES {
            x[l] = exp_neg(x[l] - m);
            acc[l] += x[l];
        }
    }
    let mut tail = 0.0;
    for x in c.into_remainder() {
        *x = exp_neg(*x - m);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// The row stride of the transposed copies (Kᵀ, Vᵀ) [D][T]: T padded by 16 floats so that
/// the D rows that a score block reads together are not a multiple of 4 KiB apart. At T = 1024
/// (4 packed sequences of 256) the unpadded rows all fell in the same L1 sets: the forward
/// kernel then took 12× the time of T = 256 for 4× the (block-diagonal) work.
fn padded(t: usize) -> usize {
    t + 16
}

/// The unmasked key range of query row `i`: first and one past the last finite mask value.
/// Scanned in blocks of 16 whose test has no early exit (it vectorizes): with packed
/// sequences most of a row is masked, and an element-by-element scan of it cost as much as
/// the scores.
fn key_range(mask: &[f32]) -> Option<(usize, usize)> {
    const B: usize = 16;
    let any = |c: &[f32]| c.iter().fold(false, |a, x| a | x.is_finite());
    let first = mask.chunks(B).position(any)?;
    let lo = first * B + mask[first * B..].iter().position(|m| m.is_finite())?;
    // The r-th chunk from the end spans len − (r+1)·B .. len − r·B (the last one cut at 0).
    let r = mask.rchunks(B).position(any)?;
    let end = mask.len() - r * B;
    let start = end.saturating_sub(B);
    let hi = start + mask[start..end].iter().rposition(|m| m.is_finite())? + 1;
    Some((lo, hi))
}

struct Problem {
    d: usize,
    t: usize,
    h: usize,
    g: usize,
    scale: f32,
    q: View,
    k: View,
    vt: View,
    mask: View,
}

impl Problem {
    /// # Safety
    /// `dst` is a node made by [`Context::fused_attention`] or
    /// [`Context::fused_attention_back`] whose sources are allocated.
    unsafe fn of(dst: *mut sys::ggml_tensor, userdata: *mut c_void) -> Self {
        // SAFETY: per the contract: the sources are q, k, vᵀ and the mask, checked by the
        // constructors.
        unsafe {
            let s = (*dst).src;
            let (qn, kn) = ((*s[0]).ne, (*s[1]).ne);
            Problem {
                d: qn[0] as usize,
                t: qn[1] as usize,
                h: qn[2] as usize,
                g: kn[2] as usize,
                scale: f32::from_bits(userdata as usize as u32),
                q: View::of(s[0]),
                k: View::of(s[1]),
                vt: View::of(s[2]),
                mask: View::of(s[3]),
            }
        }
    }

    /// V of key/value head `g` with rows per key into `vr` [T][D] (the graph holds Vᵀ).
    ///
    /// # Safety
    /// As for the views.
    unsafe fn v_rows(&self, g: usize, vr: &mut [f32]) {
        for dd in 0..self.d {
            // SAFETY: dd < D, g < G.
            let row = unsafe { self.vt.row(dd, g, self.t) };
            for (j, &x) in row.iter().enumerate() {
                vr[j * self.d + dd] = x;
            }
        }
    }

    /// Kᵀ of key/value head `g` into `kt` [D][T] (rows `padded(T)` apart).
    ///
    /// # Safety
    /// As for the views.
    unsafe fn k_transposed(&self, g: usize, kt: &mut [f32]) {
        for j in 0..self.t {
            // SAFETY: j < T, g < G.
            let row = unsafe { self.k.row(j, g, self.d) };
            for (dd, &x) in row.iter().enumerate() {
                kt[dd * padded(self.t) + j] = x;
            }
        }
    }

    /// The normalized probabilities of query row `i` of head `h` over keys lo..hi into
    /// `p[lo..hi]`; returns the range, or None for a fully masked row.
    ///
    /// # Safety
    /// As for the views; `kt` holds Kᵀ of this head's key/value head.
    unsafe fn probabilities(
        &self,
        i: usize,
        h: usize,
        kt: &[f32],
        p: &mut [f32],
    ) -> Option<(usize, usize)> {
        // SAFETY: i < T ≤ mask rows, h < H.
        let (mrow, qrow) = unsafe { (self.mask.row(i, 0, self.t), self.q.row(i, h, self.d)) };
        let (lo, hi) = key_range(mrow)?;
        combine_cols(&mut p[lo..], hi - lo, qrow, kt, padded(self.t), lo);
        let s = &mut p[lo..hi];
        for (x, &mk) in s.iter_mut().zip(&mrow[lo..hi]) {
            *x = x.mul_add(self.scale, mk);
        }
        let m = max_of(s);
        let inv = 1.0 / exp_sub_sum(s, m);
        for x in s.iter_mut() {
            *x *= inv;
        }
        Some((lo, hi))
    }
}

/// Forward: dst [D, T, H], row (i, h) = Σ_j P_ij · v_j. Jobs are (head, every R-th row) pairs
/// so that causal rows of all lengths spread evenly over the threads.
unsafe extern "C" fn attention_forward(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    // SAFETY: called by ggml for a node made by `Context::fused_attention` with allocated sources and result.
    let pb = unsafe { Problem::of(dst, userdata) };
    let (d, t, h) = (pb.d, pb.t, pb.h);
    // SAFETY: dst is a contiguous F32 [D, T, H] tensor.
    let out = unsafe { std::slice::from_raw_parts_mut((*dst).data as *mut f32, d * t * h) };
    const R: usize = 8;
    let (ith, nth) = (ith as usize, nth.max(1) as usize);
    let mut kt = vec![0f32; d * padded(t)];
    let mut vr = vec![0f32; d * t];
    let mut p = vec![0f32; t];
    let mut kt_of = usize::MAX;
    for job in (ith..h * R).step_by(nth) {
        let (hh, r) = (job / R, job % R);
        let g = hh / (h / pb.g);
        if kt_of != g {
            // SAFETY: g < G.
            unsafe { pb.k_transposed(g, &mut kt) };
            // SAFETY: g < G.
            unsafe { pb.v_rows(g, &mut vr) };
            kt_of = g;
        }
        for i in (r..t).step_by(R) {
            let o = &mut out[(hh * t + i) * d..(hh * t + i + 1) * d];
            // SAFETY: i < T, hh < H.
            match unsafe { pb.probabilities(i, hh, &kt, &mut p) } {
                None => o.fill(0.0),
                Some((lo, hi)) => {
                    combine_rows(o, &p[lo..hi], |j| &vr[(lo + j) * d..(lo + j + 1) * d])
                }
            }
        }
    }
}

/// Backward: dst [D, T, 3H] = ∂Q [D, T, H], then ∂K per query head [D, T, H], then ∂Vᵀ per
/// query head [T, D, H]. One job per head (its ∂K and ∂Vᵀ accumulate over all query rows).
unsafe extern "C" fn attention_backward(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    // SAFETY: called by ggml for a node made by `Context::fused_attention_back` with allocated sources and result.
    let pb = unsafe { Problem::of(dst, userdata) };
    // SAFETY: source 4 is ∂O [D, T, H] with contiguous rows (checked by `Context::fused_attention_back`).
    let d_o = unsafe { View::of((*dst).src[4]) };
    let (d, t, h) = (pb.d, pb.t, pb.h);
    let block = d * t * h;
    // SAFETY: dst is a contiguous F32 [D, T, 3H] tensor.
    let out = unsafe { std::slice::from_raw_parts_mut((*dst).data as *mut f32, 3 * block) };
    let (dq_all, rest) = out.split_at_mut(block);
    let (dk_all, dvt_all) = rest.split_at_mut(block);
    let (ith, nth) = (ith as usize, nth.max(1) as usize);
    let tp = padded(t);
    let mut kt = vec![0f32; d * tp];
    let mut p = vec![0f32; t];
    let mut dp = vec![0f32; t];
    let mut vt_g = vec![0f32; d * tp];
    // ∂Vᵀ of the current head, rows padded like Kᵀ's (the output's rows are T apart).
    let mut dvt_pad = vec![0f32; d * tp];
    let mut kt_of = usize::MAX;
    for hh in (ith..h).step_by(nth) {
        let g = hh / (h / pb.g);
        if kt_of != g {
            // SAFETY: g < G.
            unsafe { pb.k_transposed(g, &mut kt) };
            for dd in 0..d {
                // SAFETY: dd < D, g < G.
                vt_g[dd * tp..dd * tp + t].copy_from_slice(unsafe { pb.vt.row(dd, g, t) });
            }
            kt_of = g;
        }
        let dk = &mut dk_all[hh * d * t..(hh + 1) * d * t]; // [D, T]: row j is ∂k_j
        let dvt = &mut dvt_all[hh * d * t..(hh + 1) * d * t]; // [T, D]: row dd is ∂vᵀ_dd
        dk.fill(0.0);
        dvt_pad.fill(0.0);
        for i in 0..t {
            let dq = &mut dq_all[(hh * t + i) * d..(hh * t + i + 1) * d];
            // SAFETY: i < T, hh < H.
            let Some((lo, hi)) = (unsafe { pb.probabilities(i, hh, &kt, &mut p) }) else {
                dq.fill(0.0);
                continue;
            };
            // SAFETY: as above.
            let (dorow, qrow) = unsafe { (d_o.row(i, hh, d), pb.q.row(i, hh, d)) };
            // ∂P_ij = ∂o_i · v_j
            combine_cols(&mut dp[lo..], hi - lo, dorow, &vt_g, tp, lo);
            let dpr = &mut dp[lo..hi];
            // ∂S_ij = P_ij (∂P_ij − Σ_j' P_ij' ∂P_ij'), times the softmax scale.
            let di = dot(&p[lo..hi], dpr);
            for (x, &pj) in dpr.iter_mut().zip(&p[lo..hi]) {
                *x = pb.scale * pj * (*x - di);
            }
            // SAFETY: lo + j < T, g < G.
            combine_rows(dq, dpr, |j| unsafe { pb.k.row(lo + j, g, d) });
            for (jj, &s) in dpr.iter().enumerate() {
                let j = lo + jj;
                axpy(&mut dk[j * d..(j + 1) * d], s, qrow);
            }
            for (dd, &g_o) in dorow.iter().enumerate() {
                axpy(&mut dvt_pad[dd * tp + lo..dd * tp + hi], g_o, &p[lo..hi]);
            }
        }
        for dd in 0..d {
            dvt[dd * t..(dd + 1) * t].copy_from_slice(&dvt_pad[dd * tp..dd * tp + t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked scan finds what an element-by-element scan finds, for every row of causal,
    /// packed and random masks of lengths around the block size.
    #[test]
    fn key_range_equals_the_plain_scan() {
        let naive = |m: &[f32]| {
            let lo = m.iter().position(|x| x.is_finite())?;
            Some((lo, m.iter().rposition(|x| x.is_finite())? + 1))
        };
        let inf = f32::NEG_INFINITY;
        let mut rng = crate::rng::SplitMix64::new(5);
        for n in [1usize, 5, 15, 16, 17, 31, 32, 33, 100, 1024] {
            for i in 0..n {
                let causal: Vec<f32> = (0..n).map(|j| if j <= i { 0.0 } else { inf }).collect();
                let block = (i / 7) * 7;
                let packed: Vec<f32> =
                    (0..n).map(|j| if j >= block && j <= i { 0.0 } else { inf }).collect();
                let random: Vec<f32> = (0..n)
                    .map(|_| if rng.next_u64().is_multiple_of(5) { -1.5 } else { inf })
                    .collect();
                for m in [causal, packed, random, vec![inf; n]] {
                    assert_eq!(key_range(&m), naive(&m), "n {n}, row {i}: {m:?}");
                }
            }
        }
    }

    #[test]
    fn exp_neg_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let e = (x as f64).exp();
            worst = worst.max(((exp_neg(x) as f64) - e).abs() / e);
            x += 0.01;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert_eq!(exp_neg(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg(0.0), 1.0);
    }
}
