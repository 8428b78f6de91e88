//! Folder trees, in the same run and alternating:
//! - `shoal create` of a tree of 10,000 small files (1 GiB in all) against
//!   `tar cf - | openssl dgst -sha256` of the same tree;
//! - a 1 -> 1 loopback transfer of that tree against the transfer of one 1 GiB file.
//!
//! Run: `cargo bench --bench tree` (SHOAL_BENCH_MIB, SHOAL_BENCH_FILES, SHOAL_BENCH_RUNS).

#[path = "common.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn shoal(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(common::shoal_bin())
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

/// A fresh leecher fetches `desc`: seconds from its ADD to completion (the daemon's own
/// clock: added_at to completed_at).
fn leech(d: &Path, taddr: &str, desc: &str, tag: &str) -> f64 {
    let ldir = format!("leecher-{tag}");
    let _leecher = common::spawn(
        d,
        &[
            "peer",
            "run",
            "--data-dir",
            &ldir,
            "--listen",
            "127.0.0.1:0",
            "--tracker",
            taddr,
        ],
    );
    let out = format!("out-{tag}");
    shoal(d, &["get", desc, "--data-dir", &ldir, "--output", &out]);
    let t = Instant::now();
    let secs = loop {
        let st: serde_json::Value =
            serde_json::from_str(&shoal(d, &["status", "--json", "--data-dir", &ldir])).unwrap();
        let tor = &st["torrents"][0];
        if tor["state"] == "SEEDING" {
            break (tor["completed_at"].as_i64().unwrap() - tor["added_at"].as_i64().unwrap())
                as f64
                / 1000.0;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "download did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(_leecher);
    // Keep the disk from filling over the runs.
    let _ = std::fs::remove_dir_all(d.join(&out));
    let _ = std::fs::remove_dir_all(d.join(&ldir));
    secs
}

fn main() {
    let mib = common::env_or("SHOAL_BENCH_MIB", 1024);
    let files = common::env_or("SHOAL_BENCH_FILES", 10_000);
    let runs = common::env_or("SHOAL_BENCH_RUNS", 3) as usize;
    let dir = common::bench_dir();
    let d = dir.path();
    // The tree: FILES files of equal size in 100 folders, MIB MiB in all.
    let total = mib << 20;
    let each = total / files;
    let tree = d.join("tree");
    let mut buf = vec![0u8; each as usize];
    for i in 0..files {
        let sub = tree.join(format!("d{:02}", i % 100));
        std::fs::create_dir_all(&sub).unwrap();
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut buf);
        std::fs::write(sub.join(format!("f{i:05}.bin")), &buf).unwrap();
    }
    let file = d.join("file.bin");
    common::random_file(&file, each * files);
    let _ = Command::new("sync").status();
    // Warm the tree into the page cache.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("tar cf - tree > /dev/null")
        .current_dir(d)
        .status();
    let (mut create, mut tar) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        tar.push(
            common::time_cmd(
                Command::new("sh")
                    .arg("-c")
                    .arg("tar cf - tree | openssl dgst -sha256 > /dev/null")
                    .current_dir(d),
            )
            .as_secs_f64(),
        );
        create.push(
            common::time_cmd(
                Command::new(common::shoal_bin())
                    .args(["create", "tree", "-o", "t.json"])
                    .current_dir(d),
            )
            .as_secs_f64(),
        );
    }
    let (c, t) = (common::median(create.clone()), common::median(tar.clone()));
    println!("tree bench: {files} files, {mib} MiB in all ({each} bytes each), {runs} runs each, alternating");
    println!("  tar cf - | openssl dgst -sha256: median {t:.3} s  runs {tar:.3?}");
    println!("  shoal create (tree):            median {c:.3} s  runs {create:.3?}");
    println!("  ratio create/tar+openssl:       {:.2}", c / t);

    let tracker = common::spawn(
        d,
        &["tracker", "run", "--listen", "127.0.0.1:0", "--db", "t.db"],
    );
    let taddr = common::addr_of(&tracker.line);
    let _seeder = common::spawn(
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
    let desc_of = |what: &str| {
        shoal(d, &["publish", what, "--data-dir", "seeder"])
            .lines()
            .find_map(|l| l.strip_prefix("descriptor: "))
            .unwrap()
            .to_string()
    };
    let (tree_desc, file_desc) = (desc_of("tree"), desc_of("file.bin"));
    let (mut tree_t, mut file_t) = (Vec::new(), Vec::new());
    for r in 0..runs {
        let _ = Command::new("sync").status();
        file_t.push(leech(d, &taddr, &file_desc, &format!("file{r}")));
        let _ = Command::new("sync").status();
        tree_t.push(leech(d, &taddr, &tree_desc, &format!("tree{r}")));
    }
    let (tt, ft) = (
        common::median(tree_t.clone()),
        common::median(file_t.clone()),
    );
    println!("  1 -> 1 loopback, one {mib} MiB file: median {ft:.3} s  runs {file_t:.3?}");
    println!("  1 -> 1 loopback, the tree:          median {tt:.3} s  runs {tree_t:.3?}");
    println!("  ratio tree/file:                    {:.2}", tt / ft);
}
