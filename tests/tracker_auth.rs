//! Trackers bind peer ids to keys, and keep private swarms to their members: real
//! `shoal tracker run` processes with their default rules (unsigned announces refused), spoken
//! to by the real client with real keys. An attacker is another loopback address (127.0.0.2).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use serde_json::json;
use shoal_tracker::auth::{Signer, SESSION_UNKNOWN};
use shoal_tracker::client::{AnnounceReply, ClientError, DatagramClient, TrackerClient};
use shoal_tracker::proto::{Announce, Event, Request, Response};
use shoal_tracker::roster::{private_info_hash, Roster};

use crate::common::*;

const H: &str = "3333333333333333333333333333333333333333333333333333333333333333";
const WAIT: Duration = Duration::from_secs(20);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

fn db_i64(db: &std::path::Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn ann(info_hash: &str, port: u16, event: Event, have: u64) -> Announce {
    Announce {
        info_hash: info_hash.into(),
        port,
        event,
        have,
        total: 10,
        name: "file.bin".into(),
        length: 10 * 1024,
        ..Announce::default()
    }
}

async fn client_from(t: SocketAddr, ip: [u8; 4]) -> TrackerClient {
    TrackerClient::connect(&t.to_string(), Some(IpAddr::from(ip)), WAIT)
        .await
        .unwrap()
}

fn refused(r: Result<AnnounceReply, ClientError>) -> String {
    match r {
        Err(ClientError::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The live swarm of `h` as SWARM lists it: (peer id, addr, have).
fn live(t: SocketAddr, h: &str) -> Vec<(String, String, u64)> {
    let r = tracker_call(t, json!({"type":"SWARM","info_hash":h}));
    assert_eq!(r["type"], "SWARM", "{r}");
    r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["peer_id"].as_str().unwrap().to_string(),
                p["addr"].as_str().unwrap().to_string(),
                p["have"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn unsigned_announces_are_refused_by_default_and_key_ids_never_unsigned() {
    let dir = tempfile::tempdir().unwrap();
    let strict = start_tracker_strict(dir.path(), "strict", &[]);
    let r = announce(strict.addr, H, "legacy-1", 7000, "started", 0, 10);
    assert_eq!(r["type"], "ERROR", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("unsigned"), "{r}");
    // With --allow-unsigned a legacy id works, a key-shaped one still does not.
    let lax = start_tracker(dir.path(), "lax", &[]);
    let r = announce(lax.addr, H, "legacy-1", 7000, "started", 0, 10);
    assert_eq!(r["type"], "PEERS", "{r}");
    let someone = hex::encode(key().verifying_key().to_bytes());
    for id in [someone.clone(), someone.to_uppercase()] {
        let r = announce(lax.addr, H, &id, 7000, "started", 0, 10);
        assert_eq!(r["type"], "ERROR", "{r}");
        assert!(r["reason"].as_str().unwrap().contains("signed"), "{r}");
    }
    // Nothing of the refused announces was recorded.
    assert!(live(strict.addr, H).is_empty());
    assert_eq!(live(lax.addr, H).len(), 1);
}

#[test]
fn spoofed_stopped_completed_and_address_moves_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker_strict(dir.path(), "t", &[]);
    let seeder = Signer::new(key());
    let attacker = Signer::new(key());
    let sid = seeder.peer_id().to_string();
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        // First announce signed (opens a session), the second with the session's mac.
        c.announce(&ann(H, 7001, Event::Started, 10), Some(&seeder))
            .await
            .unwrap();
        c.announce(&ann(H, 7001, Event::Progress, 10), Some(&seeder))
            .await
            .unwrap();
        let mut evil = client_from(t.addr, [127, 0, 0, 2]).await;
        // Unsigned, with the seeder's id.
        for (event, have) in [(Event::Stopped, 10), (Event::Completed, 10)] {
            let mut a = ann(H, 6666, event, have);
            a.peer_id.clone_from(&sid);
            let r = evil.announce(&a, None).await;
            assert!(refused(r).contains("signed"));
        }
        // Signed by another key, claiming the seeder's id.
        for event in [Event::Stopped, Event::Completed, Event::Started] {
            let mut a = ann(H, 6666, event, 10);
            attacker.authenticate("x", &mut a, true);
            a.peer_id.clone_from(&sid);
            let r = evil.request(&Request::Announce(a)).await;
            match r {
                Err(ClientError::Refused { reason, .. }) => {
                    assert!(reason.contains("signature"), "{reason}")
                }
                other => panic!("spoof accepted: {other:?}"),
            }
        }
        // A mac made up without the session key.
        let mut a = ann(H, 6666, Event::Stopped, 10);
        a.peer_id.clone_from(&sid);
        a.ts = Some(u64::try_from(shoal_now_ms()).unwrap());
        a.mac = Some("00".repeat(32));
        assert!(evil.request(&Request::Announce(a)).await.is_err());
    });
    // The seeder stays, at its own address and port.
    assert_eq!(
        live(t.addr, H),
        vec![(sid.clone(), "127.0.0.1".to_string(), 10)]
    );
    let r = tracker_call(t.addr, json!({"type":"SWARM","info_hash":H}));
    assert_eq!(r["peers"][0]["port"], 7001, "{r}");
    assert_eq!(r["peers"][0]["fingerprint"], sid[..16], "{r}");
    // History names the key by its fingerprint; nothing from the attacker was recorded.
    wait_for(WAIT, "the started row", || {
        (db_i64(&t.db, "SELECT count(*) FROM events") >= 1).then_some(())
    });
    assert_eq!(
        db_i64(
            &t.db,
            &format!(
                "SELECT count(*) FROM events WHERE fingerprint = '{}' AND event = 'started'",
                &sid[..16]
            )
        ),
        1
    );
    assert_eq!(
        db_i64(
            &t.db,
            "SELECT count(*) FROM events WHERE event <> 'started'"
        ),
        0
    );
    assert_eq!(
        db_i64(
            &t.db,
            "SELECT count(*) FROM peers WHERE addr <> '127.0.0.1'"
        ),
        0
    );
}

fn shoal_now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
fn replayed_signed_announces_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker_strict(dir.path(), "t", &[]);
    let peer = Signer::new(key());
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        let mut started = ann(H, 7001, Event::Started, 3);
        peer.authenticate("t", &mut started, true);
        let r = c.request(&Request::Announce(started.clone())).await;
        assert!(matches!(r, Ok(Response::Peers { .. })), "{r:?}");
        // The same bytes again, from anywhere: refused.
        let mut evil = client_from(t.addr, [127, 0, 0, 2]).await;
        let e = evil.request(&Request::Announce(started.clone())).await;
        match e {
            Err(ClientError::Refused { reason, .. }) => {
                assert!(reason.contains("replay"), "{reason}")
            }
            other => panic!("replay accepted: {other:?}"),
        }
        // The peer stops; replaying its earlier `started` does not bring it back.
        let mut stopped = ann(H, 7001, Event::Stopped, 3);
        peer.authenticate("t", &mut stopped, true);
        let r = c.request(&Request::Announce(stopped.clone())).await;
        assert!(matches!(r, Ok(Response::Peers { .. })), "{r:?}");
        for replay in [started, stopped] {
            let e = evil.request(&Request::Announce(replay)).await;
            assert!(matches!(e, Err(ClientError::Refused { .. })), "{e:?}");
        }
        // An announce signed by the right key but far from the tracker's clock is refused.
        use ed25519_dalek::Signer as _;
        let k = key();
        let mut old = ann(H, 7002, Event::Started, 3);
        old.peer_id = hex::encode(k.verifying_key().to_bytes());
        old.ts = Some(u64::try_from(shoal_now_ms()).unwrap() - 10 * 60 * 1000);
        let mut buf = Vec::new();
        shoal_tracker::auth::signing_bytes(&old, &mut buf);
        old.sig = Some(hex::encode(k.sign(&buf).to_bytes()));
        match c.request(&Request::Announce(old)).await {
            Err(ClientError::Refused { reason, .. }) => {
                assert!(reason.contains("clock"), "{reason}")
            }
            other => panic!("stale announce accepted: {other:?}"),
        }
    });
    assert!(live(t.addr, H).is_empty());
}

