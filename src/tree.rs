//! Folder trees (descriptor format 2): the file list, its checks, its piece layout, and
//! `create` of a directory.
//!
//! Pieces are aligned to files (as in BitTorrent v2): each non-empty file starts a new piece,
//! and its last piece may be short. So a piece always lies in exactly one file, which keeps
//! the durability rule of [`crate::storage::durable`] per file ("a piece's bit only after its
//! file is synced"), lets a file be verified, finished and renamed on its own, and makes
//! selective download a matter of skipping whole pieces. The cost is at most one short piece
//! per file on the wire; the pieces list is file 0's pieces, then file 1's, and so on.
//!
//! Every path from a descriptor is checked before anything else sees it (see
//! [`check_files`]): a path is a list of plain components (no empty, `.`, `..`, `/`, `\`,
//! NUL or control characters), bounded in depth and length, and no two paths may be equal up
//! to case or Unicode normalization (they would be one file on common file systems), nor may
//! a file be the parent directory of another entry.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::metainfo::{Hash, HashProgress, Metainfo, MetainfoError};

/// At most this many entries (files and empty directories) in a tree.
pub const MAX_FILES: usize = 100_000;
/// At most this many components in a path.
pub const MAX_DEPTH: usize = 32;
/// At most this many bytes in one component (the common file-system limit).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// At most this many bytes in a whole path (components joined by `/`).
pub const MAX_PATH_BYTES: usize = 4096;

/// One entry of a tree as written in the descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileJson {
    /// The path below the tree's folder, one string per component.
    pub path: Vec<String>,
    pub length: u64,
    /// An empty directory (length 0); files are `false` and leave it out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dir: bool,
}

/// A checked entry, with its pieces: `first_piece .. first_piece + piece_count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    pub path: Vec<String>,
    pub length: u64,
    pub dir: bool,
    pub first_piece: u32,
    pub piece_count: u32,
}

impl TreeFile {
    pub fn to_json(&self) -> FileJson {
        FileJson {
            path: self.path.clone(),
            length: self.length,
            dir: self.dir,
        }
    }

    /// The path joined with `/`, for display and for `--only` globs.
    pub fn display(&self) -> String {
        self.path.join("/")
    }

    /// The path below `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        p.extend(&self.path);
        p
    }
}

fn field(reason: impl Into<String>) -> MetainfoError {
    MetainfoError::Field {
        field: "files",
        reason: reason.into(),
    }
}

/// Check one path component.
fn check_component(c: &str, at: &str) -> Result<(), MetainfoError> {
    if c.is_empty() {
        return Err(field(format!(
            "{at}: an empty component (or an absolute path)"
        )));
    }
    if c.len() > MAX_COMPONENT_BYTES {
        return Err(field(format!(
            "{at}: a component longer than {MAX_COMPONENT_BYTES} bytes"
        )));
    }
    if c == "." || c == ".." {
        return Err(field(format!("{at}: the component {c:?} is not allowed")));
    }
    if c.contains('/') || c.contains('\\') {
        return Err(field(format!(
            "{at}: component {c:?} contains a path separator"
        )));
    }
    if c.chars().any(|ch| ch == '\0' || ch.is_control()) {
        return Err(field(format!(
            "{at}: a component contains NUL or a control character"
        )));
    }
    Ok(())
}

/// The key under which two paths collide on common file systems: Unicode-normalized
/// (NFC, after decomposing) and case-folded.
fn fold(s: &str) -> String {
    s.nfd().collect::<String>().to_lowercase().nfc().collect()
}

