//! A folder tree's data: one working file per data file, a piece store over all of them,
//! and placing finished files into the tree.
//!
//! - Working files are `OUT/.shoal-parts/<64 hex info hash>-<entry index>.part`: the same
//!   parts dir and rules as one file's (see [`super::files`]); a tree's names never equal a
//!   single file's `<hex>.part`, and entry indices make them distinct within a tree.
//! - Pieces are aligned to files ([`crate::tree`]), so each piece lies in one file, and
//!   [`TreeStorage`] is a [`Storage`] per file behind one ledger: a sync fsyncs every file
//!   written since the last one, and only then is the token minted. So a piece's bit is set
//!   only after the file it touches is durable, as for one file.
//! - Every path below `OUT/NAME` is walked from directory descriptors with `O_NOFOLLOW`: a
//!   symlink (or a file) where a folder should be stops the walk with an error, so nothing is
//!   ever created or renamed through one. Folders are created as needed (each new entry
//!   fsynced in its parent), and a finished file is renamed in with `RENAME_NOREPLACE`, so it
//!   is never visible under its final name before all its pieces are verified and synced, and
//!   it never replaces anything.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::durable::{Ledger, PieceStore, SyncFailed, Synced, Written};
use super::files::{
    cstr, cvt, fstatat_nofollow, fsync_fd, id_of, open_dir_at, open_dirs, open_file_at, unlink_at,
    Working, PARTS_DIR,
};
use super::mmap::{Storage, StorageError};
use crate::metainfo::{Hash, Metainfo};

/// Above this many files written since the last sync, one `syncfs` replaces a `fdatasync` per
/// file (every fdatasync of a newly written extent waits for its own journal commit).
const SYNCFS_FROM_FILES: usize = 8;

/// The working file name of entry `index` of tree `hash`.
pub fn working_name(hash: &Hash, index: usize) -> String {
    format!("{}-{index}.part", hex::encode(hash))
}

/// The pieces of a tree, over one [`Storage`] per opened file (`None`: an entry that is
/// empty, a folder, or not opened because it is not selected).
pub struct TreeStorage {
    firsts: Vec<u32>,
    parts: Vec<Option<Storage>>,
    dirty: Vec<AtomicBool>,
    ledger: Ledger,
    /// Syncs one at a time: a dirty flag cleared by one sync is covered by that sync's fsync
    /// before another may mint a token.
    sync_lock: Mutex<()>,
}

impl TreeStorage {
    /// # Panics
    /// `parts` does not have one slot per entry of `meta` (a bug).
    pub fn new(meta: &Metainfo, parts: Vec<Option<Storage>>) -> TreeStorage {
        assert_eq!(parts.len(), meta.files.len());
        TreeStorage {
            firsts: meta.files.iter().map(|f| f.first_piece).collect(),
            dirty: parts.iter().map(|_| AtomicBool::new(false)).collect(),
            parts,
            ledger: Ledger::default(),
            sync_lock: Mutex::new(()),
        }
    }

    /// Whether entry `f` is open (its pieces can be read and written).
    pub fn is_open(&self, f: usize) -> bool {
        self.parts[f].is_some()
    }

    fn at(&self, index: u32) -> (usize, &Storage, u32) {
        // The last entry starting at or before `index` holds it (an empty entry starts where
        // the next one does, so it is never the last such). Pieces of entries not opened are
        // never asked for: their bits are never set, and the picker skips them.
        let f = self.firsts.partition_point(|&first| first <= index) - 1;
        let s = self.parts[f].as_ref().expect("piece of an open file");
        (f, s, index - self.firsts[f])
    }
}

impl PieceStore for TreeStorage {
    fn write_piece(&self, index: u32, data: &[u8]) -> Written {
        let (f, s, local) = self.at(index);
        s.write_piece(local, data);
        // Dirty before the receipt: a sync that covers the receipt sees the flag.
        self.dirty[f].store(true, Ordering::SeqCst);
        self.ledger.receipt(index)
    }

