//! Tracker load, in one run, against real `shoal tracker run` processes with their SQLite
//! databases on disk (a fresh tracker per phase, so each peak RSS is its own):
//!
//! 1. the cost of one Ed25519 verify, and of the HMAC that replaces it on session announces;
//! 2. for each scale of live peers (default 1,000 / 100,000 / 1,000,000, spread over 10,000
//!    swarms): the swarm is populated (legacy unsigned ids, `allow_unsigned`, so that a million
//!    peers do not need a million signatures to set up), then SHOAL_BENCH_KEYS peers with real
//!    Ed25519 keys join signed (opening sessions) and heart-beat with session MACs on persistent
//!    connections, as fast as they can for a fixed time: every measured announce is
//!    authenticated. Printed: announces/s, p50/p99 latency, the tracker's CPU per announce
//!    (from /proc/PID/stat), its peak RSS (VmHWM from /proc/PID/status), the database size, and
//!    after a kill -9 how many live peers the database holds; then the same heartbeats written
//!    SHOAL_BENCH_PIPELINE (8) at a time per connection, as a client announcing several
//!    torrents can, which prices the syscall pair each closed-loop announce pays;
//! 3. a flood of 1,000,000 announces for random info hashes from one address (127.0.0.2) with
//!    the default limits, while honest peers on 127.0.0.3 announce every 2 ms: the tracker's
//!    peak RSS, the honest announces' p99, and the database size after retention.
//!
//! The per-address caps are lifted in phase 2 (every bench client shares 127.0.0.1); the flood
//! runs with the defaults, which are what bound it.
//!
//! Run: `cargo bench --bench tracker_load`. Vary with SHOAL_BENCH_SCALES (comma-separated live
//! peer counts), SHOAL_BENCH_SWARMS, SHOAL_BENCH_CLIENTS, SHOAL_BENCH_SECS, SHOAL_BENCH_FLOOD,
//! SHOAL_BENCH_KEYS, SHOAL_BENCH_PIPELINE (1: skip that pass), SHOAL_BENCH_NET_THREADS (the
//! tracker's `net_threads`), and SHOAL_BENCH_BIN
//! (another build's `shoal` binary, to compare two builds in the same conditions).

#[path = "common.rs"]
mod common;

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_tracker::auth::Signer;
use shoal_tracker::client::{ClientError, DatagramClient, TrackerClient};
use shoal_tracker::proto::{Announce, Event, Request, Response};

const TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let scales: Vec<u64> = std::env::var("SHOAL_BENCH_SCALES")
        .unwrap_or_else(|_| "1000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let swarms = common::env_or("SHOAL_BENCH_SWARMS", 10_000);
    let clients = common::env_or("SHOAL_BENCH_CLIENTS", 64);
    let secs = common::env_or("SHOAL_BENCH_SECS", 5);
    let flood = common::env_or("SHOAL_BENCH_FLOOD", 1_000_000);
    let keys = common::env_or("SHOAL_BENCH_KEYS", 4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    ed25519_verify_cost();
    println!(
        "tracker load: {clients} persistent connections heart-beating for {secs} s per scale, live peers spread over up to {swarms} swarms, numwant 50"
    );
    for peers in scales {
        rt.block_on(scale(peers, swarms.min(peers), clients, secs, keys));
    }
    rt.block_on(flood_phase(flood));
}

/// Phase 1: one verify of a 64-byte signature over an announce-sized message.
fn ed25519_verify_cost() {
    use ed25519_dalek::{Signer, SigningKey, Verifier};
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let msg = br#"{"type":"ANNOUNCE","info_hash":"0000000000000000000000000000000000000000000000000000000000000001","peer_id":"bench-1","port":10001,"event":"progress","have":1,"total":1000}"#;
    let sig = key.sign(msg);
    let public = key.verifying_key();
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        public
            .verify(std::hint::black_box(msg), std::hint::black_box(&sig))
            .unwrap();
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    use hmac::Mac;
    let t = Instant::now();
    for _ in 0..n {
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[9u8; 32]).unwrap();
        m.update(std::hint::black_box(msg));
        std::hint::black_box(m.finalize());
    }
    let mac_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "ed25519 verify (ed25519-dalek 2, one core): {us:.1} us each -> {:.0} per core-second; HMAC-SHA256 of a session announce: {mac_us:.2} us",
        1e6 / us
    );
}

