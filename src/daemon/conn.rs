//! One peer connection: HELLO both ways, BITFIELD, then requests and pieces in both
//! directions at once.
//!
//! Three tasks per connection: a reader that only reads frames (reading is not cancel-safe,
//! so it never sits in a `select!`), a writer ([`super::writer`]) that owns the socket's write
//! half and serves pieces straight from the memory map or their relay, and the session loop
//! that owns the download state (outstanding requests, the peer's bitfield) and reacts to
//! frames, torrent events, verification results and a 1 s tick.
//!
//! Control never waits behind data: the writer takes control frames (REQUEST, HAVE, CANCEL,
//! PING/PONG, KEEPALIVE) from their own queue and sends all of them before each piece, the
//! kernel holds at most [`UNSENT_LOWAT_BYTES`] unsent, and the pieces a peer may have queued
//! are bounded by what its link drains in a couple of round trips (more get a busy REJECT).
//! RTT is measured by PING/PONG, apart from throughput; both set the pipelining depth.
//!
//! Hashing runs on the blocking pool, bounded by the daemon's `verify_limit`, so the network
//! tasks keep reading while pieces are hashed and at most that many pieces sit in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use shoal_tracker::wire::{Frame, FrameError, FrameReader, FrameWriter, Limits, Timeouts};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn, Instrument};

use super::net::Net;
use super::relay::Inbound;
use super::torrent::{ConnEntry, Torrent, TorrentEvent};
use super::writer::{write_loop, Ctrl, Shared};
use crate::bitfield::Bitfield;
use crate::metainfo::Hash;
use crate::peer_proto::{PeerMsg, VERSION};
use crate::picker::Pick;
use crate::secure::{SecureRead, SecureWrite};

/// Consecutive request timeouts after which a peer is dropped.
const MAX_CONSECUTIVE_TIMEOUTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out connecting")]
    ConnectTimeout,
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("closed during the handshake")]
    Closed,
    #[error("{0}")]
    Secure(#[from] crate::secure::SecureError),
    #[error("timed out in the handshake")]
    HandshakeTimeout,
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

pub struct Hello {
    pub info_hash: Hash,
    pub peer_id: String,
    /// The port the remote listens on.
    pub port: u16,
    /// The version of the private swarm's roster the remote holds.
    pub roster: u64,
    /// The remote reads PIECE_PART.
    pub parts: bool,
    /// The remote reads RECEIVING and relays pieces as they arrive.
    pub relay: bool,
}

fn hello_of(d: &Net, hash: &Hash, roster: u64) -> PeerMsg {
    PeerMsg::Hello {
        v: VERSION,
        info_hash: hex::encode(hash),
        peer_id: d.peer_id.clone(),
        port: d.listen.port(),
        roster,
        parts: true,
        relay: true,
    }
}

/// The largest ROSTER payload: a roster of `MAX_MEMBERS` ids is about 280 KB of JSON, so
/// anything bigger is refused before serde allocates for it.
const MAX_ROSTER_BYTES: usize = 512 * 1024;

/// A ROSTER frame's roster, parsed (its signature is checked when it is adopted).
fn parse_roster(payload: &[u8]) -> Result<shoal_tracker::roster::Roster, String> {
    if payload.len() > MAX_ROSTER_BYTES {
        return Err(format!(
            "ROSTER of {} bytes, over the limit of {MAX_ROSTER_BYTES}",
            payload.len()
        ));
    }
    serde_json::from_slice(payload).map_err(|e| format!("bad ROSTER: {e}"))
}

/// A private swarm's gate, after the HELLOs: the side holding the newer roster sends it, the
/// other adopts it (if it checks), then each side refuses a peer its roster does not admit,
/// before any BITFIELD, metadata or piece.
async fn admit(
    t: &Torrent,
    reader: &mut Reader,
    writer: &mut Writer,
    hello: &Hello,
) -> Result<(), ConnError> {
    let Some(m) = &t.membership else {
        return Ok(());
    };
    let ours = m.roster();
    if let Some(r) = ours.as_ref().filter(|r| r.version > hello.roster) {
        let json = serde_json::to_vec(&**r).expect("a roster serializes");
        let msg = PeerMsg::Roster {
            len: json.len() as u32,
        };
        writer.send(&msg, &json).await?;
    }
    if hello.roster > ours.map_or(0, |r| r.version) {
        let frame = reader.read_frame().await?.ok_or(ConnError::Closed)?;
        match frame.parse::<PeerMsg>() {
            Ok(PeerMsg::Roster { .. }) => {
                let r = parse_roster(&frame.payload).map_err(ConnError::Protocol)?;
                t.adopt_roster(r)
                    .await
                    .map_err(|e| ConnError::Protocol(format!("ROSTER refused: {e}")))?;
            }
            Ok(PeerMsg::Error { reason }) => return Err(ConnError::Refused(reason)),
            _ => {
                return Err(ConnError::Protocol(
                    "a newer roster was announced but not sent".into(),
                ))
            }
        }
    }
    if !m.admits(&hello.peer_id) {
        let reason = format!("not a member of private swarm {}", t.hex);
        let _ = writer
            .send(
                &PeerMsg::Error {
                    reason: reason.clone(),
                },
                &[],
            )
            .await; // Best effort.
        return Err(ConnError::Refused(reason));
    }
    Ok(())
}

/// Read and check the remote HELLO: it must name the key the channel authenticated.
async fn read_hello(reader: &mut Reader, remote_id: &str) -> Result<Hello, ConnError> {
    let frame = reader.read_frame().await?.ok_or(ConnError::Closed)?;
    match frame.parse::<PeerMsg>() {
        Ok(PeerMsg::Hello {
            v,
            info_hash,
            peer_id,
            port,
            roster,
            parts,
            relay,
        }) => {
            if v != VERSION {
                return Err(ConnError::Refused(format!(
                    "protocol version {v}, we speak {VERSION}"
                )));
            }
            let hash = hex::decode(&info_hash)
                .ok()
                .and_then(|v| Hash::try_from(v).ok())
                .ok_or_else(|| ConnError::Protocol(format!("bad info hash {info_hash:?}")))?;
            if peer_id != remote_id {
                return Err(ConnError::Protocol(format!(
                    "HELLO names peer id {}, but the channel authenticated {}",
                    crate::secure::fingerprint(&peer_id),
                    crate::secure::fingerprint(remote_id)
                )));
            }
            Ok(Hello {
                info_hash: hash,
                peer_id,
                port,
                roster,
                parts,
                relay,
            })
        }
        Ok(PeerMsg::Error { reason }) => Err(ConnError::Refused(reason)),
        Ok(other) => Err(ConnError::Protocol(format!(
            "expected HELLO, got {}",
            other.name()
        ))),
        Err(e) => Err(ConnError::Protocol(format!(
            "bad {} message: {e}",
            frame.kind()
        ))),
    }
}

type Reader = FrameReader<SecureRead<OwnedReadHalf>>;
type Writer = FrameWriter<SecureWrite<OwnedWriteHalf>>;

/// Run the Noise handshake on a fresh stream, bounded by the connect timeout. Returns the
/// framed halves and the remote's authenticated peer id.
/// A secured connection: its frame reader and writer, the peer's key, and (to another host)
/// a second handle on the socket, for what the kernel measures of it.
type Secured = (Reader, Writer, String, Option<std::os::fd::OwnedFd>);

async fn secure(d: &Net, stream: TcpStream, outgoing: bool) -> Result<Secured, ConnError> {
    use std::os::fd::AsFd;
    let _ = stream.set_nodelay(true); // Requests are small and latency-bound.
    limit_unsent(&stream);
    let remote_host = stream.peer_addr().is_ok_and(|a| !a.ip().is_loopback());
    let sock = remote_host
        .then(|| stream.as_fd().try_clone_to_owned().ok())
        .flatten();
    let (r, w) = stream.into_split();
    let hs = async {
        if outgoing {
            crate::secure::initiate(r, w, &d.noise).await
        } else {
            crate::secure::respond(r, w, &d.noise).await
        }
    };
    let ch = tokio::time::timeout(d.cfg.connect_timeout, hs)
        .await
        .map_err(|_| ConnError::HandshakeTimeout)??;
    let t = Timeouts {
        idle: d.cfg.connect_timeout,
        read: d.cfg.read_timeout,
    };
    Ok((
        FrameReader::new(ch.reader, Limits::default(), t),
        FrameWriter::new(ch.writer, d.cfg.read_timeout),
        ch.remote_id,
        sock,
    ))
}

/// Connect to `addr` from our listening address.
pub async fn connect(d: &Net, addr: SocketAddr) -> Result<TcpStream, ConnError> {
    let fut = async {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(ConnError::Connect)?;
        super::net::size_recv_buffer(&sock);
        if let Some(ip) = d.bind_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            sock.bind(SocketAddr::new(ip, 0))
                .map_err(ConnError::Connect)?;
        }
        sock.connect(addr).await.map_err(ConnError::Connect)
    };
    tokio::time::timeout(d.cfg.connect_timeout, fut)
        .await
        .map_err(|_| ConnError::ConnectTimeout)?
}

