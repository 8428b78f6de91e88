//! The tracker server: a tokio listener, one task per connection answering from the in-memory
//! [`Swarm`], a prune task, and one writer thread that owns the SQLite connection and commits
//! the changes in batches.
//!
//! Why a writer thread: rusqlite is blocking, and one owner for the connection means no locking
//! around it. Handlers append their changes to a shared, coalescing [`Batch`] (no wake-up per
//! announce: an earlier version woke the writer through a channel on every announce and spent a
//! quarter of its CPU in futex calls); every `batch_interval` the writer takes the batch and
//! commits it in one fsynced transaction. Reads never touch SQLite, so they never wait behind a
//! write.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::TrackerConfig;
use crate::proto::{Request, Response};
use crate::store::{Batch, Change, Store, StoreError};
use crate::swarm::Swarm;
use crate::wire::{FrameError, FrameReader, FrameWriter, Limits, Timeouts};

/// How often the writer deletes history past the retention.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Shared {
    cfg: TrackerConfig,
    swarm: Mutex<Swarm>,
    writer: Arc<WriterQueue>,
}

/// What handlers hand to the writer thread.
#[derive(Default)]
struct WriterQueue {
    pending: Mutex<Batch>,
    /// Set when the server stops; the writer commits what is left and exits.
    closing: Mutex<bool>,
    wake: Condvar,
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
}

/// A bound tracker, ready to serve.
pub struct Tracker {
    listener: TcpListener,
    shared: Arc<Shared>,
    writer: std::thread::JoinHandle<()>,
}

