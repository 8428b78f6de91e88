//! The peer's state in sled: which torrents it has, each torrent's durable bitfield, transfer
//! totals, and the scores of remote peers.
//!
//! Trees and keys:
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `format` | store format, u32 BE |
//! | `meta` | `peer_id` | unused since peer ids are keys (`identity.key`); left as found |
//! | `torrents` | info hash (32 bytes) | [`TorrentRecord`] as JSON |
//! | `bitfields` | info hash | the durable bitfield, MSB first |
//! | `scores` | info hash + peer id | [`crate::scorer::PeerScore`] as JSON |
//! | `rosters` | info hash | a private swarm's roster ([`shoal_tracker::roster::Roster`]) as JSON |
//! | `bans` | `key:<id>`, `ip4:<a.b.c.d>` or `ip6:<prefix>::/64` | ban end, unix ms, i64 BE |
//!
//! The bitfield is the crash-safety invariant's other half: a bit is written here only after
//! the piece's bytes were made durable (see `daemon::torrent::flush`), and the store is flushed
//! after. So every bit sled returns after a crash names a good piece.
//!
//! ## Durability: [`Store::flush`] is the one durable commit
//!
//! sled 0.34's own `Db::flush` is not a durable commit on Linux: it writes its log buffers
//! with `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` (`pagecache/iobuf.rs`), which
//! neither commits the file's metadata (its size as the log grows) nor flushes the drive's
//! write cache; only sled's background thread calls `fsync`, about every 500 ms
//! (`flusher.rs`). Values over about 128 KiB (a big descriptor) go to files in `blobs/` that
//! sled never syncs at all, and `conf` and new directory entries are not synced either.
//! Measured with `strace -f -c` on `tools/examples/store_flush.rs`: 200 commits made 201
//! `sync_file_range` calls and 2 `fsync`s (the background thread's).
//!
//! So [`Store::flush`] does its own syncs, in this order, under one lock:
//!
//! 1. `Db::flush`: sled writes every buffered update into `db` and `blobs/` (page cache).
//! 2. `fdatasync` of every blob file not synced before, then of `blobs/` if its entries
//!    changed: the log names blobs, so a blob is durable no later than the log that names it.
//! 3. `fdatasync` of `db`, the log (it includes the file size, the metadata needed to read
//!    the data back).
//! 4. When the store directory's entries changed (`conf`, a snapshot, `blobs/`): `fdatasync`
//!    of its new files, then `fsync` of the directory.
//!
//! **Guarantee:** when `flush` returns `Ok`, every update applied to the store before the call
//! began survives a power cut. An update made by another thread while a flush runs may or
//! may not be covered (it is by the next flush). A failed sync poisons the store: every later
//! `flush` fails too, because after a failed `fsync` Linux may drop the dirty pages and a
//! second `fsync` then "succeeds" for bytes that are not on disk. Creating a store also syncs
//! the data dir, so the `store/` entry itself is durable.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

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
    #[error("store {path}: cannot make {what} durable: {source}")]
    Sync {
        path: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("store {path}: an earlier sync failed ({first}); the store may have lost writes: restart to reopen it")]
    Poisoned { path: String, first: String },
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
    /// The identity of the working file the daemon created (absent in stores written before
    /// it was recorded). A working file with another identity is not the one the bitfield
    /// speaks of: it is never trusted.
    #[serde(default)]
    pub working_file: Option<FileId>,
    /// A tree's working files by entry index (as `working_file` is for one file).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub working_files: std::collections::BTreeMap<u32, FileId>,
    /// A tree's selection: `--only` globs (empty: every file).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
}

/// Which file exactly: device, inode and length. Two different files, or the same file
/// truncated or extended behind our back, never compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// The inode's generation number where known (0 otherwise): inode numbers are reused
    /// at once after a delete, generations are not.
    #[serde(default)]
    pub gen: u64,
}

impl FileId {
    pub fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            gen: 0,
        }
    }

    /// Whether both name the same file (device, inode, and generation where both know it);
    /// the length is a separate question.
    pub fn is_same_file(&self, other: &FileId) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && (self.gen == 0 || other.gen == 0 || self.gen == other.gen)
    }

    /// The identity of the file at `path`, not following a symlink (a symlink is a
    /// different file from the one we made).
    ///
    /// # Errors
    /// `path` cannot be examined.
    pub fn of_path(path: &Path) -> io::Result<FileId> {
        std::fs::symlink_metadata(path).map(|m| FileId::of(&m))
    }
}

