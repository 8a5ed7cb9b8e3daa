//! Compute backends, buffer types and graph execution. The device is chosen here and only here.

use std::collections::HashSet;
use std::ffi::CStr;
use std::fmt;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::context::{as_bytes, from_bytes_f32, tensor_read, tensor_write, Graph, Tensor, Type};
use super::GgmlError;

/// Which device runs the graphs (`--device`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The GPU when this binary was built with a GPU backend and ggml finds a device, else the
    /// CPU (the run says which it uses).
    #[default]
    Auto,
    /// The CPU backend only.
    Cpu,
    /// A GPU; an error when this build or this machine has none (never a silent CPU run).
    Gpu,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Gpu => "gpu",
        })
    }
}

/// A compute device ggml sees (`grit info`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// ggml's device name: `CPU`, `Vulkan0`, `CUDA0`, ...
    pub name: String,
    /// The hardware (e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub description: String,
    /// The backend family (`CPU`, `Vulkan`, `CUDA`, `Metal`, ...).
    pub backend: String,
    /// `cpu`, `gpu` or `accel`.
    pub kind: &'static str,
    pub memory_free: usize,
    pub memory_total: usize,
}

fn device_info(dev: sys::ggml_backend_dev_t) -> DeviceInfo {
    // SAFETY: dev is a registered device (static in ggml's registry); the name, description
    // and registry name are static NUL-terminated strings; memory fills the two out-values.
    unsafe {
        let (mut free, mut total) = (0usize, 0usize);
        sys::ggml_backend_dev_memory(dev, &mut free, &mut total);
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        DeviceInfo {
            name: cstr(sys::ggml_backend_dev_name(dev)),
            description: cstr(sys::ggml_backend_dev_description(dev)),
            backend: if reg.is_null() {
                String::new()
            } else {
                cstr(sys::ggml_backend_reg_name(reg))
            },
            kind: match sys::ggml_backend_dev_type(dev) {
                sys::GGML_BACKEND_DEVICE_TYPE_CPU => "cpu",
                sys::GGML_BACKEND_DEVICE_TYPE_GPU => "gpu",
                _ => "accel",
            },
            memory_free: free,
            memory_total: total,
        }
    }
}

/// Every device ggml has registered (the CPU and, in GPU builds, each GPU it found).
pub fn devices() -> Vec<DeviceInfo> {
    let _ = crate::llama::backend();
    // SAFETY: the registry is initialised by llama.cpp's backend init; indices < count.
    (0..unsafe { sys::ggml_backend_dev_count() })
        .map(|i| device_info(unsafe { sys::ggml_backend_dev_get(i) }))
        .collect()
}

/// The first GPU ggml found, if any.
fn first_gpu() -> Option<sys::ggml_backend_dev_t> {
    let _ = crate::llama::backend();
    // SAFETY: queries ggml's device registry; null when there is no GPU.
    let dev = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_GPU) };
    (!dev.is_null()).then_some(dev)
}

/// The GPU `device` resolves to: `Ok(Some(gpu))` to use one, `Ok(None)` for the CPU, an error
/// when a GPU was asked for and there is none (saying why: not compiled in, or not found).
pub fn resolve_gpu(device: Device) -> Result<Option<DeviceInfo>, GgmlError> {
    Ok(gpu_device(device)?.map(device_info))
}

/// [`resolve_gpu`]'s device handle.
fn gpu_device(device: Device) -> Result<Option<sys::ggml_backend_dev_t>, GgmlError> {
    match device {
        Device::Cpu => Ok(None),
        Device::Auto => Ok(first_gpu()),
        Device::Gpu => first_gpu().map(Some).ok_or_else(|| GgmlError::NoDevice(no_gpu_reason())),
    }
}

fn no_gpu_reason() -> String {
    let compiled: Vec<&str> =
        crate::llama::compiled_backends().into_iter().filter(|b| *b != "cpu").collect();
    if compiled.is_empty() {
        return "--device gpu: this grit was built without a GPU backend (build with --features vulkan, cuda or metal)".into();
    }
    let mut why = format!(
        "--device gpu: this grit has the {} backend but ggml found no GPU device",
        compiled.join("/")
    );
    if compiled.contains(&"vulkan") {
        why.push_str(" (a Vulkan device of type CPU, such as Mesa's lavapipe, is used only with GGML_VK_VISIBLE_DEVICES set, e.g. GGML_VK_VISIBLE_DEVICES=0)");
    }
    why
}