impl Tracker {
    /// Open the database, restore the live swarm and bind the listener.
    ///
    /// # Errors
    /// The database cannot be opened or migrated, or the address cannot be bound.
    pub async fn bind(cfg: TrackerConfig) -> anyhow::Result<Tracker> {
        use anyhow::Context;
        cfg.validate().map_err(anyhow::Error::msg)?;
        let mut store = Store::open(&cfg.db)?;
        let (torrents, peers) = store.load()?;
        let swarm = Swarm::restore(torrents, peers);
        info!(peers = swarm.live_peers(), db = %cfg.db.display(), "restored live swarm");
        let cutoff = unix_ms() / 1000 - cfg.retention.as_secs() as i64;
        store.delete_events_before(cutoff)?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        let queue = Arc::new(WriterQueue::default());
        let batch_interval = cfg.batch_interval;
        let retention = cfg.retention;
        let q2 = queue.clone();
        let writer = std::thread::Builder::new()
            .name("tracker-writer".into())
            .spawn(move || run_writer(store, &q2, batch_interval, retention))?;
        Ok(Tracker {
            listener,
            shared: Arc::new(Shared {
                cfg,
                swarm: Mutex::new(swarm),
                writer: queue,
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
            shared,
            writer,
        } = self;
        let tasks = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(shared.cfg.max_connections));
        {
            let shared = shared.clone();
            let token = shutdown.clone();
            tasks.spawn(async move { prune_loop(shared, token).await });
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
            let shared = shared.clone();
            let token = shutdown.clone();
            match limit.clone().try_acquire_owned() {
                Ok(permit) => {
                    tasks.spawn(async move {
                        serve(stream, addr, shared, token).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    crate::metrics::tracker().refused.inc();
                    tasks.spawn(async move {
                        refuse(stream, "too many connections", shared.cfg.read_timeout).await;
                    });
                }
            }
        }
        drop(listener);
        tasks.close();
        tasks.wait().await;
        // The writer commits what is left and exits.
        *shared.writer.closing.lock().expect("writer queue poisoned") = true;
        shared.writer.wake.notify_all();
        tokio::task::spawn_blocking(move || writer.join())
            .await?
            .map_err(|_| anyhow::anyhow!("tracker writer panicked"))?;
        info!("tracker stopped");
        Ok(())
    }
}

async fn refuse(stream: TcpStream, reason: &str, timeout: Duration) {
    let mut w = FrameWriter::new(stream, timeout);
    let _ = w
        .send(
            &Response::Error {
                reason: reason.into(),
            },
            &[],
        )
        .await; // Best effort: the connection is being refused anyway.
}

async fn prune_loop(shared: Arc<Shared>, token: CancellationToken) {
    let ttl_ms = shared.cfg.ttl.as_millis() as i64;
    // Check often enough that a peer leaves within a quarter TTL of expiring.
    let every = (shared.cfg.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let mut changes = Vec::new();
        let n = shared.swarm.lock().expect("swarm lock poisoned").prune(
            unix_ms(),
            ttl_ms,
            &mut changes,
        );
        if n > 0 {
            info!(expired = n, "pruned silent peers");
        }
        shared.persist(changes);
    }
}

async fn serve(stream: TcpStream, addr: SocketAddr, shared: Arc<Shared>, token: CancellationToken) {
    let _ = stream.set_nodelay(true); // Latency matters more than packet count here.
    let (r, w) = stream.into_split();
    let timeouts = Timeouts {
        idle: shared.cfg.idle_timeout,
        read: shared.cfg.read_timeout,
    };
    let mut reader = FrameReader::new(r, Limits::headers_only(), timeouts);
    let mut writer = FrameWriter::new(w, shared.cfg.read_timeout);
    let mut reply = Vec::with_capacity(4096);
    loop {
        let frame = tokio::select! {
            _ = token.cancelled() => break,
            f = reader.read_frame() => f,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                if e.is_protocol_violation() || matches!(e, FrameError::Timeout(_)) {
                    debug!(%addr, cause = %e, "closing connection");
                    let _ = writer
                        .send(
                            &Response::Error {
                                reason: e.to_string(),
                            },
                            &[],
                        )
                        .await; // Best effort before the close.
                }
                break;
            }
        };
        reply.clear();
        match frame.parse::<Request>() {
            Ok(req) => handle(&shared, req, addr, &mut reply),
            Err(e) => encode_json(
                &Response::Error {
                    reason: format!("bad {} request: {e}", frame.kind()),
                },
                &mut reply,
            ),
        }
        // Answer a pipelined batch of requests with one flush.
        if writer.feed_raw_header(&reply).await.is_err() {
            break;
        }
        if !reader.has_buffered() && writer.flush().await.is_err() {
            break;
        }
    }
}

fn encode_json(v: &impl serde::Serialize, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, v).expect("replies serialize");
}

/// Write the reply header JSON for `req` into `out`.
fn handle(shared: &Shared, req: Request, addr: SocketAddr, out: &mut Vec<u8>) {
    match req {
        Request::Announce(a) => {
            if let Err(reason) = a.validate() {
                return encode_json(&Response::Error { reason }, out);
            }
            crate::metrics::tracker().announce(a.event);
            let source = match (&a.addr, shared.cfg.trust_announced_addr) {
                (Some(announced), true) => announced.clone(),
                _ => addr.ip().to_string(),
            };
            let numwant = a
                .numwant
                .map_or(shared.cfg.max_peers_per_reply, |n| n as usize)
                .min(shared.cfg.max_peers_per_reply);
            let mut changes = Vec::with_capacity(2);
            // The PEERS reply is written by hand around the pre-serialized peer entries; its
            // shape is exactly `Response::Peers` (the client parses it as that).
            out.extend_from_slice(b"{\"type\":\"PEERS\",\"interval\":");
            out.extend_from_slice(shared.cfg.interval.as_secs().max(1).to_string().as_bytes());
            out.extend_from_slice(b",\"peers\":");
            shared.swarm.lock().expect("swarm lock poisoned").announce(
                &a,
                &source,
                unix_ms(),
                numwant,
                &mut changes,
                out,
            );
            out.push(b'}');
            shared.persist(changes);
        }
        Request::ListFiles => {
            let files = shared.swarm.lock().expect("swarm lock poisoned").files();
            encode_json(&Response::Files { files }, out);
        }
        Request::Swarm { info_hash } => {
            let peers = shared
                .swarm
                .lock()
                .expect("swarm lock poisoned")
                .swarm(info_hash.as_deref());
            encode_json(&Response::Swarm { peers }, out);
        }
    }
}

fn run_writer(
    mut store: Store,
    queue: &WriterQueue,
    batch_interval: Duration,
    retention: Duration,
) {
    let mut next_retention = Instant::now() + RETENTION_EVERY;
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
            write_batch(&mut store, &batch);
        }
        if closing {
            return;
        }
        if Instant::now() >= next_retention {
            next_retention = Instant::now() + RETENTION_EVERY;
            let cutoff = unix_ms() / 1000 - retention.as_secs() as i64;
            match store.delete_events_before(cutoff) {
                Ok(n) if n > 0 => info!(deleted = n, "deleted history past retention"),
                Ok(_) => {}
                Err(e) => error!(cause = %e, "retention cleanup failed"),
            }
        }
    }
}

fn write_batch(store: &mut Store, batch: &Batch) {
    // A failed commit is retried a few times (a busy reader checkpointing, a full disk that
    // frees up); after that the batch is logged as lost: the live swarm in memory is still right
    // and the next heartbeat rewrites each peer row.
    for attempt in 0..3 {
        match crate::metrics::tracker().timed_commit(|| store.apply(batch)) {
            Ok(()) => {
                debug!(rows = batch.len(), "committed batch");
                return;
            }
            Err(e @ StoreError::Sqlite { .. }) => {
                error!(cause = %e, attempt, "tracker batch commit failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                error!(cause = %e, "tracker batch commit failed");
                return;
            }
        }
    }
}
