//! The owner of one torrent: a task that handles its commands in order and does every
//! lifecycle step (activate, pause, resume, recheck, remove, finish, fault, shutdown).
//!
//! Nothing else changes a torrent's state: control commands are messages in its mailbox
//! ([`super::registry::Cmd`]), a running session reports through [`OwnerEvent`]s, and a
//! descriptor fetched from the swarm arrives on its own channel. Each command is answered
//! once its effect is durable (sled flushed with a sync). Everything blocking (opening and
//! reserving files, hashing, sled) runs on blocking threads; sled calls are bounded by
//! [`STORE_TIMEOUT`] so a full disk gives FAILED, not a hang.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::net::Net;
use super::registry::{Cmd, Envelope, Registry, TorrentHandle};
use super::torrent::{spot_check, OwnerEvent, SessionParts, Torrent, WorkingCheck, STORE_TIMEOUT};
use crate::bitfield::Bitfield;
use crate::control::TorrentStatus;
use crate::metainfo::{Hash, Metainfo};
use crate::picker::Picker;
use crate::storage::durable::PieceStore;
use crate::storage::{files, Storage, StorageError};
use crate::store::{Store, TorrentRecord, TorrentState};

/// What every owner shares: the daemon's parts an owner may use.
pub struct Ctx {
    pub net: Arc<Net>,
    pub store: Store,
    pub registry: Arc<Registry>,
    /// The daemon's root token: sessions are its children.
    pub root: CancellationToken,
    pub tasks: TaskTracker,
}