/// A process's CPU time so far (all its threads), from /proc/PID/stat, in seconds.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    user: f64,
    system: f64,
}

impl Cpu {
    fn of(pid: u32) -> Cpu {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Cpu {
            user: f[11].parse::<f64>().unwrap() / hz,
            system: f[12].parse::<f64>().unwrap() / hz,
        }
    }

    fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            user: self.user - o.user,
            system: self.system - o.system,
        }
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Database, WAL and shared-memory files, in bytes.
fn db_bytes(db: &Path) -> (u64, u64) {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let wal = db.with_file_name(format!("{}-wal", db.file_name().unwrap().to_string_lossy()));
    (len(db), len(&wal))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn start_tracker(dir: &Path, config: &str) -> (common::Daemon, String) {
    let db = dir.join("tracker.db");
    let cfg = dir.join("tracker.toml");
    // The tracker's default unless asked (and then unwritten, so that an older build, which
    // refuses an unknown setting, can run this bench through SHOAL_BENCH_BIN).
    let threads = std::env::var("SHOAL_BENCH_NET_THREADS")
        .map(|t| format!("net_threads = {t}\n"))
        .unwrap_or_default();
    std::fs::write(&cfg, format!("[tracker]\n{threads}{config}")).unwrap();
    // SHOAL_BENCH_BIN: another build's `shoal` (to compare two builds in the same conditions).
    let bin = std::env::var("SHOAL_BENCH_BIN").unwrap_or_else(|_| common::shoal_bin().into());
    let d = common::spawn_bin(
        &bin,
        dir,
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
    );
    let addr = common::addr_of(&d.line);
    (d, addr)
}

/// A well-mixed 64-bit value of `x` (splitmix64), so the bench's info hashes look like real
/// ones (random leading digits) rather than sharing 60 leading zeros.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn info_hash_of(s: u64) -> String {
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(s),
        mix(s ^ 1 << 62),
        mix(s ^ 2 << 62),
        s
    )
}

fn announce_of(p: u64, swarms: u64, event: Event, have: u64, numwant: Option<u32>) -> Announce {
    Announce {
        info_hash: info_hash_of(p % swarms),
        peer_id: format!("bench-{p}"),
        port: 10000 + (p % 50000) as u16,
        event,
        have,
        total: 1000,
        name: format!("file-{}", p % swarms),
        length: 1 << 30,
        numwant,
        addr: None,
        ..Announce::default()
    }
}

