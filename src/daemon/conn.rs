//! One peer connection: HELLO both ways, BITFIELD, then requests and pieces in both
//! directions at once.
//!
//! Three tasks per connection: a reader that only reads frames (reading is not cancel-safe,
//! so it never sits in a `select!`), a writer that owns the socket's write half and serves
//! pieces straight from the memory map, and the session loop that owns the download state
//! (outstanding requests, the peer's bitfield) and reacts to frames, torrent events,
//! verification results and a 1 s tick.
//!
//! Hashing runs on the blocking pool, bounded by the daemon's `verify_limit`, so the network
//! tasks keep reading while pieces are hashed and at most that many pieces sit in memory.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use shoal_tracker::wire::{Frame, FrameError, FrameReader, FrameWriter, Limits, Timeouts};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::net::Net;
use super::torrent::{ConnEntry, Torrent, TorrentEvent};
use crate::bitfield::Bitfield;
use crate::metainfo::Hash;
use crate::peer_proto::{PeerMsg, VERSION};
use crate::picker::Pick;
use crate::sabotage::Action;
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
}

fn hello_of(d: &Net, hash: &Hash, roster: u64) -> PeerMsg {
    PeerMsg::Hello {
        v: VERSION,
        info_hash: hex::encode(hash),
        peer_id: d.peer_id.clone(),
        port: d.listen.port(),
        roster,
    }
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
                let r = serde_json::from_slice(&frame.payload)
                    .map_err(|e| ConnError::Protocol(format!("bad ROSTER: {e}")))?;
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
async fn secure(
    d: &Net,
    stream: TcpStream,
    outgoing: bool,
) -> Result<(Reader, Writer, String), ConnError> {
    let _ = stream.set_nodelay(true); // Requests are small and latency-bound.
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
    let (mut reader, mut writer, remote_id) = match secured {
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
    session(d, t, reader, writer, &hello, listen_addr, false).await;
}

/// Dial `addr` for torrent `t`.
///
/// # Errors
/// Connection and handshake failures; a session that ran returns Ok whatever ended it.
pub async fn run_outgoing(d: Arc<Net>, t: Arc<Torrent>, addr: SocketAddr) -> Result<(), ConnError> {
    if let Some(why) = d.bans.address_banned(addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    let stream = connect(&d, addr).await?;
    let (mut reader, mut writer, remote_id) = secure(&d, stream, true).await?;
    if remote_id == d.peer_id {
        return Err(ConnError::Refused("that is ourselves".into()));
    }
    if let Some(why) = d.bans.banned(&remote_id, addr.ip()) {
        return Err(ConnError::Refused(why));
    }
    writer
        .send(&hello_of(&d, &t.hash, t.roster_version()), &[])
        .await?;
    let hello = read_hello(&mut reader, &remote_id).await?;
    if hello.info_hash != t.hash {
        return Err(ConnError::Protocol("HELLO for another torrent".into()));
    }
    admit(&t, &mut reader, &mut writer, &hello).await?;
    session(d, t, reader, writer, &hello, addr, true).await;
    Ok(())
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
    let (mut reader, mut writer, remote_id) = secure(d, stream, true).await?;
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

/// What the session loop asks the writer to send.
enum Out {
    Msg(PeerMsg),
    Payload(PeerMsg, Bytes),
    /// Serve piece `index` from the map.
    Serve(u32),
}

/// State the session loop and the writer share.
#[derive(Default)]
struct Shared {
    /// Upload requests queued in the writer.
    queued: AtomicUsize,
    /// Requests the peer cancelled before we served them.
    cancelled: Mutex<HashSet<u32>>,
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
    out: mpsc::Sender<Out>,
    shared: Arc<Shared>,
    peer_bits: Option<Bitfield>,
    /// What the peer knows we have.
    told: Bitfield,
    requested: HashMap<u32, Instant>,
    /// Pieces not to ask this peer for now (rejected or timed out), cleared now and then.
    avoid: HashSet<u32>,
    /// Bytes received since the last tick, for the throughput sample.
    bytes_since_tick: u64,
    last_tick: Instant,
    consecutive_timeouts: u32,
    rng: rand::rngs::StdRng,
    ticks: u64,
}

/// Why a session ends.
enum End {
    Quiet,
    /// Tell the peer why, then close.
    Tell(String),
}

#[allow(clippy::too_many_arguments)]
async fn session(
    d: Arc<Net>,
    t: Arc<Torrent>,
    mut reader: Reader,
    mut writer: Writer,
    hello: &Hello,
    addr: SocketAddr,
    outgoing: bool,
) {
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
    let span = tracing::debug_span!("conn", info_hash = %t.hex, peer = %remote, %addr);
    let _guard = span.enter();
    debug!(outgoing, "connected");
    reader.set_timeouts(Timeouts {
        idle: d.cfg.idle_timeout,
        read: d.cfg.read_timeout,
    });
    // Subscribe before taking the bitfield, so no HAVE falls between the two.
    let mut events = t.events.subscribe();
    let ours = t.lock().picker.have().clone();
    let n = t.meta.piece_count();
    let shared = Arc::new(Shared::default());
    let (out_tx, out_rx) = mpsc::channel(d.cfg.max_uploads_per_peer + 256);
    let (in_tx, mut in_rx) = mpsc::channel(2);
    let reader_task = tokio::spawn(async move {
        let mut h = Sha256::new();
        loop {
            // Every payload is hashed as it arrives, while hot in this core's cache; only a
            // PIECE's digest is used, and the other payloads are small.
            let r = reader
                .read_frame_observing(|b| h.update(b))
                .await
                .map(|f| f.map(|f| (f, Hash::from(h.finalize_reset()))));
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
        out_rx,
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
        out: out_tx,
        shared,
        peer_bits: None,
        told: ours.clone(),
        requested: HashMap::new(),
        avoid: HashSet::new(),
        bytes_since_tick: 0,
        last_tick: Instant::now(),
        consecutive_timeouts: 0,
        rng: rand::rngs::StdRng::from_entropy(),
        ticks: 0,
    };
    let _ = s
        .out
        .send(Out::Payload(
            PeerMsg::Bitfield {
                len: ours.as_bytes().len() as u32,
            },
            Bytes::copy_from_slice(ours.as_bytes()),
        ))
        .await;
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
                Some(Ok(Some((frame, digest)))) => s.on_frame(frame, digest, n).await,
            },
            ev = events.recv() => s.on_event(ev).await,
            _ = tick.tick() => s.on_tick(),
        };
        if let Err(end) = step {
            break end;
        }
        if s.fill_requests().await.is_err() {
            break End::Quiet;
        }
    };
    if let End::Tell(reason) = &end {
        warn!(peer = %remote, %addr, %reason, "closing connection");
        // Queued behind what is pending; the writer gets a second to send it (below). A full
        // or closed queue only means the ERROR is not delivered.
        let _ = s
            .out
            .send(Out::Msg(PeerMsg::Error {
                reason: reason.clone(),
            }))
            .await;
    }
    // Cleanup: give back every outstanding request and this peer's availability.
    {
        let mut st = t.lock();
        for &i in s.requested.keys() {
            st.picker.release(i);
        }
        if let Some(b) = &s.peer_bits {
            st.picker.remove_peer(b);
        }
        if st.conns.get(&remote).is_some_and(|c| c.id == conn_id) {
            st.conns.remove(&remote);
        }
    }
    reader_task.abort();
    let Session { out, .. } = s;
    drop(out);
    // The writer drains what is queued (bounded by its write timeout) then ends.
    if matches!(end, End::Tell(_)) {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    } else {
        writer_task.abort();
    }
    debug!("disconnected");
}

impl Session {
    async fn send(&self, m: PeerMsg) -> Result<(), End> {
        self.out.send(Out::Msg(m)).await.map_err(|_| End::Quiet)
    }

    fn check_index(&self, index: u32, n: u32) -> Result<(), End> {
        if index >= n {
            return Err(End::Tell(format!(
                "piece index {index} out of range (0..{n})"
            )));
        }
        Ok(())
    }

    /// `digest` is the SHA-256 of `frame`'s payload.
    async fn on_frame(&mut self, frame: Frame, digest: Hash, n: u32) -> Result<(), End> {
        let msg = match frame.parse::<PeerMsg>() {
            Ok(m) => m,
            Err(e) => return Err(End::Tell(format!("bad {} message: {e}", frame.kind()))),
        };
        match msg {
            PeerMsg::Bitfield { .. } => {
                let bits = Bitfield::from_bytes(&frame.payload, n).ok_or_else(|| {
                    End::Tell(format!(
                        "BITFIELD of {} bytes does not fit {n} pieces",
                        frame.payload.len()
                    ))
                })?;
                let mut st = self.t.lock();
                if let Some(old) = &self.peer_bits {
                    st.picker.remove_peer(old);
                }
                st.picker.add_peer(&bits);
                drop(st);
                self.peer_bits = Some(bits);
            }
            PeerMsg::Have { index } => {
                self.check_index(index, n)?;
                let bits = self.peer_bits.get_or_insert_with(|| Bitfield::new(n));
                if bits.set(index) {
                    self.t.lock().picker.add_have(index);
                }
                self.avoid.remove(&index);
            }
            PeerMsg::Request { index } => {
                self.check_index(index, n)?;
                let have = self.t.lock().picker.have().get(index);
                if !have {
                    self.send(PeerMsg::Reject {
                        index,
                        reason: "piece not available here".into(),
                    })
                    .await?;
                } else if self.shared.queued.load(Ordering::Relaxed)
                    >= self.d.cfg.max_uploads_per_peer
                {
                    self.send(PeerMsg::Reject {
                        index,
                        reason: "too many queued requests".into(),
                    })
                    .await?;
                } else {
                    self.shared
                        .cancelled
                        .lock()
                        .expect("cancel lock")
                        .remove(&index);
                    self.shared.queued.fetch_add(1, Ordering::Relaxed);
                    self.out
                        .send(Out::Serve(index))
                        .await
                        .map_err(|_| End::Quiet)?;
                }
            }
            PeerMsg::Cancel { index } => {
                self.check_index(index, n)?;
                self.shared
                    .cancelled
                    .lock()
                    .expect("cancel lock")
                    .insert(index);
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
                self.on_piece(index, frame.payload, digest).await?;
            }
            PeerMsg::Reject { index, reason } => {
                self.check_index(index, n)?;
                debug!(index, %reason, "request rejected");
                if self.requested.remove(&index).is_some() {
                    self.t.lock().picker.release(index);
                    self.avoid.insert(index);
                }
            }
            PeerMsg::GetMetadata => {
                let json = Bytes::from(self.t.meta.to_json());
                let m = PeerMsg::Metadata {
                    len: json.len() as u32,
                };
                self.out
                    .send(Out::Payload(m, json))
                    .await
                    .map_err(|_| End::Quiet)?;
            }
            PeerMsg::Keepalive | PeerMsg::Metadata { .. } => {}
            PeerMsg::Roster { .. } => {
                let r: shoal_tracker::roster::Roster = serde_json::from_slice(&frame.payload)
                    .map_err(|e| End::Tell(format!("bad ROSTER: {e}")))?;
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

    async fn on_piece(&mut self, index: u32, payload: Bytes, digest: Hash) -> Result<(), End> {
        let Some(sent_at) = self.requested.remove(&index) else {
            // Not (or no longer) requested: a reply racing our CANCEL. Harmless.
            return Ok(());
        };
        self.consecutive_timeouts = 0;
        let latency_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
        self.bytes_since_tick += payload.len() as u64;
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
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Missed some: tell the peer about everything we have that it has not heard,
                // and the roster we hold.
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
            self.out
                .send(Out::Payload(m, json))
                .await
                .map_err(|_| End::Quiet)?;
        }
        Ok(())
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

    fn on_tick(&mut self) -> Result<(), End> {
        self.ticks += 1;
        // Throughput over the last tick, sampled only while the peer had work from us (an idle
        // peer is not a slow one).
        let dt = self.last_tick.elapsed().as_secs_f64();
        self.last_tick = Instant::now();
        if dt > 0.0 && (self.bytes_since_tick > 0 || !self.requested.is_empty()) {
            let sample = self.bytes_since_tick as f64 / dt;
            self.t.lock().score(&self.remote).record_throughput(sample);
        }
        self.bytes_since_tick = 0;
        let timeout = self.d.cfg.request_timeout;
        let expired: Vec<u32> = self
            .requested
            .iter()
            .filter(|(_, at)| at.elapsed() > timeout)
            .map(|(&i, _)| i)
            .collect();
        if !expired.is_empty() {
            let mut st = self.t.lock();
            for i in &expired {
                self.requested.remove(i);
                st.picker.release(*i);
                self.avoid.insert(*i);
            }
            st.score(&self.remote).timeouts += expired.len() as u32;
            self.consecutive_timeouts += expired.len() as u32;
            warn!(peer = %self.remote, pieces = ?expired, "requests timed out");
        }
        if self.consecutive_timeouts >= MAX_CONSECUTIVE_TIMEOUTS {
            return Err(End::Tell("too many requests timed out".into()));
        }
        if self.ticks % 15 == 0 {
            self.avoid.clear();
        }
        Ok(())
    }

    /// Keep as many requests outstanding as this peer's score allows.
    async fn fill_requests(&mut self) -> Result<(), ()> {
        let Some(bits) = &self.peer_bits else {
            return Ok(());
        };
        let slots = {
            let st = self.t.lock();
            if st.record.state != crate::store::TorrentState::Downloading || st.picker.is_complete()
            {
                return Ok(());
            }
            let cfg = &self.d.cfg;
            st.peers
                .get(&self.remote)
                .map_or(cfg.initial_requests_per_peer, |p| {
                    p.slots(
                        self.t.meta.piece_length,
                        cfg.initial_requests_per_peer,
                        cfg.max_requests_per_peer,
                    )
                })
        };
        while self.requested.len() < slots {
            let pick = {
                let requested = &self.requested;
                let avoid = &self.avoid;
                self.t.lock().picker.pick(
                    bits,
                    |i| requested.contains_key(&i) || avoid.contains(&i),
                    &mut self.rng,
                )
            };
            match pick {
                Pick::Fresh(i) | Pick::Endgame(i) => {
                    self.requested.insert(i, Instant::now());
                    if self
                        .out
                        .send(Out::Msg(PeerMsg::Request { index: i }))
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

async fn write_loop(
    d: Arc<Net>,
    t: Arc<Torrent>,
    mut w: Writer,
    mut rx: mpsc::Receiver<Out>,
    shared: Arc<Shared>,
    remote: String,
    keepalive: Duration,
) {
    let storage = t.storage.clone();
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        let item = match tokio::time::timeout(keepalive, rx.recv()).await {
            Err(_) => {
                if w.send(&PeerMsg::Keepalive, &[]).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(None) => return,
            Ok(Some(item)) => item,
        };
        let res = match item {
            Out::Msg(m) => w.feed(&m, &[]).await,
            Out::Payload(m, bytes) => w.feed(&m, &bytes).await,
            Out::Serve(index) => {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                if shared.cancelled.lock().expect("cancel lock").remove(&index) {
                    continue;
                }
                let action = if d.sabotage.is_active() {
                    if !d.sabotage.delay.is_zero() {
                        let _ = w.flush().await;
                        tokio::time::sleep(d.sabotage.delay).await;
                    }
                    d.sabotage.decide(&mut rng)
                } else {
                    Action::Serve
                };
                if let Some(limit) = &d.upload_limit {
                    let _ = w.flush().await; // Do not hold sent bytes while waiting.
                    limit.acquire(u64::from(t.meta.piece_size(index))).await;
                }
                storage.prefetch(index);
                let data = storage.piece(index);
                let header = PeerMsg::Piece {
                    index,
                    len: data.len() as u32,
                };
                let r = match action {
                    Action::Serve => w.feed(&header, data).await,
                    Action::Corrupt => w.feed(&header, &crate::sabotage::corrupt(data)).await,
                    Action::Drop => Ok(()),
                };
                // The bytes are in the socket now; drop the pages from our resident set.
                storage.release(index);
                if r.is_ok() && action != Action::Drop {
                    t.on_uploaded(&remote, data.len() as u64);
                }
                r
            }
        };
        if res.is_err() {
            return;
        }
        if rx.is_empty() && w.flush().await.is_err() {
            return;
        }
    }
}
