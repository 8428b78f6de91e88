//! `shoal-tools verify` of a 1 GiB torrent against `openssl dgst -sha256` of the same file,
//! alternating, in the same run. Target: verify at most 0.7 times openssl's time (both cores).
//!
//! Run: `cargo build --release -p shoal-tools && cargo bench --bench verify`.

#[path = "common.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn main() {
    let mib = common::env_or("SHOAL_BENCH_MIB", 1024);
    let runs = common::env_or("SHOAL_BENCH_RUNS", 5) as usize;
    let tools = std::path::Path::new(common::shoal_bin()).with_file_name("shoal-tools");
    assert!(
        tools.exists(),
        "build it first: cargo build --release -p shoal-tools"
    );
    let dir = common::bench_dir();
    let d = dir.path();
    let file = d.join("data.bin");
    common::random_file(&file, mib << 20);
    // A real data dir: a daemon publishes the file, then stops.
    let mut peer = Command::new(common::shoal_bin())
        .args(["peer", "run", "--data-dir", "dd", "--listen", "127.0.0.1:0"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(peer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    common::time_cmd(
        Command::new(common::shoal_bin())
            .args(["publish", "data.bin", "--data-dir", "dd"])
            .current_dir(d),
    );
    common::time_cmd(
        Command::new(common::shoal_bin())
            .args(["peer", "stop", "--data-dir", "dd"])
            .current_dir(d),
    );
    let _ = peer.wait();
    common::warm(&file);
    let (mut ours, mut openssl) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        openssl.push(
            common::time_cmd(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))
                .as_secs_f64(),
        );
        ours.push(
            common::time_cmd(Command::new(&tools).arg("verify").arg(d.join("dd"))).as_secs_f64(),
        );
    }
    let (o, s) = (
        common::median(openssl.clone()),
        common::median(ours.clone()),
    );
    println!("verify bench: {mib} MiB torrent in the page cache, {runs} runs each, alternating");
    println!("  openssl dgst -sha256:  median {o:.3} s  runs {openssl:.3?}");
    println!("  shoal-tools verify:    median {s:.3} s  runs {ours:.3?}");
    println!("  ratio verify/openssl:  {:.2} (target <= 0.70)", s / o);
}
