//! The peer daemon: `shoal peer run`.
//!
//! Layout (dependencies point down the list):
//! - this module: start-up (data-dir lock, store, listener, control socket), the control
//!   commands (each routed to one torrent's owner), and shutdown;
//! - [`owner`]: the task that owns one torrent and does every lifecycle step in order;
//! - [`registry`]: info hash -> owner handle, claimed atomically (never two owners);
//! - [`announce`]: announcing to every tracker with backoff, and dialing the peers they return;
//! - [`conn`]: one peer connection: handshake, pipelined requests, serving, verification;
//! - [`torrent`]: one active session's shared state, its flush and whole-file hash;
//! - [`net`], [`workers`]: what connections may use of the daemon; the write pool.
//!
//! No module below this one sees the daemon: connections get [`net::Net`] and a lookup.

pub mod announce;
pub mod bans;
pub mod conn;
pub mod membership;
pub mod net;
pub mod owner;
pub mod registry;
pub mod relay;
pub mod torrent;
pub mod tree_data;
pub mod workers;
pub mod writer;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bitfield::Bitfield;
use crate::config::PeerConfig;
use crate::control::{CtlRequest, CtlResponse, StatusReport};
use crate::metainfo::{Hash, Metainfo};
use crate::sabotage::Sabotage;
use crate::store::{Store, TorrentRecord, TorrentState};
use registry::{Cmd, Registry};
use shoal_tracker::wire::{FrameReader, FrameWriter, Limits, Timeouts};

pub use net::TrackerHealth;
pub use net::Uplink;
pub use torrent::Torrent;

/// Name of the lock file that keeps two daemons off one data dir.
pub const LOCK_NAME: &str = "daemon.lock";

/// How long shutdown waits for each torrent to stop and persist.
/// Incoming connections allowed in their handshake at once; more are closed at accept. Each
/// costs a socket and a few kilobytes for at most the connect timeout.
const MAX_HALF_OPEN: usize = 64;
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

struct Daemon {
    data_dir: PathBuf,
    ctx: Arc<owner::Ctx>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Hold the data dir's lock for the daemon's lifetime (released by the kernel on exit, even
/// on SIGKILL). The offline tools take the same lock, so neither runs behind the other's back.
pub struct DirLock(#[allow(dead_code)] std::fs::File);

/// Take the data dir's lock, or say who holds it.
///
/// # Errors
/// Another process (a daemon or a tool) holds it, or the lock file cannot be opened.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<DirLock> {
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_NAME);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another shoal process (pid {}) is already running for data dir {}: a daemon holds it; stop it first or use another --data-dir",
            pid.trim(),
            dir.display()
        );
    }
    f.set_len(0)?;
    std::fs::write(&path, std::process::id().to_string())?;
    Ok(DirLock(f))
}

