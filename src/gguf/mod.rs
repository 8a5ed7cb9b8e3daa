//! A safe reader over ggml's GGUF API: validates a file before anything else touches it,
//! then exposes its metadata and tensor index. All GGUF FFI stays in this module.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

/// Why a file could not be read as GGUF. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{p}: file not found", p = .0.display())]
    NotFound(PathBuf),
    #[error("{p}: cannot read: {1}", p = .0.display())]
    Io(PathBuf, std::io::Error),
    #[error("{p}: not a GGUF file (starts with {1:?}, expected \"GGUF\")", p = .0.display())]
    NotGguf(PathBuf, String),
    #[error("{p}: invalid GGUF header or metadata: {1}", p = .0.display())]
    BadHeader(PathBuf, String),
    #[error("{}: truncated: tensor '{tensor}' ends at byte {end} but the file has {len} bytes", .path.display())]
    Truncated { path: PathBuf, tensor: String, end: u64, len: u64 },
    #[error("{p}: missing metadata key '{1}'", p = .0.display())]
    MissingKey(PathBuf, String),
    #[error("{p}: metadata key '{1}' has type {2}, expected {3}", p = .0.display())]
    KeyType(PathBuf, String, String, &'static str),
    #[error("{p}: invalid tokenizer: {1}", p = .0.display())]
    Vocab(PathBuf, String),
}

/// One metadata value, converted from GGUF's typed storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    /// Arrays are summarised: element type name and length (token lists are huge).
    Array {
        elem: String,
        len: usize,
    },
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Array { elem, len } => write!(f, "[{elem}; {len}]"),
        }
    }
}

/// A tensor's entry in the GGUF index (the data itself is not read).
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml type id (`enum ggml_type`).
    pub ggml_type: u32,
    /// Shape in ggml order: ne[0] is the contiguous (row) dimension.
    pub ne: [i64; 4],
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().map(|&d| d.max(1) as u64).product()
    }
    pub fn type_name(&self) -> String {
        type_name(self.ggml_type)
    }
}

