//! The live swarm in memory: the tracker answers every request from here, and each state change
//! comes out as [`Change`]s for the writer to persist. Pure and synchronous, so the rules
//! (roles, events, pruning, per-address caps) are unit-tested without sockets, and time comes in
//! as a [`Now`] so tests drive it with a fake clock.
//!
//! Memory stays bounded by the live swarm: a file whose last peer leaves is dropped from memory
//! (its history stays in the database), and each source address may hold only so many live
//! entries and create only so many files a minute ([`SwarmLimits`]).
//!
//! Layout per file: peers in an `IndexMap` (O(1) lookup and O(numwant) random sampling for PEERS
//! replies, whatever the swarm's size) plus a `BTreeSet` of their ids, the order SWARM pages
//! follow so that a paged listing returns every peer present throughout it exactly once.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Bound;

use indexmap::IndexMap;

use crate::keys;
use crate::proto::{
    escape_control, is_info_hash, Announce, Event, FileEntry, PeerEntry, Role, SwarmEntry,
};
use crate::roster::{private_info_hash, Roster};
use crate::store::{Change, EventRow, PeerRow, PrivateRow, TorrentRow};

/// The window of [`SwarmLimits::max_new_torrents_per_minute`].
const MINUTE_MS: u64 = 60_000;
/// Departed peers whose last `ts` is remembered at most (past it a departure is not
/// remembered, and its old announces could be replayed within the ts window).
const MAX_GONE_TS: usize = 1 << 18;

/// A moment, read once per request from the tracker's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// A monotonic clock in milliseconds: expiry compares these only, so a step of the wall
    /// clock can never expire (or immortalize) the swarm.
    pub mono_ms: u64,
    /// Wall-clock unix milliseconds: what rows record, for admins.
    pub unix_ms: i64,
}

impl Now {
    fn unix_s(self) -> i64 {
        self.unix_ms.div_euclid(1000)
    }
}

/// Bounds a source address cannot pass (so one host cannot fill the tracker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwarmLimits {
    /// Live (file, peer) entries announced from one source address at most.
    pub max_live_per_addr: usize,
    /// Files one source address may bring into the live swarm per minute at most.
    pub max_new_torrents_per_minute: u32,
    /// A heartbeat that changes nothing but `have` and the time is persisted only when the
    /// peer's row is older than this: most heartbeats then cost no database write, and the
    /// database's `have` / `last_seen` lag the live swarm by at most this much. Changes of
    /// state (start, completion, stop, a new address or port) are always written.
    pub persist_every_ms: u64,
}

impl Default for SwarmLimits {
    fn default() -> Self {
        SwarmLimits {
            max_live_per_addr: usize::MAX,
            max_new_torrents_per_minute: u32::MAX,
            persist_every_ms: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Peer {
    /// The address handed to other peers (the source address, or the announced one when
    /// trusted).
    addr: String,
    /// The connection's source address: what the per-address caps count.
    src: IpAddr,
    port: u16,
    have: u64,
    total: u64,
    first_seen: i64,
    last_seen_mono: u64,
    /// When its row was last handed to the writer (monotonic ms).
    persisted_mono: u64,
    /// This peer's PEERS entry, serialized once per announce of its own: a reply is then a
    /// concatenation, not a serialization of every listed peer (the tracker's hottest cost).
    /// Kept inline, so that a reply reads the swarm's entries from one contiguous array.
    entry_json: EntryJson,
    /// The `ts` of its last authenticated announce (0: none): a replay is not above it.
    last_ts: u64,
}

impl Peer {
    fn role(&self) -> Role {
        Role::of(self.have, self.total)
    }

    fn entry_json(peer_id: &str, addr: &str, port: u16, have: u64, total: u64) -> EntryJson {
        let mut e = EntryJson::default();
        e.set(peer_id, addr, port, have, total);
        e
    }
}

/// Bytes of a PEERS entry kept inline in its [`Peer`]: a key's id (64 hex digits), an IPv4
/// address and ordinary counts fit; longer entries go to the heap.
const ENTRY_INLINE: usize = 160;

/// One peer's serialized PEERS entry. Inline, the bytes sit next to the rest of the peer in the
/// swarm's entry array: a heap buffer per peer cost a cache miss per listed peer, and copying
/// the listed entries was the largest part of an announce at 100k live peers.
#[derive(Debug, Clone)]
struct EntryJson {
    len: u8,
    inline: [u8; ENTRY_INLINE],
    heap: Option<Box<[u8]>>,
}

impl Default for EntryJson {
    fn default() -> Self {
        EntryJson {
            len: 0,
            inline: [0; ENTRY_INLINE],
            heap: None,
        }
    }
}

impl EntryJson {
    fn set(&mut self, peer_id: &str, addr: &str, port: u16, have: u64, total: u64) {
        let entry = crate::proto::PeerEntryRef {
            peer_id,
            addr,
            port,
            have,
            total,
        };
        let mut w = std::io::Cursor::new(&mut self.inline[..]);
        match serde_json::to_writer(&mut w, &entry) {
            Ok(()) => {
                // Below ENTRY_INLINE (< 256), so the cast keeps the value.
                #[allow(clippy::cast_possible_truncation)]
                let len = w.position() as u8;
                self.len = len;
                self.heap = None;
            }
            Err(_) => {
                // Too long for the inline buffer (a long id, an IPv6 or announced address).
                self.len = 0;
                self.heap = Some(
                    serde_json::to_vec(&entry)
                        .expect("peer entry serializes")
                        .into_boxed_slice(),
                );
            }
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.heap {
            Some(h) => h,
            None => &self.inline[..usize::from(self.len)],
        }
    }
}

/// How many peers an announce's reply lists at most: `peers` entries, in at most `bytes` bytes
/// of JSON array (a datagram reply has a size limit, a TCP one none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub peers: usize,
    pub bytes: usize,
}

impl From<usize> for Want {
    fn from(peers: usize) -> Want {
        Want {
            peers,
            bytes: usize::MAX,
        }
    }
}

/// Parse the peer list written by [`Swarm::announce`] (tests and tools).
pub fn parse_peer_list(json: &[u8]) -> Vec<PeerEntry> {
    serde_json::from_slice(json).expect("a JSON array of peer entries")
}

#[derive(Debug, Default)]
struct Torrent {
    name: String,
    length: u64,
    peers: IndexMap<String, Peer>,
    /// The peers' ids in order, for paging.
    order: BTreeSet<String>,
    seeders: usize,
}

impl Torrent {
    fn insert(&mut self, id: &str, p: Peer) -> Option<Peer> {
        if p.role() == Role::Seeder {
            self.seeders += 1;
        }
        let old = self.peers.insert(id.to_string(), p);
        match &old {
            Some(o) if o.role() == Role::Seeder => self.seeders -= 1,
            Some(_) => {}
            None => {
                self.order.insert(id.to_string());
            }
        }
        old
    }

    fn remove(&mut self, id: &str) -> Option<Peer> {
        let p = self.peers.swap_remove(id)?;
        self.order.remove(id);
        if p.role() == Role::Seeder {
            self.seeders -= 1;
        }
        Some(p)
    }
}

/// An info hash in binary: a hash-map key compared without chasing a pointer (with `String`
/// keys every probe was a cache miss, the tracker's largest cost at 100k live peers).
type Key = [u8; 32];

/// The key of a 64-hex-digit info hash (either case).
fn key_of(info_hash: &str) -> Option<Key> {
    keys::hex32_any_case(info_hash)
}

/// A swarm proven private: its proof and the newest roster the tracker was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Private {
    pub authority: String,
    pub content: String,
    pub roster: Option<Roster>,
}

impl Private {
    /// The roster version held (0: none yet; then only the authority is admitted).
    pub fn version(&self) -> u64 {
        self.roster.as_ref().map_or(0, |r| r.version)
    }

    pub fn admits(&self, peer_id: &str) -> bool {
        peer_id == self.authority || self.roster.as_ref().is_some_and(|r| r.admits(peer_id))
    }

    fn row(&self, info_hash: &str) -> PrivateRow {
        PrivateRow {
            info_hash: info_hash.to_string(),
            authority: self.authority.clone(),
            content: self.content.clone(),
            version: self.version(),
            roster: self
                .roster
                .as_ref()
                .map(|r| serde_json::to_string(r).expect("rosters serialize")),
        }
    }
}

/// What the tracker checked of an announce before the swarm sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checked {
    /// `Some(ts)`: the announcer proved it holds the key of its id.
    pub ts: Option<u64>,
    /// The announce's `roster` passed [`Roster::verify`].
    pub roster_verified: bool,
}

/// What a PEERS reply for a private swarm adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateReply {
    pub roster_version: u64,
    /// The tracker's roster, when the announcer's is older.
    pub roster: Option<Roster>,
}

