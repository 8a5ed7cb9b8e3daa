//! The adapter registry the HTTP side sees (names → ids, files) and the `--adapter-dir` rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One loaded adapter.
#[derive(Debug, Clone)]
pub struct AdapterEntry {
    pub id: u64,
    pub path: PathBuf,
    /// Unix time it was loaded.
    pub created: u64,
    /// `Some(i)`: merged into the engine's model `i` (`--merge-adapters`), not applied at runtime.
    pub merged: Option<usize>,
}

/// Names of the loaded adapters.
#[derive(Debug, Default)]
pub struct Registry {
    pub by_name: BTreeMap<String, AdapterEntry>,
    next_id: u64,
}

impl Registry {
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Checks an adapter name: 1–64 characters of `A-Z a-z 0-9 . _ -`, not a reserved name.
pub fn check_name(name: &str, base_names: &[&str]) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("adapter name {name:?} must have 1 to 64 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!(
            "adapter name {name:?} may contain only letters, digits, '.', '_' and '-'"
        ));
    }
    if base_names.contains(&name) {
        return Err(format!("adapter name {name:?} is the base model's name"));
    }
    Ok(())
}

/// Parses `NAME=PATH` (the `--adapter` flag).
pub fn parse_spec(spec: &str) -> Result<(String, PathBuf), String> {
    match spec.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_string(), PathBuf::from(p))),
        _ => Err(format!("--adapter {spec:?}: expected NAME=PATH.gguf")),
    }
}

/// Resolves `requested` (relative to `dir`, or absolute) to a regular file inside `dir` after
/// following every symlink: `..` components and links that lead out of the folder are refused.
pub fn resolve_in_dir(dir: &Path, requested: &str) -> Result<PathBuf, String> {
    if requested.is_empty() {
        return Err("\"path\" is empty".into());
    }
    if requested.contains('\0') {
        return Err("\"path\" contains a NUL byte".into());
    }
    let root = dir.canonicalize().map_err(|e| format!("--adapter-dir {}: {e}", dir.display()))?;
    let req = Path::new(requested);
    if req.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!(
            "path {requested:?} contains '..': adapters load only from inside the adapter folder"
        ));
    }
    // One message for a missing file, a folder and a path outside (even through a symlink): a
    // client learns nothing about files outside the adapter folder.
    let refused = || {
        format!("path {requested:?} is not a file inside the adapter folder (missing, not a file, or outside it; symlinks are followed)")
    };
    let joined = if req.is_absolute() { req.to_path_buf() } else { root.join(req) };
    if !joined.starts_with(&root) {
        return Err(refused());
    }
    let real = joined.canonicalize().map_err(|_| refused())?;
    if !real.starts_with(&root) || !real.is_file() {
        return Err(refused());
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_specs() {
        assert!(check_name("shakes-1.0_x", &["base"]).is_ok());
        assert!(check_name("base", &["base"]).is_err());
        assert!(check_name("a/b", &[]).is_err());
        assert!(check_name("", &[]).is_err());
        assert_eq!(parse_spec("a=x.gguf").unwrap(), ("a".to_string(), PathBuf::from("x.gguf")));
        assert!(parse_spec("x.gguf").is_err());
        assert!(parse_spec("=x").is_err());
    }

    #[test]
    fn paths_stay_inside_the_folder() {
        let t = std::env::temp_dir().join(format!("grit-serve-dir-{}", std::process::id()));
        let dir = t.join("adapters");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.gguf"), b"x").unwrap();
        std::fs::write(t.join("outside.gguf"), b"x").unwrap();
        assert!(resolve_in_dir(&dir, "sub/a.gguf").is_ok());
        assert!(resolve_in_dir(&dir, dir.join("sub/a.gguf").to_str().unwrap()).is_ok());
        assert!(resolve_in_dir(&dir, "../outside.gguf").unwrap_err().contains(".."));
        assert!(resolve_in_dir(&dir, t.join("outside.gguf").to_str().unwrap())
            .unwrap_err()
            .contains("outside"));
        assert!(resolve_in_dir(&dir, "sub").unwrap_err().contains("not a file"));
        assert!(resolve_in_dir(&dir, "missing.gguf").is_err());
        // No existence oracle outside the folder: a missing and an existing outside file get the
        // same message (apart from the path itself).
        let msg = |p: &Path| {
            resolve_in_dir(&dir, p.to_str().unwrap()).unwrap_err().replace(p.to_str().unwrap(), "P")
        };
        assert_eq!(msg(&t.join("outside.gguf")), msg(&t.join("nope.gguf")));
        assert_eq!(msg(&t.join("outside.gguf")), msg(&dir.join("missing.gguf")));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(t.join("outside.gguf"), dir.join("link.gguf")).unwrap();
            assert!(resolve_in_dir(&dir, "link.gguf").unwrap_err().contains("outside"));
        }
        std::fs::remove_dir_all(&t).unwrap();
    }
}
