//! Per-node timing of graph computations (`grit train --profile`): ggml's scheduler calls back
//! after every node, so nodes run one at a time and the time between callbacks is that node's.
//! The serialisation adds a little overhead per node; use it to see where time goes, not to
//! measure speed.

use std::collections::BTreeMap;
use std::ffi::{c_void, CStr};
use std::time::Instant;

use llama_cpp_sys_2 as sys;

/// Time spent per category, accumulated over computations.
#[derive(Debug, Default, Clone)]
pub struct Profile {
    pub by_category: BTreeMap<String, (f64, usize)>,
    pub total_s: f64,
    /// With a GPU: seconds and node count per (backend, op) — which ops ran where.
    pub by_backend_op: BTreeMap<(String, String), (f64, usize)>,
    /// Graph computations, and the scheduler's splits (runs of consecutive nodes on one
    /// backend; each split starts by copying its inputs from other devices) summed over them.
    pub runs: usize,
    pub splits: usize,
}

/// The state the callback sees.
pub(crate) struct Recorder {
    last: Instant,
    /// The scheduler running the graph (set when the backend has more than one device).
    pub(crate) sched: sys::ggml_backend_sched_t,
    pub(crate) profile: Profile,
    categorize: fn(&NodeInfo) -> String,
}

/// What the categorizer knows about a node.
#[derive(Debug)]
pub struct NodeInfo {
    pub op: String,
    pub name: String,
    pub src0_name: String,
    pub src1_name: String,
    pub ne: [i64; 4],
}

impl Recorder {
    pub(crate) fn new(categorize: fn(&NodeInfo) -> String) -> Self {
        Recorder {
            last: Instant::now(),
            sched: std::ptr::null_mut(),
            profile: Profile::default(),
            categorize,
        }
    }
    pub(crate) fn restart(&mut self) {
        self.last = Instant::now();
    }
}

fn name_of(t: *const sys::ggml_tensor) -> String {
    if t.is_null() {
        return String::new();
    }
    // SAFETY: a live tensor of the graph being computed; name is NUL-terminated.
    unsafe { CStr::from_ptr((*t).name.as_ptr()) }.to_string_lossy().into_owned()
}

/// The scheduler's evaluation callback: observe every node; on observation, charge the time
/// since the previous one to the node's category.
pub(crate) unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    if ask {
        return true;
    }
    if t.is_null() || user.is_null() {
        return true;
    }
    // SAFETY: user points to the Recorder installed with this callback, alive while the
    // computation runs (the Backend owns it); t is the node just computed.
    let rec = unsafe { &mut *(user as *mut Recorder) };
    let dt = rec.last.elapsed().as_secs_f64();
    // SAFETY: t is live; its op name is a static string; src pointers are live or null.
    let info = unsafe {
        NodeInfo {
            op: CStr::from_ptr(sys::ggml_op_desc(t)).to_string_lossy().into_owned(),
            name: name_of(t),
            src0_name: name_of((*t).src[0]),
            src1_name: name_of((*t).src[1]),
            ne: (*t).ne,
        }
    };
    let mut cat = (rec.categorize)(&info);
    if std::env::var_os("GRIT_PROFILE_DETAIL").is_some() {
        // SAFETY: as above.
        let d = |s: *const sys::ggml_tensor| unsafe {
            if s.is_null() {
                String::new()
            } else {
                format!(
                    "{:?}{}{}",
                    (&(*s).ne)[..3].to_vec(),
                    if sys::ggml_is_contiguous(s) { "" } else { "nc" },
                    (*s).type_ as i32
                )
            }
        };
        cat = unsafe {
            format!(
                "{} {} {:?} <- {} {}",
                cat,
                info.op,
                &info.ne[..3],
                d((*t).src[0]),
                d((*t).src[1])
            )
        };
    }
    if !rec.sched.is_null() {
        // SAFETY: the scheduler computing this graph (owned by the backend that owns the
        // recorder); t is one of its nodes; backend names are static strings.
        let be = unsafe {
            let b = sys::ggml_backend_sched_get_tensor_backend(rec.sched, t);
            if b.is_null() {
                "?".to_string()
            } else {
                CStr::from_ptr(sys::ggml_backend_name(b)).to_string_lossy().into_owned()
            }
        };
        let e = rec.profile.by_backend_op.entry((be.clone(), info.op.clone())).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
        if be == "CPU" {
            cat = format!("{cat} [CPU fallback]");
        }
    }
    let e = rec.profile.by_category.entry(cat).or_insert((0.0, 0));
    e.0 += dt;
    e.1 += 1;
    rec.profile.total_s += dt;
    rec.last = Instant::now();
    true
}