/// How an owner starts.
pub enum Start {
    /// From the store, at daemon start; `ready` fires once the torrent is started (or
    /// parked), so the daemon answers no command before every torrent's state is known.
    Load { ready: oneshot::Sender<()> },
    /// A new torrent: persist it (with these bits), answer, then start.
    New {
        bits: Bitfield,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// The status of a torrent that has no session.
pub fn snapshot(hash: &Hash, rec: &TorrentRecord, bits: &Bitfield) -> TorrentStatus {
    let have = bits.count();
    let meta = rec
        .descriptor
        .as_deref()
        .and_then(|j| Metainfo::from_json(j.as_bytes()).ok());
    let (name, length, piece_length, pieces) = match &meta {
        Some(m) => (m.name.clone(), m.length, m.piece_length, m.piece_count()),
        None => ("(descriptor not fetched yet)".to_string(), 0, 0, 0),
    };
    TorrentStatus {
        info_hash: hex::encode(hash),
        name,
        length,
        piece_length,
        pieces,
        have,
        state: rec.state.label().into(),
        progress: if pieces == 0 {
            0.0
        } else {
            f64::from(have) / f64::from(pieces)
        },
        downloaded: rec.downloaded,
        uploaded: rec.uploaded,
        added_at: rec.added_at,
        completed_at: rec.completed_at,
        data_path: rec.working_path_for(hash).display().to_string(),
        note: rec.note.clone(),
        // Kept for `query` (the handle strips it for `status`).
        piece_states: (0..bits.len()).map(|i| (bits.get(i), 0, 0)).collect(),
        files: meta.as_ref().map_or_else(Vec::new, |m| {
            super::tree_data::file_states(m, rec, |i| i < bits.len() && bits.get(i))
        }),
        ..Default::default()
    }
}

/// Make an owner for `hash`, claim the hash, and start it. Returns the existing handle if
/// the hash already has an owner (nothing is started then).
pub fn spawn(
    ctx: &Arc<Ctx>,
    hash: Hash,
    rec: TorrentRecord,
    start: Start,
) -> Result<Arc<TorrentHandle>, Arc<TorrentHandle>> {
    let (handle, mailbox) = TorrentHandle::new(hash, snapshot(&hash, &rec, &Bitfield::new(0)));
    ctx.registry.claim(handle.clone())?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (meta_tx, meta_rx) = mpsc::channel(1);
    let owner = Owner {
        ctx: ctx.clone(),
        handle: handle.clone(),
        hash,
        hex: hex::encode(hash),
        bits: Bitfield::new(0),
        rec,
        live: None,
        fetch: None,
        events_tx,
        meta_tx,
    };
    ctx.tasks
        .spawn(owner.run(mailbox, events_rx, meta_rx, start));
    Ok(handle)
}

struct Owner {
    ctx: Arc<Ctx>,
    handle: Arc<TorrentHandle>,
    hash: Hash,
    hex: String,
    /// Durable bits while there is no session (a session keeps its own).
    bits: Bitfield,
    /// The record while there is no session (a session keeps its own).
    rec: TorrentRecord,
    live: Option<Arc<Torrent>>,
    fetch: Option<CancellationToken>,
    events_tx: mpsc::UnboundedSender<OwnerEvent>,
    meta_tx: mpsc::Sender<Metainfo>,
}

/// What opening a torrent's data found.
pub(super) enum Opened {
    Session {
        storage: Arc<dyn PieceStore>,
        bits: Bitfield,
        rec: TorrentRecord,
        working: Option<WorkingCheck>,
    },
    /// Not startable: the record (state and note) and bits to persist.
    Parked { rec: TorrentRecord, bits: Bitfield },
}

impl Owner {
    async fn run(
        mut self,
        mut mailbox: mpsc::Receiver<Envelope>,
        mut events: mpsc::UnboundedReceiver<OwnerEvent>,
        mut metas: mpsc::Receiver<Metainfo>,
        start: Start,
    ) {
        let mut ready = None;
        match start {
            Start::Load { ready: r } => {
                self.bits = self.stored_bits().await;
                ready = Some(r);
            }
            Start::New { bits, reply } => {
                self.bits = bits;
                let r = self.commit().await;
                let failed = r.is_err();
                let _ = reply.send(r); // The asker may have gone; the torrent is added anyway.
                if failed {
                    self.ctx.registry.release(&self.handle);
                    return;
                }
            }
        }
        self.activate().await;
        if let Some(r) = ready {
            let _ = r.send(()); // The daemon may be stopping.
        }
        loop {
            tokio::select! {
                env = mailbox.recv() => {
                    let Some(env) = env else { break };
                    let (res, end) = self.command(env.cmd).await;
                    let _ = env.reply.send(res); // The asker may have gone.
                    if end {
                        break;
                    }
                }
                Some(ev) = events.recv() => self.on_event(ev).await,
                Some(meta) = metas.recv() => self.on_descriptor(meta).await,
            }
        }
    }

    fn meta(&self) -> Option<Arc<Metainfo>> {
        let rec = self.record();
        rec.descriptor
            .as_deref()
            .and_then(|j| Metainfo::from_json(j.as_bytes()).ok())
            .map(Arc::new)
    }

    fn record(&self) -> TorrentRecord {
        match &self.live {
            Some(t) => t.record(),
            None => self.rec.clone(),
        }
    }

    fn publish_snapshot(&self) {
        if self.live.is_none() {
            self.handle
                .set_snapshot(snapshot(&self.hash, &self.rec, &self.bits));
        }
    }

    /// Status falls back to the snapshot once the session is gone: publish the new one first,
    /// or a status in between shows the state before the session (a stale fault, say).
    fn retire_session(&self) {
        self.handle
            .set_snapshot(snapshot(&self.hash, &self.rec, &self.bits));
        self.handle.set_live(None);
    }

    async fn stored_bits(&self) -> Bitfield {
        let n = self.meta().map_or(0, |m| m.piece_count());
        let store = self.ctx.store.clone();
        let hash = self.hash;
        tokio::task::spawn_blocking(move || store.bitfield(&hash, n))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .unwrap_or_else(|| Bitfield::new(n))
    }

    /// Persist the record and bits durably (bounded: a hung sled gives an error).
    async fn commit(&self) -> anyhow::Result<()> {
        let store = self.ctx.store.clone();
        let (hash, bits, rec) = (self.hash, self.bits.clone(), self.rec.clone());
        let job = tokio::task::spawn_blocking(move || store.commit_progress(&hash, &bits, &rec));
        tokio::time::timeout(STORE_TIMEOUT, job)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the store did not answer within {}s (disk full?)",
                    STORE_TIMEOUT.as_secs()
                )
            })???;
        Ok(())
    }

    // === LIFECYCLE ===

    /// Start what the record's state asks for.
    async fn activate(&mut self) {
        match self.rec.state {
            TorrentState::FetchingMetadata => self.start_fetch(),
            TorrentState::Downloading | TorrentState::Seeding => self.start_session().await,
            _ => {}
        }
        self.publish_snapshot();
    }

    fn start_fetch(&mut self) {
        let token = self.ctx.root.child_token();
        self.fetch = Some(token.clone());
        let (net, hash, rec, tx, handle) = (
            self.ctx.net.clone(),
            self.hash,
            self.rec.clone(),
            self.meta_tx.clone(),
            self.handle.clone(),
        );
        self.ctx.tasks.spawn(async move {
            super::announce::fetch_metadata_task(net, hash, rec, token, tx, move |n| {
                handle.set_note(n)
            })
            .await
        });
    }

    async fn start_session(&mut self) {
        let Some(meta) = self.meta() else {
            self.rec.state = TorrentState::NeedsRecheck;
            self.rec.note = Some("the stored descriptor is damaged".into());
            let _ = self.commit().await; // Reported in status either way.
            return;
        };
        let (hash, rec, bits, m) = (self.hash, self.rec.clone(), self.bits.clone(), meta.clone());
        let opened = tokio::task::spawn_blocking(move || {
            if m.is_tree() {
                super::tree_data::open_tree(&hash, &m, rec, bits)
            } else {
                open_data(&hash, &m, rec, bits)
            }
        })
        .await;
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                error!(info_hash = %self.hex, cause = %e, "opening the data panicked");
                return;
            }
        };
        match opened {
            Opened::Parked { rec, bits } => {
                warn!(info_hash = %self.hex, state = rec.state.label(), note = ?rec.note, "torrent not started");
                self.rec = rec;
                self.bits = bits;
                if let Err(e) = self.commit().await {
                    error!(info_hash = %self.hex, cause = %format!("{e:#}"), "cannot record the torrent's state");
                }
            }
            Opened::Session {
                storage,
                bits,
                rec,
                working,
            } => {
                let changed = rec != self.rec || bits != self.bits;
                self.rec = rec;
                self.bits = bits;
                if changed {
                    // The working file's identity (and any bits it lost) is durable before
                    // a single piece is written into it.
                    if let Err(e) = self.commit().await {
                        self.rec.state = TorrentState::Failed;
                        self.rec.note = Some(format!("cannot record the torrent: {e:#}"));
                        return;
                    }
                }
                let store = self.ctx.store.clone();
                let hash = self.hash;
                let (scores, roster) =
                    tokio::task::spawn_blocking(move || (store.scores(&hash), store.roster(&hash)))
                        .await
                        .map(|(s, r)| (s.unwrap_or_default(), r.ok().flatten()))
                        .unwrap_or_default();
                let cfg = &self.ctx.net.cfg;
                let t = Torrent::new(SessionParts {
                    hash: self.hash,
                    meta: meta.clone(),
                    record: self.rec.clone(),
                    bits: self.bits.clone(),
                    storage,
                    working,
                    scores,
                    store: self.ctx.store.clone(),
                    roster,
                    super_seed: cfg.super_seed,
                    picker: if meta.is_tree() {
                        Picker::with_skip(
                            self.bits.clone(),
                            super::tree_data::skip_bits(&meta, &self.rec),
                            cfg.piece_selection,
                            cfg.random_first_pieces,
                        )
                    } else {
                        Picker::new(
                            self.bits.clone(),
                            cfg.piece_selection,
                            cfg.random_first_pieces,
                        )
                    },
                    owner: self.events_tx.clone(),
                    cancel: self.ctx.root.child_token(),
                });
                let downloading = t.is_downloading();
                let (t2, iv) = (t.clone(), cfg.flush_interval);
                t.tasks.spawn(async move { t2.maintain(iv).await });
                let (n2, t2) = (self.ctx.net.clone(), t.clone());
                t.tasks
                    .spawn(async move { super::announce::announce_loop(n2, t2).await });
                if downloading {
                    let (n2, t2) = (self.ctx.net.clone(), t.clone());
                    t.tasks
                        .spawn(async move { super::announce::dial_loop(n2, t2).await });
                }
                info!(info_hash = %self.hex, name = %t.name(), state = t.state().label(), "torrent started");
                self.handle.set_live(Some(t.clone()));
                self.live = Some(t);
            }
        }
    }

    /// Stop the session (waiting for its tasks and in-flight writes) and the metadata fetch;
    /// the session's last progress is flushed.
    async fn deactivate(&mut self) {
        if let Some(token) = self.fetch.take() {
            token.cancel();
        }
        let Some(t) = self.live.take() else {
            return;
        };
        t.stop().await;
        if let Err(e) = t.flush().await {
            warn!(info_hash = %self.hex, cause = %e, "last flush failed");
        }
        self.rec = t.record();
        self.bits = t.durable_bits();
        self.retire_session();
    }

    async fn command(&mut self, cmd: Cmd) -> (anyhow::Result<String>, bool) {
        let name = self.handle.name();
        match cmd {
            Cmd::Pause => {
                if self.record().state == TorrentState::Paused {
                    return (Ok(format!("{name} is already paused")), false);
                }
                self.deactivate().await;
                self.rec.paused_from = Some(self.rec.state);
                self.rec.state = TorrentState::Paused;
                let r = self.commit().await.map(|_| format!("paused {name}"));
                self.publish_snapshot();
                (r, false)
            }
            Cmd::Resume => {
                if self.record().state != TorrentState::Paused {
                    return (Ok(format!("{name} is not paused")), false);
                }
                self.rec.state = self
                    .rec
                    .paused_from
                    .take()
                    .unwrap_or(TorrentState::Downloading);
                if let Err(e) = self.commit().await {
                    return (Err(e), false);
                }
                self.activate().await;
                (Ok(format!("resumed {name}")), false)
            }
            Cmd::Recheck => {
                let Some(meta) = self.meta() else {
                    return (
                        Err(anyhow::anyhow!(
                            "{} has no descriptor yet: nothing to recheck",
                            self.hex
                        )),
                        false,
                    );
                };
                self.deactivate().await;
                let (hash, rec) = (self.hash, self.rec.clone());
                let m = meta.clone();
                let r = tokio::task::spawn_blocking(move || {
                    if m.is_tree() {
                        super::tree_data::recheck_tree(&hash, &m, rec)
                    } else {
                        recheck_data(&hash, &m, rec)
                    }
                })
                .await;
                let (bits, rec) = match r {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => {
                        self.activate().await;
                        return (Err(e), false);
                    }
                    Err(e) => return (Err(anyhow::anyhow!("recheck panicked: {e}")), false),
                };
                let (good, total) = (bits.count(), meta.piece_count());
                self.bits = bits;
                self.rec = rec;
                if let Err(e) = self.commit().await {
                    return (Err(e), false);
                }
                info!(info_hash = %self.hex, good, total, "recheck done");
                self.activate().await;
                (
                    Ok(format!("recheck of {name}: {good} of {total} pieces good")),
                    false,
                )
            }
            Cmd::Remove { delete_data } => {
                self.deactivate().await;
                self.handle.set_closing();
                let store = self.ctx.store.clone();
                let hash = self.hash;
                let removed =
                    tokio::task::spawn_blocking(move || store.remove_torrent(&hash)).await;
                if let Err(e) = removed
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r.map_err(anyhow::Error::from))
                {
                    return (
                        Err(e.context("cannot remove the torrent from the store")),
                        false,
                    );
                }
                let (rec, hash, hex) = (self.rec.clone(), self.hash, self.hex.clone());
                // Deleting files blocks: off the runtime.
                let msg = tokio::task::spawn_blocking(move || {
                    removal_message(name, &rec, &hash, &hex, delete_data)
                })
                .await
                .unwrap_or_else(|e| format!("removed (deleting its data failed: {e})"));
                self.ctx.registry.release(&self.handle);
                (Ok(msg), true)
            }
            Cmd::Select { only } => (self.select(only).await, false),
            Cmd::Swarm { add, revoke } => (self.swarm(add, revoke).await, false),
            Cmd::Shutdown => {
                self.deactivate().await;
                let r = self.commit().await.map(|_| "stopped".to_string());
                (r, true)
            }
        }
    }

    async fn on_event(&mut self, ev: OwnerEvent) {
        match ev {
            OwnerEvent::AllVerified(whole) => self.finish(whole).await,
            OwnerEvent::TreeVerified => self.finish_tree().await,
            OwnerEvent::Fault {
                state,
                note,
                clear_bits,
            } => {
                let Some(t) = self.live.take() else {
                    return;
                };
                t.stop().await;
                self.rec = t.record();
                self.bits = t.durable_bits();
                if clear_bits {
                    self.bits = Bitfield::new(self.bits.len());
                }
                self.rec.state = state;
                self.rec.note = Some(note);
                self.retire_session();
                if let Err(e) = self.commit().await {
                    error!(info_hash = %self.hex, cause = %format!("{e:#}"), "cannot record the fault");
                }
            }
        }
    }

    /// Every piece is verified: check the whole-file hash, flush, rename into place (never
    /// replacing anything), record SEEDING. The session goes on, now seeding.
    async fn finish(&mut self, whole: Option<Hash>) {
        let Some(t) = self.live.clone() else { return };
        let Some(whole) = whole else { return };
        if whole != t.meta.file_sha256 {
            let note = format!(
                "every piece verified but the whole-file SHA-256 is {} instead of {}",
                hex::encode(whole),
                hex::encode(t.meta.file_sha256)
            );
            error!(info_hash = %self.hex, "whole-file hash mismatch");
            self.park(TorrentState::Failed, note).await;
            return;
        }
        let guard = t.flush_guard().await;
        if let Err(e) = t.flush_locked().await {
            drop(guard);
            t.report_fault(e);
            return;
        }
        let rec = t.record();
        let out_dir = out_dir_of(&rec);
        let (hash, name) = (self.hash, t.meta.name.clone());
        let renamed =
            tokio::task::spawn_blocking(move || files::finish_rename(&out_dir, &hash, &name)).await;
        match renamed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                drop(guard);
                let note = if e.kind() == std::io::ErrorKind::AlreadyExists {
                    format!(
                        "{} already exists; shoal will not replace it: move it away, then run `shoal recheck {}` (the verified data is kept)",
                        rec.data_path.display(),
                        self.hex
                    )
                } else {
                    format!(
                        "cannot rename the finished file to {}: {e}",
                        rec.data_path.display()
                    )
                };
                self.park(TorrentState::Failed, note).await;
                return;
            }
            Err(e) => {
                error!(info_hash = %self.hex, cause = %e, "rename panicked");
                return;
            }
        }
        seed_placed(&t, guard).await;
        info!(info_hash = %self.hex, name = %t.name(), path = %rec.data_path.display(), "download complete and verified");
    }

    /// A tree's selected pieces are all verified: flush, place every finished selected file
    /// (renamed in, never replacing anything), record SEEDING. The session goes on seeding.
    async fn finish_tree(&mut self) {
        let Some(t) = self.live.clone() else { return };
        let guard = t.flush_guard().await;
        if let Err(e) = t.flush_locked().await {
            drop(guard);
            t.report_fault(e);
            return;
        }
        let (hash, meta, rec) = (self.hash, t.meta.clone(), t.record());
        let placed =
            tokio::task::spawn_blocking(move || super::tree_data::place_tree(&hash, &meta, &rec))
                .await;
        match placed {
            Ok(Ok(_)) => {}
            Ok(Err(e @ crate::storage::StorageError::Replaced { .. })) => {
                drop(guard);
                // Its pieces' bits vouch for bytes that are gone: nothing is trusted until a
                // recheck, as when a sync finds it.
                let note = format!(
                    "{e}; run `shoal recheck {}` to find what is still good",
                    self.hex
                );
                self.park(TorrentState::NeedsRecheck, note).await;
                return;
            }
            Ok(Err(e)) => {
                drop(guard);
                let note = format!(
                    "cannot place the finished files: {e}; move it away, then run `shoal recheck {}` (the verified data is kept)",
                    self.hex
                );
                self.park(TorrentState::Failed, note).await;
                return;
            }
            Err(e) => {
                error!(info_hash = %self.hex, cause = %e, "placing panicked");
                return;
            }
        }
        seed_placed(&t, guard).await;
        info!(info_hash = %self.hex, name = %t.name(), "tree complete and verified");
    }

    /// A private swarm's roster: shown, or (by its authority) changed. The new roster is
    /// durable before the reply, then live connections and trackers hear of it.
    async fn swarm(&mut self, add: Vec<String>, revoke: Vec<String>) -> anyhow::Result<String> {
        let Some(meta) = self.meta() else {
            anyhow::bail!("{} has no descriptor yet", self.hex);
        };
        let Some(authority) = meta.authority.clone() else {
            anyhow::bail!(
                "{} is a public swarm: anyone may join (publish or create with --private to name its members)",
                self.hex
            );
        };
        let live = self.handle.live();
        let (store, hash) = (self.ctx.store.clone(), self.hash);
        let held = match live.as_ref().and_then(|t| t.membership.as_ref()?.roster()) {
            Some(r) => Some((*r).clone()),
            None => tokio::task::spawn_blocking(move || store.roster(&hash)).await??,
        };
        if add.is_empty() && revoke.is_empty() {
            return Ok(super::membership::describe(
                &self.hex,
                &authority,
                held.as_ref(),
            ));
        }
        let net = &self.ctx.net;
        if net.peer_id != authority {
            anyhow::bail!(
                "only the swarm's authority ({}) can change its members; this peer is {}",
                crate::secure::fingerprint(&authority),
                crate::secure::fingerprint(&net.peer_id)
            );
        }
        let next = super::membership::next_roster(
            net.identity.signing_key(),
            &self.hex,
            held.as_ref(),
            &add,
            &revoke,
        )
        .map_err(anyhow::Error::msg)?;
        let (store, r) = (self.ctx.store.clone(), next.clone());
        tokio::task::spawn_blocking(move || store.put_roster(&hash, &r))
            .await?
            .context("cannot record the roster")?;
        if let Some(t) = live {
            t.adopt_roster(next.clone())
                .await
                .map_err(anyhow::Error::msg)?;
        }
        info!(info_hash = %self.hex, version = next.version, members = next.members.len(), "roster changed");
        Ok(super::membership::describe(
            &self.hex,
            &authority,
            Some(&next),
        ))
    }

    /// Change a tree's selection: stop, record the globs, start again (a session downloads
    /// what the new selection lacks; files already placed stay).
    async fn select(&mut self, only: Vec<String>) -> anyhow::Result<String> {
        let Some(meta) = self.meta() else {
            anyhow::bail!("{} has no descriptor yet: nothing to select from", self.hex);
        };
        if !meta.is_tree() {
            anyhow::bail!("{} is one file, not a tree: nothing to select", self.hex);
        }
        let sel = crate::tree::select(&meta.files, &only)?;
        let chosen = sel.iter().filter(|s| **s).count();
        if chosen == 0 {
            anyhow::bail!("--only {only:?} matches none of the {} files", sel.len());
        }
        let state = self.record().state;
        self.deactivate().await;
        self.rec.only = only;
        if matches!(state, TorrentState::Seeding | TorrentState::Downloading) {
            self.rec.state = TorrentState::Downloading;
            self.rec.completed_at = None;
        }
        self.commit().await?;
        self.activate().await;
        Ok(format!("selected {chosen} of {} entries", sel.len()))
    }

    /// Stop the session and park the torrent in `state` with `note`.
    async fn park(&mut self, state: TorrentState, note: String) {
        self.deactivate().await;
        self.rec.state = state;
        self.rec.note = Some(note);
        if let Err(e) = self.commit().await {
            error!(info_hash = %self.hex, cause = %format!("{e:#}"), "cannot record the state");
        }
        self.publish_snapshot();
    }

    /// A descriptor arrived from the swarm (its info hash already checked against ours).
    async fn on_descriptor(&mut self, meta: Metainfo) {
        if self.rec.state != TorrentState::FetchingMetadata || meta.info_hash != self.hash {
            return;
        }
        self.fetch = None;
        // The fetched descriptor is believed for its hashed fields only: its tracker list is
        // a stranger's claim and is dropped before it is stored.
        let mut meta = meta;
        meta.trackers.clear();
        self.rec.data_path = self.rec.data_path.join(&meta.name);
        self.rec.descriptor = Some(String::from_utf8(meta.to_json()).expect("JSON is UTF-8"));
        self.rec.state = TorrentState::Downloading;
        self.bits = Bitfield::new(meta.piece_count());
        if std::fs::symlink_metadata(&self.rec.data_path).is_ok() {
            self.rec.state = TorrentState::Failed;
            self.rec.note = Some(format!(
                "{} already exists; shoal will not overwrite it",
                self.rec.data_path.display()
            ));
        }
        info!(info_hash = %self.hex, name = %meta.name, "descriptor fetched and verified");
        if let Err(e) = self.commit().await {
            error!(info_hash = %self.hex, cause = %format!("{e:#}"), "cannot record the descriptor");
            return;
        }
        self.activate().await;
    }
}

