//! The peer daemon: `shoal peer run`.
//!
//! Layout:
//! - this module: start-up (data-dir lock, store, listener, control socket), the torrents map,
//!   activation and shutdown, and the control commands;
//! - [`torrent`]: one torrent's shared state, the flush that keeps resume crash-safe, the
//!   whole-file check and completion, rates and status;
//! - [`conn`]: one peer connection: handshake, pipelined requests, serving, verification;
//! - [`announce`]: announcing to every tracker with backoff, and dialing the peers they return.
//!
//! Tasks hang off one root [`CancellationToken`]; each torrent has a child token and its own
//! [`TaskTracker`], so pausing or removing a torrent waits for exactly its tasks.

pub mod announce;
pub mod conn;
pub mod torrent;
pub mod workers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::bitfield::Bitfield;
use crate::config::PeerConfig;
use crate::control::{CtlRequest, CtlResponse, StatusReport};
use crate::metainfo::{Hash, Metainfo};
use crate::sabotage::Sabotage;
use crate::store::{Store, TorrentRecord, TorrentState};
use shoal_tracker::wire::{FrameReader, FrameWriter, Limits, Timeouts};

pub use announce::TrackerHealth;
pub use torrent::Torrent;

/// Name of the lock file that keeps two daemons off one data dir.
pub const LOCK_NAME: &str = "daemon.lock";

pub struct Daemon {
    pub cfg: PeerConfig,
    pub data_dir: PathBuf,
    pub store: Store,
    pub peer_id: String,
    pub listen: SocketAddr,
    /// Outgoing sockets bind here, so trackers and peers see the address we listen on.
    pub bind_ip: Option<IpAddr>,
    pub torrents: Mutex<HashMap<Hash, Arc<Torrent>>>,
    pub conn_limit: Arc<Semaphore>,
    pub verify_limit: Arc<Semaphore>,
    /// Where verified pieces are written.
    pub verifiers: workers::Workers,
    pub cancel: CancellationToken,
    pub tasks: TaskTracker,
    pub sabotage: Sabotage,
    pub trackers: Mutex<HashMap<String, TrackerHealth>>,
    pub upload_limit: Option<RateLimiter>,
    /// Downloads known only by info hash, whose descriptor is being fetched: their record
    /// (for status) and a token to stop the fetch (remove).
    pub fetching: Mutex<HashMap<Hash, (TorrentRecord, CancellationToken)>>,
}

