//! The peer's state in sled: which torrents it has, each torrent's durable bitfield, transfer
//! totals, and the scores of remote peers.
//!
//! Trees and keys:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `format` | store format, u32 BE |
//! | `meta` | `peer_id` | this peer's id (UTF-8) |
//! | `torrents` | info hash (32 bytes) | [`TorrentRecord`] as JSON |
//! | `bitfields` | info hash | the durable bitfield, MSB first |
//! | `scores` | info hash + peer id | [`crate::scorer::PeerScore`] as JSON |
//!
//! The bitfield is the crash-safety invariant's other half: a bit is written here only after
//! the piece's bytes were made durable (see `daemon::torrent::flush`), and the store is flushed
//! after. So every bit sled returns after a crash names a good piece.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bitfield::Bitfield;
use crate::metainfo::Hash;
use crate::scorer::PeerScore;

/// The store format this build writes and reads.
pub const STORE_FORMAT: u32 = 1;
/// Name of the sled directory inside a data dir.
pub const STORE_DIR: &str = "store";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path} is not a shoal data directory (no {STORE_DIR}/ inside)")]
    NotAStore { path: String },
    #[error("store {path} has format {found}, newer than this shoal understands ({STORE_FORMAT})")]
    NewerFormat { path: String, found: u32 },
    #[error("store {path} is locked by another process (a running `shoal peer run`?): {source}")]
    Locked {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("store {path}: {source}")]
    Sled {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("store {path}: record of {what} is damaged: {reason}")]
    Damaged {
        path: String,
        what: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TorrentState {
    /// Only the info hash is known; the descriptor is being fetched from the swarm.
    FetchingMetadata,
    Downloading,
    Seeding,
    Paused,
    /// The data file is missing or short, or a recheck was asked for.
    NeedsRecheck,
    /// The whole-file hash did not match: needs a person.
    Failed,
}

impl TorrentState {
    pub fn label(self) -> &'static str {
        match self {
            TorrentState::FetchingMetadata => "FETCHING METADATA",
            TorrentState::Downloading => "DOWNLOADING",
            TorrentState::Seeding => "SEEDING",
            TorrentState::Paused => "PAUSED",
            TorrentState::NeedsRecheck => "NEEDS RECHECK",
            TorrentState::Failed => "FAILED",
        }
    }
}

/// What the store keeps of one torrent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorrentRecord {
    /// The descriptor JSON (absent while fetching metadata).
    pub descriptor: Option<String>,
    /// Where the complete file lives (a download is `<data_path>.part` until verified).
    pub data_path: PathBuf,
    pub state: TorrentState,
    /// The state to return to after a pause.
    #[serde(default)]
    pub paused_from: Option<TorrentState>,
    pub added_at: i64,
    pub completed_at: Option<i64>,
    /// Verified bytes received, all sessions.
    pub downloaded: u64,
    /// Bytes served, all sessions.
    pub uploaded: u64,
    /// Extra trackers given with the download (besides the descriptor's and the config's).
    #[serde(default)]
    pub trackers: Vec<String>,
    /// Why the torrent needs attention, for `status`.
    #[serde(default)]
    pub note: Option<String>,
    /// The working file this download created: only that file is trusted.
    #[serde(default)]
    pub working_file: Option<FileId>,
}

/// The identity of a file the daemon created (see `storage::files`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// The inode's generation number where the file system has one (0 otherwise): inode
    /// numbers are reused at once after a delete, generations are not.
    #[serde(default)]
    pub gen: u64,
}

impl TorrentRecord {
    /// The file pieces are written to (or served from) right now.
    pub fn working_path_for(&self, hash: &Hash) -> PathBuf {
        if self.is_complete() {
            return self.data_path.clone();
        }
        crate::storage::files::working_path(self.data_path.parent().unwrap_or(Path::new(".")), hash)
    }

    /// Whether the data is the finished file (seeding, or paused while seeding).
    pub fn is_complete(&self) -> bool {
        self.state == TorrentState::Seeding
            || (self.state == TorrentState::Paused
                && self.paused_from == Some(TorrentState::Seeding))
    }
}

pub fn part_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    torrents: sled::Tree,
    bitfields: sled::Tree,
    scores: sled::Tree,
    path: String,
}