/// How to set up a [`Backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendOptions {
    pub device: Device,
    /// CPU threads; 0 = every available core.
    pub n_threads: usize,
}

/// A ggml buffer type (where tensor data lives). Buffer types are static objects in ggml.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BufferType(NonNull<sys::ggml_backend_buffer_type>);

impl BufferType {
    pub(crate) fn raw(self) -> sys::ggml_backend_buffer_type_t {
        self.0.as_ptr()
    }
    /// Plain host memory of the CPU backend (not the CPU_REPACK type, whose tensors support
    /// only mul_mat).
    pub fn cpu() -> Self {
        // SAFETY: returns a pointer to a static buffer type.
        BufferType(
            NonNull::new(unsafe { sys::ggml_backend_cpu_buffer_type() })
                .expect("no CPU buffer type"),
        )
    }
    /// The CPU backend's buffer types for matmul weights, fastest kernels first, among those
    /// this build and CPU have: "AMX" (Intel AMX int8 tiles; Q4_0/Q4_1/Q8_0 and K-quants) and
    /// "CPU_REPACK" (e.g. Q4_0 in 8×8 interleaved blocks on AVX2/AVX-512). Weights uploaded
    /// into them are rearranged for those kernels, and their tensors support only being
    /// `mul_mat`'s first operand (each type has its own shape rules: check the graph with
    /// [`Backend::unsupported_nodes`]).
    pub fn cpu_matmul() -> Vec<Self> {
        let mut found = Vec::new();
        // SAFETY: the CPU registry and device are static; the proc address, when present, is
        // ggml's `ggml_backend_dev_get_extra_bufts_t`, which returns a NULL-terminated array
        // of static buffer types.
        unsafe {
            let reg = sys::ggml_backend_cpu_reg();
            if reg.is_null() {
                return found;
            }
            let dev = sys::ggml_backend_reg_dev_get(reg, 0);
            let f = sys::ggml_backend_reg_get_proc_address(
                reg,
                c"ggml_backend_dev_get_extra_bufts".as_ptr(),
            );
            if f.is_null() || dev.is_null() {
                return found;
            }
            type ExtraBufts = unsafe extern "C" fn(
                sys::ggml_backend_dev_t,
            )
                -> *mut sys::ggml_backend_buffer_type_t;
            let f: ExtraBufts = std::mem::transmute(f);
            let mut p = f(dev);
            while !p.is_null() && !(*p).is_null() {
                found.push(BufferType(NonNull::new_unchecked(*p)));
                p = p.add(1);
            }
        }
        let rank = |b: &BufferType| match b.name() {
            n if n == "AMX" => 0,
            n if n.contains("REPACK") => 1,
            _ => 2,
        };
        found.retain(|b| rank(b) < 2);
        found.sort_by_key(rank);
        found
    }
    /// Whether this is the AMX buffer type (its kernels want both dimensions of a weight in
    /// multiples of 32).
    pub fn is_amx(self) -> bool {
        self.name() == "AMX"
    }
    pub fn name(self) -> String {
        // SAFETY: static buffer type; the name is a static NUL-terminated string.
        unsafe { cstr(sys::ggml_backend_buft_name(self.raw())) }
    }
}

impl fmt::Debug for BufferType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated per the function's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The compute backend(s) and the scheduler that allocates and runs graphs on them.
///
/// On the CPU there is one backend. With a GPU, the GPU backend comes first and the CPU
/// backend second; ggml's scheduler runs each op on the first backend that supports it
/// (so ops a GPU lacks, e.g. Metal's `out_prod`, fall back to the CPU).
pub struct Backend {
    /// Per-node timing, when profiling.
    recorder: Option<Box<super::profile::Recorder>>,
    /// Primary first; the CPU backend is always last (ggml's scheduler requires it).
    backends: Vec<NonNull<sys::ggml_backend>>,
    is_gpu: bool,
    /// The GPU device, when one is used.
    gpu: Option<DeviceInfo>,
    n_threads: usize,
    sched: Option<NonNull<sys::ggml_backend_sched>>,
    sched_size: usize,
}