/// The proof fields of private swarm (content, authority) on an announce.
fn private_ann(h: &str, content: &str, authority: &str, port: u16, have: u64) -> Announce {
    let mut a = ann(h, port, Event::Started, have);
    a.authority = Some(authority.into());
    a.content = Some(content.into());
    a
}

#[test]
fn private_swarms_admit_members_only_and_revocations_stick() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = start_tracker_strict(dir.path(), "t", &[]);
    let (auth_key, member, outsider) = (key(), Signer::new(key()), Signer::new(key()));
    let authority = Signer::new(auth_key.clone());
    let aid = authority.peer_id().to_string();
    let content = [0x42u8; 32];
    let h = hex::encode(private_info_hash(&content, &aid).unwrap());
    let c_hex = hex::encode(content);
    let v1 = Roster::sign(&auth_key, &h, 1, vec![member.peer_id().to_string()]);
    let v2 = Roster::sign(&auth_key, &h, 2, vec![]);
    // A public entry for the same hash, made before anyone proved the swarm private (a legacy
    // tracker would have kept it): it goes when the proof arrives.
    let early = Signer::new(key());
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        c.announce(&ann(&h, 7009, Event::Started, 0), Some(&early))
            .await
            .unwrap();
        assert_eq!(live(t.addr, &h).len(), 1);

        // An outsider with the proof: refused, nothing recorded, and the proof alone makes the
        // swarm private (the early public entry is gone).
        let mut x = client_from(t.addr, [127, 0, 0, 2]).await;
        let r = x
            .announce(&private_ann(&h, &c_hex, &aid, 7002, 0), Some(&outsider))
            .await;
        assert_eq!(refused(r), format!("not a member of private swarm {h}"));

        // The authority seeds and delivers roster v1.
        let mut a = private_ann(&h, &c_hex, &aid, 7000, 10);
        a.roster = Some(v1.clone());
        let r = c.announce(&a, Some(&authority)).await.unwrap();
        assert_eq!(r.roster_version, 1);
        assert!(r.peers.is_empty(), "{r:?}");
        // The member joins, learns the roster from the tracker, and gets the seeder.
        let r = c
            .announce(&private_ann(&h, &c_hex, &aid, 7001, 0), Some(&member))
            .await
            .unwrap();
        assert_eq!(r.roster.as_ref(), Some(&v1));
        assert_eq!(r.peers.len(), 1);
        assert_eq!(r.peers[0].peer_id, aid);
        // Without the proof a member is refused too.
        let r = c
            .announce(&ann(&h, 7001, Event::Progress, 1), Some(&member))
            .await;
        assert!(refused(r).contains("proof"));
        // The outsider, again (with a mac now): no peer list, no row.
        for _ in 0..2 {
            let r = x
                .announce(&private_ann(&h, &c_hex, &aid, 7002, 0), Some(&outsider))
                .await;
            assert!(refused(r).contains("not a member"));
        }
        // A forged roster (signed by the outsider, listing itself) is refused.
        let mut forged = Roster::sign(&key(), &h, 9, vec![outsider.peer_id().to_string()]);
        forged.authority.clone_from(&aid);
        let mut f = private_ann(&h, &c_hex, &aid, 7002, 0);
        f.roster = Some(forged);
        assert!(refused(x.announce(&f, Some(&outsider)).await).contains("roster"));
    });
    // Private swarms are not listed to anyone.
    let r = tracker_call(t.addr, json!({"type":"LIST_FILES"}));
    assert_eq!(r["files"], json!([]), "{r}");
    assert_eq!(live(t.addr, &h), vec![]);
    let r = tracker_call(t.addr, json!({"type":"SWARM"}));
    assert_eq!(r["peers"], json!([]), "{r}");
    // The database holds the authority and the member, never the outsider nor the early entry.
    let row_of = |id: &str| format!("SELECT count(*) FROM peers WHERE peer_id = '{id}'");
    wait_for(WAIT, "the member's row", || {
        (db_i64(&t.db, &row_of(member.peer_id())) == 1).then_some(())
    });
    assert_eq!(db_i64(&t.db, &row_of(&aid)), 1);
    assert_eq!(db_i64(&t.db, &row_of(outsider.peer_id())), 0);
    assert_eq!(db_i64(&t.db, &row_of(early.peer_id())), 0);
    assert_eq!(
        db_i64(
            &t.db,
            &format!(
                "SELECT count(*) FROM events WHERE peer_id = '{}'",
                outsider.peer_id()
            )
        ),
        0
    );
    assert_eq!(
        db_i64(&t.db, "SELECT version FROM private_swarms"),
        1,
        "the roster is persisted"
    );

    // Revocation: roster v2 without the member; its next announce is refused, and it leaves
    // the live swarm at once.
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        let mut a = private_ann(&h, &c_hex, &aid, 7000, 10);
        a.event = Event::Progress;
        a.roster = Some(v2.clone());
        a.roster_version = Some(1);
        let r = c.announce(&a, Some(&authority)).await.unwrap();
        assert_eq!(r.roster_version, 2);
        let r = c
            .announce(&private_ann(&h, &c_hex, &aid, 7001, 1), Some(&member))
            .await;
        assert!(refused(r).contains("not a member"));
    });
    wait_for(WAIT, "the revoked member's row to go", || {
        (db_i64(&t.db, &row_of(member.peer_id())) == 0
            && db_i64(&t.db, "SELECT version FROM private_swarms") == 2)
            .then_some(())
    });
    // After a kill -9 the tracker still knows the swarm is private, and its roster.
    t.proc.kill9();
    let t2 = start_tracker_strict(dir.path(), "t", &[]);
    rt().block_on(async {
        let mut c = client_from(t2.addr, [127, 0, 0, 1]).await;
        let r = c
            .announce(&private_ann(&h, &c_hex, &aid, 7001, 1), Some(&member))
            .await;
        assert!(refused(r).contains("not a member"));
        let r = c
            .announce(&ann(&h, 7003, Event::Started, 0), Some(&early))
            .await;
        assert!(refused(r).contains("proof"));
        let r = c
            .announce(&private_ann(&h, &c_hex, &aid, 7000, 10), Some(&authority))
            .await
            .unwrap();
        assert_eq!(r.roster_version, 2);
    });
}

