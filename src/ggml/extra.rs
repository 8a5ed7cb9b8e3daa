//! Ops and tensor surgery the training engine needs beyond the forward graph: scalar math
//! for in-graph gradient clipping, zeroing persistent tensors, and the in-place rewrite of a
//! backward node (see [`super::frozen`]).

use llama_cpp_sys_2 as sys;

use super::context::{Context, Tensor};
use super::GgmlError;

impl Context {
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

    /// Turns this node into `MUL_MAT(a, b)` in place.
    ///
    /// # Safety
    /// The node's type and shape must equal those of `mul_mat(a, b)` (F32,
    /// [a.ne[1], b.ne[1], ...]) so its consumers stay valid, `a`/`b` must live as long as the
    /// node, and no allocated computation may hold the graph being changed.
    pub(crate) unsafe fn rewrite_as_mul_mat(self, a: Tensor<'a>, b: Tensor<'a>) {
        let (ane, bne, ne) = (a.ne(), b.ne(), self.ne());
        assert!(ane[0] == bne[0] && ne[0] == ane[1] && ne[1] == bne[1] && ne[2] == bne[2] && ne[3] == bne[3], "rewrite as mul_mat: {a:?} × {b:?} does not give {self:?}");
        // SAFETY: the caller guarantees exclusivity; fields of a live tensor are plain data.
        unsafe {
            let t = &mut *self.raw();
            t.op = sys::GGML_OP_MUL_MAT;
            t.op_params = [0; 16];
            t.src = [std::ptr::null_mut(); 10];
            t.src[0] = a.raw();
            t.src[1] = b.raw();
        }
    }

    /// Turns this node into `add(a, b)` in place (same contract as
    /// [`Tensor::rewrite_as_mul_mat`]: the node must have `a`'s F32 type and shape, equal to
    /// `b`'s).
    ///
    /// # Safety
    /// As for [`Tensor::rewrite_as_mul_mat`].
    pub(crate) unsafe fn rewrite_as_add(self, a: Tensor<'a>, b: Tensor<'a>) {
        assert!(a.ne() == self.ne() && b.ne() == self.ne(), "rewrite as add: {a:?} + {b:?} does not give {self:?}");
        // SAFETY: the caller guarantees exclusivity; fields of a live tensor are plain data.
        unsafe {
            let t = &mut *self.raw();
            t.op = sys::GGML_OP_ADD;
            t.op_params = [0; 16];
            t.src = [std::ptr::null_mut(); 10];
            t.src[0] = a.raw();
            t.src[1] = b.raw();
        }
    }
}
