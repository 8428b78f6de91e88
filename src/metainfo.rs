//! The `.json` descriptor: what a file is (name, length, piece hashes, whole-file hash) and
//! where its trackers are.
//!
//! A descriptor is checked completely when loaded: the rest of shoal only ever sees a
//! [`Metainfo`], whose fields are known to be consistent (piece count matches length, hashes
//! are 32 bytes, the name is one plain file name).
//!
//! The info hash is SHA-256 over a fixed binary encoding of the content fields (see
//! [`Metainfo::compute_info_hash`] and the README), never over JSON text, which anyone can
//! reformat. Trackers and dates are not part of it.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The descriptor format of one file.
pub const FORMAT: u32 = 1;
/// The descriptor format of a folder tree (see [`crate::tree`]).
pub const FORMAT_TREE: u32 = 2;
pub const MIN_PIECE_LENGTH: u32 = 16 * 1024;
pub const MAX_PIECE_LENGTH: u32 = 16 * 1024 * 1024;
pub const DEFAULT_PIECE_LENGTH: u32 = 1024 * 1024;
/// A descriptor must fit in one METADATA payload.
pub const MAX_DESCRIPTOR_BYTES: usize = shoal_tracker::wire::MAX_PAYLOAD_BYTES;
/// Trackers a descriptor may name.
pub const MAX_TRACKERS: usize = 64;
/// Domain separation for the info hash encoding.
const INFO_HASH_TAG: &[u8] = b"shoal-info-v1\0";
const INFO_HASH_TAG_TREE: &[u8] = b"shoal-info-v2\0";

pub type Hash = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum MetainfoError {
    #[error("descriptor field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("descriptor is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("descriptor is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn field(field: &'static str, reason: impl Into<String>) -> MetainfoError {
    MetainfoError::Field {
        field,
        reason: reason.into(),
    }
}

/// The JSON form, as written to disk and sent in METADATA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub format: u32,
    pub name: String,
    pub length: u64,
    pub piece_length: u32,
    pub pieces: Vec<String>,
    pub file_sha256: String,
    #[serde(default)]
    pub trackers: Vec<String>,
    #[serde(default)]
    pub created_at: String,
    /// Format 2 only: the tree's entries, in order (see [`crate::tree`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<crate::tree::FileJson>>,
    /// A private swarm's authority (an Ed25519 key, 64 hex): only the members it signs in may
    /// join. Covered by the info hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// A checked descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metainfo {
    pub name: String,
    pub length: u64,
    pub piece_length: u32,
    pub pieces: Vec<Hash>,
    pub file_sha256: Hash,
    pub trackers: Vec<String>,
    pub created_at: String,
    pub info_hash: Hash,
    /// Format 2: the tree's entries with their piece ranges; empty for one file.
    pub files: Vec<crate::tree::TreeFile>,
    /// A private swarm's authority key (64 hex); `None` for a public swarm.
    pub authority: Option<String>,
}

/// Check that `name` is one plain file name.
///
/// # Errors
/// A [`MetainfoError::Field`] naming `name`.
pub fn check_name(name: &str) -> Result<(), MetainfoError> {
    if name.is_empty() {
        return Err(field("name", "is empty"));
    }
    if name.len() > 255 {
        return Err(field("name", "is longer than 255 bytes"));
    }
    if name.contains('/') || name.contains('\\') {
        return Err(field("name", format!("{name:?} contains a path separator")));
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err(field("name", format!("{name:?} contains `..`")));
    }
    if name == crate::storage::files::PARTS_DIR {
        return Err(field(
            "name",
            format!("{name:?} is shoal's working directory"),
        ));
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return Err(field("name", "contains NUL or a control character"));
    }
    Ok(())
}