// SAFETY: ggml backends and schedulers have no thread affinity (llama.cpp drives them from
// whichever thread decodes); a Computation borrows the Backend, so it cannot move while one
// is in use.
unsafe impl Send for Backend {}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.sched.take() {
            // SAFETY: created by ggml_backend_sched_new, freed once, before its backends.
            unsafe { sys::ggml_backend_sched_free(s.as_ptr()) };
        }
        for b in self.backends.drain(..) {
            // SAFETY: each backend was initialised by this struct and is freed once.
            unsafe { sys::ggml_backend_free(b.as_ptr()) };
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name())
            .field("n_threads", &self.n_threads)
            .finish()
    }
}

impl Backend {
    /// Replaces this backend's contexts and scheduler (and with them its compute buffers)
    /// by fresh ones on the same devices; profiling carries over. Buffers made from its
    /// buffer types (weights, parameters) are not touched: they belong to the device.
    ///
    /// On a GPU, call it before freeing buffers that earlier computations used and then
    /// computing on: the old context goes first, so no live context has ever referred to a
    /// freed buffer (on Mesa's lavapipe, freeing a buffer that a still-used Vulkan context
    /// had bound corrupted the host heap; see docs/ENGINE.md).
    pub fn renew(&mut self) -> Result<(), GgmlError> {
        let device = match &self.gpu {
            Some(_) => Device::Gpu,
            None => Device::Cpu,
        };
        let mut fresh = Backend::new(BackendOptions { device, n_threads: self.n_threads })?;
        fresh.recorder = self.recorder.take();
        // The old contexts and scheduler are freed here, when `fresh` (now holding them) drops.
        std::mem::swap(self, &mut fresh);
        drop(fresh);
        Ok(())
    }

    /// The CPU backend with `n_threads` threads (0 = all cores).
    pub fn cpu(n_threads: usize) -> Result<Self, GgmlError> {
        Self::new(BackendOptions { device: Device::Cpu, n_threads })
    }