/// Delete what `remove --delete-data` deletes (blocking), and say what was done.
fn removal_message(
    name: String,
    rec: &TorrentRecord,
    hash: &Hash,
    hex: &str,
    delete_data: bool,
) -> String {
    let mut msg = format!("removed {name}");
    let out_dir = out_dir_of(rec);
    if delete_data {
        if rec.descriptor.is_some() {
            if rec.is_complete() && is_plain_file(&rec.data_path) {
                if let Err(e) = std::fs::remove_file(&rec.data_path) {
                    msg.push_str(&format!("; cannot delete {}: {e}", rec.data_path.display()));
                } else {
                    msg.push_str(&format!("; deleted {}", rec.data_path.display()));
                }
            }
            // A tree's working files; its placed files are the user's now
            // (a published tree is the user's own folder) and are kept.
            if let Ok(n @ 1..) = crate::storage::tree::remove_working(&out_dir, hash) {
                msg.push_str(&format!("; deleted {n} working files"));
            }
            if let Ok(true) = files::remove_working(&out_dir, hash) {
                msg.push_str(&format!(
                    "; deleted {}",
                    files::working_path(&out_dir, hash).display()
                ));
            }
        }
    } else if rec.descriptor.is_some() {
        msg.push_str(&format!(
            "; data kept at {}",
            rec.working_path_for(hash).display()
        ));
    } else {
        msg = format!("removed {} (its descriptor was still being fetched)", hex);
    }
    msg
}

