//! Authenticated announces: who may speak for a peer id.
//!
//! An announce whose `peer_id` is a key (see [`crate::keys`]) carries `ts` and either
//!
//! - `sig`: the key's Ed25519 signature over [`signing_bytes`] (~50 us to verify here), or
//! - `mac`: HMAC-SHA256 of the same bytes under a *session key* the tracker holds for that
//!   peer (~1 us).
//!
//! Sessions: a signed announce may carry `dh`, a fresh X25519 public key of the announcer. The
//! tracker (a static X25519 key made at each start) answers with its own public key in
//! `session`; both sides derive the session key = HMAC-SHA256(X25519 shared secret,
//! "shoal-tracker-session-v1\0" || peer key || dh || tracker key). The channel is clear text,
//! but the session key never crosses it, and `dh` is covered by the peer's signature, so only
//! the key holder can open a session for its id. The tracker keeps at most `max_sessions`
//! (peer key -> session key), evicting at random when full; a `mac` the tracker has no session
//! for is refused with a reason starting [`SESSION_UNKNOWN`], and the client signs again.
//!
//! Replays: `ts` (unix ms) must be within [`TS_WINDOW_MS`] of the tracker's clock, and above the
//! last `ts` accepted for the same (swarm, peer) (checked by [`crate::swarm`]).
//!
//! Unsigned announces are refused unless the tracker runs with `--allow-unsigned`, and even
//! then never for a key-shaped id (64 hex digits): nobody can claim a key's id by spelling it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ed25519_dalek::{Signer as _, SigningKey};
use hmac::{Hmac, Mac};
use indexmap::IndexMap;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::keys;
use crate::proto::{Announce, Event};

/// How far `ts` may be from the tracker's clock.
pub const TS_WINDOW_MS: u64 = 120_000;
/// The start of the refusal a client answers by signing again (its session is gone).
pub const SESSION_UNKNOWN: &str = "session unknown";
const ANNOUNCE_TAG: &[u8] = b"shoal-announce-v1\0";
const SESSION_TAG: &[u8] = b"shoal-tracker-session-v1\0";
const REPLY_TAG: &[u8] = b"shoal-datagram-reply-v1\0";

type HmacSha256 = Hmac<Sha256>;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt32(out: &mut Vec<u8>, s: Option<&String>) {
    match s.and_then(|s| keys::hex32(s)) {
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&b);
        }
        None => out.push(0),
    }
}

/// The bytes a `sig` or `mac` covers, written into `out` (cleared first): the tag
/// "shoal-announce-v1\0", then info_hash (32 bytes; either case is the same hash), peer_id
/// (u32 BE length + UTF-8), port (u16 BE), event (u8: started 0, progress 1, completed 2,
/// stopped 3), have, total, length (u64 BE each), name (u32 BE length + UTF-8, as sent),
/// numwant (u8 presence + u32 BE), addr (u8 presence + u32 BE length + UTF-8), ts (u64 BE),
/// then dh, authority, content (u8 presence + 32 bytes each) and roster_version (u8 presence +
/// u64 BE). Integers big-endian; absent optional fields are one 0 byte. The `roster` object is
/// not covered: it carries the authority's own signature.
pub fn signing_bytes(a: &Announce, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(ANNOUNCE_TAG);
    // Validated before; zeros otherwise.
    out.extend_from_slice(&keys::hex32_any_case(&a.info_hash).unwrap_or_default());
    put_str(out, &a.peer_id);
    out.extend_from_slice(&a.port.to_be_bytes());
    out.push(match a.event {
        Event::Started => 0,
        Event::Progress => 1,
        Event::Completed => 2,
        Event::Stopped => 3,
    });
    for v in [a.have, a.total, a.length] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    put_str(out, &a.name);
    match a.numwant {
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_be_bytes());
        }
        None => out.push(0),
    }
    match &a.addr {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&a.ts.unwrap_or(0).to_be_bytes());
    put_opt32(out, a.dh.as_ref());
    put_opt32(out, a.authority.as_ref());
    put_opt32(out, a.content.as_ref());
    match a.roster_version {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
        None => out.push(0),
    }
}

fn mac_of(key: &[u8; 32], msg: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m
}

