//! Super-seeding (after BEP 16): a seeder's upload carries each piece once before any piece
//! twice, while some piece has reached no leecher.
//!
//! At the start of a swarm the seeders' upload is the bound on everyone's finish (Kumar &
//! Ross): a byte it sends twice is a byte of the file it did not send. So a seeder that starts
//! complete hides its bitfield (an empty BITFIELD marked `super_seed`) and *offers* each
//! leecher pieces one HAVE at a time, choosing only pieces it has not uploaded, not offered to
//! anyone else, and not seen at any leecher. Leechers fetch those from the seeder and
//! everything else from each other. A piece is *spread* once we uploaded it or a leecher
//! announced it (another seeder sent it).
//!
//! When every piece is spread, the pieces of the last round are each held by one leecher,
//! which must pass them on to every other: the swarm's tail (measured, homogeneous scenario:
//! 1.4 s after the seeder's first copy was out, against 0.6 s for one leecher's uplink to
//! carry one piece to seven). So a second phase follows: the seeder offers a second copy of
//! each piece no leecher has announced yet (the last round's, still on the wire), one leecher
//! at a time, so each has two sources as it lands. Once no piece is that rare (or none may be
//! sent twice), or after [`SECOND_PHASE_MAX`], the phase ends and every connection gets the
//! full BITFIELD, so late joiners can fetch from anyone.
//!
//! Leechers do not pass pieces on equally fast: one with a 10 Mbit/s uplink, or 600 ms away,
//! forwards a piece in seconds where another takes a fraction of one. An equal share of the
//! seeder's pieces held by the slow ones waits there, and the seeder sends it again or the
//! swarm waits. So a leecher holding [`MAX_UNSPREAD`] of our pieces that no other leecher is
//! known to have is offered no more until one of them spreads, while another leecher's
//! connection can take offers: the seeder's pieces go to the leechers that pass them on,
//! about in proportion to how fast they do (BEP 16's rule, with a little slack).
//!
//! Synchronous and free of I/O; the connections drive it under the torrent lock. The counters
//! (uploads per piece, repeats while the phase was on) are the seeder's own evidence that the
//! rule held, shown by `query` and `status --json`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::bitfield::Bitfield;

/// No connection holds the offer.
const NOBODY: u64 = u64::MAX;
/// Candidates, in index order, an offer is chosen among at random.
const OFFER_WINDOW: u32 = 16;

/// Copies of a piece the second phase brings it to at most.
const SECOND_PHASE_COPIES: u32 = 2;
/// Leechers known to hold a piece below which the second phase sends it again: only pieces
/// no leecher has announced yet, the last round's, still on their way to their first holder.
/// Pieces one leecher already holds are passing on by themselves; sending them too cost more
/// copies for no gain (measured, homogeneous scenario, alternated: with 2, 12.6-12.7 s and
/// 1.07-1.10 copies; with 1, 12.5 s and 1.06-1.08 copies).
const SECOND_PHASE_HOLDERS: u16 = 1;
/// The second phase lasts at most this long: past the tail it is for, a seeder that only
/// sends second copies leaves its upload idle while slow leechers still lack most pieces
/// (measured, heterogeneous scenario: the 600 ms leecher got nothing from the seeder for its
/// last 8 s).
pub const SECOND_PHASE_MAX: Duration = Duration::from_secs(2);
/// Our pieces a leecher may hold that no other leecher is known to have, before it is
/// offered no more (see the module doc). Measured, heterogeneous scenario, alternated: with
/// no limit the leechers finished at 17.4-20.5 s (mean 19.4), with 3 at 14.7-20.3 s (mean 17.3).
pub const MAX_UNSPREAD: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Some piece has reached no leecher: only such pieces are offered.
    Spreading,
    /// Every piece is out: second copies of the rarest are offered.
    Doubling,
    /// Everything is shown.
    Done,
}

