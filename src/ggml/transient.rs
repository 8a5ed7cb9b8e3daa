//! CPU kernels for training without persistent weight copies (`--weight-copies none`): Wᵀ in
//! Q8_0 for the backward, and the Q4_0 half of a Q4_1 weight's exact split for the forward,
//! both made from the stored weight inside the graph, one weight at a time.
//!
//! The input gradient ∂L/∂x = Wᵀ·∂L/∂y wants Wᵀ as the first operand of a `mul_mat`. With
//! ggml's own ops that is a dequantizing cast, a transposing cast and a conversion (an F32 and
//! an F16 copy of the weight alive at once, the transposing cast element by element). This
//! kernel goes from W's blocks to Q8_0 blocks of Wᵀ in one pass: 32 rows of W dequantized
//! into a tile, each tile column quantized as one Q8_0 block of a row of Wᵀ. The product then
//! runs on ggml's Q8_0 kernel, the one the persistent Q8_0 copies use, and the result is
//! bit for bit the persistent copy (the block quantization is ggml's reference rounding).

use std::os::raw::{c_int, c_void};

use half::f16;
use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor, Type};
use super::extra::thread_share;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale and 32 signed bytes.
const Q8_0_BLOCK: usize = 2 + QK;

impl Context {
    /// Wᵀ as Q8_0 [n, d_in] from `w` [d_in, n] (any type ggml can dequantize, rows contiguous,
    /// e.g. a view of whole rows of a stored weight); n must be a multiple of 32. A custom op:
    /// the CPU backend only.
    pub fn transposed_q8_0<'a>(&'a self, w: Tensor<'a>) -> Tensor<'a> {
        let ne = w.ne();
        let ty = w.ty();
        assert!(
            ne[2] == 1
                && ne[3] == 1
                && (ne[1] as usize).is_multiple_of(QK)
                && ty.can_dequantize()
                && ty.row_size(ne[0] as usize).is_some()
                && w.nb()[0] == ty.type_size(),
            "transposed_q8_0: {w:?} is not a 2-D weight of whole rows with a multiple of 32 rows"
        );
        self.custom_op(&[w], Type::Q8_0, [ne[1], ne[0], 1], transposed_q8_0_kernel, 0)
            .set_name(&format!("{}.T (transient)", w.name()))
    }
}

/// Bytes per Q4_1 block: f16 scale d, f16 minimum m, 16 bytes of nibbles.
const Q4_1_BLOCK: usize = 20;
/// Bytes per Q4_0 block: f16 scale d, 16 bytes of nibbles.
const Q4_0_BLOCK: usize = 18;

impl Context {
    /// The Q4_0 half W₀ of the exact split W = W₀ + c of a Q4_1 weight [d_in, d_out]: the same
    /// scales and nibbles, so W₀ = d·(q − 8) where W = d·q + m (the persistent split's bytes;
    /// see `train::copies::split_q4_1`; the offsets c, 1/8 byte per weight, stay resident).
    /// A custom op: the CPU backend only.
    pub fn q4_1_split_q4_0<'a>(&'a self, w: Tensor<'a>) -> Tensor<'a> {
        let ne = w.ne();
        assert!(
            w.ty() == Type::Q4_1 && ne[2] == 1 && ne[3] == 1 && w.nb()[0] == Q4_1_BLOCK,
            "Q4_1 split: {w:?} is not a 2-D Q4_1 weight"
        );
        self.custom_op(&[w], Type::Q4_0, [ne[0], ne[1], 1], q4_1_to_q4_0_kernel, 0)
            .set_name(&format!("{}.q4_0", w.name()))
    }
}

/// The kernel of [`Context::q4_1_split_q4_0`]: per block, d and the nibbles.
unsafe extern "C" fn q4_1_to_q4_0_kernel(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _: *mut c_void,
) {
    // SAFETY: ggml calls this with `dst` (Q4_0, w's shape, contiguous, allocated) whose src[0]
    // is the Q4_1 weight checked by `q4_1_split_q4_0` (allocated, rows `nb[1]` bytes apart); each
    // thread reads and writes whole rows of its own range, inside both tensors.
    unsafe {
        let w = (*dst).src[0];
        let (r0, r1) = thread_share((*w).ne[1] as usize, ith, nth);
        let blocks = (*w).ne[0] as usize / 32;
        let (src, out) = ((*w).data as *const u8, (*dst).data as *mut u8);
        for r in r0..r1 {
            let row = std::slice::from_raw_parts(src.add(r * (*w).nb[1]), blocks * Q4_1_BLOCK);
            let o = std::slice::from_raw_parts_mut(out.add(r * (*dst).nb[1]), blocks * Q4_0_BLOCK);
            for (b, q) in row.chunks_exact(Q4_1_BLOCK).zip(o.chunks_exact_mut(Q4_0_BLOCK)) {
                q[..2].copy_from_slice(&b[..2]);
                q[2..].copy_from_slice(&b[4..]);
            }
        }
    }
}