/// The finished data is in place (renamed, durably): record SEEDING with a flush still under
/// `guard`, so no flush in between can commit a state that disagrees with the disk.
async fn seed_placed(t: &Torrent, guard: tokio::sync::MutexGuard<'_, ()>) {
    crate::testhook::crash_point("after-rename");
    t.update_record(|r| {
        r.state = TorrentState::Seeding;
        r.completed_at = Some(crate::fsutil::unix_ms());
        r.working_file = None;
        r.note = None;
    });
    let flushed = t.flush_locked().await;
    drop(guard);
    match flushed {
        Ok(()) => t.announce_now.notify_one(),
        Err(e) => t.report_fault(e),
    }
}

pub(super) fn out_dir_of(rec: &TorrentRecord) -> PathBuf {
    rec.data_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn is_plain_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
}

pub(super) fn parked(
    mut rec: TorrentRecord,
    state: TorrentState,
    note: String,
    bits: Bitfield,
) -> Opened {
    rec.state = state;
    rec.note = Some(note);
    Opened::Parked { rec, bits }
}

/// A claimed piece failed the start-up spot check: the data changed since it was verified.
fn changed_behind_our_back(rec: TorrentRecord, bad: u32, bits: Bitfield) -> Opened {
    let hex = rec
        .descriptor
        .as_deref()
        .and_then(|j| Metainfo::from_json(j.as_bytes()).ok())
        .map_or_else(String::new, |m| m.info_hash_hex());
    parked(
        rec,
        TorrentState::NeedsRecheck,
        format!("piece {bad} no longer matches its hash: the data file changed; run `shoal recheck {hex}`"),
        bits,
    )
}