#[test]
fn daemons_announce_signed_to_a_strict_tracker_and_download() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 1 << 20);
    let t = start_tracker_strict(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    assert!(
        shoal_tracker::keys::is_key(&seeder.peer_id),
        "the peer id is a key: {}",
        seeder.peer_id
    );
    let (hash, _) = publish(d, &seeder, "file.bin");
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &hash, "out", "file.bin");
    // Both are in the tracker's history under their keys' fingerprints.
    for p in [&seeder, &leecher] {
        let sql = format!(
            "SELECT count(*) FROM events WHERE peer_id = '{}' AND fingerprint = '{}'",
            p.peer_id,
            &p.peer_id[..16]
        );
        wait_for(WAIT, "a history row for each peer", || {
            (db_i64(&t.db, &sql) >= 1).then_some(())
        });
    }
    assert_eq!(
        db_i64(&t.db, "SELECT count(*) FROM events WHERE fingerprint = ''"),
        0
    );
}

/// A raw datagram exchange from `from`: the reply's bytes, or `None` after `wait`.
fn datagram(t: SocketAddr, from: [u8; 4], req: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = std::net::UdpSocket::bind((IpAddr::from(from), 0)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.send_to(req, t).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn as_error(reply: &[u8]) -> String {
    match serde_json::from_slice::<Response>(reply) {
        Ok(Response::Error { reason }) => reason,
        other => panic!("expected an ERROR, got {other:?}"),
    }
}

#[test]
fn datagram_heartbeats_need_a_session_opened_from_their_own_address() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker_strict(dir.path(), "t", &[]);
    let tracker = t.addr.to_string();
    let peer = Signer::new(key());
    let quick = Duration::from_secs(5);
    rt().block_on(async {
        // A datagram before any session: refused, and the client says why.
        let mut udp = DatagramClient::connect(&tracker, Some([127, 0, 0, 1].into()), quick)
            .await
            .unwrap();
        let e = udp
            .announce(&ann(H, 7001, Event::Progress, 1), &peer, quick)
            .await;
        assert!(matches!(e, Err(ClientError::NoSession { .. })), "{e:?}");
        // The session is opened over TCP from 127.0.0.1; heartbeats then go as datagrams.
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        c.announce(&ann(H, 7001, Event::Started, 1), Some(&peer))
            .await
            .unwrap();
        assert!(peer.has_session(&tracker));
        for have in [2, 5] {
            let r = udp
                .announce(&ann(H, 7001, Event::Progress, have), &peer, quick)
                .await
                .unwrap();
            assert!(r.peers.is_empty(), "alone in the swarm: {r:?}");
        }
        assert_eq!(
            live(t.addr, H),
            vec![(peer.peer_id().into(), "127.0.0.1".into(), 5)]
        );

        // The exact bytes of a heartbeat: accepted once, a replay after.
        let mut hb = ann(H, 7001, Event::Progress, 6);
        assert!(peer.authenticate(&tracker, &mut hb, false).is_none());
        let bytes = serde_json::to_vec(&Request::Announce(hb.clone())).unwrap();
        let first = datagram(t.addr, [127, 0, 0, 1], &bytes, quick).expect("a reply");
        assert!(matches!(
            serde_json::from_slice::<Response>(&first),
            Ok(Response::Peers { .. })
        ));
        // The reply is authenticated with the session, for this announce only: a forged or
        // replayed reply (a datagram's source is easy to forge) does not verify.
        let ts = hb.ts.unwrap();
        assert!(peer.reply_verifies(&tracker, ts, &first));
        assert!(!peer.reply_verifies(&tracker, ts - 1, &first));
        let forged = String::from_utf8(first.clone())
            .unwrap()
            .replace("\"interval\":", "\"interval\":9");
        assert!(!peer.reply_verifies(&tracker, ts, forged.as_bytes()));
        let again = datagram(t.addr, [127, 0, 0, 1], &bytes, quick).expect("a reply");
        assert!(as_error(&again).contains("replay"), "{}", as_error(&again));
        assert!(
            again.len() <= bytes.len(),
            "an ERROR never outgrows its request"
        );
        // The same session's mac from another address (a forged source, as far as the
        // tracker can tell): refused, in no more bytes than were sent.
        let mut moved = ann(H, 7001, Event::Progress, 7);
        assert!(peer.authenticate(&tracker, &mut moved, false).is_none());
        let bytes = serde_json::to_vec(&Request::Announce(moved)).unwrap();
        let r = datagram(t.addr, [127, 0, 0, 2], &bytes, quick).expect("a reply");
        assert!(
            as_error(&r).starts_with(SESSION_UNKNOWN),
            "{}",
            as_error(&r)
        );
        assert!(r.len() <= bytes.len());
        // A signed announce (a session opening) never comes as a datagram.
        let mut signed = ann(H, 7001, Event::Progress, 8);
        peer.authenticate(&tracker, &mut signed, true);
        let bytes = serde_json::to_vec(&Request::Announce(signed)).unwrap();
        let r = datagram(t.addr, [127, 0, 0, 1], &bytes, quick).expect("a reply");
        assert!(
            as_error(&r).starts_with(SESSION_UNKNOWN),
            "{}",
            as_error(&r)
        );
        assert!(r.len() <= bytes.len());
        // Other requests are refused over UDP; a 21-byte one gets no ERROR, which could not
        // be as short.
        let list =
            serde_json::to_vec(&json!({"type":"LIST_FILES","after":"x".repeat(100)})).unwrap();
        let r = datagram(t.addr, [127, 0, 0, 1], &list, quick).expect("a reply");
        assert!(as_error(&r).contains("only ANNOUNCE"), "{}", as_error(&r));
        let short = br#"{"type":"LIST_FILES"}"#;
        let r = datagram(t.addr, [127, 0, 0, 1], short, Duration::from_millis(500));
        assert!(r.is_none(), "{r:?}");
        // Bytes that are not a request get no answer at all.
        let none = datagram(
            t.addr,
            [127, 0, 0, 1],
            b"hello tracker",
            Duration::from_millis(500),
        );
        assert!(none.is_none(), "{none:?}");
        // Nothing of the refused ones changed the swarm. The client takes an ERROR datagram as
        // a reason to use TCP, not as the truth (anyone can send one with the tracker's
        // address): the session is kept, and TCP still gets a PEERS with it.
        assert_eq!(live(t.addr, H)[0].2, 6);
        let mut elsewhere = DatagramClient::connect(&tracker, Some([127, 0, 0, 2].into()), quick)
            .await
            .unwrap();
        let e = elsewhere
            .announce(&ann(H, 7001, Event::Progress, 9), &peer, quick)
            .await;
        assert!(refused(e).starts_with(SESSION_UNKNOWN));
        assert!(peer.has_session(&tracker));
        c.announce(&ann(H, 7001, Event::Progress, 9), Some(&peer))
            .await
            .unwrap();
        assert_eq!(live(t.addr, H)[0].2, 9);
    });
}

#[test]
fn a_datagram_reply_fits_one_ethernet_frame_however_big_the_swarm() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker_strict(dir.path(), "t", &[]);
    let tracker = t.addr.to_string();
    let quick = Duration::from_secs(5);
    rt().block_on(async {
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        let others: Vec<Signer> = (0..60).map(|_| Signer::new(key())).collect();
        for (i, s) in others.iter().enumerate() {
            c.announce(&ann(H, 8000 + i as u16, Event::Started, 1), Some(s))
                .await
                .unwrap();
        }
        let me = Signer::new(key());
        let tcp = c
            .announce(&ann(H, 7001, Event::Started, 1), Some(&me))
            .await
            .unwrap();
        assert_eq!(tcp.peers.len(), 50, "over TCP: max_peers_per_reply");
        let mut hb = ann(H, 7001, Event::Progress, 2);
        hb.numwant = Some(50);
        assert!(me.authenticate(&tracker, &mut hb, false).is_none());
        let bytes = serde_json::to_vec(&Request::Announce(hb)).unwrap();
        let r = datagram(t.addr, [127, 0, 0, 1], &bytes, quick).expect("a reply");
        assert!(
            r.len() <= shoal_tracker::udp::MAX_REPLY,
            "{} bytes",
            r.len()
        );
        match serde_json::from_slice::<Response>(&r) {
            Ok(Response::Peers { peers, .. }) => {
                assert!((8..50).contains(&peers.len()), "{} peers", peers.len());
                assert!(peers.iter().all(|p| p.peer_id != me.peer_id()));
            }
            other => panic!("{other:?}"),
        }
    });
}