fn session_key(shared: &[u8; 32], peer: &[u8; 32], dh: &[u8; 32], tracker: &[u8; 32]) -> [u8; 32] {
    let mut m = mac_of(shared, SESSION_TAG);
    m.update(peer);
    m.update(dh);
    m.update(tracker);
    m.finalize().into_bytes().into()
}

/// What the tracker learnt of an announce's author.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `Some(ts)` when the announcer proved it holds the key of its id.
    pub ts: Option<u64>,
    /// A session to open once the announce is accepted: (peer key, session key).
    pub new_session: Option<([u8; 32], [u8; 32])>,
    /// The key of the session whose `mac` the announce carried (a datagram's reply is
    /// authenticated with it).
    pub session_key: Option<[u8; 32]>,
}

/// The reply authenticator a datagram PEERS reply ends with (`"mac"`, last): HMAC-SHA256 under
/// the session key of "shoal-datagram-reply-v1\0", the announce's `ts`, the reply's `interval`
/// and its `roster_version` (u64 BE each; 0 when absent). A datagram's source is easy to forge,
/// a TCP connection's is not: without it an off-path attacker could answer for the tracker (a
/// far `interval` silences the peer until the tracker expires it). Like a TCP reply, it does not
/// protect the peer list from an attacker on the path (the channel is clear text); it makes any
/// reply from anyone without the session key, or for another announce, fail. It covers a few
/// fields rather than the whole reply: an HMAC of a 1.4 KB reply cost 0.8 us per announce.
pub fn reply_mac(key: &[u8; 32], ts: u64, interval: u64, roster_version: u64) -> [u8; 32] {
    let mut m = mac_of(key, REPLY_TAG);
    for v in [ts, interval, roster_version] {
        m.update(&v.to_be_bytes());
    }
    m.finalize().into_bytes().into()
}

/// Where a datagram reply's `,"mac":"<64 hex>"}` starts, when it ends that way.
fn reply_mac_at(reply: &[u8]) -> Option<usize> {
    const FIELD: &[u8] = b",\"mac\":\"";
    let at = reply.len().checked_sub(FIELD.len() + 64 + 2)?;
    (reply[at..].starts_with(FIELD) && reply.ends_with(b"\"}")).then_some(at)
}

/// The tracker's side: its X25519 key and the session cache.
pub struct Sessions {
    secret: StaticSecret,
    public: [u8; 32],
    public_hex: String,
    map: Mutex<IndexMap<[u8; 32], Session>>,
    cap: usize,
}

/// One open session: its key, and the address of the connection that opened it. A datagram
/// announce is accepted only from that address: TCP's handshake proved the opener can receive
/// there, so a reply to a datagram with a spoofed source never reaches anyone else.
#[derive(Debug, Clone, Copy)]
struct Session {
    key: [u8; 32],
    opener: IpAddr,
}

impl Sessions {
    pub fn new(cap: usize) -> Sessions {
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let public = PublicKey::from(&secret).to_bytes();
        Sessions {
            secret,
            public,
            public_hex: hex::encode(public),
            map: Mutex::new(IndexMap::new()),
            cap: cap.max(1),
        }
    }

