//! Shared helpers of the benchmark programs (not a bench itself).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn shoal_bin() -> &'static str {
    env!("CARGO_BIN_EXE_shoal")
}

/// A numeric setting from the environment (SHOAL_BENCH_*), or its default.
pub fn env_or(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Time a command; panics if it fails.
pub fn time_cmd(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.output().expect("spawn");
    let dt = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dt
}

/// A file of `len` random bytes (fast: a 1 MiB random block, varied per block).
pub fn random_file(path: &Path, len: u64) {
    use rand::RngCore;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut block);
    let mut left = len;
    let mut i = 0u64;
    while left > 0 {
        block[..8].copy_from_slice(&i.to_le_bytes());
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
        i += 1;
    }
    f.flush().unwrap();
}

/// Read a file once so it sits in the page cache.
pub fn warm(path: &Path) {
    let _ = std::fs::read(path).map(|v| v.len());
}

pub fn bench_dir() -> tempfile::TempDir {
    // Under target/, a real disk, not a tmpfs.
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-tmp");
    std::fs::create_dir_all(base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A `shoal` process started by a bench, killed when dropped.
pub struct Daemon {
    pub child: Child,
    /// Its first line of output (the one that names its address).
    pub line: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `shoal ARGS` in `dir` and wait for its first line.
pub fn spawn(dir: &Path, args: &[&str]) -> Daemon {
    spawn_bin(shoal_bin(), dir, args)
}

/// Start `BIN ARGS` (another build of shoal) in `dir` and wait for its first line.
pub fn spawn_bin(bin: &str, dir: &Path, args: &[&str]) -> Daemon {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Daemon { child, line }
}

/// The socket address in a daemon's first line.
pub fn addr_of(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.parse::<std::net::SocketAddr>().is_ok())
        .unwrap()
        .to_string()
}

/// CPU seconds a child process has used so far.
pub fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
