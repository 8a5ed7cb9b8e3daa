//! Contexts, tensors, graphs and the ops grit's forward and backward graphs use.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use llama_cpp_sys_2 as sys;

use super::backend::BufferType;
use super::GgmlError;

/// A ggml tensor type (`enum ggml_type`), e.g. [`Type::F32`], [`Type::Q4_1`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Type(pub u32);

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const BF16: Type = Type(sys::GGML_TYPE_BF16);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);
    pub const F64: Type = Type(sys::GGML_TYPE_F64);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: Type = Type(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: Type = Type(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: Type = Type(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: Type = Type(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: Type = Type(sys::GGML_TYPE_Q3_K);
    pub const Q4_K: Type = Type(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Type = Type(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Type = Type(sys::GGML_TYPE_Q6_K);
    pub const IQ4_NL: Type = Type(sys::GGML_TYPE_IQ4_NL);
    pub const IQ4_XS: Type = Type(sys::GGML_TYPE_IQ4_XS);

    fn traits(self) -> Option<&'static sys::ggml_type_traits> {
        if self.0 >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: ids below GGML_TYPE_COUNT index ggml's static type-traits table, which
        // lives for the whole process.
        unsafe { sys::ggml_get_type_traits(self.0 as sys::ggml_type).as_ref() }
    }

    /// ggml's name for the type (`f32`, `q4_1`, ...).
    pub fn name(self) -> String {
        match self.traits() {
            // SAFETY: type_name is a static NUL-terminated string (or null for removed types).
            Some(t) if !t.type_name.is_null() => {
                unsafe { CStr::from_ptr(t.type_name) }.to_string_lossy().into_owned()
            }
            _ => format!("type{}", self.0),
        }
    }
    /// Elements per block (1 for F32/F16, 32 for Q4_0, 256 for K-quants).
    pub fn block_size(self) -> usize {
        self.traits().map_or(0, |t| t.blck_size.max(0) as usize)
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.traits().map_or(0, |t| t.type_size)
    }
    pub fn is_quantized(self) -> bool {
        self.traits().is_some_and(|t| t.is_quantized)
    }
    /// Whether ggml can convert the type to F32 (needed for every base weight grit trains on).
    pub fn can_dequantize(self) -> bool {
        self == Type::F32 || self.traits().is_some_and(|t| t.to_float.is_some() && t.blck_size > 0)
    }
    /// Bytes of one row of `n` elements, or None when `n` is not a multiple of the block size.
    pub fn row_size(self, n: usize) -> Option<usize> {
        let b = self.block_size();
        if b == 0 || !n.is_multiple_of(b) {
            return None;
        }
        Some(n / b * self.type_size())
    }
}

impl fmt::Debug for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}
impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// RoPE variant: how the rotated pairs are laid out in a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs (x0, x1), (x2, x3), ... — LLaMA (`GGML_ROPE_TYPE_NORMAL` = 0).
    Norm,
    /// Halves (x_i, x_{i+d/2}) — GPT-NeoX, Qwen2 (`GGML_ROPE_TYPE_NEOX` = 2).
    Neox,
}

impl RopeMode {
    fn ggml(self) -> i32 {
        match self {
            RopeMode::Norm => 0,
            RopeMode::Neox => 2,
        }
    }
}

/// The scalar parameters of `ggml_rope_ext` (YaRN fields included; ext_factor 0 disables YaRN).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub mode: RopeMode,
    /// Rotated dimensions per head (usually the head size).
    pub n_dims: usize,
    pub n_ctx_orig: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// How many objects a [`Context`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Tensor objects (every op result and every view is one).
    pub tensors: usize,
    /// Graphs of `graph_nodes` nodes to reserve room for (0 for a weights-only context).
    pub graphs: usize,
    pub graph_nodes: usize,
    /// Whether graphs carry gradient slots (needed for `build_backward_expand`).
    pub grads: bool,
}

impl Capacity {
    /// Room for `n` tensors and no graph (weights, parameters).
    pub fn tensors(n: usize) -> Self {
        Capacity { tensors: n, graphs: 0, graph_nodes: 0, grads: false }
    }
    /// Room for `tensors` tensors and one graph of `nodes` nodes (with gradient slots when `grads`).
    pub fn graph(tensors: usize, nodes: usize, grads: bool) -> Self {
        Capacity { tensors, graphs: 1, graph_nodes: nodes, grads }
    }
    fn bytes(&self) -> usize {
        // SAFETY: pure functions of their arguments.
        let (t, g) = unsafe {
            (
                sys::ggml_tensor_overhead(),
                if self.graphs > 0 {
                    sys::ggml_graph_overhead_custom(self.graph_nodes, self.grads)
                } else {
                    0
                },
            )
        };
        self.tensors * t + self.graphs * g + 4096
    }
}

static NEXT_CONTEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An owned ggml context (`no_alloc`): the metadata of tensors and graphs.
///
/// Tensor data lives either in buffers this context owns ([`Context::allocate`]), or in the
/// compute buffer of the [`Backend`](super::Backend) that runs a graph.
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
    id: u64,
    capacity: Capacity,
    /// Buffers from [`Context::allocate`], freed with the context.
    buffers: RefCell<Vec<NonNull<sys::ggml_backend_buffer>>>,
    /// Tensors whose data lives in `buffers` (the only ones `read`/`write` accept).
    owned: RefCell<HashSet<usize>>,
}

// SAFETY: a ggml context and the backend buffers it owns have no thread affinity; moving
// the owner to another thread requires that no Tensor borrows it (the borrow checker sees
// to that). Not Sync: the buffer list uses a RefCell.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        for b in self.buffers.borrow().iter() {
            // SAFETY: each buffer was returned by ggml_backend_alloc_ctx_tensors_from_buft and is
            // freed exactly once; no Tensor handle can outlive `self` to use it afterwards.
            unsafe { sys::ggml_backend_buffer_free(b.as_ptr()) };
        }
        // SAFETY: ptr came from ggml_init and is freed exactly once.
        unsafe { sys::ggml_free(self.ptr.as_ptr()) };
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("id", &self.id).field("capacity", &self.capacity).finish()
    }
}

/// A tensor in a [`Context`]: a copyable handle valid as long as that context (`'a`).
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    ptr: NonNull<sys::ggml_tensor>,
    owner: u64,
    _ctx: PhantomData<&'a Context>,
}

/// A [`Tensor`] without the lifetime, for structs that own the context the tensor lives in.
/// Only the owning context turns it back into a tensor ([`Context::tensor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorId {
    ptr: NonNull<sys::ggml_tensor>,
    owner: u64,
}

