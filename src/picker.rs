//! The piece picker: which piece to ask a given peer for next.
//!
//! Every piece is in exactly one state, and only the named methods below move it:
//!
//! ```text
//!             pick (fresh)              arrive_for_write          mark_verified
//!   Missing ───────────────▶ InFlight ─────────────────▶ Writing ───────────────▶ Have
//!      ▲                      │   ▲ (endgame: more        │
//!      │   release (last      │   │  requests on it)       │ mark_failed (hash mismatch)
//!      └── request gone) ─────┘   │                        │
//!      └──────────────────────────┴────────────────────────┘
//! ```
//!
//! `InFlight` counts outstanding requests: in endgame (no missing piece left unrequested) a
//! piece may be requested from up to three more peers; whoever's copy arrives first is written, and the
//! caller cancels the others. Each in-flight piece also keeps when its soonest copy is due, so
//! a duplicate goes where it brings the piece sooner ([`Picker::pick_sooner`]). Synchronous
//! and free of I/O (the caller passes the time), so the tests drive every transition.

use std::time::Instant;

use rand::Rng;

use crate::bitfield::Bitfield;
use crate::config::PieceSelection;

/// At most this many requests for one piece at once (endgame).
const MAX_REQUESTS_PER_PIECE: u8 = 4;
/// Equally rare pieces chosen among, in index order, after the random first pieces.
const TIE_WINDOW: u32 = 16;
/// A connection of known rate duplicates a piece in endgame only if its copy would arrive
/// within this share of the time the piece's holders still need ([`Picker::pick_sooner`]): a
/// duplicate costs up to a piece of someone's uplink and of our downlink, so it must win
/// clearly.
const SOONER: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// A piece nobody is fetching.
    Fresh(u32),
    /// Endgame: a piece another connection is already fetching.
    Endgame(u32),
    /// Nothing this peer has that we need and may ask for now.
    None,
}

#[derive(Debug, Clone)]
pub struct Picker {
    have: Bitfield,
    writing: Bitfield,
    in_flight: Vec<u8>,
    availability: Vec<u16>,
    /// Pieces not wanted (files left out of a tree's selection): never picked, and not
    /// needed for completion.
    skip: Bitfield,
    /// Wanted pieces not had yet (completion is when this is 0).
    wanted_missing: u32,
    /// Wanted pieces neither had, written nor requested.
    unrequested: u32,
    selection: PieceSelection,
    random_left: u32,
    /// When each in-flight piece was first asked for, in picks: the order endgame duplicates
    /// go in.
    asked_at: Vec<u64>,
    picks: u64,
    /// Per in-flight piece: when it was first asked for, and when its soonest copy is due
    /// (None: not known), from the asking connections' rates ([`Picker::note_due`]).
    due: Vec<Option<Due>>,
}

#[derive(Debug, Clone, Copy)]
struct Due {
    asked: Instant,
    due: Option<Instant>,
}

impl Picker {
    pub fn new(have: Bitfield, selection: PieceSelection, random_first: u32) -> Picker {
        let skip = Bitfield::new(have.len());
        Picker::with_skip(have, skip, selection, random_first)
    }