#[derive(Debug, Clone)]
pub struct SuperSeed {
    /// Pieces uploaded, by index, over the whole session (not only the phase).
    uploads: Vec<u32>,
    /// The connection a piece is offered to and not uploaded yet ([`NOBODY`] when none):
    /// never offered to a second one. Only that connection can withdraw it.
    offered: Vec<u64>,
    spread: Bitfield,
    phase: Phase,
    /// When the second phase was first seen under way.
    doubling_since: Option<Instant>,
    /// Uploads of a piece already uploaded once, while the phase was on (0 when the rule held).
    repeats: u64,
    other_source: bool,
    /// Connections offered pieces in the first phase, and those of them held back for
    /// holding [`MAX_UNSPREAD`] unspread pieces.
    offering: HashSet<u64>,
    held: HashSet<u64>,
}

impl SuperSeed {
    /// `active`: the session starts complete, so it is the seeder whose upload to spread.
    pub fn new(pieces: u32, active: bool) -> SuperSeed {
        SuperSeed {
            uploads: vec![0; pieces as usize],
            offered: vec![NOBODY; pieces as usize],
            spread: Bitfield::new(pieces),
            phase: if active && pieces > 0 {
                Phase::Spreading
            } else {
                Phase::Done
            },
            doubling_since: None,
            repeats: 0,
            other_source: false,
            offering: HashSet::new(),
            held: HashSet::new(),
        }
    }

    /// Pieces are offered one by one (either phase), not shown.
    pub fn is_active(&self) -> bool {
        self.phase != Phase::Done
    }

    /// The first phase: some piece has reached no leecher yet.
    pub fn is_spreading(&self) -> bool {
        self.phase == Phase::Spreading
    }

    pub fn uploads(&self) -> &[u32] {
        &self.uploads
    }

    pub fn repeats(&self) -> u64 {
        self.repeats
    }

    pub fn is_spread(&self, i: u32) -> bool {
        self.spread.get(i)
    }

    /// Whether connection `conn`'s offer of `i` still stands: it is still offered to it, and
    /// in the first phase no other source has spread it meanwhile.
    pub fn still_offered(&self, i: u32, conn: u64) -> bool {
        self.offered[i as usize] == conn && !(self.phase == Phase::Spreading && self.spread.get(i))
    }

    /// A piece to offer to connection `conn`, whose peer has `peer_has`, or None (none left
    /// in this phase). `holders(i)` is how many connected leechers are known to have piece
    /// `i`. The piece stays offered to `conn` until it withdraws it or it is uploaded.
    pub fn offer(
        &mut self,
        conn: u64,
        peer_has: &Bitfield,
        holders: impl Fn(u32) -> u16,
        rng: &mut impl Rng,
    ) -> Option<u32> {
        let i = match self.phase {
            Phase::Spreading => self.first_copy(peer_has, rng),
            Phase::Doubling => self.second_copy(peer_has, holders, rng),
            Phase::Done => None,
        }?;
        self.offered[i as usize] = conn;
        Some(i)
    }

    fn first_copy(&self, peer_has: &Bitfield, rng: &mut impl Rng) -> Option<u32> {
        // Random among the first few candidates in index order: near file order, so the
        // leechers' whole-file hash runs alongside the download, yet two seeders offering at
        // once mostly pick different pieces.
        let mut chosen = None;
        let mut seen = 0u32;
        for i in 0..self.uploads.len() as u32 {
            if self.spread.get(i) || self.offered[i as usize] != NOBODY || peer_has.get(i) {
                continue;
            }
            seen += 1;
            if rng.gen_range(0..seen) == 0 {
                chosen = Some(i); // Reservoir sampling: each of the window equally likely.
            }
            if seen == OFFER_WINDOW {
                break;
            }
        }
        chosen
    }

    /// May piece `i` get a second copy: it went out fewer than [`SECOND_PHASE_COPIES`] times
    /// and fewer than [`SECOND_PHASE_HOLDERS`] leechers are known to hold it.
    fn wants_second_copy(&self, i: u32, holders: u16) -> bool {
        self.uploads[i as usize] < SECOND_PHASE_COPIES && holders < SECOND_PHASE_HOLDERS
    }

