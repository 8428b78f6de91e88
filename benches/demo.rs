//! The swarm on emulated links: each shipped scenario (homogeneous, heterogeneous, seed) played
//! SHOAL_BENCH_RUNS times (default 3) by `shoal demo`, printing the median and range of the
//! distribution time, its ratio to T_min (Kumar & Ross), the seeder's upload in copies of the
//! file, and how far the emulated RTT was from the scenario's.
//!
//! Needs root on Linux for the emulated network (namespaces, TAP, tc); elsewhere the demo runs
//! on loopback and the figures say so. About 8-12 minutes on a 2-core machine.
//!
//! Run: `cargo bench --bench demo` (SHOAL_BENCH_SCENARIOS=homogeneous,seed to choose).

#[path = "common.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

fn range(v: &[f64]) -> (f64, f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (common::median(v.to_vec()), lo, hi)
}

fn main() {
    let runs = common::env_or("SHOAL_BENCH_RUNS", 3).max(1);
    let scenarios = std::env::var("SHOAL_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "homogeneous,heterogeneous,seed".into());
    let dir = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for sc in scenarios.split(',') {
        let (mut time, mut ratio, mut copies, mut rtt_err) = (vec![], vec![], vec![], vec![]);
        let mut network = String::new();
        let mut t_min = 0.0;
        for run in 1..=runs {
            let json = dir.path().join(format!("{sc}-{run}.json"));
            let out = Command::new(common::shoal_bin())
                .args(["demo", "--scenario", sc, "--timeout", "6m", "--json"])
                .arg(&json)
                .output()
                .expect("spawn shoal demo");
            assert!(
                out.status.success(),
                "{sc} run {run} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            time.push(f("distribution_secs"));
            ratio.push(f("t_min_ratio"));
            copies.push(f("seeder_copies"));
            t_min = f("t_min_secs");
            network = r["network"].as_str().unwrap_or("?").to_string();
            for p in r["paths"].as_array().into_iter().flatten() {
                let (m, e) = (
                    p["measured_rtt_ms"].as_f64().unwrap(),
                    p["expected_rtt_ms"].as_f64().unwrap(),
                );
                rtt_err.push((m / e - 1.0) * 100.0);
            }
            println!(
                "{sc} run {run}: {:.1} s, {:.2}x T_min, seeder {:.2} copies ({network})",
                time.last().unwrap(),
                ratio.last().unwrap(),
                copies.last().unwrap()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        table.push((sc.to_string(), network, t_min, time, ratio, copies, rtt_err));
    }
    println!("\n| scenario | network | T_min | time: median (range) | x T_min | seeder copies | emulated RTT error |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (sc, net, t_min, time, ratio, copies, rtt) in table {
        let (t, tl, th) = range(&time);
        let (x, xl, xh) = range(&ratio);
        let (c, cl, ch) = range(&copies);
        let rtt = if rtt.is_empty() {
            "-".to_string()
        } else {
            let (m, l, h) = range(&rtt);
            format!("{m:+.1}% ({l:+.1}..{h:+.1}%)")
        };
        println!(
            "| {sc} | {net} | {t_min:.1} s | {t:.1} s ({tl:.1}-{th:.1}) | {x:.2}x ({xl:.2}-{xh:.2}) | {c:.2} ({cl:.2}-{ch:.2}) | {rtt} |"
        );
    }
}
