//! Trackers and peer discovery.
//!
//! Every torrent announces to every tracker it knows (its descriptor's, the config's, and those
//! given with the download), all at once, each bounded by `tracker_timeout`: a dead tracker
//! never delays the others (the seed's KNOWN_TRACKERS failover, but to all of them, not the
//! first that answers). A tracker that fails is skipped until its backoff (doubling, capped
//! at `tracker_backoff_max`) has passed, then tried again, so one that comes back is used
//! again soon. The health of each tracker is kept daemon-wide for `status`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_tracker::client::{AnnounceReply, TrackerClient};
use shoal_tracker::proto::{Announce, Event, PeerEntry};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::net::Net;
use super::torrent::Torrent;
use crate::metainfo::Hash;
use crate::store::{TorrentRecord, TorrentState};

/// Peers taken from one tracker reply.
const MAX_PEERS_PER_REPLY: usize = 200;

/// Announce interval until a tracker tells us its own.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// The trackers of a torrent: the descriptor's, then the record's, then the config's.
pub fn trackers_for(d: &Net, descriptor: &[String], rec: &TorrentRecord) -> Vec<String> {
    let mut seen = HashSet::new();
    descriptor
        .iter()
        .chain(&rec.trackers)
        .chain(&d.cfg.trackers)
        .filter(|t| seen.insert(t.as_str().to_owned()))
        .cloned()
        .collect()
}

/// Announce to one tracker, honouring and updating its health. `None`: skipped or failed.
async fn announce_one(
    d: &Net,
    addr: &str,
    req: &Announce,
    force: bool,
) -> Option<(Vec<PeerEntry>, u64)> {
    if !force {
        let h = d.trackers.lock().expect("trackers lock");
        if h.get(addr)
            .and_then(|h| h.next_try)
            .is_some_and(|t| t > Instant::now())
        {
            return None;
        }
    }
    let res = async {
        let mut c = TrackerClient::connect(addr, d.bind_ip, d.cfg.tracker_timeout).await?;
        c.announce(req, Some(&d.tracker_signer)).await
    }
    .await;
    let mut trackers = d.trackers.lock().expect("trackers lock");
    let h = trackers.entry(addr.to_string()).or_default();
    match res {
        Ok(AnnounceReply {
            interval, peers, ..
        }) => {
            if h.failures > 0 {
                info!(tracker = %addr, "tracker reachable again");
            }
            h.failures = 0;
            h.next_try = None;
            h.last_ok = Some(crate::fsutil::unix_ms());
            h.last_error = None;
            Some((peers, interval))
        }
        Err(e) => {
            if h.failures == 0 {
                warn!(tracker = %addr, cause = %e, "tracker unreachable; going on with the others");
            }
            h.failures += 1;
            let backoff =
                Duration::from_secs(1u64 << h.failures.min(6)).min(d.cfg.tracker_backoff_max);
            h.next_try = Some(Instant::now() + backoff);
            h.last_error = Some(e.to_string());
            None
        }
    }
}

/// Announce to all `trackers` at once; returns every peer any of them gave and the shortest
/// interval they asked for.
async fn announce_all(
    d: &Arc<Net>,
    trackers: &[String],
    req: &Announce,
    force: bool,
) -> (Vec<PeerEntry>, Option<u64>) {
    let mut set = JoinSet::new();
    for addr in trackers {
        let d = d.clone();
        let addr = addr.clone();
        let req = req.clone();
        set.spawn(async move { announce_one(&d, &addr, &req, force).await });
    }
    let mut peers = Vec::new();
    let mut interval: Option<u64> = None;
    while let Some(r) = set.join_next().await {
        if let Ok(Some((p, i))) = r {
            peers.extend(p);
            interval = Some(interval.map_or(i, |x| x.min(i)));
        }
    }
    (peers, interval)
}