    /// Sets up the backend `opts` asks for.
    pub fn new(opts: BackendOptions) -> Result<Self, GgmlError> {
        keep_vulkan_node_order();
        // llama.cpp's backend init registers the compiled-in devices and installs grit's log hook.
        let _ = crate::llama::backend();
        let n_threads = if opts.n_threads > 0 {
            opts.n_threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        };
        let mut backends = Vec::new();
        let dev = gpu_device(opts.device)?;
        let gpu = dev.map(device_info);
        if let (Some(dev), Some(info)) = (dev, &gpu) {
            // SAFETY: dev is a registered device; null params select defaults.
            let b = unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) };
            backends
                .push(NonNull::new(b).ok_or_else(|| GgmlError::BackendInit(info.name.clone()))?);
        }
        let is_gpu = gpu.is_some();
        // SAFETY: creates a CPU backend (null on failure).
        let cpu = NonNull::new(unsafe { sys::ggml_backend_cpu_init() })
            .ok_or_else(|| GgmlError::BackendInit("CPU".into()))?;
        // SAFETY: cpu is a CPU backend, as ggml_backend_cpu_set_n_threads requires.
        unsafe { sys::ggml_backend_cpu_set_n_threads(cpu.as_ptr(), n_threads as i32) };
        backends.push(cpu);
        Ok(Backend { recorder: None, backends, is_gpu, gpu, n_threads, sched: None, sched_size: 0 })
    }

    /// `CPU`, `CUDA0`, ... (the primary backend).
    pub fn name(&self) -> String {
        // SAFETY: live backend; static name string.
        unsafe { cstr(sys::ggml_backend_name(self.backends[0].as_ptr())) }
    }
    pub fn is_gpu(&self) -> bool {
        self.is_gpu
    }
    /// The device for logs: `CPU (2 threads)` or `Vulkan0 (llvmpipe (LLVM 15.0.6, 256 bits))`.
    pub fn label(&self) -> String {
        match &self.gpu {
            Some(d) => format!(
                "{} ({}), CPU fallback with {} threads",
                d.name, d.description, self.n_threads
            ),
            None => format!("CPU ({} threads)", self.n_threads),
        }
    }
    /// The GPU device, when one is used.
    pub fn gpu(&self) -> Option<&DeviceInfo> {
        self.gpu.as_ref()
    }
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }
    /// Changes the CPU thread count.
    pub fn set_n_threads(&mut self, n: usize) {
        self.n_threads = n.max(1);
        let cpu = *self.backends.last().expect("the CPU backend is always present");
        // SAFETY: the last backend is the CPU backend.
        unsafe { sys::ggml_backend_cpu_set_n_threads(cpu.as_ptr(), self.n_threads as i32) };
    }

    /// Where frozen base weights go: plain CPU memory on the CPU (not CPU_REPACK), the
    /// device's default buffer type on a GPU.
    pub fn weight_buffer_type(&self) -> BufferType {
        self.param_buffer_type()
    }
    /// Where trainable parameters and optimizer state go.
    pub fn param_buffer_type(&self) -> BufferType {
        if !self.is_gpu {
            return BufferType::cpu();
        }
        // SAFETY: live backend; returns its static default buffer type.
        let b = unsafe { sys::ggml_backend_get_default_buffer_type(self.backends[0].as_ptr()) };
        BufferType(NonNull::new(b).expect("backend without a buffer type"))
    }

    /// Starts timing every node of every computation, charging it to the category that
    /// `categorize` names (see [`super::profile`]).
    pub fn start_profile(&mut self, categorize: fn(&super::profile::NodeInfo) -> String) {
        self.recorder = Some(Box::new(super::profile::Recorder::new(categorize)));
        if let Some(s) = self.sched {
            self.install_callback(s);
        }
    }
    /// What profiling has recorded so far.
    pub fn profile(&self) -> Option<&super::profile::Profile> {
        self.recorder.as_ref().map(|r| &r.profile)
    }

    fn install_callback(&mut self, s: NonNull<sys::ggml_backend_sched>) {
        let multi = self.backends.len() > 1;
        if let Some(r) = self.recorder.as_mut() {
            if multi {
                r.sched = s.as_ptr();
            }
            let user = (&mut **r) as *mut super::profile::Recorder as *mut std::ffi::c_void;
            // SAFETY: the recorder is boxed (stable address) and owned by self, which also owns
            // the scheduler; the callback only runs inside graph computations of this backend.
            unsafe {
                sys::ggml_backend_sched_set_eval_callback(
                    s.as_ptr(),
                    Some(super::profile::eval_callback),
                    user,
                )
            };
        }
    }

    fn ensure_sched(&mut self, graph_size: usize) -> NonNull<sys::ggml_backend_sched> {
        // The scheduler's hash set must hold every node and leaf: up to 2 × graph size.
        let need = (2 * graph_size).next_power_of_two().max(4096);
        if let Some(s) = self.sched {
            if self.sched_size >= need {
                return s;
            }
            // SAFETY: no Computation borrows the scheduler (we hold &mut self); freed once.
            unsafe { sys::ggml_backend_sched_free(s.as_ptr()) };
            self.sched = None;
        }
        let mut raw: Vec<sys::ggml_backend_t> = self.backends.iter().map(|b| b.as_ptr()).collect();
        // SAFETY: live backends with the CPU last; null bufts = each backend's default buffer
        // type; not parallel; op_offload off (weights already live on the primary device).
        let s = unsafe {
            sys::ggml_backend_sched_new(
                raw.as_mut_ptr(),
                std::ptr::null_mut(),
                raw.len() as i32,
                need,
                false,
                false,
            )
        };
        let s = NonNull::new(s).expect("ggml_backend_sched_new returned null");
        self.install_callback(s);
        self.sched = Some(s);
        self.sched_size = need;
        s
    }

    /// Allocates `graph`'s tensors in the scheduler's compute buffer and returns the
    /// [`Computation`] that sets inputs, runs the graph and reads outputs. The computation
    /// borrows the backend: allocating another graph ends it.
    pub fn compute<'s, 'a>(
        &'s mut self,
        graph: &'s Graph<'a>,
    ) -> Result<Computation<'s, 'a>, GgmlError> {
        if self.is_gpu {
            // grit's custom ops are CPU kernels: on a GPU backend the scheduler would quietly
            // run them on the CPU, with copies to and from the device around each.
            if let Some(node) = cpu_only_nodes(graph).first() {
                return Err(GgmlError::CpuOnlyOp { node: node.clone(), backend: self.name() });
            }
            // GPU matmul kernels accumulate in F16 unless a node asks for F32; training
            // gradients (and the parity with the CPU) need F32 accumulation.
            for i in 0..graph.n_nodes() {
                let n = graph.node(i);
                if n.op() == sys::GGML_OP_MUL_MAT {
                    // SAFETY: a live MUL_MAT node of a graph not yet allocated by this call;
                    // sets its precision parameter only.
                    unsafe { sys::ggml_mul_mat_set_prec(n.raw(), sys::GGML_PREC_F32) };
                }
            }
        }
        if let Some((op, node)) = self.unsupported_nodes(graph).into_iter().next() {
            return Err(GgmlError::Unsupported { node, op, backend: self.name() });
        }
        let sched = self.ensure_sched(graph.size());
        // The previous allocation may have redirected sources to the scheduler's copies.
        graph.restore_sources();
        let members = graph.members();
        // SAFETY: live scheduler (exclusively borrowed via &mut self) and a live graph whose
        // tensors all outlive 'a; reset drops the previous allocation, which no Computation
        // can still use (it would hold &mut self).
        let ok = unsafe {
            sys::ggml_backend_sched_reset(sched.as_ptr());
            sys::ggml_backend_sched_alloc_graph(sched.as_ptr(), graph.raw())
        };
        if !ok {
            forget_compute_allocation(&members);
            let bytes = self
                .backends
                .iter()
                // SAFETY: live scheduler and backends.
                .map(|b| unsafe {
                    sys::ggml_backend_sched_get_buffer_size(sched.as_ptr(), b.as_ptr())
                })
                .sum();
            return Err(GgmlError::Alloc {
                what: format!("a graph of {} nodes", graph.n_nodes()),
                buffer_type: self.name(),
                bytes,
            });
        }
        let recorder = self
            .recorder
            .as_mut()
            .map_or(std::ptr::null_mut(), |r| (&mut **r) as *mut super::profile::Recorder);
        Ok(Computation {
            sched,
            backend_name: self.name(),
            graph,
            members,
            recorder,
            _backend: std::marker::PhantomData,
        })
    }

    /// The nodes of `graph` that the GPU backend cannot run (`ggml_backend_supports_op`),
    /// as (op name, node name): ggml's scheduler runs them on the CPU, with copies of their
    /// inputs and outputs between the devices. Empty on the CPU backend.
    pub fn cpu_fallback_nodes(&self, graph: &Graph<'_>) -> Vec<(String, String)> {
        if !self.is_gpu {
            return Vec::new();
        }
        let gpu = self.backends[0];
        (0..graph.n_nodes())
            .map(|i| graph.node(i))
            // SAFETY: live backend and a live node of a live graph; the query reads the
            // node's op, types, shapes and strides only.
            .filter(|t| !unsafe { sys::ggml_backend_supports_op(gpu.as_ptr(), t.raw()) })
            .map(|t| (super::profile::op_name(t.op()), t.name()))
            .collect()
    }

    /// The matmul nodes of `graph` that no backend of this one can run, as (op name, node
    /// name): products whose weight sits in a rearranged CPU buffer ([`BufferType::cpu_matmul`])
    /// with a shape or operand its kernel does not take. ggml's scheduler would abort on them.
    pub fn unsupported_nodes(&self, graph: &Graph<'_>) -> Vec<(String, String)> {
        (0..graph.n_nodes())
            .map(|i| graph.node(i))
            .filter(|t| t.op() == sys::GGML_OP_MUL_MAT)
            // SAFETY: live backends and a live node of a live graph; the query reads the
            // node's op, types, shapes, strides and its sources' buffers only.
            .filter(|t| {
                !self
                    .backends
                    .iter()
                    .any(|b| unsafe { sys::ggml_backend_supports_op(b.as_ptr(), t.raw()) })
            })
            .map(|t| (super::profile::op_name(t.op()), t.name()))
            .collect()
    }

    /// Bytes of the compute buffer the scheduler holds on the primary backend (the GPU's
    /// share on a GPU; everything on the CPU).
    pub fn primary_compute_buffer_bytes(&self) -> usize {
        let Some(s) = self.sched else { return 0 };
        // SAFETY: live scheduler and backend.
        unsafe { sys::ggml_backend_sched_get_buffer_size(s.as_ptr(), self.backends[0].as_ptr()) }
    }

    /// Bytes of the compute buffers the scheduler holds (all backends).
    pub fn compute_buffer_bytes(&self) -> usize {
        let Some(s) = self.sched else { return 0 };
        self.backends
            .iter()
            // SAFETY: live scheduler and backends.
            .map(|b| unsafe { sys::ggml_backend_sched_get_buffer_size(s.as_ptr(), b.as_ptr()) })
            .sum()
    }
}

