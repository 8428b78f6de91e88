//! Peer-to-peer messages, carried in the frames of [`shoal_tracker::wire`].
//!
//! Each connection serves one torrent, named in the HELLO both sides send first. After that
//! either side may send BITFIELD (once, with the bits as payload), HAVE, REQUEST, CANCEL,
//! GET_METADATA, KEEPALIVE and PING, and answer with PIECE (payload), REJECT, METADATA
//! (payload) and PONG. Several REQUESTs may be outstanding on one connection.
//!
//! A BITFIELD marked `super_seed` comes from a complete peer that hides what it has and offers
//! pieces one HAVE at a time ([`crate::superseed`]); a later BITFIELD replaces it. PING/PONG
//! measure the round trip apart from throughput: a PONG is sent ahead of queued pieces.
//!
//! Private swarms: HELLO carries the version of the roster the sender holds (0: none); a side
//! holding a newer roster sends it in a ROSTER frame right after the HELLOs, and again
//! whenever it learns a newer one, so rosters spread through the swarm.

use serde::{Deserialize, Serialize};

/// Protocol version spoken in HELLO.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMsg {
    Hello {
        v: u32,
        info_hash: String,
        peer_id: String,
        port: u16,
        /// A private swarm: the version of the roster the sender holds.
        #[serde(default, skip_serializing_if = "is_zero")]
        roster: u64,
        /// The sender reads PIECE_PART: pieces may come to it in parts (an older peer leaves
        /// this out and gets whole PIECEs).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        parts: bool,
        /// The sender reads RECEIVING, and may be asked for a piece it announced so (an older
        /// peer leaves this out and is told only HAVE).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        relay: bool,
    },
    /// Payload: the sender's bitfield, MSB first.
    Bitfield {
        len: u32,
        /// The sender is complete but super-seeding: these bits are what it offers so far.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        super_seed: bool,
    },
    Have {
        index: u32,
    },
    /// The sender is receiving piece `index` and may be asked for it now: it streams the parts
    /// as they land, and the last only once the whole piece passed its hash there (or REJECTs
    /// the request if the piece fails there). A HAVE follows once it is stored.
    Receiving {
        index: u32,
    },
    Request {
        index: u32,
    },
    /// Payload: the piece.
    Piece {
        index: u32,
        len: u32,
    },
    /// Payload: bytes `offset..offset + len` of piece `index`, which is `total` bytes. A piece
    /// sent in parts comes in order, with no other piece between its parts; control frames
    /// may come between them, so on a thin link they do not wait behind a whole piece.
    PiecePart {
        index: u32,
        offset: u32,
        total: u32,
        len: u32,
    },
    Reject {
        index: u32,
        reason: String,
        /// The piece is there but the sender's upload queue for us is full: ask again later.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        busy: bool,
    },
    Cancel {
        index: u32,
    },
    GetMetadata,
    /// Payload: the descriptor JSON.
    Metadata {
        len: u32,
    },
    Keepalive,
    /// Payload: a private swarm's roster JSON, signed by its authority.
    Roster {
        len: u32,
    },
    /// Answer with PONG of the same `id` at once (ahead of queued pieces).
    Ping {
        id: u64,
    },
    Pong {
        id: u64,
        /// The responder's clock when the PING arrived, µs from any origin (0: not given):
        /// the asker's one-way delay to it, up to a constant ([`crate::pacer`]).
        #[serde(default, skip_serializing_if = "is_zero")]
        at: u64,
    },
    Error {
        reason: String,
    },
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl PeerMsg {
    pub fn name(&self) -> &'static str {
        match self {
            PeerMsg::Hello { .. } => "HELLO",
            PeerMsg::Bitfield { .. } => "BITFIELD",
            PeerMsg::Have { .. } => "HAVE",
            PeerMsg::Receiving { .. } => "RECEIVING",
            PeerMsg::Request { .. } => "REQUEST",
            PeerMsg::Piece { .. } => "PIECE",
            PeerMsg::PiecePart { .. } => "PIECE_PART",
            PeerMsg::Reject { .. } => "REJECT",
            PeerMsg::Cancel { .. } => "CANCEL",
            PeerMsg::GetMetadata => "GET_METADATA",
            PeerMsg::Metadata { .. } => "METADATA",
            PeerMsg::Keepalive => "KEEPALIVE",
            PeerMsg::Roster { .. } => "ROSTER",
            PeerMsg::Ping { .. } => "PING",
            PeerMsg::Pong { .. } => "PONG",
            PeerMsg::Error { .. } => "ERROR",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_tracker::wire::{decode, encode, Limits};

    #[test]
    fn it_should_round_trip_every_message_through_the_codec() {
        let msgs = vec![
            PeerMsg::Hello {
                v: 1,
                info_hash: "ab".repeat(32),
                peer_id: "p".into(),
                port: 7,
                roster: 0,
                parts: false,
                relay: false,
            },
            PeerMsg::Hello {
                v: 1,
                info_hash: "ab".repeat(32),
                peer_id: "p".into(),
                port: 7,
                roster: 3,
                parts: true,
                relay: true,
            },
            PeerMsg::Roster { len: 0 },
            PeerMsg::Have { index: 3 },
            PeerMsg::Receiving { index: 5 },
            PeerMsg::Request { index: 4 },
            PeerMsg::Reject {
                index: 4,
                reason: "no".into(),
                busy: false,
            },
            PeerMsg::Reject {
                index: 4,
                reason: "full".into(),
                busy: true,
            },
            PeerMsg::Cancel { index: 4 },
            PeerMsg::GetMetadata,
            PeerMsg::Keepalive,
            PeerMsg::Ping { id: u64::MAX },
            PeerMsg::Pong { id: 9, at: 0 },
            PeerMsg::Pong { id: 9, at: 12_345 },
        ];
        for m in msgs {
            let mut buf = Vec::new();
            encode(&m, &[], &mut buf).unwrap();
            let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
            assert_eq!(f.parse::<PeerMsg>().unwrap(), m);
        }
        let mut buf = Vec::new();
        encode(&PeerMsg::Piece { index: 1, len: 3 }, b"abc", &mut buf).unwrap();
        let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
        assert_eq!(
            f.parse::<PeerMsg>().unwrap(),
            PeerMsg::Piece { index: 1, len: 3 }
        );
        assert_eq!(&f.payload[..], b"abc");
        // A part's `len` is its payload's, as for every frame.
        let part = PeerMsg::PiecePart {
            index: 4,
            offset: 2,
            total: 5,
            len: 3,
        };
        let mut buf = Vec::new();
        encode(&part, b"cde", &mut buf).unwrap();
        let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
        assert_eq!(f.kind(), "PIECE_PART");
        assert_eq!(f.parse::<PeerMsg>().unwrap(), part);
        assert_eq!(&f.payload[..], b"cde");
        // A HELLO from a peer that predates parts: it gets whole pieces.
        let old = br#"{"type":"HELLO","v":1,"info_hash":"ab","peer_id":"p","port":7}"#;
        let mut buf = (old.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(old);
        let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
        assert!(matches!(
            f.parse::<PeerMsg>().unwrap(),
            PeerMsg::Hello {
                parts: false,
                relay: false,
                ..
            }
        ));
        let bad = br#"{"type":"TELEPORT"}"#;
        let mut buf = (bad.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(bad);
        let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
        assert!(f.parse::<PeerMsg>().is_err());
        for super_seed in [true, false] {
            let m = PeerMsg::Bitfield { len: 1, super_seed };
            let mut buf = Vec::new();
            encode(&m, &[0x80], &mut buf).unwrap();
            let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
            assert_eq!(f.parse::<PeerMsg>().unwrap(), m);
        }
        // A BITFIELD from a peer that predates the flag is a plain one.
        let old = br#"{"type":"BITFIELD","len":1}"#;
        let mut buf = (old.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(old);
        buf.push(0x80);
        let (f, _) = decode(&buf, &Limits::default()).unwrap().unwrap();
        assert_eq!(
            f.parse::<PeerMsg>().unwrap(),
            PeerMsg::Bitfield {
                len: 1,
                super_seed: false
            }
        );
    }
}
