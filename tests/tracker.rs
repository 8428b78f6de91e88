use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

const H: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn swarm(t: std::net::SocketAddr) -> Vec<serde_json::Value> {
    let r = tracker_call(t, json!({"type":"SWARM"}));
    assert_eq!(r["type"], "SWARM", "{r}");
    r["peers"].as_array().unwrap().clone()
}

fn db_rows(db: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn it_should_show_three_peers_with_roles_and_never_the_asker() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    announce(t.addr, H, "seed", 7001, "started", 10, 10);
    announce(t.addr, H, "leech-a", 7002, "started", 3, 10);
    let r = announce(t.addr, H, "leech-b", 7003, "started", 0, 10);
    assert_eq!(r["type"], "PEERS");
    let ids: Vec<&str> = r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        !ids.contains(&"leech-b"),
        "the asker is never in its own list"
    );
    assert!(r["interval"].as_u64().unwrap() >= 1);
    let peers = swarm(t.addr);
    assert_eq!(peers.len(), 3);
    let role = |id: &str| peers.iter().find(|p| p["peer_id"] == id).unwrap()["role"].clone();
    assert_eq!(role("seed"), "seeder");
    assert_eq!(role("leech-a"), "leecher");
    assert!(peers.iter().all(|p| p["addr"] == "127.0.0.1"));
    let files = tracker_call(t.addr, json!({"type":"LIST_FILES"}));
    let f = &files["files"][0];
    assert_eq!(
        (f["seeders"].as_u64(), f["leechers"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(f["name"], "file.bin");
    // Completion turns a leecher into a seeder and is recorded once in the history.
    announce(t.addr, H, "leech-a", 7002, "completed", 10, 10);
    let files = tracker_call(t.addr, json!({"type":"LIST_FILES"}));
    assert_eq!(files["files"][0]["seeders"], 2);
    announce(t.addr, H, "leech-b", 7003, "stopped", 0, 10);
    assert_eq!(swarm(t.addr).len(), 2);
    wait_for(Duration::from_secs(5), "history rows", || {
        (db_rows(
            &t.db,
            "SELECT count(*) FROM events WHERE event IN ('completed','stopped')",
        ) == 2)
            .then_some(())
    });
    // `shoal list` and `shoal tracker monitor --once` read the same.
    let d = dir.path();
    let list = shoal_ok(
        d,
        &[
            "list",
            "--tracker",
            "127.0.0.1:1",
            "--tracker",
            &t.addr.to_string(),
        ],
        Duration::from_secs(20),
    );
    assert!(list.contains("file.bin"), "{list}");
    let mon = shoal_ok(
        d,
        &[
            "tracker",
            "monitor",
            "--tracker",
            &t.addr.to_string(),
            "--once",
        ],
        Duration::from_secs(20),
    );
    assert!(
        mon.contains("127.0.0.1:7001") && mon.contains("seeder") && mon.contains("100.0%"),
        "{mon}"
    );
}

#[test]
fn it_should_remember_the_live_swarm_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = start_tracker(dir.path(), "t", &[]);
    for (i, id) in ["p1", "p2", "p3"].iter().enumerate() {
        announce(t.addr, H, id, 7000 + i as u16, "started", i as u64, 5);
    }
    // Durable within the writer's batch interval.
    wait_for(Duration::from_secs(5), "rows in peers", || {
        (db_rows(&t.db, "SELECT count(*) FROM peers") == 3).then_some(())
    });
    t.proc.kill9();
    let addr = t.addr.to_string();
    let t2 = start_tracker_at(dir.path(), "t", &addr, &[]);
    // Nobody has re-announced: the swarm comes from the database.
    let peers = swarm(t2.addr);
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert_eq!(
        db_rows(&t2.db, "PRAGMA user_version"),
        shoal_tracker::store::schema_version()
    );
}

#[test]
fn it_should_prune_peers_silent_for_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &["--ttl", "2s", "--interval", "1s"]);
    announce(t.addr, H, "quiet", 7001, "started", 0, 5);
    let r = announce(t.addr, H, "alive", 7002, "started", 0, 5);
    assert_eq!(r["interval"], 1);
    assert_eq!(swarm(t.addr).len(), 2);
    // "alive" heart-beats; "quiet" does not.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        announce(t.addr, H, "alive", 7002, "progress", 1, 5);
        std::thread::sleep(Duration::from_millis(500));
    }
    let peers = swarm(t.addr);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["peer_id"], "alive");
    wait_for(Duration::from_secs(5), "an expired event", || {
        (db_rows(
            &t.db,
            "SELECT count(*) FROM events WHERE event = 'expired' AND peer_id = 'quiet'",
        ) == 1)
            .then_some(())
    });
    // Heartbeats refresh the live row and write no history.
    assert_eq!(
        db_rows(&t.db, "SELECT count(*) FROM events WHERE peer_id = 'alive'"),
        1
    );
}