impl Context {
    /// A new context with room for `cap`.
    pub fn new(cap: Capacity) -> Result<Self, GgmlError> {
        // Initialises ggml once (and grit's log hook) without changing the log verbosity.
        let _ = crate::llama::backend();
        let bytes = cap.bytes();
        let params = sys::ggml_init_params {
            mem_size: bytes,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml allocates its own pool of `bytes` (mem_buffer is null); no_alloc means
        // tensors get no data in the pool.
        let ptr = unsafe { sys::ggml_init(params) };
        let ptr = NonNull::new(ptr).ok_or(GgmlError::ContextInit { bytes })?;
        Ok(Context {
            ptr,
            id: NEXT_CONTEXT_ID.fetch_add(1, Ordering::Relaxed),
            capacity: cap,
            buffers: RefCell::new(Vec::new()),
            owned: RefCell::new(HashSet::new()),
        })
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    /// Bytes of the metadata pool still free.
    fn free_bytes(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::ggml_get_mem_size(self.raw()).saturating_sub(sys::ggml_used_mem(self.raw())) }
    }

    /// Panics (instead of letting ggml abort) when one more tensor object would not fit.
    pub(crate) fn room(&self, n: usize) {
        // SAFETY: pure function.
        let need = n * unsafe { sys::ggml_tensor_overhead() };
        assert!(
            self.free_bytes() >= need,
            "ggml context full: capacity {:?} leaves no room for {n} more tensor(s); create the context with a larger Capacity",
            self.capacity
        );
    }

    pub(crate) fn wrap<'a>(&'a self, p: *mut sys::ggml_tensor) -> Tensor<'a> {
        Tensor {
            ptr: NonNull::new(p).expect("ggml returned a null tensor"),
            owner: self.id,
            _ctx: PhantomData,
        }
    }

    /// The tensor a [`TensorId`] names. Panics if the id belongs to another context.
    pub fn tensor(&self, id: TensorId) -> Tensor<'_> {
        assert_eq!(id.owner, self.id, "TensorId used with a context that does not own it");
        Tensor { ptr: id.ptr, owner: id.owner, _ctx: PhantomData }
    }

    /// Looks a leaf tensor (made with [`Context::new_tensor`]) up by name (linear in the
    /// number of tensors). Op results are not returned: they refer to tensors of other
    /// contexts whose lifetime a name lookup cannot carry.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context and NUL-terminated name; the result (if any) is owned by self.
        let p = unsafe { sys::ggml_get_tensor(self.raw(), c.as_ptr()) };
        NonNull::new(p)
            .map(|ptr| Tensor { ptr, owner: self.id, _ctx: PhantomData })
            .filter(|t| t.is_leaf())
    }

    // ---- creating tensors ------------------------------------------------------------------

    /// A new tensor of type `ty` and shape `ne` (ggml order: ne[0] is contiguous), 1 to 4 dims.
    pub fn new_tensor(&self, ty: Type, ne: &[i64]) -> Tensor<'_> {
        assert!((1..=4).contains(&ne.len()), "new_tensor: {} dims (1..=4 allowed)", ne.len());
        assert!(ne.iter().all(|&d| d > 0), "new_tensor: non-positive dimension in {ne:?}");
        assert!(
            ty.block_size() > 0 && (ne[0] as usize).is_multiple_of(ty.block_size()),
            "new_tensor: ne[0] = {} is not a multiple of {ty}'s block size",
            ne[0]
        );
        self.room(1);
        // SAFETY: valid context with room; ne has ne.len() (1..=4) valid elements.
        self.wrap(unsafe {
            sys::ggml_new_tensor(self.raw(), ty.0 as sys::ggml_type, ne.len() as i32, ne.as_ptr())
        })
    }

    /// A named F32 tensor.
    pub fn new_f32(&self, name: &str, ne: &[i64]) -> Tensor<'_> {
        let t = self.new_tensor(Type::F32, ne);
        t.set_name(name);
        t
    }

    /// A named I32 vector of length `n`.
    pub fn new_i32(&self, name: &str, n: usize) -> Tensor<'_> {
        let t = self.new_tensor(Type::I32, &[n as i64]);
        t.set_name(name);
        t
    }

    /// Gives every not-yet-allocated tensor of this context storage in a new buffer of type
    /// `buft`, owned by this context. Returns the bytes allocated (0 if nothing needed it).
    pub fn allocate(&self, buft: BufferType) -> Result<usize, GgmlError> {
        let mut fresh = Vec::new();
        let mut pending = false;
        // SAFETY: iterating the tensors of a valid context; pointers stay valid while it lives.
        unsafe {
            let mut t = sys::ggml_get_first_tensor(self.raw());
            while !t.is_null() {
                // Views are allocated by ggml inside their source's buffer, which may belong
                // to another context: they are not this context's to read or write.
                if (*t).data.is_null() {
                    pending = true;
                    if (*t).view_src.is_null() {
                        fresh.push(t as usize);
                    }
                }
                t = sys::ggml_get_next_tensor(self.raw(), t);
            }
        }
        if !pending {
            return Ok(0);
        }
        // SAFETY: valid no_alloc context and a buffer type from BufferType (static in ggml).
        let (size, buf) = unsafe {
            (
                sys::ggml_backend_alloc_ctx_tensors_from_buft_size(self.raw(), buft.raw()),
                sys::ggml_backend_alloc_ctx_tensors_from_buft(self.raw(), buft.raw()),
            )
        };
        let buf = NonNull::new(buf).ok_or_else(|| GgmlError::Alloc {
            what: format!("{} tensors", fresh.len()),
            buffer_type: buft.name(),
            bytes: size,
        })?;
        self.buffers.borrow_mut().push(buf);
        self.owned.borrow_mut().extend(fresh);
        Ok(size)
    }

    fn check_owned(&self, t: Tensor<'_>) -> Result<(), GgmlError> {
        if t.owner != self.id || !self.owned.borrow().contains(&(t.ptr.as_ptr() as usize)) {
            return Err(GgmlError::Foreign(t.name()));
        }
        Ok(())
    }

    /// Writes raw bytes into a tensor allocated by [`Context::allocate`] (the whole tensor).
    pub fn write_bytes(&self, t: Tensor<'_>, data: &[u8]) -> Result<(), GgmlError> {
        self.check_owned(t)?;
        // SAFETY: t is owned by this context and was allocated in one of its live buffers.
        unsafe { tensor_write(t, data) }
    }
    /// Reads a tensor allocated by [`Context::allocate`] as raw bytes.
    pub fn read_bytes(&self, t: Tensor<'_>) -> Result<Vec<u8>, GgmlError> {
        self.check_owned(t)?;
        // SAFETY: as in write_bytes.
        unsafe { tensor_read(t) }
    }
    /// Writes an F32 tensor allocated by [`Context::allocate`].
    pub fn write_f32(&self, t: Tensor<'_>, data: &[f32]) -> Result<(), GgmlError> {
        t.expect_type(Type::F32)?;
        self.write_bytes(t, as_bytes(data))
    }
    /// Reads an F32 tensor allocated by [`Context::allocate`].
    pub fn read_f32(&self, t: Tensor<'_>) -> Result<Vec<f32>, GgmlError> {
        t.expect_type(Type::F32)?;
        Ok(from_bytes_f32(&self.read_bytes(t)?))
    }

    // ---- graphs ----------------------------------------------------------------------------

    /// A new graph of up to `size` nodes; `grads` reserves gradient slots for backward.
    pub fn new_graph(&self, size: usize, grads: bool) -> Graph<'_> {
        // SAFETY: pure function.
        let need = unsafe { sys::ggml_graph_overhead_custom(size, grads) };
        assert!(
            self.free_bytes() >= need,
            "ggml context full: no room for a graph of {size} nodes (capacity {:?})",
            self.capacity
        );
        // SAFETY: valid context with room for the graph object.
        let g = unsafe { sys::ggml_new_graph_custom(self.raw(), size, grads) };
        Graph {
            ptr: NonNull::new(g).expect("ggml returned a null graph"),
            size,
            known: HashSet::new(),
            n_leafs: 0,
            sources: Default::default(),
            _inv: PhantomData,
        }
    }

    // ---- ops -------------------------------------------------------------------------------
    // Every op below allocates one tensor object in `self` (checked by `room`) and calls ggml
    // with tensors whose contexts outlive `'a`. Shape preconditions ggml asserts are checked
    // first in Rust so that a wrong graph panics with a message instead of aborting.

    /// `a · b` in ggml's convention: a [k, m, ...], b [k, n, ...] → [m, n, ...]
    /// (b's dims 2 and 3 may be multiples of a's: broadcasting, as in GQA).
    pub fn mul_mat<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        let (x, y) = (a.ne(), b.ne());
        assert!(
            x[0] == y[0] && y[2] % x[2] == 0 && y[3] % x[3] == 0 && !a.is_transposed(),
            "mul_mat: cannot multiply {a:?} by {b:?}"
        );
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_mul_mat(self.raw(), a.raw(), b.raw()) })
    }

    /// Accumulates a matmul in F32 on backends that would otherwise use F16 (attention scores).
    pub fn mul_mat_prec_f32(&self, t: Tensor<'_>) {
        assert_eq!(
            t.op(),
            sys::GGML_OP_MUL_MAT,
            "mul_mat_prec_f32 on a tensor that is not a mul_mat"
        );
        // SAFETY: t is a live mul_mat node; this sets one of its op params.
        unsafe { sys::ggml_mul_mat_set_prec(t.raw(), sys::GGML_PREC_F32) }
    }

    /// Outer product a [m, n] ⊗ b [p, n] → [m, p] (summed over n).
    pub fn out_prod<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        let (x, y) = (a.ne(), b.ne());
        assert!(x[1] == y[1] && y[2] % x[2] == 0 && y[3] % x[3] == 0, "out_prod: {a:?} and {b:?}");
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_out_prod(self.raw(), a.raw(), b.raw()) })
    }

    /// Rows `idx` (I32 [n]) of `a` [k, rows] → F32 [k, n] (dequantizes quantized rows).
    pub fn get_rows<'a>(&'a self, a: Tensor<'a>, idx: Tensor<'a>) -> Tensor<'a> {
        let (x, i) = (a.ne(), idx.ne());
        assert!(
            idx.ty() == Type::I32 && x[2] == i[1] && x[3] == i[2] && i[3] == 1,
            "get_rows: {a:?} with indices {idx:?}"
        );
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_get_rows(self.raw(), a.raw(), idx.raw()) })
    }

    fn assert_broadcast(op: &str, a: Tensor<'_>, b: Tensor<'_>) {
        let (x, y) = (a.ne(), b.ne());
        assert!((0..4).all(|i| x[i] % y[i] == 0), "{op}: {b:?} does not broadcast to {a:?}");
    }

    /// `a + b` (b broadcast to a's shape).
    pub fn add<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        Self::assert_broadcast("add", a, b);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_add(self.raw(), a.raw(), b.raw()) })
    }
    /// `a - b` (b broadcast to a's shape).
    pub fn sub<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        Self::assert_broadcast("sub", a, b);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_sub(self.raw(), a.raw(), b.raw()) })
    }
    /// `a ⊙ b` elementwise (b broadcast to a's shape).
    pub fn mul<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        Self::assert_broadcast("mul", a, b);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_mul(self.raw(), a.raw(), b.raw()) })
    }
    /// `s · a`.
    pub fn scale<'a>(&'a self, a: Tensor<'a>, s: f32) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_scale(self.raw(), a.raw(), s) })
    }
    /// `a` repeated (tiled) to `like`'s shape.
    pub fn repeat<'a>(&'a self, a: Tensor<'a>, like: Tensor<'a>) -> Tensor<'a> {
        Self::assert_broadcast("repeat", like, a);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_repeat(self.raw(), a.raw(), like.raw()) })
    }

    /// RMS normalisation over ne[0]: x / sqrt(mean(x²) + eps).
    pub fn rms_norm<'a>(&'a self, a: Tensor<'a>, eps: f32) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_rms_norm(self.raw(), a.raw(), eps) })
    }
    pub fn silu<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_silu(self.raw(), a.raw()) })
    }
    /// `silu(gate) ⊙ up` (ggml's split SwiGLU, which has a backward).
    pub fn swiglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        assert!(gate.ne() == up.ne(), "swiglu_split: gate {gate:?} and up {up:?} differ in shape");
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_swiglu_split(self.raw(), gate.raw(), up.raw()) })
    }
    /// `gelu(gate) ⊙ up` with ggml's tanh-approximated GELU (llama.cpp's GEGLU feed-forward).
    /// ggml has no backward for it: graphs that need one build the GELU from ops that have
    /// one and restore this op for the forward (see `passes::geglu`).
    pub fn geglu_split<'a>(&'a self, gate: Tensor<'a>, up: Tensor<'a>) -> Tensor<'a> {
        assert!(gate.ne() == up.ne(), "geglu_split: gate {gate:?} and up {up:?} differ in shape");
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_geglu_split(self.raw(), gate.raw(), up.raw()) })
    }
    /// Element-wise ln(1 + eᵃ) (ggml returns a itself above 20).
    pub fn softplus<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_softplus(self.raw(), a.raw()) })
    }
    pub fn exp<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_exp(self.raw(), a.raw()) })
    }
    pub fn log<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_log(self.raw(), a.raw()) })
    }
    pub fn sqr<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_sqr(self.raw(), a.raw()) })
    }

    /// RoPE on `a` [head_dim, n_head, n_tokens] at positions `pos` (I32 [n_tokens]), with
    /// optional per-frequency factors (F32 [n_dims/2], LLaMA 3).
    pub fn rope_ext<'a>(
        &'a self,
        a: Tensor<'a>,
        pos: Tensor<'a>,
        freq_factors: Option<Tensor<'a>>,
        p: &RopeParams,
    ) -> Tensor<'a> {
        assert!(
            pos.ty() == Type::I32 && pos.is_vector() && a.ne()[2] == pos.ne()[0],
            "rope_ext: {a:?} with positions {pos:?}"
        );
        assert!(
            p.n_dims as i64 <= a.ne()[0] && p.n_dims.is_multiple_of(2),
            "rope_ext: n_dims {} for {a:?}",
            p.n_dims
        );
        if let Some(f) = freq_factors {
            assert!(
                f.ty() == Type::F32 && f.ne()[0] as usize >= p.n_dims / 2,
                "rope_ext: freq factors {f:?} for n_dims {}",
                p.n_dims
            );
        }
        self.room(1);
        let c = freq_factors.map_or(std::ptr::null_mut(), |f| f.raw());
        // SAFETY: see the note above the ops; c is null or a live F32 tensor.
        self.wrap(unsafe {
            sys::ggml_rope_ext(
                self.raw(),
                a.raw(),
                pos.raw(),
                c,
                p.n_dims as i32,
                p.mode.ggml(),
                p.n_ctx_orig as i32,
                p.freq_base,
                p.freq_scale,
                p.ext_factor,
                p.attn_factor,
                p.beta_fast,
                p.beta_slow,
            )
        })
    }

    /// softmax(scale · a + mask) over ne[0]; `mask` F32/F16 [ne0, ≥ne1, (broadcast)].
    pub fn soft_max_ext<'a>(
        &'a self,
        a: Tensor<'a>,
        mask: Option<Tensor<'a>>,
        scale: f32,
        max_bias: f32,
    ) -> Tensor<'a> {
        assert!(a.is_contiguous(), "soft_max_ext: {a:?} is not contiguous");
        if let Some(m) = mask {
            let (x, y) = (a.ne(), m.ne());
            assert!(
                (m.ty() == Type::F32 || m.ty() == Type::F16)
                    && m.is_contiguous()
                    && y[0] == x[0]
                    && y[1] >= x[1]
                    && x[2] % y[2] == 0
                    && x[3] % y[3] == 0,
                "soft_max_ext: mask {m:?} does not fit {a:?}"
            );
        }
        assert!(
            max_bias == 0.0 || mask.is_some(),
            "soft_max_ext: ALiBi (max_bias > 0) needs a mask"
        );
        self.room(1);
        let m = mask.map_or(std::ptr::null_mut(), |m| m.raw());
        // SAFETY: see the note above the ops; m is null or a live mask tensor.
        self.wrap(unsafe { sys::ggml_soft_max_ext(self.raw(), a.raw(), m, scale, max_bias) })
    }
    /// softmax over ne[0].
    pub fn soft_max<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_soft_max(self.raw(), a.raw()) })
    }
    /// Sets a[i, j] = -inf for i > j + n_past (a causal mask built into the graph).
    pub fn diag_mask_inf<'a>(&'a self, a: Tensor<'a>, n_past: i32) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_diag_mask_inf(self.raw(), a.raw(), n_past) })
    }

    /// Mean over rows of the cross entropy: -Σ_i labels[i, r] · log softmax(logits[:, r])[i] / rows.
    /// `logits` and `labels` are F32 [n_classes, rows]; the result is a scalar [1].
    pub fn cross_entropy_loss<'a>(&'a self, logits: Tensor<'a>, labels: Tensor<'a>) -> Tensor<'a> {
        assert!(
            logits.ne() == labels.ne(),
            "cross_entropy_loss: logits {logits:?} and labels {labels:?} differ in shape"
        );
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_cross_entropy_loss(self.raw(), logits.raw(), labels.raw()) })
    }

    /// ggml's backward of [`Context::cross_entropy_loss`] for the scalar output gradient
    /// `grad`: (softmax(logits) − labels)·grad/rows, F32 like `logits`.
    pub fn cross_entropy_loss_back<'a>(
        &'a self,
        grad: Tensor<'a>,
        logits: Tensor<'a>,
        labels: Tensor<'a>,
    ) -> Tensor<'a> {
        assert!(
            logits.ne() == labels.ne() && grad.ne() == [1, 1, 1, 1],
            "cross_entropy_loss_back: {grad:?}, {logits:?}, {labels:?}"
        );
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe {
            sys::ggml_cross_entropy_loss_back(self.raw(), grad.raw(), logits.raw(), labels.raw())
        })
    }

    /// Sum of all elements → [1].
    pub fn sum<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_sum(self.raw(), a.raw()) })
    }
    /// Sum over ne[0] → [1, ne1, ne2, ne3].
    pub fn sum_rows<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_sum_rows(self.raw(), a.raw()) })
    }
    /// Mean over ne[0] → [1, ne1, ne2, ne3].
    pub fn mean<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_mean(self.raw(), a.raw()) })
    }

    // ---- layout ----------------------------------------------------------------------------

    /// Copies `a` into `b` (same number of elements; converts types) and returns the b view.
    pub fn cpy<'a>(&'a self, a: Tensor<'a>, b: Tensor<'a>) -> Tensor<'a> {
        assert_eq!(a.n_elements(), b.n_elements(), "cpy: {a:?} into {b:?}");
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_cpy(self.raw(), a.raw(), b.raw()) })
    }
    /// `a` converted to type `ty`.
    pub fn cast<'a>(&'a self, a: Tensor<'a>, ty: Type) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_cast(self.raw(), a.raw(), ty.0 as sys::ggml_type) })
    }
    /// A contiguous copy of `a`.
    pub fn cont<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_cont(self.raw(), a.raw()) })
    }
    /// A contiguous copy of `a` with shape [ne0, ne1].
    pub fn cont_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        assert_eq!(a.n_elements(), (ne0 * ne1) as usize, "cont_2d: {a:?} to [{ne0}, {ne1}]");
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_cont_2d(self.raw(), a.raw(), ne0, ne1) })
    }
    fn assert_reshape(a: Tensor<'_>, ne: &[i64]) {
        assert!(
            a.is_contiguous() && a.n_elements() as i64 == ne.iter().product::<i64>(),
            "reshape: {a:?} to {ne:?} (needs a contiguous tensor with the same number of elements)"
        );
    }
    pub fn reshape_2d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64) -> Tensor<'a> {
        Self::assert_reshape(a, &[ne0, ne1]);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_reshape_2d(self.raw(), a.raw(), ne0, ne1) })
    }
    pub fn reshape_3d<'a>(&'a self, a: Tensor<'a>, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'a> {
        Self::assert_reshape(a, &[ne0, ne1, ne2]);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_reshape_3d(self.raw(), a.raw(), ne0, ne1, ne2) })
    }
    pub fn reshape_4d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne0: i64,
        ne1: i64,
        ne2: i64,
        ne3: i64,
    ) -> Tensor<'a> {
        Self::assert_reshape(a, &[ne0, ne1, ne2, ne3]);
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_reshape_4d(self.raw(), a.raw(), ne0, ne1, ne2, ne3) })
    }
    /// Moves dim i of `a` to position `axes[i]` (ggml_permute semantics).
    pub fn permute<'a>(&'a self, a: Tensor<'a>, axes: [i32; 4]) -> Tensor<'a> {
        let mut seen = [false; 4];
        for &x in &axes {
            assert!(
                (0..4).contains(&x) && !seen[x as usize],
                "permute: {axes:?} is not a permutation of 0..4"
            );
            seen[x as usize] = true;
        }
        self.room(1);
        // SAFETY: see the note above the ops; axes is a permutation.
        self.wrap(unsafe {
            sys::ggml_permute(self.raw(), a.raw(), axes[0], axes[1], axes[2], axes[3])
        })
    }
    /// Swaps dims 0 and 1 (a view).
    pub fn transpose<'a>(&'a self, a: Tensor<'a>) -> Tensor<'a> {
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe { sys::ggml_transpose(self.raw(), a.raw()) })
    }
    fn assert_view(a: Tensor<'_>, ne: [i64; 4], nb: [usize; 3], offset: usize) {
        // The last element addressed must lie inside the viewed tensor's data.
        let last = offset
            + (ne[1] - 1).max(0) as usize * nb[0]
            + (ne[2] - 1).max(0) as usize * nb[1]
            + (ne[3] - 1).max(0) as usize * nb[2]
            + a.ty().row_size(ne[0] as usize).unwrap_or(usize::MAX);
        assert!(
            ne.iter().all(|&d| d > 0) && last <= a.n_bytes(),
            "view: ne {ne:?} nb {nb:?} offset {offset} reaches outside {a:?}"
        );
    }
    /// A 1-d view of `ne0` elements starting at byte `offset`.
    pub fn view_1d<'a>(&'a self, a: Tensor<'a>, ne0: i64, offset: usize) -> Tensor<'a> {
        Self::assert_view(a, [ne0, 1, 1, 1], [0, 0, 0], offset);
        self.room(1);
        // SAFETY: see the note above the ops; the view lies inside `a` (checked).
        self.wrap(unsafe { sys::ggml_view_1d(self.raw(), a.raw(), ne0, offset) })
    }
    /// A 2-d view with row stride `nb1` bytes.
    pub fn view_2d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne0: i64,
        ne1: i64,
        nb1: usize,
        offset: usize,
    ) -> Tensor<'a> {
        Self::assert_view(a, [ne0, ne1, 1, 1], [nb1, 0, 0], offset);
        self.room(1);
        // SAFETY: see the note above the ops; the view lies inside `a` (checked).
        self.wrap(unsafe { sys::ggml_view_2d(self.raw(), a.raw(), ne0, ne1, nb1, offset) })
    }
    /// A 3-d view with strides `nb1`, `nb2` bytes.
    pub fn view_3d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne: [i64; 3],
        nb1: usize,
        nb2: usize,
        offset: usize,
    ) -> Tensor<'a> {
        Self::assert_view(a, [ne[0], ne[1], ne[2], 1], [nb1, nb2, 0], offset);
        self.room(1);
        // SAFETY: see the note above the ops; the view lies inside `a` (checked).
        self.wrap(unsafe {
            sys::ggml_view_3d(self.raw(), a.raw(), ne[0], ne[1], ne[2], nb1, nb2, offset)
        })
    }
    /// A 4-d view with strides `nb` = [nb1, nb2, nb3] bytes.
    pub fn view_4d<'a>(
        &'a self,
        a: Tensor<'a>,
        ne: [i64; 4],
        nb: [usize; 3],
        offset: usize,
    ) -> Tensor<'a> {
        Self::assert_view(a, ne, nb, offset);
        self.room(1);
        // SAFETY: see the note above the ops; the view lies inside `a` (checked).
        self.wrap(unsafe {
            sys::ggml_view_4d(
                self.raw(),
                a.raw(),
                ne[0],
                ne[1],
                ne[2],
                ne[3],
                nb[0],
                nb[1],
                nb[2],
                offset,
            )
        })
    }

    /// One AdamW step on parameter `a` (an op; see ggml_opt_step_adamw). `params` is F32 [7]:
    /// alpha (lr), beta1, beta2, eps, wd, beta1h, beta2h.
    pub fn opt_step_adamw<'a>(
        &'a self,
        a: Tensor<'a>,
        grad: Tensor<'a>,
        m: Tensor<'a>,
        v: Tensor<'a>,
        params: Tensor<'a>,
    ) -> Tensor<'a> {
        assert!(
            a.ne() == grad.ne() && a.ne() == m.ne() && a.ne() == v.ne(),
            "opt_step_adamw: shapes of {a:?}, {grad:?}, {m:?}, {v:?}"
        );
        assert!(
            params.ty() == Type::F32 && params.n_elements() == 7,
            "opt_step_adamw: params {params:?} must be F32 [7]"
        );
        self.room(1);
        // SAFETY: see the note above the ops.
        self.wrap(unsafe {
            sys::ggml_opt_step_adamw(
                self.raw(),
                a.raw(),
                grad.raw(),
                m.raw(),
                v.raw(),
                params.raw(),
            )
        })
    }
}