/// Finds the active session of a torrent by info hash (the registry, seen through a keyhole).
pub type Lookup = Arc<dyn Fn(&Hash) -> Option<Arc<Torrent>> + Send + Sync>;

/// Accept a connection: the remote names the torrent in its HELLO.
pub async fn run_incoming(d: Arc<Net>, lookup: Lookup, stream: TcpStream, addr: SocketAddr) {
    if let Some(why) = d.bans.address_banned(addr.ip()) {
        debug!(%addr, %why, "refused a banned address");
        return;
    }
    let Ok(half_open) = d.half_open.clone().try_acquire_owned() else {
        debug!(%addr, "too many connections in their handshake; closing");
        return;
    };
    let secured = secure(&d, stream, false).await;
    drop(half_open);
    let (mut reader, mut writer, remote_id, sock) = match secured {
        Ok(c) => c,
        Err(e) => {
            // Nothing can be said on a channel that failed; a plaintext peer was told why.
            debug!(%addr, cause = %e, "incoming handshake failed");
            return;
        }
    };
    let refuse = |reason: String| PeerMsg::Error { reason };
    let hello = match read_hello(&mut reader, &remote_id).await {
        Ok(h) => h,
        Err(e) => {
            debug!(%addr, cause = %e, "incoming HELLO refused");
            let _ = writer.send(&refuse(e.to_string()), &[]).await; // Best effort.
            return;
        }
    };
    let Some(t) = lookup(&hello.info_hash) else {
        let _ = writer
            .send(
                &refuse(format!(
                    "unknown info hash {}",
                    hex::encode(hello.info_hash)
                )),
                &[],
            )
            .await;
        return;
    };
    if hello.peer_id == d.peer_id {
        return; // Ourselves, through a tracker's list.
    }
    if let Some(why) = d.bans.banned(&hello.peer_id, addr.ip()) {
        let _ = writer.send(&refuse(why), &[]).await;
        return;
    }
    if writer
        .send(&hello_of(&d, &t.hash, t.roster_version()), &[])
        .await
        .is_err()
    {
        return;
    }
    if let Err(e) = admit(&t, &mut reader, &mut writer, &hello).await {
        debug!(%addr, cause = %e, "incoming peer not admitted");
        return;
    }
    // Known by the address it listens on, so the dialer does not call it again.
    let listen_addr = SocketAddr::new(addr.ip(), hello.port);
    let span = conn_span(&t, &hello, listen_addr);
    session(d, t, reader, writer, &hello, listen_addr, false, None, sock)
        .instrument(span)
        .await;
}