/// Turns off ggml-vulkan's node reordering (`graph_optimize`) for this process, unless the
/// user set `GGML_VK_DISABLE_GRAPH_OPTIMIZE` themselves. The reordering looks for independent
/// nodes within a 20-node window by their source and view links only; grit's step graphs
/// (rewritten backward, in-place accumulators) do not survive it: the default model's first
/// training step gave loss −142 and NaN gradients on lavapipe with it, the CPU's loss (4.63
/// vs 4.63) without. The variable is read when ggml-vulkan first opens a device, so this runs
/// before any backend exists, once.
fn keep_vulkan_node_order() {
    #[cfg(feature = "vulkan")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if std::env::var_os("GGML_VK_DISABLE_GRAPH_OPTIMIZE").is_none() {
                std::env::set_var("GGML_VK_DISABLE_GRAPH_OPTIMIZE", "1");
            }
        });
    }
}

/// Names of the nodes of `graph` that only the CPU backend can run (grit's custom CPU
/// kernels: fused attention, tiled transposes).
pub fn cpu_only_nodes(graph: &Graph<'_>) -> Vec<String> {
    (0..graph.n_nodes())
        .map(|i| graph.node(i))
        .filter(|t| {
            matches!(
                t.op(),
                sys::GGML_OP_CUSTOM
                    | sys::GGML_OP_MAP_CUSTOM1
                    | sys::GGML_OP_MAP_CUSTOM2
                    | sys::GGML_OP_MAP_CUSTOM3
            )
        })
        .map(|t| t.name())
        .collect()
}

