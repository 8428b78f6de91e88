//! One active torrent session: what its connections share (picker, scores, peer table,
//! rates), the flush that keeps resume crash-safe, and the whole-file hash.
//!
//! A [`Torrent`] exists only while its owner ([`super::owner`]) has it downloading or seeding;
//! the owner creates it, stops it (waiting for every task and every in-flight write), and
//! does everything that changes its lifecycle. Connections hold an `Arc<Torrent>`: the
//! narrow handle. The session reports to its owner through [`OwnerEvent`]s.
//!
//! # The crash-safety invariant
//! A piece's bit is set in sled only after its bytes are durable, and sled is flushed after:
//!
//! 1. a piece arrives and is hashed (`conn`), then written through the piece store, which
//!    returns a receipt: its bytes are in the page cache, and the piece is *verified* (in
//!    memory: served, counted);
//! 2. every `flush_interval`, [`Torrent::flush`] syncs the data file, which returns a token
//!    covering every receipt so far ([`crate::storage::durable`]);
//! 3. only with both it sets the bits, and commits them to sled with a durable flush.
//!
//! A crash between any two steps leaves sled with bits for durable pieces only. A failed sync
//! poisons the file and the owner takes the torrent to NEEDS RECHECK; a working file deleted
//! or replaced under us is caught before its bits are committed.
//!
//! Lock order: `flush_lock` (async) before `state`; `durable` is taken alone.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bitfield::Bitfield;
use crate::control::{PeerStatus, TorrentStatus};
use crate::metainfo::{Hash, Metainfo};
use crate::picker::Picker;
use crate::scorer::PeerScore;
use crate::storage::durable::{flush_step, Durable, PieceStore, SyncFailed, Written};
use crate::store::{FileId, Store, TorrentRecord, TorrentState};
use crate::superseed::SuperSeed;

/// Remote peers whose scores a torrent keeps (memory and store); past it the least useful
/// is evicted. Bounds what fresh peer ids can make us hold.
pub const MAX_SCORES: usize = 512;
/// Peer addresses a torrent remembers from trackers.
pub const MAX_KNOWN: usize = 1024;
/// How long a store commit may take before the torrent is failed rather than left hanging
/// (sled can block for good on a full disk).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Broadcast to the torrent's connections.
#[derive(Debug, Clone)]
pub enum TorrentEvent {
    /// We verified this piece: tell peers, cancel duplicate requests.
    Have(u32),
    /// A newer roster of this private swarm: pass it on, and close connections to peers it
    /// no longer admits.
    Roster(Arc<shoal_tracker::roster::Roster>),
    /// Super-seeding ended (every piece reached a leecher): show every peer all we have.
    AdvertiseAll,
    /// We are receiving this piece and relay it as it comes ([`super::relay`]): tell peers
    /// that lack it and read RECEIVING.
    Receiving(u32),
}

/// What a session tells its owner.
#[derive(Debug)]
pub enum OwnerEvent {
    /// Every piece is verified; the whole-file hash (None when stopped first).
    AllVerified(Option<Hash>),
    /// A tree: every selected piece is verified (each piece's hash is in the info hash, and a
    /// selection may leave files out, so there is no whole-content hash to wait for).
    TreeVerified,
    /// The data can no longer be trusted or written: go to `state` with `note`.
    Fault {
        state: TorrentState,
        note: String,
        /// The data file is gone: no bit can stand.
        clear_bits: bool,
    },
}

/// One open connection, by remote peer id.
pub struct ConnEntry {
    pub id: u64,
    pub outgoing: bool,
    pub addr: SocketAddr,
    pub token: CancellationToken,
    /// Pieces the peer has said it has (None: no BITFIELD yet): how far behind the swarm we
    /// are ([`crate::scorer::lagging`]).
    pub have: Option<u32>,
}

/// A peer address learned from a tracker.
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub next_try: Option<Instant>,
    pub failures: u32,
}