    /// The tracker's X25519 public key in hex (the `session` of replies).
    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("sessions poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep a session (after its announce, from `opener`, was accepted), evicting one at random
    /// when full.
    pub fn insert(&self, peer: [u8; 32], key: [u8; 32], opener: IpAddr) {
        let mut m = self.map.lock().expect("sessions poisoned");
        if m.len() >= self.cap && !m.contains_key(&peer) {
            use rand::Rng;
            let i = rand::thread_rng().gen_range(0..m.len());
            m.swap_remove_index(i);
        }
        m.insert(peer, Session { key, opener });
    }

    /// Check who wrote `a` (validated, not yet normalized) at tracker time `now_ms`; `buf` is
    /// scratch space. `datagram_from`: the source of a UDP announce, which must carry the `mac`
    /// of a session opened from that address (signatures and openings stay on TCP).
    ///
    /// # Errors
    /// The refusal to send back.
    pub fn check(
        &self,
        a: &Announce,
        allow_unsigned: bool,
        now_ms: u64,
        buf: &mut Vec<u8>,
        datagram_from: Option<IpAddr>,
    ) -> Result<Verified, String> {
        if datagram_from.is_some() && a.mac.is_none() {
            return Err(format!(
                "{SESSION_UNKNOWN}: a datagram announce needs a session's mac (sign over TCP)"
            ));
        }
        if a.sig.is_none() && a.mac.is_none() {
            if keys::looks_like_key(&a.peer_id) {
                return Err("an announce for a key's peer id must be signed by that key".into());
            }
            if !allow_unsigned {
                return Err("unsigned announces are refused: the peer id must be the announcer's Ed25519 key and the announce signed (this tracker does not run with --allow-unsigned)".into());
            }
            if a.authority.is_some() {
                return Err("a private swarm's announce must be signed".into());
            }
            return Ok(Verified {
                ts: None,
                new_session: None,
                session_key: None,
            });
        }
        let ts = a.ts.expect("validated: sig and mac come with ts");
        if ts.abs_diff(now_ms) > TS_WINDOW_MS {
            return Err(format!(
                "ts {ts} is more than {} s from the tracker's clock ({now_ms}); check the clock",
                TS_WINDOW_MS / 1000
            ));
        }
        let Some(peer) = keys::hex32(&a.peer_id) else {
            return Err(
                "a signed announce's peer_id must be its Ed25519 key (64 lower-case hex)".into(),
            );
        };
        signing_bytes(a, buf);
        if let Some(mac) = &a.mac {
            let session = self
                .map
                .lock()
                .expect("sessions poisoned")
                .get(&peer)
                .copied();
            let Some(Session { key, opener }) = session else {
                return Err(format!(
                    "{SESSION_UNKNOWN}: sign this announce (with dh to open a new session)"
                ));
            };
            if datagram_from.is_some_and(|ip| ip != opener) {
                return Err(format!(
                    "{SESSION_UNKNOWN} for this address: announce over TCP from it"
                ));
            }
            let tag = keys::hex32(mac).expect("validated: mac is 64 hex");
            mac_of(&key, buf)
                .verify_slice(&tag)
                .map_err(|_| "the announce's mac does not verify".to_string())?;
            return Ok(Verified {
                ts: Some(ts),
                new_session: None,
                session_key: Some(key),
            });
        }
        keys::verify(&a.peer_id, buf, a.sig.as_deref().expect("sig or mac"))
            .map_err(|e| format!("announce signature: {e}"))?;
        let new_session = match a.dh.as_deref().and_then(keys::hex32) {
            Some(dh) => {
                let shared = self.secret.diffie_hellman(&PublicKey::from(dh));
                if !shared.was_contributory() {
                    return Err("dh is a low-order point".into());
                }
                Some((
                    peer,
                    session_key(shared.as_bytes(), &peer, &dh, &self.public),
                ))
            }
            None => None,
        };
        Ok(Verified {
            ts: Some(ts),
            new_session,
            session_key: None,
        })
    }
}

/// The client's side: the peer's key, its clock for `ts`, and its sessions per tracker.
pub struct Signer {
    key: SigningKey,
    peer_id: String,
    last_ts: AtomicU64,
    sessions: Mutex<HashMap<String, [u8; 32]>>,
}

/// A session being opened: the secret of the `dh` sent.
pub struct Opening {
    secret: StaticSecret,
    dh: [u8; 32],
}

impl Signer {
    pub fn new(key: SigningKey) -> Signer {
        let peer_id = hex::encode(key.verifying_key().to_bytes());
        Signer {
            key,
            peer_id,
            last_ts: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The peer id: the public key in hex.
    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// Unix ms, strictly above every `ts` this signer gave before (two announces in one
    /// millisecond must not look like a replay).
    fn next_ts(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut last = self.last_ts.load(Ordering::Relaxed);
        loop {
            let ts = now.max(last + 1);
            match self
                .last_ts
                .compare_exchange(last, ts, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return ts,
                Err(l) => last = l,
            }
        }
    }

    /// Authenticate `a` for `tracker`: with the session's mac when one is held (returns
    /// `None`), else signed with a fresh `dh` to open one (returns the [`Opening`] to finish
    /// with [`Signer::opened`]).
    pub fn authenticate(&self, tracker: &str, a: &mut Announce, sign: bool) -> Option<Opening> {
        a.peer_id.clone_from(&self.peer_id);
        a.ts = Some(self.next_ts());
        a.sig = None;
        a.mac = None;
        a.dh = None;
        let session = if sign {
            None
        } else {
            self.sessions
                .lock()
                .expect("sessions poisoned")
                .get(tracker)
                .copied()
        };
        let mut buf = Vec::with_capacity(256);
        if let Some(key) = session {
            signing_bytes(a, &mut buf);
            a.mac = Some(hex::encode(mac_of(&key, &buf).finalize().into_bytes()));
            return None;
        }
        let secret = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let dh = PublicKey::from(&secret).to_bytes();
        a.dh = Some(hex::encode(dh));
        signing_bytes(a, &mut buf);
        a.sig = Some(hex::encode(self.key.sign(&buf).to_bytes()));
        Some(Opening { secret, dh })
    }

    /// Keep the session `tracker` answered an opening with (its `session` key, hex).
    pub fn opened(&self, tracker: &str, opening: Opening, tracker_key: &str) {
        let Some(tk) = keys::hex32(tracker_key) else {
            return;
        };
        let shared = opening.secret.diffie_hellman(&PublicKey::from(tk));
        if !shared.was_contributory() {
            return;
        }
        let peer = self.key.verifying_key().to_bytes();
        let key = session_key(shared.as_bytes(), &peer, &opening.dh, &tk);
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .insert(tracker.to_string(), key);
    }

    /// Whether `reply`, a datagram PEERS from `tracker` to our announce of `ts`, ends with the
    /// authenticator of our session with it ([`reply_mac`]).
    pub fn reply_verifies(&self, tracker: &str, ts: u64, reply: &[u8]) -> bool {
        match serde_json::from_slice(reply) {
            Ok(crate::proto::Response::Peers {
                interval,
                roster_version,
                ..
            }) => self.reply_mac_verifies(tracker, ts, interval, roster_version, reply),
            _ => false,
        }
    }

    /// [`Signer::reply_verifies`] for a reply already parsed: its `interval` and
    /// `roster_version`, and its bytes (for the `mac`).
    pub fn reply_mac_verifies(
        &self,
        tracker: &str,
        ts: u64,
        interval: u64,
        roster_version: Option<u64>,
        reply: &[u8],
    ) -> bool {
        let Some(key) = self
            .sessions
            .lock()
            .expect("sessions poisoned")
            .get(tracker)
            .copied()
        else {
            return false;
        };
        let Some(at) = reply_mac_at(reply) else {
            return false;
        };
        let hex_tag = &reply[at + 8..reply.len() - 2];
        let Some(tag) = std::str::from_utf8(hex_tag).ok().and_then(keys::hex32) else {
            return false;
        };
        let mut m = mac_of(&key, REPLY_TAG);
        for v in [ts, interval, roster_version.unwrap_or(0)] {
            m.update(&v.to_be_bytes());
        }
        m.verify_slice(&tag).is_ok()
    }

    /// Whether a session with `tracker` is held (so an announce to it can go as a datagram).
    pub fn has_session(&self, tracker: &str) -> bool {
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .contains_key(tracker)
    }

    /// Forget `tracker`'s session (it said it has none).
    pub fn forget(&self, tracker: &str) {
        self.sessions
            .lock()
            .expect("sessions poisoned")
            .remove(tracker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn ann() -> Announce {
        Announce {
            info_hash: "ab".repeat(32),
            peer_id: String::new(),
            port: 7000,
            event: Event::Started,
            have: 0,
            total: 4,
            name: "f".into(),
            length: 10,
            numwant: None,
            addr: None,
            ts: None,
            sig: None,
            mac: None,
            dh: None,
            authority: None,
            content: None,
            roster_version: None,
            roster: None,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn signed_then_mac_then_session_loss() {
        let tracker = Sessions::new(10);
        let signer = Signer::new(SigningKey::generate(&mut rand::rngs::OsRng));
        let mut buf = Vec::new();
        let mut a = ann();
        let opening = signer
            .authenticate("t", &mut a, false)
            .expect("no session yet");
        assert!(a.sig.is_some() && a.dh.is_some());
        let v = tracker.check(&a, false, now(), &mut buf, None).unwrap();
        let (peer, key) = v.new_session.unwrap();
        tracker.insert(peer, key, LOCAL);
        signer.opened("t", opening, tracker.public_hex());
        let mut b = ann();
        assert!(signer.authenticate("t", &mut b, false).is_none());
        assert!(b.mac.is_some() && b.sig.is_none());
        assert!(b.ts > a.ts);
        assert!(tracker
            .check(&b, false, now(), &mut buf, None)
            .unwrap()
            .ts
            .is_some());
        // Any change breaks the mac.
        let mut c = b.clone();
        c.event = Event::Stopped;
        assert!(tracker.check(&c, false, now(), &mut buf, None).is_err());
        // A tracker without the session says so.
        let fresh = Sessions::new(10);
        let e = fresh.check(&b, false, now(), &mut buf, None).unwrap_err();
        assert!(e.starts_with(SESSION_UNKNOWN), "{e}");
    }

    #[test]
    fn a_datagram_needs_a_session_opened_from_its_own_address() {
        let tracker = Sessions::new(10);
        let signer = Signer::new(SigningKey::generate(&mut rand::rngs::OsRng));
        let mut buf = Vec::new();
        let mut a = ann();
        let opening = signer.authenticate("t", &mut a, false).unwrap();
        // An opening (signature and dh) never comes as a datagram.
        let e = tracker
            .check(&a, false, now(), &mut buf, Some(LOCAL))
            .unwrap_err();
        assert!(e.starts_with(SESSION_UNKNOWN), "{e}");
        let (peer, key) = tracker
            .check(&a, false, now(), &mut buf, None)
            .unwrap()
            .new_session
            .unwrap();
        tracker.insert(peer, key, LOCAL);
        signer.opened("t", opening, tracker.public_hex());
        assert!(signer.has_session("t") && !signer.has_session("u"));
        let mut b = ann();
        assert!(signer.authenticate("t", &mut b, false).is_none());
        assert!(tracker
            .check(&b, false, now(), &mut buf, Some(LOCAL))
            .is_ok());
        // The same mac from another address: refused, whatever the mac says.
        let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
        let e = tracker
            .check(&b, false, now(), &mut buf, Some(elsewhere))
            .unwrap_err();
        assert!(e.starts_with(SESSION_UNKNOWN), "{e}");
        // Over TCP the address does not matter: the connection is its own proof.
        assert!(tracker.check(&b, false, now(), &mut buf, None).is_ok());
    }

    #[test]
    fn signatures_bind_every_field_and_the_clock() {
        let tracker = Sessions::new(10);
        let signer = Signer::new(SigningKey::generate(&mut rand::rngs::OsRng));
        let mut buf = Vec::new();
        let mut a = ann();
        signer.authenticate("t", &mut a, true);
        assert!(tracker.check(&a, false, now(), &mut buf, None).is_ok());
        let mut b = a.clone();
        b.port = 7001;
        assert!(tracker.check(&b, false, now(), &mut buf, None).is_err());
        let mut b = a.clone();
        b.addr = Some("10.0.0.1".into());
        assert!(tracker.check(&b, false, now(), &mut buf, None).is_err());
        let e = tracker
            .check(&a, false, now() + TS_WINDOW_MS + 1000, &mut buf, None)
            .unwrap_err();
        assert!(e.contains("clock"), "{e}");
        // Another key cannot speak for this id.
        let other = Signer::new(SigningKey::generate(&mut rand::rngs::OsRng));
        let mut b = ann();
        other.authenticate("t", &mut b, true);
        b.peer_id = a.peer_id.clone();
        assert!(tracker.check(&b, false, now(), &mut buf, None).is_err());
    }

    #[test]
    fn unsigned_rules() {
        let tracker = Sessions::new(10);
        let mut buf = Vec::new();
        let mut a = ann();
        a.peer_id = "legacy-1".into();
        assert!(tracker.check(&a, false, now(), &mut buf, None).is_err());
        assert!(tracker.check(&a, true, now(), &mut buf, None).is_ok());
        a.peer_id = "ab".repeat(32);
        assert!(tracker.check(&a, true, now(), &mut buf, None).is_err());
        a.peer_id = "AB".repeat(32);
        assert!(tracker.check(&a, true, now(), &mut buf, None).is_err());
    }

    #[test]
    fn the_cache_is_bounded() {
        let s = Sessions::new(3);
        for i in 0..10u8 {
            s.insert([i; 32], [0; 32], LOCAL);
        }
        assert_eq!(s.len(), 3);
    }
}