    fn sync(&self) -> Result<Synced, SyncFailed> {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.ledger.sync_with(|| {
            crate::testhook::fault_point("data-sync")?;
            let dirty: Vec<&Storage> = self
                .dirty
                .iter()
                .zip(&self.parts)
                .filter_map(|(d, s)| s.as_ref().filter(|_| d.swap(false, Ordering::SeqCst)))
                .collect();
            if dirty.len() > SYNCFS_FROM_FILES {
                // Many small files: one syncfs (one journal commit, and it reports writeback
                // errors of the file system) instead of one fdatasync, and commit, per file.
                return dirty[0].sync_fs();
            }
            for s in dirty {
                s.sync_raw()?;
            }
            Ok(())
        })
    }

    fn piece(&self, index: u32) -> &[u8] {
        let (_, s, local) = self.at(index);
        s.piece(local)
    }

    fn data(&self) -> &[u8] {
        // A tree has no one contiguous file; nothing hashes a tree this way.
        &[]
    }

    fn prefetch(&self, index: u32) {
        let (_, s, local) = self.at(index);
        s.prefetch(local);
    }

    fn prefetch_exact(&self, index: u32) {
        let (_, s, local) = self.at(index);
        s.prefetch_exact(local);
    }

    fn release(&self, index: u32) {
        let (_, s, local) = self.at(index);
        s.release(local);
    }
}

/// Open (or create, when `create`) the folder `root` in `out_dir` and the folders of `dirs`
/// below it, never through a symlink.
fn walk_dirs(
    out_dir: &Path,
    root: &str,
    dirs: &[String],
    create: bool,
) -> Result<OwnedFd, StorageError> {
    let shown = |upto: usize| {
        let mut p = out_dir.join(root);
        p.extend(&dirs[..upto]);
        p.display().to_string()
    };
    let out = open_dir_at(None, out_dir.as_os_str().as_encoded_bytes())
        .map_err(|e| classify(e, out_dir.display().to_string()))?;
    let mut fd = out;
    for (i, c) in std::iter::once(root)
        .chain(dirs.iter().map(String::as_str))
        .enumerate()
    {
        let p = shown(i);
        if create {
            let name = cstr(c.as_bytes()).map_err(|e| classify(e, p.clone()))?;
            // SAFETY: a plain syscall with a valid C string and our directory descriptor.
            let rc = unsafe { libc::mkdirat(fd.as_raw_fd(), name.as_ptr(), 0o755) };
            if rc == 0 {
                // The new folder must survive a power cut before anything in it counts.
                fsync_fd(&fd).map_err(|e| classify(e, p.clone()))?;
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(classify(e, p));
                }
            }
        }
        fd = open_dir_at(Some(&fd), c.as_bytes()).map_err(|e| classify(e, p))?;
    }
    Ok(fd)
}

fn classify(e: io::Error, path: String) -> StorageError {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => StorageError::Unsafe {
            path,
            reason: "it is a symlink or not a directory; shoal does not follow it".into(),
        },
        Some(libc::ENOENT) => StorageError::Missing { path },
        _ => StorageError::Io { path, source: e },
    }
}

fn split(path: &[String]) -> (&[String], &str) {
    let (last, dirs) = path.split_last().expect("paths are checked non-empty");
    (dirs, last)
}

