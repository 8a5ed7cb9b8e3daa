//! Ops and tensor surgery the training engine needs beyond the forward graph: scalar math
//! for in-graph gradient clipping, zeroing persistent tensors, and the in-place rewrite of a
//! backward node (see [`super::frozen`]).

use std::os::raw::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::context::{Context, Graph, Tensor};
use super::GgmlError;

/// ggml's signature for a custom op's kernel: the result node, this thread's index, the
/// number of threads, the op's user data.
pub(crate) type CustomKernel =
    unsafe extern "C" fn(*mut sys::ggml_tensor, c_int, c_int, *mut c_void);

/// The share `[start, end)` of `n` items that thread `ith` of `nth` takes (contiguous ranges).
pub(crate) fn thread_share(n: usize, ith: c_int, nth: c_int) -> (usize, usize) {
    let (ith, nth) = (ith as usize, nth.max(1) as usize);
    (n * ith / nth, n * (ith + 1) / nth)
}

impl Context {
    /// A custom op of type `ty` and shape `ne` that `kernel` computes from `args` on the
    /// CPU backend's threads; `user` is handed to the kernel as its user data (a plain value,
    /// not a pointer). Callers check `args` against what their kernel reads.
    pub(crate) fn custom_op<'a>(
        &'a self,
        args: &[Tensor<'a>],
        ty: super::Type,
        ne: [i64; 3],
        kernel: CustomKernel,
        user: usize,
    ) -> Tensor<'a> {
        self.room(1);
        let mut raw: Vec<_> = args.iter().map(|t| t.raw()).collect();
        // SAFETY: live context with room for one tensor; the argument array outlives the call
        // (ggml copies the pointers into src); the kernel reads exactly these sources with the
        // shapes the callers checked and writes its own result of type `ty` and shape `ne`.
        // The user data is a value, never dereferenced.
        self.wrap(unsafe {
            sys::ggml_custom_4d(
                self.raw(),
                ty.0 as sys::ggml_type,
                ne[0],
                ne[1],
                ne[2],
                1,
                raw.as_mut_ptr(),
                raw.len() as c_int,
                Some(kernel),
                -1,
                user as *mut c_void,
            )
        })
    }

    /// Element-wise √a.
    pub fn sqrt<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: live context and tensor from it; the op only records metadata (no_alloc).
        self.wrap(unsafe { sys::ggml_sqrt(self.raw(), a.raw()) })
    }
    /// Element-wise a / b (b broadcast to a's shape).
    pub fn div<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        // SAFETY: as in sqrt; ggml checks b can be repeated to a.
        assert!(can_repeat(b, a), "div: {b:?} does not broadcast to {a:?}");
        self.wrap(unsafe { sys::ggml_div(self.raw(), a.raw(), b.raw()) })
    }
    /// Element-wise clamp to [min, max].
    pub fn clamp<'a>(&'a self, a: Tensor<'a>, min: f32, max: f32) -> Tensor<'a> {
        // SAFETY: as in sqrt.
        self.wrap(unsafe { sys::ggml_clamp(self.raw(), a.raw(), min, max) })
    }

    /// A contiguous copy of `a` (F32, any strides, e.g. a transpose view) by a cache-blocked
    /// CPU kernel: ggml's `cont` copies a transposed tensor element by element at ~1.5 GB/s
    /// here, this one in 32×32 tiles several times faster. A custom op: the CPU backend only.
    pub fn cont_cpu<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        assert!(
            a.ty() == super::Type::F32 && a.ne()[3] == 1,
            "cont_cpu: {a:?} is not a 3-D F32 tensor"
        );
        self.room(1);
        // SAFETY: live context and tensor; the callback is a plain function that reads `a`
        // within its shape and strides and writes the contiguous result (same shape, F32) that
        // ggml_map_custom1 allocates; no user data.
        self.wrap(unsafe {
            sys::ggml_map_custom1(
                self.raw(),
                a.raw(),
                Some(strided_copy_f32),
                -1,
                std::ptr::null_mut(),
            )
        })
    }

    /// Sets every byte of an allocated tensor of this context to 0.
    pub fn zero(&self, t: Tensor<'_>) -> Result<(), GgmlError> {
        if !t.is_allocated() {
            return Err(GgmlError::NotAllocated(t.name()));
        }
        // SAFETY: t has data in a live backend buffer; the range is the whole tensor.
        unsafe { sys::ggml_backend_tensor_memset(t.raw(), 0, 0, t.n_bytes()) };
        Ok(())
    }
}

