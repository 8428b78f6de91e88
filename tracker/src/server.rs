//! The tracker server: a tokio listener, one task per connection answering from the in-memory
//! [`Swarm`], a prune task, and one writer thread that owns the SQLite connection and commits
//! the changes in batches.
//!
//! The listener and connections run on a runtime of the tracker's own, single-threaded by
//! default (`net_threads`): every announce takes the one swarm lock anyway, and measured at
//! 100k live peers the multi-threaded runtime spent about a microsecond more per announce in
//! wake-ups and context switches between its threads, for no more announces per second.
//!
//! Why a writer thread: rusqlite is blocking, and one owner for the connection means no locking
//! around it. Handlers append their changes to a shared, coalescing [`Batch`] (no wake-up per
//! announce: an earlier version woke the writer through a channel on every announce and spent a
//! quarter of its CPU in futex calls); every `batch_interval` the writer takes the batch and
//! commits it in one fsynced transaction. Reads never touch SQLite, so they never wait behind a
//! write.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::auth::Sessions;
use crate::config::TrackerConfig;
use crate::conn::Conn;
use crate::proto::{Announce, Request, Response, MAX_PAGE_ENTRIES};
use crate::store::{Batch, Change, Store, StoreError};
use crate::swarm::{Checked, Now, PrivateReply, Swarm, SwarmLimits, Want};
use crate::wire::{parse_header, FrameError, Limits};

/// History rows deleted per retention step; small, so that one step never holds the database
/// for long between two batches.
pub const RETENTION_CHUNK_ROWS: usize = 1000;

/// Live peers looked at per step of a prune pass (a step holds the swarm lock and the network
/// thread: well under a millisecond at this size).
const PRUNE_STEP_PEERS: usize = 1024;

/// The monotonic clock starts this far ahead of zero, so that the age of a peer restored from
/// the database (up to a day) can be represented before it.
const MONO_ORIGIN_MS: u64 = 24 * 3600 * 1000;

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The tracker's clock: monotonic time for expiry and idleness, wall time for rows.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Instant,
}

impl Clock {
    fn now(self) -> Now {
        Now {
            mono_ms: self.base.elapsed().as_millis() as u64 + MONO_ORIGIN_MS,
            unix_ms: unix_ms(),
        }
    }
}

struct Shared {
    cfg: TrackerConfig,
    clock: Clock,
    swarm: Mutex<Swarm>,
    writer: Arc<WriterQueue>,
    conns: Mutex<Conns>,
    sessions: Sessions,
}

/// What handlers hand to the writer thread.
#[derive(Default)]
struct WriterQueue {
    pending: Mutex<Batch>,
    /// Set when the server stops; the writer commits what is left and exits.
    closing: Mutex<bool>,
    wake: Condvar,
    /// Rows per second of the last committed batch (for the "retry in N s" estimate).
    rows_per_sec: AtomicU64,
}

impl Shared {
    fn persist(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut b = self.writer.pending.lock().expect("writer queue poisoned");
        for c in changes {
            b.push(c);
        }
    }

    /// `Some(seconds)` when the writer is too far behind to take more.
    fn busy(&self) -> Option<u64> {
        let pending = self
            .writer
            .pending
            .lock()
            .expect("writer queue poisoned")
            .len();
        if pending < self.cfg.max_pending_rows {
            return None;
        }
        let rate = self.writer.rows_per_sec.load(Ordering::Relaxed).max(1000);
        Some((pending as u64).div_ceil(rate).max(1))
    }
}

/// One open connection, as the registry sees it.
struct Slot {
    ip: IpAddr,
    /// Monotonic ms of its last request (or of its accept).
    last_active: Arc<AtomicU64>,
    close: CancellationToken,
}