/// Open the finished file `path` below `out_dir/root` read-only. `Ok(None)` if it (or a
/// folder on its way) is not there.
///
/// # Errors
/// A symlink or non-folder on the way, a non-regular file, a file shorter than `length`.
pub fn open_final(
    out_dir: &Path,
    root: &str,
    path: &[String],
    length: u64,
) -> Result<Option<File>, StorageError> {
    let (dirs, last) = split(path);
    let shown = {
        let mut p = out_dir.join(root);
        p.extend(path);
        p.display().to_string()
    };
    let parent = match walk_dirs(out_dir, root, dirs, false) {
        Ok(fd) => fd,
        Err(StorageError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let f = match open_file_at(&parent, last.as_bytes(), libc::O_RDONLY) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(classify(e, shown)),
    };
    super::files::check_complete(f, shown, length).map(Some)
}

/// Whether working file `index` of tree `hash` exists in `out_dir`'s parts dir.
pub fn working_exists(out_dir: &Path, hash: &Hash, index: usize) -> bool {
    open_dirs(out_dir, false)
        .ok()
        .is_some_and(|d| fstatat_nofollow(&d.parts, working_name(hash, index).as_bytes()).is_ok())
}

/// Move finished entry `index` into place below `out_dir/root` (creating its folders, never
/// replacing anything), durably. A file already placed by an earlier, interrupted run (its
/// working file gone, the final file there) is fine.
///
/// # Errors
/// The final name exists (`AlreadyExists`), a symlink on the way, or I/O errors.
pub fn place_file(
    out_dir: &Path,
    hash: &Hash,
    index: usize,
    root: &str,
    path: &[String],
) -> Result<(), StorageError> {
    let (dirs, last) = split(path);
    let d = open_dirs(out_dir, false)?;
    let parent = walk_dirs(out_dir, root, dirs, true)?;
    let shown = {
        let mut p = out_dir.join(root);
        p.extend(path);
        p.display().to_string()
    };
    let io_err = |e| classify(e, shown.clone());
    let from = cstr(working_name(hash, index).as_bytes()).map_err(io_err)?;
    let to = cstr(last.as_bytes()).map_err(io_err)?;
    // SAFETY: a plain syscall with valid C strings and our directory descriptors.
    let rc = cvt(unsafe {
        libc::renameat2(
            d.parts.as_raw_fd(),
            from.as_ptr(),
            parent.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    });
    if let Err(e) = rc {
        let placed = e.kind() == io::ErrorKind::NotFound
            && fstatat_nofollow(&parent, last.as_bytes())
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if !placed {
            return Err(io_err(e));
        }
    }
    fsync_fd(&parent).map_err(io_err)?;
    fsync_fd(&d.parts).map_err(io_err)?;
    Ok(())
}

/// Create an empty file or an empty folder below `out_dir/root`. One already there of the
/// right kind (and empty, for a file) is fine; anything else is `AlreadyExists`.
///
/// # Errors
/// As [`place_file`].
pub fn place_empty(
    out_dir: &Path,
    root: &str,
    path: &[String],
    dir: bool,
) -> Result<(), StorageError> {
    let (dirs, last) = split(path);
    let parent = walk_dirs(out_dir, root, dirs, true)?;
    let shown = {
        let mut p = out_dir.join(root);
        p.extend(path);
        p.display().to_string()
    };
    let io_err = |e| classify(e, shown.clone());
    let name = cstr(last.as_bytes()).map_err(io_err)?;
    let made = if dir {
        // SAFETY: a plain syscall with a valid C string and our directory descriptor.
        cvt(unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) }).map(|_| ())
    } else {
        open_file_at(
            &parent,
            last.as_bytes(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        )
        .map(drop)
    };
    if let Err(e) = made {
        let fine = e.kind() == io::ErrorKind::AlreadyExists
            && fstatat_nofollow(&parent, last.as_bytes()).is_ok_and(|st| {
                let kind = st.st_mode & libc::S_IFMT;
                if dir {
                    kind == libc::S_IFDIR
                } else {
                    kind == libc::S_IFREG && st.st_size == 0
                }
            });
        if !fine {
            return Err(io_err(e));
        }
    }
    fsync_fd(&parent).map_err(io_err)?;
    Ok(())
}

/// Take a damaged finished file back as entry `index`'s working file (never replacing
/// anything), so its good pieces are kept.
///
/// # Errors
/// Unsafe or missing directories, or I/O errors.
pub fn adopt_final(
    out_dir: &Path,
    hash: &Hash,
    index: usize,
    root: &str,
    path: &[String],
) -> Result<Working, StorageError> {
    let (dirs, last) = split(path);
    let d = open_dirs(out_dir, true)?;
    let parent = walk_dirs(out_dir, root, dirs, false)?;
    let name = working_name(hash, index);
    let p = out_dir.join(PARTS_DIR).join(&name).display().to_string();
    let io_err = |e| classify(e, p.clone());
    match unlink_at(&d.parts, name.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let from = cstr(last.as_bytes()).map_err(io_err)?;
    let to = cstr(name.as_bytes()).map_err(io_err)?;
    // SAFETY: a plain syscall with valid C strings and our directory descriptors.
    cvt(unsafe {
        libc::renameat2(
            parent.as_raw_fd(),
            from.as_ptr(),
            d.parts.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
    .map_err(io_err)?;
    fsync_fd(&d.parts).map_err(io_err)?;
    fsync_fd(&parent).map_err(io_err)?;
    let file = open_file_at(&d.parts, name.as_bytes(), libc::O_RDWR).map_err(io_err)?;
    if !file.metadata().map_err(io_err)?.file_type().is_file() {
        return Err(StorageError::Unsafe {
            path: p,
            reason: "not a regular file".into(),
        });
    }
    let id = id_of(&file).map_err(io_err)?;
    Ok(Working {
        file,
        id,
        note: None,
        lost_from: None,
    })
}

/// Remove every working file of tree `hash` (and the parts dir when it is then empty).
/// Returns how many were removed.
///
/// # Errors
/// I/O errors other than "already gone".
pub fn remove_working(out_dir: &Path, hash: &Hash) -> io::Result<usize> {
    let Ok(d) = open_dirs(out_dir, false) else {
        return Ok(0);
    };
    let prefix = format!("{}-", hex::encode(hash));
    let mut n = 0;
    for e in std::fs::read_dir(out_dir.join(PARTS_DIR))? {
        let e = e?;
        let name = e.file_name();
        let Some(s) = name.to_str() else { continue };
        if s.starts_with(&prefix) && s.ends_with(".part") {
            match unlink_at(&d.parts, s.as_bytes()) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    let c = cstr(PARTS_DIR.as_bytes())?;
    // SAFETY: a plain syscall; failing (other downloads still there) is expected and fine.
    unsafe { libc::unlinkat(d.out.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
    Ok(n)
}

/// Make the parts dir's entries durable (one fsync after creating many working files, before
/// any bit is set for their contents).
///
/// # Errors
/// The dir cannot be opened or synced.
pub fn sync_parts_dir(out_dir: &Path) -> Result<(), StorageError> {
    let d = open_dirs(out_dir, false)?;
    fsync_fd(&d.parts).map_err(|e| classify(e, out_dir.join(PARTS_DIR).display().to_string()))
}

/// Remove the parts dir of `out_dir` if nothing is left in it (best effort).
pub fn remove_parts_dir_if_empty(out_dir: &Path) {
    if let (Ok(d), Ok(c)) = (open_dirs(out_dir, false), cstr(PARTS_DIR.as_bytes())) {
        // SAFETY: a plain syscall; failing (not empty) is expected and fine.
        unsafe { libc::unlinkat(d.out.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
    }
}

/// Check that nothing below `out_dir/root` is in the way of a tree: every folder on every
/// entry's way is a real folder (or absent), and no entry's final name is taken.
///
/// # Errors
/// A message naming the first path in the way.
pub fn check_clear(out_dir: &Path, meta: &Metainfo, selected: &[bool]) -> Result<(), String> {
    for (f, _) in meta.files.iter().zip(selected).filter(|(_, s)| **s) {
        let (dirs, last) = split(&f.path);
        let parent = match walk_dirs(out_dir, &meta.name, dirs, false) {
            Ok(fd) => fd,
            Err(StorageError::Missing { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        };
        if fstatat_nofollow(&parent, last.as_bytes()).is_ok() {
            let mut p = out_dir.join(&meta.name);
            p.extend(&f.path);
            return Err(format!(
                "{} already exists; shoal will not overwrite it",
                p.display()
            ));
        }
    }
    Ok(())
}