/// The kernel of [`Context::cont_cpu`]: dst (contiguous F32) ← a (same shape, any strides),
/// in 32×32 tiles of (i0, i1) so that both the strided reads and the writes stay in cache;
/// tiles are dealt to the `nth` threads round-robin.
unsafe extern "C" fn strided_copy_f32(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    _: *mut std::os::raw::c_void,
) {
    const TILE: usize = 32;
    // SAFETY: ggml calls this with the node (`dst`, contiguous F32, allocated) and its source
    // `a` (F32, same ne, allocated), both live for the call; every index below stays inside
    // their shapes, and threads write disjoint rows of dst.
    unsafe {
        let ne = (*dst).ne.map(|n| n as usize);
        let nb = (*a).nb;
        let (n0, n1, n2) = (ne[0], ne[1], ne[2]);
        let src = (*a).data as *const u8;
        let out = (*dst).data as *mut f32;
        let tiles1 = n1.div_ceil(TILE);
        let jobs = tiles1 * n2;
        let (ith, nth) = (ith as usize, nth.max(1) as usize);
        for job in (ith..jobs).step_by(nth) {
            let (i2, t1) = (job / tiles1, job % tiles1);
            let rows = t1 * TILE..(t1 * TILE + TILE).min(n1);
            for c0 in (0..n0).step_by(TILE) {
                let cols = c0..(c0 + TILE).min(n0);
                for i1 in rows.clone() {
                    let drow = out.add((i2 * n1 + i1) * n0);
                    let sbase = src.add(i1 * nb[1] + i2 * nb[2]);
                    for i0 in cols.clone() {
                        *drow.add(i0) = *(sbase.add(i0 * nb[0]) as *const f32);
                    }
                }
            }
        }
    }
}

fn can_repeat(b: Tensor<'_>, a: Tensor<'_>) -> bool {
    let (nb, na) = (b.ne(), a.ne());
    (0..4).all(|i| nb[i] > 0 && na[i] % nb[i] == 0)
}