/// A token bucket shared by every upload of the daemon.
pub struct RateLimiter {
    bytes_per_sec: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            bytes_per_sec: bytes_per_sec as f64,
            state: tokio::sync::Mutex::new((0.0, tokio::time::Instant::now())),
        }
    }

    /// Wait until `bytes` may be sent. Up to one second of burst is allowed.
    pub async fn acquire(&self, bytes: u64) {
        let mut st = self.state.lock().await;
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.bytes_per_sec;
        st.0 = (st.0 + refill).min(self.bytes_per_sec);
        st.1 = now;
        st.0 -= bytes as f64;
        if st.0 < 0.0 {
            // Holding the lock while sleeping queues the other uploads behind this one: fair.
            let wait = Duration::from_secs_f64(-st.0 / self.bytes_per_sec);
            tokio::time::sleep(wait).await;
        }
    }
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
    let store = Store::open(&data_dir, true)?;
    let peer_id = store.peer_id()?;
    let listener = TcpListener::bind(&cfg.listen)
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
    let cfg_upload_rate = cfg.upload_rate();
    let d = Arc::new(Daemon {
        conn_limit: Arc::new(Semaphore::new(cfg.max_connections)),
        verify_limit: Arc::new(Semaphore::new(cfg.max_pieces_verifying)),
        verifiers: workers::Workers::per_core("shoal-verify"),
        cfg,
        data_dir: data_dir.clone(),
        store,
        peer_id: peer_id.clone(),
        listen,
        bind_ip,
        torrents: Mutex::new(HashMap::new()),
        cancel: CancellationToken::new(),
        tasks: TaskTracker::new(),
        sabotage,
        trackers: Mutex::new(HashMap::new()),
        upload_limit: cfg_upload_rate.map(RateLimiter::new),
        fetching: Mutex::new(HashMap::new()),
    });
    // Tests and scripts read this line for the bound port.
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    println!(
        "peer listening on {listen} (peer id {peer_id}, data dir {}){}",
        data_dir.display(),
        http_addr.map_or(String::new(), |a| format!(" http on http://{a}/"))
    );
    info!(%listen, %peer_id, "peer started");

    for (hash, rec) in d.store.torrents()? {
        if let Err(e) = activate(&d, hash, rec) {
            error!(info_hash = %hex::encode(hash), cause = %format!("{e:#}"), "cannot start torrent");
        }
    }
    {
        let d2 = d.clone();
        d.tasks
            .spawn(async move { accept_loop(d2, listener).await });
        let d2 = d.clone();
        d.tasks
            .spawn(async move { control_loop(d2, control).await });
        if let Some(l) = http {
            crate::http::spawn(
                &d.tasks,
                l,
                http_handler(&d),
                &d.cfg.http_token,
                d.cancel.clone(),
            );
        }
    }
    wait_for_signal(&d.cancel).await;
    info!("shutting down");
    d.cancel.cancel();
    let torrents: Vec<Arc<Torrent>> = d
        .torrents
        .lock()
        .expect("torrents lock")
        .values()
        .cloned()
        .collect();
    for t in torrents {
        t.stop().await;
    }
    d.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), d.tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within 10s");
    }
    d.store.flush()?;
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
                let Ok(permit) = d.conn_limit.clone().try_acquire_owned() else {
                    warn!(%addr, "connection limit reached; refusing");
                    continue;
                };
                let d2 = d.clone();
                d.tasks.spawn(async move {
                    conn::run_incoming(d2, stream, addr).await;
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
    pub fn torrent(&self, hash: &Hash) -> Option<Arc<Torrent>> {
        self.torrents
            .lock()
            .expect("torrents lock")
            .get(hash)
            .cloned()
    }

    /// The torrent (or descriptor fetch) that `s`, a full hash or a unique prefix, names.
    fn resolve(&self, s: &str) -> anyhow::Result<Hash> {
        let mut known: Vec<Hash> = self
            .torrents
            .lock()
            .expect("torrents lock")
            .keys()
            .copied()
            .collect();
        known.extend(self.fetching.lock().expect("fetching lock").keys().copied());
        Ok(crate::hashprefix::resolve(s, &known)?)
    }

    fn find(&self, s: &str) -> anyhow::Result<Arc<Torrent>> {
        let h = self.resolve(s)?;
        self.torrent(&h)
            .with_context(|| format!("no torrent {s} in this peer"))
    }

    pub fn status(&self, with_pieces: bool) -> StatusReport {
        let mut torrents: Vec<_> = self
            .torrents
            .lock()
            .expect("torrents lock")
            .values()
            .map(|t| t.status(with_pieces))
            .collect();
        for (hash, (rec, _)) in self.fetching.lock().expect("fetching lock").iter() {
            torrents.push(crate::control::TorrentStatus {
                info_hash: hex::encode(hash),
                name: "(descriptor not fetched yet)".into(),
                state: rec.state.label().into(),
                added_at: rec.added_at,
                data_path: rec.data_path.display().to_string(),
                note: rec.note.clone(),
                ..Default::default()
            });
        }
        torrents.sort_by(|a, b| a.name.cmp(&b.name).then(a.info_hash.cmp(&b.info_hash)));
        let mut trackers: Vec<_> = self
            .trackers
            .lock()
            .expect("trackers lock")
            .iter()
            .map(|(a, h)| h.status(a))
            .collect();
        trackers.sort_by(|a, b| a.addr.cmp(&b.addr));
        StatusReport {
            peer_id: self.peer_id.clone(),
            listen: self.listen.to_string(),
            torrents,
            trackers,
        }
    }
}

async fn handle_control(d: &Arc<Daemon>, req: CtlRequest) -> anyhow::Result<CtlResponse> {
    match req {
        CtlRequest::Status => Ok(CtlResponse::Status(d.status(false))),
        CtlRequest::Query { sql } => {
            let report = d.status(true);
            let (columns, rows) =
                tokio::task::spawn_blocking(move || crate::query::run(&report, &sql)).await??;
            Ok(CtlResponse::Rows { columns, rows })
        }
        CtlRequest::Publish { path } => publish(d, &path).await,
        CtlRequest::Add {
            descriptor,
            info_hash,
            output,
            trackers,
        } => add(d, descriptor, info_hash, output, trackers).await,
        CtlRequest::Pause { info_hash } => {
            let t = d.find(&info_hash)?;
            let mut rec = t.record();
            if rec.state == TorrentState::Paused {
                return Ok(CtlResponse::Ok {
                    message: format!("{} is already paused", t.name()),
                });
            }
            t.stop().await;
            rec = t.record();
            rec.paused_from = Some(rec.state);
            rec.state = TorrentState::Paused;
            d.store.put_torrent(&t.hash, &rec)?;
            d.store.flush()?;
            restart(d, t.hash).await?;
            Ok(CtlResponse::Ok {
                message: format!("paused {}", t.name()),
            })
        }
        CtlRequest::Resume { info_hash } => {
            let t = d.find(&info_hash)?;
            let mut rec = t.record();
            if rec.state != TorrentState::Paused {
                return Ok(CtlResponse::Ok {
                    message: format!("{} is not paused", t.name()),
                });
            }
            t.stop().await;
            rec.state = rec.paused_from.take().unwrap_or(TorrentState::Downloading);
            d.store.put_torrent(&t.hash, &rec)?;
            d.store.flush()?;
            restart(d, t.hash).await?;
            Ok(CtlResponse::Ok {
                message: format!("resumed {}", t.name()),
            })
        }
        CtlRequest::Recheck { info_hash } => {
            let t = d.find(&info_hash)?;
            t.stop().await;
            let hash = t.hash;
            let (have, total) = torrent::recheck(d, &t).await?;
            restart(d, hash).await?;
            Ok(CtlResponse::Ok {
                message: format!("recheck of {}: {have} of {total} pieces good", t.name()),
            })
        }
        CtlRequest::Remove {
            info_hash,
            delete_data,
        } => {
            let h = d.resolve(&info_hash)?;
            let fetching = d.fetching.lock().expect("fetching lock").remove(&h);
            if let Some((_, token)) = fetching {
                token.cancel();
                d.store.remove_torrent(&h)?;
                return Ok(CtlResponse::Ok {
                    message: format!(
                        "removed {} (its descriptor was still being fetched)",
                        hex::encode(h)
                    ),
                });
            }
            let t = d.torrent(&h).context("torrent vanished")?;
            t.stop().await;
            let rec = t.record();
            d.torrents.lock().expect("torrents lock").remove(&t.hash);
            d.store.remove_torrent(&t.hash)?;
            let mut msg = format!("removed {}", t.name());
            if delete_data {
                for p in [
                    rec.data_path.clone(),
                    crate::store::part_path(&rec.data_path),
                ] {
                    if p.is_file() {
                        std::fs::remove_file(&p)
                            .with_context(|| format!("cannot delete {}", p.display()))?;
                        msg.push_str(&format!("; deleted {}", p.display()));
                    }
                }
            } else {
                msg.push_str(&format!("; data kept at {}", rec.working_path().display()));
            }
            Ok(CtlResponse::Ok { message: msg })
        }
        CtlRequest::Shutdown => {
            d.cancel.cancel();
            Ok(CtlResponse::Ok {
                message: "shutting down".into(),
            })
        }
    }
}

/// Stop and start a torrent again from its stored record.
async fn restart(d: &Arc<Daemon>, hash: Hash) -> anyhow::Result<()> {
    d.torrents.lock().expect("torrents lock").remove(&hash);
    let rec = d
        .store
        .get_torrent(&hash)?
        .context("torrent vanished from the store")?;
    activate(d, hash, rec)
}

fn descriptor_dir(d: &Daemon) -> PathBuf {
    d.data_dir.join("descriptors")
}

async fn publish(d: &Arc<Daemon>, path: &Path) -> anyhow::Result<CtlResponse> {
    let path = std::fs::canonicalize(path)
        .with_context(|| format!("cannot publish {}", path.display()))?;
    let trackers = d.cfg.trackers.clone();
    let pl = d.cfg.piece_length();
    let p2 = path.clone();
    let meta = tokio::task::spawn_blocking(move || {
        crate::metainfo::create(&p2, pl, trackers, &crate::metainfo::HashProgress::default())
    })
    .await??;
    let hex = meta.info_hash_hex();
    std::fs::create_dir_all(descriptor_dir(d))?;
    let desc_path = descriptor_dir(d).join(format!("{hex}.json"));
    meta.save(&desc_path)?;
    if d.torrent(&meta.info_hash).is_none() {
        let rec = TorrentRecord {
            descriptor: Some(String::from_utf8(meta.to_json()).expect("JSON is UTF-8")),
            data_path: path.clone(),
            state: TorrentState::Seeding,
            paused_from: None,
            added_at: crate::fsutil::unix_ms(),
            completed_at: Some(crate::fsutil::unix_ms()),
            downloaded: 0,
            uploaded: 0,
            trackers: Vec::new(),
            note: None,
        };
        // Every piece was just hashed from this very file.
        d.store
            .commit_progress(&meta.info_hash, &Bitfield::full(meta.piece_count()), &rec)?;
        activate(d, meta.info_hash, rec)?;
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
) -> anyhow::Result<CtlResponse> {
    let out_dir = output.unwrap_or_else(|| d.data_dir.join("downloads"));
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create output dir {}", out_dir.display()))?;
    let out_dir = std::fs::canonicalize(&out_dir)?;
    let (hash, rec) = match (descriptor, info_hash) {
        (Some(json), _) => {
            let meta = Metainfo::from_json(json.as_bytes())?;
            let data_path = out_dir.join(&meta.name);
            (
                meta.info_hash,
                new_download_record(Some(json), data_path, trackers),
            )
        }
        (None, Some(h)) => {
            let hash = parse_hash(&h)?;
            let mut rec = new_download_record(None, out_dir, trackers);
            rec.state = TorrentState::FetchingMetadata;
            (hash, rec)
        }
        (None, None) => bail!("give a descriptor or an info hash"),
    };
    if d.torrent(&hash).is_some()
        || d.fetching
            .lock()
            .expect("fetching lock")
            .contains_key(&hash)
    {
        return Ok(CtlResponse::Added {
            info_hash: hex::encode(hash),
        });
    }
    if rec.state == TorrentState::Downloading && rec.data_path.exists() {
        bail!(
            "{} already exists; shoal will not overwrite it (choose another --output or move it away)",
            rec.data_path.display()
        );
    }
    d.store.put_torrent(&hash, &rec)?;
    d.store.flush()?;
    activate(d, hash, rec)?;
    Ok(CtlResponse::Added {
        info_hash: hex::encode(hash),
    })
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
    }
}

/// Bring a stored torrent to life: open its data, start its tasks, put it in the map.
///
/// # Errors
/// A damaged record.
pub fn activate(d: &Arc<Daemon>, hash: Hash, rec: TorrentRecord) -> anyhow::Result<()> {
    if rec.state == TorrentState::FetchingMetadata {
        let token = d.cancel.child_token();
        d.fetching
            .lock()
            .expect("fetching lock")
            .insert(hash, (rec.clone(), token.clone()));
        let d2 = d.clone();
        d.tasks
            .spawn(async move { announce::fetch_metadata_task(d2, hash, rec, token).await });
        return Ok(());
    }
    let t = Torrent::load(d, hash, rec)?;
    d.torrents
        .lock()
        .expect("torrents lock")
        .insert(hash, t.clone());
    t.start(d);
    Ok(())
}
