//! The tracker under attack and at scale: poison values, floods from one address, huge
//! listings through the real client, a second tracker on the same database, and untrusted text.
//! Sources other than 127.0.0.1 are other loopback addresses (127.0.0.2, ...) bound by the client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use shoal_tracker::client::{ClientError, TrackerClient};
use shoal_tracker::proto::{Announce, Event, Request, Response};

use crate::common::*;

const H: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const WAIT: Duration = Duration::from_secs(10);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn db_i64(db: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn db_str(db: &std::path::Path, sql: &str) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Run `shoal ARGS` to completion with its output in a file (a listing can be far larger than a
/// pipe holds); killed after `limit`. Returns stdout.
fn shoal_big_output(dir: &std::path::Path, args: &[&str], limit: Duration) -> String {
    let out_path = dir.join(format!("out-{}.txt", rand::random::<u64>()));
    let mut child = std::process::Command::new(shoal_bin())
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::null())
        .env_remove("SHOAL_CONFIG")
        .spawn()
        .unwrap();
    let status = wait_for(limit, "shoal to finish", || child.try_wait().unwrap());
    if !status.success() {
        let _ = child.kill();
    }
    assert!(status.success(), "shoal {args:?}: {status}");
    std::fs::read_to_string(out_path).unwrap()
}

fn tracker_with(dir: &std::path::Path, name: &str, toml: &str) -> TrackerProc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, format!("[tracker]\n{toml}")).unwrap();
    start_tracker(dir, name, &["--config", cfg.to_str().unwrap()])
}

fn ann(info_hash: &str, peer_id: &str, event: Event, have: u64, total: u64) -> Announce {
    Announce {
        info_hash: info_hash.into(),
        peer_id: peer_id.into(),
        port: 7000,
        event,
        have,
        total,
        name: "file.bin".into(),
        length: total * 1024,
        numwant: Some(0),
        addr: None,
        ..Announce::default()
    }
}

async fn client_from(t: SocketAddr, ip: [u8; 4]) -> TrackerClient {
    TrackerClient::connect(&t.to_string(), Some(IpAddr::from(ip)), WAIT)
        .await
        .unwrap()
}

#[test]
fn it_should_refuse_poison_values_and_keep_every_honest_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = start_tracker(dir.path(), "t", &[]);
    let poison = [
        json!({"have": 9_223_372_036_854_775_808u64, "total": 9_223_372_036_854_775_809u64, "length": 1}),
        json!({"have": 1, "total": 2, "length": u64::MAX}),
        json!({"have": 0, "total": 5000, "length": 10}),
        json!({"have": 6, "total": 5, "length": 10}),
    ];
    for i in 0..40u16 {
        let mut bad = json!({"type":"ANNOUNCE","info_hash":H,"peer_id":format!("evil-{i}"),
            "port":7000,"event":"started","name":"x"});
        for (k, v) in poison[usize::from(i) % poison.len()].as_object().unwrap() {
            bad[k] = v.clone();
        }
        let r = tracker_call(t.addr, bad);
        assert_eq!(r["type"], "ERROR", "{r}");
        let r = announce(
            t.addr,
            H,
            &format!("honest-{i}"),
            7000 + i,
            "started",
            1,
            10,
        );
        assert_eq!(r["type"], "PEERS", "{r}");
    }
    wait_for(WAIT, "40 honest rows", || {
        (db_i64(&t.db, "SELECT count(*) FROM peers") == 40).then_some(())
    });
    assert_eq!(
        db_i64(
            &t.db,
            "SELECT count(*) FROM peers WHERE peer_id LIKE 'evil-%'"
        ),
        0
    );
    t.proc.kill9();
    let t2 = start_tracker_at(dir.path(), "t", &t.addr.to_string(), &[]);
    let r = tracker_call(t2.addr, json!({"type":"LIST_FILES"}));
    assert_eq!(r["files"][0]["leechers"], 40, "{r}");
}

