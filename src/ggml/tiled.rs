//! Outer-product sums on the CPU: `Σ_k a[:, k]·b[:, k]ᵀ` for a [m, k]
//! and b [n, k] with k ≤ ~48 and long output columns (LoRA's B·u and Aᵀ·∂u with k = rank, the
//! Q4_1 split's offsets C·s with k = d_in/32), and LoRA's other products, whose outputs are
//! small (A·x: 16 rows; ∂A = Σ_t x_t·∂u_tᵀ and ∂Bᵀ: 16 columns) and whose operands ggml's
//! matmul kernels would need transposed copies of.
//!
//! ggml has two ways to compute them and both lose most of the time to memory traffic:
//! its matmul kernels compute each output as a dot product of length k (per-output
//! overhead), and its out_prod adds k scaled columns into the output one after another (k
//! read-modify-write passes over an output of m·n floats). This kernel keeps a tile of the
//! output (TI rows × TJ columns) in registers while it walks k, so each output is written
//! once, and reads its operands as they are stored (b with any strides): `bench/small_k.rs`
//! prints the three side by side.

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor};
use super::extra::thread_share;
use super::Type;

/// Output rows per tile: one AVX-512 register, two AVX2 registers.
const TI: usize = 16;
/// Output columns per tile (each loaded column slice of `a` is used TJ times): 8
/// accumulators of TI floats either way (AVX-512 has 32 registers, AVX2 16).
#[cfg(target_feature = "avx512f")]
const TJ: usize = 8;
#[cfg(not(target_feature = "avx512f"))]
const TJ: usize = 4;

/// How many of a's column slices ahead a tile prefetches.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 8;

/// The most elements of an `a` operand with strided columns (copied whole per thread).
pub const GATHER_MAX: i64 = 1 << 16;

/// Whether this build has a vector micro-kernel for [`Context::out_prod_tiled`] (x86-64 with
/// AVX2 and FMA, or AVX-512). Elsewhere the kernel runs a scalar loop, slower than ggml's
/// own products, so the graph rewrites keep ggml's.
pub const TILED_SIMD: bool = cfg!(all(
    target_arch = "x86_64",
    any(target_feature = "avx512f", all(target_feature = "avx2", target_feature = "fma"))
));

/// One full tile: `acc[j] = Σ_kk a[kk·lda .. kk·lda + TI] · bt[j·bs + kk]` for kk < k.
///
/// # Safety
/// `a` must be valid for reads of TI floats at every `kk·lda`, kk < k, and `bt` for reads
/// at every `j·bs + kk`, j < TJ, kk < k.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
#[inline(always)]
unsafe fn tile(
    a: *const f32,
    lda: usize,
    bt: *const f32,
    bs: usize,
    k: usize,
    acc: &mut [[f32; TI]; TJ],
) {
    use std::arch::x86_64::*;
    // SAFETY: the target has AVX-512F (cfg); `a` is readable per the contract, `acc` rows are
    // TI = 16 floats (one register each).
    unsafe {
        let mut c = [_mm512_setzero_ps(); TJ];
        for kk in 0..k {
            // a's column slices are lda apart, often more than the hardware's stride
            // prefetcher follows (2 KiB): fetch a few ahead (a hint, never a fault).
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((kk + PREFETCH) * lda) as *const i8);
            let x = _mm512_loadu_ps(a.add(kk * lda));
            for (j, cj) in c.iter_mut().enumerate() {
                *cj = _mm512_fmadd_ps(x, _mm512_set1_ps(*bt.add(j * bs + kk)), *cj);
            }
        }
        for (cj, row) in c.iter().zip(acc.iter_mut()) {
            _mm512_storeu_ps(row.as_mut_ptr(), *cj);
        }
    }
}

/// One full tile (AVX2 + FMA: each output column slice in two registers).
///
/// # Safety
/// As for the AVX-512 version.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    not(target_feature = "avx512f")
))]
#[inline(always)]
unsafe fn tile(
    a: *const f32,
    lda: usize,
    bt: *const f32,
    bs: usize,
    k: usize,
    acc: &mut [[f32; TI]; TJ],
) {
    use std::arch::x86_64::*;
    // SAFETY: the target has AVX2 and FMA (cfg); `a` is readable per the contract, `acc`
    // rows are TI = 16 floats (two registers each).
    unsafe {
        let mut lo = [_mm256_setzero_ps(); TJ];
        let mut hi = [_mm256_setzero_ps(); TJ];
        for kk in 0..k {
            // As in the AVX-512 version.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add((kk + PREFETCH) * lda) as *const i8);
            let x0 = _mm256_loadu_ps(a.add(kk * lda));
            let x1 = _mm256_loadu_ps(a.add(kk * lda + 8));
            for j in 0..TJ {
                let s = _mm256_set1_ps(*bt.add(j * bs + kk));
                lo[j] = _mm256_fmadd_ps(x0, s, lo[j]);
                hi[j] = _mm256_fmadd_ps(x1, s, hi[j]);
            }
        }
        for j in 0..TJ {
            _mm256_storeu_ps(acc[j].as_mut_ptr(), lo[j]);
            _mm256_storeu_ps(acc[j].as_mut_ptr().add(8), hi[j]);
        }
    }
}