impl TorrentRecord {
    /// The file the pieces of torrent `hash` live in right now: the final file once seeding
    /// (or paused from seeding), else the working file (`storage::files::working_path`).
    pub fn working_path_for(&self, hash: &Hash) -> PathBuf {
        // A tree's files appear below its folder one by one; its working files are many.
        if self.is_final() || !self.working_files.is_empty() {
            self.data_path.clone()
        } else {
            crate::storage::files::working_path(
                self.data_path.parent().unwrap_or(Path::new(".")),
                hash,
            )
        }
    }

    /// Whether the bytes live under the final name (seeding, or paused from seeding).
    pub fn is_final(&self) -> bool {
        match self.state {
            TorrentState::Seeding => true,
            TorrentState::Paused => self.paused_from == Some(TorrentState::Seeding),
            _ => false,
        }
    }

    /// The old-style working file (`NAME.part`), or the final file. Only for stores written
    /// before [`TorrentRecord::working_path_for`]: nothing trusts such a file.
    pub fn working_path(&self) -> PathBuf {
        if self.is_final() {
            self.data_path.clone()
        } else {
            part_path(&self.data_path)
        }
    }

    /// Same as [`TorrentRecord::is_final`].
    pub fn is_complete(&self) -> bool {
        self.is_final()
    }
}

/// The working file's name before per-info-hash names: `NAME.part`. For reading old stores.
pub fn part_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// The fsyncs of a durable flush; a test records them to check their order.
trait Syncer {
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

struct OsSyncer;

impl Syncer for OsSyncer {
    fn sync_file(&self, path: &Path) -> io::Result<()> {
        // fdatasync through a read-only descriptor: Linux syncs the inode's dirty pages
        // whoever wrote them.
        File::open(path)?.sync_data()
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }
}

/// What the previous durable flushes already synced.
#[derive(Default)]
struct Synced {
    blobs: BTreeSet<OsString>,
    top: BTreeSet<OsString>,
    /// The first sync failure: the store is not trusted to be durable after it.
    poisoned: Option<String>,
}

/// The names in `dir` (none if it does not exist yet).
fn entries(dir: &Path) -> io::Result<BTreeSet<OsString>> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.map(|e| e.file_name())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// A sync that may meet a file sled removed meanwhile (an obsolete blob or snapshot): gone
/// is fine, it needs no durability.
fn sync_if_present(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    torrents: sled::Tree,
    bitfields: sled::Tree,
    scores: sled::Tree,
    bans: sled::Tree,
    rosters: sled::Tree,
    path: String,
    dir: PathBuf,
    synced: Arc<Mutex<Synced>>,
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
            bans: tree("bans")?,
            rosters: tree("rosters")?,
            db,
            path: path.clone(),
            dir: dir.clone(),
            synced: Arc::default(),
        };
        // Everything found on open is synced once (conf, old blobs, the directory), and a
        // created store's own entry in the data dir too.
        store.flush()?;
        if create {
            OsSyncer
                .sync_dir(data_dir)
                .map_err(|source| StoreError::Sync {
                    path: path.clone(),
                    what: data_dir.display().to_string(),
                    source,
                })?;
        }
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