/// Open a torrent's data for a session (blocking: files, fallocate, spot-check hashing).
fn open_data(hash: &Hash, meta: &Metainfo, mut rec: TorrentRecord, bits: Bitfield) -> Opened {
    let hex = hex::encode(hash);
    let n = meta.piece_count();
    let storage_err = |rec: TorrentRecord, e: StorageError, bits: Bitfield| match e {
        StorageError::NoSpace { .. } => parked(
            rec,
            TorrentState::Failed,
            format!("{e}; free some space, then run `shoal recheck {hex}`"),
            bits,
        ),
        StorageError::Missing { .. } | StorageError::TooShort { .. } => parked(
            rec,
            TorrentState::NeedsRecheck,
            format!("{e}; run `shoal recheck {hex}`"),
            bits,
        ),
        e => parked(rec, TorrentState::Failed, e.to_string(), bits),
    };
    if rec.state == TorrentState::Seeding {
        if !bits.is_complete() {
            return parked(
                rec,
                TorrentState::NeedsRecheck,
                "the stored bitfield is incomplete".into(),
                Bitfield::new(n),
            );
        }
        let storage = match files::open_complete(&rec.data_path, meta.length).and_then(|f| {
            Storage::from_file(f, meta.length, meta.piece_length, false).map_err(|source| {
                StorageError::Io {
                    path: rec.data_path.display().to_string(),
                    source,
                }
            })
        }) {
            Ok(s) => s,
            Err(e) => return storage_err(rec, e, bits),
        };
        if let Some(bad) = spot_check(&storage, meta, &bits) {
            return changed_behind_our_back(rec, bad, bits);
        }
        return Opened::Session {
            storage: Arc::new(storage),
            bits,
            rec,
            working: None,
        };
    }
    let out_dir = out_dir_of(&rec);
    let working_path = files::working_path(&out_dir, hash);
    // A cut right after the final rename: the working file is gone, the finished file is
    // there, the store still says downloading. Check the file and seed it.
    if std::fs::symlink_metadata(&working_path).is_err() && is_plain_file(&rec.data_path) {
        return match recheck_data(hash, meta, rec.clone()) {
            Ok((good, r)) if r.state == TorrentState::Seeding => {
                info!(info_hash = %hex, "found the finished file after a restart; seeding it");
                match open_data(hash, meta, r, good) {
                    Opened::Session {
                        storage,
                        bits,
                        rec,
                        working,
                    } => Opened::Session {
                        storage,
                        bits,
                        rec,
                        working,
                    },
                    p => p,
                }
            }
            Ok((good, r)) => Opened::Parked { rec: r, bits: good },
            Err(e) => parked(rec, TorrentState::NeedsRecheck, format!("{e:#}"), bits),
        };
    }
    let w = match files::open_working(&out_dir, hash, meta.length, rec.working_file) {
        Ok(w) => w,
        Err(e) => return storage_err(rec, e, bits),
    };
    let mut bits = bits;
    if w.note.is_some() {
        bits = Bitfield::new(n);
        rec.note = w.note.clone();
    } else if let Some(from) = w.lost_from {
        for i in 0..n {
            let end = u64::from(i) * u64::from(meta.piece_length) + u64::from(meta.piece_size(i));
            if end > from {
                bits.clear(i);
            }
        }
        rec.note = Some(format!(
            "{} was cut short behind our back; pieces past byte {from} are fetched again",
            working_path.display()
        ));
    }
    rec.working_file = Some(w.id);
    let storage = match Storage::from_file(w.file, meta.length, meta.piece_length, true) {
        Ok(s) => s,
        Err(source) => {
            return storage_err(
                rec,
                StorageError::Io {
                    path: working_path.display().to_string(),
                    source,
                },
                bits,
            )
        }
    };
    if let Some(bad) = spot_check(&storage, meta, &bits) {
        return changed_behind_our_back(rec, bad, bits);
    }
    Opened::Session {
        storage: Arc::new(storage),
        bits,
        rec,
        working: Some(WorkingCheck { out_dir, id: w.id }),
    }
}

