//! `shoal create` on a 1 GiB file in the page cache against `openssl dgst -sha256` of the same
//! file, alternating, in the same run. Target: shoal at most 1.2 times openssl although it
//! computes the piece hashes and the whole-file hash.
//!
//! Run: `cargo bench --bench create` (SHOAL_BENCH_MIB to change the size, SHOAL_BENCH_RUNS the runs).

#[path = "common.rs"]
mod common;

use std::process::Command;

fn main() {
    let mib = common::env_or("SHOAL_BENCH_MIB", 1024);
    let runs = common::env_or("SHOAL_BENCH_RUNS", 5) as usize;
    let dir = common::bench_dir();
    let file = dir.path().join("data.bin");
    common::random_file(&file, mib << 20);
    common::warm(&file);
    let (mut shoal, mut openssl) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        openssl.push(
            common::time_cmd(Command::new("openssl").args(["dgst", "-sha256"]).arg(&file))
                .as_secs_f64(),
        );
        shoal.push(
            common::time_cmd(
                Command::new(common::shoal_bin())
                    .arg("create")
                    .arg(&file)
                    .arg("-o")
                    .arg(dir.path().join("d.json")),
            )
            .as_secs_f64(),
        );
    }
    let (s, o) = (
        common::median(shoal.clone()),
        common::median(openssl.clone()),
    );
    println!("create bench: {mib} MiB in the page cache, {runs} runs each, alternating");
    println!("  openssl dgst -sha256: median {o:.3} s  runs {openssl:.3?}");
    println!("  shoal create:         median {s:.3} s  runs {shoal:.3?}");
    println!("  ratio shoal/openssl:  {:.2} (target <= 1.20)", s / o);
}
