//! The live swarm in memory: the tracker answers every request from here, and each state change
//! comes out as [`Change`]s for the writer to persist. Pure and synchronous, so the rules
//! (roles, events, pruning) are unit-tested without sockets or a clock.

use std::collections::HashMap;

use rand::seq::IteratorRandom;

use crate::proto::{Announce, Event, FileEntry, PeerEntry, Role, SwarmEntry};
use crate::store::{Change, EventRow, PeerRow, TorrentRow};

#[derive(Debug, Clone)]
struct Peer {
    addr: String,
    port: u16,
    have: u64,
    total: u64,
    first_seen: i64,
    /// Unix milliseconds; pruning compares it with the TTL.
    last_seen_ms: i64,
    /// This peer's PEERS entry, serialized once per announce of its own: a reply is then a
    /// concatenation, not a serialization of every listed peer (the tracker's hottest cost).
    entry_json: Vec<u8>,
}

impl Peer {
    fn role(&self) -> Role {
        Role::of(self.have, self.total)
    }

    fn new(
        peer_id: &str,
        addr: String,
        port: u16,
        have: u64,
        total: u64,
        first_seen: i64,
        last_seen_ms: i64,
    ) -> Peer {
        let entry_json = serde_json::to_vec(&PeerEntry {
            peer_id: peer_id.to_string(),
            addr: addr.clone(),
            port,
            have,
            total,
        })
        .expect("peer entry serializes");
        Peer {
            addr,
            port,
            have,
            total,
            first_seen,
            last_seen_ms,
            entry_json,
        }
    }
}

/// Parse the peer list written by [`Swarm::announce`] (tests and tools).
pub fn parse_peer_list(json: &[u8]) -> Vec<PeerEntry> {
    serde_json::from_slice(json).expect("a JSON array of peer entries")
}

#[derive(Debug)]
struct Torrent {
    name: String,
    length: u64,
    peers: HashMap<String, Peer>,
}

#[derive(Debug, Default)]
pub struct Swarm {
    torrents: HashMap<String, Torrent>,
}

impl Swarm {
    /// Rebuild from what the database holds (after a restart, even a `kill -9`).
    pub fn restore(torrents: Vec<TorrentRow>, peers: Vec<PeerRow>) -> Swarm {
        let mut s = Swarm::default();
        for t in torrents {
            s.torrents.insert(
                t.info_hash,
                Torrent {
                    name: t.name,
                    length: t.length,
                    peers: HashMap::new(),
                },
            );
        }
        for p in peers {
            let t = s.torrents.entry(p.info_hash).or_insert_with(|| Torrent {
                name: String::new(),
                length: 0,
                peers: HashMap::new(),
            });
            let peer = Peer::new(
                &p.peer_id,
                p.addr,
                p.port,
                p.have,
                p.total,
                p.first_seen,
                p.last_seen.saturating_mul(1000),
            );
            t.peers.insert(p.peer_id, peer);
        }
        s
    }

    pub fn live_peers(&self) -> usize {
        self.torrents.values().map(|t| t.peers.len()).sum()
    }