/// Check the file list of a format 2 descriptor and lay out its pieces.
///
/// # Errors
/// A [`MetainfoError::Field`] naming `files` (or `length`) and the first bad entry.
pub fn check_files(
    files: &[FileJson],
    length: u64,
    piece_length: u32,
) -> Result<Vec<TreeFile>, MetainfoError> {
    if files.is_empty() {
        return Err(field("is empty; a tree has at least one entry"));
    }
    if files.len() > MAX_FILES {
        return Err(field(format!(
            "has {} entries, over the limit of {MAX_FILES}",
            files.len()
        )));
    }
    let mut out = Vec::with_capacity(files.len());
    let mut seen: HashSet<String> = HashSet::with_capacity(files.len());
    let mut parents: HashSet<String> = HashSet::new();
    let mut total: u64 = 0;
    let mut next_piece: u64 = 0;
    for (i, f) in files.iter().enumerate() {
        let at = format!("entry {i}");
        if f.path.is_empty() {
            return Err(field(format!("{at}: an empty path")));
        }
        if f.path.len() > MAX_DEPTH {
            return Err(field(format!(
                "{at}: {} components, deeper than {MAX_DEPTH}",
                f.path.len()
            )));
        }
        for c in &f.path {
            check_component(c, &at)?;
        }
        let joined = f.path.join("/");
        if joined.len() > MAX_PATH_BYTES {
            return Err(field(format!("{at}: longer than {MAX_PATH_BYTES} bytes")));
        }
        if f.dir && f.length != 0 {
            return Err(field(format!(
                "{at} ({joined:?}): a directory with a length"
            )));
        }
        let key = fold(&joined);
        if !seen.insert(key) {
            return Err(field(format!(
                "{at} ({joined:?}): equal to an earlier path up to case or Unicode normalization"
            )));
        }
        let mut prefix = String::new();
        for c in &f.path[..f.path.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(&fold(c));
            parents.insert(prefix.clone());
        }
        total = total
            .checked_add(f.length)
            .ok_or_else(|| field("lengths overflow"))?;
        let count = f.length.div_ceil(u64::from(piece_length));
        let first = next_piece;
        next_piece += count;
        if next_piece > u64::from(u32::MAX) {
            return Err(field("too many pieces"));
        }
        out.push(TreeFile {
            path: f.path.clone(),
            length: f.length,
            dir: f.dir,
            first_piece: first as u32,
            piece_count: count as u32,
        });
    }
    // A file (or an empty directory) cannot also be the folder of another entry.
    for (i, f) in out.iter().enumerate() {
        if parents.contains(&fold(&f.display())) {
            return Err(field(format!(
                "entry {i} ({:?}): also the folder of another entry",
                f.display()
            )));
        }
    }
    if total != length {
        return Err(MetainfoError::Field {
            field: "length",
            reason: format!("is {length} but the files add up to {total}"),
        });
    }
    Ok(out)
}

/// The info hash of a tree: SHA-256 over this encoding (integers big-endian):
/// `"shoal-info-v2\0"`, u32 name length, name (UTF-8), u64 total length, u32 piece length,
/// u32 entry count, then per entry: u8 kind (0 file, 1 empty directory), u32 component
/// count, per component u32 byte length and the bytes (UTF-8), u64 length; then u32 piece
/// count, each piece hash (32 bytes), the content hash (32 bytes).
pub fn info_hash(m: &Metainfo, tag: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(tag);
    h.update((m.name.len() as u32).to_be_bytes());
    h.update(m.name.as_bytes());
    h.update(m.length.to_be_bytes());
    h.update(m.piece_length.to_be_bytes());
    h.update((m.files.len() as u32).to_be_bytes());
    for f in &m.files {
        h.update([u8::from(f.dir)]);
        h.update((f.path.len() as u32).to_be_bytes());
        for c in &f.path {
            h.update((c.len() as u32).to_be_bytes());
            h.update(c.as_bytes());
        }
        h.update(f.length.to_be_bytes());
    }
    h.update((m.pieces.len() as u32).to_be_bytes());
    for p in &m.pieces {
        h.update(p);
    }
    h.update(m.file_sha256);
    h.finalize().into()
}

/// Where piece `index` of a tree lies: (entry index, byte offset in the file, length).
///
/// # Panics
/// `index` past the last piece (a bug: indices are checked at the protocol edge).
pub fn locate(m: &Metainfo, index: u32) -> (usize, u64, u32) {
    let f = file_of_piece(&m.files, index);
    let e = &m.files[f];
    let offset = u64::from(index - e.first_piece) * u64::from(m.piece_length);
    let len = (e.length - offset).min(u64::from(m.piece_length)) as u32;
    (f, offset, len)
}

/// The entry that holds piece `index`.
pub fn file_of_piece(files: &[TreeFile], index: u32) -> usize {
    // Ends are nondecreasing (empty entries end where they start), so the first entry ending
    // past `index` is the non-empty one that holds it.
    let f = files.partition_point(|e| e.first_piece + e.piece_count <= index);
    assert!(f < files.len(), "piece {index} out of range");
    f
}

