//! The tracker's SQLite store: schema migrations, the live swarm as loaded at start, and the
//! batched writes of the writer thread.
//!
//! What is persisted (read it with `sqlite3 tracker.db`):
//!
//! | table | one row per | written when |
//! | --- | --- | --- |
//! | `torrents` | file ever announced | first announce of the file |
//! | `peers` | (file, peer) in the live swarm | every announce (coalesced per batch); deleted on stop or expiry |
//! | `events` | change of state: started, completed, stopped, expired (with the key's fingerprint) | on the change; deleted past the retention |
//! | `private_swarms` | swarm proven private, with its newest roster | on the proof and on each newer roster |
//!
//! Deliberately not persisted: heartbeats as history (a steady swarm must not grow the file),
//! connection state, and PEERS replies.
//!
//! The connection is owned by one thread (see [`crate::server`]); nothing here is called from
//! async code.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// The migrations, in order. The schema lives only in `migrations/`.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init", include_str!("../../migrations/0001_init.sql")),
    (
        "0002_heartbeat_writes",
        include_str!("../../migrations/0002_heartbeat_writes.sql"),
    ),
    (
        "0003_identity",
        include_str!("../../migrations/0003_identity.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path} has schema version {found}, newer than this shoal understands ({known}); use a newer shoal")]
    NewerSchema {
        path: String,
        found: i64,
        known: i64,
    },
    #[error("database {path} is in use by another tracker (it holds the file's lock); stop that tracker or give this one another --db")]
    InUse { path: String },
    #[error("database {path}: cannot open it to lock it: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
}

/// A live swarm row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub info_hash: String,
    pub peer_id: String,
    pub addr: String,
    pub port: u16,
    pub have: u64,
    pub total: u64,
    pub role: &'static str,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// A history row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub at: i64,
    pub info_hash: String,
    pub peer_id: String,
    pub addr: String,
    pub port: u16,
    pub event: &'static str,
    pub have: u64,
    pub total: u64,
}

/// A file row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorrentRow {
    pub info_hash: String,
    pub name: String,
    pub length: u64,
    pub first_seen: i64,
}

/// A private swarm row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateRow {
    pub info_hash: String,
    pub authority: String,
    pub content: String,
    pub version: u64,
    /// The roster's JSON.
    pub roster: Option<String>,
}

/// One change to persist.
#[derive(Debug, Clone)]
pub enum Change {
    Private(PrivateRow),
    Torrent(TorrentRow),
    Peer(PeerRow),
    RemovePeer { info_hash: String, peer_id: String },
    Event(EventRow),
}

/// Changes collected for one transaction. Peer rows are coalesced: only the last state of each
/// (file, peer) in a batch is written, which keeps a busy tracker's writes proportional to its
/// live swarm, not to its announce rate.
#[derive(Debug, Default)]
pub struct Batch {
    /// Coalesced by info hash: the last (newest) state wins.
    privates: HashMap<String, PrivateRow>,
    torrents: Vec<TorrentRow>,
    /// `None` deletes the row.
    peers: HashMap<(String, String), Option<PeerRow>>,
    events: Vec<EventRow>,
}

impl Batch {
    pub fn push(&mut self, change: Change) {
        match change {
            Change::Private(p) => {
                self.privates.insert(p.info_hash.clone(), p);
            }
            Change::Torrent(t) => self.torrents.push(t),
            Change::Peer(p) => {
                self.peers
                    .insert((p.info_hash.clone(), p.peer_id.clone()), Some(p));
            }
            Change::RemovePeer { info_hash, peer_id } => {
                self.peers.insert((info_hash, peer_id), None);
            }
            Change::Event(e) => self.events.push(e),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.privates.is_empty()
            && self.torrents.is_empty()
            && self.peers.is_empty()
            && self.events.is_empty()
    }

    pub fn len(&self) -> usize {
        self.privates.len() + self.torrents.len() + self.peers.len() + self.events.len()
    }
}

pub struct Store {
    conn: Connection,
    path: String,
    /// Holds an exclusive `flock` on the database file for the store's life: a second tracker
    /// on the same file is refused rather than writing beside this one. (SQLite's own locks
    /// are POSIX record locks, independent of `flock`, so `sqlite3` readers are not affected.)
    _lock: std::fs::File,
}

/// Take the one-tracker lock on `path` (creating the file if needed; a symlink is refused, not
/// followed).
fn lock(path: &Path, p: &str) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| StoreError::Lock {
            path: p.to_string(),
            source,
        })?;
    // SAFETY: flock only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(f);
    }
    let source = std::io::Error::last_os_error();
    if source.kind() == std::io::ErrorKind::WouldBlock {
        return Err(StoreError::InUse {
            path: p.to_string(),
        });
    }
    Err(StoreError::Lock {
        path: p.to_string(),
        source,
    })
}