fn announce_of(d: &Net, t: &Torrent, event: Event) -> Announce {
    let have = t.lock().picker.have().count();
    Announce {
        info_hash: t.hex.clone(),
        peer_id: d.peer_id.clone(),
        port: d.listen.port(),
        event,
        have: u64::from(have),
        total: u64::from(t.meta.piece_count()),
        name: t.meta.name.clone(),
        length: t.meta.length,
        numwant: None,
        addr: None,
        ..Announce::default()
    }
}

fn learn(t: &Torrent, d: &Net, peers: Vec<PeerEntry>) {
    let any = !peers.is_empty();
    let mut s = t.lock();
    // A tracker's list is a claim: bounded here, and by the torrent's cap on known addresses.
    for p in peers.into_iter().take(MAX_PEERS_PER_REPLY) {
        if p.peer_id == d.peer_id {
            continue;
        }
        let Ok(ip) = p.addr.parse::<std::net::IpAddr>() else {
            continue;
        };
        let addr = SocketAddr::new(ip, p.port);
        if addr != d.listen {
            s.learn_addr(addr);
        }
    }
    drop(s);
    if any {
        // Dial now rather than at the dialer's next tick: it is the start of every download.
        t.peers_learned.notify_one();
    }
}

/// Announce `started`, heartbeats every interval, `completed` when done, `stopped` at the end.
pub async fn announce_loop(d: Arc<Net>, t: Arc<Torrent>) {
    let trackers = trackers_for(&d, &t.meta.trackers, &t.record());
    if trackers.is_empty() {
        warn!(info_hash = %t.hex, "no trackers known for this torrent: only incoming peers will find it");
    }
    let mut event = Event::Started;
    let mut was_seeding = t.state() == TorrentState::Seeding;
    let mut interval = DEFAULT_INTERVAL;
    loop {
        let seeding = t.state() == TorrentState::Seeding;
        if seeding && !was_seeding {
            event = Event::Completed;
        }
        was_seeding = seeding;
        let req = announce_of(&d, &t, event);
        let (peers, iv) = announce_all(&d, &trackers, &req, false).await;
        if let Some(iv) = iv {
            interval = Duration::from_secs(iv.clamp(1, 3600));
            event = Event::Progress;
        }
        learn(&t, &d, peers);
        tokio::select! {
            _ = t.cancel.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = t.announce_now.notified() => {}
        }
    }
    // Tell every tracker we leave, even those marked down: a short bounded try each.
    let req = announce_of(&d, &t, Event::Stopped);
    let _ = tokio::time::timeout(
        d.cfg.tracker_timeout,
        announce_all(&d, &trackers, &req, true),
    )
    .await;
}

/// While downloading, keep up to `max_peers_per_torrent` connections to the peers trackers
/// gave us, retrying failed ones with a backoff.
pub async fn dial_loop(d: Arc<Net>, t: Arc<Torrent>) {
    let mut dialing: HashSet<SocketAddr> = HashSet::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(SocketAddr, bool)>();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = t.cancel.cancelled() => return,
            _ = tick.tick() => {}
            _ = t.peers_learned.notified() => {}
            Some((addr, ok)) = done_rx.recv() => {
                dialing.remove(&addr);
                let mut s = t.lock();
                let k = s.known.entry(addr).or_default();
                if ok {
                    k.failures = 0;
                    k.next_try = Some(Instant::now() + Duration::from_secs(2));
                } else {
                    k.failures += 1;
                    k.next_try = Some(Instant::now() + Duration::from_secs(1u64 << k.failures.min(6)));
                }
                continue;
            }
        }
        if !t.is_downloading() {
            if t.state() == TorrentState::Seeding {
                return;
            }
            continue;
        }
        let targets: Vec<SocketAddr> = {
            let s = t.lock();
            let connected: HashSet<SocketAddr> = s.conns.values().map(|c| c.addr).collect();
            let room = d
                .cfg
                .max_peers_per_torrent
                .saturating_sub(s.conns.len() + dialing.len());
            let now = Instant::now();
            s.known
                .iter()
                .filter(|(a, k)| {
                    !connected.contains(a)
                        && !dialing.contains(a)
                        && k.next_try.is_none_or(|t| t <= now)
                })
                .map(|(a, _)| *a)
                .take(room)
                .collect()
        };
        for addr in targets {
            let Ok(permit) = d.conn_limit.clone().try_acquire_owned() else {
                break;
            };
            dialing.insert(addr);
            let d2 = d.clone();
            let t2 = t.clone();
            let tx = done_tx.clone();
            t.tasks.spawn(async move {
                let r = super::conn::run_outgoing(d2, t2, addr).await;
                if let Err(e) = &r {
                    tracing::debug!(%addr, cause = %e, "dial failed");
                }
                drop(permit);
                let _ = tx.send((addr, r.is_ok())); // The dial loop may have stopped.
            });
        }
    }
}