/// Run the daemon until SIGINT, SIGTERM or a Shutdown command.
///
/// # Errors
/// Start-up failures: the data dir is locked or not usable, the address cannot be bound.
pub async fn run(cfg: PeerConfig, sabotage: Sabotage) -> anyhow::Result<()> {
    tune_allocator();
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    // Only the owner may enter: the control socket inside is the daemon's whole authority.
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict data dir {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let dd = data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dd, true)).await??;
    let dd = data_dir.clone();
    let identity = Arc::new(
        tokio::task::spawn_blocking(move || crate::secure::Identity::load_or_create(&dd)).await??,
    );
    let peer_id = identity.peer_id();
    let s2 = store.clone();
    let saved_bans = tokio::task::spawn_blocking(move || s2.bans()).await??;
    let s2 = store.clone();
    let persist_ban: bans::Persist = Arc::new(move |key, until| {
        let s = s2.clone();
        // A ban that fails to persist still holds until the daemon stops.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = s.put_ban(&key, until) {
                warn!(cause = %e, %key, "cannot persist a ban");
            }
        });
    });
    let listener = listen_on(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let listen = listener.local_addr()?;
    let http = crate::http::bind_configured(&cfg.http, &cfg.http_token).await?;
    let bind_ip = (!listen.ip().is_unspecified()).then_some(listen.ip());
    let sock_path = crate::control::socket_path(&data_dir);
    // A socket left by a killed daemon: the lock proves nobody serves it.
    let _ = std::fs::remove_file(&sock_path);
    let control = UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot bind {}", sock_path.display()))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))?;
    if sabotage.is_active() {
        warn!(
            ?sabotage,
            "SABOTAGE MODE: this peer corrupts, drops or delays what it serves"
        );
    }
    let net = Arc::new(net::Net {
        conn_limit: Arc::new(Semaphore::new(cfg.max_connections)),
        verify_limit: Arc::new(Semaphore::new(cfg.max_pieces_verifying)),
        writers: workers::Workers::per_core("shoal-write"),
        uplink: Arc::new(Uplink::new(cfg.upload_rate())),
        noise: crate::secure::NoiseKeys::new(&identity),
        half_open: Arc::new(Semaphore::new(MAX_HALF_OPEN)),
        cfg,
        peer_id: peer_id.clone(),
        tracker_signer: shoal_tracker::auth::Signer::new(identity.signing_key().clone()),
        identity,
        listen,
        bind_ip,
        sabotage,
        trackers: Mutex::new(HashMap::new()),
        bans: bans::Bans::new(saved_bans, Some(persist_ban)),
    });
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let d = Arc::new(Daemon {
        data_dir: data_dir.clone(),
        ctx: Arc::new(owner::Ctx {
            net,
            store: store.clone(),
            registry: Arc::new(Registry::default()),
            root: cancel.clone(),
            tasks: tasks.clone(),
        }),
        cancel,
        tasks,
    });
    // Tests and scripts read this line for the bound port.
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    println!(
        "peer listening on {listen} (peer id {peer_id}, data dir {}){}",
        data_dir.display(),
        http_addr.map_or(String::new(), |a| format!(" http on http://{a}/"))
    );
    info!(%listen, %peer_id, "peer started");

    let s2 = store.clone();
    let mut started = Vec::new();
    for (hash, rec) in tokio::task::spawn_blocking(move || s2.torrents()).await?? {
        let (ready, rx) = tokio::sync::oneshot::channel();
        // Store keys are unique, so every claim succeeds.
        if owner::spawn(&d.ctx, hash, rec, owner::Start::Load { ready }).is_ok() {
            started.push(rx);
        }
    }
    for rx in started {
        let _ = rx.await; // An owner that ended early has nothing to wait for.
    }
    {
        let d2 = d.clone();
        d.tasks
            .spawn(async move { accept_loop(d2, listener).await });
        let d2 = d.clone();
        d.tasks
            .spawn(async move { control_loop(d2, control).await });
        let d2 = d.clone();
        d.tasks.spawn(async move { pace_loop(d2).await });
        if let Some(l) = http {
            crate::http::spawn(
                &d.tasks,
                l,
                http_handler(&d),
                &d.ctx.net.cfg.http_token,
                d.cancel.clone(),
            );
        }
    }
    wait_for_signal(&d.cancel).await;
    info!("shutting down");
    d.cancel.cancel();
    let mut stops = tokio::task::JoinSet::new();
    for h in d.ctx.registry.all() {
        stops.spawn(async move {
            if tokio::time::timeout(SHUTDOWN_WAIT, h.call(Cmd::Shutdown))
                .await
                .is_err()
            {
                warn!(info_hash = %hex::encode(h.hash), "torrent did not stop in time");
            }
        });
    }
    while stops.join_next().await.is_some() {}
    d.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), d.tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within 10s");
    }
    let s2 = store.clone();
    let flushed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || s2.flush()),
    )
    .await;
    if !matches!(flushed, Ok(Ok(Ok(())))) {
        warn!("the store's last flush did not complete (disk full?)");
    }
    let _ = std::fs::remove_file(&sock_path);
    info!("peer stopped");
    Ok(())
}

/// Piece buffers are 16 KiB to 16 MiB and come and go hundreds of times a second. glibc serves
/// such sizes with fresh mmaps (and trims freed heap at once), so each piece cost page faults
/// and zeroing; perf showed it. Keep them on the heap and keep the heap: the memory in use is
/// bounded by `max_pieces_verifying` and the connection channels anyway.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any piece is allocated.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

async fn wait_for_signal(cancel: &CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = cancel.cancelled() => {}
    }
}

