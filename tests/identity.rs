//! Issue 14: identities nobody can claim, connections nobody can read. Each attack from the
//! issue, played against real daemons on loopback.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shoal::secure::Identity;

use crate::common::wire::Wire;
use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn hello(hash: &str, id: &str) -> serde_json::Value {
    json!({"type":"HELLO","v":1,"info_hash":hash,"peer_id":id,"port":1})
}

#[test]
fn it_should_refuse_a_plaintext_peer_cleanly_and_serve_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [seeder], hash, desc) = seeded(d, 2, [("seeder", &[])]);
    // Today's plaintext protocol: a HELLO frame straight on the socket.
    let mut s = TcpStream::connect(seeder.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(&hello(&hash, "old-client"), &[]))
        .unwrap();
    let (h, _) = read_frame(&mut s).expect("a plain ERROR frame");
    assert_eq!(h["type"], "ERROR", "{h}");
    let reason = h["reason"].as_str().unwrap();
    assert!(
        reason.contains("encrypted"),
        "the reason says why: {reason}"
    );
    assert!(read_frame(&mut s).is_none(), "then the connection closes");
    // Garbage that is neither: closed without a word, and the daemon lives.
    let mut s = TcpStream::connect(seeder.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut b = [0u8; 16];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
}

#[test]
fn it_should_refuse_a_hello_under_another_key_so_nobody_can_squat_or_frame() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [seeder], hash, desc) = seeded(d, 4, [("seeder", &["--sabotage", "delay=50ms"])]);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let attacker = Identity::generate();
    // Framing: dial the leecher as the seeder and send garbage pieces under its name.
    let mut w = Wire::connect(leecher.addr, &attacker).expect("handshake");
    w.write(&frame(&hello(&hash, &seeder.peer_id), &[]))
        .unwrap();
    w.write(&frame(
        &json!({"type":"PIECE","index":0,"len":1 << 20}),
        &vec![0u8; 1 << 20],
    ))
    .unwrap_or(()); // The leecher may close first.
    let (h, _) = w.read_frame().expect("an ERROR");
    assert_eq!(h["type"], "ERROR", "{h}");
    assert!(
        h["reason"].as_str().unwrap().contains("authenticated"),
        "refused because the key is not the one named: {h}"
    );
    // Squatting: hold a connection to the seeder under the leecher's name.
    let mut squat = Wire::connect(seeder.addr, &attacker).expect("handshake");
    squat
        .write(&frame(&hello(&hash, &leecher.peer_id), &[]))
        .unwrap();
    let (h, _) = squat.read_frame().expect("an ERROR");
    assert_eq!(h["type"], "ERROR", "{h}");
    // The real pair is unaffected: the download finishes, nobody is banned.
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    let tor = torrent(d, &leecher);
    let peers = tor["peers"].as_array().unwrap();
    let s = peers
        .iter()
        .find(|p| p["peer_id"] == seeder.peer_id.as_str())
        .expect("the seeder is known");
    assert!(s["banned_until"].is_null(), "the seeder was framed: {s}");
    assert!(s["pieces_from"].as_u64().unwrap() >= 4, "{s}");
    assert_eq!(tor["rejected_pieces"], 0, "no garbage was hashed: {tor}");
}

/// A saboteur host at `from` dialing `target` again and again, each time with a fresh key,
/// answering every REQUEST with garbage. Returns how many connections got past the handshake.
fn rotating_saboteur(
    target: SocketAddr,
    from: IpAddr,
    hash: &str,
    pieces: u32,
    tries: usize,
) -> usize {
    let mut admitted = 0;
    for _ in 0..tries {
        let id = Identity::generate();
        let Ok(mut w) = Wire::connect_from(target, Some(from), &id) else {
            continue; // Refused at accept: the address is banned.
        };
        if w.write(&frame(&hello(hash, &id.peer_id()), &[])).is_err() {
            continue;
        }
        let mut bits = vec![0u8; pieces.div_ceil(8) as usize];
        for i in 0..pieces {
            bits[(i / 8) as usize] |= 0x80 >> (i % 8);
        }
        let mut got_hello = false;
        let _ = w.write(&frame(&json!({"type":"BITFIELD","len":bits.len()}), &bits));
        while let Some((h, _)) = w.read_frame() {
            match h["type"].as_str() {
                Some("HELLO") => got_hello = true,
                Some("REQUEST") => {
                    let junk = vec![0x5a; 1 << 20];
                    let index = h["index"].as_u64().unwrap();
                    let f = frame(&json!({"type":"PIECE","index":index,"len":1 << 20}), &junk);
                    if w.write(&f).is_err() {
                        break;
                    }
                }
                Some("ERROR") => break,
                _ => {}
            }
        }
        admitted += usize::from(got_hello);
    }
    admitted
}

#[test]
fn it_should_ban_the_address_so_rotating_keys_gains_nothing_and_the_ban_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 8 pieces of 1 MiB; the honest seeder is slow, so the saboteur has every chance.
    let (t, [_seeder], hash, desc) = seeded(d, 8, [("seeder", &["--sabotage", "delay=300ms"])]);
    let mut leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let from: IpAddr = "127.0.0.77".parse().unwrap();
    let admitted = rotating_saboteur(leecher.addr, from, &hash, 8, 12);
    let tor = torrent(d, &leecher);
    let rejected = tor["rejected_pieces"].as_u64().unwrap();
    println!("saboteur connections admitted: {admitted}; corrupt pieces taken: {rejected}");
    assert!(
        rejected >= 1,
        "the saboteur got to send garbage at all: {tor}"
    );
    assert!(
        rejected <= 3,
        "12 fresh keys from one address got {rejected} corrupt pieces hashed; the threshold is 3"
    );
    assert!(
        admitted <= 3,
        "admitted {admitted} connections after the ban"
    );
    // The honest download still finishes.
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    // The ban is on disk: after kill -9 and a restart the address is still refused.
    leecher.proc.kill9();
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let again = rotating_saboteur(leecher.addr, from, &hash, 8, 3);
    assert_eq!(again, 0, "the restarted peer forgot the ban");
}

