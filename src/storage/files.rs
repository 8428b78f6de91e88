//! Opening data files so that nobody can trick the daemon.
//!
//! - A download's working file is `OUT/.shoal-parts/<64 hex info hash>.part`. A final name
//!   is one path component, so no torrent's final name can be another's working name, and two
//!   torrents never share a working name (the registry has one owner per info hash).
//! - Every open is relative to a directory descriptor and uses `O_NOFOLLOW`: a symlink planted
//!   at a working name is removed, never followed; a symlinked `.shoal-parts` or final file is
//!   refused.
//! - A working file is trusted only if it is the one recorded (device, inode). Anything else
//!   found there (a stale file of another length, a file someone put there) is replaced, with
//!   a note. A recorded file of the wrong length is cut or extended to `length`.
//! - The final rename never replaces anything (`renameat2(RENAME_NOREPLACE)`), and both
//!   directories are fsynced after it.
//! - A reservation that fails on a full disk gives back what it took (a file we created is
//!   removed), and the error says how much is needed and how much is free.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::mmap::StorageError;
use crate::metainfo::Hash;
use crate::store::FileId;

/// The directory, inside an output dir, that holds working files.
pub const PARTS_DIR: &str = ".shoal-parts";

/// Where the working file of a download into `out_dir` lives.
pub fn working_path(out_dir: &Path, hash: &Hash) -> PathBuf {
    out_dir.join(PARTS_DIR).join(working_name(hash))
}

fn working_name(hash: &Hash) -> String {
    format!("{}.part", hex::encode(hash))
}

pub(super) fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

pub(super) fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Open a directory without following a symlink at its last component.
pub(super) fn open_dir_at(parent: Option<&OwnedFd>, name: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let dirfd = parent.map_or(libc::AT_FDCWD, |p| p.as_raw_fd());
    // SAFETY: a plain syscall with a valid C string; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn fsync_fd(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(|_| ())
}

pub(super) fn fstatat_nofollow(dir: &OwnedFd, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: `st` is written by the kernel before we read it; the result is checked.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
        Ok(st)
    }
}

pub(super) fn unlink_at(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: a plain syscall with a valid C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
}

pub(super) fn open_file_at(dir: &OwnedFd, name: &[u8], flags: libc::c_int) -> io::Result<File> {
    let c = cstr(name)?;
    // SAFETY: a plain syscall with a valid C string; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
            0o600 as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

pub(super) fn id_of(f: &File) -> io::Result<FileId> {
    let m = f.metadata()?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        gen: generation(f),
    })
}

/// The inode generation (`FS_IOC_GETVERSION`: ext4, xfs, btrfs, tmpfs have one); 0 where the
/// file system has none, leaving (device, inode) alone to tell files apart.
fn generation(f: &File) -> u64 {
    const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;
    let mut v: libc::c_long = 0;
    // SAFETY: the ioctl writes one long into `v`, which outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETVERSION, &mut v) };
    if rc == 0 {
        v as u64
    } else {
        0
    }
}

fn same_file(a: &FileId, b: &FileId) -> bool {
    a.is_same_file(b)
}

/// Bytes free for us in the file system holding `dir`.
pub fn free_space(dir: &Path) -> Option<u64> {
    let c = cstr(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `st` is written by the kernel before we read it.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st) == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// The output dir and its parts dir, opened without following symlinks.
pub(super) struct Dirs {
    pub(super) out: OwnedFd,
    pub(super) parts: OwnedFd,
}

/// What opening directory `path` without following symlinks failed with.
fn dir_error(path: String, e: io::Error) -> StorageError {
    if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
        StorageError::Unsafe {
            path,
            reason: "it is a symlink or not a directory; shoal does not follow it".into(),
        }
    } else if e.kind() == io::ErrorKind::NotFound {
        StorageError::Missing { path }
    } else {
        StorageError::Io { path, source: e }
    }
}

pub(super) fn open_dirs(out_dir: &Path, create_parts: bool) -> Result<Dirs, StorageError> {
    let out = open_dir_at(None, out_dir.as_os_str().as_bytes())
        .map_err(|e| dir_error(out_dir.display().to_string(), e))?;
    let pp = out_dir.join(PARTS_DIR).display().to_string();
    let io_err = |source| StorageError::Io {
        path: pp.clone(),
        source,
    };
    if create_parts {
        let c = cstr(PARTS_DIR.as_bytes()).map_err(io_err)?;
        // SAFETY: a plain syscall with a valid C string.
        let rc = unsafe { libc::mkdirat(out.as_raw_fd(), c.as_ptr(), 0o700) };
        if rc == 0 {
            fsync_fd(&out).map_err(io_err)?;
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io_err(e));
            }
        }
    }
    let parts =
        open_dir_at(Some(&out), PARTS_DIR.as_bytes()).map_err(|e| dir_error(pp.clone(), e))?;
    Ok(Dirs { out, parts })
}

