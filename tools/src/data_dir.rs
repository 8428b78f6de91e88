//! Opening a stopped peer's data dir: check it is a store, take the daemon's lock, and for
//! the read-only commands open a private copy of the store.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use shoal::store::{Store, STORE_DIR};

/// The data dir's lock, released by the kernel when the process ends.
pub(crate) struct DirLock(#[allow(dead_code)] File);

/// Take the lock a running daemon holds (`flock` on `daemon.lock`), or say who holds it.
pub(crate) fn lock(dir: &Path) -> anyhow::Result<DirLock> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = dir.join(shoal::daemon::LOCK_NAME);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another shoal process (pid {}) is already running on {}: a daemon (stop it first: \
             `shoal peer stop --data-dir {}`) or another shoal-tools; nothing was changed",
            pid.trim(),
            dir.display(),
            dir.display()
        );
    }
    // Our pid, so whoever meets the lock next is told who holds it (the file is the lock,
    // not part of the store).
    f.set_len(0)?;
    f.write_all(std::process::id().to_string().as_bytes())?;
    Ok(DirLock(f))
}

/// Where the sled files are: `store/`, or `store.old/` left by an interrupted compaction.
pub(crate) fn store_source(dir: &Path) -> anyhow::Result<PathBuf> {
    for name in [STORE_DIR.to_owned(), format!("{STORE_DIR}.old")] {
        if dir.join(&name).join("conf").is_file() {
            return Ok(dir.join(name));
        }
    }
    bail!(
        "{} is not a shoal data directory (no {STORE_DIR}/ inside); nothing was changed",
        dir.display()
    )
}

/// Check DIR is a store, lock it, open it for writing.
pub(crate) fn open(dir: &Path) -> anyhow::Result<(DirLock, Store)> {
    store_source(dir)?;
    let lock = lock(dir)?;
    let store = Store::open(dir, false)?;
    Ok((lock, store))
}

/// A store opened from a private copy: what the read-only commands use.
pub(crate) struct ReadOnly {
    pub(crate) store: Store,
    /// The real store directory, for messages.
    pub(crate) path: PathBuf,
    _lock: DirLock,
    _copy: tempfile::TempDir,
}

/// Check DIR is a store, lock it (so no daemon changes it while it is copied), copy its
/// sled files to a private temporary directory (mode 0700) and open the copy.
pub(crate) fn open_read_only(dir: &Path) -> anyhow::Result<ReadOnly> {
    let src = store_source(dir)?;
    let lock = lock(dir)?;
    let copy = tempfile::Builder::new()
        .prefix("shoal-tools-")
        .tempdir()
        .context("cannot make a temporary directory for the store's copy")?;
    copy_tree(&src, &copy.path().join(STORE_DIR))
        .with_context(|| format!("cannot copy {}", src.display()))?;
    let store = Store::open(copy.path(), false)?;
    Ok(ReadOnly {
        store,
        path: src,
        _lock: lock,
        _copy: copy,
    })
}

/// Copy directories and regular files only: sled makes no links, so a symlink in a store is
/// something we did not create, and it is refused rather than followed.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            bail!("{} is not a regular file or directory", src.display());
        }
    }
    Ok(())
}
