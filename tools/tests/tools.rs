//! shoal-tools against real data dirs made by real daemons.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);

fn tools(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tools_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify_json(dd: &Path) -> (bool, serde_json::Value) {
    let (ok, out, err) = tools(&["verify", dd.to_str().unwrap(), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (ok, v[0].clone())
}

fn uploaded(d: &Path, peer: &PeerProc) -> u64 {
    status(d, &peer.data_dir)["torrents"][0]["uploaded"]
        .as_u64()
        .unwrap()
}

#[test]
fn it_should_find_bad_and_missing_pieces_repair_the_store_and_refetch_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 8 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (_, desc) = publish(d, &seeder, "file.bin");
    let mut leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let dd = leecher.data_dir.clone();
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    // The tools refuse while the daemon runs.
    for cmd in ["inspect", "verify"] {
        let (ok, _, err) = tools(&[cmd, dd.to_str().unwrap()]);
        assert!(!ok && err.contains("already running"), "{cmd}: {err}");
    }
    assert_eq!(
        leecher
            .proc
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true)
    );
    let (ok, v) = verify_json(&dd);
    assert!(ok, "a fresh download agrees: {v}");
    assert_eq!(v["good"], 8);
    // Damage: flip bytes in pieces 2 and 5, cut the last piece off.
    let f = d.join("out/file.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[2 * (1 << 20) + 100] ^= 0xFF;
    bytes[5 * (1 << 20) + 7] ^= 0x01;
    bytes.truncate(7 << 20);
    std::fs::write(&f, &bytes).unwrap();
    let (ok, v) = verify_json(&dd);
    assert!(!ok, "verify must fail on damaged data");
    assert_eq!(v["bad"], serde_json::json!([2, 5]));
    assert_eq!(v["missing"], serde_json::json!([7]));
    assert_eq!(v["rescued"], serde_json::json!([]));
    assert_eq!(v["good"], 5);
    // A dry run changes nothing.
    let (ok, out, _) = tools(&["repair", dd.to_str().unwrap()]);
    assert!(ok && out.contains("dry run"), "{out}");
    assert!(!verify_json(&dd).0);
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("piece 2") && out.contains("piece 7") && out.contains("to undo"),
        "{out}"
    );
    let (ok, v) = verify_json(&dd);
    assert!(ok, "after repair the store agrees: {v}");
    assert_eq!(v["good"], 5);
    // Restarted, the daemon fetches exactly the three pieces again.
    let before = uploaded(d, &seeder);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    let refetched = uploaded(d, &seeder) - before;
    assert_eq!(
        refetched,
        3 << 20,
        "only the three damaged pieces are fetched again"
    );
    drop(leecher);
}

#[test]
fn it_should_rescue_correct_unclaimed_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 16 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &["--sabotage", "delay=300ms"]);
    let (_, desc) = publish(d, &seeder, "file.bin");
    std::fs::write(
        d.join("fast-flush.toml"),
        "[peer]\nflush_interval = \"200ms\"\n",
    )
    .unwrap();
    let cfg = d.join("fast-flush.toml");
    let mut leecher = start_peer(
        d,
        "leecher",
        &[t.addr],
        &["--config", cfg.to_str().unwrap()],
    );
    let dd = leecher.data_dir.clone();
    peer_ok(d, &dd, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "some durable progress", || {
        let st = status(d, &dd);
        (st["torrents"][0]["have"].as_u64().unwrap_or(0) >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500)); // A flush interval or two: the bits reach sled.
    leecher.proc.kill9();
    let (_, v) = verify_json(&dd);
    let good = v["good"].as_u64().unwrap();
    assert!((1..16).contains(&good), "{v}");
    // Copy the original bytes over the whole .part: every unclaimed piece becomes correct.
    std::fs::copy(d.join("file.bin"), d.join("out/file.bin.part")).unwrap();
    let (ok, v) = verify_json(&dd);
    assert!(!ok);
    let rescued = v["rescued"].as_array().unwrap().len() as u64;
    assert_eq!(rescued, 16 - good, "{v}");
    assert!(v["bad"].as_array().unwrap().is_empty());
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("marked complete"), "{out}");
    let (ok, v) = verify_json(&dd);
    assert!(ok, "{v}");
    assert_eq!(v["good"], 16);
    assert!(
        d.join("out/file.bin").exists(),
        "a complete .part is renamed to its final name"
    );
    let (ok, out, _) = tools(&["inspect", dd.to_str().unwrap()]);
    assert!(ok && out.contains("SEEDING"), "{out}");
    // Compaction keeps everything.
    let (ok, out, err) = tools(&["compact", dd.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    assert!(verify_json(&dd).0);
    // And the daemon seeds it after a restart.
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    assert_eq!(
        status(d, &leecher.data_dir)["torrents"][0]["state"],
        "SEEDING"
    );
}

#[test]
fn it_should_refuse_what_is_not_a_store_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, err) = tools(&["verify", d.to_str().unwrap()]);
    assert!(!ok && err.contains("not a shoal data directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(d).unwrap().count(),
        0,
        "nothing was written"
    );
    // A store of a newer format.
    let p = start_peer(d, "p", &[], &[]);
    let dd = p.data_dir.clone();
    drop(p);
    {
        let db = sled::open(dd.join("store")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (ok, _, err) = tools(&["inspect", dd.to_str().unwrap()]);
    assert!(!ok && err.contains("newer"), "{err}");
}
