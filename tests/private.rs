//! Issue 14: private swarms. The authority publishes with `--private` and names members with
//! `shoal swarm add`; members download, a stranger with a valid key gets nothing, and a
//! revoked member is cut off and refused on its next connection.

use std::time::Duration;

use serde_json::json;
use shoal::secure::Identity;

use crate::common::wire::Wire;
use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn hello(hash: &str, id: &str) -> serde_json::Value {
    json!({"type":"HELLO","v":1,"info_hash":hash,"peer_id":id,"port":1})
}

/// Connect as `id` and say HELLO; the first frame that is not a ROSTER or the HELLO reply
/// tells whether we were let in (BITFIELD) or refused (ERROR).
fn knock(addr: std::net::SocketAddr, hash: &str, id: &Identity) -> serde_json::Value {
    let mut w = Wire::connect(addr, id).expect("handshake");
    w.write(&frame(&hello(hash, &id.peer_id()), &[])).unwrap();
    loop {
        let (h, _) = w.read_frame().expect("an answer");
        if h["type"] != "HELLO" && h["type"] != "ROSTER" {
            return h;
        }
    }
}

#[test]
fn it_should_let_members_in_and_keep_strangers_and_revoked_members_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 4 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let mut authority = start_peer(d, "authority", &[t.addr], &[]);
    let out = peer_ok(
        d,
        &authority.data_dir,
        &["publish", "file.bin", "--private", "--json"],
        T,
    );
    let published = serde_json::from_str::<serde_json::Value>(&out).unwrap();
    let hash = published["info_hash"].as_str().unwrap().to_string();
    // Members join with the descriptor (it names the authority, whose key the info hash covers).
    let desc = published["descriptor"].as_str().unwrap().to_string();
    let member = start_peer(d, "member", &[t.addr], &[]);
    let stranger = start_peer(d, "stranger", &[t.addr], &[]);
    // A member key held by the test, to knock before and after its revocation.
    let later_revoked = Identity::generate();
    let listed = peer_ok(
        d,
        &authority.data_dir,
        &[
            "swarm",
            "add",
            &hash,
            &member.peer_id,
            &later_revoked.peer_id(),
        ],
        T,
    );
    assert!(listed.contains("roster version 1: 2 member(s)"), "{listed}");
    // A member fetches: the tracker lists the authority to it, the authority lets it in.
    let got = get_wait(d, &member, &desc, "member-out");
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(
        sha256sum(&d.join("member-out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    let tor = torrent(d, &member);
    assert_eq!(tor["private"], true, "{tor}");
    assert_eq!(
        tor["roster_version"], 1,
        "the roster reached the member: {tor}"
    );
    let a = tor["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == authority.peer_id.as_str())
        .expect("the authority is a peer of the member")
        .clone();
    assert_eq!(a["member"], true, "{a}");
    assert_eq!(a["fingerprint"], authority.peer_id[..16], "{a}");
    // A stranger with a valid key: no descriptor from anyone, however long it asks.
    peer_ok(
        d,
        &stranger.data_dir,
        &["get", &hash, "--output", "s-out"],
        T,
    );
    std::thread::sleep(Duration::from_secs(4));
    let st = torrent(d, &stranger);
    assert_eq!(st["state"], "FETCHING METADATA", "{st}");
    assert!(!d.join("s-out/file.bin").exists());
    // Knocking by hand: refused before any BITFIELD or METADATA, by the authority and by
    // the member, which learnt the roster.
    let nobody = Identity::generate();
    for peer in [&authority, &member] {
        let h = knock(peer.addr, &hash, &nobody);
        assert_eq!(h["type"], "ERROR", "{h}");
        assert!(
            h["reason"].as_str().unwrap().contains("not a member"),
            "{h}"
        );
    }
    // The member-to-be-revoked is let in, then revoked: refused on its next connection, by
    // the authority and by the member that heard the new roster from it.
    assert_eq!(
        knock(authority.addr, &hash, &later_revoked)["type"],
        "BITFIELD"
    );
    let listed = peer_ok(
        d,
        &authority.data_dir,
        &["swarm", "revoke", &hash, &later_revoked.peer_id()],
        T,
    );
    assert!(listed.contains("roster version 2: 1 member(s)"), "{listed}");
    let h = knock(authority.addr, &hash, &later_revoked);
    assert_eq!(h["type"], "ERROR", "{h}");
    wait_for(T, "the member to learn roster version 2", || {
        (torrent(d, &member)["roster_version"] == 2).then_some(())
    });
    let h = knock(member.addr, &hash, &later_revoked);
    assert_eq!(h["type"], "ERROR", "{h}");
    // Only the authority changes the roster.
    let out = shoal(
        d,
        &[
            "swarm",
            "add",
            &hash,
            &stranger.peer_id,
            "--data-dir",
            member.data_dir.to_str().unwrap(),
        ],
        T,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only the swarm's authority"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The roster is durable: after kill -9 the authority restarts with version 2.
    authority.proc.kill9();
    let authority = start_peer(d, "authority", &[t.addr], &[]);
    let list = peer_ok(d, &authority.data_dir, &["swarm", "list", &hash], T);
    assert!(list.contains("roster version 2"), "{list}");
}

#[test]
fn it_should_keep_public_swarms_working_with_no_extra_step_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, [seeder], hash, _) = seeded(d, 1, [("seeder", &[])]);
    let out = shoal(
        d,
        &[
            "swarm",
            "list",
            &hash,
            "--data-dir",
            seeder.data_dir.to_str().unwrap(),
        ],
        T,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("public swarm"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let anyone = Identity::generate();
    assert_eq!(knock(seeder.addr, &hash, &anyone)["type"], "BITFIELD");
}
