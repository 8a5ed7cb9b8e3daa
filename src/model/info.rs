//! What `grit info` says about a model file: what the GGUF holds, whether llama.cpp loads it
//! (vocabulary and chat template), whether grit can train it, and what this build runs on.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use crate::ggml::DeviceInfo;
use crate::gguf::GgufFile;
use crate::infer::{InferError, Model};

/// A model file's description (`grit info`; `--json` prints it as it is serialized).
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub file: PathBuf,
    pub file_bytes: u64,
    pub architecture: String,
    pub name: Option<String>,
    pub parameters: u64,
    /// Every tensor's type with its count, most frequent first (a map by type in JSON).
    #[serde(serialize_with = "as_map")]
    pub tensor_types: Vec<(String, usize)>,
    /// The same for the layers' weight matrices (`blk.*`, 2-D).
    #[serde(serialize_with = "as_map")]
    pub layer_weight_types: Vec<(String, usize)>,
    pub layers: Option<u64>,
    pub context_length: Option<u64>,
    pub embedding_length: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    pub feed_forward_length: Option<u64>,
    pub vocab_size: u64,
    pub chat_template: bool,
    pub trainable: bool,
    /// Why grit cannot train it (the missing piece named), when it cannot.
    pub trainable_note: Option<String>,
    pub system_info: String,
    pub backends: Vec<&'static str>,
    pub devices: Vec<DeviceInfo>,
}

fn as_map<S: Serializer>(v: &[(String, usize)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(t, n)| (t, n)).collect::<BTreeMap<_, _>>())
}

impl ModelInfo {
    /// Reads the description of the GGUF at `path`: grit's validation first, then a
    /// vocabulary-only load by llama.cpp (no weights; fails with llama.cpp's reason when it
    /// does not know the model).
    pub fn read(path: &Path) -> Result<Self, InferError> {
        let g = GgufFile::open(path)?;
        g.check_for_llama()?;
        let arch = g.architecture()?;
        let get_u = |k: &str| g.get_u64(&format!("{arch}.{k}")).ok();
        let vocab = Model::load_vocab_of(&g)?;
        let trainable = crate::model::Arch::parse(&arch).map(drop).map_err(|e| match e {
            crate::model::ModelError::UnsupportedArch { arch, missing } => {
                format!("{arch}: {missing}")
            }
            other => other.to_string(),
        });
        let mut layer_types = BTreeMap::<String, usize>::new();
        for t in g.tensors().iter().filter(|t| t.name.starts_with("blk.") && t.ne[1] > 1) {
            *layer_types.entry(t.type_name()).or_default() += 1;
        }
        let mut layer_weight_types: Vec<_> = layer_types.into_iter().collect();
        layer_weight_types.sort_by_key(|e| std::cmp::Reverse(e.1));
        Ok(ModelInfo {
            file: path.into(),
            file_bytes: g.file_len(),
            name: g.get_str("general.name").ok(),
            parameters: g.n_params(),
            tensor_types: g.type_histogram(),
            layer_weight_types,
            layers: get_u("block_count"),
            context_length: get_u("context_length"),
            embedding_length: get_u("embedding_length"),
            head_count: get_u("attention.head_count"),
            head_count_kv: get_u("attention.head_count_kv"),
            feed_forward_length: get_u("feed_forward_length"),
            vocab_size: vocab.n_vocab() as u64,
            chat_template: vocab.has_chat_template(),
            trainable: trainable.is_ok(),
            trainable_note: trainable.err(),
            system_info: crate::llama::system_info(),
            backends: crate::llama::compiled_backends(),
            devices: crate::ggml::devices(),
            architecture: arch,
        })
    }
}

/// The text form: one `label  value` line per fact.
impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "?".into());
        let types = |v: &[(String, usize)]| {
            v.iter().map(|(t, n)| format!("{t} ×{n}")).collect::<Vec<_>>().join(", ")
        };
        let mib = self.file_bytes as f64 / (1024.0 * 1024.0);
        writeln!(f, "file            {} ({mib:.1} MiB)", self.file.display())?;
        writeln!(f, "architecture    {}", self.architecture)?;
        if let Some(name) = &self.name {
            writeln!(f, "name            {name}")?;
        }
        writeln!(f, "parameters      {} ({:.1}M)", self.parameters, self.parameters as f64 / 1e6)?;
        writeln!(f, "layers          {}", show(self.layers))?;
        writeln!(f, "context length  {}", show(self.context_length))?;
        writeln!(
            f,
            "embedding       {} (heads {}, kv heads {}, ffn {})",
            show(self.embedding_length),
            show(self.head_count),
            show(self.head_count_kv),
            show(self.feed_forward_length)
        )?;
        writeln!(f, "vocabulary      {}", self.vocab_size)?;
        writeln!(f, "layer weights   {}", types(&self.layer_weight_types))?;
        writeln!(f, "all tensors     {}", types(&self.tensor_types))?;
        writeln!(f, "chat template   {}", if self.chat_template { "yes" } else { "no" })?;
        match &self.trainable_note {
            None => writeln!(f, "trainable       yes ({})", self.architecture)?,
            Some(why) => writeln!(f, "trainable       no — {why}")?,
        }
        writeln!(f, "backends        {}", self.backends.join(", "))?;
        for (i, d) in self.devices.iter().enumerate() {
            let mem = if d.memory_total > 0 {
                let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                format!(", {:.1}/{:.1} GiB free", gib(d.memory_free), gib(d.memory_total))
            } else {
                String::new()
            };
            writeln!(
                f,
                "{:<16}{} ({}, {}{mem}): {}",
                if i == 0 { "devices" } else { "" },
                d.name,
                d.backend,
                d.kind,
                d.description
            )?;
        }
        writeln!(f, "system info     {}", self.system_info)
    }
}
