//! One torrent inside the daemon: its shared state, the flush that makes resume crash-safe,
//! the whole-file check, completion, and its status.
//!
//! # The crash-safety invariant
//! A piece's bit is set in sled only after its bytes are durable, and sled is flushed after:
//!
//! 1. a piece arrives and is hashed (`conn`), then copied into the map: its bytes are now in
//!    the page cache, and the piece is *verified* (in memory: served, counted);
//! 2. every `flush_interval`, [`Torrent::flush`] takes the verified-but-not-durable pieces,
//!    fdatasyncs the data file: their bytes are now on disk;
//! 3. only then it sets their bits in the durable bitfield and commits it to sled with a flush.
//!
//! A crash between any two steps leaves sled with bits for durable pieces only, so every set
//! bit names a good piece; at most one flush interval of pieces is fetched again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::Daemon;
use crate::bitfield::Bitfield;
use crate::control::{PeerStatus, TorrentStatus};
use crate::metainfo::{Hash, Metainfo};
use crate::picker::Picker;
use crate::scorer::PeerScore;
use crate::storage::{OpenMode, Storage, StorageError};
use crate::store::{TorrentRecord, TorrentState};

/// Broadcast to the torrent's connections.
#[derive(Debug, Clone, Copy)]
pub enum TorrentEvent {
    /// We verified this piece: tell peers, cancel duplicate requests.
    Have(u32),
}

/// One open connection, by remote peer id.
pub struct ConnEntry {
    pub id: u64,
    pub outgoing: bool,
    pub addr: SocketAddr,
    pub token: CancellationToken,
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
    /// Bits whose data is durable (what sled has or is about to have).
    pub durable: Bitfield,
    /// Verified pieces waiting for the next flush.
    pub pending: Vec<u32>,
    pub peers: HashMap<String, PeerScore>,
    pub conns: HashMap<String, ConnEntry>,
    pub known: HashMap<SocketAddr, Known>,
    /// Bytes of verified pieces received / served this session, and at the last rate tick.
    pub session_down: u64,
    pub session_up: u64,
    rate_mark: (Instant, u64, u64),
    pub down_rate: f64,
    pub up_rate: f64,
    pub rejected_pieces: u64,
    /// Counters changed since the last commit.
    dirty: bool,
}

/// What the prefix hasher waits on: which pieces are verified.
pub struct VerifiedSignal {
    bits: Mutex<Bitfield>,
    cond: Condvar,
    stop: AtomicBool,
}

/// Pieces hashed in order between two writeback kicks (see [`Storage::start_writeback`]).
/// Measured on 1 GiB: starting writeback every 32 MiB brought the final flush from 155 ms to
/// under 10 ms, since the disk works while the download goes on.
const WRITEBACK_BATCH_BYTES: u32 = 32 << 20;

pub struct Torrent {
    pub hash: Hash,
    pub hex: String,
    pub meta: Arc<Metainfo>,
    pub storage: Option<Arc<Storage>>,
    pub state: Mutex<TState>,
    pub events: broadcast::Sender<TorrentEvent>,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    /// Wakes the maintenance task when the last piece is verified.
    pub complete: Notify,
    /// Wakes the announcer (completion, new torrent).
    pub announce_now: Notify,
    /// Wakes the dialer when a tracker gave us peers.
    pub peers_learned: Notify,
    signal: Arc<VerifiedSignal>,
    next_conn_id: std::sync::atomic::AtomicU64,
}