/// The name ggml gives a tensor type (`q4_1`, `f32`, ...).
pub fn type_name(t: u32) -> String {
    // SAFETY: ggml_type_name returns a static string for every valid id and "NONE"-like
    // placeholders otherwise; ids come from a validated GGUF file.
    let p = unsafe { sys::ggml_type_name(t as sys::ggml_type) };
    if p.is_null() {
        return format!("type{t}");
    }
    // SAFETY: non-null static NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// An opened, validated GGUF file: metadata and tensor index.
pub struct GgufFile {
    path: PathBuf,
    ctx: *mut sys::gguf_context,
    file_len: u64,
    tensors: Vec<TensorInfo>,
}

// SAFETY: the gguf_context is only read after construction and owned exclusively.
unsafe impl Send for GgufFile {}
// SAFETY: read-only access through &self.
unsafe impl Sync for GgufFile {}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: ctx came from gguf_init_from_file and is freed exactly once.
        unsafe { sys::gguf_free(self.ctx) };
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`: it exists, starts with the GGUF magic, its header and
    /// metadata parse, and every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => GgufError::NotFound(path.clone()),
            _ => GgufError::Io(path.clone(), e),
        })?;
        if meta.is_dir() {
            return Err(GgufError::Io(path, std::io::Error::other("is a directory")));
        }
        let file_len = meta.len();
        let mut magic = [0u8; 4];
        let n = std::fs::File::open(&path)
            .and_then(|mut f| f.read(&mut magic))
            .map_err(|e| GgufError::Io(path.clone(), e))?;
        if n < 4 || &magic != b"GGUF" {
            let shown: String = magic[..n]
                .iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '.' })
                .collect();
            return Err(GgufError::NotGguf(path, shown));
        }
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| {
            GgufError::Io(path.clone(), std::io::Error::other("path contains a NUL byte"))
        })?;
        crate::llama::ensure_logging();
        crate::llama::clear_log_errors();
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // SAFETY: valid NUL-terminated path; no_alloc with a null ctx pointer reads metadata only.
        let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        if ctx.is_null() {
            let why =
                crate::llama::last_log_error().unwrap_or_else(|| "ggml could not parse it".into());
            return Err(GgufError::BadHeader(path, why));
        }
        let mut file = GgufFile { path, ctx, file_len, tensors: Vec::new() };
        file.index_tensors()?;
        Ok(file)
    }

    fn index_tensors(&mut self) -> Result<(), GgufError> {
        // SAFETY: ctx is a valid gguf_context for all calls below; ids are in range.
        let (n, data_offset) = unsafe {
            (sys::gguf_get_n_tensors(self.ctx), sys::gguf_get_data_offset(self.ctx) as u64)
        };
        for id in 0..n {
            // SAFETY: id < n_tensors; name is a NUL-terminated string owned by ctx; ne has 4 elements.
            let info = unsafe {
                let name = CStr::from_ptr(sys::gguf_get_tensor_name(self.ctx, id))
                    .to_string_lossy()
                    .into_owned();
                let ne_ptr = sys::gguf_get_tensor_ne(self.ctx, id);
                let ne = [*ne_ptr, *ne_ptr.add(1), *ne_ptr.add(2), *ne_ptr.add(3)];
                TensorInfo {
                    name,
                    ggml_type: sys::gguf_get_tensor_type(self.ctx, id) as u32,
                    ne,
                    offset: sys::gguf_get_tensor_offset(self.ctx, id) as u64,
                    size: sys::gguf_get_tensor_size(self.ctx, id) as u64,
                }
            };
            let end = data_offset + info.offset + info.size;
            if end > self.file_len {
                return Err(GgufError::Truncated {
                    path: self.path.clone(),
                    tensor: info.name,
                    end,
                    len: self.file_len,
                });
            }
            self.tensors.push(info);
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Absolute file offset where tensor data starts.
    pub fn data_offset(&self) -> u64 {
        // SAFETY: valid ctx.
        unsafe { sys::gguf_get_data_offset(self.ctx) as u64 }
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// All metadata keys, in file order.
    pub fn keys(&self) -> Vec<String> {
        // SAFETY: valid ctx; key ids in range; keys are NUL-terminated strings owned by ctx.
        unsafe {
            (0..sys::gguf_get_n_kv(self.ctx))
                .map(|i| {
                    CStr::from_ptr(sys::gguf_get_key(self.ctx, i)).to_string_lossy().into_owned()
                })
                .collect()
        }
    }

    /// A metadata value, or None when the key is absent.
    pub fn get(&self, key: &str) -> Option<Value> {
        let ckey = CString::new(key).ok()?;
        // SAFETY: valid ctx and key; every getter below is called only for its own type,
        // as gguf_get_kv_type reports (the getters abort on a type mismatch).
        unsafe {
            let id = sys::gguf_find_key(self.ctx, ckey.as_ptr());
            if id < 0 {
                return None;
            }
            let t = sys::gguf_get_kv_type(self.ctx, id);
            Some(match t {
                sys::GGUF_TYPE_UINT8 => Value::U64(sys::gguf_get_val_u8(self.ctx, id) as u64),
                sys::GGUF_TYPE_UINT16 => Value::U64(sys::gguf_get_val_u16(self.ctx, id) as u64),
                sys::GGUF_TYPE_UINT32 => Value::U64(sys::gguf_get_val_u32(self.ctx, id) as u64),
                sys::GGUF_TYPE_UINT64 => Value::U64(sys::gguf_get_val_u64(self.ctx, id)),
                sys::GGUF_TYPE_INT8 => Value::I64(sys::gguf_get_val_i8(self.ctx, id) as i64),
                sys::GGUF_TYPE_INT16 => Value::I64(sys::gguf_get_val_i16(self.ctx, id) as i64),
                sys::GGUF_TYPE_INT32 => Value::I64(sys::gguf_get_val_i32(self.ctx, id) as i64),
                sys::GGUF_TYPE_INT64 => Value::I64(sys::gguf_get_val_i64(self.ctx, id)),
                sys::GGUF_TYPE_FLOAT32 => Value::F64(sys::gguf_get_val_f32(self.ctx, id) as f64),
                sys::GGUF_TYPE_FLOAT64 => Value::F64(sys::gguf_get_val_f64(self.ctx, id)),
                sys::GGUF_TYPE_BOOL => Value::Bool(sys::gguf_get_val_bool(self.ctx, id)),
                sys::GGUF_TYPE_STRING => Value::Str(
                    CStr::from_ptr(sys::gguf_get_val_str(self.ctx, id))
                        .to_string_lossy()
                        .into_owned(),
                ),
                sys::GGUF_TYPE_ARRAY => {
                    let et = sys::gguf_get_arr_type(self.ctx, id);
                    let elem =
                        CStr::from_ptr(sys::gguf_type_name(et)).to_string_lossy().into_owned();
                    Value::Array { elem, len: sys::gguf_get_arr_n(self.ctx, id) }
                }
                other => Value::Str(format!("<gguf type {other}>")),
            })
        }
    }

    /// The key id and length of an array value whose elements have gguf type `elem` (None:
    /// absent, not an array, or another element type).
    fn array_of(&self, key: &str, elem: sys::gguf_type) -> Option<(i64, usize)> {
        let ckey = CString::new(key).ok()?;
        // SAFETY: valid ctx and key; the array getters are called only on an array.
        unsafe {
            let id = sys::gguf_find_key(self.ctx, ckey.as_ptr());
            (id >= 0
                && sys::gguf_get_kv_type(self.ctx, id) == sys::GGUF_TYPE_ARRAY
                && sys::gguf_get_arr_type(self.ctx, id) == elem)
                .then(|| (id, sys::gguf_get_arr_n(self.ctx, id)))
        }
    }

    /// The strings of a string-array value (None: absent or not an array of strings).
    pub fn str_array(&self, key: &str) -> Option<Vec<String>> {
        let (id, n) = self.array_of(key, sys::GGUF_TYPE_STRING)?;
        // SAFETY: valid ctx; `id` is an array of strings, the indices below its length.
        let s = |i| unsafe {
            CStr::from_ptr(sys::gguf_get_arr_str(self.ctx, id, i)).to_string_lossy().into_owned()
        };
        Some((0..n).map(s).collect())
    }

    /// The values of a bool-array value (None: absent or not an array of bools).
    pub fn bool_array(&self, key: &str) -> Option<Vec<bool>> {
        let (id, n) = self.array_of(key, sys::GGUF_TYPE_BOOL)?;
        if n == 0 {
            return Some(Vec::new()); // (the data pointer of an empty array may be null)
        }
        // SAFETY: valid ctx; `id` is an array of bools (gguf_get_arr_data aborts only for
        // strings), whose data holds one byte per element, n of them.
        let data = unsafe {
            std::slice::from_raw_parts(sys::gguf_get_arr_data(self.ctx, id) as *const u8, n)
        };
        Some(data.iter().map(|&b| b != 0).collect())
    }

    /// Checks what llama.cpp's model loader asserts on (aborting the process) rather than
    /// reporting: every token of `tokenizer.ggml.tokens` must be distinct. Call before handing
    /// the file to llama.cpp.
    pub fn check_for_llama(&self) -> Result<(), GgufError> {
        if let Some(tokens) = self.str_array("tokenizer.ggml.tokens") {
            let mut seen = std::collections::HashMap::with_capacity(tokens.len());
            for (id, t) in tokens.iter().enumerate() {
                if let Some(first) = seen.insert(t.as_str(), id) {
                    return Err(GgufError::Vocab(self.path.clone(), format!("token {t:?} appears twice in tokenizer.ggml.tokens (ids {first} and {id})")));
                }
            }
        }
        Ok(())
    }

    /// A string value; errors name the file and key.
    pub fn get_str(&self, key: &str) -> Result<String, GgufError> {
        match self.get(key) {
            Some(Value::Str(s)) => Ok(s),
            Some(v) => {
                Err(GgufError::KeyType(self.path.clone(), key.into(), format!("{v}"), "string"))
            }
            None => Err(GgufError::MissingKey(self.path.clone(), key.into())),
        }
    }

    /// An unsigned integer value (any integer width); errors name the file and key.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        match self.get(key) {
            Some(Value::U64(v)) => Ok(v),
            Some(Value::I64(v)) if v >= 0 => Ok(v as u64),
            Some(v) => Err(GgufError::KeyType(
                self.path.clone(),
                key.into(),
                format!("{v}"),
                "unsigned integer",
            )),
            None => Err(GgufError::MissingKey(self.path.clone(), key.into())),
        }
    }

    /// A float value (f32 or f64); errors name the file and key.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.get(key) {
            Some(Value::F64(v)) => Ok(v),
            Some(v) => {
                Err(GgufError::KeyType(self.path.clone(), key.into(), format!("{v}"), "float"))
            }
            None => Err(GgufError::MissingKey(self.path.clone(), key.into())),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String, GgufError> {
        self.get_str("general.architecture")
    }

    /// Total number of weight elements (parameters).
    pub fn n_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_elements()).sum()
    }

    /// Count of tensors per ggml type name, sorted by count (descending).
    pub fn type_histogram(&self) -> Vec<(String, usize)> {
        let mut map = std::collections::BTreeMap::<String, usize>::new();
        for t in &self.tensors {
            *map.entry(t.type_name()).or_default() += 1;
        }
        let mut v: Vec<_> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}