/// The open connections, for the total and per-address bounds.
#[derive(Default)]
struct Conns {
    next_id: u64,
    slots: HashMap<u64, Slot>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Conns {
    /// Register a new connection from `ip`, first closing another if a bound is reached: the
    /// idlest connection of `ip` itself when `ip` is at its own bound, else the idlest of the
    /// address holding the most connections. So an address that hoards connections only ever
    /// loses its own.
    fn admit(
        &mut self,
        ip: IpAddr,
        now_ms: u64,
        max_total: usize,
        max_per_ip: usize,
    ) -> (u64, Arc<AtomicU64>, CancellationToken) {
        let mine = self.per_ip.get(&ip).copied().unwrap_or(0);
        let victim_ip = if mine >= max_per_ip {
            Some(ip)
        } else if self.slots.len() >= max_total {
            self.per_ip
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(ip, _)| *ip)
        } else {
            None
        };
        if let Some(vip) = victim_ip {
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| s.ip == vip)
                // Ids grow with age: among equally idle ones the oldest goes.
                .min_by_key(|(id, s)| (s.last_active.load(Ordering::Relaxed), **id))
                .map(|(id, _)| *id);
            if let Some(id) = victim {
                debug!(ip = %vip, "closing the idlest connection to make room");
                crate::metrics::tracker().refused.inc();
                self.remove(id);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let last_active = Arc::new(AtomicU64::new(now_ms));
        let close = CancellationToken::new();
        self.slots.insert(
            id,
            Slot {
                ip,
                last_active: last_active.clone(),
                close: close.clone(),
            },
        );
        *self.per_ip.entry(ip).or_default() += 1;
        (id, last_active, close)
    }

    /// Forget a connection (and tell its task to close, if it is still open).
    fn remove(&mut self, id: u64) {
        if let Some(s) = self.slots.remove(&id) {
            s.close.cancel();
            if let Some(n) = self.per_ip.get_mut(&s.ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_ip.remove(&s.ip);
                }
            }
        }
    }
}

/// A bound tracker, ready to serve.
pub struct Tracker {
    listener: TcpListener,
    /// The datagram socket on the same port (`udp = true`).
    datagrams: Option<std::net::UdpSocket>,
    shared: Arc<Shared>,
    writer: std::thread::JoinHandle<()>,
}