    /// The piece the peer lacks, offered to nobody, with the fewest holders (random among
    /// equals), of those that may get a second copy.
    fn second_copy(
        &self,
        peer_has: &Bitfield,
        holders: impl Fn(u32) -> u16,
        rng: &mut impl Rng,
    ) -> Option<u32> {
        let mut chosen = None;
        let mut best = u16::MAX;
        let mut ties = 0u32;
        for i in 0..self.uploads.len() as u32 {
            if self.offered[i as usize] != NOBODY || peer_has.get(i) {
                continue;
            }
            let h = holders(i);
            if !self.wants_second_copy(i, h) || h > best {
                continue;
            }
            if h < best {
                best = h;
                ties = 0;
            }
            ties += 1;
            if rng.gen_range(0..ties) == 0 {
                chosen = Some(i);
            }
        }
        chosen
    }

    /// In the second phase: end it when no piece may get a second copy any more (every piece
    /// went out twice or is held by enough leechers), or [`SECOND_PHASE_MAX`] after it began
    /// (`now` is the time). Returns true when this ended it, and with it the offers: every
    /// connection is to show everything.
    pub fn end_second_phase_if_done(&mut self, holders: impl Fn(u32) -> u16, now: Instant) -> bool {
        if self.phase != Phase::Doubling {
            return false;
        }
        let since = *self.doubling_since.get_or_insert(now);
        let pending = (0..self.uploads.len() as u32)
            .any(|i| self.wants_second_copy(i, holders(i)) || self.offered[i as usize] != NOBODY);
        if pending && now.duration_since(since) < SECOND_PHASE_MAX {
            return false;
        }
        self.phase = Phase::Done;
        true
    }

    /// Whether connection `conn`, whose peer holds `unspread` of the pieces we gave it that no
    /// other leecher is known to have, is offered nothing more for now: in the first phase,
    /// with [`MAX_UNSPREAD`] of them, while another connection is not held back (the upload
    /// has somewhere else to go; a lone leecher is never held back).
    pub fn hold_back(&mut self, conn: u64, unspread: usize) -> bool {
        self.held.remove(&conn);
        if self.phase != Phase::Spreading {
            self.offering.clear();
            self.held.clear();
            return false;
        }
        self.offering.insert(conn);
        let others_free = self.offering.len() - 1 - self.held.len();
        let hold = unspread >= MAX_UNSPREAD && others_free > 0;
        if hold {
            self.held.insert(conn);
        }
        hold
    }

    /// Connection `conn` takes no offers any more (it ended, or shows everything).
    fn leave(&mut self, conn: u64) {
        self.offering.remove(&conn);
        self.held.remove(&conn);
    }

    /// Connection `conn` no longer holds `i` (its peer cancelled it): `i` may be offered
    /// elsewhere. No effect when `i` is offered to another connection.
    pub fn withdraw(&mut self, i: u32, conn: u64) {
        if self.offered[i as usize] == conn {
            self.offered[i as usize] = NOBODY;
        }
    }

    /// Connection `conn` ended: whatever it was offered and did not get may go elsewhere
    /// (including a piece being written when the connection broke).
    pub fn withdraw_all(&mut self, conn: u64) {
        self.leave(conn);
        for o in &mut self.offered {
            if *o == conn {
                *o = NOBODY;
            }
        }
    }

    /// We upload piece `i` (counted as its first byte goes). Returns true when this ended the
    /// first phase.
    pub fn on_uploaded(&mut self, i: u32) -> bool {
        let u = &mut self.uploads[i as usize];
        if self.phase == Phase::Spreading && *u > 0 {
            self.repeats += 1;
        }
        *u = u.saturating_add(1);
        self.offered[i as usize] = NOBODY;
        self.mark_spread(i)
    }

    /// Stop offering now (another seeder serves the swarm). Returns whether offers were on.
    pub fn stop(&mut self) -> bool {
        std::mem::replace(&mut self.phase, Phase::Done) != Phase::Done
    }

    /// A leecher showed piece `i` in its BITFIELD (it had it before we met). Returns true
    /// when this ended the first phase.
    pub fn on_peer_has(&mut self, i: u32) -> bool {
        self.mark_spread(i)
    }