#[derive(Debug, Default)]
pub struct Swarm {
    torrents: HashMap<Key, Torrent>,
    /// Swarms proven private (kept for good, like their database rows).
    private: HashMap<Key, Private>,
    /// The last accepted `ts` of (swarm, peer)s that left, so their old announces cannot be
    /// replayed; dropped once the `ts` is out of the window anyway.
    gone_ts: HashMap<(Key, String), u64>,
    /// The same keys in order, for paging FILES and SWARM (hex order is byte order).
    order: BTreeSet<Key>,
    limits: SwarmLimits,
    /// Live entries per source address (absent at zero).
    live_by_src: HashMap<IpAddr, usize>,
    /// Files created per source address in the current minute: (window start, count).
    new_by_src: HashMap<IpAddr, (u64, u32)>,
}

/// Why an announce was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many live entries from {src} (at most {max}); stop some before starting more")]
    TooManyLive { src: IpAddr, max: usize },
    #[error("too many new files from {src} (at most {max} a minute); retry in {retry_s} s")]
    TooManyNewFiles { src: IpAddr, max: u32, retry_s: u64 },
    #[error("replayed or stale announce: ts {ts} is not above {last}, the last accepted for this peer in this swarm")]
    Replay { ts: u64, last: u64 },
    #[error("not a member of private swarm {info_hash}")]
    NotMember { info_hash: String },
    #[error(
        "private swarm {info_hash}: the announce must carry its proof (authority and content)"
    )]
    NoProof { info_hash: String },
    #[error("private swarm {info_hash}: the proof does not match ({why})")]
    BadProof { info_hash: String, why: String },
}

fn decrement(map: &mut HashMap<IpAddr, usize>, src: IpAddr) {
    if let Some(n) = map.get_mut(&src) {
        *n -= 1;
        if *n == 0 {
            map.remove(&src);
        }
    }
}

impl Swarm {
    pub fn new(limits: SwarmLimits) -> Swarm {
        Swarm {
            limits,
            ..Swarm::default()
        }
    }

    /// Rebuild from what the database holds (after a restart, even a `kill -9`). A restored
    /// peer keeps its age as the wall clock says, read once here; from then on the monotonic
    /// clock alone decides when it expires.
    pub fn restore(
        limits: SwarmLimits,
        torrents: Vec<TorrentRow>,
        peers: Vec<PeerRow>,
        privates: Vec<PrivateRow>,
        now: Now,
    ) -> Swarm {
        let mut s = Swarm::new(limits);
        for p in privates {
            let Some(key) = key_of(&p.info_hash) else {
                continue;
            };
            let roster = p.roster.as_deref().and_then(|j| {
                let r: Roster = serde_json::from_str(j).ok()?;
                r.verify().ok()?;
                Some(r)
            });
            s.private.insert(
                key,
                Private {
                    authority: p.authority,
                    content: p.content,
                    roster,
                },
            );
        }
        for t in torrents {
            let Some(key) = key_of(&t.info_hash) else {
                tracing::warn!(info_hash = %t.info_hash, "skipping a file row with a bad info hash");
                continue;
            };
            s.torrents.insert(
                key,
                Torrent {
                    name: escape_control(&t.name),
                    length: t.length,
                    ..Torrent::default()
                },
            );
        }
        for p in peers {
            let age_ms = now
                .unix_ms
                .saturating_sub(p.last_seen.saturating_mul(1000))
                .max(0) as u64;
            let src = p.addr.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let Some(key) = key_of(&p.info_hash) else {
                tracing::warn!(info_hash = %p.info_hash, "skipping a peer row with a bad info hash");
                continue;
            };
            let t = s.torrents.entry(key).or_default();
            let peer = Peer {
                entry_json: Peer::entry_json(&p.peer_id, &p.addr, p.port, p.have, p.total),
                addr: p.addr,
                src,
                port: p.port,
                have: p.have,
                total: p.total,
                first_seen: p.first_seen,
                last_seen_mono: now.mono_ms.saturating_sub(age_ms),
                persisted_mono: now.mono_ms.saturating_sub(age_ms),
                last_ts: 0,
            };
            if t.insert(&p.peer_id, peer).is_none() {
                *s.live_by_src.entry(src).or_default() += 1;
            }
        }
        // Files without a live peer stay in the database only.
        s.torrents.retain(|_, t| !t.peers.is_empty());
        s.order = s.torrents.keys().copied().collect();
        s
    }

