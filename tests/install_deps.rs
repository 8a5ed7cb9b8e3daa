//! The dependency detection of `scripts/install-deps.sh`, on faked library folders and tools:
//! each build dependency must be found by what really uses it (bindgen's libclang, a cmake new
//! enough for llama.cpp, python3 with pip), so a fresh machine gets what it lacks.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-deps.sh")
}

/// The packages `install-deps.sh --dry-run [extra]` would install, with libclang searched only
/// in `libdirs` and `fake_bin` put first on PATH.
fn dry_run(libdirs: &[&Path], fake_bin: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg("--dry-run").args(extra);
    let dirs: Vec<String> = libdirs.iter().map(|d| d.display().to_string()).collect();
    cmd.env("GRIT_DEPS_LIBDIRS", dirs.join(":"));
    if let Some(bin) = fake_bin {
        cmd.env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()));
    }
    let out = cmd.output().expect("bash runs");
    assert!(
        out.status.success(),
        "install-deps.sh --dry-run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

fn touch(dir: &Path, name: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), b"").unwrap();
}

fn stub(bin: &Path, name: &str, body: &str) {
    fs::create_dir_all(bin).unwrap();
    let p = bin.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    // Debian 12's images ship clang's C++ library (libclang-cpp14) but not the libclang that
    // bindgen loads (libclang-dev): the dry run must ask for libclang-dev.
    let tmp = tempfile::tempdir().unwrap();
    let llvm = tmp.path().join("usr/lib/llvm-14/lib");
    let multiarch = tmp.path().join("usr/lib/x86_64-linux-gnu");
    touch(&llvm, "libclang-cpp.so.14");
    touch(&multiarch, "libclang-cpp.so.14");
    let pkgs = dry_run(&[&llvm, &multiarch], None, &[]);
    assert!(pkgs.iter().any(|p| p == "libclang-dev"), "libclang-dev not listed: {pkgs:?}");
}

#[test]
fn every_name_bindgen_loads_counts_as_libclang() {
    for name in [
        "libclang.so",
        "libclang-14.so",
        "libclang.so.1",
        "libclang-14.so.1",
        "libclang-14.0.6.so.14",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lib");
        touch(&dir, "libclang-cpp.so.14");
        touch(&dir, name);
        let pkgs = dry_run(&[&dir], None, &[]);
        assert!(
            !pkgs.iter().any(|p| p == "libclang-dev"),
            "{name} should satisfy bindgen: {pkgs:?}"
        );
    }
    // No folder at all, or one that does not exist: missing.
    let pkgs = dry_run(&[Path::new("/nonexistent/grit-test")], None, &[]);
    assert!(pkgs.iter().any(|p| p == "libclang-dev"), "{pkgs:?}");
}

#[test]
fn cmake_too_old_for_llama_cpp_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    touch(&lib, "libclang.so.1");
    let bin = tmp.path().join("bin");
    stub(&bin, "cmake", "echo 'cmake version 3.10.2'");
    assert!(dry_run(&[&lib], Some(&bin), &[]).iter().any(|p| p == "cmake"));
    stub(&bin, "cmake", "echo 'cmake version 3.25.1'");
    assert!(!dry_run(&[&lib], Some(&bin), &[]).iter().any(|p| p == "cmake"));
}

#[test]
fn python_without_pip_or_venv_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let lib = tmp.path().join("lib");
    touch(&lib, "libclang.so.1");
    let bin = tmp.path().join("bin");
    // A python3 that runs but has neither pip nor ensurepip/venv (Debian's bare python3).
    stub(&bin, "python3", "exit 1");
    let pkgs = dry_run(&[&lib], Some(&bin), &[]);
    assert!(pkgs.iter().any(|p| p == "python3-pip"), "{pkgs:?}");
    assert!(pkgs.iter().any(|p| p == "python3-venv"), "{pkgs:?}");
}

#[test]
fn unknown_argument_is_refused() {
    let out = Command::new("bash").arg(script()).arg("--vulcan").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument '--vulcan'"));
}
