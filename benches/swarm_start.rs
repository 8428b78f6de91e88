//! One seeder to four leechers at once on loopback (256 MiB): the swarm's start-up and piece
//! flow, against the CPU floor of the same run.
//!
//! Per run, four fresh leechers are told `get` at the same moment; the time is the daemons'
//! own, from the first ADD to the last verified rename. Two floors are printed beside it:
//!
//! - **CPU floor** = CPU seconds all five daemons used in the run / cores. With both cores
//!   busy all the time the run could not end sooner, so time / CPU floor is how much of the
//!   run the cores sat idle (waiting): 1.0 means none.
//! - **SHA floor** = one SHA-256 pass over the file, measured here from a hot buffer, x 2
//!   (each leecher hashes every piece once, and the whole file once) x leechers / cores: what
//!   any verifying client must spend, whatever its design.
//!
//! Also the seeder's upload in copies of the file (super-seeding sends each piece once first).
//!
//! Run: `cargo bench --bench swarm_start` (SHOAL_BENCH_MIB, SHOAL_BENCH_RUNS,
//! SHOAL_BENCH_LEECHERS to vary).

#[path = "common.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

fn status(d: &std::path::Path, data_dir: &str) -> serde_json::Value {
    let out = Command::new(common::shoal_bin())
        .args(["status", "--json", "--data-dir", data_dir])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// CPU seconds of one SHA-256 pass over `bytes` from a cache-hot buffer, on this thread.
fn sha_pass_cpu(bytes: u64) -> f64 {
    use sha2::{Digest, Sha256};
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut h = Sha256::new();
    for _ in 0..bytes / buf.len() as u64 {
        h.update(&buf);
    }
    std::hint::black_box(h.finalize());
    t.elapsed().as_secs_f64()
}

/// Machine-wide CPU seconds (busy, idle) so far, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<f64> = s
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = f[3] + f[4];
    let busy: f64 = f.iter().take(8).sum::<f64>() - idle;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (busy / hz, idle / hz)
}

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::MAX, f64::min),
        v.iter().copied().fold(f64::MIN, f64::max),
    )
}