/// An opened working file.
pub struct Working {
    pub file: File,
    pub id: FileId,
    /// Why the file found there was not trusted (for `status`).
    pub note: Option<String>,
    /// The recorded file was shorter than it should be: pieces from this offset on are gone.
    pub lost_from: Option<u64>,
}

/// Open (or create) the working file of a download of `length` bytes into `out_dir`,
/// trusting what is there only if it is `recorded`.
///
/// # Errors
/// The output dir is missing, a symlink, or unusable; the disk is full (after giving back
/// what the reservation took); other I/O errors. Each names the path.
pub fn open_working(
    out_dir: &Path,
    hash: &Hash,
    length: u64,
    recorded: Option<FileId>,
) -> Result<Working, StorageError> {
    open_working_named(out_dir, &working_name(hash), length, recorded, true)
}

/// [`open_working`] for the working file `name` in the parts dir (a tree has one per file).
/// Without `sync_dir` the caller fsyncs the parts dir itself (once for many files) before
/// any bit is set for the new files' contents.
///
/// # Errors
/// As [`open_working`].
pub fn open_working_named(
    out_dir: &Path,
    name: &str,
    length: u64,
    recorded: Option<FileId>,
    sync_dir: bool,
) -> Result<Working, StorageError> {
    let dirs = open_dirs(out_dir, true)?;
    open_working_at(&dirs, out_dir, name, length, recorded, sync_dir)
}

/// [`open_working_named`] in parts dir `dirs` already open (a tree opens many files there).
pub(super) fn open_working_at(
    dirs: &Dirs,
    out_dir: &Path,
    name: &str,
    length: u64,
    recorded: Option<FileId>,
    sync_dir: bool,
) -> Result<Working, StorageError> {
    let path = out_dir.join(PARTS_DIR).join(name);
    let p = path.display().to_string();
    let io_err = |source| StorageError::Io {
        path: p.clone(),
        source,
    };
    let mut note = None;
    let mut lost_from = None;
    let existing = match fstatat_nofollow(&dirs.parts, name.as_bytes()) {
        Ok(st) => Some(st),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let mut reuse = None;
    if let Some(st) = existing {
        let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if is_file {
            if let Some(r) = recorded {
                let f = open_file_at(&dirs.parts, name.as_bytes(), libc::O_RDWR).map_err(io_err)?;
                let id = id_of(&f).map_err(io_err)?;
                if same_file(&id, &r) {
                    reuse = Some(f);
                }
            }
        }
        if reuse.is_none() {
            let what = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                "a symlink"
            } else if !is_file {
                "not a regular file"
            } else if recorded.is_none() {
                "a file this download did not create"
            } else {
                "not the file this download created"
            };
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(StorageError::Unsafe {
                    path: p.clone(),
                    reason: "a directory is in the way of the working file".into(),
                });
            }
            unlink_at(&dirs.parts, name.as_bytes()).map_err(io_err)?;
            note = Some(format!(
                "{p} was {what}; it was replaced, not trusted, and its pieces are fetched again"
            ));
        }
    } else if recorded.is_some() {
        note = Some(format!(
            "{p} disappeared since the last run; its pieces are fetched again"
        ));
    }
    let (file, created) = match reuse {
        Some(f) => (f, false),
        None => (
            open_file_at(
                &dirs.parts,
                name.as_bytes(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            )
            .map_err(io_err)?,
            true,
        ),
    };
    let found = file.metadata().map_err(io_err)?.len();
    if found != length {
        if !created && found < length {
            lost_from = Some(found);
        }
        file.set_len(length).map_err(io_err)?;
    }
    if let Err(e) = reserve(&file, length) {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            // fallocate keeps the blocks it took before failing: give them back.
            if created {
                let _ = unlink_at(&dirs.parts, name.as_bytes()); // Best effort: we created it.
            } else {
                let _ = file.set_len(found.min(length)); // Cut what we just extended.
            }
            drop(file);
            return Err(StorageError::NoSpace {
                path: p.clone(),
                needed: length,
                free: free_space(out_dir).unwrap_or(0),
            });
        }
        return Err(io_err(e));
    }
    if created && sync_dir {
        // The new name must survive a power cut before any bit is set for its contents.
        fsync_fd(&dirs.parts).map_err(io_err)?;
    }
    let id = id_of(&file).map_err(io_err)?;
    Ok(Working {
        file,
        id,
        note,
        lost_from,
    })
}