/// `shoal_tracker_datagram_announces_total` and `..._announces_total{event="progress"}` of a
/// tracker's /metrics.
fn heartbeat_counts(http: SocketAddr) -> (u64, u64) {
    let (code, text) = crate::ops::http(http, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    (
        value("shoal_tracker_datagram_announces_total"),
        value("shoal_tracker_announces_total{event=\"progress\"}"),
    )
}

#[test]
fn daemons_send_heartbeats_as_datagrams_and_fall_back_to_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 256 * 1024);
    let start = |name: &str, listen: &str, extra: &[&str]| {
        let db = d.join(format!("{name}.db"));
        let mut args = vec![
            "tracker",
            "run",
            "--listen",
            listen,
            "--db",
            db.to_str().unwrap(),
            "--interval",
            "1s",
            "--http",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let (proc, line) = spawn_with_line(d, name, &args, &[]);
        let addr: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap();
        (proc, addr, crate::ops::http_addr(&line))
    };
    let (mut udp_proc, udp_t, udp_http) = start("with-udp", "127.0.0.1:0", &[]);
    let no_udp = write_config(d, "no-udp.toml", "[tracker]\nudp = false\n");
    let (_tcp_proc, tcp_t, tcp_http) = start("tcp-only", "127.0.0.1:0", &["--config", &no_udp]);
    let seeder = start_peer(d, "seeder", &[udp_t, tcp_t], &[]);
    publish(d, &seeder, "file.bin");
    // Every heartbeat to the first tracker came as a datagram; the second still gets them all,
    // over TCP, once its silence on UDP was noticed.
    let (udp_hb, tcp_hb) = wait_for(WAIT, "three heartbeats at each tracker", || {
        let (dg, progress) = heartbeat_counts(udp_http);
        let (dg2, progress2) = heartbeat_counts(tcp_http);
        (progress >= 3 && progress2 >= 3).then_some(((dg, progress), (dg2, progress2)))
    });
    assert!(udp_hb.0 >= 3, "heartbeats as datagrams: {udp_hb:?}");
    assert!(
        udp_hb.0 + 1 >= udp_hb.1,
        "at most one heartbeat over TCP: {udp_hb:?}"
    );
    assert_eq!(tcp_hb.0, 0);
    let fell_back = |log: &str, t: SocketAddr| {
        log.lines()
            .filter(|l| l.contains("heartbeats go over TCP for a while"))
            .any(|l| l.contains(&t.to_string()))
    };
    assert!(fell_back(&seeder.proc.stderr(), tcp_t));
    // `status` says which trackers get datagrams.
    let st = status(d, &seeder.data_dir);
    let by_udp = |t: SocketAddr| {
        st["trackers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["addr"] == t.to_string())
            .map(|x| x["datagrams"].as_bool().unwrap())
    };
    assert_eq!(
        (by_udp(udp_t), by_udp(tcp_t)),
        (Some(true), Some(false)),
        "{st}"
    );
    // The first tracker dies and comes back on its address (with a new tracker key, so no
    // session): a tracker that answered neither way was down, not filtering UDP, and the
    // heartbeats go back to datagrams once a session is open again.
    udp_proc.kill9();
    std::thread::sleep(Duration::from_millis(2500));
    let (_back, _, back_http) = start("with-udp", &udp_t.to_string(), &[]);
    let again = wait_for(WAIT, "datagram heartbeats to the restarted tracker", || {
        let (dg, progress) = heartbeat_counts(back_http);
        (dg >= 2).then_some((dg, progress))
    });
    assert!(again.0 + 2 >= again.1, "{again:?}");
    assert!(
        !fell_back(&seeder.proc.stderr(), udp_t),
        "{}",
        seeder.proc.stderr()
    );
}

#[test]
fn one_address_flooding_datagrams_is_cut_to_its_rate_and_others_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 100 live entries per address, heart-beating every 10 s: the floor of 1000 datagrams a
    // second per address (a burst of as many) applies.
    let cfg = write_config(d, "t.toml", "[tracker]\nmax_live_per_addr = 100\n");
    let t = start_tracker_strict(d, "t", &["--config", &cfg]);
    // A request that parses and is refused (ERROR fits: the request is long).
    let req = serde_json::to_vec(&json!({"type":"LIST_FILES","after":"x".repeat(100)})).unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(t.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let reader = {
        let sock = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut n = 0u64;
            while sock.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        })
    };
    // 5000 datagrams over about half a second: within the rate, some 1500 at most.
    let t0 = std::time::Instant::now();
    for i in 0..5000u32 {
        sock.send(&req).unwrap();
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Another address is answered at once, meanwhile.
    let other = datagram(t.addr, [127, 0, 0, 2], &req, Duration::from_secs(2));
    assert!(other.is_some(), "127.0.0.2 was not answered");
    let answered = reader.join().unwrap();
    let allowed = 1000.0 + 1000.0 * (secs + 0.1);
    // The upper bound is the point; the lower one only shows the tracker answered (replies can
    // also be lost in this socket's own receive buffer on a loaded machine).
    assert!(
        answered >= 100 && (answered as f64) <= allowed,
        "{answered} of 5000 answered in {secs:.2} s (rate allows {allowed:.0})"
    );
}