/// One full tile, scalar (targets without a vector micro-kernel).
///
/// # Safety
/// As for the AVX-512 version.
#[cfg(not(all(
    target_arch = "x86_64",
    any(target_feature = "avx512f", all(target_feature = "avx2", target_feature = "fma"))
)))]
#[inline(always)]
unsafe fn tile(
    a: *const f32,
    lda: usize,
    bt: *const f32,
    bs: usize,
    k: usize,
    acc: &mut [[f32; TI]; TJ],
) {
    *acc = [[0f32; TI]; TJ];
    for kk in 0..k {
        // SAFETY: readable per the contract.
        let col = unsafe { &*(a.add(kk * lda) as *const [f32; TI]) };
        for (j, row) in acc.iter_mut().enumerate() {
            for (o, &x) in row.iter_mut().zip(col.iter()) {
                // SAFETY: readable per the contract.
                *o = madd(x, unsafe { *bt.add(j * bs + kk) }, *o);
            }
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    any(target_feature = "avx512f", all(target_feature = "avx2", target_feature = "fma"))
)))]
/// `a·b + c`, fused where the target has FMA (without it `mul_add` is a library call).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

impl Context {
    /// `Σ_k a[:, k]·b[:, k]ᵀ` → F32 [m, n] (ggml's `out_prod(a, b)`) for a [m, k] and b
    /// [n, k] (F32, 2-D, any strides: a transpose view, for instance). An `a` whose columns
    /// are not contiguous (nb0 ≠ 4) must be small (m·k ≤ [`GATHER_MAX`]): each thread copies
    /// it whole before it starts (LoRA's A and B, read through a transpose view, need no
    /// copy in the graph). A custom op: the CPU backend only.
    pub fn out_prod_tiled<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        self.tiled(a, b, false)
    }

    /// The transpose of [`Context::out_prod_tiled`]: `(Σ_k a[:, k]·b[:, k]ᵀ)ᵀ` → F32 [n, m],
    /// written directly in that layout (ggml's `out_prod(b, a)` when b's rows are strided).
    pub fn out_prod_tiled_t<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        self.tiled(a, b, true)
    }

    fn tiled<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>, transposed: bool) -> Tensor<'a> {
        let (x, y) = (a.ne(), b.ne());
        assert!(
            a.ty() == Type::F32
                && b.ty() == Type::F32
                && x[1] == y[1]
                && x[2] == 1
                && x[3] == 1
                && y[2] == 1
                && y[3] == 1
                && (a.nb()[0] == 4 || x[0] * x[1] <= GATHER_MAX)
                && a.nb()[0].is_multiple_of(4)
                && a.nb()[1].is_multiple_of(4)
                && b.nb()[0].is_multiple_of(4)
                && b.nb()[1].is_multiple_of(4),
            "out_prod_tiled: {a:?} ⊗ {b:?}"
        );
        let ne = if transposed { [y[0], x[0], 1] } else { [x[0], y[0], 1] };
        self.custom_op(&[a, b], Type::F32, ne, tiled_kernel, transposed as usize)
    }
}