pub struct TState {
    pub record: TorrentRecord,
    pub picker: Picker,
    pub peers: HashMap<String, PeerScore>,
    /// Scores changed or dropped since the last commit.
    scores_changed: HashSet<String>,
    scores_removed: HashSet<String>,
    pub conns: HashMap<String, ConnEntry>,
    pub known: HashMap<SocketAddr, Known>,
    /// Bytes of verified pieces received / served this session, and at the last rate tick.
    pub session_down: u64,
    pub session_up: u64,
    rate_mark: (Instant, u64, u64),
    pub down_rate: f64,
    pub up_rate: f64,
    pub rejected_pieces: u64,
    /// What this seeder offered and uploaded, piece by piece.
    pub seed: SuperSeed,
    /// Record fields changed since the last commit.
    dirty: bool,
}

impl TState {
    /// The score of `peer`, made (evicting the least useful when full) if new.
    pub fn score(&mut self, peer: &str) -> &mut PeerScore {
        let now = crate::fsutil::unix_ms();
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_SCORES {
            let victim = self
                .peers
                .iter()
                .filter(|(id, _)| !self.conns.contains_key(*id))
                .min_by_key(|(_, s)| s.keep_key(now))
                .or_else(|| self.peers.iter().min_by_key(|(_, s)| s.keep_key(now)))
                .map(|(id, _)| id.clone());
            if let Some(v) = victim {
                self.peers.remove(&v);
                self.scores_changed.remove(&v);
                self.scores_removed.insert(v);
            }
        }
        self.scores_removed.remove(peer);
        self.scores_changed.insert(peer.to_string());
        let s = self.peers.entry(peer.to_string()).or_default();
        s.last_seen_ms = now;
        s
    }

    /// Remember a tracker-given address, within [`MAX_KNOWN`] (the most failing goes first).
    pub fn learn_addr(&mut self, addr: SocketAddr) {
        if self.known.contains_key(&addr) {
            return;
        }
        if self.known.len() >= MAX_KNOWN {
            let worst = self
                .known
                .iter()
                .max_by_key(|(_, k)| k.failures)
                .map(|(a, _)| *a);
            match worst {
                Some(w) if self.known[&w].failures > 0 => {
                    self.known.remove(&w);
                }
                _ => return,
            }
        }
        self.known.insert(addr, Known::default());
    }

    pub fn touch(&mut self) {
        self.dirty = true;
    }
}

/// What the prefix hasher waits on: which pieces are verified.
pub struct VerifiedSignal {
    bits: Mutex<Bitfield>,
    cond: Condvar,
    stop: AtomicBool,
}

/// Pieces hashed in order between two writeback kicks (see [`PieceStore::start_writeback`]).
/// Measured on 1 GiB: starting writeback every 32 MiB brought the final flush from 155 ms to
/// under 10 ms, since the disk works while the download goes on.
const WRITEBACK_BATCH_BYTES: u32 = 32 << 20;

/// Why a flush did not commit.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Sync(#[from] SyncFailed),
    #[error("the working file {0} was deleted or replaced during the download")]
    WorkingGone(String),
    #[error("the store could not record progress: {0}")]
    Store(String),
}

/// Where a download's working file is, to check it is still ours at each flush.
pub struct WorkingCheck {
    pub out_dir: PathBuf,
    pub id: FileId,
}

pub struct Torrent {
    pub hash: Hash,
    pub hex: String,
    pub meta: Arc<Metainfo>,
    pub storage: Arc<dyn PieceStore>,
    state: Mutex<TState>,
    durable: Arc<Mutex<Durable>>,
    flush_lock: tokio::sync::Mutex<()>,
    store: Store,
    working: Option<WorkingCheck>,
    pub events: broadcast::Sender<TorrentEvent>,
    pub cancel: CancellationToken,
    /// Every task of the session, and every in-flight write (a token per write job).
    pub tasks: TaskTracker,
    owner: mpsc::UnboundedSender<OwnerEvent>,
    /// Wakes the announcer (completion, new torrent).
    pub announce_now: Notify,
    /// Wakes the dialer when a tracker gave us peers.
    pub peers_learned: Notify,
    /// Super-seeding: a piece we gave a leecher reached another one, so a leecher held back
    /// for holding the only copy of several may be offered more.
    pub spread: Notify,
    complete: Notify,
    signal: Arc<VerifiedSignal>,
    next_conn_id: std::sync::atomic::AtomicU64,
    /// Who may join, for a private swarm; `None` for a public one.
    pub membership: Option<super::membership::Membership>,
    /// Pieces being received, open to relay as their parts land.
    pub relays: Arc<super::relay::Relays>,
}