/// An allocated graph: write inputs, [`run`](Computation::run), read outputs. Every tensor
/// passed in must belong to the graph (checked), so its data is live.
pub struct Computation<'s, 'a> {
    sched: NonNull<sys::ggml_backend_sched>,
    backend_name: String,
    graph: &'s Graph<'a>,
    members: HashSet<usize>,
    /// The backend's profiler, restarted at each run (null when not profiling).
    recorder: *mut super::profile::Recorder,
    _backend: std::marker::PhantomData<&'s mut Backend>,
}

/// Clears `data` and `buffer` of every tensor in `members` that lies in a compute buffer
/// (the scheduler's allocation), leaving persistent tensors (weights, parameters, copies,
/// optimizer state) as they are.
///
/// ggml-alloc takes a tensor whose `data` is set for one allocated elsewhere and keeps its
/// address. A graph allocated again after another graph made the scheduler grow (free and
/// replace) its buffer would then compute in freed memory: on lavapipe, whose device memory
/// is host heap, GRIT's and LoRA's runs with an in-training eval died of heap corruption
/// ("double free or corruption"). Forgotten, each allocation lays the graph out afresh in
/// the live buffer.
fn forget_compute_allocation(members: &HashSet<usize>) {
    for &p in members {
        let t = p as *mut sys::ggml_tensor;
        // SAFETY: members are live tensors of a graph whose allocation is still current (the
        // scheduler has not been reset or reallocated since: this runs when the computation
        // ends or its allocation failed), so a non-null `buffer` is a live buffer; only the
        // two allocation fields of compute-buffer tensors are cleared.
        unsafe {
            let buf = (*t).buffer;
            if !buf.is_null()
                && sys::ggml_backend_buffer_get_usage(buf) == sys::GGML_BACKEND_BUFFER_USAGE_COMPUTE
            {
                (*t).data = std::ptr::null_mut();
                (*t).buffer = std::ptr::null_mut();
            }
        }
    }
}