async fn accept_loop(d: Arc<Daemon>, listener: TcpListener) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = d.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                backoff = Duration::from_millis(10);
                let Ok(permit) = d.ctx.net.conn_limit.clone().try_acquire_owned() else {
                    warn!(%addr, "connection limit reached; refusing");
                    continue;
                };
                let net = d.ctx.net.clone();
                let reg = d.ctx.registry.clone();
                let lookup: conn::Lookup = Arc::new(move |h: &Hash| reg.get(h)?.live());
                d.tasks.spawn(async move {
                    conn::run_incoming(net, lookup, stream, addr).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// The uplink pacer's tick ([`crate::pacer`]); its rate and the queue it measured go to
/// the metrics and, while pacing, the debug log.
async fn pace_loop(d: Arc<Daemon>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let uplink = &d.ctx.net.uplink;
    loop {
        tokio::select! {
            _ = d.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = uplink.paced();
        let (queue_ms, carried) = uplink.tick();
        let after = uplink.paced();
        let m = crate::metrics::peer();
        m.uplink_paced_rate.set(after.unwrap_or(0.0));
        if let Some(q) = queue_ms {
            m.uplink_queue_seconds.set(q / 1000.0);
        }
        if before.is_some() || after.is_some() {
            tracing::debug!(
                queue_ms = queue_ms.unwrap_or(-1.0),
                rate = after.unwrap_or(0.0) as u64,
                carried = carried as u64,
                "uplink paced"
            );
        }
    }
}

async fn control_loop(d: Arc<Daemon>, listener: UnixListener) {
    loop {
        let accepted = tokio::select! {
            _ = d.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let d2 = d.clone();
                d.tasks
                    .spawn(async move { serve_control(d2, stream).await });
            }
            Err(e) => {
                warn!(cause = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_control(d: Arc<Daemon>, stream: UnixStream) {
    let (r, w) = stream.into_split();
    let t = Timeouts {
        idle: Duration::from_secs(60),
        read: Duration::from_secs(10),
    };
    let mut r = FrameReader::new(r, Limits::default(), t);
    // Publishing hashes a whole file before it answers.
    let mut w = FrameWriter::new(w, Duration::from_secs(30));
    loop {
        let resp = match crate::control::recv_msg::<_, CtlRequest>(&mut r).await {
            Ok(None) => break,
            Ok(Some(req)) => match handle_control(&d, req).await {
                Ok(resp) => resp,
                Err(e) => CtlResponse::Error {
                    reason: format!("{e:#}"),
                },
            },
            Err(e) => CtlResponse::Error {
                reason: format!("bad control request: {e:#}"),
            },
        };
        if crate::control::send_msg(&mut w, &resp).await.is_err() {
            break;
        }
    }
}

/// The HTTP API's door into the daemon: the control socket's own handler.
fn http_handler(d: &Arc<Daemon>) -> crate::http::Handler {
    let d = d.clone();
    Arc::new(move |req| {
        let d = d.clone();
        Box::pin(async move {
            handle_control(&d, req)
                .await
                .unwrap_or_else(|e| CtlResponse::Error {
                    reason: format!("{e:#}"),
                })
        })
    })
}

fn parse_hash(s: &str) -> anyhow::Result<Hash> {
    let v = hex::decode(s.trim()).ok().filter(|v| v.len() == 32);
    match v {
        Some(v) => Ok(v.try_into().expect("32 bytes")),
        None => bail!("{s:?} is not an info hash (64 hex digits)"),
    }
}

impl Daemon {
    fn status(&self, with_pieces: bool) -> StatusReport {
        let mut torrents: Vec<_> = self
            .ctx
            .registry
            .all()
            .iter()
            .map(|h| h.status(with_pieces))
            .collect();
        torrents.sort_by(|a, b| a.name.cmp(&b.name).then(a.info_hash.cmp(&b.info_hash)));
        StatusReport {
            peer_id: self.ctx.net.peer_id.clone(),
            listen: self.ctx.net.listen.to_string(),
            torrents,
            trackers: self.ctx.net.tracker_status(),
        }
    }

    fn descriptor_dir(&self) -> PathBuf {
        self.data_dir.join("descriptors")
    }
}

async fn handle_control(d: &Arc<Daemon>, req: CtlRequest) -> anyhow::Result<CtlResponse> {
    let ok = |message: String| Ok(CtlResponse::Ok { message });
    match req {
        CtlRequest::Status => Ok(CtlResponse::Status(d.status(false))),
        CtlRequest::Query { sql } => {
            let report = d.status(true);
            let (columns, rows) =
                tokio::task::spawn_blocking(move || crate::query::run(&report, &sql)).await??;
            Ok(CtlResponse::Rows { columns, rows })
        }
        CtlRequest::Publish { path, private } => publish(d, &path, private).await,
        CtlRequest::Swarm {
            info_hash,
            add,
            revoke,
        } => ok(d
            .ctx
            .registry
            .resolve(&info_hash)?
            .call(Cmd::Swarm { add, revoke })
            .await?),
        CtlRequest::Add {
            descriptor,
            info_hash,
            output,
            trackers,
            only,
        } => add(d, descriptor, info_hash, output, trackers, only).await,
        CtlRequest::Select { info_hash, only } => ok(d
            .ctx
            .registry
            .resolve(&info_hash)?
            .call(Cmd::Select { only })
            .await?),
        CtlRequest::Pause { info_hash } => {
            ok(d.ctx.registry.resolve(&info_hash)?.call(Cmd::Pause).await?)
        }
        CtlRequest::Resume { info_hash } => ok(d
            .ctx
            .registry
            .resolve(&info_hash)?
            .call(Cmd::Resume)
            .await?),
        CtlRequest::Recheck { info_hash } => ok(d
            .ctx
            .registry
            .resolve(&info_hash)?
            .call(Cmd::Recheck)
            .await?),
        CtlRequest::Remove {
            info_hash,
            delete_data,
        } => ok(d
            .ctx
            .registry
            .resolve(&info_hash)?
            .call(Cmd::Remove { delete_data })
            .await?),
        CtlRequest::Shutdown => {
            d.cancel.cancel();
            ok("shutting down".into())
        }
    }
}

/// Start an owner for a new torrent and wait until its record is durable.
async fn add_owner(
    d: &Arc<Daemon>,
    hash: Hash,
    rec: TorrentRecord,
    bits: Bitfield,
) -> anyhow::Result<bool> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    match owner::spawn(&d.ctx, hash, rec, owner::Start::New { bits, reply }) {
        Ok(_) => {
            rx.await
                .map_err(|_| anyhow::anyhow!("the torrent's owner ended before recording it"))??;
            Ok(true)
        }
        Err(existing) if existing.is_closing() => {
            bail!("{} is being removed; try again", hex::encode(hash))
        }
        Err(_) => Ok(false),
    }
}

async fn publish(d: &Arc<Daemon>, path: &Path, private: bool) -> anyhow::Result<CtlResponse> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("cannot publish {}", path.display()))?;
    let trackers = d.ctx.net.cfg.trackers.clone();
    let pl = d.ctx.net.cfg.piece_length();
    let p2 = path.clone();
    let authority = private.then(|| d.ctx.net.peer_id.clone());
    let meta = tokio::task::spawn_blocking(move || -> anyhow::Result<Metainfo> {
        let mut meta =
            crate::metainfo::create(&p2, pl, trackers, &crate::metainfo::HashProgress::default())?;
        if let Some(a) = &authority {
            meta.make_private(a)?;
        }
        // The bits about to be committed vouch for these bytes: make them durable first.
        if meta.is_tree() {
            tree_data::sync_tree(&meta, &p2)?;
        } else {
            crate::storage::files::open_complete(&p2, meta.length)?
                .sync_all()
                .with_context(|| format!("cannot sync {}", p2.display()))?;
        }
        Ok(meta)
    })
    .await??;
    let hex = meta.info_hash_hex();
    let desc_dir = d.descriptor_dir();
    let desc_path = desc_dir.join(format!("{hex}.json"));
    let m2 = meta.clone();
    let dp = desc_path.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        std::fs::create_dir_all(&desc_dir)?;
        m2.save(&dp)?;
        Ok(())
    })
    .await??;
    let now = crate::fsutil::unix_ms();
    let rec = TorrentRecord {
        descriptor: Some(String::from_utf8(meta.to_json()).expect("JSON is UTF-8")),
        data_path: path.clone(),
        state: TorrentState::Seeding,
        paused_from: None,
        added_at: now,
        completed_at: Some(now),
        downloaded: 0,
        uploaded: 0,
        trackers: Vec::new(),
        note: None,
        working_file: None,
        working_files: Default::default(),
        only: Vec::new(),
    };
    // Every piece was just hashed from this very file.
    if add_owner(d, meta.info_hash, rec, Bitfield::full(meta.piece_count())).await? {
        info!(info_hash = %hex, path = %path.display(), "published");
    }
    Ok(CtlResponse::Published {
        info_hash: hex,
        descriptor: desc_path,
    })
}

async fn add(
    d: &Arc<Daemon>,
    descriptor: Option<String>,
    info_hash: Option<String>,
    output: Option<PathBuf>,
    trackers: Vec<String>,
    only: Vec<String>,
) -> anyhow::Result<CtlResponse> {
    // Globs that do not parse are refused before anything is written.
    crate::tree::select(&[], &only)?;
    // A descriptor is checked before anything is created: a hostile one writes nothing.
    if let Some(json) = &descriptor {
        Metainfo::from_json(json.as_bytes())?;
    }
    let out_dir = output.unwrap_or_else(|| d.data_dir.join("downloads"));
    let od = out_dir.clone();
    let out_dir = tokio::task::spawn_blocking(move || -> anyhow::Result<PathBuf> {
        create_out_dir(&od)?;
        Ok(std::fs::canonicalize(&od)?)
    })
    .await??;
    let (hash, rec, bits) = match (descriptor, info_hash) {
        (Some(json), _) => {
            let meta = Metainfo::from_json(json.as_bytes())?;
            if !only.is_empty() {
                if !meta.is_tree() {
                    bail!("--only is for trees; {} is one file", meta.name);
                }
                if !crate::tree::select(&meta.files, &only)?.contains(&true) {
                    bail!("--only {only:?} matches none of the files of {}", meta.name);
                }
            }
            let data_path = out_dir.join(&meta.name);
            if std::fs::symlink_metadata(&data_path).is_ok()
                && d.ctx.registry.get(&meta.info_hash).is_none()
            {
                bail!(
                    "{} already exists; shoal will not overwrite it (choose another --output or move it away)",
                    data_path.display()
                );
            }
            let mut rec = new_download_record(Some(json), data_path, trackers);
            rec.only = only;
            (meta.info_hash, rec, Bitfield::new(meta.piece_count()))
        }
        (None, Some(h)) => {
            let hash = parse_hash(&h)?;
            let mut rec = new_download_record(None, out_dir, trackers);
            rec.state = TorrentState::FetchingMetadata;
            rec.only = only;
            (hash, rec, Bitfield::new(0))
        }
        (None, None) => bail!("give a descriptor or an info hash"),
    };
    add_owner(d, hash, rec, bits).await?;
    Ok(CtlResponse::Added {
        info_hash: hex::encode(hash),
    })
}

/// Create the output dir; a component we create is a real directory, never a symlink, and
/// the new entries are durable.
fn create_out_dir(dir: &Path) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    while std::fs::symlink_metadata(p).is_err() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    for m in missing.iter().rev() {
        match std::fs::create_dir(m) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot create output dir {}", m.display()))
            }
        }
        let meta = std::fs::symlink_metadata(m)?;
        if !meta.file_type().is_dir() {
            bail!(
                "output dir {} is not a directory (a symlink?); shoal does not follow it",
                m.display()
            );
        }
        if let Some(parent) = m.parent() {
            crate::fsutil::sync_dir(parent)
                .with_context(|| format!("cannot sync {}", parent.display()))?;
        }
    }
    if !std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        bail!("output dir {} is not a directory", dir.display());
    }
    Ok(())
}

fn new_download_record(
    descriptor: Option<String>,
    data_path: PathBuf,
    trackers: Vec<String>,
) -> TorrentRecord {
    TorrentRecord {
        descriptor,
        data_path,
        state: TorrentState::Downloading,
        paused_from: None,
        added_at: crate::fsutil::unix_ms(),
        completed_at: None,
        downloaded: 0,
        uploaded: 0,
        trackers,
        note: None,
        working_file: None,
        working_files: Default::default(),
        only: Vec::new(),
    }
}

/// The peer listener: accepted sockets inherit its receive buffer
/// ([`net::size_recv_buffer`]), which must be set before `listen` to count in the window
/// scale the handshake agrees.
async fn listen_on(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As TcpListener::bind does: a restarted daemon rebinds its port at once.
        sock.set_reuseaddr(true)?;
        net::size_recv_buffer(&sock);
        match sock.bind(a).and_then(|()| sock.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    }))
}