/// Everything a session is built from.
pub struct SessionParts {
    pub hash: Hash,
    pub meta: Arc<Metainfo>,
    pub record: TorrentRecord,
    pub bits: Bitfield,
    pub storage: Arc<dyn PieceStore>,
    pub working: Option<WorkingCheck>,
    pub scores: Vec<(String, PeerScore)>,
    pub store: Store,
    pub picker: Picker,
    pub owner: mpsc::UnboundedSender<OwnerEvent>,
    pub cancel: CancellationToken,
    /// A private swarm's stored roster.
    pub roster: Option<shoal_tracker::roster::Roster>,
    /// Spread pieces one peer at a time while seeding alone (see [`crate::superseed`]).
    pub super_seed: bool,
}

impl Torrent {
    pub fn new(p: SessionParts) -> Arc<Torrent> {
        let (events, _) = broadcast::channel(4096);
        let mut peers: HashMap<String, PeerScore> = p.scores.into_iter().collect();
        // A store from before the cap may hold more: keep the most useful.
        if peers.len() > MAX_SCORES {
            let now = crate::fsutil::unix_ms();
            let mut v: Vec<_> = peers.into_iter().collect();
            v.sort_by_key(|(_, s)| std::cmp::Reverse(s.keep_key(now)));
            v.truncate(MAX_SCORES);
            peers = v.into_iter().collect();
        }
        let membership = super::membership::Membership::of(&p.meta, p.roster);
        let n = p.meta.piece_count();
        // Only a session that starts with every piece is a seeder whose upload to spread; one
        // that completes later has shown its peers its pieces as they came.
        let seed = SuperSeed::new(n, p.super_seed && n > 0 && p.bits.count() == n);
        Arc::new(Torrent {
            membership,
            relays: Arc::default(),
            hash: p.hash,
            hex: hex::encode(p.hash),
            signal: Arc::new(VerifiedSignal {
                bits: Mutex::new(p.bits.clone()),
                cond: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            state: Mutex::new(TState {
                record: p.record,
                picker: p.picker,
                peers,
                scores_changed: HashSet::new(),
                scores_removed: HashSet::new(),
                conns: HashMap::new(),
                known: HashMap::new(),
                session_down: 0,
                session_up: 0,
                rate_mark: (Instant::now(), 0, 0),
                down_rate: 0.0,
                up_rate: 0.0,
                rejected_pieces: 0,
                seed,
                dirty: false,
            }),
            durable: Arc::new(Mutex::new(Durable::new(p.bits))),
            flush_lock: tokio::sync::Mutex::new(()),
            store: p.store,
            working: p.working,
            storage: p.storage,
            meta: p.meta,
            events,
            cancel: p.cancel,
            tasks: TaskTracker::new(),
            owner: p.owner,
            announce_now: Notify::new(),
            peers_learned: Notify::new(),
            spread: Notify::new(),
            complete: Notify::new(),
            next_conn_id: 0.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn record(&self) -> TorrentRecord {
        self.lock().record.clone()
    }

    /// Change the record (the owner's lifecycle steps); committed with the next flush.
    pub fn update_record(&self, f: impl FnOnce(&mut TorrentRecord)) {
        let mut s = self.lock();
        f(&mut s.record);
        s.dirty = true;
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, TState> {
        self.state.lock().expect("torrent state lock poisoned")
    }

    pub fn state(&self) -> TorrentState {
        self.lock().record.state
    }

    pub fn is_downloading(&self) -> bool {
        self.state() == TorrentState::Downloading
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The durable bits as of now.
    pub fn durable_bits(&self) -> Bitfield {
        self.durable.lock().expect("durable lock").bits().clone()
    }

    /// Stop every task of this session and wait for them and for every in-flight write.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.signal.stop.store(true, Ordering::Relaxed);
        self.signal.cond.notify_all();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            warn!(info_hash = %self.hex, "torrent tasks did not stop within 10s");
        }
    }

    // === PIECE OUTCOMES (called by connections and write jobs) ===

    /// A piece from `peer_id` was verified and written (`w` is the write's receipt).
    pub fn on_verified(&self, w: Written, peer_id: &str, latency_ms: f64) {
        let index = w.index();
        let len = u64::from(self.meta.piece_size(index));
        let complete = {
            let mut s = self.lock();
            if !s.picker.mark_verified(index) {
                return;
            }
            crate::metrics::peer().verified(len);
            s.session_down += len;
            s.record.downloaded += len;
            s.dirty = true;
            s.score(peer_id).record_piece(len, latency_ms);
            s.picker.is_complete()
        };
        self.durable.lock().expect("durable lock").written(w);
        {
            let mut bits = self.signal.bits.lock().expect("signal lock");
            bits.set(index);
            self.signal.cond.notify_all();
        }
        // Nobody listening is fine: connections come and go.
        let _ = self.events.send(TorrentEvent::Have(index));
        if complete {
            self.complete.notify_one();
        }
    }

    /// A piece from `peer_id` failed its hash; `banned_until` (unix ms) when the daemon's
    /// bans now hold it.
    pub fn on_hash_failed(&self, index: u32, peer_id: &str, banned_until: Option<i64>) {
        let mut s = self.lock();
        s.picker.mark_failed(index);
        s.rejected_pieces += 1;
        crate::metrics::peer().pieces_rejected.inc();
        let hex = &self.hex;
        let score = s.score(peer_id);
        score.failures += 1;
        warn!(info_hash = %hex, peer = %peer_id, piece = index, failures = score.failures, "piece failed its hash; rejected");
        if let Some(until) = banned_until {
            score.banned_until = until;
            crate::metrics::peer().bans.inc();
            warn!(info_hash = %hex, peer = %peer_id, until_ms = until, "peer banned (key and address) for sending corrupt pieces");
        }
    }

    /// We start sending piece `index`: counted for super-seeding before the first byte goes,
    /// so the leecher's HAVE for it can never arrive first and look like another source's.
    pub fn on_upload_start(&self, index: u32) {
        if self.lock().seed.on_uploaded(index) {
            info!(info_hash = %self.hex, "super-seeding: every piece reached a leecher; second copies of the rarest next");
        }
    }

    /// We sent piece `index` (`bytes` long) to `peer_id`.
    pub fn on_uploaded(&self, peer_id: &str, bytes: u64) {
        let mut s = self.lock();
        s.session_up += bytes;
        crate::metrics::peer().bytes_uploaded.inc_by(bytes);
        s.record.uploaded += bytes;
        s.dirty = true;
        let score = s.score(peer_id);
        score.pieces_to += 1;
        score.bytes_to += bytes;
    }

    // === MEMBERSHIP ===

    /// Whether `peer_id` may take part: anyone in a public swarm.
    pub fn admits(&self, peer_id: &str) -> bool {
        self.membership.as_ref().is_none_or(|m| m.admits(peer_id))
    }

    /// The held roster's version (0: none, or a public swarm).
    pub fn roster_version(&self) -> u64 {
        self.membership
            .as_ref()
            .map_or(0, super::membership::Membership::version)
    }

    /// Keep a roster learnt from a peer, a tracker or the authority's command if it is newer
    /// and checks; then persist it and tell every connection. Returns whether it was kept.
    ///
    /// # Errors
    /// A public swarm, or a roster that is not this swarm's or does not check.
    pub async fn adopt_roster(&self, r: shoal_tracker::roster::Roster) -> Result<bool, String> {
        let m = self
            .membership
            .as_ref()
            .ok_or("a roster for a public swarm")?;
        if !m.adopt(r)? {
            return Ok(false);
        }
        let held = m.roster().expect("just adopted");
        let (store, hash, r) = (self.store.clone(), self.hash, held.clone());
        match tokio::task::spawn_blocking(move || store.put_roster(&hash, &r)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(info_hash = %self.hex, cause = %e, "cannot persist the roster"),
            Err(e) => warn!(info_hash = %self.hex, cause = %e, "cannot persist the roster"),
        }
        info!(info_hash = %self.hex, version = held.version, members = held.members.len(), "new roster");
        let _ = self.events.send(TorrentEvent::Roster(held));
        self.announce_now.notify_one();
        Ok(true)
    }

    // === MAINTENANCE ===

    /// The session's maintenance task: flush every interval, rates every second, and the
    /// whole-file hash behind the download. Reports faults and completion to the owner.
    pub async fn maintain(self: Arc<Self>, flush_interval: Duration) {
        let mut tree_wait = self.is_downloading() && self.meta.is_tree();
        let mut prefix = (self.is_downloading() && !self.meta.is_tree()).then(|| {
            let storage = self.storage.clone();
            let meta = self.meta.clone();
            let signal = self.signal.clone();
            tokio::task::spawn_blocking(move || prefix_hash(&*storage, &meta, &signal))
        });
        let mut flush_tick = tokio::time::interval(flush_interval);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rate_tick = tokio::time::interval(Duration::from_secs(1));
        if self.lock().picker.is_complete() && self.is_downloading() {
            self.complete.notify_one();
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = flush_tick.tick() => {
                    if let Err(e) = self.flush().await {
                        self.report_fault(e);
                        break;
                    }
                }
                _ = rate_tick.tick() => self.update_rates(),
                _ = self.complete.notified(), if tree_wait => {
                    tree_wait = false;
                    info!(info_hash = %self.hex, "every selected piece verified");
                    let _ = self.owner.send(OwnerEvent::TreeVerified);
                }
                _ = self.complete.notified(), if prefix.is_some() => {
                    let handle = prefix.take().expect("checked");
                    let whole = handle.await.ok().flatten();
                    info!(info_hash = %self.hex, "every piece verified; whole-file hash done");
                    // The owner may be gone if we are stopping: nothing to report then.
                    let _ = self.owner.send(OwnerEvent::AllVerified(whole));
                }
            }
        }
    }

    /// Tell the owner what a failed flush means for the torrent.
    pub fn report_fault(&self, e: FlushError) {
        let (state, clear_bits) = match &e {
            FlushError::Sync(s) if s.is_disk_full() => (TorrentState::Failed, false),
            FlushError::Sync(_) => (TorrentState::NeedsRecheck, false),
            FlushError::WorkingGone(_) => (TorrentState::NeedsRecheck, true),
            FlushError::Store(_) => (TorrentState::Failed, false),
        };
        let hint = match state {
            TorrentState::Failed => "free some space, then run `shoal recheck`",
            _ => "run `shoal recheck` to find what is still good",
        };
        let note = format!("{e}; {hint}");
        warn!(info_hash = %self.hex, %note, "torrent stopped");
        let _ = self.owner.send(OwnerEvent::Fault {
            state,
            note,
            clear_bits,
        });
    }

    fn update_rates(&self) {
        let mut s = self.lock();
        let (t0, d0, u0) = s.rate_mark;
        let dt = t0.elapsed().as_secs_f64().max(1e-3);
        let down = (s.session_down - d0) as f64 / dt;
        let up = (s.session_up - u0) as f64 / dt;
        // Smooth over a few seconds so the display does not flicker.
        s.down_rate = 0.5 * s.down_rate + 0.5 * down;
        s.up_rate = 0.5 * s.up_rate + 0.5 * up;
        s.rate_mark = (Instant::now(), s.session_down, s.session_up);
    }

    /// Make written pieces durable, then record them: data sync (token), bits, sled with a
    /// durable flush. See the module doc for why in this order. Serialized per torrent.
    ///
    /// # Errors
    /// The sync failed (the file is poisoned), the working file is no longer ours, or the
    /// store could not commit.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let _serial = self.flush_lock.lock().await;
        self.flush_locked().await
    }

    /// Hold off every other flush (the owner's completion step renames between two).
    pub async fn flush_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flush_lock.lock().await
    }

    /// [`Torrent::flush`] for a caller that holds [`Torrent::flush_guard`].
    ///
    /// # Errors
    /// As [`Torrent::flush`].
    pub async fn flush_locked(&self) -> Result<(), FlushError> {
        let pending = self.durable.lock().expect("durable lock").has_pending();
        if !pending && !self.lock().dirty {
            return Ok(());
        }
        let bits = if pending {
            let storage = self.storage.clone();
            let durable = self.durable.clone();
            let check = self
                .working
                .as_ref()
                .map(|w| (w.out_dir.clone(), w.id))
                .filter(|_| self.is_downloading());
            let hash = self.hash;
            tokio::task::spawn_blocking(move || -> Result<Bitfield, FlushError> {
                let bits = crate::metrics::timed_sync(|| flush_step(&*storage, &durable))?;
                // After the sync, before any bit: the bytes we synced must still be the
                // file the download will become.
                if let Some((dir, id)) = check {
                    if !crate::storage::files::working_is(&dir, &hash, &id).unwrap_or(false) {
                        return Err(FlushError::WorkingGone(
                            crate::storage::files::working_path(&dir, &hash)
                                .display()
                                .to_string(),
                        ));
                    }
                }
                Ok(bits)
            })
            .await
            .map_err(|e| FlushError::Store(e.to_string()))??
        } else {
            self.durable_bits()
        };
        crate::testhook::crash_point("between-sync-and-commit");
        let (rec, changed, removed) = {
            let mut s = self.lock();
            s.dirty = false;
            let changed: Vec<(String, PeerScore)> = std::mem::take(&mut s.scores_changed)
                .into_iter()
                .filter_map(|id| s.peers.get(&id).map(|p| (id, p.clone())))
                .collect();
            let removed: Vec<String> = std::mem::take(&mut s.scores_removed).into_iter().collect();
            (s.record.clone(), changed, removed)
        };
        let store = self.store.clone();
        let hash = self.hash;
        let commit = tokio::task::spawn_blocking(move || {
            store.put_scores(&hash, &changed, &removed)?;
            store.commit_progress(&hash, &bits, &rec)
        });
        match tokio::time::timeout(STORE_TIMEOUT, commit).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(FlushError::Store(e.to_string())),
            Ok(Err(e)) => return Err(FlushError::Store(e.to_string())),
            Err(_) => {
                return Err(FlushError::Store(format!(
                    "no answer within {}s (disk full?)",
                    STORE_TIMEOUT.as_secs()
                )))
            }
        }
        crate::testhook::crash_point("after-flush");
        Ok(())
    }

    // === STATUS ===

    pub fn status(&self, with_pieces: bool) -> TorrentStatus {
        let s = self.lock();
        let n = self.meta.piece_count();
        let have = s.picker.have().count();
        let left = self.meta.length.saturating_sub(
            (0..n)
                .filter(|&i| s.picker.have().get(i))
                .map(|i| u64::from(self.meta.piece_size(i)))
                .sum::<u64>(),
        );
        let now = crate::fsutil::unix_ms();
        let mut peers: Vec<PeerStatus> = s
            .peers
            .iter()
            .map(|(id, p)| {
                let conn = s.conns.get(id);
                PeerStatus {
                    fingerprint: crate::secure::fingerprint(id),
                    member: self.membership.as_ref().map(|m| m.admits(id)),
                    peer_id: id.clone(),
                    addr: conn.map_or(p.addr.clone(), |c| c.addr.ip().to_string()),
                    port: conn.map_or(p.port, |c| c.addr.port()),
                    connected: conn.is_some(),
                    latency_ms: p.latency_ms,
                    rtt_ms: p.rtt_ms,
                    throughput: p.throughput,
                    score: p.score(),
                    pieces_from: p.pieces_from,
                    pieces_to: p.pieces_to,
                    bytes_from: p.bytes_from,
                    bytes_to: p.bytes_to,
                    failures: p.failures,
                    banned_until: p.is_banned(now).then_some(p.banned_until),
                }
            })
            .collect();
        peers.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.peer_id.cmp(&b.peer_id)));
        let downloading = s.record.state == TorrentState::Downloading;
        TorrentStatus {
            info_hash: self.hex.clone(),
            name: self.meta.name.clone(),
            length: self.meta.length,
            piece_length: self.meta.piece_length,
            pieces: n,
            have,
            state: s.record.state.label().to_string(),
            progress: if n == 0 {
                1.0
            } else {
                f64::from(have) / f64::from(n)
            },
            downloaded: s.record.downloaded,
            uploaded: s.record.uploaded,
            // A finished download receives nothing: no fading rate after completion.
            down_rate: if downloading { s.down_rate } else { 0.0 },
            up_rate: s.up_rate,
            eta_secs: (downloading && s.down_rate > 1.0)
                .then(|| (left as f64 / s.down_rate) as u64),
            added_at: s.record.added_at,
            completed_at: s.record.completed_at,
            data_path: s.record.working_path_for(&self.hash).display().to_string(),
            note: s.record.note.clone(),
            rejected_pieces: s.rejected_pieces,
            private: self.meta.is_private(),
            roster_version: self.roster_version(),
            super_seeding: s.seed.is_active(),
            first_round_repeats: s.seed.repeats(),
            peers,
            piece_uploads: if with_pieces {
                s.seed.uploads().to_vec()
            } else {
                Vec::new()
            },
            piece_states: if with_pieces {
                (0..n)
                    .map(|i| {
                        (
                            s.picker.have().get(i),
                            s.picker.availability(i),
                            s.picker.in_flight(i),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
            files: if with_pieces {
                super::tree_data::file_states(&self.meta, &s.record, |i| s.picker.have().get(i))
            } else {
                Vec::new()
            },
        }
    }
}

/// Hash up to two random claimed pieces; returns the first that does not match.
pub fn spot_check(storage: &dyn PieceStore, meta: &Metainfo, bits: &Bitfield) -> Option<u32> {
    use rand::seq::IteratorRandom;
    let mut bounce = crate::hashing::bounce_buffer();
    let picks = bits.ones().choose_multiple(&mut rand::thread_rng(), 2);
    picks.into_iter().find(|&i| {
        storage.prefetch_exact(i);
        let ok =
            crate::hashing::sha256_mapped(storage.piece(i), &mut bounce) == meta.pieces[i as usize];
        storage.release(i);
        !ok
    })
}

/// Hash the file from the front as pieces become verified, so the whole-file check costs
/// little extra time at the end. Returns `None` when stopped first.
fn prefix_hash(storage: &dyn PieceStore, meta: &Metainfo, signal: &VerifiedSignal) -> Option<Hash> {
    let mut h = Sha256::new();
    let mut bounce = crate::hashing::bounce_buffer();
    let batch = (WRITEBACK_BATCH_BYTES / meta.piece_length).max(1);
    for i in 0..meta.piece_count() {
        let mut bits = signal.bits.lock().expect("signal lock");
        while !bits.get(i) {
            if signal.stop.load(Ordering::Relaxed) {
                return None;
            }
            bits = signal
                .cond
                .wait_timeout(bits, Duration::from_millis(200))
                .expect("signal lock")
                .0;
        }
        drop(bits);
        storage.prefetch(i);
        crate::hashing::update_via(&mut h, storage.piece(i), &mut bounce);
        storage.release(i);
        // Pieces behind the hash are written and final: let the disk start on them now.
        if (i + 1) % batch == 0 {
            storage.start_writeback(i + 1 - batch, i + 1);
        }
    }
    Some(h.finalize().into())
}