#[test]
fn it_should_list_a_swarm_of_100k_peers_and_100k_files_through_the_client() {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let t = tracker_with(
        dir.path(),
        "t",
        // A long TTL: on a loaded machine the test may take longer than the default 30 s.
        "ttl = \"10m\"\ninterval = \"1m\"\nmax_live_per_addr = 300000\nmax_new_files_per_minute = 200000\nmax_pending_rows = 1000000\n",
    );
    let started = std::time::Instant::now();
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        // One swarm of N peers, then N files of one peer each, pipelined 1000 at a time.
        let reqs: Vec<Request> = (0..N)
            .map(|i| Request::Announce(ann(H, &format!("peer-{i:06}"), Event::Started, 0, 10)))
            .chain((0..N).map(|i| {
                Request::Announce(ann(&format!("{i:064x}"), "solo", Event::Started, 10, 10))
            }))
            .collect();
        for chunk in reqs.chunks(1000) {
            for r in c.request_many(chunk).await.unwrap() {
                assert!(matches!(r, Response::Peers { .. }), "{r:?}");
            }
        }
        eprintln!("{} announces in {:?}", 2 * N, started.elapsed());
        let swarm = c.swarm_all(Some(H)).await.unwrap();
        assert_eq!(swarm.len(), N);
        let ids: std::collections::HashSet<&str> =
            swarm.iter().map(|e| e.peer_id.as_str()).collect();
        assert_eq!(ids.len(), N, "every peer exactly once");
        assert_eq!(c.swarm_all(None).await.unwrap().len(), 2 * N);
        let files = c.files_all().await.unwrap();
        assert_eq!(files.len(), N + 1);
        let big = files.iter().find(|f| f.info_hash == H).unwrap();
        assert_eq!(big.leechers, N as u64);
        eprintln!("listings read at {:?}", started.elapsed());
    });
    // `shoal list` and `shoal tracker monitor` read the whole of it.
    let list = shoal_big_output(
        dir.path(),
        &["list", "--tracker", &t.addr.to_string(), "--json"],
        Duration::from_secs(60),
    );
    let files: Vec<serde_json::Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(files.len(), N + 1);
    let mon = shoal_big_output(
        dir.path(),
        &[
            "tracker",
            "monitor",
            "--tracker",
            &t.addr.to_string(),
            "--once",
            "--json",
        ],
        Duration::from_secs(60),
    );
    let peers: Vec<serde_json::Value> = serde_json::from_str(mon.trim()).unwrap();
    assert_eq!(peers.len(), 2 * N);
}

