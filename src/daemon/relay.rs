//! Cut-through relay: a piece still arriving here is passed on as its parts land.
//!
//! Store-and-forward idles the swarm on limited links: a 1 MiB piece must arrive whole before
//! anyone can pass it on, so in a super-seeder's first round every leecher's downlink carries
//! only its share of the seeder's uplink (an eighth of it for 0.67 s with 8 leechers at
//! 100 Mbit/s), and each hop of a piece adds a whole piece's time.
//!
//! A connection receiving a piece it asked for publishes it here as an [`Inbound`]; peers are
//! told RECEIVING, and a connection whose peer then asks for the piece streams its parts as
//! they come ([`Relay::subscribe`]). The last part goes out only once the whole piece has
//! passed its hash here: a relay never vouches for a piece it has not verified, and the
//! receiver checks the hash again (and bans a relay whose piece fails, as any sender). A piece
//! that fails here, or whose sender goes away, ends every stream of it with a REJECT.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

/// Pieces published at once at most. Each is a piece this peer asked for and is receiving,
/// which the pipelines already bound; this caps the map whatever they do.
pub const MAX_RELAYS: usize = 256;

/// What a relayed piece has so far.
#[derive(Debug, Default)]
pub struct RelayState {
    /// The parts received so far, in order from offset 0.
    pub parts: Vec<Bytes>,
    /// `Some(true)`: the whole piece passed its hash (its last part may go out);
    /// `Some(false)`: it failed or its sender went away (streams of it end).
    pub outcome: Option<bool>,
}

/// One piece being received, shared with the connections streaming it.
#[derive(Debug)]
pub struct Relay {
    tx: watch::Sender<RelayState>,
}

impl Relay {
    pub fn subscribe(&self) -> watch::Receiver<RelayState> {
        self.tx.subscribe()
    }
}

/// The pieces of one torrent being received and open to relay.
#[derive(Debug, Default)]
pub struct Relays {
    map: Mutex<HashMap<u32, Arc<Relay>>>,
}

impl Relays {
    /// Publish piece `index` as being received; `None` if it already is (endgame: another
    /// connection's copy is the one relayed) or the cap is reached.
    pub fn begin(self: &Arc<Self>, index: u32) -> Option<Inbound> {
        let mut map = self.map.lock().expect("relays lock");
        if map.contains_key(&index) || map.len() >= MAX_RELAYS {
            return None;
        }
        let (tx, _) = watch::channel(RelayState::default());
        let relay = Arc::new(Relay { tx });
        map.insert(index, relay.clone());
        Some(Inbound {
            relays: self.clone(),
            index,
            relay,
            verified: false,
        })
    }

    /// The piece being received as `index`, if it is and has not failed.
    pub fn get(&self, index: u32) -> Option<Arc<Relay>> {
        self.map.lock().expect("relays lock").get(&index).cloned()
    }

    /// The piece is written (it is served from the file now) or failed: unpublish it.
    /// Streams already under way keep their handle.
    pub fn remove(&self, index: u32, relay: &Arc<Relay>) {
        let mut map = self.map.lock().expect("relays lock");
        if map.get(&index).is_some_and(|r| Arc::ptr_eq(r, relay)) {
            map.remove(&index);
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("relays lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The receiving side of a published piece. Dropped before [`Inbound::verified`], the piece
/// counts as failed: its streams end and it is unpublished.
#[derive(Debug)]
pub struct Inbound {
    relays: Arc<Relays>,
    index: u32,
    relay: Arc<Relay>,
    verified: bool,
}

impl Inbound {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The next part, in order.
    pub fn push(&self, part: Bytes) {
        self.relay.tx.send_modify(|s| s.parts.push(part));
    }

    /// The whole piece passed its hash: streams may send its last part. It stays published
    /// until the [`Written`] is dropped (after the write, when the file serves it).
    pub fn verified(mut self) -> Written {
        self.verified = true;
        self.relay.tx.send_modify(|s| s.outcome = Some(true));
        Written {
            relays: self.relays.clone(),
            index: self.index,
            relay: self.relay.clone(),
        }
    }
}

impl Drop for Inbound {
    fn drop(&mut self) {
        if !self.verified {
            self.relay.tx.send_modify(|s| s.outcome = Some(false));
            self.relays.remove(self.index, &self.relay);
        }
    }
}

/// A verified relayed piece on its way to the file.
#[derive(Debug)]
pub struct Written {
    relays: Arc<Relays>,
    index: u32,
    relay: Arc<Relay>,
}

/// Dropped once the piece is in the file (or never will be): unpublished.
impl Drop for Written {
    fn drop(&mut self) {
        self.relays.remove(self.index, &self.relay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_publish_a_piece_once_and_fail_it_when_its_receiver_goes() {
        let relays = Arc::new(Relays::default());
        let inbound = relays.begin(3).expect("first");
        assert!(relays.begin(3).is_none(), "one relay per piece");
        let relay = relays.get(3).expect("published");
        let rx = relay.subscribe();
        inbound.push(Bytes::from_static(b"ab"));
        assert_eq!(rx.borrow().parts.len(), 1);
        assert_eq!(rx.borrow().outcome, None);
        drop(inbound);
        assert_eq!(
            rx.borrow().outcome,
            Some(false),
            "a dropped receiver fails its streams"
        );
        assert!(relays.get(3).is_none(), "and unpublishes the piece");
        assert!(relays.begin(3).is_some(), "which may be published again");
    }

    #[test]
    fn it_should_keep_a_verified_piece_published_until_it_is_written() {
        let relays = Arc::new(Relays::default());
        let inbound = relays.begin(7).expect("first");
        let rx = relays.get(7).expect("published").subscribe();
        inbound.push(Bytes::from_static(b"x"));
        let written = inbound.verified();
        assert_eq!(rx.borrow().outcome, Some(true));
        assert!(relays.get(7).is_some(), "served from memory until written");
        drop(written);
        assert!(relays.get(7).is_none());
        assert_eq!(
            rx.borrow().parts.len(),
            1,
            "a stream under way keeps the parts"
        );
    }

    #[test]
    fn it_should_cap_the_pieces_published() {
        let relays = Arc::new(Relays::default());
        let held: Vec<_> = (0..MAX_RELAYS as u32)
            .map(|i| relays.begin(i).expect("under the cap"))
            .collect();
        assert!(relays.begin(MAX_RELAYS as u32).is_none());
        assert_eq!(relays.len(), MAX_RELAYS);
        drop(held);
        assert!(relays.is_empty());
    }

    #[test]
    fn it_should_not_unpublish_a_newer_relay_of_the_same_piece() {
        let relays = Arc::new(Relays::default());
        let first = relays.begin(1).expect("first");
        let old = relays.get(1).expect("published");
        drop(first);
        let _second = relays.begin(1).expect("again");
        relays.remove(1, &old);
        assert!(relays.get(1).is_some(), "the stale handle removes nothing");
    }
}