/// Send `reqs` pipelined; announces answered "busy" are sent again after a pause. Returns the
/// number of busy replies seen.
async fn send_all(c: &mut TrackerClient, reqs: Vec<Request>) -> u64 {
    let mut busy = 0;
    let mut todo = reqs;
    while !todo.is_empty() {
        let replies = c.request_many(&todo).await.unwrap();
        let mut again = Vec::new();
        for (req, r) in todo.into_iter().zip(replies) {
            match r {
                Response::Peers { .. } => {}
                Response::Error { reason } if reason.starts_with("busy") => {
                    busy += 1;
                    again.push(req);
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
        if !again.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        todo = again;
    }
    busy
}

fn pct(lat: &[f64], p: f64) -> f64 {
    if lat.is_empty() {
        return f64::NAN;
    }
    lat[((lat.len() as f64 - 1.0) * p) as usize]
}

/// Phase 2 at one scale.
async fn scale(peers: u64, swarms: u64, clients: u64, secs: u64, keys: u64) {
    let dir = common::bench_dir();
    let (tracker, addr) = start_tracker(
        dir.path(),
        "ttl = \"10m\"\ninterval = \"5m\"\nmax_live_per_addr = 100000000\n\
         max_new_files_per_minute = 100000000\nmax_connections_per_addr = 100000\n\
         allow_unsigned = true\n",
    );
    let pid = tracker.child.id();
    // Populate: a few connections, 1000 announces pipelined at a time.
    let t = Instant::now();
    let fillers = 4u64;
    let mut set = tokio::task::JoinSet::new();
    for f in 0..fillers {
        let addr = addr.clone();
        set.spawn(async move {
            let mut c = TrackerClient::connect(&addr, None, TIMEOUT).await.unwrap();
            let mut busy = 0;
            let mine: Vec<u64> = (f..peers).step_by(fillers as usize).collect();
            for chunk in mine.chunks(1000) {
                let reqs = chunk
                    .iter()
                    .map(|&p| Request::Announce(announce_of(p, swarms, Event::Started, 0, Some(0))))
                    .collect();
                busy += send_all(&mut c, reqs).await;
            }
            busy
        });
    }
    let mut busy = 0;
    while let Some(r) = set.join_next().await {
        busy += r.unwrap();
    }
    let fill_s = t.elapsed().as_secs_f64();
    // Measure the steady state, not the writer catching up with the population.
    let db = dir.path().join("tracker.db");
    let reader =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let count_rows = || -> i64 {
        reader
            .query_row("SELECT count(*) FROM peers", [], |r| r.get(0))
            .unwrap_or(0)
    };
    while count_rows() < peers as i64 && t.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fill_durable_s = t.elapsed().as_secs_f64();
    if count_rows() < peers as i64 {
        println!("    (the writer had not caught up with the population after 300 s: the run below overlaps it)");
    }
    // The authenticated peers: keys made here, each joins signed (opening its session).
    let keys = keys.max(clients);
    let signers: Arc<Vec<Signer>> = Arc::new(
        (0..keys)
            .map(|_| Signer::new(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng)))
            .collect(),
    );
    let t_join = Instant::now();
    let cpu_join0 = common::proc_cpu(pid);
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let addr = addr.clone();
        let signers = signers.clone();
        set.spawn(async move {
            let mut client = TrackerClient::connect(&addr, None, TIMEOUT).await.unwrap();
            for k in (c..keys).step_by(clients as usize) {
                let a = announce_of(k, swarms, Event::Started, 0, Some(0));
                client
                    .announce(&a, Some(&signers[k as usize]))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let join_cpu = common::proc_cpu(pid) - cpu_join0;
    let join_s = t_join.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Measure: closed-loop authenticated heartbeats (session MACs) on persistent connections.
    let pass = Pass {
        addr: addr.clone(),
        signers: signers.clone(),
        clients,
        keys,
        swarms,
        secs,
        pid,
    };
    let ((count, busy_run, lat), cpu) = pass
        .run(|p, c, start, stop| closed_loop(p, c, start, stop, false))
        .await;
    let udp = if common::env_or("SHOAL_BENCH_UDP", 1) == 1 {
        let ((n, _, lat), cpu) = pass
            .run(|p, c, start, stop| closed_loop(p, c, start, stop, true))
            .await;
        Some((n, cpu, lat))
    } else {
        None
    };
    let depth = common::env_or("SHOAL_BENCH_PIPELINE", 8);
    let piped = if depth > 1 {
        let ((n, _, lat), cpu) = pass
            .run(move |p, c, start, stop| pipelined(p, c, start, stop, depth))
            .await;
        Some((n, cpu, lat))
    } else {
        None
    };
    // How long the writer takes to have every live peer durable, then kill -9 and count.
    let ended = Instant::now();
    while count_rows() < (peers + keys) as i64 && ended.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let durable_after = ended.elapsed().as_secs_f64();
    let hwm = vm_hwm_kib(pid);
    let (db_len, wal_len) = db_bytes(&db);
    drop(tracker);
    let rows = count_rows();
    println!("- {peers} live peers in {swarms} swarms (populated in {fill_s:.1} s, all durable after {fill_durable_s:.1} s, {busy} busy replies retried), plus {keys} keyed peers that joined signed in {join_s:.1} s ({:.0} us tracker CPU per signed session opening)", join_cpu * 1e6 / keys as f64);
    println!(
        "    {:.0} announces/s ({count} in {secs} s, {busy_run} answered busy)  latency ms p50 {:.2}  p99 {:.2}  max {:.2}",
        count as f64 / secs as f64,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "    tracker CPU {:.1} us per announce ({:.0} announces per CPU-second; user {:.1} + system {:.1} us)  peak RSS {:.0} MiB  database {:.1} MiB + WAL {:.1} MiB  every live peer durable {durable_after:.1} s after the run; after kill -9: {rows} peer rows (want {})",
        cpu.total() * 1e6 / count.max(1) as f64,
        count as f64 / cpu.total().max(1e-9),
        cpu.user * 1e6 / count.max(1) as f64,
        cpu.system * 1e6 / count.max(1) as f64,
        hwm as f64 / 1024.0,
        mib(db_len),
        mib(wal_len),
        peers + keys,
    );
    if let Some((n, cpu, lat)) = udp {
        println!(
            "    the same heartbeats as UDP datagrams, closed loop, one socket per client: {:.0} announces/s  latency ms p50 {:.2}  p99 {:.2}  max {:.2}  tracker CPU {:.1} us per announce ({:.0} announces per CPU-second; user {:.1} + system {:.1} us)",
            n as f64 / secs as f64,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
            cpu.total() * 1e6 / n.max(1) as f64,
            n as f64 / cpu.total().max(1e-9),
            cpu.user * 1e6 / n.max(1) as f64,
            cpu.system * 1e6 / n.max(1) as f64,
        );
    }
    if let Some((n, cpu, lat)) = piped {
        println!(
            "    the same heartbeats {depth} per write (a client with several torrents): {:.0} announces/s  p50/p99 per batch {:.2}/{:.2} ms  tracker CPU {:.1} us per announce (user {:.1} + system {:.1} us)",
            n as f64 / secs as f64,
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            cpu.total() * 1e6 / n.max(1) as f64,
            cpu.user * 1e6 / n.max(1) as f64,
            cpu.system * 1e6 / n.max(1) as f64,
        );
    }
}

/// What every measured pass shares: the tracker, its keyed peers, the clients and how long.
#[derive(Clone)]
struct Pass {
    addr: String,
    signers: Arc<Vec<Signer>>,
    clients: u64,
    keys: u64,
    swarms: u64,
    secs: u64,
    pid: u32,
}

/// What one client brought back: announces answered, "busy" replies, latencies in ms.
type Tally = (u64, u64, Vec<f64>);

impl Pass {
    /// The keys client `c` heart-beats for, in turn.
    fn mine(&self, c: u64) -> Vec<u64> {
        (c..self.keys).step_by(self.clients as usize).collect()
    }

    /// The next heartbeat of client `c`'s `k`-th turn: its key's index and the announce.
    fn heartbeat(&self, mine: &[u64], k: usize) -> (usize, Announce) {
        let p = mine[k % mine.len()];
        let a = announce_of(p, self.swarms, Event::Progress, (k % 1000) as u64, None);
        (p as usize, a)
    }

    /// Run `client(pass, c, start, stop)` for every client at once (each connects, waits for
    /// `start`, then heart-beats until `stop`); returns the tallies summed, latencies sorted,
    /// and the tracker's CPU over the pass.
    async fn run<F, Fut>(&self, client: F) -> (Tally, Cpu)
    where
        F: Fn(Pass, u64, Instant, Instant) -> Fut,
        Fut: std::future::Future<Output = Tally> + Send + 'static,
    {
        let cpu0 = Cpu::of(self.pid);
        let start = Instant::now() + Duration::from_millis(300);
        let stop = start + Duration::from_secs(self.secs);
        let mut set = tokio::task::JoinSet::new();
        for c in 0..self.clients {
            set.spawn(client(self.clone(), c, start, stop));
        }
        let (mut n, mut busy, mut lat) = (0, 0, Vec::new());
        while let Some(r) = set.join_next().await {
            let (a, b, l) = r.unwrap();
            n += a;
            busy += b;
            lat.extend(l);
        }
        let cpu = Cpu::of(self.pid) - cpu0;
        lat.sort_by(f64::total_cmp);
        ((n, busy, lat), cpu)
    }
}

/// Count a heartbeat's outcome: answered, or "busy" (load shedding); anything else is a bug.
fn tally<T>(r: Result<T, ClientError>, n: &mut u64, busy: &mut u64) {
    match r {
        Ok(_) => *n += 1,
        Err(ClientError::Refused { reason, .. }) if reason.starts_with("busy") => *busy += 1,
        Err(other) => panic!("{other:?}"),
    }
}

/// How a closed-loop client sends its heartbeats.
enum Transport {
    Tcp(TrackerClient),
    /// UDP datagrams, with the session opened when joining (over TCP, from the same address).
    Datagram(DatagramClient),
}

/// One client of a closed loop: one announce, then its reply; over TCP on one connection, or
/// as datagrams from one socket.
async fn closed_loop(p: Pass, c: u64, start: Instant, stop: Instant, udp: bool) -> Tally {
    let mut client = if udp {
        Transport::Datagram(
            DatagramClient::connect(&p.addr, None, TIMEOUT)
                .await
                .unwrap(),
        )
    } else {
        Transport::Tcp(
            TrackerClient::connect(&p.addr, None, TIMEOUT)
                .await
                .unwrap(),
        )
    };
    let mine = p.mine(c);
    tokio::time::sleep_until(start.into()).await;
    let (mut lat, mut n, mut k, mut busy) = (Vec::new(), 0u64, 0usize, 0u64);
    while Instant::now() < stop && !mine.is_empty() {
        let (key, a) = p.heartbeat(&mine, k);
        k += 1;
        let signer = &p.signers[key];
        let t = Instant::now();
        let r = match &mut client {
            Transport::Tcp(cl) => cl.announce(&a, Some(signer)).await,
            Transport::Datagram(cl) => cl.announce(&a, signer, TIMEOUT).await,
        };
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tally(r, &mut n, &mut busy);
    }
    (n, busy, lat)
}

/// The closed loop again, `depth` announces written at once per connection and answered with
/// one write: what one syscall pair per announce costs, measured against it.
async fn pipelined(p: Pass, c: u64, start: Instant, stop: Instant, depth: u64) -> Tally {
    let mut client = TrackerClient::connect(&p.addr, None, TIMEOUT)
        .await
        .unwrap();
    let mine = p.mine(c);
    tokio::time::sleep_until(start.into()).await;
    let (mut lat, mut n, mut k, mut busy) = (Vec::new(), 0u64, 0usize, 0u64);
    while Instant::now() < stop && !mine.is_empty() {
        let reqs: Vec<Request> = (0..depth)
            .map(|_| {
                let (key, mut a) = p.heartbeat(&mine, k);
                k += 1;
                // Every key holds a session from joining: a mac, not a signature.
                let opening = p.signers[key].authenticate(&p.addr, &mut a, false);
                assert!(opening.is_none(), "a session was opened when joining");
                Request::Announce(a)
            })
            .collect();
        let t = Instant::now();
        let replies = client.request_many(&reqs).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        for r in replies {
            match r {
                Response::Peers { .. } => n += 1,
                Response::Error { reason } if reason.starts_with("busy") => busy += 1,
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    (n, busy, lat)
}

/// Honest keyed peers on 127.0.0.5: each opens its session over TCP, then heart-beats as
/// datagrams every 2 ms until `done`. Returns the answered ones' latencies and how many went
/// unanswered within a second.
/// Run `f` on a thread and current-thread runtime of its own, so an honest peer's latency is
/// the tracker's, not the flood client's tasks queueing ahead of it.
fn on_own_runtime<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

async fn honest_datagrams(addr: String, done: Arc<AtomicBool>) -> (Vec<f64>, u64) {
    let ip: IpAddr = [127, 0, 0, 5].into();
    let keys: Vec<Signer> = (0..10)
        .map(|_| Signer::new(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng)))
        .collect();
    let mut c = TrackerClient::connect(&addr, Some(ip), TIMEOUT)
        .await
        .unwrap();
    for (p, k) in keys.iter().enumerate() {
        let a = announce_of(100 + p as u64, 3, Event::Started, 0, None);
        c.announce(&a, Some(k)).await.unwrap();
    }
    let mut udp = DatagramClient::connect(&addr, Some(ip), TIMEOUT)
        .await
        .unwrap();
    let (mut lat, mut lost, mut k) = (Vec::new(), 0u64, 0u64);
    while !done.load(Ordering::Relaxed) {
        let p = k % 10;
        let a = announce_of(100 + p, 3, Event::Progress, k % 1000, None);
        let t = Instant::now();
        match udp
            .announce(&a, &keys[p as usize], Duration::from_secs(1))
            .await
        {
            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
            Err(ClientError::DatagramTimeout { .. }) => {
                lost += 1;
                // A fresh socket: a late reply must not answer the next announce.
                udp = DatagramClient::connect(&addr, Some(ip), TIMEOUT)
                    .await
                    .unwrap();
            }
            Err(e) => panic!("honest datagram refused: {e:?}"),
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (lat, lost)
}

/// `n` announces for random files as datagrams from 127.0.0.4, each with a valid mac of one
/// key's session (the attacker is a real peer), sent as fast as one socket takes them.
/// Returns (sent, accepted, refused, seconds).
async fn datagram_flood(addr: &str, n: u64) -> (u64, u64, u64, f64) {
    let ip: IpAddr = [127, 0, 0, 4].into();
    let key = Signer::new(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng));
    let mut c = TrackerClient::connect(addr, Some(ip), TIMEOUT)
        .await
        .unwrap();
    c.announce(&announce_of(0, 1, Event::Started, 0, None), Some(&key))
        .await
        .unwrap();
    let sock = Arc::new(tokio::net::UdpSocket::bind((ip, 0)).await.unwrap());
    sock.connect(addr).await.unwrap();
    let sent_all = Arc::new(AtomicBool::new(false));
    let reader = {
        let sock = sock.clone();
        let sent_all = sent_all.clone();
        tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            let mut buf = vec![0u8; 65536];
            loop {
                let wait = if sent_all.load(Ordering::Relaxed) {
                    1000
                } else {
                    5000
                };
                match tokio::time::timeout(Duration::from_millis(wait), sock.recv(&mut buf)).await {
                    Ok(Ok(len)) => match serde_json::from_slice::<Response>(&buf[..len]) {
                        Ok(Response::Peers { .. }) => ok += 1,
                        _ => refused += 1,
                    },
                    _ if sent_all.load(Ordering::Relaxed) => return (ok, refused),
                    _ => {}
                }
            }
        })
    };
    let t = Instant::now();
    let mut bytes = Vec::with_capacity(1024);
    for _ in 0..n {
        let mut a = announce_of(0, 1, Event::Started, 0, None);
        a.info_hash = format!("{:064x}", rand::random::<u128>());
        key.authenticate(addr, &mut a, false);
        bytes.clear();
        serde_json::to_writer(&mut bytes, &Request::Announce(a)).unwrap();
        let _ = sock.send(&bytes).await;
    }
    let secs = t.elapsed().as_secs_f64();
    sent_all.store(true, Ordering::Relaxed);
    let (ok, refused) = reader.await.unwrap();
    (n, ok, refused, secs)
}

/// Phase 3: a flood of announces for random files from 127.0.0.2 with the default limits,
/// honest peers on 127.0.0.3 meanwhile.
async fn flood_phase(n: u64) {
    let dir = common::bench_dir();
    // Retention of 5 s so that "after retention" is reached within the run.
    // Legacy unsigned ids for the flood (a signed flood costs the attacker a signature each);
    // the honest peers are keyed and authenticated.
    let (tracker, addr) = start_tracker(dir.path(), "retention = \"5s\"\nallow_unsigned = true\n");
    let pid = tracker.child.id();
    let done = Arc::new(AtomicBool::new(false));
    // The honest peers run on a thread and runtime of their own (`on_own_runtime`).
    let honest = {
        let addr = addr.clone();
        let done = done.clone();
        on_own_runtime(async move {
            let ip: IpAddr = [127, 0, 0, 3].into();
            let mut c = TrackerClient::connect(&addr, Some(ip), TIMEOUT)
                .await
                .unwrap();
            let mut lat = Vec::new();
            let mut k = 0u64;
            let honest: Vec<Signer> = (0..10)
                .map(|_| Signer::new(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng)))
                .collect();
            while !done.load(Ordering::Relaxed) {
                let p = k % 10;
                let ev = if k < 10 {
                    Event::Started
                } else {
                    Event::Progress
                };
                let a = announce_of(p, 3, ev, k % 1000, None);
                let t = Instant::now();
                let r = c.announce(&a, Some(&honest[p as usize])).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                assert!(r.is_ok(), "honest refused: {r:?}");
                k += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lat
        })
    };
    let honest_datagrams = on_own_runtime(honest_datagrams(addr.clone(), done.clone()));
    let datagram_flood = {
        let addr = addr.clone();
        tokio::spawn(async move { datagram_flood(&addr, n).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let conns = 4u64;
    let mut set = tokio::task::JoinSet::new();
    for f in 0..conns {
        let addr = addr.clone();
        set.spawn(async move {
            let ip: IpAddr = [127, 0, 0, 2].into();
            let mut c = TrackerClient::connect(&addr, Some(ip), TIMEOUT)
                .await
                .unwrap();
            let (mut ok, mut refused) = (0u64, 0u64);
            let mine = n / conns + u64::from(f < n % conns);
            let mut sent = 0;
            while sent < mine {
                let k = (mine - sent).min(1000);
                let reqs: Vec<Request> = (0..k)
                    .map(|_| {
                        let mut a = announce_of(0, 1, Event::Started, 0, None);
                        a.info_hash = format!("{:064x}", rand::random::<u128>());
                        a.peer_id = format!("flood-{}", rand::random::<u32>());
                        Request::Announce(a)
                    })
                    .collect();
                for r in c.request_many(&reqs).await.unwrap() {
                    match r {
                        Response::Peers { .. } => ok += 1,
                        _ => refused += 1,
                    }
                }
                sent += k;
            }
            (ok, refused)
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (o, f) = r.unwrap();
        ok += o;
        refused += f;
    }
    let flood_s = t.elapsed().as_secs_f64();
    let (dg_sent, dg_ok, dg_refused, dg_s) = datagram_flood.await.unwrap();
    done.store(true, Ordering::Relaxed);
    let mut lat = honest.join().unwrap();
    lat.sort_by(f64::total_cmp);
    let (mut dg_lat, dg_lost) = honest_datagrams.join().unwrap();
    dg_lat.sort_by(f64::total_cmp);
    let hwm = vm_hwm_kib(pid);
    let db = dir.path().join("tracker.db");
    let (db_during, wal_during) = db_bytes(&db);
    // Retention (5 s, checked every second or so, in 1000-row chunks) then takes the history.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (db_after, wal_after) = db_bytes(&db);
    let events: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    drop(tracker);
    println!(
        "- flood: {n} announces for random files from 127.0.0.2 in {flood_s:.1} s ({:.0}/s): {ok} accepted, {refused} refused by the per-address limits",
        n as f64 / flood_s
    );
    println!(
        "    tracker peak RSS {:.0} MiB (target < 256)  honest announces from 127.0.0.3 meanwhile: {}  p50 {:.2} ms  p99 {:.2} ms (target < 50)  max {:.2} ms",
        hwm as f64 / 1024.0,
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "    meanwhile, from 127.0.0.4, {dg_sent} datagram announces for random files with a session's mac in {dg_s:.1} s: {dg_ok} accepted, {dg_refused} refused by the per-address limits, {} dropped unanswered (past the address's datagram rate)",
        dg_sent - dg_ok - dg_refused
    );
    println!(
        "    honest datagram heartbeats from 127.0.0.5 meanwhile: {} answered  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms; {dg_lost} unanswered within 1 s (a peer sends those over TCP)",
        dg_lat.len(),
        pct(&dg_lat, 0.5),
        pct(&dg_lat, 0.99),
        pct(&dg_lat, 1.0)
    );
    println!(
        "    database {:.2} MiB + WAL {:.2} MiB at the flood's end; after retention (5 s): {:.2} MiB + WAL {:.2} MiB, {events} history rows",
        mib(db_during),
        mib(wal_during),
        mib(db_after),
        mib(wal_after)
    );
}