#[test]
fn it_should_bound_what_one_address_can_add() {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker_with(
        dir.path(),
        "t",
        "max_live_per_addr = 50\nmax_new_files_per_minute = 20\n",
    );
    rt().block_on(async {
        let mut flood = client_from(t.addr, [127, 0, 0, 2]).await;
        // 500 announces for random files from one address: 20 files get in, the rest are
        // refused with a reason, and nothing of theirs is kept.
        let reqs: Vec<Request> = (0..500u64)
            .map(|_| {
                let h = format!("{:064x}", rand::random::<u128>());
                Request::Announce(ann(&h, "flood", Event::Started, 0, 10))
            })
            .collect();
        let replies = flood.request_many(&reqs).await.unwrap();
        let refused: Vec<&String> = replies
            .iter()
            .filter_map(|r| match r {
                Response::Error { reason } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 480);
        assert!(
            refused[0].contains("too many new files from 127.0.0.2"),
            "{}",
            refused[0]
        );
        // Many peers in one of its files: 50 live entries at most.
        let mine = match &reqs[0] {
            Request::Announce(a) => a.info_hash.clone(),
            _ => unreachable!(),
        };
        let reqs: Vec<Request> = (0..100)
            .map(|i| Request::Announce(ann(&mine, &format!("p{i}"), Event::Started, 0, 10)))
            .collect();
        let replies = flood.request_many(&reqs).await.unwrap();
        let ok = replies
            .iter()
            .filter(|r| matches!(r, Response::Peers { .. }))
            .count();
        assert_eq!(ok, 30, "20 files + 30 peers = the cap of 50");
        let Response::Error { reason } = &replies[99] else {
            panic!("{:?}", replies[99]);
        };
        assert!(reason.contains("too many live entries"), "{reason}");
        // Another address is not affected by the flood.
        let mut honest = client_from(t.addr, [127, 0, 0, 3]).await;
        let r = honest
            .request(&Request::Announce(ann(H, "honest", Event::Started, 0, 10)))
            .await
            .unwrap();
        assert!(matches!(r, Response::Peers { .. }));
        assert_eq!(honest.swarm_all(None).await.unwrap().len(), 51);
    });
    wait_for(WAIT, "rows of the admitted entries only", || {
        (db_i64(&t.db, "SELECT count(*) FROM peers") == 51).then_some(())
    });
    assert_eq!(db_i64(&t.db, "SELECT count(*) FROM torrents"), 21);
}

#[test]
fn it_should_not_let_one_address_lock_out_another() {
    let dir = tempfile::tempdir().unwrap();
    let t = tracker_with(
        dir.path(),
        "t",
        "max_connections = 8\nmax_connections_per_addr = 4\n",
    );
    rt().block_on(async {
        // 20 idle connections from one address: only its own idlest ones are closed.
        let mut hoard = Vec::new();
        for _ in 0..20 {
            hoard.push(client_from(t.addr, [127, 0, 0, 2]).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Honest addresses still get in, repeatedly, while the hoarder holds its share.
        for round in 0..3 {
            for ip in [3u8, 4, 5] {
                let mut c = client_from(t.addr, [127, 0, 0, ip]).await;
                let r = c
                    .request(&Request::Announce(ann(
                        H,
                        &format!("honest-{ip}-{round}"),
                        Event::Started,
                        0,
                        10,
                    )))
                    .await;
                assert!(matches!(r, Ok(Response::Peers { .. })), "{r:?}");
                // Keep some open so the tracker is full.
                if round == 0 {
                    hoard.push(c);
                }
            }
        }
        // The hoarder's oldest connections were the ones closed.
        let mut alive = 0;
        for (i, c) in hoard.iter_mut().take(20).enumerate() {
            let r = c
                .request(&Request::Announce(ann(
                    H,
                    &format!("h{i}"),
                    Event::Started,
                    0,
                    10,
                )))
                .await;
            match r {
                Ok(_) => alive += 1,
                Err(ClientError::Closed { .. } | ClientError::Frame { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(alive <= 4, "{alive} of the hoarder's connections survived");
    });
}

#[test]
fn it_should_refuse_a_second_tracker_on_the_same_database() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    let out = shoal(
        dir.path(),
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            t.db.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use by another tracker") && err.contains(t.db.to_str().unwrap()),
        "{err}"
    );
    // The first one still serves and writes.
    assert_eq!(
        announce(t.addr, H, "p", 7000, "started", 0, 1)["type"],
        "PEERS"
    );
}

#[test]
fn it_should_write_one_started_row_for_a_retried_started() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    for _ in 0..5 {
        announce(t.addr, H, "waiting", 7000, "started", 0, 10);
    }
    announce(t.addr, H, "waiting", 7000, "progress", 3, 10);
    announce(t.addr, H, "other", 7001, "started", 0, 10);
    wait_for(WAIT, "the other's started row", || {
        (db_i64(&t.db, "SELECT count(*) FROM events WHERE peer_id = 'other'") == 1).then_some(())
    });
    assert_eq!(
        db_i64(
            &t.db,
            "SELECT count(*) FROM events WHERE peer_id = 'waiting'"
        ),
        1
    );
}

#[test]
fn it_should_escape_control_characters_and_normalize_the_info_hash() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    let upper = "ABCDEF".repeat(10) + "ABCD";
    let lower = upper.to_ascii_lowercase();
    let evil = "evil\u{1b}[2J\nfake line\u{7}";
    let r = tracker_call(
        t.addr,
        json!({"type":"ANNOUNCE","info_hash":upper,"peer_id":"a","port":7000,"event":"started",
            "have":0,"total":10,"name":evil,"length":10240}),
    );
    assert_eq!(r["type"], "PEERS", "{r}");
    announce(t.addr, &lower, "b", 7001, "started", 0, 10);
    // A peer id with a control character is refused outright.
    let r = announce(t.addr, &lower, "c\u{1b}", 7002, "started", 0, 10);
    assert_eq!(r["type"], "ERROR", "{r}");
    // Upper and lower case are one swarm, stored in lower case.
    let files = tracker_call(t.addr, json!({"type":"LIST_FILES"}));
    assert_eq!(files["files"].as_array().unwrap().len(), 1, "{files}");
    assert_eq!(files["files"][0]["info_hash"], lower.as_str());
    assert_eq!(files["files"][0]["leechers"], 2);
    let peers = tracker_call(t.addr, json!({"type":"SWARM","info_hash":upper}));
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2, "{peers}");
    wait_for(WAIT, "the torrent row", || {
        (db_i64(&t.db, "SELECT count(*) FROM torrents") == 1).then_some(())
    });
    let stored = db_str(&t.db, "SELECT name FROM torrents");
    assert!(!stored.chars().any(char::is_control), "{stored:?}");
    assert_eq!(db_str(&t.db, "SELECT info_hash FROM torrents"), lower);
    // What `list` and `monitor` print holds no control character: no cleared screen, no
    // forged line.
    let a = t.addr.to_string();
    let list = shoal_ok(dir.path(), &["list", "--tracker", &a], WAIT);
    let mon = shoal_ok(
        dir.path(),
        &["tracker", "monitor", "--tracker", &a, "--once"],
        WAIT,
    );
    for out in [&list, &mon] {
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(!out.lines().any(|l| l.starts_with("fake line")), "{out}");
        assert!(out.contains("evil"), "{out}");
    }
}

#[test]
fn it_should_store_a_name_learnt_after_the_first_announce() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker(dir.path(), "t", &[]);
    let r = tracker_call(
        t.addr,
        json!({"type":"ANNOUNCE","info_hash":H,"peer_id":"meta-wait","port":7000,"event":"started",
            "have":0,"total":0}),
    );
    assert_eq!(r["type"], "PEERS", "{r}");
    announce(t.addr, H, "meta-wait", 7000, "progress", 0, 10);
    wait_for(WAIT, "the name in the database", || {
        (db_str(&t.db, "SELECT coalesce(max(name), '') FROM torrents") == "file.bin").then_some(())
    });
}

#[test]
fn it_should_answer_busy_when_the_writer_falls_behind() {
    let dir = tempfile::tempdir().unwrap();
    // A writer that commits every 3 s and a queue of 3 rows: one started announce fills it.
    let t = tracker_with(
        dir.path(),
        "t",
        "batch_interval = \"3s\"\nmax_pending_rows = 3\n",
    );
    let first = announce(t.addr, H, "a", 7000, "started", 0, 10);
    assert_eq!(first["type"], "PEERS", "{first}");
    let r = announce(t.addr, H, "b", 7001, "started", 0, 10);
    assert_eq!(r["type"], "ERROR", "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("busy, retry in ") && reason.ends_with(" s"),
        "{reason}"
    );
    // The refused announce changed nothing; once the batch commits, it is taken.
    assert_eq!(
        tracker_call(t.addr, json!({"type":"SWARM"}))["peers"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = wait_for(WAIT, "the queue to drain", || {
        let r = announce(t.addr, H, "b", 7001, "started", 0, 10);
        (r["type"] == "PEERS").then_some(r)
    });
    assert_eq!(r["peers"][0]["peer_id"], "a");
}
