//! The fenced FFI module for what llama-cpp-2 does not wrap: llama.cpp/ggml logging,
//! the system-info line, and the backend list. Every `unsafe` block of inference-side FFI
//! lives here.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;

pub mod multi;

/// Whether llama.cpp's own log lines go to stderr (`-v`). Errors are always captured.
static VERBOSE: AtomicBool = AtomicBool::new(false);
thread_local! {
    /// The most recent error/warning lines llama.cpp or ggml logged on this thread, newest
    /// last. Per thread: llama.cpp logs a failure on the thread that called it, so concurrent
    /// operations (the server's adapter loads and file checks) each read their own message.
    static RECENT: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Last level seen on this thread, so that `GGML_LOG_LEVEL_CONT` continuation lines join
    /// their parent.
    static LAST_LEVEL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
static INSTALL: Once = Once::new();
static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();

const RECENT_MAX: usize = 16;

/// Level values of `enum ggml_log_level` (the header's constants are not in the bindings).
const LEVEL_WARN: u32 = 3;
const LEVEL_ERROR: u32 = 4;
const LEVEL_CONT: u32 = 5;

unsafe extern "C" fn log_callback(level: u32, text: *const c_char, _user: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    // try_with: a thread being torn down has no capture left (never panic across the FFI).
    let effective =
        if level == LEVEL_CONT { LAST_LEVEL.try_with(|l| l.get()).unwrap_or(0) } else { level };
    let _ = LAST_LEVEL.try_with(|l| l.set(effective));
    if VERBOSE.load(Ordering::Relaxed) {
        eprint!("{msg}");
    }
    if effective == LEVEL_ERROR || effective == LEVEL_WARN {
        let _ = RECENT.try_with(|cell| {
            let Ok(mut recent) = cell.try_borrow_mut() else { return };
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
        });
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
    let _ = RECENT.try_with(|r| r.borrow_mut().clear());
}

/// The most informative error line this thread captured since the last [`clear_log_errors`], with the
/// llama.cpp function prefix (`llama_model_load: error loading model: ...`) trimmed.
pub fn last_log_error() -> Option<String> {
    RECENT.try_with(|r| pick_error(&r.borrow())).ok().flatten()
}

fn pick_error(recent: &[String]) -> Option<String> {
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
    llama_cpp_2::list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| (d.name, d.description))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn log(level: u32, text: &std::ffi::CStr) {
        // SAFETY: a NUL-terminated string that outlives the call, as llama.cpp passes.
        unsafe { log_callback(level, text.as_ptr(), std::ptr::null_mut()) }
    }

    /// Two threads logging errors at once each read back their own message.
    #[test]
    fn captured_errors_are_per_thread() {
        let run = |who: &'static str| {
            std::thread::spawn(move || {
                clear_log_errors();
                for i in 0..200 {
                    let line = std::ffi::CString::new(format!(
                        "llama_model_load: error loading model: {who} {i}\n"
                    ))
                    .unwrap();
                    log(LEVEL_ERROR, &line);
                    log(LEVEL_CONT, c" (continued)");
                    std::thread::yield_now();
                }
                last_log_error()
            })
        };
        let (a, b) = (run("a"), run("b"));
        assert_eq!(a.join().unwrap().as_deref(), Some("a 199 (continued)"));
        assert_eq!(b.join().unwrap().as_deref(), Some("b 199 (continued)"));
        // Nothing was logged on this thread.
        clear_log_errors();
        assert_eq!(last_log_error(), None);
    }
}