    /// Keep a private swarm's roster, durably: a revocation lost to a crash would bring the
    /// member back.
    ///
    /// # Errors
    /// sled or the flush failing.
    pub fn put_roster(
        &self,
        hash: &Hash,
        r: &shoal_tracker::roster::Roster,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_vec(r).expect("a roster serializes");
        self.rosters.insert(hash, json).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// The roster kept for `hash`; one that does not parse is treated as absent (the swarm's
    /// peers and trackers hold it too).
    ///
    /// # Errors
    /// sled failing.
    pub fn roster(&self, hash: &Hash) -> Result<Option<shoal_tracker::roster::Roster>, StoreError> {
        Ok(self
            .rosters
            .get(hash)
            .map_err(|e| self.err(e))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Record a ban (see `daemon::bans`); expired ones are dropped on load. Not flushed:
    /// a ban lost to a power cut is only a peer given another chance.
    ///
    /// # Errors
    /// sled failing.
    pub fn put_ban(&self, key: &str, until_ms: i64) -> Result<(), StoreError> {
        self.bans
            .insert(key.as_bytes(), &until_ms.to_be_bytes())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every unexpired ban; expired ones are removed.
    ///
    /// # Errors
    /// sled failing.
    pub fn bans(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let now = crate::fsutil::unix_ms();
        let mut out = Vec::new();
        for kv in self.bans.iter() {
            let (k, v) = kv.map_err(|e| self.err(e))?;
            let until = <[u8; 8]>::try_from(&v[..])
                .map(i64::from_be_bytes)
                .unwrap_or(0);
            if until > now {
                out.push((String::from_utf8_lossy(&k).into_owned(), until));
            } else {
                self.bans.remove(&k).map_err(|e| self.err(e))?;
            }
        }
        Ok(out)
    }

    /// Make every update applied before this call durable (see the module doc for the
    /// syncs and their order). The store's only durable commit.
    ///
    /// # Errors
    /// sled failing, a sync failing, or an earlier sync having failed (poisoned).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.flush_with(&OsSyncer)
    }

    fn flush_with(&self, syncer: &dyn Syncer) -> Result<(), StoreError> {
        // One flush at a time: the record of what is synced must match what was synced.
        let mut st = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(first) = &st.poisoned {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
                first: first.clone(),
            });
        }
        match self.sync_steps(&mut st, syncer) {
            Ok(()) => Ok(()),
            Err(e) => {
                if matches!(e, StoreError::Sync { .. }) {
                    st.poisoned = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    fn sync_steps(&self, st: &mut Synced, syncer: &dyn Syncer) -> Result<(), StoreError> {
        let fail = |what: &Path, source: io::Error| StoreError::Sync {
            path: self.path.clone(),
            what: what.display().to_string(),
            source,
        };
        // 1. sled's buffers into its files (sync_file_range: not yet durable).
        self.db.flush().map_err(|e| self.err(e))?;
        // 2. Blobs before the log that names them.
        let blob_dir = self.dir.join("blobs");
        let blobs = entries(&blob_dir).map_err(|e| fail(&blob_dir, e))?;
        for name in blobs.difference(&st.blobs) {
            let p = blob_dir.join(name);
            sync_if_present(syncer.sync_file(&p)).map_err(|e| fail(&p, e))?;
        }
        if blobs != st.blobs {
            syncer.sync_dir(&blob_dir).map_err(|e| fail(&blob_dir, e))?;
            st.blobs = blobs;
        }
        // 3. The log.
        let log = self.dir.join("db");
        syncer.sync_file(&log).map_err(|e| fail(&log, e))?;
        // 4. New entries of the store directory, then the directory.
        let top = entries(&self.dir).map_err(|e| fail(&self.dir, e))?;
        if top != st.top {
            for name in top.difference(&st.top) {
                let p = self.dir.join(name);
                if name != "db" && p.is_file() {
                    sync_if_present(syncer.sync_file(&p)).map_err(|e| fail(&p, e))?;
                }
            }
            syncer.sync_dir(&self.dir).map_err(|e| fail(&self.dir, e))?;
            st.top = top;
        }
        Ok(())
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
        self.rosters.remove(hash).map_err(|e| self.err(e))?;
        let mut batch = sled::Batch::default();
        for item in self.scores.scan_prefix(hash) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            batch.remove(k);
        }
        self.scores.apply_batch(batch).map_err(|e| self.err(e))?;
        self.flush()
    }

    /// # Errors
    /// sled failing.
    pub fn put_score(&self, hash: &Hash, peer_id: &str, s: &PeerScore) -> Result<(), StoreError> {
        self.put_scores(hash, &[(peer_id.to_owned(), s.clone())], &[])
    }

    /// Write the scores that changed and delete the evicted ones of one torrent, as one sled
    /// batch (all or nothing). Not flushed: the next [`Store::flush`] makes it durable.
    ///
    /// # Errors
    /// sled failing; nothing of the batch is applied then.
    pub fn put_scores(
        &self,
        hash: &Hash,
        changed: &[(String, PeerScore)],
        removed: &[String],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (id, s) in changed {
            batch.insert(
                score_key(hash, id),
                serde_json::to_vec(s).expect("score serializes"),
            );
        }
        for id in removed {
            batch.remove(score_key(hash, id));
        }
        self.scores.apply_batch(batch).map_err(|e| self.err(e))
    }

    /// How many scores a torrent has in the store.
    ///
    /// # Errors
    /// sled failing.
    pub fn score_count(&self, hash: &Hash) -> Result<usize, StoreError> {
        let mut n = 0;
        for item in self.scores.scan_prefix(hash).keys() {
            item.map_err(|e| self.err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Keep at most `max` scores of a torrent, evicting the least useful ([`score_rank`]) in
    /// one batch; for a store written before scores were capped. Not flushed. Returns the
    /// evicted peer ids.
    ///
    /// # Errors
    /// sled failing; nothing is evicted then.
    pub fn cap_scores(
        &self,
        hash: &Hash,
        max: usize,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        if self.score_count(hash)? <= max {
            return Ok(Vec::new());
        }
        let mut all = self.scores(hash)?;
        all.sort_by_key(|(_, s)| std::cmp::Reverse(score_rank(s, now_ms)));
        let evicted: Vec<String> = all.drain(max.min(all.len())..).map(|(id, _)| id).collect();
        // Damaged entries are not in `scores`: evict them too.
        let kept: BTreeSet<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        let mut batch = sled::Batch::default();
        for item in self.scores.scan_prefix(hash).keys() {
            let k = item.map_err(|e| self.err(e))?;
            if !kept.contains(String::from_utf8_lossy(&k[32..]).as_ref()) {
                batch.remove(k);
            }
        }
        self.scores.apply_batch(batch).map_err(|e| self.err(e))?;
        Ok(evicted)
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

    /// The directory sled keeps its files in (`DATA_DIR/store`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the store takes on disk.
    ///
    /// # Errors
    /// sled failing.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.err(e))
    }
}

fn score_key(hash: &Hash, peer_id: &str) -> Vec<u8> {
    let mut k = hash.to_vec();
    k.extend_from_slice(peer_id.as_bytes());
    k
}

/// How worth keeping a score is, greater first: an active ban (it must outlive the peer's
/// next visit), then pieces exchanged either way, then bytes.
pub fn score_rank(s: &PeerScore, now_ms: i64) -> (bool, u64, u64) {
    (
        s.banned_until > now_ms,
        s.pieces_from.saturating_add(s.pieces_to),
        s.bytes_from.saturating_add(s.bytes_to),
    )
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
            working_files: Default::default(),
            only: Vec::new(),
        }
    }

    /// Open a store just dropped in this process: sled's flusher thread lets go of the
    /// file lock a moment after the last handle is dropped, so a reopen may briefly find it
    /// locked (bounded wait).
    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, false) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r.unwrap(),
            }
        }
    }

    #[test]
    fn it_should_keep_records_bits_and_bans_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let h = [7u8; 32];
        let until = crate::fsutil::unix_ms() + 60_000;
        {
            let s = Store::open(dir.path(), true).unwrap();
            s.put_ban("ip4:10.0.0.1", until).unwrap();
            s.put_ban("ip4:10.0.0.2", 1).unwrap();
            let mut b = Bitfield::new(20);
            b.set(3);
            s.commit_progress(&h, &b, &rec()).unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.bans().unwrap(), vec![("ip4:10.0.0.1".to_string(), until)]);
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
        let s = reopen(dir.path());
        assert!(s.bitfield(&h, 5).unwrap().unwrap().is_complete());
    }