impl Torrent {
    /// Build a torrent from its stored record, opening its data file. A data file that is
    /// missing or short marks it NEEDS RECHECK (with a note) instead of failing.
    ///
    /// # Errors
    /// A record without a readable descriptor.
    pub fn load(
        d: &Arc<Daemon>,
        hash: Hash,
        mut rec: TorrentRecord,
    ) -> anyhow::Result<Arc<Torrent>> {
        let json = rec
            .descriptor
            .as_deref()
            .context("record has no descriptor")?;
        let meta = Arc::new(Metainfo::from_json(json.as_bytes()).context("stored descriptor")?);
        let n = meta.piece_count();
        let mut bits = d
            .store
            .bitfield(&hash, n)?
            .unwrap_or_else(|| Bitfield::new(n));
        let mut storage = None;
        let active = matches!(rec.state, TorrentState::Downloading | TorrentState::Seeding);
        if active {
            let (path, mode) = match rec.state {
                TorrentState::Seeding => (rec.data_path.clone(), OpenMode::ExistingReadOnly),
                _ if bits.count() > 0 => (rec.working_path(), OpenMode::ExistingWritable),
                _ => (rec.working_path(), OpenMode::CreateOrReuse),
            };
            match Storage::open(&path, meta.length, meta.piece_length, mode) {
                Ok(s) => storage = Some(Arc::new(s)),
                Err(e @ (StorageError::Missing { .. } | StorageError::TooShort { .. })) => {
                    warn!(info_hash = %hex::encode(hash), cause = %e, "data file damaged: needs a recheck");
                    rec.note = Some(format!("{e}; run `shoal recheck {}`", hex::encode(hash)));
                    rec.state = TorrentState::NeedsRecheck;
                    d.store.put_torrent(&hash, &rec)?;
                }
                Err(e @ StorageError::NoSpace { .. }) => {
                    warn!(info_hash = %hex::encode(hash), cause = %e, "cannot start the download");
                    rec.note = Some(format!(
                        "{e}; free some space, then run `shoal recheck {}`",
                        hex::encode(hash)
                    ));
                    rec.state = TorrentState::Failed;
                    d.store.put_torrent(&hash, &rec)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(st) = &storage {
            // Trust, but check: hash a couple of claimed pieces (rqbit's fast-resume check). A
            // file edited or replaced behind our back is caught here, for 2 pieces of reading.
            if let Some(bad) = spot_check(st, &meta, &bits) {
                warn!(info_hash = %hex::encode(hash), piece = bad, "spot check failed: the data changed since it was verified");
                rec.note = Some(format!(
                    "piece {bad} no longer matches its hash: the data file changed; run `shoal recheck {}`",
                    hex::encode(hash)
                ));
                rec.state = TorrentState::NeedsRecheck;
                d.store.put_torrent(&hash, &rec)?;
                storage = None;
            }
        }
        if rec.state == TorrentState::Seeding && !bits.is_complete() {
            // A seeding record always had every piece: a short bitfield means a damaged store.
            warn!(info_hash = %hex::encode(hash), "seeding torrent with an incomplete bitfield: needs a recheck");
            rec.state = TorrentState::NeedsRecheck;
            rec.note = Some("the stored bitfield is incomplete".into());
            storage = None;
            bits = Bitfield::new(n);
        }
        let peers = d.store.scores(&hash)?.into_iter().collect();
        let picker = Picker::new(
            bits.clone(),
            d.cfg.piece_selection,
            d.cfg.random_first_pieces,
        );
        let (events, _) = broadcast::channel(4096);
        Ok(Arc::new(Torrent {
            hash,
            hex: hex::encode(hash),
            storage,
            signal: Arc::new(VerifiedSignal {
                bits: Mutex::new(bits.clone()),
                cond: Condvar::new(),
                stop: AtomicBool::new(false),
            }),
            state: Mutex::new(TState {
                record: rec,
                picker,
                durable: bits,
                pending: Vec::new(),
                peers,
                conns: HashMap::new(),
                known: HashMap::new(),
                session_down: 0,
                session_up: 0,
                rate_mark: (Instant::now(), 0, 0),
                down_rate: 0.0,
                up_rate: 0.0,
                rejected_pieces: 0,
                dirty: false,
            }),
            meta,
            events,
            cancel: d.cancel.child_token(),
            tasks: TaskTracker::new(),
            complete: Notify::new(),
            announce_now: Notify::new(),
            peers_learned: Notify::new(),
            next_conn_id: 0.into(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn record(&self) -> TorrentRecord {
        self.lock().record.clone()
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

    /// Start the torrent's tasks according to its state.
    pub fn start(self: &Arc<Self>, d: &Arc<Daemon>) {
        let state = self.state();
        if !matches!(state, TorrentState::Downloading | TorrentState::Seeding)
            || self.storage.is_none()
        {
            return;
        }
        let t = self.clone();
        let d2 = d.clone();
        self.tasks.spawn(async move { t.maintain(d2).await });
        let t = self.clone();
        let d2 = d.clone();
        self.tasks
            .spawn(async move { super::announce::announce_loop(d2, t).await });
        if state == TorrentState::Downloading {
            let t = self.clone();
            let d2 = d.clone();
            self.tasks
                .spawn(async move { super::announce::dial_loop(d2, t).await });
        }
        info!(info_hash = %self.hex, name = %self.meta.name, state = state.label(), "torrent started");
    }

    /// Stop every task of this torrent and wait for them (the maintenance task makes a last
    /// flush and the announcer says `stopped`).
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

    // === PIECE OUTCOMES (called by connections) ===

    /// A piece from `peer_id` was verified and written.
    pub fn on_verified(&self, index: u32, peer_id: &str, latency_ms: f64) {
        let len = u64::from(self.meta.piece_size(index));
        let complete = {
            let mut s = self.lock();
            if !s.picker.mark_verified(index) {
                return;
            }
            crate::metrics::peer().verified(len);
            s.pending.push(index);
            s.session_down += len;
            s.record.downloaded += len;
            s.dirty = true;
            s.peers
                .entry(peer_id.to_string())
                .or_default()
                .record_piece(len, latency_ms);
            s.picker.is_complete()
        };
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

    /// A piece from `peer_id` failed its hash. Returns whether the peer is now banned.
    pub fn on_hash_failed(&self, index: u32, peer_id: &str, threshold: u32, ban: Duration) -> bool {
        let mut s = self.lock();
        s.picker.mark_failed(index);
        s.rejected_pieces += 1;
        crate::metrics::peer().pieces_rejected.inc();
        let score = s.peers.entry(peer_id.to_string()).or_default();
        score.failures += 1;
        warn!(info_hash = %self.hex, peer = %peer_id, piece = index, failures = score.failures, "piece failed its hash; rejected");
        if score.failures >= threshold && !score.is_banned(crate::fsutil::unix_ms()) {
            score.banned_until = crate::fsutil::unix_ms() + ban.as_millis() as i64;
            crate::metrics::peer().bans.inc();
            warn!(info_hash = %self.hex, peer = %peer_id, until_ms = score.banned_until, "peer banned for sending corrupt pieces");
            return true;
        }
        score.is_banned(crate::fsutil::unix_ms())
    }

    pub fn on_uploaded(&self, peer_id: &str, bytes: u64) {
        let mut s = self.lock();
        s.session_up += bytes;
        crate::metrics::peer().bytes_uploaded.inc_by(bytes);
        s.record.uploaded += bytes;
        s.dirty = true;
        let score = s.peers.entry(peer_id.to_string()).or_default();
        score.pieces_to += 1;
        score.bytes_to += bytes;
    }

    pub fn is_banned(&self, peer_id: &str) -> bool {
        self.lock()
            .peers
            .get(peer_id)
            .is_some_and(|p| p.is_banned(crate::fsutil::unix_ms()))
    }

    // === MAINTENANCE ===

    async fn maintain(self: Arc<Self>, d: Arc<Daemon>) {
        let prefix = if self.is_downloading() {
            let storage = self.storage.clone().expect("started with storage");
            let meta = self.meta.clone();
            let signal = self.signal.clone();
            Some(tokio::task::spawn_blocking(move || {
                prefix_hash(&storage, &meta, &signal)
            }))
        } else {
            None
        };
        let mut prefix = prefix;
        let mut flush_tick = tokio::time::interval(d.cfg.flush_interval);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rate_tick = tokio::time::interval(Duration::from_secs(1));
        if self.lock().picker.is_complete() && self.is_downloading() {
            self.complete.notify_one();
        }
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = flush_tick.tick() => {
                    if let Err(e) = self.flush(&d).await {
                        error!(info_hash = %self.hex, cause = %format!("{e:#}"), "flush failed; will retry");
                    }
                }
                _ = rate_tick.tick() => self.update_rates(),
                _ = self.complete.notified(), if prefix.is_some() => {
                    let handle = prefix.take().expect("checked");
                    let t0 = Instant::now();
                    let whole = handle.await.ok().flatten();
                    info!(info_hash = %self.hex, wait_ms = t0.elapsed().as_millis() as u64, "every piece verified; whole-file hash done");
                    if let Err(e) = self.finish(&d, whole).await {
                        error!(info_hash = %self.hex, cause = %format!("{e:#}"), "cannot complete the download");
                    }
                }
            }
        }
        if let Err(e) = self.flush(&d).await {
            error!(info_hash = %self.hex, cause = %format!("{e:#}"), "final flush failed");
        }
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

    /// Make verified pieces durable, then record them: data sync, then sled. See the module
    /// doc for why in this order.
    ///
    /// # Errors
    /// The data sync or the store commit failed; the pieces stay pending for the next try.
    pub async fn flush(&self, d: &Daemon) -> anyhow::Result<()> {
        let pending = {
            let mut s = self.lock();
            if s.pending.is_empty() && !s.dirty {
                return Ok(());
            }
            std::mem::take(&mut s.pending)
        };
        if !pending.is_empty() {
            if let Some(storage) = self.storage.clone() {
                // Step 2: the bytes of every pending piece reach the disk.
                let synced = tokio::task::spawn_blocking(move || {
                    crate::metrics::timed_sync(|| storage.sync())
                })
                .await?;
                if let Err(e) = synced {
                    self.lock().pending.extend(pending);
                    return Err(e).context("data file sync");
                }
            }
            crate::testhook::crash_point("between-sync-and-commit");
        }
        // Step 3: only now the bits, then the sled flush.
        let (bits, rec, scores) = {
            let mut s = self.lock();
            for &i in &pending {
                s.durable.set(i);
            }
            s.dirty = false;
            let scores: Vec<(String, PeerScore)> = s
                .peers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (s.durable.clone(), s.record.clone(), scores)
        };
        let store = d.store.clone();
        let hash = self.hash;
        tokio::task::spawn_blocking(move || {
            for (id, sc) in &scores {
                store.put_score(&hash, id, sc)?;
            }
            store.commit_progress(&hash, &bits, &rec)
        })
        .await??;
        crate::testhook::crash_point("after-flush");
        Ok(())
    }

    /// Every piece is verified: check the whole-file hash, make it durable, rename `.part`
    /// to the final name, and seed.
    async fn finish(&self, d: &Arc<Daemon>, whole: Option<Hash>) -> anyhow::Result<()> {
        let Some(whole) = whole else {
            return Ok(()); // Stopped before the hash finished; the next start finishes.
        };
        if whole != self.meta.file_sha256 {
            {
                let mut s = self.lock();
                s.record.state = TorrentState::Failed;
                s.record.note = Some(format!(
                    "every piece verified but the whole-file SHA-256 is {} instead of {}",
                    hex::encode(whole),
                    hex::encode(self.meta.file_sha256)
                ));
                s.dirty = true;
            }
            error!(info_hash = %self.hex, "whole-file hash mismatch");
            return self.flush(d).await;
        }
        let t0 = Instant::now();
        self.flush(d).await?;
        info!(info_hash = %self.hex, flush_ms = t0.elapsed().as_millis() as u64, "final data flush done");
        let rec = self.record();
        let part = rec.working_path();
        let final_path = rec.data_path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::rename(&part, &final_path)?;
            crate::fsutil::sync_dir(final_path.parent().unwrap_or(Path::new(".")))
        })
        .await?
        .with_context(|| {
            format!(
                "cannot rename the finished file to {}",
                rec.data_path.display()
            )
        })?;
        {
            let mut s = self.lock();
            s.record.state = TorrentState::Seeding;
            s.record.completed_at = Some(crate::fsutil::unix_ms());
            s.dirty = true;
        }
        self.flush(d).await?;
        info!(info_hash = %self.hex, name = %self.meta.name, path = %rec.data_path.display(), "download complete and verified");
        self.announce_now.notify_one();
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
                    peer_id: id.clone(),
                    addr: conn.map_or(p.addr.clone(), |c| c.addr.ip().to_string()),
                    port: conn.map_or(p.port, |c| c.addr.port()),
                    connected: conn.is_some(),
                    latency_ms: p.latency_ms,
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
            // Only a download has a download rate: a finished torrent must not show a fading one.
            down_rate: if s.record.state == TorrentState::Downloading {
                s.down_rate
            } else {
                0.0
            },
            up_rate: s.up_rate,
            eta_secs: (s.record.state == TorrentState::Downloading && s.down_rate > 1.0)
                .then(|| (left as f64 / s.down_rate) as u64),
            added_at: s.record.added_at,
            completed_at: s.record.completed_at,
            data_path: s.record.working_path().display().to_string(),
            note: s.record.note.clone(),
            rejected_pieces: s.rejected_pieces,
            peers,
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
        }
    }
}

/// Hash up to two random claimed pieces; returns the first that does not match.
fn spot_check(storage: &Storage, meta: &Metainfo, bits: &Bitfield) -> Option<u32> {
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
fn prefix_hash(storage: &Storage, meta: &Metainfo, signal: &VerifiedSignal) -> Option<Hash> {
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

/// Re-hash a stopped torrent's data and make the store agree both ways. Returns (good, total).
///
/// # Errors
/// The store cannot be written.
pub async fn recheck(d: &Arc<Daemon>, t: &Torrent) -> anyhow::Result<(u32, u32)> {
    let mut rec = t.record();
    let meta = t.meta.clone();
    let n = meta.piece_count();
    // Where the bytes are: the final file if it exists, else the .part.
    let path = if rec.data_path.is_file() {
        rec.data_path.clone()
    } else {
        crate::store::part_path(&rec.data_path)
    };
    let good = match Storage::open(
        &path,
        meta.length,
        meta.piece_length,
        OpenMode::ExistingReadOnly,
    ) {
        Ok(s) => {
            let m = meta.clone();
            tokio::task::spawn_blocking(move || crate::hashing::hash_pieces(s.data(), &m, &|_| {}))
                .await?
        }
        Err(e) => {
            warn!(info_hash = %t.hex, cause = %e, "recheck: data unreadable; every piece is missing");
            Bitfield::new(n)
        }
    };
    let count = good.count();
    rec.note = None;
    if good.is_complete() && path == rec.data_path {
        rec.state = TorrentState::Seeding;
    } else {
        if path == rec.data_path {
            // A damaged final file goes back to being a download under the .part name.
            std::fs::rename(&rec.data_path, crate::store::part_path(&rec.data_path))?;
        }
        rec.state = TorrentState::Downloading;
        rec.completed_at = None;
    }
    d.store.commit_progress(&t.hash, &good, &rec)?;
    info!(info_hash = %t.hex, good = count, total = n, "recheck done");
    Ok((count, n))
}
