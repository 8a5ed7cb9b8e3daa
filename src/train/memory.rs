//! Memory and placement checks of a training run: resident and available memory, whether
//! the run fits (host and GPU), which step-graph nodes a GPU backend leaves to the CPU, and
//! `--profile`'s peak of live tensors.

use crate::ggml::Backend;
use crate::model::{LoraSet, Weights};

use super::config::WeightCopies;
use super::copies::FrozenCopies;
use super::engine::OptState;
use super::run::TrainError;

/// Peak resident memory of this process (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}
/// Current resident memory (VmRSS), bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}
fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
/// MemAvailable from /proc/meminfo, bytes (None where unknown).
pub fn mem_available_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| k * 1024)
}

/// What a run holds while it trains: base weights, weight copies, adapters with optimizer
/// state, and compute buffers.
pub(super) struct Footprint {
    pub weights: usize,
    pub copies: usize,
    /// The copies are made inside the backward (`--weight-copies none`): what stays resident
    /// is small (the Q4_1 split's offsets), so `none` is no hint.
    pub transient: bool,
    /// Adapters (f32) and their optimizer state.
    pub adapters: usize,
    pub compute: usize,
}

impl Footprint {
    pub(super) fn of(
        weights: &Weights,
        copies: &FrozenCopies,
        lora: &LoraSet,
        opt: &OptState,
        compute: usize,
    ) -> Self {
        let adapters = 4 * lora.n_params() + opt.bytes();
        Footprint {
            weights: weights.bytes(),
            copies: copies.bytes(),
            transient: copies.mode() == WeightCopies::None,
            adapters,
            compute,
        }
    }

    fn total(&self) -> u64 {
        (self.weights + self.copies + self.adapters + self.compute) as u64
    }
}

/// Refuses to start when the run would not fit in available memory.
pub(super) fn check_memory(f: &Footprint) -> Result<(), TrainError> {
    let need = f.total();
    let Some(avail) = mem_available_bytes() else {
        return Ok(());
    };
    // What is already resident counts as available to us.
    let avail = avail + rss_bytes();
    if need > avail {
        let hint = if f.copies > 0 && !f.transient {
            "lower --max-seq-len or --batch-size, or use --weight-copies none".to_string()
        } else {
            "lower --max-seq-len or --batch-size".to_string()
        };
        return Err(TrainError::Memory { need_mib: need >> 20, avail_mib: avail >> 20, hint });
    }
    Ok(())
}

/// Says which ops of `graph` the GPU backend lacks (ggml's scheduler runs them on the CPU,
/// with copies between the devices around each), or that every node runs on the GPU.
pub(super) fn log_cpu_fallback(backend: &Backend, graph: &crate::ggml::Graph<'_>) {
    let nodes = backend.cpu_fallback_nodes(graph);
    if nodes.is_empty() {
        eprintln!("grit: every node of the step graph runs on {}", backend.name());
        return;
    }
    let mut by_op: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (op, _) in &nodes {
        *by_op.entry(op).or_default() += 1;
    }
    let ops: Vec<String> = by_op.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
    eprintln!(
        "grit: {} step-graph nodes run on the CPU ({} lacks them): {}",
        nodes.len(),
        backend.name(),
        ops.join(", ")
    );
}

/// Refuses to start when the run would not fit in the GPU's memory (as free when grit
/// started): base weights, weight copies, adapters with optimizer state, the GPU's share of
/// the step's compute buffer and the evaluation's compute buffer all live there.
pub(super) fn check_device_memory(
    gpu: &crate::ggml::DeviceInfo,
    f: &Footprint,
) -> Result<(), TrainError> {
    let need = f.total();
    let avail = gpu.memory_free as u64;
    eprintln!(
        "grit: device memory: {} MiB needed of {} MiB free on {}",
        need >> 20,
        avail >> 20,
        gpu.name
    );
    if avail > 0 && need > avail {
        let mut hint = String::from("lower --max-seq-len or --batch-size");
        if f.copies > 0 && !f.transient {
            hint.push_str(", use --weight-copies none (dequantized per layer in the backward)");
        }
        hint.push_str(&format!(
            ", or train with --device cpu (weights {} MiB, copies {} MiB, step and eval compute buffers {} MiB)",
            f.weights >> 20,
            f.copies >> 20,
            f.compute >> 20
        ));
        return Err(TrainError::DeviceMemory {
            device: gpu.name.clone(),
            need_mib: need >> 20,
            avail_mib: avail >> 20,
            hint,
        });
    }
    Ok(())
}

/// `--profile`: the peak of live intermediate tensors of `graph`, by op and the largest ones.
pub(super) fn print_live_tensor_peak(graph: &crate::ggml::Graph<'_>) {
    let p = crate::ggml::profile::peak_memory(graph);
    eprintln!(
        "grit: profile: peak of live intermediate tensors {} MiB at node {} of {} (inputs/outputs {} MiB); largest:",
        p.bytes >> 20,
        p.at_node,
        graph.n_nodes(),
        p.pinned_bytes >> 20
    );
    let mut by_op: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (_, op, b) in &p.live {
        let e = by_op.entry(op.clone()).or_default();
        e.0 += b;
        e.1 += 1;
    }
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by_key(|e| std::cmp::Reverse(e.1 .0));
    for (op, (b, k)) in ops.iter().take(12) {
        eprintln!("  {op:>16}: {:>6.1} MiB in {k} tensors", *b as f64 / (1 << 20) as f64);
    }
    for (name, op, b) in p.live.iter().take(8) {
        eprintln!("  {name} ({op}): {:.1} MiB", *b as f64 / (1 << 20) as f64);
    }
}