#[test]
fn it_should_neither_use_nor_persist_nor_reserve_a_tracker_list_from_a_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 2 << 20);
    shoal_ok(d, &["create", "file.bin", "-o", "real.json"], T);
    let real: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("real.json")).unwrap()).unwrap();
    let hash = shoal_ok(d, &["show", "real.json", "--json"], T);
    let hash = serde_json::from_str::<serde_json::Value>(&hash).unwrap()["info_hash"]
        .as_str()
        .unwrap()
        .to_string();
    // A honeypot named first in the injected list, and 999 more addresses.
    let honeypot = TcpListener::bind("127.0.0.1:0").unwrap();
    let hp = honeypot.local_addr().unwrap();
    honeypot.set_nonblocking(true).unwrap();
    let mut injected = real.clone();
    let mut list = vec![hp.to_string()];
    list.extend((1..1000).map(|i| format!("127.0.0.1:{}", 40000 + i)));
    injected["trackers"] = json!(list);
    let injected = serde_json::to_vec(&injected).unwrap();
    // The injector serves the real content with its own tracker list.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let iaddr = l.local_addr().unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let a2 = asked.clone();
    let h2 = hash.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let id = Identity::generate();
            let Ok(mut w) = Wire::accept(s, &id) else {
                continue;
            };
            while let Some((h, _)) = w.read_frame() {
                match h["type"].as_str() {
                    Some("HELLO") => {
                        let _ = w.write(&frame(&hello(&h2, &id.peer_id()), &[]));
                    }
                    Some("GET_METADATA") => {
                        a2.fetch_add(1, Ordering::SeqCst);
                        let _ = w.write(&frame(
                            &json!({"type":"METADATA","len":injected.len()}),
                            &injected,
                        ));
                    }
                    _ => {}
                }
            }
        }
    });
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    announce(t.addr, &hash, "injector", iaddr.port(), "started", 2, 2);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &hash, "--output", "out"], T);
    wait_for(T, "the descriptor from the injector", || {
        let tor = torrent(d, &leecher);
        (tor["length"].as_u64() == Some(2 << 20)).then_some(())
    });
    assert!(asked.load(Ordering::SeqCst) > 0);
    // The real seeder comes; the download completes through the leecher's own tracker.
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    publish(d, &seeder, "file.bin");
    let out = get_wait(d, &leecher, &hash, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nobody was sent to the honeypot, and the list is neither kept nor served again.
    assert!(
        honeypot.accept().is_err(),
        "the leecher dialed a tracker it was handed by a peer"
    );
    let st = status(d, &leecher.data_dir);
    let trackers = st["trackers"].to_string();
    assert!(!trackers.contains(&hp.to_string()), "{trackers}");
    let id = Identity::generate();
    let mut w = Wire::connect(leecher.addr, &id).expect("handshake");
    w.write(&frame(&hello(&hash, &id.peer_id()), &[])).unwrap();
    w.write(&frame(&json!({"type":"GET_METADATA"}), &[]))
        .unwrap();
    let served = loop {
        let (h, p) = w.read_frame().expect("METADATA");
        if h["type"] == "METADATA" {
            break serde_json::from_slice::<serde_json::Value>(&p).unwrap();
        }
    };
    assert_eq!(served["name"], "file.bin");
    let served_trackers = served["trackers"].as_array().map_or(0, Vec::len);
    assert_eq!(
        served_trackers, 0,
        "re-served a peer's tracker list: {served}"
    );
}

/// Whether any 256-byte window of `file` appears in `capture`: every such window holds a whole
/// 128-byte block at a multiple of 128 in the file, so looking those blocks up at every offset
/// of the capture is enough.
fn leaks(file: &[u8], capture: &[u8]) -> bool {
    let blocks: HashSet<&[u8]> = file.chunks_exact(128).collect();
    capture.windows(128).any(|w| blocks.contains(w))
}

#[test]
fn it_should_put_no_window_of_the_file_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 4 << 20);
    let file = std::fs::read(d.join("file.bin")).unwrap();
    // The detector finds a window when there is one.
    let mut planted = vec![7u8; 5000];
    planted.extend_from_slice(&file[1000..1256]);
    planted.extend(vec![9u8; 5000]);
    assert!(leaks(&file, &planted));
    // The seeder knows no tracker: the only way to it is the relay the test announces.
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[], &[]);
    let (hash, desc) = publish(d, &seeder, "file.bin");
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let raddr = relay.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
    let c2 = captured.clone();
    let target = seeder.addr;
    std::thread::spawn(move || {
        for s in relay.incoming() {
            let Ok(a) = s else { continue };
            let Ok(b) = TcpStream::connect(target) else {
                continue;
            };
            for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let c = c2.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let mut c = c.lock().unwrap();
                        if c.len() < 64 << 20 {
                            c.extend_from_slice(&buf[..n]);
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    announce(t.addr, &hash, "relay", raddr.port(), "started", 4, 4);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    let capture = captured.lock().unwrap().clone();
    println!("captured {} bytes through the relay", capture.len());
    assert!(
        capture.len() >= file.len(),
        "the transfer went through the relay ({} bytes seen)",
        capture.len()
    );
    assert!(
        !leaks(&file, &capture),
        "a 256-byte window of the file crossed the wire in clear"
    );
}
