//! One seeder to one leecher, a 1 GiB file on loopback, against a baseline in the same run:
//! the same bytes over one loopback TCP connection into a file (a plain Rust sender and
//! receiver, with and without an fdatasync at the end, since shoal makes the file durable).
//! Also reports both daemons' peak resident set (VmHWM) while moving the file.
//!
//! Each run also downloads into a leecher with `--http` on, scraped every second (`/metrics`
//! and `/api/status`), to price the operators' interfaces against the same run without them.
//!
//! Run: `cargo bench --bench transfer` (SHOAL_BENCH_MIB, SHOAL_BENCH_RUNS to vary).

#[path = "common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Baseline: stream `src` over one loopback TCP connection into `dst`.
fn baseline(src: &Path, dst: &Path, sync: bool) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = dst.to_path_buf();
    let t = Instant::now();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut f = std::fs::File::create(&dst).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).unwrap();
        }
        if sync {
            f.sync_data().unwrap();
        }
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let mut f = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n]).unwrap();
    }
    drop(s);
    rx.join().unwrap();
    t.elapsed()
}

/// CPU seconds this process has used (all threads).
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(ru.ru_utime) + s(ru.ru_stime)
}

/// CPU seconds of one SHA-256 pass over `bytes` from a cache-hot buffer: the least any
/// verifier pays per pass (shoal makes two: per piece, and whole file).
fn sha_pass_cpu(bytes: u64) -> f64 {
    use sha2::{Digest, Sha256};
    let buf = vec![0x5au8; 1 << 20];
    let c = self_cpu();
    let mut h = Sha256::new();
    for _ in 0..bytes / buf.len() as u64 {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    self_cpu() - c
}

/// On a VM with free-page reporting (a virtio balloon), memory the guest frees goes back to
/// the host, and the next run to take it pays a host fault per page: the plain baseline here
/// took 0.3 s or 2.7 s depending on it. Touching 3 GiB and freeing it right before each
/// measurement gives every contender the same host-backed memory.
fn back_guest_memory() {
    let len = 3usize << 30;
    let mut v = vec![0u8; len];
    for p in (0..len).step_by(4096) {
        v[p] = 1;
    }
    std::hint::black_box(&v);
}

/// CPU seconds to write `bytes` into a fresh file and sync it: through shoal's memory map
/// (`mmap` true) or with `pwrite` as the baseline does.
fn write_cpu(dir: &Path, bytes: u64, mmap: bool) -> f64 {
    use shoal::storage::{OpenMode, Storage};
    use std::os::unix::fs::FileExt;
    let piece = 1u32 << 20;
    let buf = vec![0xa5u8; piece as usize];
    let path = dir.join("write-cost.bin");
    let c = self_cpu();
    if mmap {
        let s = Storage::open(&path, bytes, piece, OpenMode::CreateOrReuse).unwrap();
        // In the picker's kind of order: shuffled within windows of 16 pieces.
        use rand::seq::SliceRandom;
        let mut order: Vec<u32> = (0..(bytes / u64::from(piece)) as u32).collect();
        for w in order.chunks_mut(16) {
            w.shuffle(&mut rand::thread_rng());
        }
        for i in order {
            s.write_piece(i, &buf);
        }
        s.sync_raw().unwrap();
    } else {
        let f = std::fs::File::create(&path).unwrap();
        for i in 0..bytes / u64::from(piece) {
            f.write_all_at(&buf, i * u64::from(piece)).unwrap();
        }
        f.sync_data().unwrap();
    }
    let cpu = self_cpu() - c;
    let _ = std::fs::remove_file(&path);
    cpu
}

fn shoal(dir: &Path, args: &[&str]) -> String {
    shoal_with(common::shoal_bin(), dir, args)
}

fn shoal_with(bin: &str, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// GET `path` from `addr` (HTTP/1.1, one request per connection); the body's length.
fn scrape(addr: &str, path: &str) -> usize {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = s.read_to_end(&mut body);
    body.len()
}

/// One download into a fresh leecher; with `http`, the leecher serves HTTP and a thread
/// scrapes `/metrics` and `/api/status` every second, as Prometheus and a dashboard would.
/// Returns (seconds from ADD to verified rename, leecher CPU, seeder CPU, leecher VmHWM KiB).
#[allow(clippy::too_many_arguments)]
fn download(
    bin: &str,
    d: &Path,
    taddr: &str,
    desc: &str,
    seeder: &common::Daemon,
    ldir: &str,
    http: bool,
) -> (f64, f64, f64, u64) {
    let mut args = vec![
        "peer",
        "run",
        "--data-dir",
        ldir,
        "--listen",
        "127.0.0.1:0",
        "--tracker",
        taddr,
    ];
    if http {
        args.extend(["--http", "127.0.0.1:0"]);
    }
    let leecher = common::spawn_bin(bin, d, &args);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = http.then(|| {
        let addr = leecher
            .line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .expect("the leecher prints its HTTP address")
            .to_string();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut scrapes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(scrape(&addr, "/metrics") > 0 && scrape(&addr, "/api/status") > 0);
                scrapes += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            scrapes
        })
    });
    let seed_c = common::proc_cpu(seeder.child.id());
    let t = Instant::now();
    let out_dir = format!("out-{ldir}");
    shoal_with(
        bin,
        d,
        &["get", desc, "--data-dir", ldir, "--output", &out_dir],
    );
    // Poll finely: the time is the daemon's own, from the ADD to the verified rename.
    let (added, done) = loop {
        let st: serde_json::Value = serde_json::from_str(&shoal_with(
            bin,
            d,
            &["status", "--json", "--data-dir", ldir],
        ))
        .unwrap();
        let tor = &st["torrents"][0];
        if tor["state"] == "SEEDING" {
            break (
                tor["added_at"].as_i64().unwrap(),
                tor["completed_at"].as_i64().unwrap(),
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "download did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = scraper {
        let n = s.join().expect("scraper");
        assert!(n >= 1, "scraped at least once");
    }
    // Status polls cost both daemons a little; small against a transfer.
    let r = (
        (done - added) as f64 / 1000.0,
        common::proc_cpu(leecher.child.id()),
        common::proc_cpu(seeder.child.id()) - seed_c,
        vm_hwm_kib(leecher.child.id()),
    );
    let _ = std::fs::remove_dir_all(d.join(&out_dir));
    r
}

fn main() {
    let mib = common::env_or("SHOAL_BENCH_MIB", 1024);
    let runs = common::env_or("SHOAL_BENCH_RUNS", 3);
    let dir = common::bench_dir();
    let d = dir.path();
    let file = d.join("file.bin");
    common::random_file(&file, mib << 20);
    common::warm(&file);
    let tracker = common::spawn(
        d,
        &["tracker", "run", "--listen", "127.0.0.1:0", "--db", "t.db"],
    );
    let taddr = common::addr_of(&tracker.line);
    let seeder = common::spawn(
        d,
        &[
            "peer",
            "run",
            "--data-dir",
            "seeder",
            "--listen",
            "127.0.0.1:0",
            "--tracker",
            &taddr,
        ],
    );
    let out = shoal(d, &["publish", "file.bin", "--data-dir", "seeder"]);
    let desc = out
        .lines()
        .find_map(|l| l.strip_prefix("descriptor: "))
        .unwrap()
        .to_string();
    let (mut base, mut base_sync, mut ours, mut hwm_leech) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut base_cpu, mut leech_cpu, mut seed_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_http, mut leech_http_cpu) = (Vec::new(), Vec::new());
    let ours_bin = common::shoal_bin();
    // Another build (e.g. the previous commit's), measured in turn in this run: its own
    // tracker, seeder and leechers, since builds may not speak to each other (the plaintext
    // protocol before encryption).
    let compare = std::env::var("SHOAL_BENCH_COMPARE_BIN").ok();
    let (mut theirs, mut theirs_cpu, mut theirs_seed_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let other_swarm = compare.as_ref().map(|other| {
        let t = common::spawn_bin(
            other,
            d,
            &[
                "tracker",
                "run",
                "--listen",
                "127.0.0.1:0",
                "--db",
                "t-cmp.db",
            ],
        );
        let taddr = common::addr_of(&t.line);
        let s = common::spawn_bin(
            other,
            d,
            &[
                "peer",
                "run",
                "--data-dir",
                "seeder-cmp",
                "--listen",
                "127.0.0.1:0",
                "--tracker",
                &taddr,
            ],
        );
        let out = shoal_with(
            other,
            d,
            &["publish", "file.bin", "--data-dir", "seeder-cmp"],
        );
        let desc = out
            .lines()
            .find_map(|l| l.strip_prefix("descriptor: "))
            .unwrap()
            .to_string();
        (t, taddr, s, desc)
    });
    // Each measurement starts with no dirty pages left by the previous one, or the kernel's
    // writeback throttling lands in whichever run comes next.
    let settle = || {
        let _ = Command::new("sync").status();
        back_guest_memory();
    };
    for r in 0..runs {
        let dst = d.join(format!("baseline{r}.bin"));
        settle();
        let c = self_cpu();
        base.push(baseline(&file, &dst, false).as_secs_f64());
        base_cpu.push(self_cpu() - c);
        let _ = std::fs::remove_file(&dst);
        settle();
        base_sync.push(baseline(&file, &dst, true).as_secs_f64());
        let _ = std::fs::remove_file(&dst);
        settle();
        // HTTP off and on in turn, alternating which goes first, so neither always follows
        // the baseline.
        for http in [r % 2 == 1, r % 2 == 0] {
            if http {
                let (secs, lc, _, _) = download(
                    ours_bin,
                    d,
                    &taddr,
                    &desc,
                    &seeder,
                    &format!("leecher-http{r}"),
                    true,
                );
                ours_http.push(secs);
                leech_http_cpu.push(lc);
            } else {
                let (secs, lc, sc, hwm) = download(
                    ours_bin,
                    d,
                    &taddr,
                    &desc,
                    &seeder,
                    &format!("leecher{r}"),
                    false,
                );
                ours.push(secs);
                leech_cpu.push(lc);
                seed_cpu.push(sc);
                hwm_leech.push(hwm);
            }
            settle();
        }
        if let (Some(other), Some((_, ot, os, odesc))) = (&compare, &other_swarm) {
            let (secs, lc, sc, _) =
                download(other, d, ot, odesc, os, &format!("leecher-cmp{r}"), false);
            theirs.push(secs);
            theirs_cpu.push(lc);
            theirs_seed_cpu.push(sc);
            settle();
        }
    }
    let hwm_seed = vm_hwm_kib(seeder.child.id());
    let (b, bs, o) = (
        common::median(base.clone()),
        common::median(base_sync.clone()),
        common::median(ours.clone()),
    );
    println!(
        "transfer bench: {mib} MiB, one seeder to one leecher on loopback, {runs} runs alternating"
    );
    println!("  baseline TCP -> file:              median {b:.3} s  runs {base:.3?}");
    println!("  baseline TCP -> file + fdatasync:  median {bs:.3} s  runs {base_sync:.3?}");
    println!("  shoal (hash, mmap, durable, renamed): median {o:.3} s  runs {ours:.3?}");
    if let Some(other) = &compare {
        let t = common::median(theirs.clone());
        let gib = mib as f64 / 1024.0;
        println!(
            "  compare build {other}: median {t:.3} s  runs {theirs:.3?}; this build / that: {:.3}",
            o / t
        );
        println!(
            "  CPU s per GiB (medians), this build: leecher {:.2} seeder {:.2}; that build: leecher {:.2} seeder {:.2}",
            common::median(leech_cpu.clone()) / gib,
            common::median(seed_cpu.clone()) / gib,
            common::median(theirs_cpu) / gib,
            common::median(theirs_seed_cpu) / gib
        );
    }
    let oh = common::median(ours_http.clone());
    println!("  shoal, leecher with --http scraped every 1 s (/metrics + /api/status): median {oh:.3} s  runs {ours_http:.3?}");
    println!(
        "  HTTP cost: time {:+.1} %, leecher CPU median {:.2} s with vs {:.2} s without",
        100.0 * (oh / o - 1.0),
        common::median(leech_http_cpu.clone()),
        common::median(leech_cpu.clone())
    );
    println!(
        "  ratio shoal/baseline: {:.2}  shoal/baseline+fdatasync: {:.2}  (target <= 1.5)",
        o / b,
        o / bs
    );
    let sha = sha_pass_cpu(mib << 20);
    settle();
    let mmap_cpu = write_cpu(d, mib << 20, true);
    settle();
    let pwrite_cpu = write_cpu(d, mib << 20, false);
    let (bc, lc, sc) = (
        common::median(base_cpu),
        common::median(leech_cpu),
        common::median(seed_cpu),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bound = (bc + 2.0 * sha + (mmap_cpu - pwrite_cpu).max(0.0)) / cores;
    println!(
        "  CPU seconds (medians): baseline {bc:.2} (sender + receiver)  shoal leecher {lc:.2} + seeder {sc:.2}"
    );
    println!(
        "  required work, CPU seconds: one SHA-256 pass over the file from a hot buffer {sha:.2}; writing it through the map {mmap_cpu:.2} vs pwrite {pwrite_cpu:.2}"
    );
    println!(
        "  bound 1: the whole-file SHA-256 is one sequential pass, so nothing finishes under {sha:.2} s = {:.2} x baseline, {:.2} x baseline+fdatasync",
        sha / b,
        sha / bs
    );
    println!(
        "  bound 2: (baseline CPU + 2 SHA passes + mmap extra) / {cores} cores = {bound:.2} s = {:.2} x baseline, {:.2} x baseline+fdatasync",
        bound / b,
        bound / bs
    );
    println!("  peak RSS (VmHWM): seeder {} MiB (after serving all runs), leecher {:?} MiB  (target < 128 MiB)",
        hwm_seed / 1024, hwm_leech.iter().map(|k| k / 1024).collect::<Vec<_>>());
}
