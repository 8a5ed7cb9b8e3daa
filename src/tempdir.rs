//! A private temporary folder, removed with everything in it when dropped.

use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `BASE/TAG-PID-NANOS` (and `BASE` if missing); the name is unique per process
    /// and moment, and `create_dir` refuses to reuse an existing folder.
    pub fn new_in(base: &Path, tag: &str) -> std::io::Result<Self> {
        std::fs::create_dir_all(base)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