/// For a download known only by its info hash: find peers through the trackers and fetch the
/// descriptor, believing it only if its info hash matches; hand it to the torrent's owner.
pub async fn fetch_metadata_task(
    d: Arc<Net>,
    hash: Hash,
    rec: TorrentRecord,
    token: tokio_util::sync::CancellationToken,
    found: tokio::sync::mpsc::Sender<crate::metainfo::Metainfo>,
    on_note: impl Fn(String),
) {
    let trackers = trackers_for(&d, &[], &rec);
    let hex = hex::encode(hash);
    info!(info_hash = %hex, "fetching the descriptor from the swarm");
    let mut refused: HashSet<SocketAddr> = HashSet::new();
    let mut event = Event::Started;
    loop {
        let req = Announce {
            info_hash: hex.clone(),
            peer_id: d.peer_id.clone(),
            port: d.listen.port(),
            event,
            have: 0,
            total: 0,
            name: String::new(),
            length: 0,
            numwant: None,
            addr: None,
            ..Announce::default()
        };
        let (peers, iv) = announce_all(&d, &trackers, &req, false).await;
        if iv.is_some() {
            // Once a tracker has us, later announces are heartbeats, not new starts.
            event = Event::Progress;
        }
        // What `get --wait` and `status` say while nobody has sent the descriptor.
        on_note(describe_asked(&peers, &refused));
        for p in peers.into_iter().take(MAX_PEERS_PER_REPLY) {
            let Ok(ip) = p.addr.parse::<std::net::IpAddr>() else {
                continue;
            };
            let addr = SocketAddr::new(ip, p.port);
            if p.peer_id == d.peer_id || refused.contains(&addr) {
                continue;
            }
            let fetched = tokio::select! {
                _ = token.cancelled() => return,
                r = super::conn::fetch_metadata(&d, addr, &hash) => r,
            };
            match fetched {
                Ok(meta) => {
                    info!(info_hash = %hex, name = %meta.name, from = %addr, "descriptor fetched");
                    let _ = found.send(meta).await; // The owner may have been removed.
                    return;
                }
                Err(e) => {
                    warn!(info_hash = %hex, peer = %addr, cause = %e, "descriptor not accepted from this peer");
                    if matches!(e, super::conn::ConnError::Protocol(_)) {
                        refused.insert(addr);
                    }
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// "peers asked for the descriptor: A, B" or "no tracker has returned a peer yet".
fn describe_asked(
    peers: &[shoal_tracker::proto::PeerEntry],
    refused: &HashSet<SocketAddr>,
) -> String {
    if peers.is_empty() {
        return "no tracker has returned a peer for it yet".into();
    }
    let list: Vec<String> = peers
        .iter()
        .take(10)
        .map(|p| {
            let a = format!("{}:{}", p.addr, p.port);
            match a.parse::<SocketAddr>() {
                Ok(sa) if refused.contains(&sa) => format!("{a} (refused)"),
                _ => a,
            }
        })
        .collect();
    format!(
        "peers asked for the descriptor: {}{}",
        list.join(", "),
        if peers.len() > 10 { ", ..." } else { "" }
    )
}