impl<'a> Tensor<'a> {
    /// Source `i` of this node (None for a leaf or an unused slot).
    pub fn src(self, i: usize) -> Option<Tensor<'a>> {
        // SAFETY: live tensor; reading one pointer of its src array (GGML_MAX_SRC = 10 slots).
        let p = unsafe { (*self.raw()).src.get(i).copied()? };
        std::ptr::NonNull::new(p).map(|_| self.with_ptr(p))
    }

    /// Gives this node `op` with sources `a`, `b` and no op parameters, in place.
    ///
    /// # Safety
    /// `op(a, b)` must have this node's type and shape, `a`/`b` must live as long as the node,
    /// and no allocated computation may hold the graph being changed.
    unsafe fn set_binary_op(self, op: sys::ggml_op, a: Tensor<'a>, b: Tensor<'a>) {
        // SAFETY: per the contract; fields of a live tensor are plain data.
        unsafe {
            let t = &mut *self.raw();
            t.op = op;
            t.op_params = [0; 16];
            t.src = [std::ptr::null_mut(); 10];
            t.src[0] = a.raw();
            t.src[1] = b.raw();
        }
    }

    /// Turns this node into `MUL_MAT(a, b)` in place.
    ///
    /// # Safety
    /// The node's type and shape must equal those of `mul_mat(a, b)` (F32,
    /// [a.ne[1], b.ne[1], ...]) so its consumers stay valid, `a`/`b` must live as long as the
    /// node, and no allocated computation may hold the graph being changed.
    pub(crate) unsafe fn rewrite_as_mul_mat(self, a: Tensor<'a>, b: Tensor<'a>) {
        let (ane, bne, ne) = (a.ne(), b.ne(), self.ne());
        assert!(
            ane[0] == bne[0]
                && ne[0] == ane[1]
                && ne[1] == bne[1]
                && ne[2] == bne[2]
                && ne[3] == bne[3]
                && bne[2] % ane[2] == 0
                && bne[3] % ane[3] == 0,
            "rewrite as mul_mat: {a:?} × {b:?} does not give {self:?}"
        );
        // SAFETY: the caller guarantees exclusivity (and the shapes, checked above).
        unsafe { self.set_binary_op(sys::GGML_OP_MUL_MAT, a, b) };
    }

    /// Turns this node into `OUT_PROD(a, b)` in place: Σ_k a[:, k]·b[:, k]ᵀ for a [n, k] with
    /// contiguous rows and b [p, k] of any strides (a transpose view, for instance).
    ///
    /// # Safety
    /// As for [`Tensor::rewrite_as_mul_mat`]: the node must be F32 [a.ne[0], b.ne[0]].
    pub(crate) unsafe fn rewrite_as_out_prod(self, a: Tensor<'a>, b: Tensor<'a>) {
        let (ane, bne, ne) = (a.ne(), b.ne(), self.ne());
        assert!(
            ane[1] == bne[1]
                && ne[0] == ane[0]
                && ne[1] == bne[0]
                && ane[2] == 1
                && bne[2] == 1
                && ne[2] == 1
                && a.nb()[0] == 4,
            "rewrite as out_prod: {a:?} ⊗ {b:?} does not give {self:?}"
        );
        // SAFETY: the caller guarantees exclusivity (and the shapes, checked above).
        unsafe { self.set_binary_op(sys::GGML_OP_OUT_PROD, a, b) };
    }

    /// Turns this node into a view of `src` at byte `offset` with strides `nb` (its type and
    /// shape stay): the node no longer computes anything, its consumers read `src`'s data.
    ///
    /// # Safety
    /// The region must lie inside `src` and hold this node's values in the layout `nb`
    /// describes; `src` must live as long as the node and must not depend on it; no allocated
    /// computation may hold the graph being changed.
    pub(crate) unsafe fn rewrite_as_view(self, src: Tensor<'a>, offset: usize, nb: [usize; 4]) {
        let ne = self.ne();
        let last = offset + (0..4).map(|i| (ne[i] as usize - 1) * nb[i]).sum::<usize>() + 4;
        assert!(
            self.ty() == super::Type::F32 && nb[0] == 4 && last <= src.n_bytes(),
            "rewrite as view: {self:?} at {offset} does not fit in {src:?}"
        );
        // SAFETY: the caller guarantees exclusivity and the layout; fields of a live tensor are
        // plain data. ggml's views keep the offset in op_params and point view_src at the
        // viewed tensor, which is what the allocator and the backends read.
        unsafe {
            let t = &mut *self.raw();
            t.op = sys::GGML_OP_VIEW;
            t.op_params = [0; 16];
            std::ptr::copy_nonoverlapping(
                &offset as *const usize as *const u8,
                t.op_params.as_mut_ptr() as *mut u8,
                std::mem::size_of::<usize>(),
            );
            t.src = [std::ptr::null_mut(); 10];
            t.src[0] = src.raw();
            t.view_src = src.raw();
            t.view_offs = offset;
            t.nb = nb;
        }
    }

    /// Turns this node into ggml's split GEGLU, `gelu(gate) ⊙ up`, in place (F32, the shape
    /// of `gate` and `up`; both with contiguous rows, as ggml's GLU ops need).
    ///
    /// # Safety
    /// As for [`Tensor::rewrite_as_mul_mat`].
    pub(crate) unsafe fn rewrite_as_geglu(self, gate: Tensor<'a>, up: Tensor<'a>) {
        assert!(
            gate.ne() == self.ne()
                && up.ne() == self.ne()
                && [gate.ty(), up.ty(), self.ty()].iter().all(|&t| t == super::Type::F32)
                && gate.nb()[0] == 4
                && up.nb()[0] == 4,
            "rewrite as geglu: {gate:?}, {up:?} does not give {self:?}"
        );
        // SAFETY: the caller guarantees exclusivity (and the shapes, checked above). The op
        // parameters are ggml_glu_impl's: the GLU op, then `swapped` (0: the gate is src0).
        unsafe {
            self.set_binary_op(sys::GGML_OP_GLU, gate, up);
            let t = &mut *self.raw();
            t.op_params[0] = sys::GGML_GLU_OP_GEGLU as i32;
            t.op_params[1] = 0;
        }
    }

    /// Turns this node into a copy of the custom op node `template` (its op, parameters and
    /// sources), in place; the template itself stays out of every graph.
    ///
    /// # Safety
    /// As for [`Tensor::rewrite_as_mul_mat`]: the template's kernel must write exactly this
    /// node's type and shape, and its sources must live as long as the node.
    pub(crate) unsafe fn rewrite_as_copy_of(self, template: Tensor<'a>) {
        assert!(
            template.op() == sys::GGML_OP_CUSTOM
                && template.ty() == self.ty()
                && template.ne() == self.ne()
                && self.is_contiguous(),
            "rewrite as a copy of {template:?}: does not give {self:?}"
        );
        // SAFETY: the caller guarantees exclusivity (and the shapes, checked above); op
        // parameters and source pointers are plain data copied from a live node.
        unsafe {
            let (t, s) = (&mut *self.raw(), &*template.raw());
            t.op = s.op;
            t.op_params = s.op_params;
            t.src = s.src;
        }
    }

    /// Turns this node into `add(a, b)` in place (same contract as
    /// [`Tensor::rewrite_as_mul_mat`]: the node must have `a`'s F32 type and shape, equal to
    /// `b`'s).
    ///
    /// # Safety
    /// As for [`Tensor::rewrite_as_mul_mat`].
    pub(crate) unsafe fn rewrite_as_add(self, a: Tensor<'a>, b: Tensor<'a>) {
        assert!(
            a.ne() == self.ne() && b.ne() == self.ne(),
            "rewrite as add: {a:?} + {b:?} does not give {self:?}"
        );
        // SAFETY: the caller guarantees exclusivity (and the shapes, checked above).
        unsafe { self.set_binary_op(sys::GGML_OP_ADD, a, b) };
    }
}