    /// Apply an announce from `addr`; writes up to `numwant` other peers as a JSON array into
    /// `peers_json` and appends the changes to persist to `changes`.
    pub fn announce(
        &mut self,
        a: &Announce,
        addr: &str,
        now_ms: i64,
        numwant: usize,
        changes: &mut Vec<Change>,
        peers_json: &mut Vec<u8>,
    ) {
        peers_json.push(b'[');
        let now = now_ms / 1000;
        let torrent = self.torrents.entry(a.info_hash.clone()).or_insert_with(|| {
            changes.push(Change::Torrent(TorrentRow {
                info_hash: a.info_hash.clone(),
                name: a.name.clone(),
                length: a.length,
                first_seen: now,
            }));
            Torrent {
                name: a.name.clone(),
                length: a.length,
                peers: HashMap::new(),
            }
        });
        if torrent.name.is_empty() && !a.name.is_empty() {
            torrent.name = a.name.clone();
            torrent.length = a.length;
        }
        let event_row = |event: &'static str| {
            Change::Event(EventRow {
                at: now,
                info_hash: a.info_hash.clone(),
                peer_id: a.peer_id.clone(),
                addr: addr.to_string(),
                port: a.port,
                event,
                have: a.have,
                total: a.total,
            })
        };
        if a.event == Event::Stopped {
            if torrent.peers.remove(&a.peer_id).is_some() {
                changes.push(Change::RemovePeer {
                    info_hash: a.info_hash.clone(),
                    peer_id: a.peer_id.clone(),
                });
                changes.push(event_row("stopped"));
            }
            peers_json.push(b']');
            return;
        }
        let previous_role = torrent.peers.get(&a.peer_id).map(Peer::role);
        let first_seen = torrent.peers.get(&a.peer_id).map_or(now, |p| p.first_seen);
        let peer = Peer::new(
            &a.peer_id,
            addr.to_string(),
            a.port,
            a.have,
            a.total,
            first_seen,
            now_ms,
        );
        let role = peer.role();
        match previous_role {
            None => changes.push(event_row("started")),
            Some(_) if a.event == Event::Started => changes.push(event_row("started")),
            Some(Role::Leecher) if role == Role::Seeder => changes.push(event_row("completed")),
            Some(_) => {}
        }
        changes.push(Change::Peer(PeerRow {
            info_hash: a.info_hash.clone(),
            peer_id: a.peer_id.clone(),
            addr: peer.addr.clone(),
            port: peer.port,
            have: peer.have,
            total: peer.total,
            role: role.as_str(),
            first_seen,
            last_seen: now,
        }));
        torrent.peers.insert(a.peer_id.clone(), peer);
        // A seeder has no use for other seeders.
        let wanted = |id: &String, p: &Peer| {
            *id != a.peer_id && !(role == Role::Seeder && p.role() == Role::Seeder)
        };
        if numwant > 0 {
            let candidates = torrent.peers.iter().filter(|(id, p)| wanted(id, p));
            let chosen: Vec<(&String, &Peer)> = if torrent.peers.len() <= numwant + 1 {
                candidates.collect()
            } else {
                candidates.choose_multiple(&mut rand::thread_rng(), numwant)
            };
            for (i, (_, p)) in chosen.into_iter().enumerate() {
                if i > 0 {
                    peers_json.push(b',');
                }
                peers_json.extend_from_slice(&p.entry_json);
            }
        }
        peers_json.push(b']');
    }

    /// Remove every peer last heard from before `now_ms - ttl_ms`, with an `expired` event each.
    pub fn prune(&mut self, now_ms: i64, ttl_ms: i64, changes: &mut Vec<Change>) -> usize {
        let mut n = 0;
        for (info_hash, t) in &mut self.torrents {
            t.peers.retain(|peer_id, p| {
                if now_ms - p.last_seen_ms <= ttl_ms {
                    return true;
                }
                n += 1;
                changes.push(Change::RemovePeer {
                    info_hash: info_hash.clone(),
                    peer_id: peer_id.clone(),
                });
                changes.push(Change::Event(EventRow {
                    at: now_ms / 1000,
                    info_hash: info_hash.clone(),
                    peer_id: peer_id.clone(),
                    addr: p.addr.clone(),
                    port: p.port,
                    event: "expired",
                    have: p.have,
                    total: p.total,
                }));
                false
            });
        }
        n
    }

    /// Every file with at least one live peer.
    pub fn files(&self) -> Vec<FileEntry> {
        let mut files: Vec<FileEntry> = self
            .torrents
            .iter()
            .filter(|(_, t)| !t.peers.is_empty())
            .map(|(h, t)| {
                let seeders = t
                    .peers
                    .values()
                    .filter(|p| p.role() == Role::Seeder)
                    .count() as u64;
                FileEntry {
                    info_hash: h.clone(),
                    name: t.name.clone(),
                    length: t.length,
                    seeders,
                    leechers: t.peers.len() as u64 - seeders,
                }
            })
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name).then(a.info_hash.cmp(&b.info_hash)));
        files
    }

    /// The live swarm, optionally of one file.
    pub fn swarm(&self, only: Option<&str>) -> Vec<SwarmEntry> {
        let mut out = Vec::new();
        for (h, t) in &self.torrents {
            if only.is_some_and(|o| o != h) {
                continue;
            }
            for (id, p) in &t.peers {
                out.push(SwarmEntry {
                    info_hash: h.clone(),
                    name: t.name.clone(),
                    peer_id: id.clone(),
                    addr: p.addr.clone(),
                    port: p.port,
                    have: p.have,
                    total: p.total,
                    role: p.role(),
                });
            }
        }
        out.sort_by(|a, b| {
            (&a.name, &a.info_hash, &a.addr, a.port).cmp(&(&b.name, &b.info_hash, &b.addr, b.port))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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

    #[test]
    fn it_should_record_changes_of_state_not_heartbeats() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        let mut j = Vec::new();
        let local = "127.0.0.1";
        s.announce(
            &ann("a", Event::Started, 0),
            local,
            1000,
            50,
            &mut c,
            &mut j,
        );
        assert_eq!(events(&c), ["started"]);
        c.clear();
        s.announce(
            &ann("a", Event::Progress, 2),
            local,
            2000,
            50,
            &mut c,
            &mut j,
        );
        assert!(events(&c).is_empty());
        s.announce(
            &ann("a", Event::Completed, 4),
            local,
            3000,
            50,
            &mut c,
            &mut j,
        );
        assert_eq!(events(&c), ["completed"]);
        c.clear();
        s.announce(
            &ann("a", Event::Stopped, 4),
            local,
            4000,
            50,
            &mut c,
            &mut j,
        );
        assert_eq!(events(&c), ["stopped"]);
        assert_eq!(s.live_peers(), 0);
    }

    #[test]
    fn it_should_never_return_the_asker_and_prune_the_silent() {
        let mut s = Swarm::default();
        let mut c = Vec::new();
        let mut j = Vec::new();
        s.announce(
            &ann("a", Event::Started, 0),
            "127.0.0.1",
            0,
            50,
            &mut c,
            &mut j,
        );
        j.clear();
        s.announce(
            &ann("b", Event::Started, 4),
            "127.0.0.2",
            0,
            50,
            &mut c,
            &mut j,
        );
        j.clear();
        s.announce(
            &ann("a", Event::Progress, 1),
            "127.0.0.1",
            20_000,
            50,
            &mut c,
            &mut j,
        );
        let peers = parse_peer_list(&j);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer_id, "b");
        assert_eq!(peers[0].addr, "127.0.0.2");
        c.clear();
        assert_eq!(s.prune(31_000, 30_000, &mut c), 1);
        assert_eq!(events(&c), ["expired"]);
        assert_eq!(s.swarm(None).len(), 1);
        assert_eq!(s.files()[0].leechers, 1);
    }
}