// ---- tensors -------------------------------------------------------------------------------

impl<'a> Tensor<'a> {
    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }
    /// Another tensor reachable from this one (a source or view), with the same lifetime.
    pub(crate) fn with_ptr(self, p: *mut sys::ggml_tensor) -> Tensor<'a> {
        Tensor { ptr: NonNull::new(p).expect("null tensor"), owner: 0, _ctx: PhantomData }
    }
    fn info(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives in a context that outlives 'a; only metadata is read, and
        // ggml changes a tensor's metadata only through calls made via these wrappers.
        unsafe { self.ptr.as_ref() }
    }
    /// The lifetime-free handle ([`Context::tensor`] turns it back). Only for leaf tensors
    /// made with [`Context::new_tensor`] (an op result refers to its sources, whose lifetime
    /// the id could not carry); panics otherwise.
    pub fn id(self) -> TensorId {
        assert!(
            self.owner != 0 && self.is_leaf(),
            "TensorId of {self:?}, which is not a leaf tensor of a context"
        );
        TensorId { ptr: self.ptr, owner: self.owner }
    }
    /// Made by `new_tensor`: no op, no sources, not a view.
    fn is_leaf(self) -> bool {
        let t = self.info();
        t.op == sys::GGML_OP_NONE && t.view_src.is_null() && t.src.iter().all(|s| s.is_null())
    }
    pub fn ty(self) -> Type {
        Type(self.info().type_)
    }
    /// Shape in ggml order (ne[0] is contiguous); unused dims are 1.
    pub fn ne(self) -> [i64; 4] {
        self.info().ne
    }
    /// Strides in bytes.
    pub fn nb(self) -> [usize; 4] {
        self.info().nb
    }
    pub fn n_elements(self) -> usize {
        self.ne().iter().product::<i64>() as usize
    }
    /// Bytes spanned by the tensor's data.
    pub fn n_bytes(self) -> usize {
        // SAFETY: live tensor (see `info`).
        unsafe { sys::ggml_nbytes(self.raw()) }
    }
    pub fn is_contiguous(self) -> bool {
        // SAFETY: live tensor.
        unsafe { sys::ggml_is_contiguous(self.raw()) }
    }
    pub fn is_vector(self) -> bool {
        let ne = self.ne();
        ne[1] == 1 && ne[2] == 1 && ne[3] == 1
    }
    fn is_transposed(self) -> bool {
        let nb = self.nb();
        nb[0] > nb[1]
    }
    /// Whether the tensor's buffer attached backend-specific data to it at allocation (the CPU
    /// repacking buffer does so only for tensors it has a kernel for).
    pub fn has_backend_extra(self) -> bool {
        !self.info().extra.is_null()
    }
    pub(crate) fn op(self) -> u32 {
        self.info().op
    }
    /// The `i`-th 32-bit op parameter (e.g. a GLU node's op).
    pub(crate) fn op_params_i32(self, i: usize) -> i32 {
        self.info().op_params[i]
    }
    /// The tensor whose memory this view uses (None: not a view).
    pub(crate) fn view_source(self) -> Option<Tensor<'a>> {
        let p = self.info().view_src;
        (!p.is_null()).then(|| self.with_ptr(p))
    }
    pub(crate) fn flags(self) -> i32 {
        self.info().flags
    }
    /// Whether the tensor has data (a persistent buffer, or an allocated computation).
    pub fn is_allocated(self) -> bool {
        !self.info().data.is_null()
    }
    pub fn name(self) -> String {
        // SAFETY: name is a NUL-terminated array inside the live tensor.
        unsafe { CStr::from_ptr(self.info().name.as_ptr()) }.to_string_lossy().into_owned()
    }
    /// Sets the tensor's name (truncated to ggml's 63 bytes).
    pub fn set_name(self, name: &str) -> Self {
        let c = CString::new(name.replace('\0', "")).unwrap_or_default();
        // SAFETY: live tensor; ggml copies at most 63 bytes and NUL-terminates.
        unsafe { sys::ggml_set_name(self.raw(), c.as_ptr()) };
        self
    }
    /// Marks the tensor as a graph input (allocated before the other nodes; copied to the
    /// backend that needs it). It is also flagged as an output, because ggml's allocator
    /// otherwise reuses an input's memory once its last consumer ran: with the flag, inputs
    /// keep their values across repeated [`Computation::run`](super::Computation::run)s.
    pub fn set_input(self) -> Self {
        // SAFETY: live tensor; sets two flags.
        unsafe {
            sys::ggml_set_input(self.raw());
            sys::ggml_set_output(self.raw());
        }
        self
    }
    /// Marks the tensor as a graph output: its memory is not reused by later nodes, so it
    /// can be read after the computation.
    pub fn set_output(self) -> Self {
        // SAFETY: live tensor; sets a flag.
        unsafe { sys::ggml_set_output(self.raw()) };
        self
    }
    /// Marks the tensor as a trainable parameter (backward computes its gradient).
    pub fn set_param(self) -> Self {
        assert_eq!(self.op(), sys::GGML_OP_NONE, "set_param on {self:?}, which is not a leaf");
        // SAFETY: live leaf tensor; sets a flag.
        unsafe { sys::ggml_set_param(self.raw()) };
        self
    }
    /// Marks the tensor as the loss (a scalar) that backward differentiates.
    pub fn set_loss(self) -> Self {
        assert!(
            self.ty() == Type::F32 && self.n_elements() == 1,
            "set_loss on {self:?}: the loss must be an F32 scalar"
        );
        // SAFETY: live F32 scalar tensor; sets a flag.
        unsafe { sys::ggml_set_loss(self.raw()) };
        self
    }
    pub fn is_param(self) -> bool {
        self.flags() & sys::GGML_TENSOR_FLAG_PARAM as i32 != 0
    }

    pub(crate) fn expect_type(self, ty: Type) -> Result<(), GgmlError> {
        if self.ty() != ty {
            return Err(GgmlError::TensorType {
                tensor: self.name(),
                actual: self.ty().name(),
                expected: ty.name(),
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ne = self.ne();
        write!(f, "'{}' {} [{}, {}, {}, {}]", self.name(), self.ty(), ne[0], ne[1], ne[2], ne[3])
    }
}

/// Copies `data` into the whole of `t`.
///
/// # Safety
/// `t`'s data pointer (if non-null) must point into a live backend buffer.
pub(crate) unsafe fn tensor_write(t: Tensor<'_>, data: &[u8]) -> Result<(), GgmlError> {
    if !t.is_allocated() {
        return Err(GgmlError::NotAllocated(t.name()));
    }
    if !t.is_contiguous() {
        return Err(GgmlError::NotContiguous(t.name()));
    }
    if data.len() != t.n_bytes() {
        return Err(GgmlError::Size { tensor: t.name(), expected: t.n_bytes(), got: data.len() });
    }
    // SAFETY: allocated, contiguous, sizes equal; the caller guarantees the buffer is live.
    unsafe { sys::ggml_backend_tensor_set(t.raw(), data.as_ptr().cast(), 0, data.len()) };
    Ok(())
}

/// Reads the whole of `t`.
///
/// # Safety
/// As for [`tensor_write`].
pub(crate) unsafe fn tensor_read(t: Tensor<'_>) -> Result<Vec<u8>, GgmlError> {
    if !t.is_allocated() {
        return Err(GgmlError::NotAllocated(t.name()));
    }
    if !t.is_contiguous() {
        return Err(GgmlError::NotContiguous(t.name()));
    }
    let mut out = vec![0u8; t.n_bytes()];
    // SAFETY: allocated, contiguous, `out` holds n_bytes; the caller guarantees a live buffer.
    unsafe { sys::ggml_backend_tensor_get(t.raw(), out.as_mut_ptr().cast(), 0, out.len()) };
    Ok(out)
}

/// Plain number types without padding, whose memory can be viewed as bytes.
pub(crate) trait Pod: Copy {}
impl Pod for f32 {}
impl Pod for i32 {}
impl Pod for u8 {}

/// The bytes of a slice of plain numbers (f32, i32).
pub(crate) fn as_bytes<T: Pod>(data: &[T]) -> &[u8] {
    // SAFETY: T is a padding-free number type (Pod): every byte of the slice's memory is
    // initialised, and the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

pub(crate) fn from_bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

// ---- graphs --------------------------------------------------------------------------------

/// A computation graph. Invariant in `'a`, so every tensor added must outlive the graph.
pub struct Graph<'a> {
    ptr: NonNull<sys::ggml_cgraph>,
    size: usize,
    /// Tensors already visited by `build_forward_expand`, and how many of them are leafs
    /// (ggml keeps nodes and leafs in two arrays of `size` entries each).
    known: HashSet<usize>,
    n_leafs: usize,
    /// Every node's sources as built, before a multi-device scheduler redirected some of them
    /// (see [`Graph::restore_sources`]).
    sources:
        std::cell::RefCell<std::collections::HashMap<usize, [*mut sys::ggml_tensor; SRC_SLOTS]>>,
    _inv: PhantomData<fn(&'a ()) -> &'a ()>,
}

/// Source slots of a ggml tensor (GGML_MAX_SRC), read off the bound struct.
const SRC_SLOTS: usize = {
    // SAFETY: a zeroed ggml_tensor is never used as a tensor, only measured.
    let t: sys::ggml_tensor = unsafe { std::mem::zeroed() };
    t.src.len()
};

impl<'a> Graph<'a> {
    /// Puts back the sources every node had when the graph was built. ggml's scheduler,
    /// splitting a graph between devices, points a node's source at a copy of it on the
    /// node's device (a tensor in the scheduler's own context, freed when it next splits a
    /// graph), and a GPU backend may reorder the nodes of its splits in place. Before a graph
    /// is allocated again its sources must be the original ones, or the next split reads freed
    /// tensors (and inputs written by name would no longer be reachable from the nodes).
    /// Records the sources of nodes not seen before; nodes are matched by identity, not by
    /// position.
    pub(crate) fn restore_sources(&self) {
        let mut saved = self.sources.borrow_mut();
        for i in 0..self.n_nodes() {
            let node = self.node(i).raw();
            match saved.entry(node as usize) {
                // SAFETY: node is a live tensor of this graph; only its source pointers are
                // written, with the values it was built with (tensors that outlive 'a).
                std::collections::hash_map::Entry::Occupied(e) => unsafe { (*node).src = *e.get() },
                // SAFETY: as above; read only.
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(unsafe { (*node).src });
                }
            }
        }
    }

    /// Every node's readers among the graph's nodes, keyed by the read tensor (nodes and leafs).
    /// Every node's readers among the graph's nodes, keyed by the read tensor (nodes and leafs).
    pub(crate) fn readers(&self) -> std::collections::HashMap<usize, Vec<Tensor<'a>>> {
        let mut r: std::collections::HashMap<usize, Vec<Tensor<'a>>> =
            std::collections::HashMap::new();
        for i in 0..self.n_nodes() {
            let n = self.node(i);
            for k in 0..10 {
                if let Some(s) = n.src(k) {
                    r.entry(s.raw() as usize).or_default().push(n);
                }
            }
        }
        r
    }

    pub(crate) fn raw(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }
    /// Capacity in nodes.
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn n_nodes(&self) -> usize {
        // SAFETY: the graph lives in a context that outlives 'a.
        unsafe { sys::ggml_graph_n_nodes(self.raw()) as usize }
    }
    /// Flags every computed node of at most `max_bytes` (not a view, not already an input or
    /// output) as an output, so that ggml's allocator never frees it; returns how many and
    /// their bytes. ggml's dynamic allocator keeps at most 256 free blocks per buffer chunk
    /// and aborts the process beyond that (`GGML_ASSERT … "out of free blocks"`): a training
    /// graph whose modules have many different ranks frees thousands of small tensors of many
    /// sizes between large ones, which fragments the free list past that limit (seen after a
    /// GRIT rank cut). Small tensors that stay allocated cannot fragment it.
    ///
    /// With `at_start` they are also flagged as inputs, which ggml's allocator places before
    /// every other tensor. Kept where they are made instead, a backward that recomputes
    /// activations puts them between the large tensors it frees and fragments the list past
    /// the limit (seen with the fused attention and recomputation); at the start they cannot,
    /// but they no longer fill holes either (the default model's step at 256 tokens with
    /// `--weight-copies none`: compute buffer 191 MiB, against 154 for ggml's attention ops
    /// kept in place). Inputs run on the CPU backend in ggml's scheduler, so only for CPU
    /// graphs.
    pub fn keep_small_nodes(&self, max_bytes: usize, at_start: bool) -> (usize, usize) {
        let (mut n, mut bytes) = (0, 0);
        let keep = if at_start {
            (sys::GGML_TENSOR_FLAG_INPUT | sys::GGML_TENSOR_FLAG_OUTPUT) as i32
        } else {
            sys::GGML_TENSOR_FLAG_OUTPUT as i32
        };
        for i in 0..self.n_nodes() {
            let t = self.node(i);
            // SAFETY: live node; reads two fields.
            let (view, flags) = unsafe { (!(*t.raw()).view_src.is_null(), (*t.raw()).flags) };
            if view
                || flags & (sys::GGML_TENSOR_FLAG_INPUT | sys::GGML_TENSOR_FLAG_OUTPUT) as i32 != 0
            {
                continue;
            }
            let nb = t.n_bytes();
            if nb <= max_bytes {
                // SAFETY: live node of a graph no computation holds; sets flags only (ggml's
                // ggml_set_input refuses computed nodes, but the allocator and the scheduler
                // read the flag the same way on any node).
                unsafe { (*t.raw()).flags |= keep };
                n += 1;
                bytes += nb;
            }
        }
        (n, bytes)
    }

    /// Node `i` (0 ≤ i < n_nodes).
    pub fn node(&self, i: usize) -> Tensor<'a> {
        assert!(i < self.n_nodes(), "graph node {i} of {}", self.n_nodes());
        // SAFETY: i is in range; nodes are tensors of contexts that outlive 'a.
        let p = unsafe { sys::ggml_graph_node(self.raw(), i as i32) };
        Tensor { ptr: NonNull::new(p).expect("null graph node"), owner: 0, _ctx: PhantomData }
    }

    /// Adds `t` and everything it depends on.
    pub fn build_forward_expand(&mut self, t: Tensor<'a>) {
        // ggml aborts when the node or leaf array overflows: count the new ones first, the
        // way ggml classifies them (a leaf is an op-less tensor that is not a parameter).
        let mut fresh = HashSet::new();
        let mut stack = vec![t.raw()];
        while let Some(p) = stack.pop() {
            if p.is_null() || self.known.contains(&(p as usize)) || !fresh.insert(p as usize) {
                continue;
            }
            // SAFETY: p is reachable from a live tensor, so it is a live tensor too.
            let x = unsafe { &*p };
            stack.extend(x.src.iter().copied().filter(|s| !s.is_null()));
        }
        let is_leaf = |p: usize| {
            // SAFETY: p was collected above from live tensors.
            let x = unsafe { &*(p as *const sys::ggml_tensor) };
            x.op == sys::GGML_OP_NONE && x.flags & sys::GGML_TENSOR_FLAG_PARAM as i32 == 0
        };
        let new_leafs = fresh.iter().filter(|&&p| is_leaf(p)).count();
        let new_nodes = fresh.len() - new_leafs;
        assert!(
            self.n_nodes() + new_nodes <= self.size && self.n_leafs + new_leafs <= self.size,
            "graph of {} nodes is too small: {} nodes and {} leafs needed",
            self.size,
            self.n_nodes() + new_nodes,
            self.n_leafs + new_leafs
        );
        self.n_leafs += new_leafs;
        self.known.extend(fresh);
        // SAFETY: live graph and tensor; capacity checked above.
        unsafe { sys::ggml_build_forward_expand(self.raw(), t.raw()) }
    }

    /// Appends the backward pass: gradients of every parameter (tensors marked with
    /// [`Tensor::set_param`]) with respect to the loss ([`Tensor::set_loss`]). Gradient
    /// tensors are created in `ctx`. The graph must have been created with `grads = true`
    /// and have room for the backward nodes (about 3× the forward's; 4× is asserted).
    ///
    /// The parameters' gradients are marked as outputs, so they can be read after a run
    /// (otherwise the allocator would reuse their memory). Call
    /// [`Computation::reset_grads`](super::Computation::reset_grads) before each run: it
    /// seeds the loss gradient with 1.
    pub fn build_backward_expand(&mut self, ctx: &'a Context) {
        let n = self.n_nodes();
        assert!(n > 0, "build_backward_expand on an empty graph");
        assert!(
            self.size >= 4 * n,
            "graph of {} nodes is too small for the backward of {n} forward nodes (make it ≥ {})",
            self.size,
            4 * n
        );
        let params: Vec<Tensor<'a>> =
            (0..n).map(|i| self.node(i)).filter(|t| t.is_param()).collect();
        assert!(
            !params.is_empty(),
            "build_backward_expand: no parameter in the graph (Tensor::set_param)"
        );
        assert!(
            (0..n).any(|i| self.node(i).flags() & sys::GGML_TENSOR_FLAG_LOSS as i32 != 0),
            "build_backward_expand: no loss in the graph (Tensor::set_loss)"
        );
        // ggml's backward aborts on GLU ops other than the split SwiGLU (GEGLU: see
        // passes::geglu, which builds the differentiable form).
        if let Some(t) = (0..n).map(|i| self.node(i)).find(|t| {
            t.op() == sys::GGML_OP_GLU && t.op_params_i32(0) != sys::GGML_GLU_OP_SWIGLU as i32
        }) {
            panic!("build_backward_expand: {t:?} is a GLU op without a backward in ggml (build the graph for a backward)");
        }
        // ggml creates a few tensors per forward node and aborts when the context is full.
        ctx.room(4 * n);
        // SAFETY: live context and graph (created with grads, which ggml asserts); NULL
        // grad_accs lets ggml create the accumulators; parameters and loss exist (checked).
        unsafe { sys::ggml_build_backward_expand(ctx.raw(), self.raw(), std::ptr::null_mut()) }
        for p in params {
            if let Some(g) = self.grad(p) {
                g.set_output();
            }
        }
    }

    /// The gradient of `t` in this graph (after [`Graph::build_backward_expand`]).
    pub fn grad(&self, t: Tensor<'a>) -> Option<Tensor<'a>> {
        // SAFETY: live graph and tensor; ggml returns null when t has no gradient.
        let p = unsafe { sys::ggml_graph_get_grad(self.raw(), t.raw()) };
        NonNull::new(p).map(|ptr| Tensor { ptr, owner: 0, _ctx: PhantomData })
    }
    /// The gradient accumulator of parameter `t` (where the gradient of a step ends up).
    pub fn grad_acc(&self, t: Tensor<'a>) -> Option<Tensor<'a>> {
        // SAFETY: as in grad.
        let p = unsafe { sys::ggml_graph_get_grad_acc(self.raw(), t.raw()) };
        NonNull::new(p).map(|ptr| Tensor { ptr, owner: 0, _ctx: PhantomData })
    }

    /// Every tensor the graph touches: nodes, their sources and the tensors they view.
    pub(crate) fn members(&self) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut stack: Vec<*mut sys::ggml_tensor> =
            (0..self.n_nodes()).map(|i| self.node(i).raw()).collect();
        while let Some(p) = stack.pop() {
            if p.is_null() || !seen.insert(p as usize) {
                continue;
            }
            // SAFETY: p is a tensor reachable from the graph, alive for 'a.
            let t = unsafe { &*p };
            stack.extend(t.src.iter().copied().filter(|s| !s.is_null()));
            if !t.view_src.is_null() {
                stack.push(t.view_src);
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_sizes() {
        assert_eq!(Type::F32.row_size(10), Some(40));
        assert_eq!(Type::Q4_0.block_size(), 32);
        assert_eq!(Type::Q4_0.row_size(64), Some(36));
        assert_eq!(Type::Q4_K.row_size(100), None);
        assert_eq!(Type::Q8_0.name(), "q8_0");
        assert!(Type::Q4_1.can_dequantize());
        assert!(Type::Q4_1.is_quantized());
    }

    #[test]
    fn tensor_ids_round_trip_and_shapes() {
        let ctx = Context::new(Capacity::tensors(8)).unwrap();
        let t = ctx.new_f32("w", &[4, 3]);
        assert_eq!(t.ne(), [4, 3, 1, 1]);
        let back = ctx.tensor(t.id());
        assert_eq!(back.name(), "w");
        assert!(ctx.get("w").is_some());
        assert!(!t.is_allocated());
    }

    #[test]
    #[should_panic(expected = "mul_mat")]
    fn mul_mat_checks_shapes() {
        let ctx = Context::new(Capacity::tensors(8)).unwrap();
        let a = ctx.new_f32("a", &[4, 3]);
        let b = ctx.new_f32("b", &[5, 2]);
        ctx.mul_mat(a, b);
    }

    #[test]
    #[should_panic(expected = "context full")]
    fn capacity_is_checked() {
        let ctx = Context::new(Capacity::tensors(2)).unwrap();
        for i in 0..64 {
            ctx.new_f32(&format!("t{i}"), &[4]);
        }
    }

    #[test]
    #[should_panic(expected = "not a leaf")]
    fn ids_only_for_leaves() {
        let ctx = Context::new(Capacity::tensors(4)).unwrap();
        let a = ctx.new_f32("a", &[4]);
        ctx.add(a, a).id();
    }

    #[test]
    #[should_panic(expected = "does not own")]
    fn foreign_ids_are_refused() {
        let a = Context::new(Capacity::tensors(2)).unwrap();
        let b = Context::new(Capacity::tensors(2)).unwrap();
        let t = a.new_f32("t", &[4]);
        b.tensor(t.id());
    }
}