impl Store {
    /// Open the store inside `data_dir`, creating it when `create` is set.
    ///
    /// # Errors
    /// Not a store (and not asked to create), locked by another process, a newer format, or
    /// sled failing; each names the path.
    pub fn open(data_dir: &Path, create: bool) -> Result<Store, StoreError> {
        let dir = data_dir.join(STORE_DIR);
        let path = dir.display().to_string();
        // A compaction interrupted between its two renames left the old store aside: take it
        // back (the compacted copy is rebuilt next time).
        let aside = data_dir.join(format!("{STORE_DIR}.old"));
        if !dir.exists() && aside.join("conf").exists() {
            std::fs::rename(&aside, &dir).map_err(|e| StoreError::Sled {
                path: path.clone(),
                source: sled::Error::Io(e),
            })?;
        }
        if !create && !dir.join("conf").exists() {
            return Err(StoreError::NotAStore {
                path: data_dir.display().to_string(),
            });
        }
        let db = sled::Config::new()
            .path(&dir)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: path.clone(),
                        source,
                    }
                }
                _ => StoreError::Sled {
                    path: path.clone(),
                    source,
                },
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Sled {
                path: path.clone(),
                source,
            })
        };
        let store = Store {
            meta: tree("meta")?,
            torrents: tree("torrents")?,
            bitfields: tree("bitfields")?,
            scores: tree("scores")?,
            db,
            path: path.clone(),
        };
        match store.meta.get("format").map_err(|e| store.err(e))? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(&v[..])
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Damaged {
                        path: path.clone(),
                        what: "format".into(),
                        reason: "not 4 bytes".into(),
                    })?;
                if found > STORE_FORMAT {
                    return Err(StoreError::NewerFormat { path, found });
                }
            }
            None => {
                store
                    .meta
                    .insert("format", &STORE_FORMAT.to_be_bytes())
                    .map_err(|e| store.err(e))?;
                store.flush()?;
            }
        }
        Ok(store)
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// This peer's id, made once and kept.
    ///
    /// # Errors
    /// sled failing.
    pub fn peer_id(&self) -> Result<String, StoreError> {
        if let Some(v) = self.meta.get("peer_id").map_err(|e| self.err(e))? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let id = format!("shoal-{:016x}", rand::random::<u64>());
        self.meta
            .insert("peer_id", id.as_bytes())
            .map_err(|e| self.err(e))?;
        self.flush()?;
        Ok(id)
    }

    /// # Errors
    /// sled failing.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    /// # Errors
    /// sled failing.
    pub fn put_torrent(&self, hash: &Hash, rec: &TorrentRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(rec).expect("record serializes");
        self.torrents.insert(hash, v).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// # Errors
    /// sled failing or a damaged record.
    pub fn get_torrent(&self, hash: &Hash) -> Result<Option<TorrentRecord>, StoreError> {
        match self.torrents.get(hash).map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(v) => self.decode_record(hash, &v).map(Some),
        }
    }

    fn decode_record(&self, hash: &[u8], v: &[u8]) -> Result<TorrentRecord, StoreError> {
        serde_json::from_slice(v).map_err(|e| StoreError::Damaged {
            path: self.path.clone(),
            what: format!("torrent {}", hex::encode(hash)),
            reason: e.to_string(),
        })
    }

    /// Every torrent record.
    ///
    /// # Errors
    /// sled failing, a damaged key or record.
    pub fn torrents(&self) -> Result<Vec<(Hash, TorrentRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.torrents.iter() {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let hash: Hash = k[..].try_into().map_err(|_| StoreError::Damaged {
                path: self.path.clone(),
                what: "torrent key".into(),
                reason: format!("{} bytes, not 32", k.len()),
            })?;
            out.push((hash, self.decode_record(&k, &v)?));
        }
        Ok(out)
    }

    /// The durable bitfield of a torrent; `None` when absent or of the wrong length (the
    /// caller then treats every piece as missing or asks for a recheck).
    ///
    /// # Errors
    /// sled failing.
    pub fn bitfield(&self, hash: &Hash, pieces: u32) -> Result<Option<Bitfield>, StoreError> {
        Ok(self
            .bitfields
            .get(hash)
            .map_err(|e| self.err(e))?
            .and_then(|v| Bitfield::from_bytes(&v, pieces)))
    }

    /// Record progress: the bitfield and the torrent record, in one sled batch per tree,
    /// then flush. Call only after the data of every set bit is durable.
    ///
    /// # Errors
    /// sled failing; the previous durable state stays.
    pub fn commit_progress(
        &self,
        hash: &Hash,
        bits: &Bitfield,
        rec: &TorrentRecord,
    ) -> Result<(), StoreError> {
        self.bitfields
            .insert(hash, bits.as_bytes())
            .map_err(|e| self.err(e))?;
        self.put_torrent(hash, rec)?;
        self.flush()
    }

    /// # Errors
    /// sled failing.
    pub fn remove_torrent(&self, hash: &Hash) -> Result<(), StoreError> {
        self.torrents.remove(hash).map_err(|e| self.err(e))?;
        self.bitfields.remove(hash).map_err(|e| self.err(e))?;
        for item in self.scores.scan_prefix(hash) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            self.scores.remove(k).map_err(|e| self.err(e))?;
        }
        self.flush()
    }

    /// # Errors
    /// sled failing.
    pub fn put_score(&self, hash: &Hash, peer_id: &str, s: &PeerScore) -> Result<(), StoreError> {
        let mut k = hash.to_vec();
        k.extend_from_slice(peer_id.as_bytes());
        self.scores
            .insert(k, serde_json::to_vec(s).expect("score serializes"))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Write the scores that changed and drop the evicted ones, in one batch (not flushed:
    /// the next commit flushes).
    ///
    /// # Errors
    /// sled failing.
    pub fn put_scores(
        &self,
        hash: &Hash,
        changed: &[(String, PeerScore)],
        removed: &[String],
    ) -> Result<(), StoreError> {
        if changed.is_empty() && removed.is_empty() {
            return Ok(());
        }
        let key = |id: &str| {
            let mut k = hash.to_vec();
            k.extend_from_slice(id.as_bytes());
            k
        };
        let mut b = sled::Batch::default();
        for (id, s) in changed {
            b.insert(key(id), serde_json::to_vec(s).expect("score serializes"));
        }
        for id in removed {
            b.remove(key(id));
        }
        self.scores.apply_batch(b).map_err(|e| self.err(e))
    }

    /// Scores of remote peers for a torrent. A damaged score is skipped with a warning: it
    /// is advice, not data.
    ///
    /// # Errors
    /// sled failing.
    pub fn scores(&self, hash: &Hash) -> Result<Vec<(String, PeerScore)>, StoreError> {
        let mut out = Vec::new();
        for item in self.scores.scan_prefix(hash) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let id = String::from_utf8_lossy(&k[32..]).into_owned();
            match serde_json::from_slice(&v) {
                Ok(s) => out.push((id, s)),
                Err(e) => tracing::warn!(peer = %id, cause = %e, "ignoring damaged score"),
            }
        }
        Ok(out)
    }

    /// Bytes the store takes on disk.
    ///
    /// # Errors
    /// sled failing.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> TorrentRecord {
        TorrentRecord {
            descriptor: None,
            data_path: "/tmp/x".into(),
            state: TorrentState::Downloading,
            paused_from: None,
            added_at: 1,
            completed_at: None,
            downloaded: 0,
            uploaded: 0,
            trackers: vec![],
            note: None,
            working_file: None,
        }
    }

    #[test]
    fn it_should_keep_records_bits_and_id_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let h = [7u8; 32];
        let id;
        {
            let s = Store::open(dir.path(), true).unwrap();
            id = s.peer_id().unwrap();
            let mut b = Bitfield::new(20);
            b.set(3);
            s.commit_progress(&h, &b, &rec()).unwrap();
        }
        let s = Store::open(dir.path(), false).unwrap();
        assert_eq!(s.peer_id().unwrap(), id);
        assert_eq!(
            s.bitfield(&h, 20)
                .unwrap()
                .unwrap()
                .ones()
                .collect::<Vec<_>>(),
            vec![3]
        );
        assert!(
            s.bitfield(&h, 30).unwrap().is_none(),
            "wrong length is not trusted"
        );
        assert_eq!(s.torrents().unwrap()[0].1, rec());
        s.remove_torrent(&h).unwrap();
        assert!(s.get_torrent(&h).unwrap().is_none());
    }

    #[test]
    fn it_should_take_back_a_store_left_aside_by_an_interrupted_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let h = [9u8; 32];
        {
            let s = Store::open(dir.path(), true).unwrap();
            s.commit_progress(&h, &Bitfield::full(5), &rec()).unwrap();
        }
        // Interrupted between "store -> store.old" and "copy -> store".
        std::fs::rename(dir.path().join(STORE_DIR), dir.path().join("store.old")).unwrap();
        let s = Store::open(dir.path(), false).unwrap();
        assert!(s.bitfield(&h, 5).unwrap().unwrap().is_complete());
    }

    #[test]
    fn it_should_refuse_a_directory_that_is_not_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let e = Store::open(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("not a shoal data directory"), "{e}");
    }
}
