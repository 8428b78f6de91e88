use std::time::Duration;

use crate::common::*;

#[test]
fn it_should_play_the_seed_experiments_and_pass_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = shoal(
        d,
        &[
            "demo",
            "--peers",
            "3",
            "--size",
            "16MiB",
            "--upload-rate",
            "3MiB",
            "--keep",
            "work",
            "--json",
            "report.json",
            "--timeout",
            "150s",
        ],
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    let verified = r["verified"].as_object().unwrap();
    assert_eq!(
        verified.len(),
        4,
        "three leechers and the late peer: {verified:?}"
    );
    assert!(verified.values().all(|v| v == true));
    assert!(
        !r["bans"].as_array().unwrap().is_empty(),
        "the saboteur was banned"
    );
    assert!(
        r["tracker_failovers"].as_u64().unwrap() >= 1,
        "the failover happened"
    );
    let refetched = r["restarted_peer_refetched"].as_u64().unwrap();
    assert!(
        refetched < 16 << 20,
        "the restarted peer re-fetched {refetched} bytes"
    );
    assert!(r["primary_tracker_swarm_after_restart"].as_u64().unwrap() >= 1);
    assert!(stdout.contains("all checks passed"));
    // Every process it started is gone: nothing listens on the demo's addresses any more.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", d.join("work").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
fn it_should_play_a_scenario_file_with_timed_and_progress_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("s.toml"),
        r#"
peers = 2
size = "8MiB"
piece_size = "256KiB"
upload_rate = "2MiB"

[[step]]
at_secs = 0.5
action = "kill-peer"
peer = 2

[[step]]
at_secs = 1.5
action = "restart-peer"
peer = 2

[[step]]
at_progress = 0.3
action = "kill-tracker"
"#,
    )
    .unwrap();
    let out = shoal(
        d,
        &[
            "demo",
            "--scenario",
            "s.toml",
            "--json",
            "r.json",
            "--timeout",
            "100s",
        ],
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("leecher2 killed") && stdout.contains("leecher2 restarted"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("r.json")).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    assert_eq!(r["piece_size"], 256 * 1024);
    assert!(
        r["bans"].as_array().unwrap().is_empty(),
        "no saboteur in this scenario"
    );
    assert!(r["tracker_failovers"].as_u64().unwrap() >= 1);
    // A scenario that names a peer that does not exist is refused up front.
    std::fs::write(
        d.join("bad.toml"),
        "peers = 1\nsize = \"1MiB\"\npiece_size = \"256KiB\"\n[[step]]\nat_secs = 1\naction = \"kill-peer\"\npeer = 3\n",
    )
    .unwrap();
    let out = shoal(
        d,
        &["demo", "--scenario", "bad.toml"],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs `peer` from 1 to 1"));
}
