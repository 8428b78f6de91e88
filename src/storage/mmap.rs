//! Piece I/O through memory maps. All `unsafe` of shoal lives here.
//!
//! A data file is mapped once, whole (address space is cheap on 64-bit), and pieces are
//! copied in and out of the map. Resident memory stays bounded whatever the file size: after a
//! piece is written or served, its range is dropped from this process with
//! `madvise(MADV_DONTNEED)`. On a shared file mapping that only unmaps the pages: dirty data
//! stays in the page cache (the kernel carries the dirty bit over) and reaches the disk with
//! the next [`Storage::sync`] or writeback. libtorrent 2.0 users saw a whole file counted as
//! resident; this is the remedy.
//!
//! # Safety
//! A memory map is only sound while nobody else changes the file's length under it (a shrink
//! turns accesses into SIGBUS) or writes the bytes being read. shoal owns its `.part` files;
//! a seeded file is the user's, and the daemon checks its length at start. Within shoal, a
//! piece is written only while it is not yet verified, and read (served, hashed) only after, so
//! readers and the writer of a piece never overlap.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use memmap2::{Mmap, MmapOptions, MmapRaw};

use super::durable::{Ledger, PieceStore, SyncFailed, Synced, Written};

/// Map a whole file read-only (for hashing).
///
/// # Errors
/// The file cannot be mapped.
pub fn map_read_only(file: &File) -> io::Result<Mmap> {
    // SAFETY: see the module doc; the caller hashes a file it was just asked to read, and a
    // concurrent change would at worst produce hashes that fail verification later.
    let map = unsafe { MmapOptions::new().map(file)? };
    // Sequential read-ahead; a failure only costs speed.
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

pub struct Storage {
    file: File,
    map: MmapRaw,
    length: u64,
    piece_length: u32,
    /// Numbers writes and mints sync tokens (see [`super::durable`]).
    ledger: Ledger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create (or reuse) a `.part` file, extended to full length.
    CreateOrReuse,
    /// The file must exist with at least the full length; it is never written.
    ExistingReadOnly,
    /// The file must exist with at least the full length; pieces may be written.
    ExistingWritable,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path} is missing")]
    Missing { path: String },
    #[error("{path} is {found} bytes, shorter than the {expected} bytes the descriptor says")]
    TooShort {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("not enough disk space for {path}: it needs {needed} bytes, {free} are free")]
    NoSpace {
        path: String,
        needed: u64,
        free: u64,
    },
    #[error("{path} is unsafe to use: {reason}")]
    Unsafe { path: String, reason: String },
    /// A working file is not the one the download wrote (deleted, or another file put there).
    #[error("the working file {path} was deleted or replaced during the download")]
    Replaced { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl Storage {
    /// Open the data file of a torrent.
    ///
    /// # Errors
    /// Missing or short files (for the existing modes), and I/O errors, each naming the path.
    pub fn open(
        path: &Path,
        length: u64,
        piece_length: u32,
        mode: OpenMode,
    ) -> Result<Storage, StorageError> {
        let p = path.display().to_string();
        let io = |source| StorageError::Io {
            path: p.clone(),
            source,
        };
        let file = match mode {
            OpenMode::CreateOrReuse => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(io)?;
                let len = f.metadata().map_err(io)?.len();
                if len < length {
                    f.set_len(length).map_err(io)?;
                }
                super::files::reserve(&f, length).map_err(|source| {
                    if source.raw_os_error() == Some(libc::ENOSPC) {
                        StorageError::NoSpace {
                            path: p.clone(),
                            needed: length,
                            free: super::files::free_space(path.parent().unwrap_or(Path::new(".")))
                                .unwrap_or(0),
                        }
                    } else {
                        io(source)
                    }
                })?;
                f
            }
            OpenMode::ExistingReadOnly | OpenMode::ExistingWritable => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(mode == OpenMode::ExistingWritable)
                    .open(path)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::NotFound {
                            StorageError::Missing { path: p.clone() }
                        } else {
                            io(e)
                        }
                    })?;
                let found = f.metadata().map_err(io)?.len();
                if found < length {
                    return Err(StorageError::TooShort {
                        path: p.clone(),
                        found,
                        expected: length,
                    });
                }
                f
            }
        };
        Storage::from_file(
            file,
            length,
            piece_length,
            mode != OpenMode::ExistingReadOnly,
        )
        .map_err(io)
    }

    /// Map an already opened file of at least `length` bytes (see [`super::files`] for how
    /// the daemon opens them).
    ///
    /// # Errors
    /// The map cannot be made.
    pub fn from_file(
        file: File,
        length: u64,
        piece_length: u32,
        writable: bool,
    ) -> io::Result<Storage> {
        let mut opts = MmapOptions::new();
        opts.len(length as usize);
        let map = if writable {
            opts.map_raw(&file)
        } else {
            opts.map_raw_read_only(&file)
        }?;
        // Writable maps keep the default read-ahead: a write fault then zero-fills a batch of
        // neighbouring pages at once, which the picker's order (random within a window of
        // equally rare pieces) soon overwrites. Measured on 1 GiB downloads, leecher CPU 2.42 s
        // against 2.58 s with MADV_RANDOM. In strictly sequential order read-ahead would grow
        // into large folios and cost 2-3x more, but the picker never writes that way.
        Ok(Storage {
            file,
            map,
            length,
            piece_length,
            ledger: Ledger::default(),
        })
    }

    fn range(&self, index: u32) -> (usize, usize) {
        let start = u64::from(index) * u64::from(self.piece_length);
        assert!(start < self.length, "piece {index} out of range");
        let end = (start + u64::from(self.piece_length)).min(self.length);
        (start as usize, end as usize)
    }

    /// The whole mapped file.
    pub fn data(&self) -> &[u8] {
        // SAFETY: the map is `length` bytes and lives as long as `self`; per the module doc no
        // write to a piece happens while it is read.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.length as usize) }
    }

    /// The bytes of piece `index`, in the map.
    ///
    /// # Panics
    /// `index` past the end (a bug: indices are checked at the protocol edge).
    pub fn piece(&self, index: u32) -> &[u8] {
        let (start, end) = self.range(index);
        // SAFETY: the range is inside the map (checked by `range`), the map lives as long as
        // `self`, and per the module doc no write to this piece happens while it is read.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), end - start) }
    }

    /// Copy a verified piece into the map, then drop its pages from this process. The daemon
    /// writes through [`PieceStore::write_piece`], which also hands out the receipt.
    ///
    /// # Panics
    /// Wrong length or index (a bug: both are checked before hashing).
    pub fn write_piece(&self, index: u32, data: &[u8]) {
        let (start, end) = self.range(index);
        assert_eq!(
            data.len(),
            end - start,
            "piece {index} has the wrong length"
        );
        // SAFETY: the range is inside a writable map (ExistingReadOnly maps are never given
        // pieces to write: the daemon only writes torrents it is downloading), and per the
        // module doc nobody reads a piece while it is being written.
        unsafe {
            let dst = self.map.as_mut_ptr().add(start);
            // Fault the whole range in with one call instead of one trap per page.
            advise(dst, data.len(), libc::MADV_POPULATE_WRITE);
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        }
        self.release(index);
    }

    /// Drop piece `index`'s pages from this process's resident set; the page cache keeps them.
    pub fn release(&self, index: u32) {
        let (start, end) = self.range(index);
        // SAFETY: the range is inside our shared file mapping (checked by `range`).
        unsafe {
            advise(
                self.map.as_ptr().add(start),
                end - start,
                libc::MADV_DONTNEED,
            )
        };
    }

    /// Read piece `index` exactly, without read-ahead around it (a spot check of a few pieces
    /// must not pull megabytes of the file in).
    pub fn prefetch_exact(&self, index: u32) {
        let (start, end) = self.range(index);
        // SAFETY: the range is inside our mapping; these are hints and a populate read.
        unsafe {
            let p = self.map.as_ptr().add(start);
            advise(p, end - start, libc::MADV_RANDOM);
            advise(p, end - start, libc::MADV_POPULATE_READ);
            advise(p, end - start, libc::MADV_NORMAL);
        }
    }

    /// Map piece `index`'s pages in one call before reading them (one syscall instead of a
    /// page fault per few pages).
    pub fn prefetch(&self, index: u32) {
        let (start, end) = self.range(index);
        // SAFETY: the range is inside our mapping; populating only reads the file.
        unsafe {
            advise(
                self.map.as_ptr().add(start),
                end - start,
                libc::MADV_POPULATE_READ,
            )
        };
    }

    /// Make every piece written so far durable (fdatasync). Prefer [`PieceStore::sync`],
    /// whose token is what lets bits be set; this one is for files nobody keeps bits of.
    ///
    /// # Errors
    /// The kernel reports a write-back failure (disk full, I/O error).
    pub fn sync_raw(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Make every dirty page of the whole file system holding this file durable (`syncfs`),
    /// reporting write-back errors of that file system (Linux 5.8 and later).
    ///
    /// # Errors
    /// The kernel reports a write-back failure.
    pub fn sync_fs(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on our own descriptor.
        if unsafe { libc::syncfs(self.file.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Start writing pieces `[from, to)` back to the disk without waiting for it, so that the
    /// next [`Storage::sync`] has less to do. Purely a hint: a failure only costs speed, and
    /// [`Storage::sync`] is still what makes data durable.
    pub fn start_writeback(&self, from: u32, to: u32) {
        use std::os::fd::AsRawFd;
        let start = (u64::from(from) * u64::from(self.piece_length)).min(self.length);
        let end = (u64::from(to) * u64::from(self.piece_length)).min(self.length);
        if start >= end {
            return;
        }
        // SAFETY: a plain syscall on our own descriptor.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as libc::off64_t,
                (end - start) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
}

impl PieceStore for Storage {
    fn write_piece(&self, index: u32, data: &[u8]) -> Written {
        Storage::write_piece(self, index, data);
        // Numbered after the copy: a token minted later covers these bytes.
        self.ledger.receipt(index)
    }

    fn sync(&self) -> Result<Synced, SyncFailed> {
        self.ledger.sync_with(|| {
            crate::testhook::fault_point("data-sync")?;
            self.file.sync_data()
        })
    }

    fn piece(&self, index: u32) -> &[u8] {
        Storage::piece(self, index)
    }

    fn data(&self) -> &[u8] {
        Storage::data(self)
    }

    fn prefetch(&self, index: u32) {
        Storage::prefetch(self, index);
    }

    fn prefetch_exact(&self, index: u32) {
        Storage::prefetch_exact(self, index);
    }

    fn release(&self, index: u32) {
        Storage::release(self, index);
    }

    fn start_writeback(&self, from: u32, to: u32) {
        Storage::start_writeback(self, from, to);
    }
}

/// Release a range of any mapping of ours from the resident set (see [`Storage::release`]).
pub fn release_mapped(data: &[u8]) {
    // SAFETY: `data` is a live borrow, so the range is mapped; DONTNEED on a file mapping only
    // drops our page table entries.
    unsafe { advise(data.as_ptr(), data.len(), libc::MADV_DONTNEED) };
}

/// Populate a range of any mapping of ours before reading it.
pub fn prefetch_mapped(data: &[u8]) {
    // SAFETY: `data` is a live borrow of mapped memory; populating only reads the file.
    unsafe { advise(data.as_ptr(), data.len(), libc::MADV_POPULATE_READ) };
}

/// madvise over the whole pages inside `[ptr, ptr + len)`. Advice is a hint: a failure (an
/// older kernel without MADV_POPULATE_*) costs speed, never correctness, so it is ignored.
///
/// # Safety
/// The range must lie inside one live mapping of this process.
unsafe fn advise(ptr: *const u8, len: usize, advice: libc::c_int) {
    let page = page_size();
    let base = ptr as usize;
    let lo = base.next_multiple_of(page);
    let hi = (base + len) / page * page;
    if hi > lo {
        // SAFETY: [lo, hi) is inside the caller's mapping, page aligned.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, advice) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_read_back_what_it_wrote_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.part");
        let s = Storage::open(&path, 100_000, 16384, OpenMode::CreateOrReuse).unwrap();
        let last = vec![9u8; 100_000 - 6 * 16384];
        s.write_piece(6, &last);
        s.write_piece(0, &[1u8; 16384]);
        s.sync_raw().unwrap();
        assert_eq!(s.piece(6), &last[..]);
        assert!(s.piece(0).iter().all(|&b| b == 1));
        drop(s);
        let s = Storage::open(&path, 100_000, 16384, OpenMode::ExistingReadOnly).unwrap();
        assert!(s.piece(0).iter().all(|&b| b == 1));
        let e = Storage::open(&path, 200_000, 16384, OpenMode::ExistingReadOnly)
            .err()
            .unwrap();
        assert!(matches!(e, StorageError::TooShort { .. }));
    }

    #[test]
    fn it_should_keep_every_byte_when_writeback_starts_early_over_a_short_last_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.part");
        let (len, pl) = (5 * 65536 + 1234, 65536u32);
        let s = Storage::open(&path, len, pl, OpenMode::CreateOrReuse).unwrap();
        let expected: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        for (i, chunk) in expected.chunks(pl as usize).enumerate().rev() {
            s.write_piece(i as u32, chunk);
            // Ranges past the end and empty ranges are clamped, not errors.
            s.start_writeback(i as u32, 6);
        }
        s.start_writeback(3, 3);
        s.start_writeback(7, 9);
        s.start_writeback(4, 2);
        s.sync_raw().unwrap();
        drop(s);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }
}