/// Points every view in `graph` whose `view_src` is itself a view at the root tensor (adding
/// the offsets), as ggml does when it makes a view of a view; returns how many changed.
///
/// [`Tensor::rewrite_as_view`] turns nodes that other views were made from into views, and
/// ggml's allocator frees a viewed tensor only when the views *of that tensor* are done: a
/// view of a view whose middle link is no longer an allocated tensor would keep the root
/// allocated to the end of the graph (with the fused attention that kept every layer's
/// attention output and gradients: 66 MiB at 256 tokens on the default model).
pub(crate) fn flatten_view_chains(graph: &Graph<'_>) -> usize {
    let mut n = 0;
    for i in 0..graph.n_nodes() {
        let t = graph.node(i);
        // SAFETY: live nodes of a graph that no allocated computation holds (it is being
        // rebuilt); view_src and view_offs are plain fields, and following the chain to its
        // root with the summed offset addresses the same bytes.
        unsafe {
            let r = &mut *t.raw();
            let mut changed = false;
            while !r.view_src.is_null() && !(*r.view_src).view_src.is_null() {
                r.view_offs += (*r.view_src).view_offs;
                r.view_src = (*r.view_src).view_src;
                changed = true;
            }
            n += changed as usize;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::super::{Backend, Capacity};
    use super::*;

    /// The tiled copy equals ggml's `cont` for transposes and permutes of odd shapes (tiles
    /// cut at the edges, several threads).
    #[test]
    fn cont_cpu_equals_cont() {
        let mut backend = Backend::cpu(3).unwrap();
        for ne in [[37i64, 70, 1], [64, 256, 9], [1, 33, 2], [300, 5, 3]] {
            let ctx = Context::new(Capacity::graph(16, 64, false)).unwrap();
            let x = ctx.new_f32("x", &ne).set_input();
            let views =
                [ctx.transpose(x), ctx.permute(x, [0, 2, 1, 3]), ctx.permute(x, [2, 0, 1, 3])];
            let mut g = ctx.new_graph(64, false);
            let pairs: Vec<_> = views
                .iter()
                .map(|&v| (ctx.cont(v).set_output(), ctx.cont_cpu(v).set_output()))
                .collect();
            for &(a, b) in &pairs {
                g.build_forward_expand(a);
                g.build_forward_expand(b);
            }
            let data: Vec<f32> =
                (0..ne.iter().product::<i64>()).map(|i| i as f32 * 0.5 - 7.0).collect();
            let mut run = backend.compute(&g).unwrap();
            run.write_f32(x, &data).unwrap();
            run.run().unwrap();
            for &(a, b) in &pairs {
                assert_eq!(a.ne(), b.ne());
                assert_eq!(
                    run.read_f32(a).unwrap(),
                    run.read_f32(b).unwrap(),
                    "shape {ne:?}, view {:?}",
                    a.ne()
                );
            }
        }
    }

    /// A view made from a node that is later rewritten as a view of another tensor is pointed
    /// at the root (offsets added) and reads the root's values.
    #[test]
    fn view_chains_are_flattened_to_their_root() {
        let mut backend = Backend::cpu(1).unwrap();
        let ctx = Context::new(Capacity::graph(16, 64, false)).unwrap();
        let x = ctx.new_f32("x", &[4, 6]).set_input();
        let a = ctx.scale(x, 2.0); // [4, 6], rewritten below as rows 2..5 of c
        let b = ctx.permute(a, [1, 0, 2, 3]); // a view of a
        let c = ctx.scale(ctx.new_f32("y", &[4, 8]).set_input(), 3.0);
        let out = ctx.cont(b).set_output();
        // SAFETY: a has c's row layout (4 F32 per row), its 6 rows lie inside c's 8 from
        // row 2, c does not depend on a, and no computation holds the graph yet.
        unsafe { a.rewrite_as_view(c, 2 * 16, [4, 16, 96, 96]) };
        let mut g = ctx.new_graph(64, false);
        g.build_forward_expand(out);
        assert_eq!(flatten_view_chains(&g), 1, "b's chain b → a → c");
        assert_eq!(b.view_source().map(|v| v.raw()), Some(c.raw()));
        let y: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let mut run = backend.compute(&g).unwrap();
        // (x left the graph with the rewrite.)
        run.write_f32(ctx_input(&g, "y"), &y).unwrap();
        run.run().unwrap();
        // out[i][j] = a[j][i] = 3·y[(2 + j)·4 + i]
        let want: Vec<f32> =
            (0..4).flat_map(|i| (0..6).map(move |j| 3.0 * ((2 + j) * 4 + i) as f32)).collect();
        assert_eq!(run.read_f32(out).unwrap(), want);
    }

    fn ctx_input<'a>(g: &Graph<'a>, name: &str) -> Tensor<'a> {
        (0..g.n_nodes())
            .flat_map(|i| (0..10).filter_map(move |k| g.node(i).src(k)))
            .find(|t| t.name() == name)
            .expect("input in the graph")
    }
}