fn parse_hash(s: &str, what: &'static str) -> Result<Hash, MetainfoError> {
    let bytes = hex::decode(s).map_err(|e| field(what, format!("{s:?} is not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| field(what, format!("is {} bytes, not 32", b.len())))
}

/// Number of pieces of a file of `length` bytes in pieces of `piece_length`.
pub fn piece_count(length: u64, piece_length: u32) -> u64 {
    length.div_ceil(u64::from(piece_length))
}

/// Check a piece length: a power of two from 16 KiB to 16 MiB.
///
/// # Errors
/// A [`MetainfoError::Field`] naming `piece_length`.
pub fn check_piece_length(piece_length: u32) -> Result<(), MetainfoError> {
    if !piece_length.is_power_of_two()
        || !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length)
    {
        return Err(field(
            "piece_length",
            format!("{piece_length} is not a power of two from 16 KiB to 16 MiB"),
        ));
    }
    Ok(())
}

impl Metainfo {
    /// Parse and check descriptor bytes.
    ///
    /// # Errors
    /// Invalid JSON, or a field that breaks a rule (the error names it).
    pub fn from_json(bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(MetainfoError::TooLarge {
                len: bytes.len(),
                max: MAX_DESCRIPTOR_BYTES,
            });
        }
        let d: Descriptor = serde_json::from_slice(bytes)?;
        Metainfo::from_descriptor(d)
    }

    /// Check a parsed descriptor.
    ///
    /// # Errors
    /// A field that breaks a rule (the error names it).
    pub fn from_descriptor(d: Descriptor) -> Result<Metainfo, MetainfoError> {
        if d.format != FORMAT && d.format != FORMAT_TREE {
            return Err(field(
                "format",
                format!(
                    "{} is not a format this shoal reads ({FORMAT} or {FORMAT_TREE})",
                    d.format
                ),
            ));
        }
        check_name(&d.name)?;
        check_piece_length(d.piece_length)?;
        let files = match (d.format, &d.files) {
            (FORMAT, None) => Vec::new(),
            (FORMAT, Some(_)) => return Err(field("files", "is only allowed in format 2")),
            (_, None) => return Err(field("files", "is missing (format 2 is a tree)")),
            (_, Some(f)) => crate::tree::check_files(f, d.length, d.piece_length)?,
        };
        if d.length == 0 && files.is_empty() {
            return Err(field("length", "is 0; shoal distributes non-empty files"));
        }
        let expected = match files.last() {
            Some(f) => u64::from(f.first_piece + f.piece_count),
            None => piece_count(d.length, d.piece_length),
        };
        if d.pieces.len() as u64 != expected {
            return Err(field(
                "pieces",
                format!(
                    "has {} hashes but length {} in pieces of {} needs {expected}",
                    d.pieces.len(),
                    d.length,
                    d.piece_length
                ),
            ));
        }
        let pieces = d
            .pieces
            .iter()
            .map(|p| parse_hash(p, "pieces"))
            .collect::<Result<Vec<_>, _>>()?;
        let file_sha256 = parse_hash(&d.file_sha256, "file_sha256")?;
        if d.trackers.len() > MAX_TRACKERS {
            return Err(field(
                "trackers",
                format!(
                    "lists {}, over the limit of {MAX_TRACKERS}",
                    d.trackers.len()
                ),
            ));
        }
        if let Some(a) = &d.authority {
            if !shoal_tracker::keys::is_key(a) {
                return Err(field(
                    "authority",
                    "is not an Ed25519 public key (64 lower-case hex)",
                ));
            }
        }
        for t in &d.trackers {
            if t.is_empty() || t.len() > 255 || t.chars().any(char::is_whitespace) {
                return Err(field("trackers", format!("{t:?} is not HOST:PORT")));
            }
        }
        let mut m = Metainfo {
            name: d.name,
            length: d.length,
            piece_length: d.piece_length,
            pieces,
            file_sha256,
            trackers: d.trackers,
            created_at: d.created_at,
            info_hash: [0; 32],
            files,
            authority: d.authority,
        };
        m.info_hash = m.compute_info_hash();
        Ok(m)
    }

    /// Load and check a descriptor file.
    ///
    /// # Errors
    /// The file cannot be read, or its content is refused.
    pub fn load(path: &Path) -> Result<Metainfo, MetainfoError> {
        let bytes = std::fs::read(path).map_err(|source| MetainfoError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Metainfo::from_json(&bytes)
    }

    /// The info hash: SHA-256 over this encoding (all integers big-endian):
    /// `"shoal-info-v1\0"`, u32 name length, name (UTF-8), u64 length, u32 piece length,
    /// u32 piece count, each piece hash (32 bytes), the whole-file hash (32 bytes).
    ///
    /// A tree (format 2) is encoded as [`crate::tree::info_hash`] says.
    pub fn compute_info_hash(&self) -> Hash {
        match &self.authority {
            Some(a) => shoal_tracker::roster::private_info_hash(&self.content_hash(), a)
                .expect("the authority was checked on load"),
            None => self.content_hash(),
        }
    }

    /// The content's own hash: the info hash of the same descriptor made public. A private
    /// swarm's info hash is [`shoal_tracker::roster::private_info_hash`] of this and the
    /// authority, so a tracker can check the pair against the info hash.
    pub fn content_hash(&self) -> Hash {
        if self.is_tree() {
            return crate::tree::info_hash(self, INFO_HASH_TAG_TREE);
        }
        let mut h = Sha256::new();
        h.update(INFO_HASH_TAG);
        h.update((self.name.len() as u32).to_be_bytes());
        h.update(self.name.as_bytes());
        h.update(self.length.to_be_bytes());
        h.update(self.piece_length.to_be_bytes());
        h.update((self.pieces.len() as u32).to_be_bytes());
        for p in &self.pieces {
            h.update(p);
        }
        h.update(self.file_sha256);
        h.finalize().into()
    }

    pub fn info_hash_hex(&self) -> String {
        hex::encode(self.info_hash)
    }

    pub fn piece_count(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// Whether this is a folder tree (format 2).
    pub fn is_tree(&self) -> bool {
        !self.files.is_empty()
    }

    /// Byte length of piece `index` (the last one may be short; in a tree, the last of each
    /// file may be).
    pub fn piece_size(&self, index: u32) -> u32 {
        if self.is_tree() {
            return crate::tree::locate(self, index).2;
        }
        let start = u64::from(index) * u64::from(self.piece_length);
        (self.length - start).min(u64::from(self.piece_length)) as u32
    }

    pub fn to_descriptor(&self) -> Descriptor {
        Descriptor {
            format: if self.is_tree() { FORMAT_TREE } else { FORMAT },
            files: self.is_tree().then(|| {
                self.files
                    .iter()
                    .map(crate::tree::TreeFile::to_json)
                    .collect()
            }),
            name: self.name.clone(),
            length: self.length,
            piece_length: self.piece_length,
            pieces: self.pieces.iter().map(hex::encode).collect(),
            file_sha256: hex::encode(self.file_sha256),
            trackers: self.trackers.clone(),
            created_at: self.created_at.clone(),
            authority: self.authority.clone(),
        }
    }

    /// Make this a private swarm of `authority` (a key, 64 hex): the info hash changes.
    ///
    /// # Errors
    /// `authority` is not a key.
    pub fn make_private(&mut self, authority: &str) -> Result<(), MetainfoError> {
        if !shoal_tracker::keys::is_key(authority) {
            return Err(field(
                "authority",
                "is not an Ed25519 public key (64 lower-case hex)",
            ));
        }
        self.authority = Some(authority.to_string());
        self.info_hash = self.compute_info_hash();
        Ok(())
    }

    pub fn is_private(&self) -> bool {
        self.authority.is_some()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v =
            serde_json::to_vec_pretty(&self.to_descriptor()).expect("descriptor serializes");
        v.push(b'\n');
        v
    }

    /// Write the descriptor atomically (tmp, fsync, rename).
    ///
    /// # Errors
    /// I/O errors naming the path.
    pub fn save(&self, path: &Path) -> Result<(), MetainfoError> {
        crate::fsutil::write_atomic(path, &self.to_json()).map_err(|source| MetainfoError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Progress of a hashing pass, for a progress bar.
#[derive(Debug, Default)]
pub struct HashProgress {
    pub bytes: AtomicU64,
}

/// Hash a file (or, for a folder, see [`crate::tree::create`]): the piece hashes and the whole-file SHA-256 in one read of the data, on two
/// threads (each SHA-256 stream is sequential, so two streams use both cores).
///
/// # Errors
/// The file cannot be opened, mapped or read; it is empty; the piece length is invalid.
pub fn create(
    path: &Path,
    piece_length: u32,
    trackers: Vec<String>,
    progress: &HashProgress,
) -> Result<Metainfo, MetainfoError> {
    check_piece_length(piece_length)?;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        return crate::tree::create(path, piece_length, trackers, progress);
    }
    let io = |source| MetainfoError::Io {
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| field("name", format!("{} has no UTF-8 file name", path.display())))?
        .to_string();
    check_name(&name)?;
    let file = File::open(path).map_err(io)?;
    let length = file.metadata().map_err(io)?.len();
    if length == 0 {
        return Err(field("length", format!("{} is empty", path.display())));
    }
    // Each thread reads its own map and releases the pages behind it, so hashing a file of any
    // size keeps the resident set small (publish runs this inside the daemon).
    let piece_map = crate::storage::map_read_only(&file).map_err(io)?;
    let whole_map = crate::storage::map_read_only(&file).map_err(io)?;
    let pl = piece_length as usize;
    let (pieces, file_sha256) = std::thread::scope(|s| {
        let pieces = s.spawn(|| {
            let mut bounce = crate::hashing::bounce_buffer();
            piece_map
                .chunks(pl)
                .map(|c| {
                    crate::storage::prefetch_mapped(c);
                    let h = crate::hashing::sha256_mapped(c, &mut bounce);
                    crate::storage::release_mapped(c);
                    h
                })
                .collect::<Vec<_>>()
        });
        let mut whole = Sha256::new();
        let mut bounce = crate::hashing::bounce_buffer();
        // Feed in piece-sized steps so the progress bar moves.
        for c in whole_map.chunks(pl) {
            crate::storage::prefetch_mapped(c);
            crate::hashing::update_via(&mut whole, c, &mut bounce);
            crate::storage::release_mapped(c);
            progress.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
        }
        let whole: Hash = whole.finalize().into();
        (pieces.join().expect("hashing thread panicked"), whole)
    });
    let mut m = Metainfo {
        name,
        length,
        piece_length,
        pieces,
        file_sha256,
        trackers,
        created_at: crate::fsutil::now_rfc3339(),
        info_hash: [0; 32],
        files: Vec::new(),
        authority: None,
    };
    m.info_hash = m.compute_info_hash();
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        Descriptor {
            format: 1,
            name: "a.bin".into(),
            length: 40_000,
            piece_length: 16384,
            pieces: vec!["00".repeat(32); 3],
            file_sha256: "11".repeat(32),
            trackers: vec!["127.0.0.1:5000".into()],
            created_at: "2026-11-24T10:00:00Z".into(),
            files: None,
            authority: None,
        }
    }

    #[test]
    fn it_should_refuse_each_broken_field_by_name() {
        type Mutation = Box<dyn Fn(&mut Descriptor)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|d| d.name = "../evil".into())),
            ("name", Box::new(|d| d.name = "/etc/passwd".into())),
            ("name", Box::new(|d| d.name = "a\\b".into())),
            ("name", Box::new(|d| d.name = "a\0b".into())),
            (
                "pieces",
                Box::new(|d| d.pieces.pop().map(drop).unwrap_or(())),
            ),
            ("pieces", Box::new(|d| d.pieces[0] = "00".repeat(31))),
            ("file_sha256", Box::new(|d| d.file_sha256 = "zz".into())),
            ("piece_length", Box::new(|d| d.piece_length = 1000)),
            (
                "piece_length",
                Box::new(|d| d.piece_length = 32 * 1024 * 1024),
            ),
            ("format", Box::new(|d| d.format = 3)),
            ("files", Box::new(|d| d.format = 2)),
        ];
        for (name, mutate) in cases {
            let mut d = sample();
            mutate(&mut d);
            let err = Metainfo::from_descriptor(d).unwrap_err().to_string();
            assert!(err.contains(&format!("`{name}`")), "expected {name}: {err}");
        }
        assert!(Metainfo::from_descriptor(sample()).is_ok());
    }

    #[test]
    fn it_should_ignore_trackers_and_dates_in_the_info_hash() {
        let a = Metainfo::from_descriptor(sample()).unwrap();
        let mut d = sample();
        d.trackers = vec!["10.0.0.1:1".into(), "x:2".into()];
        d.created_at = "yesterday".into();
        let b = Metainfo::from_descriptor(d).unwrap();
        assert_eq!(a.info_hash, b.info_hash);
        let mut d = sample();
        d.length = 40_001;
        assert_ne!(a.info_hash, Metainfo::from_descriptor(d).unwrap().info_hash);
    }

    #[test]
    fn it_should_round_trip_json() {
        let a = Metainfo::from_descriptor(sample()).unwrap();
        let b = Metainfo::from_json(&a.to_json()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.piece_size(2), 40_000 - 2 * 16384);
    }
}