    #[test]
    fn it_should_refuse_a_directory_that_is_not_a_store() {
        let dir = tempfile::tempdir().unwrap();
        let e = Store::open(dir.path(), false).err().unwrap().to_string();
        assert!(e.contains("not a shoal data directory"), "{e}");
    }

    /// Records the syncs of a flush, optionally failing them.
    #[derive(Default)]
    struct Recorder {
        log: std::cell::RefCell<Vec<(&'static str, PathBuf)>>,
        fail: bool,
    }

    impl Syncer for Recorder {
        fn sync_file(&self, path: &Path) -> io::Result<()> {
            self.log.borrow_mut().push(("file", path.to_owned()));
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            OsSyncer.sync_file(path)
        }

        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.log.borrow_mut().push(("dir", path.to_owned()));
            OsSyncer.sync_dir(path)
        }
    }

    #[test]
    fn it_should_sync_new_blobs_before_the_log_and_the_log_on_every_flush() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), true).unwrap();
        let blobs = s.dir().join("blobs");
        let log = s.dir().join("db");
        // A descriptor of 4000 pieces is over sled's inline limit (~128 KiB): a blob file.
        let mut big = rec();
        big.descriptor = Some("x".repeat(300_000));
        s.put_torrent(&[1; 32], &big).unwrap();
        let r = Recorder::default();
        s.flush_with(&r).unwrap();
        let steps = r.log.into_inner();
        let pos = |f: &dyn Fn(&(&str, PathBuf)) -> bool| steps.iter().position(f);
        let blob = pos(&|(k, p)| *k == "file" && p.parent() == Some(&blobs))
            .unwrap_or_else(|| panic!("no blob synced: {steps:?}"));
        let blob_dir = pos(&|(k, p)| *k == "dir" && *p == blobs).expect("blobs/ synced");
        let log_at = pos(&|(k, p)| *k == "file" && *p == log).expect("log synced");
        assert!(blob < blob_dir && blob_dir < log_at, "{steps:?}");
        // Nothing new: only the log is synced again, never skipped.
        s.put_torrent(&[2; 32], &rec()).unwrap();
        let r = Recorder::default();
        s.flush_with(&r).unwrap();
        assert_eq!(r.log.into_inner(), vec![("file", log.clone())]);
        // And it is all there after a reopen.
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.get_torrent(&[1; 32]).unwrap(), Some(big));
    }

    #[test]
    fn it_should_stay_failed_after_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), true).unwrap();
        s.put_torrent(&[1; 32], &rec()).unwrap();
        let e = s
            .flush_with(&Recorder {
                fail: true,
                ..Recorder::default()
            })
            .unwrap_err();
        assert!(matches!(e, StoreError::Sync { .. }), "{e}");
        // A retry that "succeeds" would vouch for pages the kernel may have dropped.
        let e = s.flush().unwrap_err().to_string();
        assert!(e.contains("earlier sync failed"), "{e}");
        assert!(s.clone().flush().is_err(), "clones share the poison");
    }

    #[test]
    fn it_should_write_and_evict_scores_in_batches_and_keep_bans_when_capping() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), true).unwrap();
        let h = [4u8; 32];
        let score = |pieces: u64, banned_until: i64| PeerScore {
            pieces_from: pieces,
            banned_until,
            ..PeerScore::default()
        };
        let changed: Vec<(String, PeerScore)> = (0..100)
            .map(|i| (format!("p{i:03}"), score(i, 0)))
            .chain([("banned".to_owned(), score(0, 5_000))])
            .collect();
        s.put_scores(&h, &changed, &[]).unwrap();
        s.put_scores(&[5u8; 32], &changed[..3], &[]).unwrap();
        assert_eq!(s.score_count(&h).unwrap(), 101);
        s.put_scores(&h, &[("p000".into(), score(7, 0))], &["p001".into()])
            .unwrap();
        assert_eq!(s.score_count(&h).unwrap(), 100);
        let evicted = s.cap_scores(&h, 10, 1_000).unwrap();
        assert_eq!(evicted.len(), 90);
        let mut kept: Vec<String> = s
            .scores(&h)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        kept.sort();
        let mut want: Vec<String> = (90..100).map(|i| format!("p{i:03}")).collect();
        want.remove(0);
        want.insert(0, "banned".into());
        want.sort();
        assert_eq!(kept, want, "the ban and the 9 most useful stay");
        assert_eq!(
            s.score_count(&[5u8; 32]).unwrap(),
            3,
            "other torrents untouched"
        );
        assert!(s.cap_scores(&h, 10, 1_000).unwrap().is_empty());
    }

    #[test]
    fn it_should_name_working_files_per_info_hash_in_their_own_directory() {
        let a = [0xab; 32];
        let mut r = rec();
        let w = r.working_path_for(&a);
        assert_eq!(
            w,
            Path::new("/tmp")
                .join(crate::storage::files::PARTS_DIR)
                .join(format!("{}.part", hex::encode(a)))
        );
        r.state = TorrentState::Paused;
        r.paused_from = Some(TorrentState::Seeding);
        assert_eq!(r.working_path_for(&a), r.data_path);
    }

    #[test]
    fn it_should_load_a_record_written_before_working_file_existed() {
        let old = r#"{"descriptor":null,"data_path":"/tmp/x","state":"downloading","added_at":1,
            "completed_at":null,"downloaded":0,"uploaded":0}"#;
        let r: TorrentRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.working_file, None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"abc").unwrap();
        let id = FileId::of_path(&f).unwrap();
        assert_eq!(id.len, 3);
        std::fs::write(dir.path().join("g"), b"abc").unwrap();
        assert_ne!(FileId::of_path(&dir.path().join("g")).unwrap(), id);
    }
}