    /// A leecher just got piece `i` (its HAVE). One we never uploaded came from another
    /// source, another seeder most likely: then the phase ends (BEP 16 is the initial
    /// seeder's mode). Two seeders offering pieces one at a time pin each piece to whichever
    /// offered it, however slow (measured: 9 of 64 pieces from a seeder answering 300 ms
    /// late, against 0 to 1 with one of them showing everything). Our own upload is counted
    /// before its first byte goes ([`Self::on_uploaded`]), so its HAVE is never taken for
    /// another source's. Returns true when this ended the offers (every connection is to show
    /// everything).
    pub fn on_have(&mut self, i: u32) -> bool {
        if self.phase == Phase::Spreading && self.uploads[i as usize] == 0 {
            self.phase = Phase::Done;
            self.other_source = true;
            return true;
        }
        self.mark_spread(i);
        false
    }

    /// The phase ended because pieces reached leechers from another source.
    pub fn saw_other_source(&self) -> bool {
        self.other_source
    }

    fn mark_spread(&mut self, i: u32) -> bool {
        if self.phase != Phase::Spreading || !self.spread.set(i) {
            return false;
        }
        if self.spread.is_complete() {
            self.phase = Phase::Doubling;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn it_should_hold_back_a_leecher_with_unspread_pieces_only_while_another_can_take_offers() {
        let mut s = SuperSeed::new(8, true);
        // A lone leecher is never held back: the upload would have nowhere to go.
        assert!(!s.hold_back(1, MAX_UNSPREAD + 5));
        // With a second leecher that takes offers, the first waits for its pieces to spread.
        assert!(!s.hold_back(2, 0));
        assert!(s.hold_back(1, MAX_UNSPREAD));
        assert!(
            !s.hold_back(1, MAX_UNSPREAD - 1),
            "one spread: offers again"
        );
        assert!(s.hold_back(1, MAX_UNSPREAD));
        // Both full: neither waits on the other, so the seeder's upload never idles.
        assert!(!s.hold_back(2, MAX_UNSPREAD));
        // The second leaves: the first is alone again.
        s.withdraw_all(2);
        assert!(!s.hold_back(1, MAX_UNSPREAD));
        // Past the first phase nobody is held back.
        assert!(!s.hold_back(3, 0));
        assert!(s.hold_back(1, MAX_UNSPREAD));
        assert!(s.stop());
        assert!(!s.hold_back(1, MAX_UNSPREAD));
    }

    #[test]
    fn it_should_offer_each_piece_to_one_peer_until_every_piece_is_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut s = SuperSeed::new(8, true);
        let none = Bitfield::new(8);
        let mut seen = Vec::new();
        while let Some(i) = s.offer(1, &none, |_| 0, &mut rng) {
            assert!(!seen.contains(&i), "piece {i} offered twice");
            seen.push(i);
        }
        assert_eq!(seen.len(), 8);
        // A peer left before asking for one: it goes back to the pool, once.
        s.withdraw(seen[0], 2);
        assert_eq!(
            s.offer(2, &none, |_| 0, &mut rng),
            None,
            "only its holder withdraws it"
        );
        s.withdraw(seen[0], 1);
        assert_eq!(s.offer(2, &none, |_| 0, &mut rng), Some(seen[0]));
        assert_eq!(s.offer(2, &none, |_| 0, &mut rng), None);
        // Another seeder's upload, seen at a leecher, spreads a piece too.
        assert!(!s.on_peer_has(seen[1]));
        for &i in &seen[2..] {
            assert!(!s.on_uploaded(i));
        }
        assert!(
            s.on_uploaded(seen[0]),
            "the last spread piece ends the first phase"
        );
        assert!(!s.is_spreading() && s.is_active());
        assert_eq!(s.repeats(), 0);
        s.on_uploaded(seen[0]);
        assert_eq!(s.uploads()[seen[0] as usize], 2);
        assert_eq!(s.repeats(), 0, "after the phase a second copy is no repeat");
    }

    #[test]
    fn it_should_count_a_repeat_and_skip_what_the_peer_has() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = SuperSeed::new(3, true);
        let mut has = Bitfield::new(3);
        has.set(0);
        has.set(1);
        assert_eq!(s.offer(1, &has, |_| 0, &mut rng), Some(2));
        // A connection that ends gives back what it held.
        let mut t = SuperSeed::new(1, true);
        let none = Bitfield::new(1);
        assert_eq!(t.offer(5, &none, |_| 0, &mut rng), Some(0));
        assert_eq!(t.offer(6, &none, |_| 0, &mut rng), None);
        t.withdraw_all(5);
        assert_eq!(t.offer(6, &none, |_| 0, &mut rng), Some(0));
        s.on_uploaded(2);
        s.on_uploaded(2);
        assert_eq!(s.repeats(), 1);
        assert!(!SuperSeed::new(3, false).is_active());
    }