/// Dial `addr` for torrent `t`.
///
/// # Errors
/// Connection and handshake failures; a session that ran returns Ok whatever ended it.
pub async fn run_outgoing(d: Arc<Net>, t: Arc<Torrent>, addr: SocketAddr) -> Result<(), ConnError> {
    if let Some(why) = d.bans.address_banned(addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    let began = Instant::now();
    let stream = connect(&d, addr).await?;
    let tcp_ms = began.elapsed().as_secs_f64() * 1000.0;
    let (mut reader, mut writer, remote_id, sock) = secure(&d, stream, true).await?;
    debug!(%addr, tcp_ms, secured_ms = began.elapsed().as_secs_f64() * 1000.0, "dialed");
    if remote_id == d.peer_id {
        return Err(ConnError::Refused("that is ourselves".into()));
    }
    if let Some(why) = d.bans.banned(&remote_id, addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    writer
        .send(&hello_of(&d, &t.hash, t.roster_version()), &[])
        .await?;
    // In a public swarm our BITFIELD goes with our HELLO, not a round trip after it: the
    // peer can ask (or a super-seeder offer) as soon as our HELLO is in, which on a 600 ms
    // path is 0.6 s sooner. A private swarm's gate comes first (`admit`).
    let early = if t.membership.is_none() {
        let opening = Opening::take(&d, &t, addr);
        writer
            .send(&opening.bitfield(), opening.shown.as_bytes())
            .await?;
        Some(opening)
    } else {
        None
    };
    let hello = read_hello(&mut reader, &remote_id).await?;
    if hello.info_hash != t.hash {
        return Err(ConnError::Protocol("HELLO for another torrent".into()));
    }
    admit(&t, &mut reader, &mut writer, &hello).await?;
    let span = conn_span(&t, &hello, addr);
    session(d, t, reader, writer, &hello, addr, true, early, sock)
        .instrument(span)
        .await;
    Ok(())
}

/// What a session shows the peer first, and the events after it: taken together, so no
/// HAVE falls between the two.
struct Opening {
    events: broadcast::Receiver<TorrentEvent>,
    shown: Bitfield,
    super_mode: bool,
    /// The peer is on this host and the upload is not capped (see [`Opening::take`]).
    local: bool,
}

impl Opening {
    fn take(d: &Net, t: &Torrent, addr: SocketAddr) -> Opening {
        // Subscribe before taking the bitfield, so no HAVE falls between the two.
        let events = t.events.subscribe();
        // A peer on this host shares our CPU, not a link: offering it pieces one at a time
        // saves no scarce upload and costs CPU and time (measured, 1 -> 4 leechers x 256 MiB
        // on loopback: 7.6 against 5.8 CPU s, 4.7 against 3.2 s). It is shown everything,
        // unless the operator capped the upload, which says the upload is what is scarce.
        let local = addr.ip().is_loopback() && d.uplink.user_cap().is_none();
        let st = t.lock();
        let super_mode = st.seed.is_active() && !local;
        // A super-seeder shows nothing at first and offers pieces one by one.
        let shown = if super_mode {
            Bitfield::new(t.meta.piece_count())
        } else {
            st.picker.have().clone()
        };
        Opening {
            events,
            shown,
            super_mode,
            local,
        }
    }

    fn bitfield(&self) -> PeerMsg {
        PeerMsg::Bitfield {
            len: self.shown.as_bytes().len() as u32,
            super_seed: self.super_mode,
        }
    }
}

/// Fetch the descriptor of `hash` from the peer at `addr`, believing it only if its info hash
/// matches.
///
/// # Errors
/// Transport failures, a refusal, or a forged descriptor.
pub async fn fetch_metadata(
    d: &Net,
    addr: SocketAddr,
    hash: &Hash,
) -> Result<crate::metainfo::Metainfo, ConnError> {
    if let Some(why) = d.bans.address_banned(addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    let stream = connect(d, addr).await?;
    let (mut reader, mut writer, remote_id, _) = secure(d, stream, true).await?;
    if let Some(why) = d.bans.banned(&remote_id, addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    writer.send(&hello_of(d, hash, 0), &[]).await?;
    let hello = read_hello(&mut reader, &remote_id).await?;
    if hello.info_hash != *hash {
        return Err(ConnError::Protocol("HELLO for another torrent".into()));
    }
    writer.send(&PeerMsg::GetMetadata, &[]).await?;
    // The peer may send BITFIELD and HAVEs first; skip a bounded number of frames.
    for _ in 0..64 {
        let frame = reader.read_frame().await?.ok_or(ConnError::Closed)?;
        match frame.parse::<PeerMsg>() {
            Ok(PeerMsg::Metadata { .. }) => {
                // Only the content (what the info hash covers) is believed: a stranger's
                // tracker list is dropped before anything reads it.
                let mut desc: crate::metainfo::Descriptor = serde_json::from_slice(&frame.payload)
                    .map_err(|e| ConnError::Protocol(format!("descriptor refused: {e}")))?;
                desc.trackers.clear();
                desc.created_at.clear();
                let meta = crate::metainfo::Metainfo::from_descriptor(desc)
                    .map_err(|e| ConnError::Protocol(format!("descriptor refused: {e}")))?;
                if meta.info_hash != *hash {
                    return Err(ConnError::Protocol(format!(
                        "forged descriptor: its info hash is {}, not the {} we asked for",
                        meta.info_hash_hex(),
                        hex::encode(hash)
                    )));
                }
                return Ok(meta);
            }
            Ok(PeerMsg::Error { reason }) => return Err(ConnError::Refused(reason)),
            _ => continue,
        }
    }
    Err(ConnError::Protocol("no METADATA after 64 frames".into()))
}

/// Control frames queued for the writer at most (small frames; a full queue makes the session
/// wait, which is the backpressure of a peer that does not read).
const CTRL_QUEUE: usize = 1024;
/// The frame type of a piece part (the reader hashes those across frames).
const PIECE_PART: &str = "PIECE_PART";
const REJECT: &str = "REJECT";
/// Bytes per PIECE_PART: behind a whole 1 MiB piece a control frame waited seconds (measured
/// on the heterogeneous scenario: REQUESTs from the 10 Mbit/s leecher took 3-6 s to be
/// served). That uplink shared by 8 connections drains 32 KiB per connection in 0.2 s, 64 KiB
/// in 0.4 s (see [`UNSENT_LOWAT_BYTES`] for the measurement).
const PART_BYTES: u32 = 32 * 1024;
/// Pieces go whole to a peer we upload to faster than a piece per this long: there a control
/// frame waits little behind one, and whole frames cost less.
const WHOLE_PIECE_SECS: f64 = 0.02;
/// Round-trip samples the RTT estimate is the minimum of: queueing behind a piece on either
/// side only ever adds to a sample, so the minimum of the last few is the distance.
const RTT_WINDOW: usize = 8;
/// A super-seeder's peer that asks for none of its offers for this many pipelines' time (and
/// at least [`MIN_OFFERS_IGNORED_SECS`]), with nothing queued, is shown every piece instead.
const OFFERS_IGNORED_PIPELINES: f64 = 8.0;
const MIN_OFFERS_IGNORED_SECS: f64 = 1.5;
/// Pieces a peer may relay to us in part and then REJECT before we stop asking it for pieces
/// it is still receiving: a relay that always fails late wastes our downlink and is never
/// banned (it vouched for nothing).
const MAX_RELAY_FAILURES: u32 = 3;
/// On a connection whose least RTT ever measured is at least this, seconds (the distance; a
/// windowed RTT reads queueing on a busy near path as distance), the kernel may pace our
/// bytes at most [`CAPPED_PACING_GAIN`] times what we sent it over the last second (or its
/// average, if higher), and never under [`CAPPED_PACING_FLOOR`] bytes per second.
///
/// Why: BBR leaves its start-up phase only once it measures the path full, and a connection
/// whose sender runs out of pieces (most of ours: pieces come as they are asked for) never
/// does, so it paces every burst at 2.89 times its estimate with a window as large. On a far
/// path that window is several times the downlink's queue (600 ms of 100 Mbit/s is 7.5 MB; a
/// home router holds about 100 ms), and when a few such connections burst into one far peer
/// at once its queue overflows and every one of them stalls a round trip to recover.
/// Measured on the heterogeneous scenario against the same code without the cap, runs
/// alternated: 6 + 6 runs, the 600 ms leecher's downlink dropped 0-155 packets against
/// 29-774, and the last leecher finished at 19.1-20.4 s, median 19.95, against 19.7-21.3 s,
/// median 20.75 (an earlier 7 + 7: median 20.1 against 20.8; 8 + 8 together with another
/// change, since reverted: no difference, 20.25 both). Near paths are left alone: their window
/// fits the queue, and a cap on every path slowed the homogeneous run (40 ms: 13.9 and 13.2
/// s against 12.9 and 13.1 s).
const CAPPED_PACING_RTT: f64 = 0.1;
const CAPPED_PACING_GAIN: f64 = 2.0;
const CAPPED_PACING_FLOOR: f64 = 1e6;
/// A PING unanswered this long is given up and a new one sent.
const PING_GIVE_UP: Duration = Duration::from_secs(10);
/// Unsent bytes the kernel may hold per connection to another host. Past it the writer holds
/// them, so a control frame queued now waits for at most this much plus the part being
/// written, not for the several MiB a send buffer grows to on a fast link. With 128 KiB and
/// 64 KiB parts, the 10 Mbit/s leecher's REQUESTs waited up to 1.5 s behind its own uploads
/// (1.25 Mbit/s per connection) and it finished last; with 32 KiB and 32 KiB parts
/// (heterogeneous scenario, alternated 3+3) the run took 20.2-21.3 s, median 20.9, against
/// 21.2-22.3 s, median 21.5, and that leecher 19.1-20.0 s against 21.0-22.1 s; homogeneous
/// 12.0-12.2 s against 12.1-12.4 s.
const UNSENT_LOWAT_BYTES: libc::c_int = 32 * 1024;
/// The same on loopback, where a small limit only costs wake-ups.
const UNSENT_LOWAT_LOCAL_BYTES: libc::c_int = 128 * 1024;

/// Limit the kernel's unsent bytes (see [`UNSENT_LOWAT_BYTES`]). Best effort: without it the
/// connection works, control just waits longer on a thin link.
fn limit_unsent(stream: &TcpStream) {
    let local = stream.peer_addr().is_ok_and(|a| a.ip().is_loopback());
    let v: libc::c_int = if local {
        UNSENT_LOWAT_LOCAL_BYTES
    } else {
        UNSENT_LOWAT_BYTES
    };
    super::net::set_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        "TCP_NOTSENT_LOWAT",
        v,
    );
}

fn register(
    d: &Net,
    t: &Torrent,
    remote: &str,
    addr: SocketAddr,
    outgoing: bool,
) -> Option<(u64, CancellationToken)> {
    let mut s = t.lock();
    if let Some(existing) = s.conns.get(remote) {
        // Two peers dialing each other at once: both keep the connection opened by the peer
        // with the smaller id, so they agree without talking.
        let initiator = if outgoing { d.peer_id.as_str() } else { remote };
        let canonical = d.peer_id.as_str().min(remote);
        if existing.outgoing == outgoing || initiator != canonical {
            return None;
        }
        existing.token.cancel();
    }
    let id = t.next_conn_id();
    let token = t.cancel.child_token();
    s.conns.insert(
        remote.to_string(),
        ConnEntry {
            id,
            outgoing,
            addr,
            token: token.clone(),
            have: None,
        },
    );
    let score = s.score(remote);
    score.addr = addr.ip().to_string();
    score.port = addr.port();
    Some((id, token))
}

struct Session {
    d: Arc<Net>,
    t: Arc<Torrent>,
    remote: String,
    addr: SocketAddr,
    /// The version of the private swarm's roster the peer holds, as far as we know.
    remote_roster: u64,
    ctrl: mpsc::Sender<Ctrl>,
    shared: Arc<Shared>,
    peer_bits: Option<Bitfield>,
    /// The peer is complete (a full or a super-seeding BITFIELD): nothing to offer it.
    peer_complete: bool,
    /// What the peer knows we have.
    told: Bitfield,
    requested: HashMap<u32, Instant>,
    /// Pieces not to ask this peer for now (rejected or timed out), cleared now and then.
    avoid: HashSet<u32>,
    /// The peer said its upload queue is full: keep at most this many requests until the
    /// next tick.
    busy_cap: Option<usize>,
    /// Bytes received since the last tick, for the throughput sample.
    bytes_since_tick: u64,
    last_tick: Instant,
    consecutive_timeouts: u32,
    rng: rand::rngs::StdRng,
    ticks: u64,
    /// We are a seeder offering this peer pieces one HAVE at a time ([`crate::superseed`]).
    super_mode: bool,
    /// Pieces offered to this peer that it has not asked for yet.
    offers: HashSet<u32>,
    /// Offered pieces the peer asked for that no other leecher is known to hold yet
    /// ([`crate::superseed::MAX_UNSPREAD`]).
    unspread: Vec<u32>,
    /// Offered nothing more until one of them spreads (the torrent's `spread` wakes us).
    held_back: bool,
    /// When the peer last asked us for a piece (or the connection began).
    last_asked: Instant,
    conn_id: u64,
    next_ping: u64,
    /// When the PING in flight was queued.
    ping_asked: Option<Instant>,
    rtt_samples: VecDeque<f64>,
    /// The base of our one-way delay to the peer, for the uplink's pacer; None for a peer on
    /// this host (no link between us, only a shared CPU).
    owd: Option<crate::pacer::OwdBase>,
    /// The socket, to another host: the uplink reads what it acknowledged (for the pacer),
    /// and this connection caps its pacing.
    sock: Option<Arc<std::os::fd::OwnedFd>>,
    /// Whether the socket, once found far, was given a wider send buffer
    /// ([`super::net::widen_send_buffer`]).
    send_buffer_widened: bool,
    /// This connection's RTT estimate, seconds (0: not measured).
    rtt: f64,
    /// The least RTT sample it ever had, seconds (0: none): the distance to the peer.
    rtt_floor: f64,
    /// Piece bytes per second we upload to this peer while it has work queued.
    up_rate: f64,
    /// The same over the last tick alone.
    up_last: f64,
    sent_mark: u64,
    /// The remote reads PIECE_PART (its HELLO said so).
    remote_parts: bool,
    /// The remote reads RECEIVING and relays (its HELLO said so, and it is not on this host).
    remote_relay: bool,
    /// Pieces the peer said it is receiving (RECEIVING) and may be asked for.
    streaming: HashSet<u32>,
    /// Pieces the peer relayed to us in part and then REJECTed (they failed there).
    relay_failures: u32,
    /// A piece arriving in parts.
    partial: Option<Partial>,
}

/// What a connection asks of its peer ([`Session::budget`]).
struct Budget {
    /// Requests to keep outstanding.
    slots: usize,
    /// What the peer gives us, bytes a second (0: not measured).
    rate: f64,
    /// Requests past which we cancel (None: not measured).
    keep: Option<usize>,
}

/// A piece arriving in parts: the parts so far, and its publication for relay.
struct Partial {
    index: u32,
    parts: Vec<Bytes>,
    len: usize,
    relay: Option<Inbound>,
}

/// Why a session ends.
enum End {
    Quiet,
    /// Tell the peer why, then close.
    Tell(String),
}

/// A frame as the reader hands it over: the frame, the SHA-256 of its payload, and when it
/// arrived (for RTT samples, before it waits in the channel).
type Incoming = Result<Option<(Frame, Hash, Instant)>, FrameError>;

#[allow(clippy::too_many_arguments)]
async fn session<R, W>(
    d: Arc<Net>,
    t: Arc<Torrent>,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    hello: &Hello,
    addr: SocketAddr,
    outgoing: bool,
    early: Option<Opening>,
    sock: Option<std::os::fd::OwnedFd>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let remote = hello.peer_id.clone();
    let Some((conn_id, token)) = register(&d, &t, &remote, addr, outgoing) else {
        let _ = writer
            .send(
                &PeerMsg::Error {
                    reason: "duplicate connection".into(),
                },
                &[],
            )
            .await; // Best effort.
        return;
    };
    debug!(outgoing, "connected");
    reader.set_timeouts(Timeouts {
        idle: d.cfg.idle_timeout,
        read: d.cfg.read_timeout,
    });
    let sent_early = early.is_some();
    let Opening {
        mut events,
        shown,
        super_mode,
        local,
    } = early.unwrap_or_else(|| Opening::take(&d, &t, addr));
    let n = t.meta.piece_count();
    // Parts are for a thin link; a peer on this host gets whole pieces (as in
    // `Opening::take`, unless the upload is capped). Until the link is measured, parts: its
    // first pieces hold control too.
    let remote_parts = hello.parts && !local;
    let shared = Arc::new(Shared {
        part_bytes: AtomicU32::new(if remote_parts { PART_BYTES } else { 0 }),
        uplink: Some(d.uplink.clone()),
        ..Shared::default()
    });
    let (ctrl_tx, ctrl_rx) = mpsc::channel(CTRL_QUEUE);
    let (in_tx, mut in_rx) = mpsc::channel::<Incoming>(2);
    let reader_task = tokio::spawn(async move {
        let mut h = Sha256::new();
        // A piece coming in parts is hashed across them (the session checks they are in order
        // and of one piece; any other sequence closes the connection).
        let mut parts_h = Sha256::new();
        // The piece whose parts are being hashed: a relay that REJECTs it midway (it failed
        // there) ends it, and the next piece's hash starts afresh.
        let mut parts_of: Option<u32> = None;
        loop {
            // Every payload is hashed as it arrives, while hot in this core's cache; only a
            // PIECE's digest is used, and the other payloads are small.
            let r = reader
                .read_frame_observing(|kind, b| {
                    if kind == PIECE_PART {
                        parts_h.update(b);
                    } else {
                        h.update(b);
                    }
                })
                .await
                .map(|f| {
                    f.map(|f| {
                        let digest = if f.kind() == PIECE_PART {
                            match f.parse::<PeerMsg>() {
                                Ok(PeerMsg::PiecePart {
                                    index,
                                    offset,
                                    total,
                                    len,
                                }) => {
                                    if u64::from(offset) + u64::from(len) >= u64::from(total) {
                                        parts_of = None;
                                        Hash::from(parts_h.finalize_reset())
                                    } else {
                                        parts_of = Some(index);
                                        Hash::default()
                                    }
                                }
                                _ => Hash::default(),
                            }
                        } else if f.kind() == REJECT && parts_of.is_some() {
                            if let Ok(PeerMsg::Reject { index, .. }) = f.parse::<PeerMsg>() {
                                if parts_of == Some(index) {
                                    parts_of = None;
                                    parts_h = Sha256::new();
                                }
                            }
                            Hash::from(h.finalize_reset())
                        } else {
                            Hash::from(h.finalize_reset())
                        };
                        (f, digest, Instant::now())
                    })
                });
            let end = !matches!(r, Ok(Some(_)));
            if in_tx.send(r).await.is_err() || end {
                break;
            }
        }
    });
    let writer_task = tokio::spawn(write_loop(
        d.clone(),
        t.clone(),
        writer,
        ctrl_rx,
        shared.clone(),
        remote.clone(),
        d.cfg.idle_timeout / 3,
    ));
    let mut s = Session {
        d: d.clone(),
        t: t.clone(),
        remote: remote.clone(),
        addr,
        remote_roster: hello.roster.max(t.roster_version()),
        ctrl: ctrl_tx,
        shared,
        peer_bits: None,
        peer_complete: false,
        told: shown.clone(),
        requested: HashMap::new(),
        avoid: HashSet::new(),
        busy_cap: None,
        bytes_since_tick: 0,
        last_tick: Instant::now(),
        consecutive_timeouts: 0,
        rng: rand::rngs::StdRng::from_entropy(),
        ticks: 0,
        super_mode,
        offers: HashSet::new(),
        unspread: Vec::new(),
        held_back: false,
        last_asked: Instant::now(),
        conn_id,
        next_ping: 0,
        ping_asked: None,
        rtt_samples: VecDeque::new(),
        owd: (!addr.ip().is_loopback()).then(crate::pacer::OwdBase::default),
        sock: sock.map(|fd| {
            let fd = Arc::new(fd);
            d.uplink.register(&fd);
            fd
        }),
        send_buffer_widened: false,
        rtt: 0.0,
        rtt_floor: 0.0,
        up_rate: 0.0,
        up_last: 0.0,
        sent_mark: 0,
        remote_parts,
        remote_relay: hello.relay && remote_parts,
        streaming: HashSet::new(),
        relay_failures: 0,
        partial: None,
    };
    if !sent_early {
        let m = PeerMsg::Bitfield {
            len: shown.as_bytes().len() as u32,
            super_seed: super_mode,
        };
        let _ = s
            .ctrl
            .send(Ctrl::Payload(m, Bytes::copy_from_slice(shown.as_bytes())))
            .await;
    }
    // The first RTT sample right away: the pipelining depth needs it.
    let _ = s.ping().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        let step = tokio::select! {
            _ = token.cancelled() => break End::Quiet,
            r = in_rx.recv() => match r {
                None | Some(Ok(None)) => break End::Quiet,
                Some(Err(e)) => {
                    debug!(cause = %e, "read failed");
                    break if e.is_protocol_violation() { End::Tell(e.to_string()) } else { End::Quiet };
                }
                Some(Ok(Some((frame, digest, at)))) => s.on_frame(frame, digest, at, n).await,
            },
            ev = events.recv() => s.on_event(ev).await,
            _ = tick.tick() => s.on_tick().await,
            _ = s.t.spread.notified(), if s.held_back => Ok(()),
        };
        if let Err(end) = step {
            break end;
        }
        if let Err(end) = s.fill_offers().await {
            break end;
        }
        if s.fill_requests().await.is_err() {
            break End::Quiet;
        }
    };
    if let End::Tell(reason) = &end {
        warn!(peer = %remote, %addr, %reason, "closing connection");
        // Ahead of any queued piece; the writer gets a second to send it (below). A full or
        // closed queue only means the ERROR is not delivered.
        let _ = s
            .ctrl
            .send(Ctrl::Msg(PeerMsg::Error {
                reason: reason.clone(),
            }))
            .await;
    }
    // Cleanup: give back every outstanding request, this peer's availability, and the pieces
    // offered to it or queued for it and not sent (another peer may be offered them now).
    {
        let mut st = t.lock();
        for &i in s.requested.keys() {
            st.picker.release(i);
        }
        if let Some(b) = &s.peer_bits {
            st.picker.remove_peer(b);
        }
        st.seed.withdraw_all(conn_id);
        let mut q = s.shared.uploads.lock().expect("upload queue lock");
        q.order.clear();
        q.bytes = 0;
        drop(q);
        if st.conns.get(&remote).is_some_and(|c| c.id == conn_id) {
            st.conns.remove(&remote);
        }
    }
    reader_task.abort();
    let Session { ctrl, .. } = s;
    drop(ctrl);
    // The writer sends the control frames queued (bounded by its write timeout) then ends.
    if matches!(end, End::Tell(_)) {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    } else {
        writer_task.abort();
    }
    debug!("disconnected");
}

/// The span a connection's logs carry. Instrumented, not entered: a guard held across awaits
/// would lend it to whatever task runs next on the thread (debug logs showed connections
/// nested in each other, naming the wrong peer).
fn conn_span(t: &Torrent, hello: &Hello, addr: SocketAddr) -> tracing::Span {
    tracing::debug_span!("conn", info_hash = %t.hex, peer = %hello.peer_id, %addr)
}

impl Session {
    async fn send(&self, m: PeerMsg) -> Result<(), End> {
        self.ctrl.send(Ctrl::Msg(m)).await.map_err(|_| End::Quiet)
    }

    fn check_index(&self, index: u32, n: u32) -> Result<(), End> {
        if index >= n {
            return Err(End::Tell(format!(
                "piece index {index} out of range (0..{n})"
            )));
        }
        Ok(())
    }

    /// Whether the peer is far enough for its own pacing cap and send buffer: its least RTT
    /// is at least [`CAPPED_PACING_RTT`].
    fn is_far(&self) -> bool {
        self.rtt_floor >= CAPPED_PACING_RTT
    }

    /// Bytes of pieces we queue for this peer at most: what its link drains in a couple of
    /// round trips ([`crate::scorer::pipeline_bytes`], the same product its pipelining depth
    /// follows), and never under two pieces, so one is always ready behind the one on the wire.
    fn upload_bound(&self) -> u64 {
        let piece = u64::from(self.t.meta.piece_length);
        if self.up_rate <= 0.0 {
            // Not measured yet: as many as an unmeasured downloader asks for.
            return piece * self.d.cfg.initial_requests_per_peer.max(2) as u64;
        }
        // The last second's rate when it is over the average: as the downloader's depth
        // ([`crate::scorer::PeerScore::rate`]), or a far connection opens 20 % a second.
        let rate = self.up_rate.max(self.up_last);
        let bdp = crate::scorer::pipeline_bytes(rate, self.rtt) as u64;
        (bdp + piece).max(2 * piece)
    }

    async fn ping(&mut self) -> Result<(), End> {
        self.next_ping += 1;
        self.ping_asked = Some(Instant::now());
        self.send(PeerMsg::Ping { id: self.next_ping }).await
    }

    /// `digest` is the SHA-256 of `frame`'s payload; `at` is when the frame arrived.
    async fn on_frame(
        &mut self,
        frame: Frame,
        digest: Hash,
        at: Instant,
        n: u32,
    ) -> Result<(), End> {
        let msg = match frame.parse::<PeerMsg>() {
            Ok(m) => m,
            Err(e) => return Err(End::Tell(format!("bad {} message: {e}", frame.kind()))),
        };
        match msg {
            PeerMsg::Bitfield { super_seed, .. } => {
                let bits = Bitfield::from_bytes(&frame.payload, n).ok_or_else(|| {
                    End::Tell(format!(
                        "BITFIELD of {} bytes does not fit {n} pieces",
                        frame.payload.len()
                    ))
                })?;
                self.peer_complete = super_seed || bits.is_complete();
                let mut st = self.t.lock();
                if let Some(old) = &self.peer_bits {
                    st.picker.remove_peer(old);
                }
                st.picker.add_peer(&bits);
                if let Some(e) = st.conns.get_mut(&self.remote) {
                    e.have = Some(bits.count());
                }
                // What a leecher already has is spread, wherever it came from.
                if !self.peer_complete && st.seed.is_spreading() {
                    for i in bits.ones() {
                        st.seed.on_peer_has(i);
                    }
                }
                drop(st);
                self.peer_bits = Some(bits);
            }
            PeerMsg::Have { index } => {
                self.check_index(index, n)?;
                let bits = self.peer_bits.get_or_insert_with(|| Bitfield::new(n));
                if bits.set(index) {
                    let count = bits.count();
                    let mut st = self.t.lock();
                    st.picker.add_have(index);
                    if let Some(e) = st.conns.get_mut(&self.remote) {
                        e.have = Some(count);
                    }
                    if st.picker.availability(index) == 1 && st.seed.is_spreading() {
                        self.t.spread.notify_waiters();
                    }
                    if !self.peer_complete && st.seed.on_have(index) {
                        if st.seed.saw_other_source() {
                            info!(peer = %self.remote, index, "a leecher got a piece we never sent: another seeder serves the swarm, super-seeding off");
                        }
                        let _ = self.t.events.send(TorrentEvent::AdvertiseAll);
                    }
                }
                self.avoid.remove(&index);
                self.streaming.remove(&index);
            }
            PeerMsg::Receiving { index } => {
                self.check_index(index, n)?;
                let had = self.peer_bits.as_ref().is_some_and(|b| b.get(index));
                if !had && self.relay_failures < MAX_RELAY_FAILURES {
                    self.streaming.insert(index);
                }
            }
            PeerMsg::Request { index } => {
                self.check_index(index, n)?;
                self.on_request(index).await?;
            }
            PeerMsg::Cancel { index } => {
                self.check_index(index, n)?;
                let size = u64::from(self.t.meta.piece_size(index));
                // Being sent in parts, the rest need not go (endgame duplicates would
                // otherwise take the uplink the last pieces need).
                if self.shared.cancel(index, size) && self.super_mode {
                    // Not sent: another peer may be offered it.
                    self.t.lock().seed.withdraw(index, self.conn_id);
                }
            }
            PeerMsg::Piece { index, len } => {
                self.check_index(index, n)?;
                let expected = self.t.meta.piece_size(index);
                if len != expected || frame.payload.len() != expected as usize {
                    return Err(End::Tell(format!(
                        "PIECE {index} has {} bytes, expected {expected}",
                        frame.payload.len()
                    )));
                }
                self.on_piece(index, frame.payload, digest, None, false)
                    .await?;
            }
            PeerMsg::PiecePart {
                index,
                offset,
                total,
                len,
            } => {
                self.check_index(index, n)?;
                if let Some((whole, relay)) =
                    self.on_part(index, offset, total, len, frame.payload)?
                {
                    self.on_piece(index, whole, digest, relay, true).await?;
                }
            }
            PeerMsg::Reject {
                index,
                reason,
                busy,
            } => {
                self.check_index(index, n)?;
                debug!(index, %reason, busy, "request rejected");
                if self.partial.as_ref().is_some_and(|p| p.index == index) {
                    // Cancelled by us, or a relay's piece failed there midway: its parts so far
                    // are void.
                    self.partial = None;
                    if self.requested.contains_key(&index) {
                        self.relay_failures += 1;
                    }
                }
                if !busy {
                    self.streaming.remove(&index);
                }
                if self.requested.remove(&index).is_some() {
                    self.t.lock().picker.release(index);
                    if busy {
                        // Its queue is full, not the piece refused: ask again later, and
                        // keep no more requests than it holds now until the next tick.
                        self.busy_cap = Some(self.requested.len().max(1));
                    } else {
                        self.avoid.insert(index);
                    }
                }
            }
            PeerMsg::GetMetadata => {
                let json = Bytes::from(self.t.meta.to_json());
                let m = PeerMsg::Metadata {
                    len: json.len() as u32,
                };
                self.ctrl
                    .send(Ctrl::Payload(m, json))
                    .await
                    .map_err(|_| End::Quiet)?;
            }
            PeerMsg::Ping { id } => {
                let pong = PeerMsg::Pong {
                    id,
                    at: crate::pacer::clock_us(at),
                };
                match crate::testhook::pong_delay() {
                    Some(delay) => {
                        let tx = self.ctrl.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = tx.send(Ctrl::Msg(pong)).await;
                        });
                    }
                    None => self.send(pong).await?,
                }
            }
            PeerMsg::Pong { id, at: peer_at } => self.on_pong(id, at, peer_at),
            PeerMsg::Keepalive | PeerMsg::Metadata { .. } => {}
            PeerMsg::Roster { .. } => {
                let r = parse_roster(&frame.payload).map_err(End::Tell)?;
                self.remote_roster = self.remote_roster.max(r.version);
                // Adopting tells every connection (this one too), which closes the revoked.
                self.t
                    .adopt_roster(r)
                    .await
                    .map_err(|e| End::Tell(format!("ROSTER refused: {e}")))?;
            }
            PeerMsg::Error { reason } => {
                info!(peer = %self.remote, %reason, "peer closed with an error");
                return Err(End::Quiet);
            }
            PeerMsg::Hello { .. } => return Err(End::Tell("HELLO twice".into())),
        }
        Ok(())
    }

    async fn on_request(&mut self, index: u32) -> Result<(), End> {
        self.last_asked = Instant::now();
        let have = self.t.lock().picker.have().get(index)
            || (self.remote_relay && self.t.relays.get(index).is_some());
        if !have {
            return self
                .send(PeerMsg::Reject {
                    index,
                    reason: "piece not available here".into(),
                    busy: false,
                })
                .await;
        }
        let size = u64::from(self.t.meta.piece_size(index));
        let bound = self.upload_bound();
        let refused = {
            let mut q = self.shared.uploads.lock().expect("upload queue lock");
            if q.order.contains(&index) {
                return Ok(()); // Asked twice: once is enough.
            }
            let full = q.order.len() >= self.d.cfg.max_uploads_per_peer
                || (!q.order.is_empty() && q.bytes + size > bound);
            if !full {
                q.order.push_back(index);
                q.bytes += size;
            }
            full
        };
        // A refused offer stays offered: the peer asks again when our queue has room.
        if !refused && self.offers.remove(&index) {
            self.unspread.push(index);
        }
        if refused {
            return self
                .send(PeerMsg::Reject {
                    index,
                    reason: "upload queue full".into(),
                    busy: true,
                })
                .await;
        }
        self.shared.upload_ready.notify_one();
        Ok(())
    }

    /// `peer_at`: the peer's clock when our PING arrived (0: not given).
    fn on_pong(&mut self, id: u64, at: Instant, peer_at: u64) {
        let sent = *self.shared.ping.lock().expect("ping lock");
        let Some((sent_id, sent_at)) = sent else {
            return;
        };
        if sent_id != id || id != self.next_ping || self.ping_asked.is_none() {
            return; // An answer to a PING we gave up on.
        }
        self.ping_asked = None;
        let sample = at.saturating_duration_since(sent_at).as_secs_f64();
        if self.rtt_samples.len() == RTT_WINDOW {
            self.rtt_samples.pop_front();
        }
        self.rtt_samples.push_back(sample);
        self.rtt = self.rtt_samples.iter().copied().fold(f64::MAX, f64::min);
        self.rtt_floor = if self.rtt_floor > 0.0 {
            self.rtt_floor.min(sample)
        } else {
            sample
        };
        let rtt_ms = self.rtt * 1000.0;
        let downloading = {
            let mut st = self.t.lock();
            st.score(&self.remote).record_rtt(rtt_ms);
            !st.picker.is_complete()
        };
        // Paced for the sake of our downloads only: a seeder's upload is what it is for.
        if let (Some(owd), true) = (&mut self.owd, peer_at > 0 && downloading) {
            // i128: a hostile clock value cannot overflow the difference.
            let raw = i128::from(peer_at) - i128::from(crate::pacer::clock_us(sent_at));
            let raw = raw.clamp(i128::from(i64::MIN / 2), i128::from(i64::MAX / 2)) as i64;
            let q = owd.sample(raw, at, self.d.uplink.queue_now_us());
            trace!(queue_us = q, raw, "one-way delay sample");
            // The distance, not the windowed RTT: that one holds our own queue when it
            // lasts, and a target that grows with the queue never paces it (seen: 30-50 ms
            // queues let through on a 20 ms path).
            self.d.uplink.report_queue(q, (self.rtt_floor * 1e6) as u64);
        }
    }

    /// One part of a piece: the whole piece once its last part is in (with its publication
    /// for relay, if it was published). Parts out of order, of two pieces interleaved, or not
    /// adding up to the piece's size end the connection.
    fn on_part(
        &mut self,
        index: u32,
        offset: u32,
        total: u32,
        len: u32,
        payload: Bytes,
    ) -> Result<Option<(Bytes, Option<Inbound>)>, End> {
        let expected = self.t.meta.piece_size(index);
        let so_far = match &self.partial {
            Some(p) if p.index == index => p.len as u64,
            Some(p) => {
                return Err(End::Tell(format!(
                    "PIECE_PART of {index} while piece {} is incomplete",
                    p.index
                )))
            }
            None => 0,
        };
        if total != expected
            || len == 0
            || payload.len() != len as usize
            || u64::from(offset) != so_far
            || u64::from(offset) + u64::from(len) > u64::from(total)
        {
            return Err(End::Tell(format!(
                "PIECE_PART of {index} at {offset} with {} bytes does not continue its {expected} bytes at {so_far}",
                payload.len()
            )));
        }
        if self.partial.is_none() {
            // A piece we asked for, more parts to come: peers may ask us for it now.
            let relay = if self.requested.contains_key(&index) && len < total {
                self.t.relays.begin(index)
            } else {
                None
            };
            if relay.is_some() {
                let _ = self.t.events.send(TorrentEvent::Receiving(index));
            }
            self.partial = Some(Partial {
                index,
                parts: Vec::with_capacity((total / len.max(1) + 1) as usize),
                len: 0,
                relay,
            });
        }
        // Counted as it lands: a slow peer's piece may take several ticks, and ticks that
        // saw none of its bytes would measure it as delivering nothing.
        self.bytes_since_tick += payload.len() as u64;
        let p = self.partial.as_mut().expect("just set");
        if let Some(r) = &p.relay {
            r.push(payload.clone());
        }
        p.len += payload.len();
        p.parts.push(payload);
        if p.len < expected as usize {
            return Ok(None);
        }
        let p = self.partial.take().expect("just filled");
        let whole = if p.parts.len() == 1 {
            p.parts.into_iter().next().expect("one part")
        } else {
            let mut buf = BytesMut::with_capacity(p.len);
            for part in &p.parts {
                buf.extend_from_slice(part);
            }
            buf.freeze()
        };
        Ok(Some((whole, p.relay)))
    }

    /// A whole piece arrived (`relay`: its publication, if it was relayed as it came; dropped
    /// unverified, its streams end; `counted`: its bytes went into the throughput sample as
    /// its parts came).
    async fn on_piece(
        &mut self,
        index: u32,
        payload: Bytes,
        digest: Hash,
        relay: Option<Inbound>,
        counted: bool,
    ) -> Result<(), End> {
        let Some(sent_at) = self.requested.remove(&index) else {
            // Not (or no longer) requested: a reply racing our CANCEL. Harmless.
            return Ok(());
        };
        self.consecutive_timeouts = 0;
        let latency_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
        trace!(index, peer = %self.remote, latency_ms, "piece arrived");
        if !counted {
            self.bytes_since_tick += payload.len() as u64;
        }
        if !self.t.lock().picker.arrive_for_write(index) {
            return Ok(()); // Endgame: another copy won.
        }
        // The digest was taken as the bytes arrived, so the verdict is known before the next
        // frame is handled: a bad piece never touches the file, and a saboteur is banned after
        // exactly `ban_threshold` corrupt pieces, never more.
        if digest != self.t.meta.pieces[index as usize] {
            // Banned meanwhile (another connection from this host): counted once, not again.
            if let Some(why) = self.d.bans.banned(&self.remote, self.addr.ip()) {
                return Err(End::Tell(why));
            }
            let cfg = &self.d.cfg;
            // Banned by key and by address: the key was proven by the handshake and the
            // address answered TCP's, so this peer is the one that sent the bytes.
            let until = self.d.bans.on_corrupt(
                &self.remote,
                self.addr.ip(),
                cfg.ban_threshold,
                cfg.ban_duration,
            );
            self.t.on_hash_failed(index, &self.remote, until);
            // Don't take the same piece from the same peer again right away.
            self.avoid.insert(index);
            if until.is_some() {
                return Err(End::Tell(format!(
                    "banned: piece {index} failed its hash and you reached the limit of corrupt pieces"
                )));
            }
            return Ok(());
        }
        // Verified: its streams may send the last part now, not after the write.
        let relayed = relay.map(Inbound::verified);
        // Bound the pieces in memory: wait for a write slot (the reader keeps at most one more
        // frame meanwhile).
        let Ok(permit) = self.d.verify_limit.clone().acquire_owned().await else {
            return Ok(());
        };
        let t = self.t.clone();
        let remote = self.remote.clone();
        // Counted among the session's tasks: stopping the torrent waits for this write.
        let in_flight = self.t.tasks.token();
        // The session does not wait for the outcome: the torrent records it (with the
        // write's receipt, for the next flush) and tells every connection.
        self.d.writers.spawn(move || {
            let written = t.storage.write_piece(index, &payload);
            drop(permit);
            t.on_verified(written, &remote, latency_ms);
            // Served from the file from now on: unpublished.
            drop(relayed);
            drop(in_flight);
        });
        Ok(())
    }

    async fn on_event(
        &mut self,
        ev: Result<TorrentEvent, broadcast::error::RecvError>,
    ) -> Result<(), End> {
        match ev {
            Ok(TorrentEvent::Have(i)) => self.on_have(i).await,
            Ok(TorrentEvent::Roster(r)) => self.on_roster(&r).await,
            Ok(TorrentEvent::AdvertiseAll) => self.advertise_all().await,
            Ok(TorrentEvent::Receiving(i)) => {
                let lacks = !self.peer_complete
                    && !self.told.get(i)
                    && !self.peer_bits.as_ref().is_some_and(|b| b.get(i));
                if self.remote_relay && lacks {
                    self.send(PeerMsg::Receiving { index: i }).await?;
                }
                Ok(())
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // A missed roster is sent again (and checked) whatever the mode.
                if let Some(r) = self.t.membership.as_ref().and_then(|m| m.roster()) {
                    self.on_roster(&r).await?;
                }
                if self.super_mode {
                    // A super-seeder hears only AdvertiseAll: check whether it was missed.
                    if !self.t.lock().seed.is_active() {
                        return self.advertise_all().await;
                    }
                    return Ok(());
                }
                // Missed some: tell the peer about everything we have that it has not heard.
                let have = self.t.lock().picker.have().clone();
                for i in have.ones() {
                    self.on_have(i).await?;
                }
                if let Some(r) = self.t.membership.as_ref().and_then(|m| m.roster()) {
                    self.on_roster(&r).await?;
                }
                Ok(())
            }
            Err(broadcast::error::RecvError::Closed) => Err(End::Quiet),
        }
    }

    /// A newer roster: close if it no longer admits the peer, else pass it on.
    async fn on_roster(&mut self, r: &shoal_tracker::roster::Roster) -> Result<(), End> {
        if !r.admits(&self.remote) {
            return Err(End::Tell(format!(
                "not a member of private swarm {} (roster version {})",
                self.t.hex, r.version
            )));
        }
        if r.version > self.remote_roster {
            self.remote_roster = r.version;
            let json = Bytes::from(serde_json::to_vec(r).expect("a roster serializes"));
            let m = PeerMsg::Roster {
                len: json.len() as u32,
            };
            self.ctrl
                .send(Ctrl::Payload(m, json))
                .await
                .map_err(|_| End::Quiet)?;
        }
        Ok(())
    }

    /// Super-seeding is over: show the peer every piece (a new BITFIELD replaces the offers).
    async fn advertise_all(&mut self) -> Result<(), End> {
        if !self.super_mode {
            return Ok(());
        }
        self.super_mode = false;
        self.held_back = false;
        self.offers.clear();
        // Whatever it held and did not get may go to others (when only this peer leaves).
        self.t.lock().seed.withdraw_all(self.conn_id);
        let have = self.t.lock().picker.have().clone();
        let m = PeerMsg::Bitfield {
            len: have.as_bytes().len() as u32,
            super_seed: false,
        };
        let bytes = Bytes::copy_from_slice(have.as_bytes());
        self.told = have;
        self.ctrl
            .send(Ctrl::Payload(m, bytes))
            .await
            .map_err(|_| End::Quiet)
    }

    async fn on_have(&mut self, i: u32) -> Result<(), End> {
        if self.requested.remove(&i).is_some() {
            // Endgame duplicate: the piece came from elsewhere.
            self.t.lock().picker.release(i);
            self.send(PeerMsg::Cancel { index: i }).await?;
        }
        let peer_has = self.peer_bits.as_ref().is_some_and(|b| b.get(i));
        if !peer_has && self.told.set(i) {
            self.send(PeerMsg::Have { index: i }).await?;
        }
        Ok(())
    }

    async fn on_tick(&mut self) -> Result<(), End> {
        self.ticks += 1;
        self.busy_cap = None;
        // Throughput over the last tick, sampled only while the peer had work from us (an idle
        // peer is not a slow one).
        let dt = self.last_tick.elapsed().as_secs_f64();
        self.last_tick = Instant::now();
        if dt > 0.0 && (self.bytes_since_tick > 0 || !self.requested.is_empty()) {
            let sample = self.bytes_since_tick as f64 / dt;
            self.t.lock().score(&self.remote).record_throughput(sample);
        }
        self.bytes_since_tick = 0;
        // Our upload rate to the peer, over ticks in which we sent it something.
        let sent = self.shared.sent_bytes.load(Ordering::Relaxed);
        let up = sent - self.sent_mark;
        self.sent_mark = sent;
        if dt > 0.0 {
            self.up_last = up as f64 / dt;
        }
        if dt > 0.0 && up > 0 {
            self.up_rate = crate::scorer::ewma(self.up_rate, up as f64 / dt);
            if let Some(fd) = self.sock.as_ref().filter(|_| self.is_far()) {
                let cap = CAPPED_PACING_GAIN * self.up_rate.max(up as f64 / dt);
                super::net::cap_pacing_rate(fd, cap.max(CAPPED_PACING_FLOOR));
            }
            if self.remote_parts {
                let piece = f64::from(self.t.meta.piece_length);
                let whole = self.up_rate * WHOLE_PIECE_SECS >= piece;
                let part = if whole { 0 } else { PART_BYTES };
                self.shared.part_bytes.store(part, Ordering::Relaxed);
            }
        }
        if let Some(fd) = self
            .sock
            .as_ref()
            .filter(|_| !self.send_buffer_widened && self.is_far())
        {
            super::net::widen_send_buffer(&**fd);
            self.send_buffer_widened = true;
        }
        if self.ping_asked.is_none_or(|at| at.elapsed() > PING_GIVE_UP) {
            self.ping().await?;
        }
        self.shed().await?;
        let timeout = self.d.cfg.request_timeout;
        let expired: Vec<u32> = self
            .requested
            .iter()
            .filter(|(_, at)| at.elapsed() > timeout)
            .map(|(&i, _)| i)
            .collect();
        if !expired.is_empty() {
            self.give_back(&expired);
            self.t.lock().score(&self.remote).timeouts += expired.len() as u32;
            self.consecutive_timeouts += expired.len() as u32;
            warn!(peer = %self.remote, pieces = ?expired, "requests timed out");
        }
        if self.consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS {
            return Err(End::Tell("too many requests timed out".into()));
        }
        if self.ticks % 15 == 0 {
            self.avoid.clear();
        }
        if self.super_mode {
            // Also when every peer is complete and nothing is offered any more.
            end_second_phase(&self.t, &mut self.t.lock());
        }
        Ok(())
    }

    /// Super-seeding: keep this peer's pipeline to us full of pieces nobody else was offered:
    /// what it has queued with us plus the offers it has not asked for yet come to what our
    /// queue for it holds (its link drains that in a couple of round trips), so it always has
    /// one to ask for as a piece goes out.
    async fn fill_offers(&mut self) -> Result<(), End> {
        // A peer complete from its BITFIELD never takes offers; one that completes by its
        // HAVEs ends the first phase, and with it holding back.
        if !self.super_mode || self.peer_complete {
            return Ok(());
        }
        let Some(bits) = &self.peer_bits else {
            return Ok(()); // Its BITFIELD first: offer nothing it has.
        };
        let piece = u64::from(self.t.meta.piece_length);
        // What our queue for it accepts (the piece being sent is beyond it): more offers would
        // be asked for and refused as busy.
        let target = (self.upload_bound() / piece).max(2) as usize;
        let queued = self
            .shared
            .uploads
            .lock()
            .expect("upload queue lock")
            .order
            .len();
        let sending = self.shared.sending.load(Ordering::Relaxed);
        // A peer that asks for none of what we offer, for long, while nothing of ours is
        // queued for it (it wants only some files of a tree, or gets everything elsewhere):
        // offering more cannot help it; show it everything (below). A peer whose pipeline to
        // us is full is not ignoring us: it asks as the pipeline drains, however slow the link.
        let ignored_after = Duration::from_secs_f64(
            (OFFERS_IGNORED_PIPELINES * crate::scorer::pipeline_secs(self.rtt))
                .max(MIN_OFFERS_IGNORED_SECS),
        );
        let mut fresh = Vec::new();
        let give_up;
        {
            let mut st = self.t.lock();
            if !st.seed.is_active() {
                return Ok(()); // AdvertiseAll is on its way.
            }
            // An offer spread elsewhere (another seeder's upload) no longer counts.
            let conn = self.conn_id;
            self.offers.retain(|&i| st.seed.still_offered(i, conn));
            give_up = queued == 0
                && !sending
                && !self.offers.is_empty()
                && self.last_asked.elapsed() > ignored_after;
            let st = &mut *st;
            let holders = |i| st.picker.availability(i);
            // Our pieces go to the leechers that pass them on: one that still holds the
            // only copy of several waits for them to spread.
            self.unspread.retain(|&i| holders(i) == 0);
            self.held_back = st.seed.hold_back(conn, self.unspread.len());
            while !give_up && !self.held_back && queued + self.offers.len() < target {
                match st.seed.offer(conn, bits, holders, &mut self.rng) {
                    Some(i) => {
                        self.offers.insert(i);
                        fresh.push(i);
                    }
                    None => break,
                }
            }
            if fresh.is_empty() {
                end_second_phase(&self.t, st);
            }
        }
        if give_up {
            debug!("the peer asks for none of our offers: showing it every piece");
            return self.advertise_all().await;
        }
        for i in fresh {
            self.told.set(i);
            self.send(PeerMsg::Have { index: i }).await?;
        }
        Ok(())
    }

    /// What we ask of this peer now: `None` once we are not downloading.
    fn budget(&self) -> Option<Budget> {
        let st = self.t.lock();
        if st.record.state != crate::store::TorrentState::Downloading || st.picker.is_complete() {
            return None;
        }
        let cfg = &self.d.cfg;
        let piece = self.t.meta.piece_length;
        let score = st.peers.get(&self.remote);
        let rate = score.map_or(0.0, |p| p.rate());
        let slots = score.map_or(cfg.initial_requests_per_peer, |p| {
            p.slots(
                piece,
                cfg.initial_requests_per_peer,
                cfg.max_requests_per_peer,
            )
        });
        if score.is_none_or(|p| p.throughput <= 0.0) {
            // Unmeasured: no product to deepen, no horizon to cut at.
            return Some(Budget {
                slots,
                rate,
                keep: None,
            });
        }
        let n = self.t.meta.piece_count();
        let missing = |have: u32| n.saturating_sub(have);
        let others = st
            .conns
            .values()
            .filter_map(|c| c.have)
            .filter(|&h| h < n)
            .map(missing);
        let mine = missing(st.picker.have().count());
        let behind = crate::scorer::lagging(mine, others);
        let slots = crate::scorer::lagging_slots(slots, behind, cfg.max_requests_per_peer);
        let left = u64::from(mine) * u64::from(piece);
        Some(Budget {
            slots: crate::scorer::horizon_slots(slots, rate, left, st.down_rate, piece),
            rate,
            keep: crate::scorer::keep_slots(rate, left, st.down_rate, piece),
        })
    }

    /// Our requests for `pieces` end without their pieces (timed out, or moved off a slow
    /// source): the picker may hand them to another connection, and this one does not ask
    /// for them again until `avoid` is cleared.
    fn give_back(&mut self, pieces: &[u32]) {
        let mut st = self.t.lock();
        for &i in pieces {
            self.requested.remove(&i);
            st.picker.release(i);
            self.avoid.insert(i);
        }
    }

    /// Cancel the requests this peer will not bring within [`crate::scorer::keep_slots`]'s
    /// horizon, newest first, so a faster source can take them: a request once sent stayed
    /// until its piece came, and a far leecher's first four requests to a 10 Mbit/s uplink
    /// shared by eight waited there 12-16 s, the last of them its last piece (heterogeneous
    /// scenario). The piece arriving now is kept: part of it is here already.
    async fn shed(&mut self) -> Result<(), End> {
        let Some(keep) = self.budget().and_then(|b| b.keep) else {
            return Ok(());
        };
        if self.requested.len() <= keep {
            return Ok(());
        }
        let arriving = self.partial.as_ref().map(|p| p.index);
        let mut newest: Vec<(Instant, u32)> = self
            .requested
            .iter()
            .filter(|(&i, _)| Some(i) != arriving)
            .map(|(&i, &at)| (at, i))
            .collect();
        newest.sort_unstable_by(|a, b| b.cmp(a));
        let excess = self.requested.len() - keep;
        let shed: Vec<u32> = newest.iter().take(excess).map(|&(_, i)| i).collect();
        self.give_back(&shed);
        debug!(pieces = ?shed, keep, "requests moved off a slow source");
        for i in shed {
            self.send(PeerMsg::Cancel { index: i }).await?;
        }
        Ok(())
    }

    /// Keep as many requests outstanding as this peer's score allows.
    async fn fill_requests(&mut self) -> Result<(), ()> {
        let Some(bits) = &self.peer_bits else {
            return Ok(());
        };
        let Some(Budget { slots, rate, .. }) = self.budget() else {
            return Ok(());
        };
        let slots = self.busy_cap.map_or(slots, |cap| slots.min(cap));
        if self.requested.len() >= slots {
            return Ok(()); // Called after every frame: most often there is no room.
        }
        // What the peer is still receiving may be asked for too: it relays it as it comes.
        let with_streaming;
        let bits = if self.streaming.is_empty() {
            bits
        } else {
            let mut b = bits.clone();
            for &i in &self.streaming {
                b.set(i);
            }
            with_streaming = b;
            &with_streaming
        };
        let piece = f64::from(self.t.meta.piece_length);
        while self.requested.len() < slots {
            // When this request should bring its piece: a round trip, plus our queue with the
            // peer ahead of it at the rate it gives us.
            let now = Instant::now();
            let due = (rate > 0.0).then(|| {
                let ahead = (self.requested.len() + 1) as f64 * piece / rate;
                now + Duration::from_secs_f64((self.rtt + ahead).min(3600.0))
            });
            // In endgame a duplicate goes only to a connection with nothing else to send us:
            // queued behind other pieces it would come after the copy it duplicates and take
            // the uploader's bandwidth from pieces someone still lacks. (Heterogeneous
            // scenario, 6 + 6 runs alternated: seeder copies 1.45-1.56, median 1.49, against
            // 1.47-1.62, median 1.56; the last finish median 21.4 s against 21.75 s.) Where its
            // rate is known, only for a piece it brings well before the piece's holders will
            // (`Picker::pick_sooner`). Same scenario, with `scorer::horizon_slots`, against
            // neither, runs alternated: duplicate pieces received by all leechers 52-86 per
            // run, median 59, against 71-103, median 91 (6 + 6); the last finish median
            // 19.9 s against 20.2 s (10 + 10).
            let pick = {
                let requested = &self.requested;
                let avoid = &self.avoid;
                let mine = |i| requested.contains_key(&i) || avoid.contains(&i);
                let mut st = self.t.lock();
                let endgame = st.picker.in_endgame();
                let pick = match due {
                    _ if endgame && !requested.is_empty() => break,
                    Some(due) if endgame => st.picker.pick_sooner(bits, mine, now, due),
                    _ => st.picker.pick(bits, mine, &mut self.rng),
                };
                // A duplicate from `pick_sooner` is noted there; one from `pick` has no due time.
                if let Pick::Fresh(i) = pick {
                    st.picker.note_due(i, now, due);
                }
                pick
            };
            match pick {
                Pick::Fresh(i) | Pick::Endgame(i) => {
                    trace!(index = i, peer = %self.remote, "request");
                    self.requested.insert(i, Instant::now());
                    if self
                        .ctrl
                        .send(Ctrl::Msg(PeerMsg::Request { index: i }))
                        .await
                        .is_err()
                    {
                        return Err(());
                    }
                }
                Pick::None => break,
            }
        }
        Ok(())
    }
}

/// End super-seeding's second phase if its work is done or its time is up: every connection
/// is then to show every piece.
fn end_second_phase(t: &Torrent, st: &mut super::torrent::TState) {
    let st = &mut *st;
    if st
        .seed
        .end_second_phase_if_done(|i| st.picker.availability(i), Instant::now())
    {
        info!(info_hash = %t.hex, "super-seeding done: every connection shows every piece");
        let _ = t.events.send(TorrentEvent::AdvertiseAll);
    }
}
