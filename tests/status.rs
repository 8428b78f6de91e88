use std::path::Path;
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn query(d: &Path, dd: &Path, sql: &str) -> std::process::Output {
    shoal(
        d,
        &["query", sql, "--json", "--data-dir", dd.to_str().unwrap()],
        T,
    )
}

fn query_ok(d: &Path, dd: &Path, sql: &str) -> Vec<serde_json::Value> {
    let out = query(d, dd, sql);
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn it_should_answer_sql_consistent_with_status_and_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 32, [("seeder", &["--sabotage", "delay=50ms"])]);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let dd = leecher.data_dir.clone();
    peer_ok(d, &dd, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "some progress", || {
        (status(d, &dd)["torrents"][0]["have"].as_u64().unwrap_or(0) >= 3).then_some(())
    });
    // Mid-download, one snapshot: the torrents row agrees with the pieces table.
    let rows = query_ok(
        d,
        &dd,
        "SELECT t.have, t.pieces, t.state, (SELECT count(*) FROM pieces p WHERE p.info_hash = t.info_hash AND p.have) AS counted, \
         (SELECT count(*) FROM peers) AS npeers FROM torrents t",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["have"], rows[0]["counted"], "{rows:?}");
    assert_eq!(rows[0]["pieces"], 32);
    assert_eq!(rows[0]["state"], "DOWNLOADING");
    assert!(rows[0]["npeers"].as_u64().unwrap() >= 1);
    // Pause, so status and query see the same state.
    let paused = peer_ok(d, &dd, &["pause", &hash], T);
    assert!(paused.contains("paused"), "{paused}");
    let st = status(d, &dd)["torrents"][0].clone();
    assert_eq!(st["state"], "PAUSED");
    let have = st["have"].as_u64().unwrap();
    let rows = query_ok(d, &dd, "SELECT count(*) AS n FROM pieces WHERE have");
    assert_eq!(rows[0]["n"].as_u64().unwrap(), have);
    let rows = query_ok(
        d,
        &dd,
        "SELECT info_hash, name, length, state FROM torrents",
    );
    assert_eq!(rows[0]["info_hash"], hash);
    assert_eq!(rows[0]["length"], st["length"]);
    assert_eq!(rows[0]["state"], st["state"]);
    // Anything but a read is refused, and nothing changes.
    for bad in [
        "DELETE FROM torrents",
        "ATTACH DATABASE 'x.db' AS x",
        "PRAGMA writable_schema = 1",
        "DROP TABLE peers",
    ] {
        let out = query(d, &dd, bad);
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("refused") || err.contains("not authorized"),
            "{bad}: {err}"
        );
    }
    assert_eq!(
        query_ok(d, &dd, "SELECT count(*) AS n FROM torrents")[0]["n"],
        1
    );
    assert_eq!(
        status(d, &dd)["torrents"][0]["have"].as_u64().unwrap(),
        have
    );
    // Resume and finish.
    peer_ok(d, &dd, &["resume", &hash], T);
    let out = peer_ok(
        d,
        &dd,
        &[
            "get",
            &desc,
            "--output",
            "out",
            "--wait",
            "--timeout",
            "50s",
        ],
        T,
    );
    assert!(out.contains("complete and verified"));
    // Remove keeps the data unless asked.
    let out = peer_ok(d, &dd, &["remove", &hash], T);
    assert!(out.contains("data kept"), "{out}");
    assert!(d.join("out/file.bin").exists());
    assert_eq!(status(d, &dd)["torrents"].as_array().unwrap().len(), 0);
}

#[test]
fn it_should_refuse_a_second_daemon_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let first = start_peer(d, "p", &[], &[]);
    let dd = first.data_dir.to_str().unwrap();
    let out = shoal(
        d,
        &["peer", "run", "--data-dir", dd, "--listen", "127.0.0.1:0"],
        T,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(dd) && err.contains("already running"), "{err}");
    // The first one is unharmed.
    assert_eq!(
        status(d, &first.data_dir)["peer_id"],
        first.peer_id.as_str()
    );
    assert_eq!(first.peer_id.len(), 64, "the peer id is the key, in hex");
}

#[test]
fn it_should_explain_the_usual_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = shoal(d, &["status", "--data-dir", "nowhere"], T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no shoal daemon is running")
            && err.contains("shoal peer run --data-dir nowhere"),
        "{err}"
    );
    let p = start_peer(d, "p", &[], &[]);
    let out = shoal(
        d,
        &[
            "get",
            "missing.json",
            "--data-dir",
            p.data_dir.to_str().unwrap(),
        ],
        T,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.json"), "{err}");
}