impl Tracker {
    /// Lock and open the database, restore the live swarm and bind the listener.
    ///
    /// # Errors
    /// The database is in use by another tracker, cannot be opened or migrated, or the address
    /// cannot be bound.
    pub async fn bind(cfg: TrackerConfig) -> anyhow::Result<Tracker> {
        use anyhow::Context;
        cfg.validate().map_err(anyhow::Error::msg)?;
        let db = cfg.db.clone();
        let (store, torrents, peers, privates) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&db)?;
            let (torrents, peers, privates) = store.load_all()?;
            Ok::<_, StoreError>((store, torrents, peers, privates))
        })
        .await??;
        let clock = Clock {
            base: Instant::now(),
        };
        let limits = SwarmLimits {
            max_live_per_addr: cfg.max_live_per_addr,
            max_new_torrents_per_minute: cfg.max_new_files_per_minute,
            // Half a TTL: a peer restored after a crash is then at most half a TTL staler
            // than it was, and still has the other half to re-announce.
            persist_every_ms: (cfg.ttl / 2).as_millis() as u64,
        };
        let swarm = Swarm::restore(limits, torrents, peers, privates, clock.now());
        info!(peers = swarm.live_peers(), db = %cfg.db.display(), "restored live swarm");
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let datagrams = if cfg.udp {
            // The TCP port, which may have been chosen by the system (port 0).
            let at = listener.local_addr()?;
            Some(std::net::UdpSocket::bind(at).with_context(|| {
                format!("cannot listen for UDP announces on {at} (udp = false turns them off)")
            })?)
        } else {
            None
        };
        let queue = Arc::new(WriterQueue::default());
        let q2 = queue.clone();
        let (batch_interval, retention) = (cfg.batch_interval, cfg.retention);
        let writer = std::thread::Builder::new()
            .name("tracker-writer".into())
            .spawn(move || run_writer(store, &q2, batch_interval, retention))?;
        Ok(Tracker {
            listener,
            datagrams,
            shared: Arc::new(Shared {
                clock,
                swarm: Mutex::new(swarm),
                sessions: Sessions::new(cfg.max_sessions),
                writer: queue,
                conns: Mutex::new(Conns::default()),
                cfg,
            }),
            writer,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` is cancelled; then drain the connections and let the writer
    /// commit what it holds.
    ///
    /// # Errors
    /// Only a writer thread that panicked.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Tracker {
            listener,
            datagrams,
            shared,
            writer,
        } = self;
        let stop_datagrams = Arc::new(AtomicBool::new(false));
        let datagram_thread = match datagrams {
            Some(sock) => {
                let shared = shared.clone();
                let stop = stop_datagrams.clone();
                Some(
                    std::thread::Builder::new()
                        .name("tracker-udp".into())
                        .spawn(move || serve_datagrams(&sock, &shared, &stop))?,
                )
            }
            None => None,
        };
        // Connections are served on a runtime of the tracker's own, on threads of its own
        // (see `net_threads`), whatever runtime called `run`.
        let std_listener = listener.into_std()?;
        let threads = shared.cfg.net_threads.max(1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let net_shared = shared.clone();
        std::thread::Builder::new()
            .name("tracker-net".into())
            .spawn(move || {
                let rt = if threads == 1 {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                } else {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(threads)
                        .thread_name("tracker-net")
                        .enable_all()
                        .build()
                };
                let res = rt.map_err(anyhow::Error::from).and_then(|rt| {
                    rt.block_on(async move {
                        let listener = TcpListener::from_std(std_listener)?;
                        accept_loop(listener, net_shared, shutdown).await;
                        Ok(())
                    })
                });
                let _ = tx.send(res); // Only fails when `run` was dropped: nobody to tell.
            })?;
        let served = rx
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("tracker network thread panicked")));
        // The datagram thread stops within its poll interval; its last changes reach the writer
        // before the writer's last commit.
        stop_datagrams.store(true, Ordering::Relaxed);
        if let Some(t) = datagram_thread {
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("tracker datagram thread panicked"))?;
        }
        // The writer commits what is left and exits, whatever became of the network thread.
        *shared.writer.closing.lock().expect("writer queue poisoned") = true;
        shared.writer.wake.notify_all();
        tokio::task::spawn_blocking(move || writer.join())
            .await?
            .map_err(|_| anyhow::anyhow!("tracker writer panicked"))?;
        served?;
        info!("tracker stopped");
        Ok(())
    }
}

/// Accept connections and serve them until `shutdown`; returns once every connection closed.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    {
        let shared = shared.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { prune_loop(shared, token).await });
    }
    {
        let shared = shared.clone();
        let token = shutdown.clone();
        tasks.spawn(async move { idle_loop(shared, token).await });
    }
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and retry rather than exit.
                warn!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (id, last_active, close) = shared.conns.lock().expect("conns poisoned").admit(
            addr.ip(),
            shared.clock.now().mono_ms,
            shared.cfg.max_connections,
            shared.cfg.max_connections_per_addr,
        );
        let shared = shared.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            serve(stream, addr, &shared, &token, &close, &last_active).await;
            shared.conns.lock().expect("conns poisoned").remove(id);
        });
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Close connections idle for longer than the idle timeout. One sweep of the registry a
/// quarter timeout apart, rather than a timer armed and disarmed around every request's read
/// (a measurable part of an announce's cost); a connection closes between 1 and 1.25 idle
/// timeouts after its last request.
async fn idle_loop(shared: Arc<Shared>, token: CancellationToken) {
    let idle_ms = shared.cfg.idle_timeout.as_millis() as u64;
    let every =
        (shared.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = shared.clock.now().mono_ms;
        let mut conns = shared.conns.lock().expect("conns poisoned");
        let idle: Vec<u64> = conns
            .slots
            .iter()
            .filter(|(_, s)| now.saturating_sub(s.last_active.load(Ordering::Relaxed)) > idle_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            debug!(id, "closing an idle connection");
            conns.remove(id);
        }
    }
}

async fn prune_loop(shared: Arc<Shared>, token: CancellationToken) {
    let ttl_ms = shared.cfg.ttl.as_millis() as u64;
    // A peer leaves within a quarter TTL of expiring, and no sooner is needed: a pass looks at
    // every live peer, and at a million of them one pass every 5 s (the former cap) was a
    // fifth of a core, more than the announces it was keeping room for.
    let every = (shared.cfg.ttl / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // In steps of a few thousand peers, the lock released and the runtime yielded between
        // them: one pass over a million peers in one go held every announce for tens of ms.
        let (mut n, mut cursor) = (0, None);
        loop {
            let mut changes = Vec::new();
            let (k, next) = shared
                .swarm
                .lock()
                .expect("swarm lock poisoned")
                .prune_some(
                    shared.clock.now(),
                    ttl_ms,
                    cursor,
                    PRUNE_STEP_PEERS,
                    &mut changes,
                );
            n += k;
            // Expiries are persisted even past max_pending_rows: the memory they take is
            // bounded by the live swarm, and dropping them would leave dead peers in the
            // database.
            shared.persist(changes);
            match next {
                Some(c) if !token.is_cancelled() => cursor = Some(c),
                _ => break,
            }
            tokio::task::yield_now().await;
        }
        if n > 0 {
            info!(expired = n, "pruned silent peers");
        }
    }
}

/// The start of an ANNOUNCE header as this crate's client (and serde) writes it: `type` first.
const ANNOUNCE_PREFIX: &[u8] = br#"{"type":"ANNOUNCE","#;

/// Parse a request header. The common case, an ANNOUNCE starting with [`ANNOUNCE_PREFIX`] and
/// without a `len` field, goes straight into its struct (parsing the envelope first read the
/// header twice); anything else goes through the full frame checks.
fn parse_request(header: &[u8]) -> Result<Result<Request, String>, FrameError> {
    let fast = header.starts_with(ANNOUNCE_PREFIX) && !header.windows(5).any(|w| w == b"\"len\"");
    let kind = if fast {
        std::borrow::Cow::Borrowed("ANNOUNCE")
    } else {
        let (kind, _) = parse_header(header, &Limits::headers_only())?;
        std::borrow::Cow::Owned(kind)
    };
    // An ANNOUNCE (nearly every request) is parsed straight into its struct: going through
    // the internally tagged `Request` makes serde buffer the whole object first.
    let parsed = if kind == "ANNOUNCE" {
        serde_json::from_slice::<Announce>(header).map(Request::Announce)
    } else {
        serde_json::from_slice::<Request>(header)
    };
    Ok(parsed.map_err(|e| format!("bad {kind} request: {e}")))
}

async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    shared: &Shared,
    token: &CancellationToken,
    close: &CancellationToken,
    last_active: &AtomicU64,
) {
    let _ = stream.set_nodelay(true); // Latency matters more than packet count here.
    let mut conn = Conn::new(stream, shared.cfg.read_timeout, shared.cfg.read_timeout);
    let mut reply = Vec::with_capacity(4096);
    let mut scratch = Vec::with_capacity(512);
    // Made once: a wait made per request registered and removed two waiters per announce.
    let cancelled = token.cancelled();
    let closed = close.cancelled();
    tokio::pin!(cancelled, closed);
    loop {
        let next = tokio::select! {
            _ = &mut cancelled => break,
            _ = &mut closed => break,
            h = conn.next_header() => h,
        };
        let parsed = match next.and_then(|h| h.map(|r| parse_request(conn.header(r))).transpose()) {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => {
                if e.is_protocol_violation() || matches!(e, FrameError::Timeout(_)) {
                    debug!(%addr, cause = %e, "closing connection");
                    reply.clear();
                    encode_json(
                        &Response::Error {
                            reason: e.to_string(),
                        },
                        &mut reply,
                    );
                    if conn.queue(&reply).is_ok() {
                        let _ = conn.flush().await; // Best effort before the close.
                    }
                }
                break;
            }
        };
        // The clock is read once per request.
        let now = shared.clock.now();
        last_active.store(now.mono_ms, Ordering::Relaxed);
        reply.clear();
        match parsed {
            Ok(req) => handle(shared, req, addr, now, Via::Tcp, &mut reply, &mut scratch),
            Err(reason) => encode_json(&Response::Error { reason }, &mut reply),
        }
        // Answer a pipelined batch of requests with one write.
        if conn.queue(&reply).is_err() {
            break;
        }
        if !conn.has_buffered() && conn.flush().await.is_err() {
            break;
        }
        // A pipelined burst is answered from the buffer without touching the socket, which
        // alone never makes the task yield: count each request against the task's budget so
        // that a flooding connection cannot hold the runtime from the others.
        tokio::task::consume_budget().await;
    }
}

fn encode_json(v: &impl serde::Serialize, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, v).expect("replies serialize");
}

fn error_reply(reason: String, out: &mut Vec<u8>) {
    out.clear();
    encode_json(&Response::Error { reason }, out);
}

/// Entries per SWARM / FILES page: what the asker wants, within the protocol's page size.
fn page_limit(limit: Option<u32>) -> usize {
    limit
        .map_or(MAX_PAGE_ENTRIES, |l| l as usize)
        .clamp(1, MAX_PAGE_ENTRIES)
}

/// How a request came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Tcp,
    /// A UDP datagram: only a session's announce, from the session's own address, and a
    /// reply within one datagram.
    Datagram,
}

/// Bytes of a PEERS reply around its peer list, at most: the type, the interval, the roster
/// version and the reply's `mac` (a datagram reply never opens a session).
const PEERS_ENVELOPE_BYTES: usize = 176;

/// Serve announces sent as datagrams until `stop`. Each gets its reply as one datagram, within
/// [`crate::udp::MAX_REPLY`]. Only what parses as a request is answered, and an ERROR is never
/// longer than the request, so a datagram with a forged source reflects no more bytes than it
/// cost; a PEERS reply goes only to the address that opened the session over TCP.
fn serve_datagrams(sock: &std::net::UdpSocket, shared: &Shared, stop: &AtomicBool) {
    let mut scratch = Vec::with_capacity(512);
    // A source may send what `max_live_per_addr` peers heart-beating every `interval` would,
    // twice over, and at least 1000 a second; a burst of a second's worth.
    let per_sec = (2.0 * shared.cfg.max_live_per_addr as f64
        / shared.cfg.interval.as_secs_f64().max(1.0))
    .max(1000.0);
    let rate = crate::udp::Rate {
        per_sec,
        burst: per_sec,
    };
    let res = crate::udp::serve(sock, stop, rate, |src, datagram, out| {
        let parsed = match parse_request(datagram) {
            Ok(p) => p,
            Err(_) => return false, // Not a request at all: no answer.
        };
        match parsed {
            Ok(req @ Request::Announce(_)) => {
                handle(
                    shared,
                    req,
                    src,
                    shared.clock.now(),
                    Via::Datagram,
                    out,
                    &mut scratch,
                );
            }
            Ok(_) => error_reply("only ANNOUNCE comes as a datagram: use TCP".into(), out),
            Err(reason) => error_reply(reason, out),
        }
        if out.len() > crate::udp::MAX_REPLY && !out.starts_with(ERROR_PREFIX) {
            // A roster to deliver: too large for a datagram.
            error_reply(
                "the reply is too large for a datagram: announce over TCP".into(),
                out,
            );
        }
        if out.len() > datagram.len() && out.starts_with(ERROR_PREFIX) {
            shorten_error(out, datagram.len());
        }
        out.len() <= datagram.len() || !out.starts_with(ERROR_PREFIX)
    });
    if let Err(e) = res {
        error!(cause = %e, "the UDP announce socket failed; announces go on over TCP");
    }
}

const ERROR_PREFIX: &[u8] = br#"{"type":"ERROR""#;

/// Cut the reason of the ERROR reply in `out` until the reply fits in `max` bytes (at a
/// character boundary, ending in "...").
fn shorten_error(out: &mut Vec<u8>, max: usize) {
    let Ok(Response::Error { reason }) = serde_json::from_slice::<Response>(out) else {
        out.clear();
        return;
    };
    let over = out.len().saturating_sub(max);
    let mut keep = reason.len().saturating_sub(over + 3);
    while keep > 0 && !reason.is_char_boundary(keep) {
        keep -= 1;
    }
    error_reply(format!("{}...", &reason[..keep]), out);
}

/// Write the reply header JSON for `req` into `out` (`scratch`: reusable space).
fn handle(
    shared: &Shared,
    req: Request,
    addr: SocketAddr,
    now: Now,
    via: Via,
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) {
    match req {
        Request::Announce(mut a) => {
            if let Err(reason) = a.validate() {
                return error_reply(reason, out);
            }
            // Who wrote it, outside the swarm lock: a signature check is the costliest step.
            let now_ms = now.unix_ms.max(0) as u64;
            let verified = match shared.sessions.check(
                &a,
                shared.cfg.allow_unsigned,
                now_ms,
                scratch,
                (via == Via::Datagram).then_some(addr.ip()),
            ) {
                Ok(v) => v,
                Err(reason) => return error_reply(reason, out),
            };
            a.normalize();
            let roster_verified = match &a.roster {
                Some(r)
                    if r.version
                        > shared
                            .swarm
                            .lock()
                            .expect("swarm lock poisoned")
                            .roster_version(&a.info_hash) =>
                {
                    if r.info_hash != a.info_hash || Some(&r.authority) != a.authority.as_ref() {
                        return error_reply(
                            "the roster is for another swarm or authority".into(),
                            out,
                        );
                    }
                    if let Err(e) = r.verify() {
                        return error_reply(format!("roster refused: {e}"), out);
                    }
                    true
                }
                _ => false,
            };
            let checked = Checked {
                ts: verified.ts,
                roster_verified,
            };
            if let Some(secs) = shared.busy() {
                crate::metrics::tracker().busy.inc();
                return error_reply(format!("busy, retry in {secs} s"), out);
            }
            crate::metrics::tracker().announce(a.event);
            if via == Via::Datagram {
                crate::metrics::tracker().datagram_announces.inc();
            }
            let source = match (&a.addr, shared.cfg.trust_announced_addr) {
                (Some(announced), true) => announced.clone(),
                _ => addr.ip().to_string(),
            };
            let want = Want {
                peers: a
                    .numwant
                    .map_or(shared.cfg.max_peers_per_reply, |n| n as usize)
                    .min(shared.cfg.max_peers_per_reply),
                bytes: match via {
                    Via::Tcp => usize::MAX,
                    Via::Datagram => crate::udp::MAX_REPLY - PEERS_ENVELOPE_BYTES,
                },
            };
            let mut changes = Vec::with_capacity(3);
            // The PEERS reply is written by hand around the pre-serialized peer entries; its
            // shape is exactly `Response::Peers` (the client parses it as that).
            out.extend_from_slice(b"{\"type\":\"PEERS\",\"interval\":");
            let interval = shared.cfg.interval.as_secs().max(1);
            out.extend_from_slice(interval.to_string().as_bytes());
            out.extend_from_slice(b",\"peers\":");
            let res = shared.swarm.lock().expect("swarm lock poisoned").announce(
                &a,
                checked,
                &source,
                addr.ip(),
                now,
                want,
                &mut changes,
                out,
            );
            // A refusal may still have made a swarm private (see Swarm::announce).
            shared.persist(changes);
            match res {
                Ok(private) => {
                    if let Some((peer, key)) = verified.new_session {
                        shared.sessions.insert(peer, key, addr.ip());
                        out.extend_from_slice(b",\"session\":\"");
                        out.extend_from_slice(shared.sessions.public_hex().as_bytes());
                        out.push(b'"');
                    }
                    let mut roster_version = 0;
                    if let Some(PrivateReply {
                        roster_version: version,
                        roster,
                    }) = private
                    {
                        roster_version = version;
                        out.extend_from_slice(b",\"roster_version\":");
                        out.extend_from_slice(version.to_string().as_bytes());
                        if let Some(r) = roster {
                            out.extend_from_slice(b",\"roster\":");
                            encode_json(&r, out);
                        }
                    }
                    if let (Via::Datagram, Some(key), Some(ts)) = (via, verified.session_key, a.ts)
                    {
                        let tag = crate::auth::reply_mac(&key, ts, interval, roster_version);
                        out.extend_from_slice(b",\"mac\":\"");
                        out.extend_from_slice(hex::encode(tag).as_bytes());
                        out.push(b'"');
                    }
                    out.push(b'}');
                }
                Err(refusal) => error_reply(refusal.to_string(), out),
            }
        }
        Request::ListFiles { after, limit } => {
            let res = shared
                .swarm
                .lock()
                .expect("swarm lock poisoned")
                .files(after.as_deref(), page_limit(limit));
            match res {
                Ok((files, next)) => encode_json(&Response::Files { files, next }, out),
                Err(reason) => error_reply(reason, out),
            }
        }
        Request::Swarm {
            info_hash,
            after,
            limit,
        } => {
            let only = info_hash.map(|h| h.to_ascii_lowercase());
            let res = shared.swarm.lock().expect("swarm lock poisoned").swarm(
                only.as_deref(),
                after.as_deref(),
                page_limit(limit),
            );
            match res {
                Ok((peers, next)) => encode_json(&Response::Swarm { peers, next }, out),
                Err(reason) => error_reply(reason, out),
            }
        }
    }
}

fn run_writer(
    mut store: Store,
    queue: &WriterQueue,
    batch_interval: Duration,
    retention: Duration,
) {
    // Check retention a few times per retention period (at most a minute apart), and right
    // away at start.
    let retention_every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut next_retention = Instant::now();
    let mut deleting = false;
    loop {
        let closing = {
            let guard = queue.closing.lock().expect("writer queue poisoned");
            let (guard, _) = queue
                .wake
                .wait_timeout_while(guard, batch_interval, |closing| !*closing)
                .expect("writer queue poisoned");
            *guard
        };
        let batch = std::mem::take(&mut *queue.pending.lock().expect("writer queue poisoned"));
        if !batch.is_empty() {
            let t = Instant::now();
            write_batch(&mut store, &batch);
            let secs = t.elapsed().as_secs_f64().max(1e-3);
            queue
                .rows_per_sec
                .store((batch.len() as f64 / secs) as u64, Ordering::Relaxed);
        }
        if closing {
            return;
        }
        if !deleting && Instant::now() >= next_retention {
            next_retention = Instant::now() + retention_every;
            deleting = true;
        }
        if deleting {
            // One small chunk per batch interval: announces' commits are never queued behind
            // a long delete.
            let cutoff = unix_ms() / 1000 - retention.as_secs() as i64;
            match store.delete_events_before(cutoff, RETENTION_CHUNK_ROWS) {
                Ok(n) => {
                    if n > 0 {
                        debug!(deleted = n, "deleted history past retention");
                    }
                    deleting = n == RETENTION_CHUNK_ROWS;
                }
                Err(e) => {
                    error!(cause = %e, "retention cleanup failed");
                    deleting = false;
                }
            }
        }
    }
}

fn write_batch(store: &mut Store, batch: &Batch) {
    // A failed commit is retried a few times (a busy reader checkpointing, a full disk that
    // frees up); after that the batch is logged as lost: the live swarm in memory is still right
    // and the next heartbeat rewrites each peer row. A row SQLite refuses is skipped alone by
    // the store and does not count as a failure here.
    for attempt in 0..3 {
        match crate::metrics::tracker().timed_commit(|| store.apply(batch)) {
            Ok(skipped) => {
                debug!(rows = batch.len(), skipped, "committed batch");
                return;
            }
            Err(e) => {
                error!(cause = %e, attempt, "tracker batch commit failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    error!(
        rows = batch.len(),
        "tracker batch dropped after 3 failed commits"
    );
}