    pub fn live_peers(&self) -> usize {
        self.torrents.values().map(|t| t.peers.len()).sum()
    }

    /// Files held in memory (each has at least one live peer).
    pub fn live_torrents(&self) -> usize {
        self.torrents.len()
    }

    /// The roster version held for `info_hash` (0: none, or not private).
    pub fn roster_version(&self, info_hash: &str) -> u64 {
        key_of(info_hash)
            .and_then(|k| self.private.get(&k))
            .map_or(0, Private::version)
    }

    /// The private swarm `info_hash` names, if it is one.
    pub fn private(&self, info_hash: &str) -> Option<&Private> {
        self.private.get(&key_of(info_hash)?)
    }

    /// Apply a validated, normalized announce from source address `src` (`addr` is what other
    /// peers are told), whose author the tracker `checked`; writes up to `numwant` other peers
    /// as a JSON array into `peers_json` and appends the changes to persist to `changes`.
    /// A refused announce changes nothing, except that a valid private-swarm proof makes the
    /// swarm private whoever brought it (persist `changes` either way).
    ///
    /// # Errors
    /// A per-address cap would be passed, a replay, or a private swarm's rules.
    #[allow(clippy::too_many_arguments)]
    pub fn announce(
        &mut self,
        a: &Announce,
        checked: Checked,
        addr: &str,
        src: IpAddr,
        now: Now,
        want: Want,
        changes: &mut Vec<Change>,
        peers_json: &mut Vec<u8>,
    ) -> Result<Option<PrivateReply>, Refusal> {
        let now_s = now.unix_s();
        let event_row = |event: &'static str| {
            Change::Event(EventRow {
                at: now_s,
                info_hash: a.info_hash.clone(),
                peer_id: a.peer_id.clone(),
                addr: addr.to_string(),
                port: a.port,
                event,
                have: a.have,
                total: a.total,
            })
        };
        let Some(key) = key_of(&a.info_hash) else {
            debug_assert!(false, "announce not validated: {}", a.info_hash);
            peers_json.extend_from_slice(b"[]");
            return Ok(None);
        };
        let private = self.check_private(key, a, checked, changes)?;
        // One hash lookup of the peer per announce: its index serves every step below (each
        // lookup hashes the id and chases its key, and there were four).
        let found = self
            .torrents
            .get(&key)
            .map(|t| (t.peers.get_index_of(&a.peer_id), t.peers.len()));
        let idx = found.and_then(|(i, _)| i);
        if let Some(ts) = checked.ts {
            let live = idx.and_then(|i| {
                self.torrents
                    .get(&key)
                    .and_then(|t| t.peers.get_index(i))
                    .map(|(_, p)| p.last_ts)
            });
            let last = live
                .or_else(|| self.gone_ts.get(&(key, a.peer_id.clone())).copied())
                .unwrap_or(0);
            if ts <= last {
                return Err(Refusal::Replay { ts, last });
            }
        }
        if a.event == Event::Stopped {
            if let Some(ts) = checked.ts {
                if self.gone_ts.len() < MAX_GONE_TS {
                    self.gone_ts.insert((key, a.peer_id.clone()), ts);
                }
            }
            if let Some(t) = self.torrents.get_mut(&key) {
                if let Some(p) = t.remove(&a.peer_id) {
                    decrement(&mut self.live_by_src, p.src);
                    changes.push(Change::RemovePeer {
                        info_hash: a.info_hash.clone(),
                        peer_id: a.peer_id.clone(),
                    });
                    changes.push(event_row("stopped"));
                }
                if t.peers.is_empty() {
                    self.torrents.remove(&key);
                    self.order.remove(&key);
                }
            }
            peers_json.extend_from_slice(b"[]");
            return Ok(private);
        }
        let previous_src = idx.and_then(|i| {
            self.torrents
                .get(&key)
                .and_then(|t| t.peers.get_index(i))
                .map(|(_, p)| p.src)
        });
        // Caps apply to what would be new for this source address; refuse before changing
        // anything.
        if previous_src != Some(src) {
            let live = self.live_by_src.get(&src).copied().unwrap_or(0);
            if live >= self.limits.max_live_per_addr {
                return Err(Refusal::TooManyLive {
                    src,
                    max: self.limits.max_live_per_addr,
                });
            }
        }
        if found.is_none() {
            let max = self.limits.max_new_torrents_per_minute;
            let w = self.new_by_src.entry(src).or_insert((now.mono_ms, 0));
            if now.mono_ms.saturating_sub(w.0) >= MINUTE_MS {
                *w = (now.mono_ms, 0);
            }
            if w.1 >= max {
                let retry_s = (w.0 + MINUTE_MS).saturating_sub(now.mono_ms).div_ceil(1000);
                return Err(Refusal::TooManyNewFiles {
                    src,
                    max,
                    retry_s: retry_s.max(1),
                });
            }
            w.1 += 1;
            self.order.insert(key);
        }
        let torrent = self.torrents.entry(key).or_insert_with(|| {
            changes.push(Change::Torrent(TorrentRow {
                info_hash: a.info_hash.clone(),
                name: a.name.clone(),
                length: a.length,
                first_seen: now_s,
            }));
            Torrent {
                name: a.name.clone(),
                length: a.length,
                ..Torrent::default()
            }
        });
        if torrent.name.is_empty() && !a.name.is_empty() {
            // A name learnt after the first announce (a peer that was waiting for metadata):
            // the store fills in a row whose name is still empty.
            torrent.name = a.name.clone();
            torrent.length = a.length;
            changes.push(Change::Torrent(TorrentRow {
                info_hash: a.info_hash.clone(),
                name: a.name.clone(),
                length: a.length,
                first_seen: now_s,
            }));
        }
        let role = Role::of(a.have, a.total);
        let previous = idx
            .and_then(|i| torrent.peers.get_index_mut(i))
            .map(|(_, p)| p);
        let first_seen = previous.as_ref().map_or(now_s, |p| p.first_seen);
        let mut event = true;
        match &previous {
            None => changes.push(event_row("started")),
            // A retried `started` (a peer waiting for metadata, a lost reply) is no new event;
            // a restart that changed where the peer is or what it has is.
            Some(p)
                if a.event == Event::Started
                    && (p.addr != addr
                        || p.port != a.port
                        || p.have != a.have
                        || p.total != a.total) =>
            {
                changes.push(event_row("started"));
            }
            Some(p) if p.role() == Role::Leecher && role == Role::Seeder => {
                changes.push(event_row("completed"));
            }
            Some(_) => event = false,
        }
        let persist = event
            || previous.as_ref().is_none_or(|p| {
                p.addr != addr
                    || p.port != a.port
                    || p.total != a.total
                    || now.mono_ms.saturating_sub(p.persisted_mono) >= self.limits.persist_every_ms
            });
        let persisted_mono = match &previous {
            Some(p) if !persist => p.persisted_mono,
            _ => now.mono_ms,
        };
        if persist {
            changes.push(Change::Peer(PeerRow {
                info_hash: a.info_hash.clone(),
                peer_id: a.peer_id.clone(),
                addr: addr.to_string(),
                port: a.port,
                have: a.have,
                total: a.total,
                role: role.as_str(),
                first_seen,
                last_seen: now_s,
            }));
        }
        if let Some(p) = previous {
            // A heartbeat updates the entry in place: no new key, and the PEERS entry is
            // re-serialized only when it changed.
            let old_role = p.role();
            let old_src = p.src;
            if p.addr != addr || p.port != a.port || p.have != a.have || p.total != a.total {
                if p.addr != addr {
                    p.addr = addr.to_string();
                }
                p.port = a.port;
                p.have = a.have;
                p.total = a.total;
                p.entry_json.set(&a.peer_id, addr, a.port, a.have, a.total);
            }
            p.src = src;
            p.last_ts = checked.ts.unwrap_or(0);
            p.last_seen_mono = now.mono_ms;
            p.persisted_mono = persisted_mono;
            match (old_role, role) {
                (Role::Leecher, Role::Seeder) => torrent.seeders += 1,
                (Role::Seeder, Role::Leecher) => torrent.seeders -= 1,
                _ => {}
            }
            if old_src != src {
                decrement(&mut self.live_by_src, old_src);
                *self.live_by_src.entry(src).or_default() += 1;
            }
        } else {
            torrent.insert(
                &a.peer_id,
                Peer {
                    addr: addr.to_string(),
                    src,
                    port: a.port,
                    have: a.have,
                    total: a.total,
                    first_seen,
                    last_seen_mono: now.mono_ms,
                    persisted_mono,
                    entry_json: Peer::entry_json(&a.peer_id, addr, a.port, a.have, a.total),
                    last_ts: checked.ts.unwrap_or(0),
                },
            );
            *self.live_by_src.entry(src).or_default() += 1;
        }
        // A new peer was appended: its index is the last.
        let me = idx.unwrap_or(torrent.peers.len() - 1);
        write_peers(torrent, me, role, want, peers_json);
        Ok(private)
    }

    /// The private-swarm rules of an announce for `key`: the proof (a valid one makes the swarm
    /// private, dropping its public entries), roster adoption, and membership.
    fn check_private(
        &mut self,
        key: Key,
        a: &Announce,
        checked: Checked,
        changes: &mut Vec<Change>,
    ) -> Result<Option<PrivateReply>, Refusal> {
        let info_hash = || a.info_hash.clone();
        if !self.private.contains_key(&key) {
            let (Some(authority), Some(content)) = (&a.authority, &a.content) else {
                return Ok(None);
            };
            let c = keys::hex32(content).ok_or_else(|| Refusal::BadProof {
                info_hash: info_hash(),
                why: "content is not 64 lower-case hex".into(),
            })?;
            match private_info_hash(&c, authority) {
                Ok(h) if h == key => {}
                Ok(_) => {
                    return Err(Refusal::BadProof {
                        info_hash: info_hash(),
                        why: "the info hash is not the private hash of content and authority"
                            .into(),
                    })
                }
                Err(why) => {
                    return Err(Refusal::BadProof {
                        info_hash: info_hash(),
                        why,
                    })
                }
            }
            // Proven private: whatever was recorded publicly under this hash goes.
            if let Some(t) = self.torrents.remove(&key) {
                self.order.remove(&key);
                for (peer_id, p) in t.peers {
                    decrement(&mut self.live_by_src, p.src);
                    changes.push(Change::RemovePeer {
                        info_hash: info_hash(),
                        peer_id,
                    });
                }
            }
            let p = Private {
                authority: authority.clone(),
                content: content.clone(),
                roster: None,
            };
            changes.push(Change::Private(p.row(&a.info_hash)));
            self.private.insert(key, p);
        }
        let p = self
            .private
            .get_mut(&key)
            .expect("present or inserted above");
        if a.authority.as_ref() != Some(&p.authority) || a.content.as_ref() != Some(&p.content) {
            return Err(match a.authority {
                None => Refusal::NoProof {
                    info_hash: info_hash(),
                },
                Some(_) => Refusal::BadProof {
                    info_hash: info_hash(),
                    why: "another authority or content than the swarm's".into(),
                },
            });
        }
        if let Some(r) = &a.roster {
            if checked.roster_verified
                && r.info_hash == a.info_hash
                && r.authority == p.authority
                && r.version > p.version()
            {
                p.roster = Some(r.clone());
                changes.push(Change::Private(p.row(&a.info_hash)));
                // Revoked members leave the live swarm now, not at their next announce.
                if let Some(t) = self.torrents.get_mut(&key) {
                    let gone: Vec<String> =
                        t.peers.keys().filter(|id| !p.admits(id)).cloned().collect();
                    for id in gone {
                        if let Some(old) = t.remove(&id) {
                            decrement(&mut self.live_by_src, old.src);
                            changes.push(Change::RemovePeer {
                                info_hash: info_hash(),
                                peer_id: id,
                            });
                        }
                    }
                    if t.peers.is_empty() {
                        self.torrents.remove(&key);
                        self.order.remove(&key);
                    }
                }
            }
        }
        if checked.ts.is_none() || !p.admits(&a.peer_id) {
            return Err(Refusal::NotMember {
                info_hash: info_hash(),
            });
        }
        let version = p.version();
        Ok(Some(PrivateReply {
            roster_version: version,
            roster: p
                .roster
                .as_ref()
                .filter(|_| a.roster_version.unwrap_or(0) < version)
                .cloned(),
        }))
    }

    /// Remove every peer not heard from for longer than `ttl_ms` of the monotonic clock, with an
    /// `expired` event each; files left without a peer leave memory.
    pub fn prune(&mut self, now: Now, ttl_ms: u64, changes: &mut Vec<Change>) -> usize {
        let (mut n, mut cursor) = (0, None);
        loop {
            let (k, next) = self.prune_some(now, ttl_ms, cursor, usize::MAX, changes);
            n += k;
            match next {
                Some(c) => cursor = Some(c),
                None => return n,
            }
        }
    }

    /// One step of [`Swarm::prune`]: the files after `cursor` (from the first when `None`), in
    /// order, until about `max_peers` peers were looked at. Returns the peers removed and the
    /// cursor of the next step, `None` when the pass is over (the per-address windows and the
    /// departed peers' `ts` are then cleaned too). In steps, a pass over a million live peers
    /// never holds the swarm for longer than a step.
    pub fn prune_some(
        &mut self,
        now: Now,
        ttl_ms: u64,
        cursor: Option<Key>,
        max_peers: usize,
        changes: &mut Vec<Change>,
    ) -> (usize, Option<Key>) {
        let mut n = 0;
        let mut seen = 0;
        let now_s = now.unix_s();
        let live_by_src = &mut self.live_by_src;
        let mut emptied = Vec::new();
        let lower = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let mut next = None;
        for key in self.order.range((lower, Bound::Unbounded)) {
            if seen >= max_peers {
                break;
            }
            next = Some(*key);
            let Some(t) = self.torrents.get_mut(key) else {
                continue;
            };
            let before = t.peers.len();
            seen += before;
            let mut gone = Vec::new();
            let mut hex_hash: Option<String> = None;
            t.peers.retain(|peer_id, p| {
                if now.mono_ms.saturating_sub(p.last_seen_mono) <= ttl_ms {
                    return true;
                }
                let info_hash = hex_hash.get_or_insert_with(|| hex::encode(key));
                changes.push(Change::RemovePeer {
                    info_hash: info_hash.clone(),
                    peer_id: peer_id.clone(),
                });
                changes.push(Change::Event(EventRow {
                    at: now_s,
                    info_hash: info_hash.clone(),
                    peer_id: peer_id.clone(),
                    addr: p.addr.clone(),
                    port: p.port,
                    event: "expired",
                    have: p.have,
                    total: p.total,
                }));
                gone.push((peer_id.clone(), p.src, p.role(), p.last_ts));
                false
            });
            n += before - t.peers.len();
            if t.peers.is_empty() {
                emptied.push(*key);
            }
            for (id, src, role, last_ts) in gone {
                t.order.remove(&id);
                if last_ts > 0 && self.gone_ts.len() < MAX_GONE_TS {
                    self.gone_ts.insert((*key, id.clone()), last_ts);
                }
                if role == Role::Seeder {
                    t.seeders -= 1;
                }
                decrement(live_by_src, src);
            }
        }
        for key in emptied {
            self.torrents.remove(&key);
            self.order.remove(&key);
        }
        // The pass is over when nothing is left after the last file looked at.
        let more = next.is_some_and(|k| {
            self.order
                .range((Bound::Excluded(k), Bound::Unbounded))
                .next()
                .is_some()
        });
        if more {
            return (n, next);
        }
        self.new_by_src
            .retain(|_, w| now.mono_ms.saturating_sub(w.0) < MINUTE_MS);
        let oldest = (now.unix_ms.max(0) as u64).saturating_sub(crate::auth::TS_WINDOW_MS);
        self.gone_ts.retain(|_, ts| *ts >= oldest);
        (n, None)
    }

    /// One page of the files with a live peer, in info-hash order, starting after the cursor
    /// `after` (an info hash); returns the entries and the cursor of the next page, if any.
    /// A page holds at most `limit` entries and [`crate::proto::PAGE_BUDGET_BYTES`] of JSON.
    ///
    /// # Errors
    /// The cursor is not an info hash.
    pub fn files(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<FileEntry>, Option<String>), String> {
        let lower = match after {
            Some(h) => Bound::Excluded(key_of(h).ok_or("bad FILES cursor")?),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for key in self.order.range((lower, Bound::Unbounded)) {
            if self.private.contains_key(key) {
                continue;
            }
            let t = &self.torrents[key];
            let e = FileEntry {
                info_hash: hex::encode(key),
                name: t.name.clone(),
                length: t.length,
                seeders: t.seeders as u64,
                leechers: (t.peers.len() - t.seeders) as u64,
            };
            bytes += entry_bytes(&e);
            if out.len() >= limit || bytes > crate::proto::PAGE_BUDGET_BYTES {
                let next = out.last().map(|e: &FileEntry| e.info_hash.clone());
                return Ok((out, next));
            }
            out.push(e);
        }
        Ok((out, None))
    }

    /// One page of the live swarm (optionally of one file) in (info hash, peer id) order,
    /// starting after the cursor `after` (64 hex digits of info hash, then the peer id).
    ///
    /// # Errors
    /// The cursor is not one this tracker hands out.
    pub fn swarm(
        &self,
        only: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SwarmEntry>, Option<String>), String> {
        let (start_hash, start_id) = match after {
            Some(c) if c.len() >= 64 && c.is_char_boundary(64) && is_info_hash(&c[..64]) => {
                (key_of(&c[..64]), Some(&c[64..]))
            }
            Some(_) => return Err("bad SWARM cursor".into()),
            None => (None, None),
        };
        let only = match only {
            Some(h) => match key_of(h) {
                Some(k) => Some(k),
                None => return Ok((Vec::new(), None)),
            },
            None => None,
        };
        let lower = match (only, start_hash) {
            (Some(o), Some(h)) => Bound::Included(o.max(h)),
            (Some(o), None) => Bound::Included(o),
            (None, Some(h)) => Bound::Included(h),
            (None, None) => Bound::Unbounded,
        };
        let mut out: Vec<SwarmEntry> = Vec::new();
        let mut bytes = 0;
        for key in self.order.range((lower, Bound::Unbounded)) {
            if only.is_some_and(|o| o != *key) {
                break;
            }
            if self.private.contains_key(key) {
                continue;
            }
            let t = &self.torrents[key];
            let h = hex::encode(key);
            let ids = match start_id {
                Some(id) if start_hash == Some(*key) => t
                    .order
                    .range::<str, _>((Bound::Excluded(id), Bound::Unbounded)),
                _ => t.order.range::<str, _>(..),
            };
            for id in ids {
                let p = &t.peers[id];
                let e = SwarmEntry {
                    info_hash: h.clone(),
                    name: t.name.clone(),
                    peer_id: id.clone(),
                    addr: p.addr.clone(),
                    port: p.port,
                    have: p.have,
                    total: p.total,
                    role: p.role(),
                    fingerprint: keys::fingerprint(id),
                };
                bytes += entry_bytes(&e);
                if out.len() >= limit || bytes > crate::proto::PAGE_BUDGET_BYTES {
                    let next = out.last().map(|l| format!("{}{}", l.info_hash, l.peer_id));
                    return Ok((out, next));
                }
                out.push(e);
            }
        }
        Ok((out, None))
    }
}

