//! Test helpers: real `shoal` processes on loopback ephemeral ports, killed by PID on drop,
//! and bounded waits everywhere.
#![allow(dead_code)]

pub mod wire;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `shoal` binary: cargo names it for this package's tests; the tools package's tests find
/// it beside `shoal-tools` (`cargo test --workspace` builds both).
pub fn shoal_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_shoal") {
        return p.into();
    }
    let Some(tools) = option_env!("CARGO_BIN_EXE_shoal-tools") else {
        panic!("neither CARGO_BIN_EXE_shoal nor CARGO_BIN_EXE_shoal-tools is set: run through cargo test");
    };
    let p = Path::new(tools).with_file_name("shoal");
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace`",
        p.display()
    );
    p
}

/// The `shoal-tools` binary (beside `shoal`).
pub fn tools_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_shoal-tools") {
        return p.into();
    }
    shoal_bin().with_file_name("shoal-tools")
}

/// A running child process, SIGKILLed by PID when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        // SAFETY-free: kill(2) by PID through the libc-less std API.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Start `shoal ARGS`, wait (bounded) for its first stdout line and return it.
pub fn spawn_with_line(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, String) {
    let stderr_path = dir.join(format!("{name}.stderr"));
    let mut cmd = Command::new(shoal_bin());
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("SHOAL_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn shoal");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    let mut p = Proc {
        child,
        name: name.into(),
        stderr_path,
    };
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if !line.is_empty() => (p, line),
        _ => {
            p.kill9();
            panic!("{name} did not start: {}", p.stderr());
        }
    }
}

fn addr_in(line: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

pub struct TrackerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub db: PathBuf,
}

pub fn start_tracker(dir: &Path, name: &str, extra: &[&str]) -> TrackerProc {
    start_tracker_at(dir, name, "127.0.0.1:0", extra)
}

pub fn start_tracker_at(dir: &Path, name: &str, listen: &str, extra: &[&str]) -> TrackerProc {
    let db = dir.join(format!("{name}.db"));
    // Most tests speak the contract by hand with made-up peer ids: unsigned announces are
    // allowed here (the tracker's default refuses them; see start_tracker_strict).
    let mut args = vec![
        "tracker",
        "run",
        "--listen",
        listen,
        "--db",
        db.to_str().unwrap(),
        "--allow-unsigned",
    ];
    args.extend_from_slice(extra);
    let (proc, line) = spawn_with_line(dir, name, &args, &[]);
    TrackerProc {
        addr: addr_in(&line),
        proc,
        db,
    }
}

/// A tracker with its default rules: unsigned announces refused.
pub fn start_tracker_strict(dir: &Path, name: &str, extra: &[&str]) -> TrackerProc {
    start_tracker_strict_env(dir, name, extra, &[])
}

/// [`start_tracker_strict`] with environment variables of its own.
pub fn start_tracker_strict_env(
    dir: &Path,
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> TrackerProc {
    let db = dir.join(format!("{name}.db"));
    let mut args = vec![
        "tracker",
        "run",
        "--listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (proc, line) = spawn_with_line(dir, name, &args, env);
    TrackerProc {
        addr: addr_in(&line),
        proc,
        db,
    }
}

pub struct PeerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub peer_id: String,
}

pub fn start_peer(dir: &Path, name: &str, trackers: &[SocketAddr], extra: &[&str]) -> PeerProc {
    start_peer_env(dir, name, trackers, extra, &[])
}

pub fn start_peer_env(
    dir: &Path,
    name: &str,
    trackers: &[SocketAddr],
    extra: &[&str],
    env: &[(&str, &str)],
) -> PeerProc {
    let data_dir = dir.join(name);
    let tr: Vec<String> = trackers.iter().map(|t| t.to_string()).collect();
    let mut args = vec![
        "peer".to_string(),
        "run".into(),
        "--data-dir".into(),
        data_dir.to_str().unwrap().into(),
    ];
    // A test may put a peer on another loopback address (another host, for address bans).
    if !extra.contains(&"--listen") {
        args.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    for t in &tr {
        args.push("--tracker".into());
        args.push(t.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (proc, line) = spawn_with_line(dir, name, &argv, env);
    let peer_id = line
        .split("peer id ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_default()
        .to_string();
    PeerProc {
        addr: addr_in(&line),
        proc,
        data_dir,
        peer_id,
    }
}

/// Run `shoal ARGS` to completion, killed after `limit`.
pub fn shoal(dir: &Path, args: &[&str], limit: Duration) -> Output {
    shoal_env(dir, args, &[], limit)
}

/// [`shoal`] with these environment variables set.
pub fn shoal_env(dir: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(shoal_bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("SHOAL_CONFIG")
        .spawn()
        .expect("spawn shoal");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "shoal {args:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run and require success; returns stdout.
pub fn shoal_ok(dir: &Path, args: &[&str], limit: Duration) -> String {
    let out = shoal(dir, args, limit);
    assert!(
        out.status.success(),
        "shoal {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Poll `f` until it returns Some, at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn random_file(path: &Path, len: usize) {
    use rand::RngCore;
    let mut f = std::fs::File::create(path).unwrap();
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

/// SHA-256 as `sha256sum` prints it (the coreutils tool, not our code).
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `shoal ARGS --data-dir DATA_DIR` (a command to a running peer), bounded; its stdout.
pub fn peer_ok(dir: &Path, data_dir: &Path, args: &[&str], timeout: Duration) -> String {
    let mut all = args.to_vec();
    all.extend(["--data-dir", data_dir.to_str().unwrap()]);
    shoal_ok(dir, &all, timeout)
}

/// `shoal status --json` of a peer.
pub fn status(dir: &Path, data_dir: &Path) -> serde_json::Value {
    let out = peer_ok(
        dir,
        data_dir,
        &["status", "--json"],
        Duration::from_secs(20),
    );
    serde_json::from_str(&out).unwrap()
}

/// One frame with a JSON header, as bytes.
pub fn frame(header: &serde_json::Value, payload: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut v = (h.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(payload);
    v
}

/// Read one frame (header only) from a blocking stream; `None` on EOF.
pub fn read_frame(s: &mut TcpStream) -> Option<(serde_json::Value, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    assert!(n <= 64 * 1024, "header too large: {n}");
    let mut h = vec![0u8; n];
    s.read_exact(&mut h).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&h).unwrap();
    let plen = v.get("len").and_then(|l| l.as_u64()).unwrap_or(0) as usize;
    let mut p = vec![0u8; plen];
    s.read_exact(&mut p).ok()?;
    Some((v, p))
}

/// Blocking request/response to a tracker.
pub fn tracker_call(addr: SocketAddr, req: serde_json::Value) -> serde_json::Value {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame(&req, &[])).unwrap();
    read_frame(&mut s).expect("tracker reply").0
}

pub fn announce(
    addr: SocketAddr,
    info_hash: &str,
    peer_id: &str,
    port: u16,
    event: &str,
    have: u64,
    total: u64,
) -> serde_json::Value {
    tracker_call(
        addr,
        serde_json::json!({"type":"ANNOUNCE","info_hash":info_hash,"peer_id":peer_id,"port":port,
            "event":event,"have":have,"total":total,"name":"file.bin","length":total * 1024}),
    )
}

/// `shoal publish FILE` on a running peer; returns (info hash, descriptor path).
pub fn publish(dir: &Path, peer: &PeerProc, file: &str) -> (String, String) {
    let out = peer_ok(
        dir,
        &peer.data_dir,
        &["publish", file],
        Duration::from_secs(120),
    );
    let hash = out
        .lines()
        .find_map(|l| l.strip_prefix("info hash: "))
        .unwrap()
        .to_string();
    let desc = out
        .lines()
        .find_map(|l| l.strip_prefix("descriptor: "))
        .unwrap()
        .to_string();
    (hash, desc)
}

/// The usual start of a transfer test: a random `file.bin` of `mib` MiB, a tracker with a 1 s
/// heartbeat, and one seeder per `(name, extra args)`, each publishing the file. Returns the
/// tracker, the seeders, and the info hash and descriptor path (from the first seeder).
pub fn seeded<const N: usize>(
    d: &Path,
    mib: usize,
    seeders: [(&str, &[&str]); N],
) -> (TrackerProc, [PeerProc; N], String, String) {
    random_file(&d.join("file.bin"), mib << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let peers: Vec<PeerProc> = seeders
        .iter()
        .map(|(name, extra)| start_peer(d, name, &[t.addr], extra))
        .collect();
    let published: Vec<(String, String)> =
        peers.iter().map(|p| publish(d, p, "file.bin")).collect();
    let (hash, desc) = published[0].clone();
    let peers = peers.try_into().unwrap_or_else(|_| unreachable!("N peers"));
    (t, peers, hash, desc)
}

/// `shoal get WHAT --wait` into `out_dir` on a running peer, bounded.
pub fn get_wait(dir: &Path, peer: &PeerProc, what: &str, out_dir: &str) -> Output {
    shoal(
        dir,
        &[
            "get",
            what,
            "--data-dir",
            peer.data_dir.to_str().unwrap(),
            "--output",
            out_dir,
            "--wait",
            "--timeout",
            "100s",
        ],
        Duration::from_secs(120),
    )
}

/// The first torrent of a peer's `status --json`.
pub fn torrent(dir: &Path, peer: &PeerProc) -> serde_json::Value {
    status(dir, &peer.data_dir)["torrents"][0].clone()
}

/// `shoal get WHAT --wait` into `out_dir`, then check the result is byte-identical to
/// `original` (a file in `dir` with the same name the download gets).
pub fn fetch_and_verify(dir: &Path, peer: &PeerProc, what: &str, out_dir: &str, original: &str) {
    let out = get_wait(dir, peer, what, out_dir);
    assert!(
        out.status.success(),
        "get {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256sum(&dir.join(out_dir).join(original)),
        sha256sum(&dir.join(original))
    );
}

/// Write a config file `name` in `d` with `body`; its path, for `--config`.
pub fn write_config(d: &Path, name: &str, body: &str) -> String {
    let p = d.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}
