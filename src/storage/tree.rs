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

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::durable::{Ledger, PieceStore, SyncFailed, Synced, Written};
use super::files::{
    cstr, cvt, fstatat_nofollow, fsync_fd, id_of, open_dir_at, open_dirs, open_file_at, unlink_at,
    Working, PARTS_DIR,
};
use super::mmap::{Storage, StorageError};
use crate::metainfo::{Hash, Metainfo};
use crate::store::FileId;

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
    watch: Option<Watch>,
}

/// The working files a download writes, by entry: after each sync, every file it covered
/// must still be the recorded one (as one file's working file is checked before each
/// commit), or the bytes just synced may belong to a file that is gone.
struct Watch {
    out_dir: PathBuf,
    hash: Hash,
    ids: Vec<Option<FileId>>,
}

impl Watch {
    /// The path of the first of `entries` whose working file is no longer the recorded one.
    fn first_replaced(&self, entries: &[usize]) -> Option<String> {
        let mut watched = entries
            .iter()
            .filter_map(|&i| self.ids[i].map(|id| (i, id)))
            .peekable();
        let first = watched.peek()?.0;
        let path = |i| {
            self.out_dir
                .join(PARTS_DIR)
                .join(working_name(&self.hash, i))
                .display()
                .to_string()
        };
        let Ok(d) = open_dirs(&self.out_dir, false) else {
            return Some(path(first));
        };
        for (i, want) in watched {
            let ours = open_file_at(
                &d.parts,
                working_name(&self.hash, i).as_bytes(),
                libc::O_RDONLY,
            )
            .is_ok_and(|f| {
                f.metadata().is_ok_and(|m| m.is_file())
                    && id_of(&f).is_ok_and(|id| id.is_same_file(&want))
            });
            if !ours {
                return Some(path(i));
            }
        }
        None
    }
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
            watch: None,
        }
    }

    /// Check after each sync that the working files it covered are still the ones recorded
    /// in `ids` (by entry; `None`: a placed file, not watched), in `out_dir`'s parts dir.
    pub fn watch_working(mut self, out_dir: &Path, hash: &Hash, ids: Vec<Option<FileId>>) -> Self {
        assert_eq!(ids.len(), self.parts.len());
        self.watch = Some(Watch {
            out_dir: out_dir.to_path_buf(),
            hash: *hash,
            ids,
        });
        self
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
        let mut synced = Vec::new();
        let token = self.ledger.sync_with(|| {
            crate::testhook::fault_point("data-sync")?;
            synced = (0..self.parts.len())
                .filter(|&i| self.parts[i].is_some() && self.dirty[i].swap(false, Ordering::SeqCst))
                .collect();
            let dirty: Vec<&Storage> = synced
                .iter()
                .filter_map(|&i| self.parts[i].as_ref())
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
        })?;
        // After the sync, before the token is used: the bytes just synced must still be the
        // files the download will place. One that is gone poisons the store for good.
        if let Some(path) = self.watch.as_ref().and_then(|w| w.first_replaced(&synced)) {
            return Err(self.ledger.poison_replaced(path));
        }
        Ok(token)
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
    let Some(f) = open_final_any(out_dir, root, path)? else {
        return Ok(None);
    };
    let mut shown = out_dir.join(root);
    shown.extend(path);
    super::files::check_complete(f, shown.display().to_string(), length).map(Some)
}

/// [`open_final`] whatever its kind and length (for offline tools that report them).
///
/// # Errors
/// A symlink or non-folder on the way, or I/O errors.
pub fn open_final_any(
    out_dir: &Path,
    root: &str,
    path: &[String],
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
    match open_file_at(&parent, last.as_bytes(), libc::O_RDONLY) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(classify(e, shown)),
    }
}