/// The kernel of [`Context::out_prod_tiled`] (user data 1: transposed output): tiles of
/// TI × TJ outputs dealt to the threads in contiguous ranges; b's TJ rows of a tile are read
/// in place or from a copy, then for each k one column slice of a is multiplied into TJ
/// register columns; each output is written once, after its whole sum.
unsafe extern "C" fn tiled_kernel(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    user: *mut c_void,
) {
    let transposed = user as usize == 1;
    // SAFETY: ggml calls this with the node built by `Context::tiled` (contiguous F32 [m, n],
    // or [n, m] transposed, allocated) whose sources a [m, k] and b [n, k] (F32, strides
    // multiples of 4) were checked there and are allocated and live for the call.
    // Every index below stays inside their shapes; threads write disjoint tiles of dst.
    unsafe {
        let (a, b) = ((*dst).src[0], (*dst).src[1]);
        let (m, k, n) = ((*a).ne[0] as usize, (*a).ne[1] as usize, (*b).ne[0] as usize);
        let (a0, a1) = ((*a).nb[0] / 4, (*a).nb[1] / 4);
        let (b0, b1) = ((*b).nb[0] / 4, (*b).nb[1] / 4);
        let (src_a, bp) = ((*a).data as *const f32, (*b).data as *const f32);
        let cp = (*dst).data as *mut f32;
        if m == 0 || n == 0 {
            return;
        }
        let (tiles_i, tiles_j) = (m.div_ceil(TI), n.div_ceil(TJ));
        // Every tile runs the full TI × TJ micro-kernel; rows of a and of b beyond m and n
        // come from zero-padded copies and their outputs are not stored (ranks of 3–5 after a
        // GRIT cut make most tiles ragged).
        // a: read in place when its columns are contiguous, else copied to [k][m rounded up
        // to TI] first; a ragged last row of tiles of an in-place a is copied to [k][TI].
        // Rows i0..i0 + rows of a as [k][rows], zero beyond m.
        let a_at = |i: usize, kk: usize| if i < m { *src_a.add(i * a0 + kk * a1) } else { 0.0 };
        let copy_a = |i0: usize, rows: usize| -> Vec<f32> {
            (0..k).flat_map(|kk| (0..rows).map(move |ii| a_at(i0 + ii, kk))).collect()
        };
        let m_pad = tiles_i * TI;
        let a_copy = if a0 == 1 { Vec::new() } else { copy_a(0, m_pad) };
        let (ap, lda) = if a0 == 1 { (src_a, a1) } else { (a_copy.as_ptr(), m_pad) };
        let a_tail =
            if a0 == 1 && m % TI != 0 { copy_a((tiles_i - 1) * TI, TI) } else { Vec::new() };
        // b is read in place when it is contiguous along k (a transpose view of u or ∂u), else
        // copied to [n][k] once per thread when small (∂u itself, for ∂A), else (large and
        // strided) TJ rows at a time when the column of tiles changes. With b whole, jobs run
        // along a row of tiles (the k column slices of a just read stay in cache for the next
        // tile: ∂A reads x [d_in, tokens] this way once per thread instead of once per column
        // of tiles); otherwise down a column (the output is written in order; measured
        // faster for B·u). A ragged last column of tiles of an in-place b is copied to [TJ][k].
        let direct = b1 == 1;
        let whole = !direct && (n * k) as i64 <= GATHER_MAX;
        let rows_first = whole;
        let b_row = |j: usize, kk: usize| if j < n { *bp.add(j * b0 + kk * b1) } else { 0.0 };
        // Rows j0..j0 + rows of b as [rows][k], zero beyond n.
        let copy_b = |j0: usize, rows: usize| -> Vec<f32> {
            (j0..j0 + rows).flat_map(|j| (0..k).map(move |kk| b_row(j, kk))).collect()
        };
        let mut bt = if whole {
            copy_b(0, tiles_j * TJ)
        } else {
            vec![0f32; if direct { 0 } else { TJ * k }]
        };
        let b_tail =
            if direct && n % TJ != 0 { copy_b((tiles_j - 1) * TJ, TJ) } else { Vec::new() };
        // Output (i, j) of the product: C[i + j·m], or Cᵀ[j + i·n].
        let at =
            |i: usize, j: usize| if transposed { cp.add(j + i * n) } else { cp.add(i + j * m) };
        let (start, end) = thread_share(tiles_i * tiles_j, ith, nth);
        let mut gathered = usize::MAX;
        let mut acc = [[0f32; TI]; TJ];
        for job in start..end {
            let (ti, tj) = if rows_first {
                (job / tiles_j, job % tiles_j)
            } else {
                (job % tiles_i, job / tiles_i)
            };
            let (i0, j0) = (ti * TI, tj * TJ);
            let (ni, nj) = ((m - i0).min(TI), (n - j0).min(TJ));
            if !direct && !whole && gathered != tj {
                for jj in 0..TJ {
                    for kk in 0..k {
                        bt[jj * k + kk] = b_row(j0 + jj, kk);
                    }
                }
                gathered = tj;
            }
            let (bt, bs) = if direct && nj < TJ {
                (b_tail.as_ptr(), k)
            } else if direct {
                (bp.add(j0 * b0), b0)
            } else if whole {
                (bt.as_ptr().add(j0 * k), k)
            } else {
                (bt.as_ptr(), k)
            };
            let (a_tile, lda) =
                if a0 == 1 && ni < TI { (a_tail.as_ptr(), TI) } else { (ap.add(i0), lda) };
            tile(a_tile, lda, bt, bs, k, &mut acc);
            if !transposed && ni == TI {
                for (jj, out) in acc.iter().enumerate().take(nj) {
                    std::ptr::copy_nonoverlapping(out.as_ptr(), at(i0, j0 + jj), TI);
                }
            } else {
                for ii in 0..ni {
                    for (jj, out) in acc.iter().enumerate().take(nj) {
                        *at(i0 + ii, j0 + jj) = out[ii];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{Backend, Capacity};

    /// Against ggml's out_prod (and its transpose) on the training shapes, ragged tiles, k
    /// beyond one chunk, with b a transpose view as LoRA's ∂u and u are.
    #[test]
    fn tiled_out_prod_equals_out_prod() {
        let mut backend = Backend::cpu(2).unwrap();
        for (m, k, n) in [
            (1536, 16, 256),
            (37, 5, 9),
            (64, 48, 3),
            (576, 18, 255),
            (576, 256, 16),
            (16, 576, 256),
            (20, 130, 7),
        ] {
            let ctx = Context::new(Capacity::graph(32, 32, false)).unwrap();
            let a = ctx.new_f32("a", &[m, k]).set_input();
            let u = ctx.new_f32("u", &[k, n]).set_input(); // b = uᵀ, as LoRA's ∂u and u are
            let bt = ctx.transpose(u);
            let fast = ctx.out_prod_tiled(a, bt).set_output();
            let fast_t = ctx.out_prod_tiled_t(a, bt).set_output();
            let slow = ctx.out_prod(a, bt).set_output();
            // b stored [n, k] (strided along k: its values are gathered per tile).
            let v = ctx.new_f32("v", &[n, k]).set_input();
            let (fast_v, slow_v) = (ctx.out_prod_tiled(a, v), ctx.out_prod(a, v));
            // a read through a transpose view of w [k, m] (copied whole by the kernel).
            let w = ctx.new_f32("w", &[k, m]).set_input();
            let wt = if m * k <= GATHER_MAX { ctx.transpose(w) } else { a }; // else: as above
            let fast_w = ctx.out_prod_tiled(wt, bt);
            let slow_w = ctx.out_prod(ctx.cont(wt), bt);
            let mut g = ctx.new_graph(24, false);
            for t in [fast, fast_t, slow, fast_v, slow_v, fast_w, slow_w] {
                g.build_forward_expand(t.set_output());
            }
            let mut c = backend.compute(&g).unwrap();
            let rnd = |i: i64, s: f32| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * s;
            c.write_f32(a, &(0..m * k).map(|i| rnd(i, 1.0)).collect::<Vec<_>>()).unwrap();
            c.write_f32(u, &(0..k * n).map(|i| rnd(i + 3, 2.0)).collect::<Vec<_>>()).unwrap();
            c.write_f32(v, &(0..k * n).map(|i| rnd(i + 5, 1.5)).collect::<Vec<_>>()).unwrap();
            if m * k <= GATHER_MAX {
                c.write_f32(w, &(0..k * m).map(|i| rnd(i + 11, 1.0)).collect::<Vec<_>>()).unwrap();
            }
            c.run().unwrap();
            for (name, f, s) in [("gathered b", fast_v, slow_v), ("strided a", fast_w, slow_w)] {
                let (p, q) = (c.read_f32(f).unwrap(), c.read_f32(s).unwrap());
                let err = p.iter().zip(&q).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(err < 1e-6 * k as f32, "{m}×{k}×{n}, {name}: max |Δ| {err}");
            }
            let (x, y) = (c.read_f32(fast).unwrap(), c.read_f32(slow).unwrap());
            let xt = c.read_f32(fast_t).unwrap();
            assert_eq!((x.len(), xt.len()), ((m * n) as usize, (m * n) as usize));
            let tol = 1e-6 * k as f32;
            let err = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(err < tol, "{m}×{k}×{n}: max |Δ| {err}");
            for (i, j) in [(0, 0), (m - 1, n - 1), (m / 2, n / 3)] {
                let (i, j) = (i as usize, j as usize);
                assert_eq!(xt[j + i * n as usize], x[i + j * m as usize], "transposed ({i}, {j})");
            }
            assert!(x.iter().any(|v| v.abs() > 0.1), "{m}×{k}×{n}: all zero");
        }
    }
}
