use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

const T: Duration = Duration::from_secs(120);

/// Pieces a peer received from peers other than `exclude`.
fn pieces_from_others(t: &serde_json::Value, exclude: &[&str]) -> u64 {
    t["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !exclude.contains(&p["peer_id"].as_str().unwrap()))
        .map(|p| p["pieces_from"].as_u64().unwrap())
        .sum()
}

#[test]
fn it_should_let_three_leechers_fetch_64mib_from_one_seeder_and_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 64 << 20);
    let t = start_tracker(d, "t", &[]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (hash, desc) = publish(d, &seeder, "file.bin");
    let leechers: Vec<PeerProc> = (0..3)
        .map(|i| start_peer(d, &format!("l{i}"), &[t.addr], &[]))
        .collect();
    // All three at once.
    let handles: Vec<_> = leechers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let (d, desc, dd) = (d.to_path_buf(), desc.clone(), l.data_dir.clone());
            std::thread::spawn(move || {
                shoal(
                    &d,
                    &[
                        "get",
                        &desc,
                        "--data-dir",
                        dd.to_str().unwrap(),
                        "--output",
                        &format!("out{i}"),
                        "--wait",
                        "--timeout",
                        "100s",
                    ],
                    T,
                )
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let want = sha256sum(&d.join("file.bin"));
    let mut from_leechers = 0;
    for (i, l) in leechers.iter().enumerate() {
        assert_eq!(sha256sum(&d.join(format!("out{i}/file.bin"))), want);
        assert!(!d
            .join(format!("out{i}/{}", shoal::storage::files::PARTS_DIR))
            .exists());
        let tor = torrent(d, l);
        assert_eq!(tor["info_hash"], hash);
        assert_eq!(tor["state"], "SEEDING");
        let got: u64 = tor["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pieces_from"].as_u64().unwrap())
            .sum();
        assert!(got >= 64, "leecher {i} counted {got} pieces");
        from_leechers += pieces_from_others(&tor, &[&seeder.peer_id]);
    }
    println!("pieces the leechers got from each other: {from_leechers} of 192");
    assert!(
        from_leechers >= 192 / 10,
        "leechers traded only {from_leechers} pieces among themselves"
    );
    // The seeder's upload counter matches what it was asked for.
    let st = torrent(d, &seeder);
    assert!(st["uploaded"].as_u64().unwrap() >= (192 - from_leechers) * (1 << 20));
}

/// A fake peer that answers GET_METADATA with a forged descriptor; counts who asked.
fn forger(
    hash: String,
    forged_json: Vec<u8>,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a2 = asked.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            // A forger with a key of its own: the handshake proves who it is, not what it says.
            let id = shoal::secure::Identity::generate();
            let Ok(mut s) = crate::common::wire::Wire::accept(s, &id) else {
                continue;
            };
            let hello = json!({"type":"HELLO","v":1,"info_hash":hash,"peer_id":id.peer_id(),"port":addr.port()});
            while let Some((h, _)) = s.read_frame() {
                match h["type"].as_str().unwrap() {
                    "HELLO" => {
                        let _ = s.write(&frame(&hello, &[]));
                    }
                    "GET_METADATA" => {
                        a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = s.write(&frame(
                            &json!({"type":"METADATA","len":forged_json.len()}),
                            &forged_json,
                        ));
                    }
                    _ => {}
                }
            }
        }
    });
    (addr, asked)
}

#[test]
fn it_should_fetch_the_descriptor_by_info_hash_and_not_believe_a_forger() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 8 << 20);
    random_file(&d.join("other.bin"), 1 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (hash, _) = publish(d, &seeder, "file.bin");
    // The forger claims the same info hash but serves another file's descriptor.
    shoal_ok(d, &["create", "other.bin", "-o", "forged.json"], T);
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("forged.json")).unwrap()).unwrap();
    forged["name"] = "file.bin".into();
    let (faddr, asked) = forger(hash.clone(), serde_json::to_vec(&forged).unwrap());
    // It announces itself a seeder of the real hash; re-announce until the leecher asked it.
    let announce_forger = || announce(t.addr, &hash, "forger", faddr.port(), "started", 8, 8);
    announce_forger();
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &hash, "out", "file.bin");
    println!(
        "forger was asked {} times",
        asked.load(std::sync::atomic::Ordering::SeqCst)
    );
    let tor = torrent(d, &leecher);
    assert_eq!(tor["name"], "file.bin");
    assert_eq!(
        tor["length"],
        8 << 20,
        "the forged descriptor (1 MiB) was not used"
    );
    let log = leecher.proc.stderr();
    if asked.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        assert!(
            log.contains("forged descriptor"),
            "the refusal is logged: {log}"
        );
    }
}