/// Which entries a set of `--only` globs selects (all of them when `globs` is empty). A glob
/// matches the path joined with `/`; a glob that names a folder selects what is below it.
///
/// # Errors
/// A glob that does not parse.
pub fn select(files: &[TreeFile], globs: &[String]) -> anyhow::Result<Vec<bool>> {
    if globs.is_empty() {
        return Ok(vec![true; files.len()]);
    }
    let mut b = globset::GlobSetBuilder::new();
    for g in globs {
        let g = g.trim_end_matches('/');
        b.add(
            globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| anyhow::anyhow!("--only {g:?}: {e}"))?,
        );
        b.add(
            globset::GlobBuilder::new(&format!("{g}/**"))
                .literal_separator(true)
                .build()
                .map_err(|e| anyhow::anyhow!("--only {g:?}: {e}"))?,
        );
    }
    let set = b.build()?;
    Ok(files.iter().map(|f| set.is_match(f.display())).collect())
}

/// The pieces of the selected entries.
pub fn wanted_pieces(files: &[TreeFile], selected: &[bool], n: u32) -> crate::bitfield::Bitfield {
    let mut bits = crate::bitfield::Bitfield::new(n);
    for (f, _) in files.iter().zip(selected).filter(|(_, s)| **s) {
        for i in f.first_piece..f.first_piece + f.piece_count {
            bits.set(i);
        }
    }
    bits
}