impl Store {
    /// Open (or create) the database and bring its schema up to date.
    ///
    /// # Errors
    /// The file cannot be opened, is not SQLite, or has a newer schema than this build knows.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let p = path.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        let lock = lock(path, &p)?;
        let mut conn = Connection::open(path).map_err(err)?;
        // WAL: `sqlite3` readers never block the writer and the writer never blocks them.
        // synchronous=FULL: each batch commit is fsynced, so a state change survives a power cut
        // once its batch commits (at most batch_interval after the announce).
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        // A checkpointed WAL is cut back to this size, so a burst of writes does not leave a
        // large file behind.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
            .map_err(err)?;
        // 64 MiB of page cache (the default is 2 MiB): at a million live peers the tables' upper
        // B-tree levels then stay in memory instead of being re-read for every upsert.
        conn.pragma_update(None, "cache_size", -64 * 1024)
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        migrate(&mut conn, &p)?;
        Ok(Store {
            conn,
            path: p,
            _lock: lock,
        })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The live swarm as the database has it, with the files that have a live peer (the
    /// others stay in the database only).
    ///
    /// # Errors
    /// A database error.
    pub fn load(&self) -> Result<(Vec<TorrentRow>, Vec<PeerRow>), StoreError> {
        let (t, p, _) = self.load_all()?;
        Ok((t, p))
    }

    /// [`Store::load`] and the private swarms.
    ///
    /// # Errors
    /// A database error.
    #[allow(clippy::type_complexity)]
    pub fn load_all(&self) -> Result<(Vec<TorrentRow>, Vec<PeerRow>, Vec<PrivateRow>), StoreError> {
        let privates = (|| {
            let mut stmt = self.conn.prepare(
                "SELECT info_hash, authority, content, version, roster FROM private_swarms",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PrivateRow {
                    info_hash: r.get(0)?,
                    authority: r.get(1)?,
                    content: r.get(2)?,
                    version: r.get(3)?,
                    roster: r.get(4)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })()
        .map_err(|e| self.err(e))?;
        let torrents = (|| {
            let mut stmt = self.conn.prepare(
                "SELECT info_hash, name, length, first_seen FROM torrents
                 WHERE info_hash IN (SELECT info_hash FROM peers)",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(TorrentRow {
                    info_hash: r.get(0)?,
                    name: r.get(1)?,
                    length: r.get(2)?,
                    first_seen: r.get(3)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })()
        .map_err(|e| self.err(e))?;
        let peers = (|| {
            let mut stmt = self.conn.prepare(
                "SELECT info_hash, peer_id, addr, port, have, total, first_seen, last_seen FROM peers",
            )?;
            let rows = stmt.query_map([], |r| {
                let have: u64 = r.get(4)?;
                let total: u64 = r.get(5)?;
                Ok(PeerRow {
                    info_hash: r.get(0)?,
                    peer_id: r.get(1)?,
                    addr: r.get(2)?,
                    port: r.get(3)?,
                    have,
                    total,
                    role: crate::proto::Role::of(have, total).as_str(),
                    first_seen: r.get(6)?,
                    last_seen: r.get(7)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })()
        .map_err(|e| self.err(e))?;
        Ok((torrents, peers, privates))
    }

    /// Write a batch in one transaction. Should a row fail (one the validation let through),
    /// the batch is written again row by row, each in a savepoint, and the failing rows are
    /// logged and skipped: one bad row never takes the others with it.
    ///
    /// Returns the rows skipped.
    ///
    /// # Errors
    /// A database error that is not about one row (disk full, I/O); nothing of the batch is
    /// written then.
    pub fn apply(&mut self, batch: &Batch) -> Result<usize, StoreError> {
        let all = (|| {
            let tx = self.conn.transaction()?;
            for row in batch.rows() {
                write_row(&tx, &row)?;
            }
            tx.commit()
        })();
        match all {
            Ok(()) => return Ok(0),
            Err(e) if !is_row_error(&e) => return Err(self.err(e)),
            Err(e) => tracing::warn!(cause = %e, "a row of the batch failed; writing row by row"),
        }
        let mut skipped = 0;
        let res = (|| {
            let mut tx = self.conn.transaction()?;
            for row in batch.rows() {
                let sp = tx.savepoint()?;
                match write_row(&sp, &row) {
                    Ok(()) => sp.commit()?,
                    Err(e) if is_row_error(&e) => {
                        tracing::error!(cause = %e, row = ?row, "tracker row cannot be stored; skipped");
                        skipped += 1;
                        // Dropping the savepoint rolls back this row only.
                    }
                    Err(e) => return Err(e),
                }
            }
            tx.commit()
        })();
        res.map(|()| skipped).map_err(|e| self.err(e))
    }

    /// Delete at most `max_rows` of the history older than `before` (unix seconds), in one
    /// short transaction. The writer calls it between batches until it returns fewer than
    /// `max_rows`, so retention never holds up announces' commits for long.
    ///
    /// # Errors
    /// A database error.
    pub fn delete_events_before(
        &mut self,
        before: i64,
        max_rows: usize,
    ) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ?1 ORDER BY at LIMIT ?2)",
                params![before, max_rows as i64],
            )
            .map_err(|e| self.err(e))
    }
}

/// One row of a batch, borrowed.
#[derive(Debug)]
enum Row<'a> {
    Private(&'a PrivateRow),
    Torrent(&'a TorrentRow),
    Peer(&'a PeerRow),
    RemovePeer(&'a str, &'a str),
    Event(&'a EventRow),
}

impl Batch {
    /// The rows in the order they must be written (files before their peers).
    fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.privates
            .values()
            .map(Row::Private)
            .chain(self.torrents.iter().map(Row::Torrent))
            .chain(self.peers.iter().map(|((h, id), p)| match p {
                Some(p) => Row::Peer(p),
                None => Row::RemovePeer(h, id),
            }))
            .chain(self.events.iter().map(Row::Event))
    }
}

/// Whether an error is about the row being written (a value SQLite refuses) rather than the
/// database as a whole.
fn is_row_error(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::ToSqlConversionFailure(_)
        | rusqlite::Error::IntegralValueOutOfRange(..) => true,
        rusqlite::Error::SqliteFailure(f, _) => {
            matches!(f.code, C::ConstraintViolation | C::TooBig | C::TypeMismatch)
        }
        _ => false,
    }
}

fn write_row(conn: &Connection, row: &Row<'_>) -> rusqlite::Result<()> {
    match row {
        Row::Private(p) => {
            // Versions only grow: an older row never overwrites a newer one.
            conn.prepare_cached(
                "INSERT INTO private_swarms (info_hash, authority, content, version, roster)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (info_hash) DO UPDATE SET version = excluded.version,
                   roster = excluded.roster
                 WHERE excluded.version > private_swarms.version",
            )?
            .execute(params![
                p.info_hash,
                p.authority,
                p.content,
                p.version,
                p.roster
            ])?;
        }
        Row::Torrent(t) => {
            // A file first announced without a name (a peer waiting for metadata) gets it from
            // the first announce that has one; a known name is never overwritten.
            conn.prepare_cached(
                "INSERT INTO torrents (info_hash, name, length, first_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (info_hash) DO UPDATE SET name = excluded.name, length = excluded.length
                 WHERE torrents.name = '' AND excluded.name <> ''",
            )?
            .execute(params![t.info_hash, t.name, t.length, t.first_seen])?;
        }
        Row::Peer(p) => {
            conn.prepare_cached(
                "INSERT INTO peers (info_hash, peer_id, addr, port, have, total, role, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (info_hash, peer_id) DO UPDATE SET addr = excluded.addr,
                   port = excluded.port, have = excluded.have, total = excluded.total,
                   role = excluded.role, last_seen = excluded.last_seen",
            )?
            .execute(params![
                p.info_hash,
                p.peer_id,
                p.addr,
                p.port,
                p.have,
                p.total,
                p.role,
                p.first_seen,
                p.last_seen
            ])?;
        }
        Row::RemovePeer(h, id) => {
            conn.prepare_cached("DELETE FROM peers WHERE info_hash = ?1 AND peer_id = ?2")?
                .execute(params![h, id])?;
        }
        Row::Event(e) => {
            conn.prepare_cached(
                "INSERT INTO events (at, info_hash, peer_id, addr, port, event, have, total, fingerprint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                e.at,
                e.info_hash,
                e.peer_id,
                e.addr,
                e.port,
                e.event,
                e.have,
                e.total,
                if crate::keys::looks_like_key(&e.peer_id) {
                    crate::keys::fingerprint(&e.peer_id)
                } else {
                    String::new()
                }
            ])?;
        }
    }
    Ok(())
}

/// The schema version this build writes.
pub fn schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

fn migrate(conn: &mut Connection, path: &str) -> Result<(), StoreError> {
    let err = |source| StoreError::Sqlite {
        path: path.to_string(),
        source,
    };
    let tx = conn.transaction().map_err(err)?;
    let found: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .optional()
        .map_err(err)?
        .unwrap_or(0);
    let known = schema_version();
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_string(),
            found,
            known,
        });
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(err)?;
        tracing::info!(migration = name, "applied tracker migration");
        // PRAGMA takes no bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(err)?;
    }
    tx.commit().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, have: u64) -> PeerRow {
        PeerRow {
            info_hash: "a".repeat(64),
            peer_id: id.into(),
            addr: "127.0.0.1".into(),
            port: 7000,
            have,
            total: 10,
            role: crate::proto::Role::of(have, 10).as_str(),
            first_seen: 1,
            last_seen: 2,
        }
    }

    #[test]
    fn it_should_coalesce_peer_rows_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut s = Store::open(&path).unwrap();
        let mut b = Batch::default();
        b.push(Change::Peer(peer("p1", 1)));
        b.push(Change::Peer(peer("p1", 5)));
        b.push(Change::Peer(peer("p2", 10)));
        b.push(Change::Peer(peer("p3", 0)));
        b.push(Change::RemovePeer {
            info_hash: "a".repeat(64),
            peer_id: "p3".into(),
        });
        assert_eq!(b.len(), 3);
        s.apply(&b).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let (_, mut peers) = s.load().unwrap();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        assert_eq!(peers, vec![peer("p1", 5), peer("p2", 10)]);
        assert_eq!(peers[1].role, "seeder");
    }