#[test]
fn it_should_refuse_a_forged_descriptor_even_when_the_forger_is_the_only_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("other.bin"), 1 << 20);
    shoal_ok(d, &["create", "other.bin", "-o", "forged.json"], T);
    let forged = std::fs::read(d.join("forged.json")).unwrap();
    let hash = "ab".repeat(32);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let (faddr, asked) = forger(hash.clone(), forged);
    announce(t.addr, &hash, "forger", faddr.port(), "started", 1, 1);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &hash, "--output", "out"], T);
    wait_for(Duration::from_secs(20), "the forger to be asked", || {
        (asked.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    });
    wait_for(Duration::from_secs(10), "the refusal in the log", || {
        leecher
            .proc
            .stderr()
            .contains("forged descriptor")
            .then_some(())
    });
    let st = status(d, &leecher.data_dir);
    let torrents = st["torrents"].as_array().unwrap();
    assert_eq!(torrents.len(), 1, "{st}");
    assert_eq!(
        torrents[0]["state"], "FETCHING METADATA",
        "nothing was started from the forgery: {st}"
    );
    assert!(
        !d.join("out/other.bin").exists()
            && !d
                .join("out")
                .join(shoal::storage::files::PARTS_DIR)
                .exists()
    );
    // The pending download can be removed.
    let out = peer_ok(d, &leecher.data_dir, &["remove", &hash], T);
    assert!(out.contains("removed"), "{out}");
    assert!(status(d, &leecher.data_dir)["torrents"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn it_should_finish_when_the_first_tracker_dies_and_let_late_peers_find_the_swarm_through_the_second(
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 16 << 20);
    let mut t1 = start_tracker(d, "t1", &["--interval", "1s"]);
    let t2 = start_tracker(d, "t2", &["--interval", "1s"]);
    // A slow seeder, so the download is still going when the tracker dies.
    let seeder = start_peer(
        d,
        "seeder",
        &[t1.addr, t2.addr],
        &["--sabotage", "delay=40ms"],
    );
    let (hash, desc) = publish(d, &seeder, "file.bin");
    let l1 = start_peer(d, "l1", &[t1.addr, t2.addr], &[]);
    peer_ok(d, &l1.data_dir, &["get", &desc, "--output", "out1"], T);
    wait_for(Duration::from_secs(30), "some progress", || {
        let tor = torrent(d, &l1);
        (tor["have"].as_u64().unwrap_or(0) >= 2).then_some(())
    });
    t1.proc.kill9();
    let have_at_kill = torrent(d, &l1)["have"].as_u64().unwrap();
    assert!(
        have_at_kill < 16,
        "the download finished before the kill; slow the seeder more"
    );
    // A peer that joins now knows both trackers, the first one dead.
    let late = start_peer(d, "late", &[t1.addr, t2.addr], &[]);
    fetch_and_verify(d, &late, &hash, "out2", "file.bin");
    let out = peer_ok(
        d,
        &l1.data_dir,
        &[
            "get",
            &desc,
            "--output",
            "out1",
            "--wait",
            "--timeout",
            "100s",
        ],
        T,
    );
    assert!(out.contains("complete and verified"));
    assert_eq!(
        sha256sum(&d.join("out1/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    let st = status(d, &late.data_dir);
    let trackers = st["trackers"].as_array().unwrap();
    let dead = trackers
        .iter()
        .find(|x| x["addr"] == t1.addr.to_string())
        .expect("first tracker listed");
    assert_eq!(dead["reachable"], false);
    let alive = trackers
        .iter()
        .find(|x| x["addr"] == t2.addr.to_string())
        .expect("second tracker listed");
    assert_eq!(alive["reachable"], true);
}

#[test]
fn it_should_refetch_a_corrupt_piece_from_another_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_good, bad], _, desc) = seeded(
        d,
        16,
        [
            ("good", &[]),
            (
                "bad",
                &["--sabotage", "corrupt=1.0", "--listen", "127.0.0.67:0"],
            ),
        ],
    );
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    let tor = torrent(d, &leecher);
    let rejected = tor["rejected_pieces"].as_u64().unwrap();
    let from_bad = tor["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == bad.peer_id.as_str())
        .cloned();
    println!("rejected {rejected}; saboteur: {from_bad:?}");
    assert!(
        rejected >= 1,
        "no corrupt piece was ever received: the test proves nothing"
    );
    let from_bad = from_bad.expect("the saboteur is known");
    assert_eq!(
        from_bad["pieces_from"], 0,
        "no piece from the saboteur was accepted"
    );
    let failures = from_bad["failures"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&failures),
        "took {failures} corrupt pieces; the ban threshold is 3"
    );
}

#[test]
fn it_should_drop_a_misbehaving_peer_and_go_on_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [mut seeder], hash, desc) = seeded(d, 4, [("seeder", &[])]);
    // Each attacker has a key of its own and a valid channel; what it sends inside is hostile.
    let id = shoal::secure::Identity::generate();
    let me = id.peer_id();
    let hello = |id: &str| json!({"type":"HELLO","v":1,"info_hash":hash,"peer_id":id,"port":1});
    let expect_error = |bytes: Vec<u8>| {
        let mut s = crate::common::wire::Wire::connect(seeder.addr, &id).expect("handshake");
        s.write(&bytes).unwrap();
        // Skip the seeder's own HELLO and BITFIELD; an ERROR (or a close) must follow.
        loop {
            match s.read_frame() {
                None => return,
                Some((h, _)) if h["type"] == "ERROR" => return,
                Some(_) => continue,
            }
        }
    };
    // An oversize header, a piece index out of range, a bitfield of the wrong size, garbage.
    expect_error((1u32 << 30).to_be_bytes().to_vec());
    let mut b = frame(&hello(&me), &[]);
    b.extend(frame(&json!({"type":"REQUEST","index": 999_999}), &[]));
    expect_error(b);
    let mut b = frame(&hello(&me), &[]);
    b.extend(frame(&json!({"type":"BITFIELD","len": 3}), &[1, 2, 3]));
    expect_error(b);
    let mut b = frame(&hello(&me), &[]);
    b.extend(frame(
        &json!({"type":"PIECE","index":0,"len": 17 << 20}),
        &[],
    ));
    expect_error(b);
    expect_error(b"\x00\x00\x00\x05hello".to_vec());
    // Pieces in parts: a part that does not start the piece, one whose total is not the
    // piece's size, and parts of two pieces interleaved (1 MiB pieces here).
    let part = |index: u32, offset: u32, total: u32| {
        frame(
            &json!({"type":"PIECE_PART","index":index,"offset":offset,"total":total,"len":16}),
            &[7u8; 16],
        )
    };
    for parts in [
        vec![part(0, 16, 1 << 20)],
        vec![part(0, 0, 1 << 19)],
        vec![part(0, 0, 1 << 20), part(1, 0, 1 << 20)],
        vec![part(0, 0, 1 << 20), part(0, 32, 1 << 20)],
    ] {
        let mut s = crate::common::wire::Wire::connect(seeder.addr, &id).expect("handshake");
        let mut b = frame(&hello(&me), &[]);
        parts.into_iter().for_each(|p| b.extend(p));
        s.write(&b).unwrap();
        let reason = loop {
            match s.read_frame() {
                Some((h, _)) if h["type"] == "ERROR" => break h["reason"].to_string(),
                Some(_) => {}
                None => panic!("closed without an ERROR"),
            }
        };
        assert!(reason.contains("PIECE_PART"), "{reason}");
    }
    // The daemon is alive and serves a real leecher.
    assert!(
        seeder.proc.child.try_wait().unwrap().is_none(),
        "the seeder died"
    );
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    // A clean stop (SIGTERM) says `stopped` to the tracker.
    assert_eq!(
        seeder
            .proc
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true)
    );
    let swarm = tracker_call(t.addr, json!({"type":"SWARM"}));
    let ids: Vec<&str> = swarm["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&seeder.peer_id.as_str()),
        "stopped peer still in the swarm: {ids:?}"
    );
}
