//! The tracker server: a tokio listener, one task per connection answering from the in-memory
//! [`Swarm`], a prune task, and one writer thread that owns the SQLite connection and commits
//! the changes in batches.
//!
//! Why a writer thread: rusqlite is blocking, and one owner for the connection means no locking
//! around it and natural group commit: whatever arrived during `batch_interval` after the first
//! change goes in one fsynced transaction. Reads never touch SQLite, so they never wait behind a
//! write.

use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
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

/// Changes waiting for the writer at most; announcers wait (off the runtime) beyond it.
const WRITER_QUEUE: usize = 1 << 16;
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
    writer: SyncSender<Vec<Change>>,
}

impl Shared {
    fn persist(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        match self.writer.try_send(changes) {
            Ok(()) => {}
            Err(TrySendError::Full(changes)) => {
                // Backpressure: the writer is behind. Block this worker thread (not the whole
                // runtime) until there is room, rather than grow without bound.
                let tx = self.writer.clone();
                let sent = tokio::task::block_in_place(move || tx.send(changes));
                if sent.is_err() {
                    error!("tracker writer is gone; change not persisted");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                error!("tracker writer is gone; change not persisted")
            }
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
        let (tx, rx) = sync_channel(WRITER_QUEUE);
        let batch_interval = cfg.batch_interval;
        let retention = cfg.retention;
        let writer = std::thread::Builder::new()
            .name("tracker-writer".into())
            .spawn(move || run_writer(store, rx, batch_interval, retention))?;
        Ok(Tracker {
            listener,
            shared: Arc::new(Shared {
                cfg,
                swarm: Mutex::new(swarm),
                writer: tx,
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
                    tasks.spawn(async move {
                        refuse(stream, "too many connections", shared.cfg.read_timeout).await;
                    });
                }
            }
        }
        drop(listener);
        tasks.close();
        tasks.wait().await;
        // Dropping the last sender lets the writer commit its final batch and exit.
        drop(shared);
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
        let response = match frame.parse::<Request>() {
            Ok(req) => handle(&shared, req, addr),
            Err(e) => Response::Error {
                reason: format!("bad {} request: {e}", frame.kind()),
            },
        };
        // Answer a pipelined batch of requests with one flush.
        let more_buffered = reader.has_buffered();
        let res = if more_buffered {
            writer.feed(&response, &[]).await
        } else {
            writer.send(&response, &[]).await
        };
        if res.is_err() {
            break;
        }
    }
}

fn handle(shared: &Shared, req: Request, addr: SocketAddr) -> Response {
    match req {
        Request::Announce(a) => {
            if let Err(reason) = a.validate() {
                return Response::Error { reason };
            }
            let source = match (&a.addr, shared.cfg.trust_announced_addr) {
                (Some(announced), true) => announced.clone(),
                _ => addr.ip().to_string(),
            };
            let numwant = a
                .numwant
                .map_or(shared.cfg.max_peers_per_reply, |n| n as usize)
                .min(shared.cfg.max_peers_per_reply);
            let mut changes = Vec::with_capacity(2);
            let peers = shared.swarm.lock().expect("swarm lock poisoned").announce(
                &a,
                &source,
                unix_ms(),
                numwant,
                &mut changes,
            );
            shared.persist(changes);
            Response::Peers {
                interval: shared.cfg.interval.as_secs().max(1),
                peers,
            }
        }
        Request::ListFiles => Response::Files {
            files: shared.swarm.lock().expect("swarm lock poisoned").files(),
        },
        Request::Swarm { info_hash } => Response::Swarm {
            peers: shared
                .swarm
                .lock()
                .expect("swarm lock poisoned")
                .swarm(info_hash.as_deref()),
        },
    }
}

fn run_writer(
    mut store: Store,
    rx: Receiver<Vec<Change>>,
    batch_interval: Duration,
    retention: Duration,
) {
    let mut next_retention = Instant::now() + RETENTION_EVERY;
    let mut open = true;
    while open {
        let mut batch = Batch::default();
        // Wait for the first change of a batch (waking for retention now and then)...
        match rx.recv_timeout(next_retention.saturating_duration_since(Instant::now())) {
            Ok(changes) => changes.into_iter().for_each(|c| batch.push(c)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        // ...then collect until the batch interval after it has passed.
        let deadline = Instant::now() + batch_interval;
        while !batch.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(changes) => changes.into_iter().for_each(|c| batch.push(c)),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            write_batch(&mut store, &batch);
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
    // Drain whatever is still queued after the senders went away.
    let mut batch = Batch::default();
    while let Ok(changes) = rx.try_recv() {
        changes.into_iter().for_each(|c| batch.push(c));
    }
    if !batch.is_empty() {
        write_batch(&mut store, &batch);
    }
}

fn write_batch(store: &mut Store, batch: &Batch) {
    // A failed commit is retried a few times (a busy reader checkpointing, a full disk that
    // frees up); after that the batch is logged as lost: the live swarm in memory is still right
    // and the next heartbeat rewrites each peer row.
    for attempt in 0..3 {
        match store.apply(batch) {
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