fn main() {
    let mib = common::env_or("SHOAL_BENCH_MIB", 256);
    let runs = common::env_or("SHOAL_BENCH_RUNS", 3);
    let n = common::env_or("SHOAL_BENCH_LEECHERS", 4) as usize;
    let dir = common::bench_dir();
    let d = dir.path();
    common::random_file(&d.join("file.bin"), mib << 20);
    common::warm(&d.join("file.bin"));
    let tracker = common::spawn(
        d,
        &["tracker", "run", "--listen", "127.0.0.1:0", "--db", "t.db"],
    );
    let taddr = common::addr_of(&tracker.line);
    let peer_args = |data: &str| {
        vec![
            "peer".to_string(),
            "run".into(),
            "--data-dir".into(),
            data.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--tracker".into(),
            taddr.clone(),
        ]
    };
    let spawn_seeder = || {
        let a = peer_args("seeder");
        common::spawn(d, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut seeder = spawn_seeder();
    let out = Command::new(common::shoal_bin())
        .args(["publish", "file.bin", "--data-dir", "seeder"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success());
    let desc = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("descriptor: ").map(str::to_string))
        .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let sha = sha_pass_cpu(mib << 20);
    let sha_floor = 2.0 * n as f64 * sha / cores;
    let (mut times, mut floors, mut copies) = (Vec::new(), Vec::new(), Vec::new());
    let mut other_cpu = Vec::new();
    for r in 0..runs {
        if r > 0 {
            // Super-seeding is per session: a fresh seeder process per run (it resumes from
            // its store, no re-hash), so every run starts the same way.
            drop(seeder);
            seeder = spawn_seeder();
            while status(d, "seeder")["torrents"][0]["state"] != "SEEDING" {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let _ = Command::new("sync").status();
        let leechers: Vec<(String, common::Daemon)> = (0..n)
            .map(|i| {
                let data = format!("r{r}-l{i}");
                let a = peer_args(&data);
                let dm = common::spawn(d, &a.iter().map(String::as_str).collect::<Vec<_>>());
                (data, dm)
            })
            .collect();
        let up0 = status(d, "seeder")["torrents"][0]["uploaded"]
            .as_u64()
            .unwrap();
        let cpu0: f64 = common::proc_cpu(seeder.child.id())
            + leechers
                .iter()
                .map(|(_, dm)| common::proc_cpu(dm.child.id()))
                .sum::<f64>();
        let m0 = machine_cpu();
        // All at once: `get --wait` on every leecher from its own thread.
        let handles: Vec<_> = leechers
            .iter()
            .map(|(data, _)| {
                let (data, desc, d) = (data.clone(), desc.clone(), d.to_path_buf());
                std::thread::spawn(move || {
                    let o = Command::new(common::shoal_bin())
                        .args([
                            "get",
                            &desc,
                            "--data-dir",
                            &data,
                            "--output",
                            &format!("out-{data}"),
                            "--wait",
                        ])
                        .current_dir(&d)
                        .output()
                        .unwrap();
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let cpu1: f64 = common::proc_cpu(seeder.child.id())
            + leechers
                .iter()
                .map(|(_, dm)| common::proc_cpu(dm.child.id()))
                .sum::<f64>();
        let m1 = machine_cpu();
        let (mut first_add, mut last_done) = (i64::MAX, i64::MIN);
        for (data, _) in &leechers {
            let t = &status(d, data)["torrents"][0];
            first_add = first_add.min(t["added_at"].as_i64().unwrap());
            last_done = last_done.max(t["completed_at"].as_i64().unwrap());
        }
        let up1 = status(d, "seeder")["torrents"][0]["uploaded"]
            .as_u64()
            .unwrap();
        let secs = (last_done - first_add) as f64 / 1000.0;
        let floor = (cpu1 - cpu0) / cores;
        let c = (up1 - up0) as f64 / (mib << 20) as f64;
        // What the rest of the machine took meanwhile: on a shared machine the cores are not
        // all ours, and then time / floor measures the sharing, not shoal's waits. Idle time
        // during the run is waiting that nobody else filled.
        let others = (m1.0 - m0.0) - (cpu1 - cpu0);
        let idle = m1.1 - m0.1;
        println!(
            "  run {r}: 1->{n} in {secs:.3} s; CPU {:.2} s over {cores} cores = floor {floor:.3} s ({:.2}x); seeder sent {c:.2} copies; machine meanwhile: other processes {others:.2} CPU s, idle {idle:.2} s",
            cpu1 - cpu0,
            secs / floor
        );
        other_cpu.push(others);
        times.push(secs);
        floors.push(floor);
        copies.push(c);
        drop(leechers);
        for i in 0..n {
            let _ = std::fs::remove_dir_all(d.join(format!("out-r{r}-l{i}")));
            let _ = std::fs::remove_dir_all(d.join(format!("r{r}-l{i}")));
        }
    }
    let ratios: Vec<f64> = times.iter().zip(&floors).map(|(t, f)| t / f).collect();
    let (tm, fm, rm) = (
        common::median(times.clone()),
        common::median(floors.clone()),
        common::median(ratios.clone()),
    );
    println!(
        "swarm start bench: {mib} MiB, 1 seeder -> {n} leechers at once on loopback, {runs} runs"
    );
    println!("  time:      median {tm:.3} s  range {:.3?}", range(&times));
    println!(
        "  CPU floor: median {fm:.3} s  range {:.3?}  (all daemons' CPU / {cores} cores)",
        range(&floors)
    );
    println!(
        "  time / CPU floor: median {rm:.2}  range {:.2?}  (target <= 1.25)",
        range(&ratios)
    );
    println!(
        "  SHA floor: {sha_floor:.3} s (one SHA-256 pass {sha:.3} s x 2 x {n} / {cores}); time / SHA floor median {:.2}",
        tm / sha_floor
    );
    println!(
        "  seeder upload: median {:.2} copies  range {:.2?}",
        common::median(copies.clone()),
        range(&copies)
    );
    println!(
        "  other processes' CPU during the runs: median {:.2} s  range {:.2?}  (0 on an idle machine)",
        common::median(other_cpu.clone()),
        range(&other_cpu)
    );
}