/// Open working file `index` of tree `hash` (read-only, or read-write with `write`) for the
/// offline tools, never through a symlink, with its identity. `Ok(None)` if it (or the parts
/// dir) is not there.
///
/// # Errors
/// A symlink at its name or the parts dir's, or I/O errors.
pub fn open_working_file(
    out_dir: &Path,
    hash: &Hash,
    index: usize,
    write: bool,
) -> Result<Option<(File, FileId)>, StorageError> {
    let d = match open_dirs(out_dir, false) {
        Ok(d) => d,
        Err(StorageError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let name = working_name(hash, index);
    let p = out_dir.join(PARTS_DIR).join(&name).display().to_string();
    let flags = if write { libc::O_RDWR } else { libc::O_RDONLY };
    match open_file_at(&d.parts, name.as_bytes(), flags) {
        Ok(f) => {
            let id = id_of(&f).map_err(|e| classify(e, p))?;
            Ok(Some((f, id)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(classify(e, p)),
    }
}

/// A tree's parts dir, opened once for all its files (opening a 10,000-file tree walked to
/// it twice per file), and created only when a working file is.
pub struct PartsDir {
    out_dir: PathBuf,
    dirs: Option<super::files::Dirs>,
}

impl PartsDir {
    /// Open the parts dir of `out_dir` if it is there, never through a symlink.
    ///
    /// # Errors
    /// A symlink on the way, or I/O errors.
    pub fn open(out_dir: &Path) -> Result<PartsDir, StorageError> {
        let dirs = match open_dirs(out_dir, false) {
            Ok(d) => Some(d),
            Err(StorageError::Missing { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(PartsDir {
            out_dir: out_dir.to_path_buf(),
            dirs,
        })
    }

    /// Whether working file `index` of tree `hash` is there.
    pub fn exists(&self, hash: &Hash, index: usize) -> bool {
        self.dirs.as_ref().is_some_and(|d| {
            fstatat_nofollow(&d.parts, working_name(hash, index).as_bytes()).is_ok()
        })
    }

    /// [`super::files::open_working_named`] for working file `index` of tree `hash` (the
    /// parts dir created if needed), without syncing the dir: the caller does, once, with
    /// [`sync_parts_dir`].
    ///
    /// # Errors
    /// As [`super::files::open_working_named`].
    pub fn open_working(
        &mut self,
        hash: &Hash,
        index: usize,
        length: u64,
        recorded: Option<FileId>,
    ) -> Result<Working, StorageError> {
        if self.dirs.is_none() {
            self.dirs = Some(open_dirs(&self.out_dir, true)?);
        }
        let dirs = self.dirs.as_ref().expect("just opened");
        let name = working_name(hash, index);
        super::files::open_working_at(dirs, &self.out_dir, &name, length, recorded, false)
    }
}

/// Whether working file `index` of tree `hash` exists in `out_dir`'s parts dir.
pub fn working_exists(out_dir: &Path, hash: &Hash, index: usize) -> bool {
    open_dirs(out_dir, false)
        .ok()
        .is_some_and(|d| fstatat_nofollow(&d.parts, working_name(hash, index).as_bytes()).is_ok())
}

/// Most folder descriptors a [`Placer`] keeps open; past it, the touched ones are fsynced and
/// all are closed (a tree may have 100,000 folders, more than a process may open).
const PLACER_OPEN_DIRS: usize = 256;

/// Places a tree's finished entries below `out_dir/root` in one pass: each folder is walked
/// (never through a symlink) and opened once, every rename and creation is done first, then
/// [`Placer::finish`] fsyncs each touched folder once and the parts dir once. (Per file, two
/// fsyncs, each its own journal commit, made placing 10,000 small files take tens of
/// seconds.) Nothing counts as placed before `finish` returns: a cut before it leaves each
/// file under its working name or its final name, and a restart handles both.
pub struct Placer {
    out_dir: PathBuf,
    root: String,
    out: Option<OwnedFd>,
    parts: Option<OwnedFd>,
    /// Open folders by their components below `out_dir` (`[root, ...]`).
    dirs: HashMap<Vec<String>, OwnedFd>,
    /// Folders (keys of `dirs`) whose entries changed since they were last fsynced.
    touched: HashSet<Vec<String>>,
    out_touched: bool,
    parts_touched: bool,
}

impl Placer {
    pub fn new(out_dir: &Path, root: &str) -> Placer {
        Placer {
            out_dir: out_dir.to_path_buf(),
            root: root.to_string(),
            out: None,
            parts: None,
            dirs: HashMap::new(),
            touched: HashSet::new(),
            out_touched: false,
            parts_touched: false,
        }
    }

    fn shown(&self, comps: &[String]) -> String {
        let mut p = self.out_dir.clone();
        p.extend(comps);
        p.display().to_string()
    }

    fn out_fd(&mut self) -> Result<libc::c_int, StorageError> {
        if self.out.is_none() {
            let fd = open_dir_at(None, self.out_dir.as_os_str().as_encoded_bytes())
                .map_err(|e| classify(e, self.out_dir.display().to_string()))?;
            self.out = Some(fd);
        }
        Ok(self.out.as_ref().expect("just opened").as_raw_fd())
    }

    fn parts_fd(&mut self) -> Result<libc::c_int, StorageError> {
        if self.parts.is_none() {
            self.parts = Some(open_dirs(&self.out_dir, false)?.parts);
        }
        Ok(self.parts.as_ref().expect("just opened").as_raw_fd())
    }

    /// fsync every touched folder, then close them all.
    fn sync_dirs(&mut self) -> Result<(), StorageError> {
        for key in std::mem::take(&mut self.touched) {
            let fd = self.dirs.get(&key).expect("touched folders stay open");
            fsync_fd(fd).map_err(|e| classify(e, self.shown(&key)))?;
        }
        self.dirs.clear();
        Ok(())
    }

    /// The descriptor of folder `chain` (`[root, dirs...]`), walked from the nearest open
    /// ancestor with `O_NOFOLLOW` and created as needed (its parent then counts as touched).
    fn dir(&mut self, chain: &[String]) -> Result<libc::c_int, StorageError> {
        self.walk(chain, true)
    }

    /// [`Placer::dir`] without creating anything (`Missing` if a folder is not there).
    fn dir_existing(&mut self, chain: &[String]) -> Result<libc::c_int, StorageError> {
        self.walk(chain, false)
    }

    fn walk(&mut self, chain: &[String], create: bool) -> Result<libc::c_int, StorageError> {
        if let Some(fd) = self.dirs.get(chain) {
            return Ok(fd.as_raw_fd());
        }
        if self.dirs.len() + chain.len() > PLACER_OPEN_DIRS {
            self.sync_dirs()?;
        }
        let mut k = chain.len();
        while k > 0 && !self.dirs.contains_key(&chain[..k]) {
            k -= 1;
        }
        let mut parent = if k == 0 {
            self.out_fd()?
        } else {
            self.dirs[&chain[..k]].as_raw_fd()
        };
        for upto in k..chain.len() {
            let p = self.shown(&chain[..=upto]);
            let name = cstr(chain[upto].as_bytes()).map_err(|e| classify(e, p.clone()))?;
            if create {
                // SAFETY: a plain syscall with a valid C string and an open directory
                // descriptor.
                if unsafe { libc::mkdirat(parent, name.as_ptr(), 0o755) } == 0 {
                    // The new folder's name is made durable by its parent's fsync in `finish`.
                    if upto == 0 {
                        self.out_touched = true;
                    } else {
                        self.touched.insert(chain[..upto].to_vec());
                    }
                } else {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(classify(e, p));
                    }
                }
            }
            // SAFETY: as above; the result is checked and owned at once.
            let fd = cvt(unsafe {
                libc::openat(
                    parent,
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            })
            .map_err(|e| classify(e, p))?;
            // SAFETY: `fd` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            parent = fd.as_raw_fd();
            self.dirs.insert(chain[..=upto].to_vec(), fd);
        }
        Ok(parent)
    }

    fn chain(&self, dirs: &[String]) -> Vec<String> {
        std::iter::once(self.root.clone())
            .chain(dirs.iter().cloned())
            .collect()
    }

    /// Whether working file `index` of tree `hash` is in the parts dir.
    pub fn working_exists(&mut self, hash: &Hash, index: usize) -> bool {
        let Ok(parts) = self.parts_fd() else {
            return false;
        };
        let Ok(name) = cstr(working_name(hash, index).as_bytes()) else {
            return false;
        };
        // SAFETY: `st` is written by the kernel before it is read; the result is checked.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstatat(parts, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) == 0
        }
    }

    /// Whether finished entry `index` still has its working file, and it is `want` (not
    /// deleted or replaced behind our back): `Ok(true)` to place it, `Ok(false)` if it was
    /// placed by an earlier, interrupted run (no working file, a regular final file there).
    ///
    /// # Errors
    /// [`StorageError::Replaced`], or a symlink on the way.
    pub fn check_working(
        &mut self,
        hash: &Hash,
        index: usize,
        path: &[String],
        want: FileId,
    ) -> Result<bool, StorageError> {
        let name = working_name(hash, index);
        let wpath = self
            .out_dir
            .join(PARTS_DIR)
            .join(&name)
            .display()
            .to_string();
        let replaced = || StorageError::Replaced {
            path: wpath.clone(),
        };
        let parts = self.parts_fd()?;
        let c = cstr(name.as_bytes()).map_err(|_| replaced())?;
        // SAFETY: a plain syscall with a valid C string; the result is owned at once.
        let fd = unsafe {
            libc::openat(
                parts,
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            let gone = io::Error::last_os_error().kind() == io::ErrorKind::NotFound;
            if gone && self.is_final(path)? {
                return Ok(false);
            }
            return Err(replaced());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        let ours = f.metadata().is_ok_and(|m| m.is_file())
            && id_of(&f).is_ok_and(|id| id.is_same_file(&want));
        if ours {
            Ok(true)
        } else {
            Err(replaced())
        }
    }

    /// Whether `path` is placed: a regular file at its final name.
    fn is_final(&mut self, path: &[String]) -> Result<bool, StorageError> {
        let (dirs, last) = split(path);
        let chain = self.chain(dirs);
        let parent = match self.dir_existing(&chain) {
            Ok(fd) => fd,
            Err(StorageError::Missing { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Ok(to) = cstr(last.as_bytes()) else {
            return Ok(false);
        };
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is written by the kernel before it is read.
        let rc = unsafe { libc::fstatat(parent, to.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        Ok(rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG)
    }

    /// Rename finished entry `index` into place (never replacing anything). A file already
    /// placed by an earlier, interrupted run (working file gone, final file there) is fine.
    /// Check the working file first with [`Placer::check_working`] when it was recorded.
    ///
    /// # Errors
    /// The final name exists (`AlreadyExists`), a symlink on the way, or I/O errors.
    pub fn place_file(
        &mut self,
        hash: &Hash,
        index: usize,
        path: &[String],
    ) -> Result<(), StorageError> {
        let (dirs, last) = split(path);
        let chain = self.chain(dirs);
        let mut full = chain.clone();
        full.push(last.to_string());
        let shown = self.shown(&full);
        let name = working_name(hash, index);
        let parts = self.parts_fd()?;
        let parent = self.dir(&chain)?;
        let io_err = |e| classify(e, shown.clone());
        let from = cstr(name.as_bytes()).map_err(io_err)?;
        let to = cstr(last.as_bytes()).map_err(io_err)?;
        // SAFETY: a plain syscall with valid C strings and our directory descriptors.
        let rc = cvt(unsafe {
            libc::renameat2(
                parts,
                from.as_ptr(),
                parent,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        });
        if let Err(e) = rc {
            if !(e.kind() == io::ErrorKind::NotFound && self.is_final(path)?) {
                return Err(io_err(e));
            }
        }
        self.touched.insert(chain);
        self.parts_touched = true;
        Ok(())
    }

    /// Create an empty file or an empty folder. One already there of the right kind (and
    /// empty, for a file) is fine; anything else is `AlreadyExists`.
    ///
    /// # Errors
    /// As [`Placer::place_file`].
    pub fn place_empty(&mut self, path: &[String], dir: bool) -> Result<(), StorageError> {
        let (dirs, last) = split(path);
        let chain = self.chain(dirs);
        let mut full = chain.clone();
        full.push(last.to_string());
        let shown = self.shown(&full);
        let parent = self.dir(&chain)?;
        let io_err = |e| classify(e, shown.clone());
        let name = cstr(last.as_bytes()).map_err(io_err)?;
        let made = if dir {
            // SAFETY: a plain syscall with a valid C string and our directory descriptor.
            cvt(unsafe { libc::mkdirat(parent, name.as_ptr(), 0o755) }).map(|_| ())
        } else {
            // SAFETY: as above; the descriptor is closed at once.
            cvt(unsafe {
                libc::openat(
                    parent,
                    name.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC
                        | libc::O_NONBLOCK,
                    0o644 as libc::c_uint,
                )
            })
            .map(|fd| {
                // SAFETY: `fd` is a fresh descriptor we own.
                drop(unsafe { OwnedFd::from_raw_fd(fd) })
            })
        };
        if let Err(e) = made {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `st` is written by the kernel before it is read.
            let rc =
                unsafe { libc::fstatat(parent, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
            let kind = st.st_mode & libc::S_IFMT;
            let fine = e.kind() == io::ErrorKind::AlreadyExists
                && rc == 0
                && if dir {
                    kind == libc::S_IFDIR
                } else {
                    kind == libc::S_IFREG && st.st_size == 0
                };
            if !fine {
                return Err(io_err(e));
            }
        }
        self.touched.insert(chain);
        Ok(())
    }

    /// Make every rename and creation durable: each touched folder, the output dir if the
    /// tree's folder was created, then the parts dir.
    ///
    /// # Errors
    /// An fsync failed.
    pub fn finish(mut self) -> Result<(), StorageError> {
        self.sync_dirs()?;
        if self.out_touched {
            let fd = self.out.as_ref().expect("opened to create the root");
            fsync_fd(fd).map_err(|e| classify(e, self.out_dir.display().to_string()))?;
        }
        if self.parts_touched {
            let fd = self.parts.as_ref().expect("opened to rename from it");
            fsync_fd(fd)
                .map_err(|e| classify(e, self.out_dir.join(PARTS_DIR).display().to_string()))?;
        }
        Ok(())
    }
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