/// Whether the working file is still the one we write (not deleted or replaced).
pub fn working_is(out_dir: &Path, hash: &Hash, id: &FileId) -> io::Result<bool> {
    let dirs = match open_dirs(out_dir, false) {
        Ok(d) => d,
        Err(StorageError::Missing { .. } | StorageError::Unsafe { .. }) => return Ok(false),
        Err(e) => return Err(io::Error::other(e.to_string())),
    };
    match open_file_at(&dirs.parts, working_name(hash).as_bytes(), libc::O_RDONLY) {
        Ok(f) => Ok(f.metadata()?.file_type().is_file() && same_file(&id_of(&f)?, id)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove a download's working file (and its parts dir when it is then empty).
///
/// # Errors
/// I/O errors other than "already gone".
pub fn remove_working(out_dir: &Path, hash: &Hash) -> io::Result<bool> {
    let Ok(dirs) = open_dirs(out_dir, false) else {
        return Ok(false);
    };
    let removed = match unlink_at(&dirs.parts, working_name(hash).as_bytes()) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let c = cstr(PARTS_DIR.as_bytes())?;
    // SAFETY: a plain syscall; failing (not empty) is expected and fine.
    unsafe { libc::unlinkat(dirs.out.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
    Ok(removed)
}

/// Move a finished download to its final name, never replacing anything, durably.
///
/// # Errors
/// The final name exists (`AlreadyExists`), or I/O errors.
pub fn finish_rename(out_dir: &Path, hash: &Hash, final_name: &str) -> io::Result<()> {
    let dirs = open_dirs(out_dir, false).map_err(io::Error::other)?;
    let from = cstr(working_name(hash).as_bytes())?;
    let to = cstr(final_name.as_bytes())?;
    // SAFETY: a plain syscall with valid C strings and our directory descriptors.
    cvt(unsafe {
        libc::renameat2(
            dirs.parts.as_raw_fd(),
            from.as_ptr(),
            dirs.out.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })?;
    fsync_fd(&dirs.out)?;
    fsync_fd(&dirs.parts)?;
    let c = cstr(PARTS_DIR.as_bytes())?;
    // SAFETY: a plain syscall; failing (other downloads still there) is expected and fine.
    unsafe { libc::unlinkat(dirs.out.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
    Ok(())
}

/// Take a damaged finished file back as the download's working file (never replacing
/// anything), so the recheck's good pieces are kept and only the bad ones fetched again.
///
/// # Errors
/// Unsafe or missing directories, or I/O errors.
pub fn adopt_final(out_dir: &Path, hash: &Hash, final_name: &str) -> Result<Working, StorageError> {
    let dirs = open_dirs(out_dir, true)?;
    let name = working_name(hash);
    let p = working_path(out_dir, hash).display().to_string();
    let io_err = |source| StorageError::Io {
        path: p.clone(),
        source,
    };
    match unlink_at(&dirs.parts, name.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let from = cstr(final_name.as_bytes()).map_err(io_err)?;
    let to = cstr(name.as_bytes()).map_err(io_err)?;
    // SAFETY: a plain syscall with valid C strings and our directory descriptors.
    cvt(unsafe {
        libc::renameat2(
            dirs.out.as_raw_fd(),
            from.as_ptr(),
            dirs.parts.as_raw_fd(),
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
    .map_err(io_err)?;
    fsync_fd(&dirs.parts).map_err(io_err)?;
    fsync_fd(&dirs.out).map_err(io_err)?;
    let file = open_file_at(&dirs.parts, name.as_bytes(), libc::O_RDWR).map_err(io_err)?;
    if !file.metadata().map_err(io_err)?.file_type().is_file() {
        return Err(StorageError::Unsafe {
            path: p.clone(),
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

/// Open a complete file (a seed, or a finished download) read-only without following a
/// symlink at its last component.
///
/// # Errors
/// Missing, a symlink, not a regular file, or shorter than `length`; each names the path.
pub fn open_complete(path: &Path, length: u64) -> Result<File, StorageError> {
    let p = path.display().to_string();
    let c = cstr(path.as_os_str().as_bytes()).map_err(|source| StorageError::Io {
        path: p.clone(),
        source,
    })?;
    // SAFETY: a plain syscall with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOENT) => StorageError::Missing { path: p },
            Some(libc::ELOOP) => StorageError::Unsafe {
                path: p,
                reason: "it is a symlink; shoal does not follow it".into(),
            },
            _ => StorageError::Io { path: p, source: e },
        });
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    check_complete(unsafe { File::from_raw_fd(fd) }, p, length)
}

/// An opened complete file must be a regular file of at least `length` bytes.
///
/// # Errors
/// Not a regular file, too short, or not examinable; each names `path`.
pub(super) fn check_complete(f: File, path: String, length: u64) -> Result<File, StorageError> {
    let m = f.metadata().map_err(|source| StorageError::Io {
        path: path.clone(),
        source,
    })?;
    if !m.file_type().is_file() {
        return Err(StorageError::Unsafe {
            path,
            reason: "not a regular file".into(),
        });
    }
    if m.len() < length {
        return Err(StorageError::TooShort {
            path,
            found: m.len(),
            expected: length,
        });
    }
    Ok(f)
}

/// Reserve the file's blocks up front. Writing through a map into a sparse file on a full disk
/// is a SIGBUS, not an error: reserving turns it into ENOSPC at the start, with nothing lost.
/// Filesystems without fallocate keep the sparse file (and the risk), with a warning.
pub(super) fn reserve(f: &File, length: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(length).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate on a descriptor we own; mode 0 only allocates, keeping the contents.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            tracing::warn!(cause = %e, "cannot reserve disk space; a full disk would stop the download abruptly");
            Ok(())
        }
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_replace_a_symlink_at_the_working_name_without_touching_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let h = [3u8; 32];
        std::fs::create_dir(dir.path().join(PARTS_DIR)).unwrap();
        std::os::unix::fs::symlink(&victim, working_path(dir.path(), &h)).unwrap();
        let w = open_working(dir.path(), &h, 4096, None).unwrap();
        assert!(w.note.unwrap().contains("a symlink"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(working_path(dir.path(), &h))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn it_should_trust_only_the_recorded_file_and_fix_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let h = [4u8; 32];
        let w = open_working(dir.path(), &h, 10_000, None).unwrap();
        assert!(w.note.is_none());
        let id = w.id;
        drop(w);
        // The recorded file, made longer behind our back: cut to length and kept.
        std::fs::OpenOptions::new()
            .write(true)
            .open(working_path(dir.path(), &h))
            .unwrap()
            .set_len(20_000)
            .unwrap();
        let w = open_working(dir.path(), &h, 10_000, Some(id)).unwrap();
        assert!(w.note.is_none());
        assert_eq!(w.file.metadata().unwrap().len(), 10_000);
        assert!(same_file(&w.id, &id));
        drop(w);
        // Another file at the same name is not trusted.
        std::fs::remove_file(working_path(dir.path(), &h)).unwrap();
        std::fs::write(working_path(dir.path(), &h), vec![7u8; 10_000]).unwrap();
        let w = open_working(dir.path(), &h, 10_000, Some(id)).unwrap();
        assert!(w.note.unwrap().contains("not the file"));
        assert!(std::fs::read(working_path(dir.path(), &h))
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn it_should_refuse_to_replace_an_existing_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let h = [5u8; 32];
        let w = open_working(dir.path(), &h, 100, None).unwrap();
        drop(w);
        std::fs::write(dir.path().join("v"), b"other").unwrap();
        let e = finish_rename(dir.path(), &h, "v").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), b"other");
        std::fs::remove_file(dir.path().join("v")).unwrap();
        finish_rename(dir.path(), &h, "v").unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("v")).unwrap().len(), 100);
        assert!(
            !dir.path().join(PARTS_DIR).exists(),
            "empty parts dir removed"
        );
    }

    #[test]
    fn it_should_refuse_a_symlinked_seed_and_parts_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        assert!(matches!(
            open_complete(&dir.path().join("link"), 1),
            Err(StorageError::Unsafe { .. })
        ));
        let other = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(other.path(), dir.path().join(PARTS_DIR)).unwrap();
        assert!(matches!(
            open_working(dir.path(), &[1u8; 32], 10, None),
            Err(StorageError::Unsafe { .. })
        ));
        assert_eq!(std::fs::read_dir(other.path()).unwrap().count(), 0);
    }
}
