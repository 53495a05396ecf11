//! Crash-safe small-file replacement shared by the flash journal and the boot state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The temporary name a new version of `path` is written under before the rename.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Step 1 of an atomic replace: write `bytes` to the temporary file and fsync it.
/// A crash after this step leaves `path` itself untouched.
pub(crate) fn write_tmp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Step 2: rename the temporary file over `path`, then fsync the directory so the rename
/// itself is durable.
pub(crate) fn commit_tmp(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::rename(tmp, path)?;
    sync_dir(path)
}

/// Writes `bytes` to `path` so that a reader sees either the old or the new content, never a
/// mix, even across a power cut.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_tmp(path, bytes)?;
    commit_tmp(&tmp, path)
}

/// Removes `path` (if present) durably.
pub(crate) fn remove_durably(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
