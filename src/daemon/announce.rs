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

use shoal_tracker::client::{AnnounceReply, ClientError, DatagramClient, TrackerClient};
use shoal_tracker::proto::{Announce, Event, PeerEntry};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::net::Net;
use super::torrent::Torrent;
use crate::metainfo::Hash;
use crate::store::{TorrentRecord, TorrentState};

/// Peers taken from one tracker reply.
const MAX_PEERS_PER_REPLY: usize = 200;

/// A datagram announce unanswered after this goes again over TCP (a tracker answers one in
/// well under a millisecond; this leaves room for a slow, distant link).
const DATAGRAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long heartbeats to a tracker stay on TCP after a datagram went unanswered.
const DATAGRAMS_OFF: Duration = Duration::from_secs(600);

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
async fn announce_one(d: &Net, addr: &str, req: &Announce, force: bool) -> Option<AnnounceReply> {
    if !force {
        let h = d.trackers.lock().expect("trackers lock");
        if h.get(addr)
            .and_then(|h| h.next_try)
            .is_some_and(|t| t > Instant::now())
        {
            return None;
        }
    }
    let began = Instant::now();
    let (res, datagram_lost) = match announce_datagram(d, addr, req).await {
        Ok(reply) => (Ok(reply), None),
        Err(lost) => {
            let tcp = async {
                let mut c = TrackerClient::connect(addr, d.bind_ip, d.cfg.tracker_timeout).await?;
                c.announce(req, Some(&d.tracker_signer)).await
            }
            .await;
            (tcp, lost)
        }
    };
    let mut trackers = d.trackers.lock().expect("trackers lock");
    let h = trackers.entry(addr.to_string()).or_default();
    if let (Some(cause), Ok(_)) = (&datagram_lost, &res) {
        // TCP answered where UDP did not: UDP is filtered on the way, or the tracker has it off.
        info!(tracker = %addr, %cause, "heartbeats go over TCP for a while");
        h.datagrams_off_until = Some(Instant::now() + DATAGRAMS_OFF);
    }
    match res {
        Ok(reply) => {
            debug!(tracker = %addr, peers = reply.peers.len(), ms = began.elapsed().as_secs_f64() * 1000.0, "announced");
            if h.failures > 0 {
                info!(tracker = %addr, "tracker reachable again");
            }
            h.failures = 0;
            h.next_try = None;
            h.last_ok = Some(crate::fsutil::unix_ms());
            h.last_error = None;
            Some(reply)
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

/// A heartbeat sent as one UDP datagram, when a session with the tracker is open and datagrams
/// to it were not found wanting. `Err(None)`: not tried, or refused (a refusal is answered over
/// TCP, where a session the tracker no longer has is opened again); `Err(Some(cause))`: no
/// answer, which only says something of UDP if TCP then gets one.
async fn announce_datagram(
    d: &Net,
    addr: &str,
    req: &Announce,
) -> Result<AnnounceReply, Option<ClientError>> {
    if !d.cfg.tracker_udp
        || req.event != Event::Progress
        || !d.tracker_signer.has_session(addr)
        || d.trackers
            .lock()
            .expect("trackers lock")
            .get(addr)
            .and_then(|h| h.datagrams_off_until)
            .is_some_and(|t| t > Instant::now())
    {
        return Err(None);
    }
    let timeout = d.cfg.tracker_timeout.min(DATAGRAM_TIMEOUT);
    let res = async {
        let mut c = DatagramClient::connect(addr, d.bind_ip, timeout).await?;
        c.announce(req, &d.tracker_signer, timeout).await
    }
    .await;
    match res {
        Ok(reply) => Ok(reply),
        Err(e @ (ClientError::DatagramTimeout { .. } | ClientError::Connect { .. })) => {
            Err(Some(e))
        }
        Err(e) => {
            debug!(tracker = %addr, cause = %e, "datagram announce refused; again over TCP");
            Err(None)
        }
    }
}

/// What a round of announces brought back.
#[derive(Default)]
struct Round {
    /// Every peer any tracker gave.
    peers: Vec<PeerEntry>,
    /// The shortest interval they asked for; `None` when none answered.
    interval: Option<u64>,
    /// The lowest roster version a tracker that answered holds (a private swarm).
    roster_version: Option<u64>,
    /// The newest roster a tracker sent.
    roster: Option<shoal_tracker::roster::Roster>,
}

/// Announce to all `trackers` at once.
async fn announce_all(d: &Arc<Net>, trackers: &[String], req: &Announce, force: bool) -> Round {
    let mut set = JoinSet::new();
    for addr in trackers {
        let d = d.clone();
        let addr = addr.clone();
        let req = req.clone();
        set.spawn(async move { announce_one(&d, &addr, &req, force).await });
    }
    let mut round = Round::default();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(reply)) = r {
            round.peers.extend(reply.peers);
            round.interval = Some(
                round
                    .interval
                    .map_or(reply.interval, |x| x.min(reply.interval)),
            );
            round.roster_version = Some(
                round
                    .roster_version
                    .map_or(reply.roster_version, |x| x.min(reply.roster_version)),
            );
            if let Some(r) = reply.roster {
                if round.roster.as_ref().is_none_or(|h| h.version < r.version) {
                    round.roster = Some(r);
                }
            }
        }
    }
    round
}

/// `tracker_roster`: the lowest roster version the trackers answered last time.
fn announce_of(d: &Net, t: &Torrent, event: Event, tracker_roster: u64) -> Announce {
    let have = t.lock().picker.have().count();
    let mut a = Announce {
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
    };
    // A private swarm: the proof that it is one, the roster version we hold, and the roster
    // itself while some tracker holds an older one.
    if let Some(m) = &t.membership {
        a.authority = Some(m.authority().to_string());
        a.content = Some(m.content_hex());
        let held = m.roster();
        a.roster_version = Some(held.as_ref().map_or(0, |r| r.version));
        if let Some(r) = held.filter(|r| r.version > tracker_roster) {
            a.roster = Some((*r).clone());
        }
    }
    a
}

fn learn(t: &Torrent, d: &Net, peers: Vec<PeerEntry>) {
    let any = !peers.is_empty();
    let mut s = t.lock();
    // Super-seeding is for the initial seeder (BEP 16): with another seeder in the swarm, it
    // would pin first-round pieces to whichever seeder offered them, however slow (measured:
    // 9 of 64 pieces from a seeder answering 300 ms late). A tracker's claim can only turn
    // it off, which costs efficiency, never correctness.
    let other_seeder = peers
        .iter()
        .any(|p| p.peer_id != d.peer_id && p.total > 0 && p.have == p.total);
    if other_seeder && s.seed.stop() {
        info!(info_hash = %t.hex, "another seeder serves the swarm: super-seeding off");
        let _ = t.events.send(super::torrent::TorrentEvent::AdvertiseAll);
    }
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
    let mut tracker_roster = 0;
    loop {
        let seeding = t.state() == TorrentState::Seeding;
        if seeding && !was_seeding {
            event = Event::Completed;
        }
        was_seeding = seeding;
        let req = announce_of(&d, &t, event, tracker_roster);
        let round = announce_all(&d, &trackers, &req, false).await;
        if let Some(iv) = round.interval {
            interval = Duration::from_secs(iv.clamp(1, 3600));
            event = Event::Progress;
        }
        if let Some(v) = round.roster_version {
            tracker_roster = v;
        }
        if let Some(r) = round.roster {
            // Checked against the swarm and its authority before it is kept.
            if let Err(e) = t.adopt_roster(r).await {
                warn!(info_hash = %t.hex, cause = %e, "a tracker's roster refused");
            }
        }
        learn(&t, &d, round.peers);
        tokio::select! {
            _ = t.cancel.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = t.announce_now.notified() => {}
        }
    }
    // Tell every tracker we leave, even those marked down: a short bounded try each.
    let req = announce_of(&d, &t, Event::Stopped, u64::MAX);
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
        let Round {
            peers,
            interval: iv,
            ..
        } = announce_all(&d, &trackers, &req, false).await;
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
