//! Writing GGUF files (test models, LoRA adapters) and converting to and from ggml's block
//! formats. Reading stays in `crate::gguf`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::context::{Capacity, Context, Type};
use super::GgmlError;

/// Converts F32 rows of `n_per_row` elements to type `ty` (any F32/F16/BF16 or quantized type
/// ggml can quantize without an importance matrix).
pub fn quantize(ty: Type, data: &[f32], n_per_row: usize) -> Result<Vec<u8>, GgmlError> {
    let err = |why: String| GgmlError::Quantize { ty: ty.name(), why };
    if ty == Type::F32 {
        return Ok(data.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    if n_per_row == 0 || !data.len().is_multiple_of(n_per_row) {
        return Err(err(format!("{} values are not whole rows of {n_per_row}", data.len())));
    }
    let row = ty.row_size(n_per_row).ok_or_else(|| {
        err(format!("rows of {n_per_row} are not a multiple of the block size {}", ty.block_size()))
    })?;
    // SAFETY: pure query of a valid type id (checked by row_size above).
    if unsafe { sys::ggml_quantize_requires_imatrix(ty.0 as sys::ggml_type) } {
        return Err(err("this type needs an importance matrix".into()));
    }
    let nrows = data.len() / n_per_row;
    let mut out = vec![0u8; nrows * row];
    // SAFETY: src holds nrows × n_per_row floats, dst holds nrows rows of `row` bytes (the
    // size ggml writes for this type); no imatrix, which the type does not require.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.0 as sys::ggml_type,
            data.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != out.len() {
        return Err(err(format!("ggml wrote {written} bytes, expected {}", out.len())));
    }
    Ok(out)
}

/// Converts `n` elements stored as `ty` back to F32.
pub fn dequantize(ty: Type, data: &[u8], n: usize) -> Result<Vec<f32>, GgmlError> {
    let err = |why: String| GgmlError::Quantize { ty: ty.name(), why };
    let bytes = ty.row_size(n).ok_or_else(|| err(format!("{n} elements are not whole blocks")))?;
    if data.len() != bytes {
        return Err(err(format!("{n} elements take {bytes} bytes, got {}", data.len())));
    }
    if ty == Type::F32 {
        return Ok(super::context::from_bytes_f32(data));
    }
    if !ty.can_dequantize() {
        return Err(err("ggml has no conversion to f32 for it".into()));
    }
    let mut out = vec![0f32; n];
    // SAFETY: can_dequantize checked the traits entry and its to_float function; data holds
    // exactly n elements of `ty`, out holds n floats.
    unsafe {
        let traits = &*sys::ggml_get_type_traits(ty.0 as sys::ggml_type);
        let f = traits.to_float.expect("checked by can_dequantize");
        f(data.as_ptr().cast(), out.as_mut_ptr(), n as i64);
    }
    Ok(out)
}

/// Builds a GGUF file in memory (metadata and tensors) and writes it.
pub struct GgufWriter {
    ctx: NonNull<sys::gguf_context>,
    /// Tensor data, referenced by pointer from `ctx` until the file is written.
    data: Vec<Vec<u8>>,
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // SAFETY: created by gguf_init_empty, freed once (it does not own `data`).
        unsafe { sys::gguf_free(self.ctx.as_ptr()) };
    }
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn key(k: &str) -> CString {
    CString::new(k).expect("GGUF keys contain no NUL byte")
}

impl GgufWriter {
    pub fn new() -> Self {
        // SAFETY: allocates an empty GGUF context.
        let ctx = unsafe { sys::gguf_init_empty() };
        GgufWriter {
            ctx: NonNull::new(ctx).expect("gguf_init_empty returned null"),
            data: Vec::new(),
        }
    }
    fn raw(&self) -> *mut sys::gguf_context {
        self.ctx.as_ptr()
    }

    pub fn set_str(&mut self, k: &str, v: &str) {
        let (k, v) = (key(k), CString::new(v.replace('\0', "")).unwrap_or_default());
        // SAFETY: live context; NUL-terminated strings copied by gguf.
        unsafe { sys::gguf_set_val_str(self.raw(), k.as_ptr(), v.as_ptr()) }
    }
    pub fn set_u32(&mut self, k: &str, v: u32) {
        let k = key(k);
        // SAFETY: live context; key copied by gguf.
        unsafe { sys::gguf_set_val_u32(self.raw(), k.as_ptr(), v) }
    }
    pub fn set_i32(&mut self, k: &str, v: i32) {
        let k = key(k);
        // SAFETY: live context; key copied by gguf.
        unsafe { sys::gguf_set_val_i32(self.raw(), k.as_ptr(), v) }
    }
    pub fn set_f32(&mut self, k: &str, v: f32) {
        let k = key(k);
        // SAFETY: live context; key copied by gguf.
        unsafe { sys::gguf_set_val_f32(self.raw(), k.as_ptr(), v) }
    }
    pub fn set_bool(&mut self, k: &str, v: bool) {
        let k = key(k);
        // SAFETY: live context; key copied by gguf.
        unsafe { sys::gguf_set_val_bool(self.raw(), k.as_ptr(), v) }
    }
    /// An array of bools (one byte each in GGUF).
    pub fn set_bool_array(&mut self, k: &str, v: &[bool]) {
        let k = key(k);
        let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
        // SAFETY: live context; gguf copies n elements of its BOOL type (1 byte) from the
        // buffer, which holds exactly n bytes.
        unsafe {
            sys::gguf_set_arr_data(
                self.raw(),
                k.as_ptr(),
                sys::GGUF_TYPE_BOOL,
                bytes.as_ptr().cast(),
                bytes.len(),
            )
        }
    }
    /// Removes a key if present.
    pub fn remove_key(&mut self, k: &str) {
        let k = key(k);
        // SAFETY: live context; returns -1 when the key is absent.
        unsafe { sys::gguf_remove_key(self.raw(), k.as_ptr()) };
    }

    /// Copies every metadata key of the GGUF file `path` for which `keep(key)` holds
    /// (e.g. the `tokenizer.` keys of a model), overwriting keys of the same name.
    pub fn copy_keys_from(
        &mut self,
        path: &Path,
        keep: impl Fn(&str) -> bool,
    ) -> Result<usize, GgmlError> {
        let gerr = |msg: String| GgmlError::Gguf { path: path.to_path_buf(), msg };
        // Validate (exists, magic, header) with grit's reader first, for a precise error.
        drop(crate::gguf::GgufFile::open(path).map_err(|e| gerr(e.to_string()))?);
        let cpath = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| gerr("path contains a NUL byte".into()))?;
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // SAFETY: NUL-terminated path; metadata only (no_alloc, null ctx out-pointer).
        let src = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        let src = NonNull::new(src).ok_or_else(|| gerr("ggml could not parse it".into()))?;
        // Copy everything into a scratch context, drop what is not wanted, then merge.
        // SAFETY: all contexts live for the block; gguf_set_kv deep-copies keys and values;
        // key ids stay in range because keys are removed by name after collecting them.
        let n = unsafe {
            let tmp = sys::gguf_init_empty();
            sys::gguf_set_kv(tmp, src.as_ptr());
            let keys: Vec<CString> = (0..sys::gguf_get_n_kv(tmp))
                .map(|i| std::ffi::CStr::from_ptr(sys::gguf_get_key(tmp, i)).to_owned())
                .collect();
            let mut kept = 0;
            for k in &keys {
                if keep(&k.to_string_lossy()) {
                    kept += 1;
                } else {
                    sys::gguf_remove_key(tmp, k.as_ptr());
                }
            }
            sys::gguf_set_kv(self.raw(), tmp);
            sys::gguf_free(tmp);
            sys::gguf_free(src.as_ptr());
            kept
        };
        Ok(n)
    }

    /// Adds a tensor named `name` of type `ty` and shape `ne` (ggml order) with its stored
    /// bytes `data` (already in `ty`'s format).
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: Type,
        ne: &[i64],
        data: Vec<u8>,
    ) -> Result<(), GgmlError> {
        let bad = |msg: String| GgmlError::Gguf { path: PathBuf::from("<gguf writer>"), msg };
        if name.len() >= 64 {
            return Err(bad(format!("tensor name '{name}' is longer than GGUF's 63 bytes")));
        }
        let cname = key(name);
        // SAFETY: live context; returns -1 when absent.
        if unsafe { sys::gguf_find_tensor(self.raw(), cname.as_ptr()) } >= 0 {
            return Err(bad(format!("duplicate tensor '{name}'")));
        }
        let rows: i64 = ne.iter().skip(1).product();
        let row =
            ty.row_size(ne.first().copied().unwrap_or(0).max(0) as usize).ok_or_else(|| {
                bad(format!(
                    "tensor '{name}': ne[0] of {ne:?} is not a multiple of {ty}'s block size"
                ))
            })?;
        if data.len() != row * rows as usize {
            return Err(GgmlError::Size {
                tensor: name.into(),
                expected: row * rows as usize,
                got: data.len(),
            });
        }
        // A throwaway metadata context describes the tensor; gguf copies the struct.
        let meta = Context::new(Capacity::tensors(1))?;
        let t = meta.new_tensor(ty, ne);
        t.set_name(name);
        // SAFETY: live contexts; gguf copies the tensor struct (its data pointer is null) and
        // then takes a pointer to `data`, whose heap allocation stays put inside self.data
        // until the writer is dropped.
        unsafe {
            sys::gguf_add_tensor(self.raw(), t.raw());
            sys::gguf_set_tensor_data(self.raw(), cname.as_ptr(), data.as_ptr().cast());
        }
        self.data.push(data);
        Ok(())
    }

    /// Adds an F32 tensor.
    pub fn add_f32(&mut self, name: &str, ne: &[i64], data: &[f32]) -> Result<(), GgmlError> {
        self.add_tensor(name, Type::F32, ne, data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Writes the file at `path` so that it appears complete or not at all: into a temporary
    /// sibling (checked, synced writes), re-opened and checked with grit's GGUF reader (header,
    /// every tensor inside the file), then renamed over `path` and the folder synced. On any
    /// error the temporary file is removed and an existing file at `path` is left as it was.
    pub fn write_atomic(&self, path: &Path) -> Result<(), GgmlError> {
        let gerr = |e: String| GgmlError::Gguf { path: path.to_path_buf(), msg: e };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| gerr(format!("cannot create the folder: {e}")))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let res = self.write(&tmp).and_then(|()| {
            let f = crate::gguf::GgufFile::open(&tmp)
                .map_err(|e| gerr(format!("the written file does not read back: {e}")))?;
            // SAFETY: live context.
            let n = unsafe { sys::gguf_get_n_tensors(self.raw()) } as usize;
            if f.tensors().len() != n {
                return Err(gerr(format!(
                    "the written file reads back with {} tensors, not {n}",
                    f.tensors().len()
                )));
            }
            drop(f);
            std::fs::rename(&tmp, path)
                .map_err(|e| gerr(format!("cannot rename {} into place: {e}", tmp.display())))?;
            // The rename itself is durable once the folder is synced (best effort: not every
            // file system lets a folder be opened for it).
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// Writes the file, checking every write and syncing it to disk: a full disk or an I/O
    /// error is an error here (ggml's own file writer ignores what `fclose` reports, so a
    /// full disk could leave a truncated file behind a success).
    pub fn write(&self, path: &Path) -> Result<(), GgmlError> {
        use std::io::Write;
        let gerr = |e: std::io::Error| GgmlError::Gguf {
            path: path.to_path_buf(),
            msg: format!("cannot write the GGUF file: {e}"),
        };
        // SAFETY: live context; gguf_get_meta_data writes exactly gguf_get_meta_size bytes
        // (header, metadata and tensor infos, padded to the alignment).
        let (meta, alignment, n) = unsafe {
            let mut meta = vec![0u8; sys::gguf_get_meta_size(self.raw())];
            sys::gguf_get_meta_data(self.raw(), meta.as_mut_ptr().cast());
            (meta, sys::gguf_get_alignment(self.raw()).max(1), sys::gguf_get_n_tensors(self.raw()))
        };
        assert_eq!(n as usize, self.data.len(), "one data buffer per tensor");
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(gerr)?);
        out.write_all(&meta).map_err(gerr)?;
        // Tensor data in index order, each padded to the alignment, as the offsets say.
        let mut pos = 0usize;
        for (id, data) in self.data.iter().enumerate() {
            // SAFETY: live context, id < n_tensors.
            let offset = unsafe { sys::gguf_get_tensor_offset(self.raw(), id as i64) };
            assert_eq!(offset, pos, "tensor {id}: offset {offset}, expected {pos}");
            out.write_all(data).map_err(gerr)?;
            let padded = data.len().next_multiple_of(alignment);
            out.write_all(&vec![0u8; padded - data.len()]).map_err(gerr)?;
            pos += padded;
        }
        let file = out.into_inner().map_err(|e| gerr(e.into_error()))?;
        file.sync_all().map_err(gerr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(v: f32) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.add_f32("a", &[3, 2], &[v; 6]).unwrap();
        w.add_f32("b", &[5], &[v; 5]).unwrap();
        w
    }

    /// The written file reads back with ggml's reader: same tensors, offsets and bytes.
    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        sample(1.5).write_atomic(&p).unwrap();
        let f = crate::gguf::GgufFile::open(&p).unwrap();
        assert_eq!(f.tensors().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let bytes = std::fs::read(&p).unwrap();
        let b = &f.tensors()[1];
        let at = (f.data_offset() + b.offset) as usize;
        assert_eq!(&bytes[at..at + 4], &1.5f32.to_le_bytes());
        assert_eq!(bytes.len() % 32, 0, "the data section ends padded");
        assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    /// A full disk is an error (ggml's own writer reported success), and a failed write
    /// leaves the previous file as it was.
    #[test]
    fn a_failed_write_fails_and_keeps_the_old_file() {
        #[cfg(target_os = "linux")]
        {
            let err = sample(1.0).write(Path::new("/dev/full")).unwrap_err().to_string();
            assert!(err.contains("No space left"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        sample(1.0).write_atomic(&p).unwrap();
        let before = std::fs::read(&p).unwrap();
        // Inject a write error: the temporary file's name is taken by a folder.
        std::fs::create_dir(dir.path().join(format!(".x.gguf.{}.tmp", std::process::id())))
            .unwrap();
        assert!(sample(2.0).write_atomic(&p).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn quantize_round_trip() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        for ty in [Type::F16, Type::Q8_0, Type::Q4_0, Type::Q4_1] {
            let q = quantize(ty, &x, 32).unwrap();
            let y = dequantize(ty, &q, 64).unwrap();
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 0.15, "{ty}: max error {err}");
        }
        assert!(quantize(Type::Q4_K, &x, 64).is_err());
    }

    #[test]
    fn writes_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.set_str("general.architecture", "llama");
        w.set_f32("x.alpha", 2.5);
        w.add_f32("a.weight", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]).unwrap();
        assert!(w.add_f32("a.weight", &[1], &[0.]).is_err());
        assert!(w.add_f32("b", &[3], &[0.]).is_err());
        w.write(&path).unwrap();
        let f = crate::gguf::GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_f64("x.alpha").unwrap(), 2.5);
        let t = f.tensor("a.weight").unwrap();
        assert_eq!(t.ne, [4, 2, 1, 1]);
    }
}