impl Drop for Computation<'_, '_> {
    fn drop(&mut self) {
        forget_compute_allocation(&self.members);
    }
}

impl<'s, 'a> Computation<'s, 'a> {
    /// Whether `t` belongs to the computed graph (a node, or a tensor a node reads).
    pub fn contains(&self, t: Tensor<'a>) -> bool {
        self.members.contains(&(t.raw() as usize))
    }

    fn check(&self, t: Tensor<'a>) -> Result<(), GgmlError> {
        if !self.members.contains(&(t.raw() as usize)) {
            return Err(GgmlError::Foreign(t.name()));
        }
        Ok(())
    }

    /// Writes raw bytes into the whole of `t` (an input, a parameter, ...).
    pub fn write_bytes(&mut self, t: Tensor<'a>, data: &[u8]) -> Result<(), GgmlError> {
        self.check(t)?;
        // SAFETY: t belongs to the graph: its data lies in the scheduler's live allocation
        // (borrowed for 's) or in a persistent buffer owned by a context that outlives 'a.
        unsafe { tensor_write(t, data) }
    }
    pub fn write_f32(&mut self, t: Tensor<'a>, data: &[f32]) -> Result<(), GgmlError> {
        t.expect_type(Type::F32)?;
        self.write_bytes(t, as_bytes(data))
    }
    pub fn write_i32(&mut self, t: Tensor<'a>, data: &[i32]) -> Result<(), GgmlError> {
        t.expect_type(Type::I32)?;
        self.write_bytes(t, as_bytes(data))
    }
    /// Reads the whole of `t` as raw bytes. Mark outputs with [`Tensor::set_output`] before
    /// allocation, or their memory may have been reused by later nodes.
    pub fn read_bytes(&self, t: Tensor<'a>) -> Result<Vec<u8>, GgmlError> {
        self.check(t)?;
        // SAFETY: as in write_bytes.
        unsafe { tensor_read(t) }
    }
    pub fn read_f32(&self, t: Tensor<'a>) -> Result<Vec<f32>, GgmlError> {
        t.expect_type(Type::F32)?;
        Ok(from_bytes_f32(&self.read_bytes(t)?))
    }