    /// A picker that leaves the pieces in `skip` alone (a tree's unselected files).
    pub fn with_skip(
        have: Bitfield,
        skip: Bitfield,
        selection: PieceSelection,
        random_first: u32,
    ) -> Picker {
        let n = have.len() as usize;
        let missing = (0..have.len())
            .filter(|&i| !have.get(i) && !skip.get(i))
            .count() as u32;
        Picker {
            skip,
            wanted_missing: missing,
            unrequested: missing,
            writing: Bitfield::new(have.len()),
            in_flight: vec![0; n],
            availability: vec![0; n],
            have,
            selection,
            random_left: random_first,
            asked_at: vec![0; n],
            picks: 0,
            due: vec![None; n],
        }
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Every wanted piece is had.
    pub fn is_complete(&self) -> bool {
        self.wanted_missing == 0
    }

    pub fn availability(&self, i: u32) -> u16 {
        self.availability[i as usize]
    }

    pub fn in_flight(&self, i: u32) -> u8 {
        self.in_flight[i as usize]
    }

    // === AVAILABILITY ===

    pub fn add_peer(&mut self, bits: &Bitfield) {
        for i in bits.ones() {
            self.availability[i as usize] = self.availability[i as usize].saturating_add(1);
        }
    }

    pub fn remove_peer(&mut self, bits: &Bitfield) {
        for i in bits.ones() {
            self.availability[i as usize] = self.availability[i as usize].saturating_sub(1);
        }
    }

    pub fn add_have(&mut self, i: u32) {
        self.availability[i as usize] = self.availability[i as usize].saturating_add(1);
    }

    // === ACQUIRE ===

    /// Every wanted missing piece is requested somewhere: what [`Picker::pick`] gives now are
    /// endgame duplicates.
    pub fn in_endgame(&self) -> bool {
        self.unrequested == 0 && self.wanted_missing > 0
    }

    /// Choose a piece to request from a peer that has `peer_has`; `mine(i)` excludes pieces
    /// this connection should not ask for (already requested by it, or recently refused). The returned piece counts as requested
    /// until [`Picker::release`] or [`Picker::arrive_for_write`].
    pub fn pick(
        &mut self,
        peer_has: &Bitfield,
        mine: impl Fn(u32) -> bool,
        rng: &mut impl Rng,
    ) -> Pick {
        if self.unrequested > 0 {
            if let Some(i) = self.pick_fresh(peer_has, &mine, rng) {
                self.in_flight[i as usize] += 1;
                self.picks += 1;
                self.asked_at[i as usize] = self.picks;
                self.unrequested -= 1;
                self.random_left = self.random_left.saturating_sub(1);
                return Pick::Fresh(i);
            }
            return Pick::None;
        }
        // Endgame: every missing piece is requested somewhere; ask this peer too for the one
        // with the fewest requests, so a slow peer cannot hold up the finish, and of those the
        // one asked for longest ago: it waits behind a thin or busy uploader's queue.
        let mut best: Option<u32> = None;
        for i in 0..self.have.len() {
            if !self.duplicable(i, peer_has, &mine) {
                continue;
            }
            let key = |j: u32| (self.in_flight[j as usize], self.asked_at[j as usize]);
            if best.is_none_or(|b| key(i) < key(b)) {
                best = Some(i);
            }
        }
        match best {
            Some(i) => {
                self.in_flight[i as usize] += 1;
                Pick::Endgame(i)
            }
            None => Pick::None,
        }
    }

    /// Whether piece `i` may be asked for once more, as an endgame duplicate, from a peer
    /// that has `peer_has`: in flight, under the cap of requests, not had, being written or
    /// skipped, and not excluded by `mine`.
    fn duplicable(&self, i: u32, peer_has: &Bitfield, mine: &impl Fn(u32) -> bool) -> bool {
        let f = self.in_flight[i as usize];
        f > 0
            && f < MAX_REQUESTS_PER_PIECE
            && !self.have.get(i)
            && !self.writing.get(i)
            && !self.skip.get(i)
            && peer_has.get(i)
            && !mine(i)
    }

    /// When the request just made for `i` (by [`Picker::pick`] or [`Picker::pick_sooner`])
    /// should bring the piece: `due` None when the asking connection's rate is not known.
    /// The piece keeps the soonest of its copies' times.
    pub fn note_due(&mut self, i: u32, now: Instant, due: Option<Instant>) {
        let slot = &mut self.due[i as usize];
        match slot {
            Some(d) => {
                d.due = match (d.due, due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => *slot = Some(Due { asked: now, due }),
        }
    }

    /// Endgame, for a connection whose rate is known: a piece in flight elsewhere that this
    /// connection would bring by `mine_due` well before its holders will ([`SOONER`]); of
    /// those, the one its holders need longest for. A holder past its due time, or of
    /// unknown rate, is expected to need as long again as it has had. None otherwise (no
    /// duplicate is worth its bytes), and outside endgame.
    ///
    /// [`Picker::pick`]'s endgame takes the piece asked for longest ago, which is often the
    /// next to arrive from a source that is merely busy: both copies then cross the
    /// downlink, and on a far one the CANCEL comes too late to stop either.
    pub fn pick_sooner(
        &mut self,
        peer_has: &Bitfield,
        mine: impl Fn(u32) -> bool,
        now: Instant,
        mine_due: Instant,
    ) -> Pick {
        if !self.in_endgame() {
            return Pick::None;
        }
        let need = mine_due.saturating_duration_since(now).as_secs_f64();
        let mut best: Option<(u32, f64)> = None;
        for i in 0..self.have.len() {
            let u = i as usize;
            if !self.duplicable(i, peer_has, &mine) {
                continue;
            }
            // No record (a copy failed its hash while others were in flight): unknown.
            let left = self.due[u].map_or(f64::INFINITY, |d| {
                match d.due {
                    Some(due) if due > now => due - now,
                    _ => now.saturating_duration_since(d.asked),
                }
                .as_secs_f64()
            });
            if need < SOONER * left && best.is_none_or(|(_, l)| left > l) {
                best = Some((i, left));
            }
        }
        match best {
            Some((i, _)) => {
                self.in_flight[i as usize] += 1;
                self.note_due(i, now, Some(mine_due));
                Pick::Endgame(i)
            }
            None => Pick::None,
        }
    }

    fn pick_fresh(
        &self,
        peer_has: &Bitfield,
        exclude: &impl Fn(u32) -> bool,
        rng: &mut impl Rng,
    ) -> Option<u32> {
        // How many equally rare candidates to choose among: all of them while picking at
        // random, else the first TIE_WINDOW in index order. The window spreads leechers over
        // different pieces (so they have something to trade) while keeping arrival close to
        // file order (so the whole-file hash runs alongside the download).
        let window = if self.selection == PieceSelection::Random || self.random_left > 0 {
            u32::MAX
        } else {
            TIE_WINDOW
        };
        let mut best: Option<u32> = None;
        let mut best_avail = u16::MAX;
        let mut ties = 0u32;
        for i in 0..self.have.len() {
            let u = i as usize;
            if self.in_flight[u] > 0
                || self.have.get(i)
                || self.skip.get(i)
                || self.writing.get(i)
                || !peer_has.get(i)
                || exclude(i)
            {
                continue;
            }
            // Plain random ignores availability; rarest-first compares it.
            let a = if self.selection == PieceSelection::Random {
                0
            } else {
                self.availability[u]
            };
            if a < best_avail {
                best_avail = a;
                best = Some(i);
                ties = 1;
            } else if a == best_avail && ties < window {
                // Reservoir sampling: each candidate in the window is equally likely.
                ties += 1;
                if rng.gen_range(0..ties) == 0 {
                    best = Some(i);
                }
            }
        }
        best
    }

    // === RELEASE ===

    /// A request for `i` is gone without a piece (rejected, timed out, cancelled, peer left).
    pub fn release(&mut self, i: u32) {
        let f = &mut self.in_flight[i as usize];
        debug_assert!(*f > 0, "release of piece {i} that is not in flight");
        *f = f.saturating_sub(1);
        let left = *f;
        if left == 0 && !self.have.get(i) && !self.writing.get(i) {
            self.unrequested += 1;
        }
        self.forget_due(i, left);
    }

    /// A request for `i` ended, `left` still outstanding: with none the piece has no due
    /// time; with some, the one that ended may have been the soonest, so it is not known.
    fn forget_due(&mut self, i: u32, left: u8) {
        let slot = &mut self.due[i as usize];
        if left == 0 {
            *slot = None;
        } else if let Some(d) = slot {
            d.due = None;
        }
    }

    /// A copy of `i` arrived on a request of ours. Returns whether to hash and write it: false
    /// when another copy is already being written or the piece is had (the endgame loser).
    /// Either way the request is no longer outstanding.
    pub fn arrive_for_write(&mut self, i: u32) -> bool {
        let u = i as usize;
        self.in_flight[u] = self.in_flight[u].saturating_sub(1);
        if self.have.get(i) || self.writing.get(i) {
            return false;
        }
        self.writing.set(i);
        self.due[u] = None;
        true
    }

    /// The copy being written failed its hash: the piece is missing again unless still
    /// requested elsewhere.
    pub fn mark_failed(&mut self, i: u32) {
        self.writing.clear(i);
        self.forget_due(i, self.in_flight[i as usize]);
        if self.in_flight[i as usize] == 0 && !self.have.get(i) {
            self.unrequested += 1;
        }
    }

    /// The piece is verified and written. Returns false if it was already had.
    pub fn mark_verified(&mut self, i: u32) -> bool {
        self.writing.clear(i);
        let new = self.have.set(i);
        if new && !self.skip.get(i) {
            self.wanted_missing -= 1;
        }
        new
    }

    /// A recheck found piece `i` bad: back to missing.
    pub fn mark_missing(&mut self, i: u32) {
        if self.have.clear(i) && !self.skip.get(i) {
            self.wanted_missing += 1;
            if self.in_flight[i as usize] == 0 {
                self.unrequested += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn it_should_pick_the_rarest_piece_first() {
        let mut p = Picker::new(Bitfield::new(4), PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(4);
        let mut others = Bitfield::new(4);
        others.set(0);
        others.set(1);
        others.set(3);
        p.add_peer(&all);
        p.add_peer(&others);
        assert_eq!(p.pick(&all, |_| false, &mut rng()), Pick::Fresh(2));
        // The rest are equally rare: any of them, each once.
        let mut rest: Vec<u32> = (0..3)
            .map(|_| match p.pick(&all, |_| false, &mut rng()) {
                Pick::Fresh(i) => i,
                other => panic!("{other:?}"),
            })
            .collect();
        rest.sort();
        assert_eq!(rest, vec![0, 1, 3]);
    }

    #[test]
    fn it_should_never_pick_skipped_pieces_and_complete_without_them() {
        let mut skip = Bitfield::new(6);
        for i in [0, 2, 3, 5] {
            skip.set(i);
        }
        let mut p = Picker::with_skip(Bitfield::new(6), skip, PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(6);
        let mut r = rng();
        let mut got = Vec::new();
        while let Pick::Fresh(i) = p.pick(&all, |_| false, &mut r) {
            got.push(i);
        }
        got.sort();
        assert_eq!(got, vec![1, 4]);
        // Endgame does not offer skipped pieces either.
        assert!(matches!(
            p.pick(&all, |_| false, &mut r),
            Pick::Endgame(1 | 4)
        ));
        assert!(!p.is_complete());
        for i in [1, 4] {
            assert!(p.arrive_for_write(i));
            assert!(p.mark_verified(i));
        }
        assert!(p.is_complete());
        p.mark_missing(4);
        assert!(!p.is_complete());
    }

    #[test]
    fn it_should_spread_ties_over_a_window_near_the_front() {
        let all = Bitfield::full(200);
        let mut r = rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut p = Picker::new(Bitfield::new(200), PieceSelection::RarestFirst, 0);
            match p.pick(&all, |_| false, &mut r) {
                Pick::Fresh(i) => {
                    assert!(i < TIE_WINDOW, "picked {i}, outside the window");
                    seen.insert(i);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(seen.len() > 4, "ties should be spread, saw {seen:?}");
    }

    #[test]
    fn it_should_requeue_on_release_and_failure_and_finish_with_endgame() {
        let mut p = Picker::new(Bitfield::new(2), PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(2);
        let mut r = rng();
        assert!(!p.in_endgame());
        let Pick::Fresh(first) = p.pick(&all, |_| false, &mut r) else {
            panic!()
        };
        p.release(first);
        // Released, it can be picked again: with the other one taken, it must be.
        let other = 1 - first;
        assert_eq!(p.pick(&all, |i| i == first, &mut r), Pick::Fresh(other));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Fresh(first));
        if first == 1 {
            // Keep the rest of the script in terms of pieces 0 and 1 as below.
            p = Picker::new(Bitfield::new(2), PieceSelection::RarestFirst, 0);
            assert!(matches!(p.pick(&all, |i| i == 1, &mut r), Pick::Fresh(0)));
            assert!(matches!(p.pick(&all, |_| false, &mut r), Pick::Fresh(1)));
        }
        // Everything requested: a second connection gets endgame duplicates, not its own.
        assert!(p.in_endgame());
        assert_eq!(p.pick(&all, |i| i == 0, &mut r), Pick::Endgame(1));
        assert_eq!(p.pick(&all, |_| true, &mut r), Pick::None);
        assert!(p.arrive_for_write(1));
        assert!(!p.arrive_for_write(1), "the endgame loser is not written");
        p.mark_failed(1);
        assert!(!p.in_endgame(), "a failed piece is unrequested again");
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Fresh(1));
        assert!(p.arrive_for_write(1));
        assert!(p.mark_verified(1));
        assert!(p.arrive_for_write(0));
        assert!(p.mark_verified(0));
        assert!(p.is_complete());
        assert!(!p.in_endgame(), "complete is not endgame");
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::None);
    }

    #[test]
    fn it_should_duplicate_the_piece_asked_for_longest_ago_first() {
        // Pieces asked for in the order 2, 0, 1.
        let mut p = Picker::new(Bitfield::new(3), PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(3);
        let mut r = rng();
        for want in [2, 0, 1] {
            assert_eq!(p.pick(&all, |i| i != want, &mut r), Pick::Fresh(want));
        }
        // Endgame: the oldest request first (not the lowest index), then the next oldest;
        // a piece already duplicated comes after those asked for once.
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(2));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(0));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(1));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(2));
        // Released and asked for again, a piece is as new as that request.
        let mut p = Picker::new(Bitfield::new(2), PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(2);
        for want in [0, 1] {
            assert_eq!(p.pick(&all, |i| i != want, &mut r), Pick::Fresh(want));
        }
        p.release(0);
        assert_eq!(p.pick(&all, |i| i != 0, &mut r), Pick::Fresh(0));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(1));
        assert_eq!(p.pick(&all, |_| false, &mut r), Pick::Endgame(0));
    }

    #[test]
    fn it_should_duplicate_only_where_the_copy_comes_well_before_the_holders_bring_it() {
        let mut p = Picker::new(Bitfield::new(4), PieceSelection::RarestFirst, 0);
        let all = Bitfield::full(4);
        let mut r = rng();
        let s = std::time::Duration::from_secs;
        // A duplicate asked at `now` by a connection that brings it in `secs`, of piece
        // `only` (u32::MAX: of any).
        let soon = |p: &mut Picker, now: Instant, secs: u64, only: u32| {
            p.pick_sooner(&all, |i| only != u32::MAX && i != only, now, now + s(secs))
        };
        let t0 = Instant::now();
        let ta = t0 + s(1);
        for want in 0..4 {
            assert_eq!(p.pick(&all, |i| i != want, &mut r), Pick::Fresh(want));
        }
        // Asked at ta: 0 due in 1 s, 1 in 10 s, 2 in 6 s. Asked at t0: 3, of unknown rate.
        p.note_due(0, ta, Some(ta + s(1)));
        p.note_due(1, ta, Some(ta + s(10)));
        p.note_due(2, ta, Some(ta + s(6)));
        p.note_due(3, t0, None);
        // A copy in 2 s: worth it for 1 (10 s), then 2 (6 s); never for 0, nor yet for 3.
        assert_eq!(soon(&mut p, ta, 2, u32::MAX), Pick::Endgame(1));
        assert_eq!(soon(&mut p, ta, 2, u32::MAX), Pick::Endgame(2));
        assert_eq!(soon(&mut p, ta, 2, u32::MAX), Pick::None);
        assert_eq!(p.in_flight(1), 2);
        // 4 s on, every holder is overdue or unknown, and expected to need as long again as
        // it has had: 3 (5 s) first, then the others (4 s).
        let t5 = ta + s(4);
        assert_eq!(soon(&mut p, t5, 1, u32::MAX), Pick::Endgame(3));
        assert_eq!(soon(&mut p, t5, 1, u32::MAX), Pick::Endgame(0));
        assert_eq!(soon(&mut p, t5, 1, 1), Pick::Endgame(1));
        // The soonest copy gone, the others' times are not known: as long again as asked.
        p.release(2);
        assert_eq!(p.in_flight(2), 1);
        assert_eq!(soon(&mut p, ta, 1, 2), Pick::None);
        assert_eq!(soon(&mut p, t5, 1, 2), Pick::Endgame(2));
        // Outside endgame: nothing.
        let mut q = Picker::new(Bitfield::new(4), PieceSelection::RarestFirst, 0);
        assert_eq!(q.pick(&all, |i| i != 0, &mut r), Pick::Fresh(0));
        q.note_due(0, t0, Some(t0 + s(100)));
        assert_eq!(soon(&mut q, t0, 1, u32::MAX), Pick::None);
    }

    #[test]
    fn it_should_only_ask_a_peer_for_what_it_has() {
        let mut p = Picker::new(Bitfield::new(3), PieceSelection::Random, 0);
        let mut has = Bitfield::new(3);
        has.set(1);
        let mut r = rng();
        assert_eq!(p.pick(&has, |_| false, &mut r), Pick::Fresh(1));
        assert_eq!(p.pick(&has, |i| i == 1, &mut r), Pick::None);
    }
}
