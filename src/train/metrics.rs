//! `metrics.jsonl`: one JSON object per line, flushed as written, so a crash loses at most
//! the line being written. On resume, rows after the checkpoint's step are dropped first, so a
//! resumed run's file matches an uninterrupted one.

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(Self { path: path.into(), file })
    }

    /// Opens `path` for appending after removing every row whose `step` is greater than
    /// `keep_through_step` (and any torn last line). The rewrite goes through a temporary file.
    pub fn resume(path: &Path, keep_through_step: usize) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut kept = String::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["step"].as_u64().is_some_and(|s| s as usize <= keep_through_step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, path)?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self { path: path.into(), file })
    }

    pub fn write(&mut self, row: &serde_json::Value) -> std::io::Result<()> {
        let mut line = serde_json::to_string(row).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_rows_after_the_checkpoint_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        for s in 0..6 {
            w.write(&serde_json::json!({"step": s, "loss": s as f64})).unwrap();
        }
        drop(w);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"step\": 6, \"lo").unwrap();
        let mut w = MetricsWriter::resume(&p, 3).unwrap();
        w.write(&serde_json::json!({"step": 4})).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(steps, vec![0, 1, 2, 3, 4]);
    }
}