    /// Runs the graph (again). Inputs marked with [`Tensor::set_input`] and persistent
    /// tensors keep their values between runs; other nodes are recomputed.
    pub fn run(&mut self) -> Result<(), GgmlError> {
        // SAFETY: the recorder (if any) is owned by the backend this computation borrows.
        if let Some(r) = unsafe { self.recorder.as_mut() } {
            r.restart();
        }
        // SAFETY: the scheduler holds this graph's allocation (made in Backend::compute and
        // not reset since: the backend is mutably borrowed for 's).
        let status =
            unsafe { sys::ggml_backend_sched_graph_compute(self.sched.as_ptr(), self.graph.raw()) };
        // SAFETY: as above; the recorder is owned by the borrowed backend.
        if let Some(r) = unsafe { self.recorder.as_mut() } {
            r.profile.runs += 1;
            // SAFETY: live scheduler that just computed this graph.
            unsafe {
                r.profile.splits +=
                    sys::ggml_backend_sched_get_n_splits(self.sched.as_ptr()).max(0) as usize;
            }
        }
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(GgmlError::Compute(status));
        }
        Ok(())
    }

    /// Zeroes the gradient accumulators and sets the loss gradient to 1 (ggml_graph_reset),
    /// for graphs with a backward pass.
    pub fn reset_grads(&mut self) {
        // SAFETY: allocated graph with gradients (ggml asserts the grads exist).
        unsafe { sys::ggml_graph_reset(self.graph.raw()) }
    }

    /// The backend the graph runs on.
    pub fn backend_name(&self) -> &str {
        &self.backend_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{Capacity, Context};

    /// A graph computed again after a larger one made the scheduler replace its buffer is laid
    /// out in the new buffer: between computations its nodes hold no compute-buffer address
    /// (ggml-alloc would keep a stale one), while persistent tensors keep theirs.
    #[test]
    fn graphs_forget_their_allocation_between_computations() {
        let mut backend = Backend::cpu(2).unwrap();
        let persistent = Context::new(Capacity::tensors(1)).unwrap();
        let w = persistent.new_f32("w", &[16]);
        persistent.allocate(backend.param_buffer_type()).unwrap();
        persistent.write_f32(w, &[0.5; 16]).unwrap();

        let small = Context::new(Capacity::graph(8, 16, false)).unwrap();
        let x = small.new_f32("x", &[16]).set_input();
        let y = small.scale(small.add(x, w), 2.0).set_output();
        let mut g1 = small.new_graph(16, false);
        g1.build_forward_expand(y);

        let large = Context::new(Capacity::graph(8, 16, false)).unwrap();
        let z = large.new_f32("z", &[1 << 22]).set_input();
        let z2 = large.scale(z, 3.0).set_output();
        let mut g2 = large.new_graph(16, false);
        g2.build_forward_expand(z2);

        let x_data: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let expect: Vec<f32> = x_data.iter().map(|v| 2.0 * (v + 0.5)).collect();
        for round in 0..2 {
            {
                let mut run = backend.compute(&g1).unwrap();
                run.write_f32(x, &x_data).unwrap();
                run.run().unwrap();
                assert_eq!(run.read_f32(y).unwrap(), expect, "round {round}");
            }
            assert!(
                !x.is_allocated() && !y.is_allocated(),
                "round {round}: the small graph kept its compute-buffer addresses"
            );
            assert!(w.is_allocated(), "the persistent tensor lost its data");
            {
                let mut run = backend.compute(&g2).unwrap();
                run.write_f32(z, &vec![1.0; 1 << 22]).unwrap();
                run.run().unwrap();
                assert_eq!(run.read_f32(z2).unwrap()[12345], 3.0);
            }
            assert!(!z.is_allocated() && !z2.is_allocated());
        }
    }

    /// A renewed backend computes the same graph again (its compute buffer made anew),
    /// with the parameters made from the old one's buffer type still in place, and its
    /// profile goes on counting.
    #[test]
    fn a_renewed_backend_computes_again_and_keeps_its_profile() {
        let mut backend = Backend::cpu(1).unwrap();
        backend.start_profile(|n| n.op.clone());
        let persistent = Context::new(Capacity::tensors(1)).unwrap();
        let w = persistent.new_f32("w", &[4]);
        persistent.allocate(backend.param_buffer_type()).unwrap();
        persistent.write_f32(w, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let ctx = Context::new(Capacity::graph(8, 16, false)).unwrap();
        let x = ctx.new_f32("x", &[4]).set_input();
        let y = ctx.mul(x, w).set_output();
        let mut g = ctx.new_graph(16, false);
        g.build_forward_expand(y);
        let mut nodes = Vec::new();
        for round in 0..2 {
            {
                let mut run = backend.compute(&g).unwrap();
                run.write_f32(x, &[2.0; 4]).unwrap();
                run.run().unwrap();
                assert_eq!(run.read_f32(y).unwrap(), vec![2.0, 4.0, 6.0, 8.0], "round {round}");
            }
            nodes.push(backend.profile().unwrap().by_category.values().map(|c| c.1).sum::<usize>());
            backend.renew().unwrap();
            assert_eq!(
                backend.compute_buffer_bytes(),
                0,
                "a renewed backend starts without a compute buffer"
            );
        }
        assert!(
            nodes[0] > 0 && nodes[1] == 2 * nodes[0],
            "nodes timed after each round: {nodes:?}"
        );
    }
}