/// One Q8_0 block from 32 values, as ggml's reference quantizer (`quantize_row_q8_0_ref`):
/// d = max|x|/127 stored as f16, q = round(x·(1/d)) rounding halves away from zero (`roundf`).
/// Written so that it vectorizes: the rounding is a truncation and a correction, exact for
/// |y| < 2²³ (here |y| ≤ 127·(1 + ε)).
fn quantize_block(x: &[f32; QK], out: &mut [u8]) {
    let mut amax = 0f32;
    for v in x {
        let a = v.abs();
        amax = if a > amax { a } else { amax };
    }
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    let mut q = [0i8; QK];
    for (q, v) in q.iter_mut().zip(x) {
        let y = v * id;
        let t = y as i32; // toward zero
        let f = y - t as f32; // exact
        *q = (t + (f >= 0.5) as i32 - (f <= -0.5) as i32) as i8;
    }
    for (o, q) in out[2..Q8_0_BLOCK].iter_mut().zip(q) {
        *o = q as u8;
    }
}

/// The kernel of [`Context::transposed_q8_0`]. Each thread takes a contiguous range of the
/// n/32 row blocks of W: dequantizes the block's 32 rows into a [32][d_in] tile, transposes
/// it 32 inputs at a time into a [32][32] block, and quantizes each of that block's rows
/// (input j, the 32 rows of W) as block `rb` of row j of Wᵀ.
unsafe extern "C" fn transposed_q8_0_kernel(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    _: *mut c_void,
) {
    // SAFETY: ggml calls this with the node `dst` (Q8_0 [n, d_in], contiguous, allocated) whose
    // src[0] is the weight checked by `transposed_q8_0` (allocated, rows of d_in elements
    // `nb[1]` bytes apart); the traits' to_float reads exactly one row of d_in elements and
    // writes d_in floats; every block written lies inside dst, and threads write disjoint
    // blocks.
    unsafe {
        let w = (*dst).src[0];
        let (d_in, n) = ((*w).ne[0] as usize, (*w).ne[1] as usize);
        let row_stride = (*w).nb[1];
        let src = (*w).data as *const u8;
        let out = (*dst).data as *mut u8;
        let out_row = (*dst).nb[1];
        let to_float = if (*w).type_ == sys::GGML_TYPE_F32 {
            None
        } else {
            (*sys::ggml_get_type_traits((*w).type_)).to_float
        };
        let (b0, b1) = thread_share(n / QK, ith, nth);
        let mut tile = vec![0f32; QK * d_in];
        let mut block = [[0f32; QK]; QK]; // [input j − j0][row i]
        for rb in b0..b1 {
            for i in 0..QK {
                let row = src.add((rb * QK + i) * row_stride);
                let t = &mut tile[i * d_in..(i + 1) * d_in];
                match to_float {
                    Some(f) => f(row.cast(), t.as_mut_ptr(), d_in as i64),
                    None => std::ptr::copy_nonoverlapping(row.cast(), t.as_mut_ptr(), d_in),
                }
            }
            for j0 in (0..d_in).step_by(QK) {
                let nj = QK.min(d_in - j0);
                for i in 0..QK {
                    for (jj, v) in tile[i * d_in + j0..i * d_in + j0 + nj].iter().enumerate() {
                        block[jj][i] = *v;
                    }
                }
                for (jj, col) in block[..nj].iter().enumerate() {
                    let o = out.add((j0 + jj) * out_row + rb * Q8_0_BLOCK);
                    quantize_block(col, std::slice::from_raw_parts_mut(o, Q8_0_BLOCK));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dequantize, quantize, Backend, Capacity};
    use super::*;

    /// The kernel's Wᵀ equals the host's dequantize → transpose → quantize (what the persistent
    /// Q8_0 copies are) byte for byte, for several base types, whole weights and row views
    /// at an offset, with 1 and 3 threads (blocks split unevenly).
    #[test]
    fn transposed_q8_0_equals_the_host_copy() {
        for threads in [1, 3] {
            let mut backend = Backend::cpu(threads).unwrap();
            for (ty, d_in, n) in [
                (Type::Q4_1, 64, 96),
                (Type::Q4_0, 96, 64),
                (Type::Q8_0, 32, 160),
                (Type::Q4_K, 256, 64),
                (Type::F16, 40, 64),
                (Type::F32, 24, 128),
            ] {
                let values: Vec<f32> = (0..d_in * n)
                    .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
                    .collect();
                let raw = quantize(ty, &values, d_in).unwrap();
                let ctx = Context::new(Capacity::graph(8, 16, false)).unwrap();
                let w = ctx.new_tensor(ty, &[d_in as i64, n as i64]).set_input();
                let whole = ctx.transposed_q8_0(w).set_output();
                // Rows 32..64 through a view (the chunked output layer's form).
                let row = ty.row_size(d_in).unwrap();
                let view = ctx.view_2d(w, d_in as i64, 32, row, 32 * row);
                let part = ctx.transposed_q8_0(view).set_output();
                let mut g = ctx.new_graph(16, false);
                g.build_forward_expand(whole);
                g.build_forward_expand(part);
                let mut run = backend.compute(&g).unwrap();
                run.write_bytes(w, &raw).unwrap();
                run.run().unwrap();
                let x = dequantize(ty, &raw, d_in * n).unwrap(); // [n][d_in]
                let host = |rows: std::ops::Range<usize>| {
                    let m = rows.len();
                    let mut t = vec![0f32; m * d_in]; // [d_in][m]
                    for (r, i) in rows.enumerate() {
                        for j in 0..d_in {
                            t[j * m + r] = x[i * d_in + j];
                        }
                    }
                    quantize(Type::Q8_0, &t, m).unwrap()
                };
                let case = format!("{} [{d_in}, {n}], {threads} threads", ty.name());
                assert_eq!(whole.ne(), [n as i64, d_in as i64, 1, 1], "{case}");
                assert!(run.read_bytes(whole).unwrap() == host(0..n), "{case}: whole weight");
                assert!(run.read_bytes(part).unwrap() == host(32..64), "{case}: rows 32..64");
            }
        }
    }

    /// The in-graph Q4_0 half of a Q4_1 weight equals the persistent split's bytes.
    #[test]
    fn q4_1_split_equals_the_host_split() {
        for threads in [1, 3] {
            let mut backend = Backend::cpu(threads).unwrap();
            let (d_in, d_out) = (96usize, 70usize);
            let values: Vec<f32> =
                (0..d_in * d_out).map(|i| ((i * 7919 % 1001) as f32 / 300.0) - 1.2).collect();
            let raw = quantize(Type::Q4_1, &values, d_in).unwrap();
            let ctx = Context::new(Capacity::graph(8, 16, false)).unwrap();
            let w = ctx.new_tensor(Type::Q4_1, &[d_in as i64, d_out as i64]).set_input();
            let w0 = ctx.q4_1_split_q4_0(w).set_output();
            let mut g = ctx.new_graph(16, false);
            g.build_forward_expand(w0);
            let mut run = backend.compute(&g).unwrap();
            run.write_bytes(w, &raw).unwrap();
            run.run().unwrap();
            let (q, _) = crate::train::copies::split_q4_1(&raw);
            assert_eq!((w0.ty(), w0.ne()), (Type::Q4_0, w.ne()));
            assert!(run.read_bytes(w0).unwrap() == q, "{threads} threads: Q4_0 half");
        }
    }

    /// Halves round away from zero, as `roundf` in ggml's quantizer (d = 1 here: amax 127).
    #[test]
    fn block_rounding_is_ggmls() {
        let mut x = [0f32; QK];
        let edge = [127.0, 0.5, -0.5, 1.5, -2.5, 0.499_999_97, -0.499_999_97, 126.5, -126.5];
        x[..edge.len()].copy_from_slice(&edge);
        for (i, v) in x.iter_mut().enumerate().skip(edge.len()) {
            *v = i as f32 * 3.7 - 60.0;
        }
        let mut out = [0u8; Q8_0_BLOCK];
        quantize_block(&x, &mut out);
        assert_eq!(out.to_vec(), quantize(Type::Q8_0, &x, QK).unwrap());
        assert_eq!(&out[2..6], &[127, 1, (-1i8) as u8, 2]);
    }

    #[test]
    fn zero_blocks_quantize_to_zero() {
        let mut out = [0xffu8; Q8_0_BLOCK];
        quantize_block(&[0.0; QK], &mut out);
        assert!(out.iter().all(|&b| b == 0));
    }
}