impl Profile {
    /// A table of categories by time, with shares.
    pub fn table(&self) -> String {
        let mut rows: Vec<_> = self.by_category.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let mut out = format!("{:<34} {:>10} {:>7} {:>7}\n", "part", "seconds", "share", "nodes");
        for (k, (s, n)) in rows {
            out.push_str(&format!(
                "{k:<34} {s:>10.3} {:>6.1}% {n:>7}\n",
                100.0 * s / self.total_s.max(1e-12)
            ));
        }
        out.push_str(&format!("{:<34} {:>10.3}\n", "total", self.total_s));
        if !self.by_backend_op.is_empty() {
            out.push_str("\nops by device (seconds, nodes; the time of a split's first node includes copying its inputs between devices):\n");
            let mut rows: Vec<_> = self.by_backend_op.iter().collect();
            rows.sort_by(|a, b| a.0 .0.cmp(&b.0 .0).then(b.1 .0.total_cmp(&a.1 .0)));
            for ((be, op), (s, n)) in rows {
                out.push_str(&format!("  {be:<10} {op:<24} {s:>10.3} {n:>7}\n"));
            }
            let r = self.runs.max(1) as f64;
            out.push_str(&format!(
                "scheduler: {:.1} splits (device switches) per graph run ({} runs)\n",
                self.splits as f64 / r,
                self.runs
            ));
        }
        out
    }
}

/// The largest set of intermediate tensors alive at once while a graph runs, as ggml's
/// allocator sees it (approximately: a node's memory is taken when it runs and given back
/// after its last consumer; views use their source's memory; inputs, outputs and tensors
/// with data of their own are not counted). For `grit train --profile`: where the compute
/// buffer goes.
#[derive(Debug, Clone, Default)]
pub struct PeakMemory {
    pub bytes: usize,
    /// Index of the node at which the peak occurs.
    pub at_node: usize,
    /// The live tensors at the peak: (name, op, bytes), largest first.
    pub live: Vec<(String, String, usize)>,
    /// Inputs and outputs (alive all along).
    pub pinned_bytes: usize,
}

fn view_root<'a>(t: super::Tensor<'a>) -> super::Tensor<'a> {
    let mut r = t;
    while let Some(v) = r.view_source() {
        r = v;
    }
    r
}

pub fn peak_memory<'a>(graph: &super::Graph<'a>) -> PeakMemory {
    use std::collections::{HashMap, HashSet};
    let n = graph.n_nodes();
    let root = view_root;
    let pinned = |t: super::Tensor<'a>| {
        (t.op() == sys::GGML_OP_NONE)
            || (t.flags() & (sys::GGML_TENSOR_FLAG_INPUT | sys::GGML_TENSOR_FLAG_OUTPUT) as i32)
                != 0
    };
    // Remaining consumers of each (root) tensor.
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for i in 0..n {
        let node = graph.node(i);
        let mut seen = HashSet::new();
        for k in 0..10 {
            if let Some(s) = node.src(k) {
                let r = root(s);
                if r.raw() != root(node).raw() && seen.insert(r.raw() as usize) {
                    *uses.entry(r.raw() as usize).or_default() += 1;
                }
            }
        }
    }
    let mut live: HashMap<usize, super::Tensor<'a>> = HashMap::new();
    let (mut cur, mut best) = (0usize, PeakMemory::default());
    let mut pinned_set = HashSet::new();
    for i in 0..n {
        let node = graph.node(i);
        let r = root(node);
        if pinned(r) {
            if pinned_set.insert(r.raw() as usize) && r.op() != sys::GGML_OP_NONE {
                best.pinned_bytes += r.n_bytes();
            }
        } else if let std::collections::hash_map::Entry::Vacant(e) = live.entry(r.raw() as usize) {
            e.insert(r);
            cur += r.n_bytes();
        }
        if cur > best.bytes {
            best.bytes = cur;
            best.at_node = i;
            let mut v: Vec<_> =
                live.values().map(|t| (t.name(), op_name(t.op()), t.n_bytes())).collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.2));
            best.live = v;
        }
        let mut seen = HashSet::new();
        for k in 0..10 {
            if let Some(s) = node.src(k) {
                let sr = root(s);
                if sr.raw() == r.raw() || !seen.insert(sr.raw() as usize) {
                    continue;
                }
                if let Some(u) = uses.get_mut(&(sr.raw() as usize)) {
                    *u -= 1;
                    if *u == 0 {
                        if let Some(t) = live.remove(&(sr.raw() as usize)) {
                            cur -= t.n_bytes();
                        }
                    }
                }
            }
        }
    }
    best
}

pub(crate) fn op_name(op: u32) -> String {
    // SAFETY: ggml_op_name returns a static NUL-terminated string for any op value.
    unsafe { CStr::from_ptr(sys::ggml_op_name(op)) }.to_string_lossy().into_owned()
}
