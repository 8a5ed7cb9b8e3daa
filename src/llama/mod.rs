//! The fenced FFI module for what llama-cpp-2 does not wrap: llama.cpp/ggml logging,
//! the system-info line, and the backend list. Every `unsafe` block of inference-side FFI
//! lives here.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;

pub mod multi;

/// Whether llama.cpp's own log lines go to stderr (`-v`). Errors are always captured.
static VERBOSE: AtomicBool = AtomicBool::new(false);
/// The most recent error/warning lines llama.cpp or ggml logged, newest last.
static RECENT: Mutex<Vec<String>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();
static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

const RECENT_MAX: usize = 16;

/// Level values of `enum ggml_log_level` (the header's constants are not in the bindings).
const LEVEL_WARN: u32 = 3;
const LEVEL_ERROR: u32 = 4;
const LEVEL_CONT: u32 = 5;

/// Last level seen, so that `GGML_LOG_LEVEL_CONT` continuation lines join their parent.
static LAST_LEVEL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

unsafe extern "C" fn log_callback(level: u32, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let effective = if level == LEVEL_CONT { LAST_LEVEL.load(Ordering::Relaxed) } else { level };
    LAST_LEVEL.store(effective, Ordering::Relaxed);
    if VERBOSE.load(Ordering::Relaxed) {
        eprint!("{msg}");
    }
    if effective == LEVEL_ERROR || effective == LEVEL_WARN {
        if let Ok(mut recent) = RECENT.lock() {
            let line = msg.trim_end().to_string();
            if level == LEVEL_CONT {
                if let Some(last) = recent.last_mut() {
                    last.push_str(&line);
                    return;
                }
            }
            if !line.is_empty() {
                recent.push(line);
                let n = recent.len();
                if n > RECENT_MAX {
                    recent.drain(..n - RECENT_MAX);
                }
            }
        }
    }
}

/// Installs grit's log handler for llama.cpp and ggml (quiet unless `verbose`).
/// Safe to call more than once; the last `verbose` wins.
pub fn init_logging(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
    INSTALL.call_once(|| {
        // SAFETY: the callback is a plain `extern "C"` function with the expected signature
        // that never unwinds and only touches process-wide statics; user data is unused.
        unsafe {
            llama_cpp_sys_2::llama_log_set(Some(log_callback), std::ptr::null_mut());
        }
    });
}

/// Installs the log handler (if not yet) without changing the verbosity.
pub fn ensure_logging() {
    init_logging(VERBOSE.load(Ordering::Relaxed));
}

/// Clears the captured llama.cpp error lines (call before an operation whose errors you report).
pub fn clear_log_errors() {
    if let Ok(mut recent) = RECENT.lock() {
        recent.clear();
    }
}

/// The most informative captured error line since the last [`clear_log_errors`], with the
/// llama.cpp function prefix (`llama_model_load: error loading model: ...`) trimmed.
pub fn last_log_error() -> Option<String> {
    let recent = RECENT.lock().ok()?;
    let pick = recent
        .iter()
        .rev()
        .find(|l| l.contains("error loading model:"))
        .or_else(|| recent.iter().rev().find(|l| l.contains("error") || l.contains("failed")))
        .or_else(|| recent.last())?;
    let trimmed = match pick.find("error loading model:") {
        Some(i) => pick[i + "error loading model:".len()..].trim(),
        None => pick.trim(),
    };
    Some(trimmed.to_string())
}

/// The process-wide llama.cpp backend (initialised once; llama.cpp allows only one).
pub fn backend() -> &'static LlamaBackend {
    init_logging(VERBOSE.load(Ordering::Relaxed));
    BACKEND.get_or_init(|| {
        // `init` fails only if called twice, which the OnceLock prevents.
        LlamaBackend::init().expect("llama backend initialised twice")
    })
}

/// ggml's system info line: which instruction sets and backends this build has.
pub fn system_info() -> String {
    let _ = backend();
    // SAFETY: returns a pointer to a static, NUL-terminated buffer owned by llama.cpp.
    let ptr = unsafe { llama_cpp_sys_2::llama_print_system_info() };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, valid until the next call; copied out at once.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().trim().to_string()
}

/// The compute devices ggml sees (name and description), e.g. `CPU`, `CUDA0`.
pub fn devices() -> Vec<(String, String)> {
    let _ = backend();
    llama_cpp_2::list_llama_ggml_backend_devices().into_iter().map(|d| (d.name, d.description)).collect()
}

/// Backends compiled into this binary (cargo features).
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "metal") {
        v.push("metal");
    }
    if cfg!(feature = "vulkan") {
        v.push("vulkan");
    }
    v
}

/// Restores the default SIGPIPE action (Rust ignores it), so that `grit … | head` ends grit
/// quietly when the reader goes away instead of panicking on the next write to stdout.
/// Called once at start-up by the binary, before any thread exists (not for `grit serve`).
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: signal() with a valid signal number and SIG_DFL; the caller runs it before
    // starting threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