/// Serialized size of one listing entry, with its separating comma.
fn entry_bytes(e: &impl serde::Serialize) -> usize {
    serde_json::to_vec(e).map_or(0, |v| v.len()) + 1
}

/// Write up to `numwant` peers of `t` other than `me` (and no seeders for a seeder) as a JSON
/// array. Large swarms are sampled by random index, so the cost follows numwant, not the
/// swarm's size; smaller ones are read in order from a random start (one pass over a
/// contiguous array, and not always the same first peers).
fn write_peers(t: &Torrent, me: usize, role: Role, want: Want, out: &mut Vec<u8>) {
    use rand::Rng;
    let Want {
        peers: numwant,
        bytes,
    } = want;
    // The closing bracket included.
    let end_max = out.len().saturating_add(bytes.max(2)) - 1;
    out.push(b'[');
    // The asker is skipped by its index: comparing ids read every listed peer's id from the
    // heap, a cache miss per listed peer.
    let wanted =
        |(i, p): &(usize, &Peer)| *i != me && !(role == Role::Seeder && p.role() == Role::Seeder);
    let len = t.peers.len();
    // Oversample so that skipping the asker and fellow seeders still fills the reply.
    let draw = (numwant * 4 + 1).min(len);
    let entry = |i: usize| (i, &t.peers[i]);
    let chosen: Box<dyn Iterator<Item = (usize, &Peer)>> = if numwant == 0 || len == 0 {
        Box::new(std::iter::empty())
    } else if draw == len {
        let start = rand::thread_rng().gen_range(0..len);
        Box::new((start..len).chain(0..start).map(entry))
    } else {
        Box::new(
            rand::seq::index::sample(&mut rand::thread_rng(), len, draw)
                .into_iter()
                .map(entry),
        )
    };
    for (i, (_, p)) in chosen.filter(wanted).take(numwant).enumerate() {
        let entry = p.entry_json.as_bytes();
        if out.len() + usize::from(i > 0) + entry.len() > end_max {
            break; // Full: a datagram reply ends here.
        }
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(entry);
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn ann(id: &str, event: Event, have: u64) -> Announce {
        Announce {
            info_hash: "b".repeat(64),
            peer_id: id.into(),
            port: 7000,
            event,
            have,
            total: 4,
            name: "f".into(),
            length: 10,
            numwant: None,
            addr: None,
            ..Announce::default()
        }
    }

    fn at(mono_ms: u64, unix_ms: i64) -> Now {
        Now { mono_ms, unix_ms }
    }

    fn events(changes: &[Change]) -> Vec<&'static str> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Event(e) => Some(e.event),
                _ => None,
            })
            .collect()
    }

    /// Announce from 127.0.0.1 at `t` ms on both clocks.
    fn go(s: &mut Swarm, a: &Announce, t: u64, c: &mut Vec<Change>) -> Vec<PeerEntry> {
        let mut j = Vec::new();
        s.announce(
            a,
            Checked::default(),
            "127.0.0.1",
            LOCAL,
            at(t, t as i64),
            50.into(),
            c,
            &mut j,
        )
        .unwrap();
        parse_peer_list(&j)
    }

    #[test]
    fn it_should_record_changes_of_state_not_heartbeats() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        go(&mut s, &ann("a", Event::Started, 0), 1000, &mut c);
        assert_eq!(events(&c), ["started"]);
        c.clear();
        go(&mut s, &ann("a", Event::Progress, 2), 2000, &mut c);
        assert!(events(&c).is_empty());
        go(&mut s, &ann("a", Event::Completed, 4), 3000, &mut c);
        assert_eq!(events(&c), ["completed"]);
        c.clear();
        go(&mut s, &ann("a", Event::Stopped, 4), 4000, &mut c);
        assert_eq!(events(&c), ["stopped"]);
        assert_eq!(s.live_peers(), 0);
        assert_eq!(
            s.live_torrents(),
            0,
            "a file with no live peer leaves memory"
        );
    }

    fn signed(ts: u64) -> Checked {
        Checked {
            ts: Some(ts),
            roster_verified: false,
        }
    }

    fn try_go(
        s: &mut Swarm,
        a: &Announce,
        ch: Checked,
        t: u64,
    ) -> Result<Option<PrivateReply>, Refusal> {
        let (mut c, mut j) = (Vec::new(), Vec::new());
        s.announce(
            a,
            ch,
            "127.0.0.1",
            LOCAL,
            at(t, t as i64),
            50.into(),
            &mut c,
            &mut j,
        )
    }

    #[test]
    fn it_should_refuse_replays_also_after_a_stop_or_an_expiry() {
        let mut s = Swarm::new(SwarmLimits::default());
        let a = ann("k", Event::Started, 0);
        try_go(&mut s, &a, signed(10), 1).unwrap();
        assert!(matches!(
            try_go(&mut s, &a, signed(10), 2),
            Err(Refusal::Replay { .. })
        ));
        try_go(&mut s, &a, signed(11), 3).unwrap();
        try_go(&mut s, &ann("k", Event::Stopped, 0), signed(12), 4).unwrap();
        assert_eq!(s.live_peers(), 0);
        assert!(matches!(
            try_go(&mut s, &a, signed(11), 5),
            Err(Refusal::Replay { .. })
        ));
        try_go(&mut s, &a, signed(13), 6).unwrap();
        // Expiry keeps the last ts while it is within the window.
        let mut c = Vec::new();
        assert_eq!(s.prune(at(100_000, 20), 1000, &mut c), 1);
        assert!(matches!(
            try_go(&mut s, &a, signed(13), 100_001),
            Err(Refusal::Replay { .. })
        ));
        // Past the window it is forgotten (the window check refuses such a ts anyway).
        s.prune(
            at(100_002, 13 + crate::auth::TS_WINDOW_MS as i64 + 1),
            1000,
            &mut c,
        );
        assert!(s.gone_ts.is_empty());
    }

    #[test]
    fn it_should_keep_private_swarms_to_members_of_the_newest_roster() {
        use ed25519_dalek::SigningKey;
        let auth = SigningKey::generate(&mut rand::rngs::OsRng);
        let aid = hex::encode(auth.verifying_key().to_bytes());
        let member = "ab".repeat(32);
        let content = [5u8; 32];
        let h = hex::encode(private_info_hash(&content, &aid).unwrap());
        let mut s = Swarm::new(SwarmLimits::default());
        let pa = |id: &str| {
            let mut a = ann(id, Event::Started, 0);
            a.info_hash.clone_from(&h);
            a.authority = Some(aid.clone());
            a.content = Some(hex::encode(content));
            a
        };
        // A public entry first, then the proof: the entry goes.
        let mut public = pa("legacy");
        public.authority = None;
        public.content = None;
        try_go(&mut s, &public, Checked::default(), 1).unwrap();
        assert_eq!(s.live_peers(), 1);
        let e = try_go(&mut s, &pa(&member), signed(1), 2).unwrap_err();
        assert_eq!(
            e,
            Refusal::NotMember {
                info_hash: h.clone()
            }
        );
        assert_eq!(s.live_peers(), 0);
        // The authority is admitted; with a roster, so is the member.
        let r = try_go(&mut s, &pa(&aid), signed(1), 3).unwrap().unwrap();
        assert_eq!(r.roster_version, 0);
        let mut with = pa(&aid);
        with.roster = Some(Roster::sign(&auth, &h, 1, vec![member.clone()]));
        // Not verified by the caller: not adopted.
        try_go(&mut s, &with, signed(2), 4).unwrap();
        assert_eq!(s.roster_version(&h), 0);
        let ok = Checked {
            ts: Some(3),
            roster_verified: true,
        };
        try_go(&mut s, &with, ok, 5).unwrap();
        assert_eq!(s.roster_version(&h), 1);
        let r = try_go(&mut s, &pa(&member), signed(2), 6).unwrap().unwrap();
        assert_eq!(r.roster.map(|r| r.version), Some(1));
        assert_eq!(s.live_peers(), 2);
        // Unsigned, or without the proof: refused.
        assert!(try_go(&mut s, &pa(&member), Checked::default(), 7).is_err());
        assert!(matches!(
            try_go(&mut s, &public, signed(9), 7),
            Err(Refusal::NoProof { .. })
        ));
        // Revoked: gone from the live swarm at once, refused after.
        let mut rev = pa(&aid);
        rev.roster = Some(Roster::sign(&auth, &h, 2, vec![]));
        try_go(
            &mut s,
            &rev,
            Checked {
                ts: Some(4),
                roster_verified: true,
            },
            8,
        )
        .unwrap();
        assert_eq!(s.live_peers(), 1);
        assert!(matches!(
            try_go(&mut s, &pa(&member), signed(10), 9),
            Err(Refusal::NotMember { .. })
        ));
        // An older roster never wins.
        let mut old = pa(&aid);
        old.roster = with.roster.clone();
        try_go(
            &mut s,
            &old,
            Checked {
                ts: Some(5),
                roster_verified: true,
            },
            10,
        )
        .unwrap();
        assert_eq!(s.roster_version(&h), 2);
        // Never listed.
        assert!(s.files(None, 100).unwrap().0.is_empty());
        assert!(s.swarm(None, None, 100).unwrap().0.is_empty());
    }

    #[test]
    fn it_should_write_one_started_for_a_retried_started() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        for t in 0..5 {
            go(&mut s, &ann("waiting", Event::Started, 0), t * 1000, &mut c);
        }
        assert_eq!(events(&c), ["started"]);
        // A restart with other pieces is a real change.
        c.clear();
        go(&mut s, &ann("waiting", Event::Started, 2), 6000, &mut c);
        assert_eq!(events(&c), ["started"]);
    }

    #[test]
    fn it_should_never_return_the_asker_and_prune_the_silent() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        go(&mut s, &ann("a", Event::Started, 0), 0, &mut c);
        let mut j = Vec::new();
        let b = IpAddr::from([127, 0, 0, 2]);
        s.announce(
            &ann("b", Event::Started, 4),
            Checked::default(),
            "127.0.0.2",
            b,
            at(0, 0),
            50.into(),
            &mut c,
            &mut j,
        )
        .unwrap();
        let peers = go(&mut s, &ann("a", Event::Progress, 1), 20_000, &mut c);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id, "b");
        assert_eq!(peers[0].addr, "127.0.0.2");
        c.clear();
        assert_eq!(s.prune(at(31_000, 31_000), 30_000, &mut c), 1);
        assert_eq!(events(&c), ["expired"]);
        assert_eq!(s.swarm(None, None, 100).unwrap().0.len(), 1);
        assert_eq!(s.files(None, 100).unwrap().0[0].leechers, 1);
    }

    #[test]
    fn it_should_persist_plain_heartbeats_at_most_once_per_period() {
        let mut s = Swarm::new(SwarmLimits {
            persist_every_ms: 10_000,
            ..SwarmLimits::default()
        });
        let rows = |c: &[Change]| c.iter().filter(|c| matches!(c, Change::Peer(_))).count();
        let mut c = Vec::new();
        go(&mut s, &ann("a", Event::Started, 0), 0, &mut c);
        assert_eq!(rows(&c), 1);
        c.clear();
        for t in 1..10 {
            go(&mut s, &ann("a", Event::Progress, 1), t * 1000, &mut c);
        }
        assert_eq!(rows(&c), 0, "heartbeats within the period write nothing");
        go(&mut s, &ann("a", Event::Progress, 2), 10_000, &mut c);
        assert_eq!(rows(&c), 1);
        // Completion is written at once.
        c.clear();
        go(&mut s, &ann("a", Event::Progress, 4), 11_000, &mut c);
        assert_eq!((rows(&c), events(&c)), (1, vec!["completed"]));
        let f = &s.files(None, 10).unwrap().0[0];
        assert_eq!((f.seeders, f.leechers), (1, 0), "counted in place");
    }

    #[test]
    fn it_should_expire_on_the_monotonic_clock_only() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        let mut j = Vec::new();
        s.announce(
            &ann("a", Event::Started, 0),
            Checked::default(),
            "127.0.0.1",
            LOCAL,
            at(1_000, 1_000_000),
            50.into(),
            &mut c,
            &mut j,
        )
        .unwrap();
        // The wall clock jumps a day ahead, 5 s pass: nobody expires.
        assert_eq!(
            s.prune(at(6_000, 1_000_000 + 86_400_000), 30_000, &mut c),
            0
        );
        // The wall clock steps back an hour, 40 s pass: the peer expires, once.
        assert_eq!(
            s.prune(at(41_001, 1_000_000 - 3_600_000), 30_000, &mut c),
            1
        );
        assert_eq!(s.live_peers(), 0);
    }

    #[test]
    fn it_should_cap_live_entries_and_new_files_per_address() {
        let limits = SwarmLimits {
            max_live_per_addr: 3,
            max_new_torrents_per_minute: 2,
            persist_every_ms: 0,
        };
        let mut s = Swarm::new(limits);
        let mut c = Vec::new();
        let mut j = Vec::new();
        let flood = IpAddr::from([127, 0, 0, 2]);
        let mut a = ann("x", Event::Started, 0);
        let mut send = |s: &mut Swarm, a: &Announce, src, t| {
            j.clear();
            s.announce(
                a,
                Checked::default(),
                "h",
                src,
                at(t, 0),
                50.into(),
                &mut c,
                &mut j,
            )
        };
        // Two new files a minute, the third is refused until the window passes.
        for i in 0..2 {
            a.info_hash = format!("{i:064x}");
            send(&mut s, &a, flood, 0).unwrap();
        }
        a.info_hash = format!("{:064x}", 9);
        let e = send(&mut s, &a, flood, 1_000).unwrap_err();
        assert!(
            matches!(e, Refusal::TooManyNewFiles { retry_s: 59, .. }),
            "{e}"
        );
        // Existing files take more peers, up to the live cap of 3.
        a.info_hash = format!("{:064x}", 0);
        a.peer_id = "y".into();
        send(&mut s, &a, flood, 1_000).unwrap();
        a.peer_id = "z".into();
        assert!(matches!(
            send(&mut s, &a, flood, 1_000),
            Err(Refusal::TooManyLive { max: 3, .. })
        ));
        // A heartbeat of a live entry still passes, and another address is not affected.
        a.peer_id = "y".into();
        a.event = Event::Progress;
        send(&mut s, &a, flood, 2_000).unwrap();
        a.peer_id = "z".into();
        send(&mut s, &a, LOCAL, 2_000).unwrap();
        // After a minute the window reopens; a stop frees a live slot.
        a.info_hash = format!("{:064x}", 9);
        a.peer_id = "x".into();
        assert!(matches!(
            send(&mut s, &a, flood, 61_000),
            Err(Refusal::TooManyLive { .. })
        ));
        let mut stop = ann("y", Event::Stopped, 0);
        stop.info_hash = format!("{:064x}", 0);
        send(&mut s, &stop, flood, 61_000).unwrap();
        send(&mut s, &a, flood, 61_000).unwrap();
        assert_eq!(s.live_peers(), 4);
    }

    #[test]
    fn it_should_page_the_swarm_and_the_files_exactly_once_each() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        let mut a = ann("p", Event::Started, 0);
        let mut want = Vec::new();
        for f in 0..3 {
            a.info_hash = format!("{f:064x}");
            for p in 0..250 {
                a.peer_id = format!("peer-{p}");
                go(&mut s, &a, 0, &mut c);
                want.push((a.info_hash.clone(), a.peer_id.clone()));
            }
        }
        want.sort();
        let mut got = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let (page, next) = s.swarm(None, after.as_deref(), 100).unwrap();
            assert!(page.len() <= 100);
            pages += 1;
            got.extend(page.into_iter().map(|e| (e.info_hash, e.peer_id)));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want);
        assert_eq!(pages, 8);
        // One file only, paged too.
        let one = format!("{:064x}", 1);
        let (p1, next) = s.swarm(Some(&one), None, 200).unwrap();
        let (p2, end) = s.swarm(Some(&one), next.as_deref(), 200).unwrap();
        assert_eq!((p1.len(), p2.len(), end), (200, 50, None));
        assert!(p1.iter().chain(&p2).all(|e| e.info_hash == one));
        let (f1, next) = s.files(None, 2).unwrap();
        let (f2, end) = s.files(next.as_deref(), 2).unwrap();
        assert_eq!((f1.len(), f2.len(), end), (2, 1, None));
        assert!(s.swarm(None, Some("zz"), 10).is_err());
    }

    #[test]
    fn it_should_sample_large_swarms_without_the_asker() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        let mut a = ann("p", Event::Started, 0);
        for p in 0..1000 {
            a.peer_id = format!("peer-{p}");
            go(&mut s, &a, 0, &mut c);
        }
        a.peer_id = "peer-7".into();
        let peers = go(&mut s, &a, 1, &mut c);
        assert_eq!(peers.len(), 50);
        assert!(peers.iter().all(|p| p.peer_id != "peer-7"));
        let ids: std::collections::HashSet<_> = peers.iter().map(|p| &p.peer_id).collect();
        assert_eq!(ids.len(), 50);
    }
}
