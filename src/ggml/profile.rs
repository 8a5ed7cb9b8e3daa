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
}

/// The state the callback sees.
pub(crate) struct Recorder {
    last: Instant,
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
        Recorder { last: Instant::now(), profile: Profile::default(), categorize }
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
pub(crate) unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
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
    let cat = (rec.categorize)(&info);
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
            out.push_str(&format!("{k:<34} {s:>10.3} {:>6.1}% {n:>7}\n", 100.0 * s / self.total_s.max(1e-12)));
        }
        out.push_str(&format!("{:<34} {:>10.3}\n", "total", self.total_s));
        out
    }
}
