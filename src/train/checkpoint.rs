//! Checkpoints: the adapter tensors, optimizer moments and loop state of a step, written
//! atomically as a folder `step-N` (`tensors.safetensors` + `state.json`): everything goes
//! into a temporary sibling folder first, which is renamed into place once complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::grit_run::GritCheckpoint;
use crate::data::DataPosition;

/// Why a checkpoint could not be written or read; names the path.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: cannot write: {source}", .path.display())]
    Write { path: PathBuf, source: crate::BoxError },
    #[error("{}: not a grit checkpoint: {source}", .path.display())]
    Format { path: PathBuf, source: crate::BoxError },
    #[error("{p}: not a grit checkpoint: {msg}", p = .0.display(), msg = .1)]
    Invalid(PathBuf, String),
}

/// A named f32 tensor (row-major shape, as safetensors stores it).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One checkpoint: tensors plus the loop state.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub step: usize,
    pub tensors: Vec<NamedTensor>,
    pub state: LoopState,
}

/// What a run needs besides the tensors to continue where it stopped (`state.json`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoopState {
    /// Where the data stream stands.
    pub data: DataPosition,
    /// Seconds trained before this checkpoint (a resumed run adds its own).
    pub elapsed_s: f64,
    /// The step-0 evaluation loss (None without evaluation data).
    pub eval_loss_initial: Option<f32>,
    /// The run's length (its learning-rate schedule and GRIT's first cut depend on it).
    pub total_steps: usize,
    /// GRIT's host state (`--method grit` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grit: Option<GritCheckpoint>,
}

/// `state.json`.
#[derive(Serialize, Deserialize)]
struct StateFile {
    step: usize,
    state: LoopState,
}

const TENSORS: &str = "tensors.safetensors";
const STATE: &str = "state.json";

fn io(p: &Path, source: std::io::Error) -> CheckpointError {
    CheckpointError::Io { path: p.into(), source }
}

/// The folder of step `step` under `dir` (`dir/step-N`).
pub fn step_dir(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step}"))
}

impl Checkpoint {
    /// Writes `dir/step-N` atomically (temporary folder, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let final_dir = step_dir(dir, self.step);
        let tmp = dir.join(format!(".step-{}.tmp-{}", self.step, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let res = self.write_into(&tmp).and_then(|()| {
            // Read back before it becomes visible.
            let back = Checkpoint::load(&tmp)?;
            if back.step != self.step || back.tensors.len() != self.tensors.len() {
                return Err(CheckpointError::Invalid(
                    tmp.clone(),
                    format!("reads back as step {} with {} tensors", back.step, back.tensors.len()),
                ));
            }
            // An existing folder of this step moves aside first and goes only once the new one
            // is in place.
            let old = dir.join(format!(".step-{}.old-{}", self.step, std::process::id()));
            let had_old = final_dir.exists();
            if had_old {
                std::fs::rename(&final_dir, &old).map_err(|e| io(&final_dir, e))?;
            }
            if let Err(e) = std::fs::rename(&tmp, &final_dir) {
                if had_old {
                    let _ = std::fs::rename(&old, &final_dir);
                }
                return Err(io(&final_dir, e));
            }
            if had_old {
                let _ = std::fs::remove_dir_all(&old);
            }
            // Make the rename itself durable.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res.map(|()| final_dir)
    }

    fn write_into(&self, tmp: &Path) -> Result<(), CheckpointError> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let mut views = Vec::with_capacity(self.tensors.len());
        for (t, b) in self.tensors.iter().zip(&bytes) {
            let v = TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| {
                CheckpointError::Write {
                    path: tmp.into(),
                    source: format!("tensor {}: {e}", t.name).into(),
                }
            })?;
            views.push((t.name.clone(), v));
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "grit-checkpoint".to_string());
        let st_path = tmp.join(TENSORS);
        safetensors::serialize_to_file(views, &Some(meta), &st_path)
            .map_err(|e| CheckpointError::Write { path: st_path.clone(), source: e.into() })?;
        let state_path = tmp.join(STATE);
        let doc = StateFile { step: self.step, state: self.state.clone() };
        let bytes = serde_json::to_vec_pretty(&doc)
            .map_err(|e| CheckpointError::Write { path: state_path.clone(), source: e.into() })?;
        std::fs::write(&state_path, bytes).map_err(|e| io(&state_path, e))?;
        for f in [&st_path, &state_path] {
            std::fs::File::open(f).and_then(|h| h.sync_all()).map_err(|e| io(f, e))?;
        }
        Ok(())
    }

    /// Reads a checkpoint folder written by [`Checkpoint::save`].
    pub fn load(dir: &Path) -> Result<Self, CheckpointError> {
        let state_path = dir.join(STATE);
        let text = std::fs::read(&state_path).map_err(|e| io(&state_path, e))?;
        let doc: StateFile = serde_json::from_slice(&text)
            .map_err(|e| CheckpointError::Format { path: state_path.clone(), source: e.into() })?;
        let step = doc.step;
        let st_path = dir.join(TENSORS);
        let raw = std::fs::read(&st_path).map_err(|e| io(&st_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&raw)
            .map_err(|e| CheckpointError::Format { path: st_path.clone(), source: e.into() })?;
        let mut by_name = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(CheckpointError::Invalid(
                    st_path.clone(),
                    format!("tensor {name} is {:?}, expected F32", view.dtype()),
                ));
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            by_name.insert(name.clone(), NamedTensor { name, shape: view.shape().to_vec(), data });
        }
        Ok(Checkpoint { step, tensors: by_name.into_values().collect(), state: doc.state })
    }

    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The checkpoint steps present under `dir`, ascending (temporary folders ignored).
pub fn list_steps(dir: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()
                        .and_then(|n| n.strip_prefix("step-"))
                        .and_then(|s| s.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

/// Deletes the oldest checkpoints so that at most `keep` remain.
pub fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let steps = list_steps(dir);
    if steps.len() > keep {
        for s in &steps[..steps.len() - keep] {
            let d = step_dir(dir, *s);
            std::fs::remove_dir_all(&d).map_err(|e| io(&d, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: usize) -> Checkpoint {
        Checkpoint {
            step,
            tensors: vec![
                NamedTensor {
                    name: "a".into(),
                    shape: vec![2, 3],
                    data: vec![1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0],
                },
                NamedTensor { name: "b".into(), shape: vec![1], data: vec![0.25] },
            ],
            state: LoopState {
                data: DataPosition { epoch: 1, index: 3, fingerprint: 7 },
                elapsed_s: 2.5,
                eval_loss_initial: Some(4.0),
                total_steps: 10,
                grit: None,
            },
        }
    }

    #[test]
    fn save_load_round_trip_is_exact_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let c = sample(5);
        let p = c.save(dir.path()).unwrap();
        assert_eq!(p, step_dir(dir.path(), 5));
        let back = Checkpoint::load(&p).unwrap();
        assert_eq!(back, c);
        // No temporary folders remain.
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn prune_keeps_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [2, 4, 6, 8] {
            sample(s).save(dir.path()).unwrap();
        }
        std::fs::create_dir_all(dir.path().join(".step-10.tmp-1")).unwrap();
        prune(dir.path(), 2).unwrap();
        assert_eq!(list_steps(dir.path()), vec![6, 8]);
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE), b"{not json").unwrap();
        let err = Checkpoint::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("state.json") && err.contains("not a grit checkpoint"), "{err}");
    }
}