    #[test]
    fn it_should_end_the_phase_when_a_leecher_gets_a_piece_we_never_sent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = SuperSeed::new(4, true);
        let none = Bitfield::new(4);
        let i = s.offer(1, &none, |_| 0, &mut rng).unwrap();
        assert!(!s.on_uploaded(i));
        // Our piece, passed on between leechers: the phase goes on.
        assert!(!s.on_have(i));
        assert!(s.is_active() && !s.saw_other_source());
        // A piece we never sent: another seeder serves the swarm.
        let other = (0..4).find(|&j| j != i).unwrap();
        assert!(s.on_have(other), "the phase ends");
        assert!(!s.is_active() && s.saw_other_source());
        assert_eq!(s.offer(1, &none, |_| 0, &mut rng), None);
    }

    #[test]
    fn it_should_offer_second_copies_of_the_rarest_then_show_everything() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut s = SuperSeed::new(4, true);
        let none = Bitfield::new(4);
        let now = Instant::now();
        // The first phase: each piece to one leecher.
        for i in 0..4 {
            s.on_uploaded(i);
        }
        assert!(!s.is_spreading() && s.is_active());
        // Piece 0 is held by three leechers, 1 by one; 2 and 3 by nobody known yet (their
        // first copies are still on the wire).
        let holders = |i: u32| [3u16, 1, 0, 0][i as usize];
        assert!(!s.end_second_phase_if_done(holders, now));
        // Only those, each to one connection at a time, and only to a peer that lacks it.
        let first = s.offer(1, &none, holders, &mut rng).unwrap();
        assert!(first == 2 || first == 3, "got {first}");
        let other = 5 - first;
        let mut has_other = Bitfield::new(4);
        has_other.set(other);
        assert_eq!(s.offer(2, &has_other, holders, &mut rng), None);
        assert_eq!(s.offer(2, &none, holders, &mut rng), Some(other));
        assert_eq!(s.offer(3, &none, holders, &mut rng), None, "all offered");
        // Offers out: the phase goes on until they are sent.
        for i in [2, 3] {
            assert!(!s.end_second_phase_if_done(holders, now));
            s.on_uploaded(i);
        }
        assert_eq!(s.repeats(), 0, "second copies are not first-phase repeats");
        // Never a third copy, however rare the holders say they still are.
        let unseen_last = |i: u32| if i < 2 { 3 } else { 0 };
        assert_eq!(s.offer(3, &none, unseen_last, &mut rng), None);
        // No piece may get a second copy any more: everything is shown.
        assert!(s.end_second_phase_if_done(holders, now));
        assert!(!s.is_active());
        assert_eq!(s.offer(1, &none, holders, &mut rng), None);
        assert!(!s.end_second_phase_if_done(holders, now), "ended once");
    }

    #[test]
    fn it_should_end_the_second_phase_after_its_time_even_with_rare_pieces_left() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut s = SuperSeed::new(2, true);
        let none = Bitfield::new(2);
        s.on_uploaded(0);
        s.on_uploaded(1);
        let start = Instant::now();
        let holders = |_| 0;
        assert!(!s.end_second_phase_if_done(holders, start));
        assert!(s.offer(1, &none, holders, &mut rng).is_some());
        assert!(!s.end_second_phase_if_done(holders, start + SECOND_PHASE_MAX / 2));
        assert!(s.end_second_phase_if_done(holders, start + SECOND_PHASE_MAX));
        assert!(!s.is_active());
    }
}