/// Walk `dir` (never following a symlink) into its entries in path order: files, and
/// directories that hold nothing.
fn walk(dir: &Path) -> Result<Vec<(Vec<String>, u64, bool)>, MetainfoError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| MetainfoError::Io { path: p, source }
    };
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), Vec::<String>::new())];
    while let Some((d, rel)) = stack.pop() {
        let mut children = Vec::new();
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| field(format!("{}: {n:?} is not UTF-8", d.display())))?;
            children.push((name, e.path()));
        }
        if children.is_empty() && !rel.is_empty() {
            out.push((rel.clone(), 0, true));
        }
        for (name, path) in children {
            let m = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            let mut r = rel.clone();
            r.push(name);
            if m.file_type().is_symlink() {
                return Err(field(format!(
                    "{} is a symlink; shoal does not follow it",
                    path.display()
                )));
            } else if m.is_dir() {
                stack.push((path, r));
            } else if m.is_file() {
                out.push((r, m.len(), false));
            } else {
                return Err(field(format!("{} is not a file or folder", path.display())));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hash a folder tree into a format 2 descriptor: each file's pieces and the content hash
/// (SHA-256 of every file's bytes in order) in one read, on two threads.
///
/// # Errors
/// A file cannot be read; a symlink or special file in the tree; a path that a descriptor
/// could not carry (the same checks as loading).
pub fn create(
    dir: &Path,
    piece_length: u32,
    trackers: Vec<String>,
    progress: &HashProgress,
) -> Result<Metainfo, MetainfoError> {
    crate::metainfo::check_piece_length(piece_length)?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| MetainfoError::Field {
            field: "name",
            reason: format!("{} has no UTF-8 folder name", dir.display()),
        })?
        .to_string();
    crate::metainfo::check_name(&name)?;
    let entries = walk(dir)?;
    let json: Vec<FileJson> = entries
        .iter()
        .map(|(p, l, d)| FileJson {
            path: p.clone(),
            length: *l,
            dir: *d,
        })
        .collect();
    let length = entries.iter().map(|e| e.1).sum();
    // Check the list before reading a byte: a tree a descriptor cannot carry fails fast.
    let files = check_files(&json, length, piece_length)?;
    let paths: Vec<PathBuf> = files.iter().map(|f| f.under(dir)).collect();
    let pl = piece_length as usize;
    // Only non-empty files are mapped (a map cannot be empty).
    let open = |p: &Path, expected: u64| -> Result<memmap2::Mmap, MetainfoError> {
        let io = |source| MetainfoError::Io {
            path: p.display().to_string(),
            source,
        };
        let f = crate::storage::files::open_complete(p, 0).map_err(|e| MetainfoError::Io {
            path: p.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        check_len(p, f.metadata().map_err(io)?.len(), expected)?;
        crate::storage::map_read_only(&f).map_err(io)
    };
    let (pieces, whole) = std::thread::scope(|s| {
        let pieces = s.spawn(|| -> Result<Vec<Hash>, MetainfoError> {
            let mut bounce = crate::hashing::bounce_buffer();
            let mut out = Vec::new();
            for (f, p) in files.iter().zip(&paths) {
                if f.dir || f.length == 0 {
                    continue;
                }
                let map = open(p, f.length)?;
                for c in map[..f.length as usize].chunks(pl) {
                    crate::storage::prefetch_mapped(c);
                    out.push(crate::hashing::sha256_mapped(c, &mut bounce));
                    crate::storage::release_mapped(c);
                }
            }
            Ok(out)
        });
        let whole = (|| -> Result<Hash, MetainfoError> {
            let mut whole = Sha256::new();
            let mut bounce = crate::hashing::bounce_buffer();
            for (f, p) in files.iter().zip(&paths) {
                if f.dir || f.length == 0 {
                    continue;
                }
                let map = open(p, f.length)?;
                for c in map[..f.length as usize].chunks(pl) {
                    crate::storage::prefetch_mapped(c);
                    crate::hashing::update_via(&mut whole, c, &mut bounce);
                    crate::storage::release_mapped(c);
                    progress.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(whole.finalize().into())
        })();
        (pieces.join().expect("hashing thread panicked"), whole)
    });
    let mut m = Metainfo {
        name,
        length,
        piece_length,
        pieces: pieces?,
        file_sha256: whole?,
        trackers,
        created_at: crate::fsutil::now_rfc3339(),
        info_hash: [0; 32],
        files,
        authority: None,
    };
    m.info_hash = m.compute_info_hash();
    Ok(m)
}

fn check_len(p: &Path, found: u64, expected: u64) -> Result<(), MetainfoError> {
    if found != expected {
        return Err(MetainfoError::Io {
            path: p.display().to_string(),
            source: std::io::Error::other(format!(
                "changed while being hashed ({expected} then {found} bytes)"
            )),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(path: &[&str], length: u64) -> FileJson {
        FileJson {
            path: path.iter().map(|s| s.to_string()).collect(),
            length,
            dir: false,
        }
    }

    #[test]
    fn it_should_refuse_paths_that_could_escape_or_collide() {
        let bad: Vec<Vec<FileJson>> = vec![
            vec![f(&["..", "x"], 1)],
            vec![f(&["", "x"], 1)],
            vec![f(&["/x"], 1)],
            vec![f(&["a", "..", "..", "x"], 1)],
            vec![f(&["a/../../x"], 1)],
            vec![f(&["a\\b"], 1)],
            vec![f(&["a\0b"], 1)],
            vec![f(&["a\nb"], 1)],
            vec![f(&["."], 1)],
            vec![f(&["A.txt"], 1), f(&["a.TXT"], 1)],
            // "é" precomposed and decomposed.
            vec![f(&["caf\u{e9}"], 1), f(&["cafe\u{301}"], 1)],
            vec![f(&["a"], 1), f(&["a", "b"], 1)],
            vec![f(&["x"; 33], 1)],
            vec![],
        ];
        for files in bad {
            let total = files.iter().map(|f| f.length).sum();
            let e = check_files(&files, total, 16384).unwrap_err().to_string();
            assert!(e.contains("`files`"), "{files:?}: {e}");
        }
        let ok = vec![
            f(&["a b", "ü.txt"], 20000),
            f(&["a b", "e"], 0),
            f(&["z"], 1),
        ];
        let t = check_files(&ok, 20001, 16384).unwrap();
        assert_eq!((t[0].first_piece, t[0].piece_count), (0, 2));
        assert_eq!((t[1].first_piece, t[1].piece_count), (2, 0));
        assert_eq!((t[2].first_piece, t[2].piece_count), (2, 1));
        assert_eq!(file_of_piece(&t, 1), 0);
        assert_eq!(file_of_piece(&t, 2), 2);
        let e = check_files(&ok, 5, 16384).unwrap_err().to_string();
        assert!(e.contains("`length`"), "{e}");
    }

    #[test]
    fn it_should_select_by_glob_and_by_folder() {
        let t = check_files(
            &[
                f(&["docs", "a.md"], 1),
                f(&["docs", "sub", "b.md"], 1),
                f(&["c.bin"], 1),
            ],
            3,
            16384,
        )
        .unwrap();
        assert_eq!(select(&t, &["docs".into()]).unwrap(), [true, true, false]);
        assert_eq!(
            select(&t, &["docs/*.md".into()]).unwrap(),
            [true, false, false]
        );
        assert_eq!(
            select(&t, &["**/*.md".into()]).unwrap(),
            [true, true, false]
        );
        assert_eq!(select(&t, &[]).unwrap(), [true, true, true]);
    }
}
