//! Activation recomputation ("gradient checkpointing") by graph surgery.
//!
//! ggml's backward reads the forward's intermediate results (softmax outputs, SwiGLU inputs,
//! norm inputs, LoRA inputs), so every layer's activations stay allocated from the forward to
//! their use in the backward: on the default model at 256 tokens that is most of the step's
//! compute buffer. With recomputation only the *boundaries* of the forward segments (the
//! residual stream between transformer blocks) are kept; a backward node that reads an
//! intermediate of segment k reads a duplicate instead, computed from the segment's kept input
//! right before the node that first needs it. The original intermediates then have only
//! forward consumers and are freed during the forward pass.
//!
//! The duplicates are the same ops on the same inputs, so gradients do not change (bit for
//! bit on the CPU backend); the cost is one more forward of each segment.

use std::collections::{HashMap, HashSet};

use llama_cpp_sys_2 as sys;

use crate::ggml::context::{Context, Tensor};

/// ggml's GGML_MAX_SRC (source slots per tensor; a macro, not in the bindings), read off the
/// bound struct so that it follows the pinned ggml.
// SAFETY: ggml_tensor is plain C data (integers, arrays, raw pointers); all-zero is a valid
// value of it, and only the length of its `src` array is read.
const MAX_SRC: usize = unsafe { std::mem::zeroed::<sys::ggml_tensor>() }.src.len();

/// The forward nodes of each segment between consecutive `boundaries` (the first boundary is
/// the first segment's input, the last one the last segment's output), and their duplicates
/// once made.
pub struct Segments<'a> {
    /// Node → segment index, for the nodes strictly inside a segment (boundaries excluded).
    member: HashMap<usize, usize>,
    boundaries: HashSet<usize>,
    dups: HashMap<usize, Tensor<'a>>,
}

impl<'a> Segments<'a> {
    /// Assigns every node that `boundaries[k]` depends on, back to `boundaries[k - 1]`, to
    /// segment k. Leafs (inputs, weights, parameters) belong to no segment.
    pub fn new(boundaries: &[Tensor<'a>]) -> Self {
        let bset: HashSet<usize> = boundaries.iter().map(|t| t.raw() as usize).collect();
        let mut member = HashMap::new();
        for (k, b) in boundaries.iter().enumerate().skip(1) {
            let mut stack: Vec<Tensor<'a>> = sources(*b).collect();
            while let Some(t) = stack.pop() {
                let key = t.raw() as usize;
                if t.op() == sys::GGML_OP_NONE || bset.contains(&key) || member.contains_key(&key) {
                    continue;
                }
                member.insert(key, k);
                stack.extend(sources(t));
            }
        }
        Segments { member, boundaries: bset, dups: HashMap::new() }
    }

    /// Nodes inside segments.
    pub fn n_members(&self) -> usize {
        self.member.len()
    }

    /// Duplicates made so far.
    pub fn n_dups(&self) -> usize {
        self.dups.len()
    }

    /// True for forward nodes that keep reading the originals (segment members and boundaries).
    pub fn is_forward(&self, t: Tensor<'a>) -> bool {
        let key = t.raw() as usize;
        self.member.contains_key(&key) || self.boundaries.contains(&key)
    }

    /// Points every source (and the view source) of `node` that lies inside a segment at its
    /// duplicate, making the duplicates (recursively) on first use.
    ///
    /// # Safety
    /// No allocated computation may hold a graph containing `node`.
    pub unsafe fn redirect(&mut self, ctx: &'a Context, node: Tensor<'a>) {
        let raw = node.raw();
        for i in 0..MAX_SRC {
            // SAFETY: live tensor; plain pointer fields.
            let s = unsafe { (*raw).src[i] };
            if s.is_null() {
                continue;
            }
            let d = self.dup(ctx, node.with_ptr(s));
            // SAFETY: as above; the duplicate has the source's type, shape and strides.
            unsafe { (*raw).src[i] = d.raw() };
        }
        // SAFETY: as above.
        let v = unsafe { (*raw).view_src };
        if !v.is_null() {
            let d = self.dup(ctx, node.with_ptr(v));
            // SAFETY: as above: a view of the duplicate at the same offset.
            unsafe { (*raw).view_src = d.raw() };
        }
    }

    /// The duplicate of `t` if it lies inside a segment, else `t`.
    fn dup(&mut self, ctx: &'a Context, t: Tensor<'a>) -> Tensor<'a> {
        let key = t.raw() as usize;
        if !self.member.contains_key(&key) {
            return t;
        }
        if let Some(&d) = self.dups.get(&key) {
            return d;
        }
        let srcs: Vec<Option<Tensor<'a>>> =
            (0..MAX_SRC).map(|i| t.src(i).map(|s| self.dup(ctx, s))).collect();
        let view = t.view_source().map(|v| self.dup(ctx, v));
        ctx.room(1);
        let ne = t.ne();
        // SAFETY: valid context with room for one tensor (checked); ne has GGML_MAX_DIMS = 4
        // entries. The new tensor is then given t's op, parameters, strides and sources (the
        // sources' duplicates, which have the same types and shapes), so it computes the same
        // values; it has no data (no-alloc context): the allocator places it, views through
        // `view_src` as for any view.
        let d = unsafe {
            let p = sys::ggml_new_tensor(ctx.raw(), (*t.raw()).type_, 4, ne.as_ptr());
            let (src, dst) = (&*t.raw(), &mut *p);
            dst.nb = src.nb;
            dst.op = src.op;
            dst.op_params = src.op_params;
            dst.flags = 0;
            for (i, s) in srcs.iter().enumerate() {
                dst.src[i] = s.map_or(std::ptr::null_mut(), |s| s.raw());
            }
            dst.view_src = view.map_or(std::ptr::null_mut(), |v| v.raw());
            dst.view_offs = src.view_offs;
            p
        };
        let d = ctx.wrap(d);
        let name: String = t.name().chars().take(40).collect();
        d.set_name(&format!("{name} (re)"));
        self.dups.insert(key, d);
        d
    }
}

/// The sources and the view source of `t`.
fn sources<'a>(t: Tensor<'a>) -> impl Iterator<Item = Tensor<'a>> {
    (0..MAX_SRC).filter_map(move |i| t.src(i)).chain(t.view_source())
}