    #[test]
    fn it_should_skip_a_poison_row_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut s = Store::open(&path).unwrap();
        let mut b = Batch::default();
        b.push(Change::Peer(peer("honest-1", 1)));
        let mut poison = peer("poison", 1);
        poison.have = u64::MAX;
        b.push(Change::Peer(poison));
        b.push(Change::Peer(peer("honest-2", 2)));
        assert_eq!(s.apply(&b).unwrap(), 1);
        let (_, mut peers) = s.load().unwrap();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        assert_eq!(peers, vec![peer("honest-1", 1), peer("honest-2", 2)]);
    }

    #[test]
    fn it_should_learn_a_name_later_but_never_overwrite_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("t.db")).unwrap();
        let t = |name: &str| TorrentRow {
            info_hash: "a".repeat(64),
            name: name.into(),
            length: 7,
            first_seen: 1,
        };
        for name in ["", "late.bin", "other.bin"] {
            let mut b = Batch::default();
            b.push(Change::Torrent(t(name)));
            b.push(Change::Peer(peer("p", 1)));
            s.apply(&b).unwrap();
        }
        assert_eq!(s.load().unwrap().0, vec![t("late.bin")]);
    }

    #[test]
    fn it_should_delete_history_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("t.db")).unwrap();
        let mut b = Batch::default();
        for at in 0..2500 {
            b.push(Change::Event(EventRow {
                at,
                info_hash: "a".repeat(64),
                peer_id: "p".into(),
                addr: "127.0.0.1".into(),
                port: 1,
                event: "started",
                have: 0,
                total: 1,
            }));
        }
        s.apply(&b).unwrap();
        let mut chunks = Vec::new();
        loop {
            let n = s.delete_events_before(2000, 1000).unwrap();
            chunks.push(n);
            if n < 1000 {
                break;
            }
        }
        assert_eq!(chunks, [1000, 1000, 0]);
        let left: i64 = s
            .conn
            .query_row("SELECT min(at) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 2000);
    }

    #[test]
    fn it_should_refuse_a_second_store_on_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let first = Store::open(&path).unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("t.db") && e.contains("in use by another tracker"),
            "{e}"
        );
        drop(first);
        Store::open(&path).unwrap();
    }

    #[test]
    fn it_should_refuse_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(Store::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("schema version 99"), "{e}");
    }
}