/// Re-hash a stopped torrent's data (blocking) and return the bits and record that agree
/// with it. The data is synced before the bits are returned: they vouch for it.
///
/// # Errors
/// The data cannot be synced, or an unsafe path.
pub fn recheck_data(
    hash: &Hash,
    meta: &Metainfo,
    mut rec: TorrentRecord,
) -> anyhow::Result<(Bitfield, TorrentRecord)> {
    let n = meta.piece_count();
    let out_dir = out_dir_of(&rec);
    rec.note = None;
    let hash_file = |f: std::fs::File, writable: bool| -> anyhow::Result<Bitfield> {
        f.sync_all()
            .context("syncing the data before vouching for it")?;
        let s = Storage::from_file(f, meta.length, meta.piece_length, writable)?;
        Ok(crate::hashing::hash_pieces(s.data(), meta, &|_| {}))
    };
    if is_plain_file(&rec.data_path) {
        match files::open_complete(&rec.data_path, meta.length) {
            Ok(f) => {
                let good = hash_file(f, false)?;
                if good.is_complete() {
                    rec.state = TorrentState::Seeding;
                    rec.working_file = None;
                    rec.completed_at.get_or_insert_with(crate::fsutil::unix_ms);
                    return Ok((good, rec));
                }
                // A damaged finished file goes back to being a download, keeping what is
                // good; only the bad pieces are fetched again.
                let name = meta.name.clone();
                let w = files::adopt_final(&out_dir, hash, &name)?;
                rec.state = TorrentState::Downloading;
                rec.completed_at = None;
                rec.working_file = Some(w.id);
                rec.note = Some(format!(
                    "{} had {} of {n} good pieces; the rest are fetched again",
                    rec.data_path.display(),
                    good.count()
                ));
                // Same inode, already hashed and synced above.
                return Ok((good, rec));
            }
            Err(e @ StorageError::TooShort { .. }) => {
                rec.state = TorrentState::NeedsRecheck;
                rec.note = Some(format!("{e}; move it away and run `shoal recheck`"));
                return Ok((Bitfield::new(n), rec));
            }
            Err(e) => return Err(e.into()),
        }
    }
    rec.state = TorrentState::Downloading;
    rec.completed_at = None;
    let w = files::open_working(&out_dir, hash, meta.length, rec.working_file)?;
    rec.working_file = Some(w.id);
    if let Some(note) = w.note {
        rec.note = Some(note);
        return Ok((Bitfield::new(n), rec));
    }
    let good = hash_file(w.file, true)?;
    Ok((good, rec))
}