#[test]
fn it_should_answer_garbage_with_error_and_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[tracker]\nidle_timeout = \"1s\"\n",
    )
    .unwrap();
    let t = start_tracker(dir.path(), "t", &["--config", "c.toml"]);
    let reply_kind = |bytes: &[u8]| -> Option<String> {
        let mut s = TcpStream::connect(t.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        read_frame(&mut s).map(|(h, _)| h["type"].as_str().unwrap().to_string())
    };
    // Oversize header length, oversize payload, not JSON, no type, unknown type, bad fields.
    let cases: Vec<Vec<u8>> = vec![
        (10u32 << 20).to_be_bytes().to_vec(),
        frame(&json!({"type":"ANNOUNCE","len": 1 << 30}), &[]),
        {
            let mut v = 8u32.to_be_bytes().to_vec();
            v.extend_from_slice(b"not json");
            v
        },
        frame(&json!({"hello":1}), &[]),
        frame(&json!({"type":"TELEPORT"}), &[]),
        frame(
            &json!({"type":"ANNOUNCE","info_hash":"xyz","peer_id":"p","port":1,"event":"started","have":0,"total":1}),
            &[],
        ),
        frame(
            &json!({"type":"ANNOUNCE","info_hash":H,"peer_id":"p","port":0,"event":"started","have":0,"total":1}),
            &[],
        ),
    ];
    for c in &cases {
        assert_eq!(
            reply_kind(c).as_deref(),
            Some("ERROR"),
            "case {:?}",
            &c[..c.len().min(40)]
        );
    }
    // A peer that connects and sends nothing is closed after the idle timeout.
    let mut silent = TcpStream::connect(t.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "silent connection not closed"
    );
    // And the tracker still serves well-formed requests.
    let r = announce(t.addr, H, "good", 7001, "started", 0, 1);
    assert_eq!(r["type"], "PEERS", "{r}");
}

#[test]
fn it_should_close_the_idlest_connection_when_full() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "[tracker]\nmax_connections = 2\n",
    )
    .unwrap();
    let t = start_tracker(dir.path(), "t", &["--config", "c.toml"]);
    let mut held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(t.addr).unwrap())
        .collect();
    // Let the tracker accept both (the first is then the idlest) before the third arrives.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        announce(t.addr, H, "after", 7001, "started", 0, 1)["type"],
        "PEERS"
    );
    // The oldest idle connection was closed to make room.
    held[0]
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        held[0].read(&mut buf).unwrap(),
        0,
        "idlest connection closed"
    );
}

#[test]
fn it_should_use_the_source_address_unless_told_to_trust_the_announced_one() {
    let dir = tempfile::tempdir().unwrap();
    let ask = |t: std::net::SocketAddr| {
        tracker_call(
            t,
            json!({"type":"ANNOUNCE","info_hash":H,"peer_id":"claims","port":7001,"event":"started",
                "have":0,"total":10,"name":"file.bin","length":10240,"addr":"127.0.0.9"}),
        );
        let peers = announce(t, H, "asker", 7002, "started", 0, 10)["peers"].clone();
        let p = &peers.as_array().unwrap()[0];
        assert_eq!(p["peer_id"], "claims");
        p["addr"].as_str().unwrap().to_string()
    };
    // By default a peer cannot point the swarm at another address: the socket's source wins.
    let t = start_tracker(dir.path(), "default", &[]);
    assert_eq!(ask(t.addr), "127.0.0.1");
    // On an overlay network the operator can believe what peers announce.
    let cfg = dir.path().join("trust.toml");
    std::fs::write(&cfg, "[tracker]\ntrust_announced_addr = true\n").unwrap();
    let t = start_tracker(dir.path(), "trusting", &["--config", cfg.to_str().unwrap()]);
    assert_eq!(ask(t.addr), "127.0.0.9");
}

fn environ_var(pid: u32, var: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(&format!("{var}=")).map(str::to_string))
}

/// The tracker keeps its heap on transparent huge pages (jemalloc's options, set by the tracker
/// re-executing itself; see src/main.rs); a peer does not, and an operator's own options win.
#[test]
fn it_should_put_only_the_trackers_heap_on_huge_pages_unless_told_otherwise() {
    const VAR: &str = "_RJEM_MALLOC_CONF";
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    let conf = environ_var(t.proc.child.id(), VAR);
    assert_eq!(conf.as_deref(), Some("thp:always,metadata_thp:always"));
    // Still the same process, serving.
    let r = announce(t.addr, H, "p", 7001, "started", 0, 10);
    assert_eq!(r["type"], "PEERS", "{r}");

    let mut own = start_tracker_strict_env(dir.path(), "own", &[], &[(VAR, "thp:default")]);
    assert_eq!(
        environ_var(own.proc.child.id(), VAR).as_deref(),
        Some("thp:default")
    );
    own.proc.kill9();

    let p = start_peer(dir.path(), "peer", &[t.addr], &[]);
    assert_eq!(environ_var(p.proc.child.id(), VAR), None);
}