#[test]
fn a_forged_datagram_reply_is_ignored_and_the_tracker_s_own_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let t = start_tracker_strict(dir.path(), "t", &[]);
    let quick = Duration::from_secs(5);
    // A relay on another port stands between the client and the tracker: it answers first
    // with a forged PEERS (what an off-path attacker sending with the tracker's address
    // would), then with the tracker's own reply.
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    relay.set_read_timeout(Some(quick)).unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let peer = Signer::new(key());
    rt().block_on(async {
        // The peer's session with the tracker, kept under the relay's address.
        let mut c = client_from(t.addr, [127, 0, 0, 1]).await;
        let mut started = ann(H, 7001, Event::Started, 1);
        let opening = peer.authenticate(&relay_addr, &mut started, true).unwrap();
        match c.request(&Request::Announce(started)).await.unwrap() {
            Response::Peers {
                session: Some(s), ..
            } => peer.opened(&relay_addr, opening, &s),
            other => panic!("{other:?}"),
        }
        let tracker = t.addr;
        let relaying = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let (n, client) = relay.recv_from(&mut buf).unwrap();
            let forged = br#"{"type":"PEERS","interval":3600,"peers":[{"peer_id":"evil","addr":"203.0.113.9","port":1,"have":0,"total":10}]}"#;
            relay.send_to(forged, client).unwrap();
            let upstream = datagram(tracker, [127, 0, 0, 1], &buf[..n], quick).unwrap();
            relay.send_to(&upstream, client).unwrap();
        });
        let mut udp = DatagramClient::connect(&relay_addr, Some([127, 0, 0, 1].into()), quick)
            .await
            .unwrap();
        let r = udp
            .announce(&ann(H, 7001, Event::Progress, 4), &peer, quick)
            .await
            .unwrap();
        relaying.join().unwrap();
        assert_eq!(r.interval, 10, "the tracker's interval, not the forger's");
        assert!(r.peers.is_empty(), "{:?}", r.peers);
    });
    assert_eq!(live(t.addr, H)[0].2, 4);
}
