//! Smart Swarm: what we know of each remote peer, and how much we ask of it.
//!
//! Two measures, kept apart: the round-trip time (PING/PONG, a windowed minimum so queueing
//! behind pieces does not count as distance) and the throughput (bytes delivered per second
//! while the peer had work). The pipelining depth is their product, the bandwidth-delay
//! product: enough requests to cover [`pipeline_secs`] of the peer's throughput, plus one piece
//! queued behind the one on the wire, clamped between one (so slow peers are still probed)
//! and the configured maximum. Failures scale it down. The uploader bounds what it queues for
//! a peer by the same product ([`pipeline_bytes`]), so the two sides agree without talking.
//! Scores are kept in the store and survive restarts.

use serde::{Deserialize, Serialize};

/// Time beyond two round trips that a pipeline covers: the scheduling and hashing jitter of
/// the two ends, so a link with a tiny RTT (loopback) still has work queued.
pub const PIPELINE_SLACK_SECS: f64 = 0.05;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.2;

/// A leecher whose missing pieces are at least this share of the most any leecher it is
/// connected to misses is among the last to finish ([`lagging`]).
const LAGGING_SHARE: f64 = 0.8;
/// How much deeper a lagging leecher pipelines ([`lagging_slots`]).
const LAGGING_GAIN: f64 = 2.0;

/// Whether a leecher missing `mine` pieces is among the last of its swarm to finish, given
/// what the leechers it is connected to miss (complete peers left out). The swarm is done
/// when its last leecher is, so the last ones should take what uploaders have spare: a
/// pipeline of two round trips of measured throughput is about what BBR keeps in flight
/// alone, so the uploader often has nothing queued for the far peer and idles while it
/// could send. Measured on the heterogeneous scenario (5+5 runs alternated, with
/// [`crate::picker::Picker::in_endgame`]'s rule in both): the last finish 19.9-21.2 s,
/// median 20.3, against 20.3-22.4 s, median 21.0; the 350 and 450 ms leechers 1-2 s sooner.
/// Alone with seeders (no other leecher known), a leecher counts as lagging.
pub fn lagging(mine: u32, others: impl IntoIterator<Item = u32>) -> bool {
    let most = others.into_iter().max().unwrap_or(0);
    f64::from(mine) >= LAGGING_SHARE * f64::from(most)
}

/// Requests to keep outstanding with a peer that gives `slots` by [`PeerScore::slots`], for
/// a leecher that is [`lagging`] or not.
pub fn lagging_slots(slots: usize, lagging: bool, max: usize) -> usize {
    if lagging {
        ((slots as f64 * LAGGING_GAIN).ceil() as usize).min(max)
    } else {
        slots
    }
}

/// Requests to keep outstanding with a peer that gives us `rate` bytes a second, given
/// `slots` by rate and distance: no more than it delivers before we expect to be done at our
/// download rate `down_rate` with `left` bytes to go, and at least one (so it is still used
/// and measured). A thin source's queue otherwise holds pieces every faster source could
/// bring long before: pipelined two deep at 50 kB/s, a far leecher's pieces from a 10 Mbit/s
/// uplink shared by eight waited 10-13 s, and its last second went to them (heterogeneous
/// scenario). Unmeasured rates leave `slots` as they are.
pub fn horizon_slots(slots: usize, rate: f64, left: u64, down_rate: f64, piece_len: u32) -> usize {
    pieces_within(1.0, rate, left, down_rate, piece_len).map_or(slots, |fits| slots.min(fits))
}

/// Pieces a peer that gives us `rate` brings within `horizons` times our expected time to
/// finish (`left` bytes at `down_rate`), at least one; None while either rate is unmeasured.
fn pieces_within(
    horizons: f64,
    rate: f64,
    left: u64,
    down_rate: f64,
    piece_len: u32,
) -> Option<usize> {
    if rate <= 0.0 || down_rate <= 0.0 {
        return None;
    }
    let horizon = horizons * left as f64 / down_rate;
    let fits = (horizon * rate / f64::from(piece_len)).floor();
    Some(fits.max(1.0) as usize) // `as` saturates a huge horizon.
}

/// How many horizons (see [`horizon_slots`]) a request already sent may take before it is
/// cancelled: twice the one new requests stop at, so a rate that wobbles does not send
/// requests back and forth.
const KEEP_HORIZONS: f64 = 2.0;

/// Requests already sent to a peer that gives us `rate` to keep (`None`: not measured): what it
/// brings within [`KEEP_HORIZONS`] of our expected time to finish, and at least one.
pub fn keep_slots(rate: f64, left: u64, down_rate: f64, piece_len: u32) -> Option<usize> {
    pieces_within(KEEP_HORIZONS, rate, left, down_rate, piece_len)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerScore {
    /// Moving average of request-to-piece time, milliseconds (0: not measured): queueing and
    /// transfer included, so it is not the distance to the peer; see `rtt_ms`.
    pub latency_ms: f64,
    /// Round-trip time, milliseconds, from PING/PONG (0: not measured).
    #[serde(default)]
    pub rtt_ms: f64,
    /// Moving average of delivered bytes per second (0: not measured).
    pub throughput: f64,
    /// The last sample of it ([`PeerScore::rate`]); not kept.
    #[serde(skip)]
    pub throughput_last: f64,
    pub pieces_from: u64,
    pub bytes_from: u64,
    pub pieces_to: u64,
    pub bytes_to: u64,
    /// Pieces that failed their hash.
    pub failures: u32,
    /// Requests that timed out or were rejected.
    pub timeouts: u32,
    /// Unix ms until which the peer is banned (0: not banned).
    pub banned_until: i64,
    /// Last address seen, for the tables.
    #[serde(default)]
    pub addr: String,
    #[serde(default)]
    pub port: u16,
    /// Unix ms of the last connection or piece, for evicting the least useful when full.
    #[serde(default)]
    pub last_seen_ms: i64,
}

impl PeerScore {
    pub fn record_piece(&mut self, bytes: u64, latency_ms: f64) {
        self.pieces_from += 1;
        self.bytes_from += bytes;
        self.latency_ms = ewma(self.latency_ms, latency_ms);
    }

    /// A throughput sample: bytes per second delivered over a tick while it had requests.
    pub fn record_throughput(&mut self, bytes_per_sec: f64) {
        self.throughput = ewma(self.throughput, bytes_per_sec);
        self.throughput_last = bytes_per_sec;
    }

    /// The connection's current RTT estimate (its windowed minimum).
    pub fn record_rtt(&mut self, rtt_ms: f64) {
        self.rtt_ms = rtt_ms;
    }

    pub fn success_rate(&self) -> f64 {
        let bad = f64::from(self.failures + self.timeouts);
        let good = self.pieces_from as f64;
        (good + 1.0) / (good + bad + 1.0)
    }

    /// One number for ordering peers: MiB/s one request of a MiB gets from this peer (a round
    /// trip, then the bytes at its throughput), discounted by failures. So of two peers with
    /// the same throughput the nearer scores higher.
    pub fn score(&self) -> f64 {
        if self.throughput <= 0.0 {
            return 0.0;
        }
        let secs = self.rtt_ms / 1000.0 + (1024.0 * 1024.0) / self.throughput;
        self.success_rate() / secs
    }

    /// The throughput a pipeline is sized for: the last sample when it is over the average.
    /// A pipeline sized by the average alone lets the rate grow about 20 % a second, so one
    /// far connection took 9 s to open (one seeder to one leecher over 600 ms, 128 MiB:
    /// 26.1-29.0 s against 22.7-23.1 s with this and the uploader's same rule, 3 runs each).
    pub fn rate(&self) -> f64 {
        self.throughput.max(self.throughput_last)
    }

    /// Requests to keep outstanding with this peer.
    pub fn slots(&self, piece_len: u32, initial: usize, max: usize) -> usize {
        if self.throughput <= 0.0 {
            return initial.min(max);
        }
        let bdp = pipeline_bytes(self.rate(), self.rtt_ms / 1000.0) / f64::from(piece_len);
        let n = ((bdp + 1.0) * self.success_rate()).ceil() as usize;
        n.clamp(1, max)
    }

    pub fn is_banned(&self, now_ms: i64) -> bool {
        self.banned_until > now_ms
    }

    /// Ordering key for eviction: peers that gave or took nothing and were seen longest ago
    /// go first; a live ban is kept over anything else.
    pub fn keep_key(&self, now_ms: i64) -> (bool, u64, i64) {
        (
            self.is_banned(now_ms),
            self.bytes_from + self.bytes_to,
            self.last_seen_ms,
        )
    }
}

/// Seconds of throughput a pipeline covers on a link with this RTT.
pub fn pipeline_secs(rtt_secs: f64) -> f64 {
    2.0 * rtt_secs + PIPELINE_SLACK_SECS
}

/// Bytes a link with this throughput and RTT drains in [`pipeline_secs`].
pub fn pipeline_bytes(bytes_per_sec: f64, rtt_secs: f64) -> f64 {
    bytes_per_sec * pipeline_secs(rtt_secs)
}

/// An exponentially weighted moving average; the first sample is taken whole.
pub fn ewma(old: f64, sample: f64) -> f64 {
    if old <= 0.0 {
        sample
    } else {
        old + ALPHA * (sample - old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_give_fast_peers_deeper_pipelines_than_slow_ones() {
        let mut fast = PeerScore::default();
        let mut slow = PeerScore::default();
        for _ in 0..10 {
            fast.record_piece(1 << 20, 5.0);
            fast.record_throughput(1000.0 * 1048576.0);
            fast.record_rtt(1.0);
            slow.record_piece(1 << 20, 300.0);
            slow.record_throughput(3.0 * 1048576.0);
            slow.record_rtt(300.0);
        }
        assert_eq!(PeerScore::default().slots(1 << 20, 4, 32), 4);
        assert_eq!(fast.slots(1 << 20, 4, 32), 32);
        // 3 MiB/s x (2 x 0.3 s + 0.05 s) = 1.95 MiB in flight, plus one queued.
        assert_eq!(slow.slots(1 << 20, 4, 32), 3);
        slow.failures = 50;
        assert_eq!(
            slow.slots(1 << 20, 4, 32),
            1,
            "failing peers are still probed"
        );
        assert!(fast.score() > slow.score());
    }

    #[test]
    fn it_should_deepen_the_pipelines_of_the_leechers_that_miss_the_most() {
        // 100 missing where another misses 110: among the last; 88 of 110 too (0.8), 87 not.
        assert!(lagging(100, [10, 110, 50]));
        assert!(lagging(88, [110]));
        assert!(!lagging(87, [110]));
        assert!(!lagging(5, [10, 110]));
        // Alone with seeders, or ahead of nobody: lagging.
        assert!(lagging(3, []));
        assert!(lagging(0, [0]));
        assert_eq!(lagging_slots(5, true, 32), 10);
        assert_eq!(lagging_slots(5, false, 32), 5);
        assert_eq!(lagging_slots(20, true, 32), 32, "never over the maximum");
    }

    #[test]
    fn it_should_ask_a_source_for_no_more_than_it_brings_before_we_expect_to_be_done() {
        let mib = 1 << 20;
        // 20 MiB to go at 10 MiB/s: 2 s. A source at 1.5 MiB/s brings 3 pieces in that time.
        let left = 20 * mib as u64;
        let down = 10.0 * f64::from(mib);
        assert_eq!(horizon_slots(8, 1.5 * f64::from(mib), left, down, mib), 3);
        // A fast source keeps what its rate and distance give it.
        assert_eq!(horizon_slots(8, 9.0 * f64::from(mib), left, down, mib), 8);
        // A thin one still gets one, to be used and measured.
        assert_eq!(horizon_slots(8, 10_000.0, left, down, mib), 1);
        // Nothing measured yet: no horizon.
        assert_eq!(horizon_slots(8, 0.0, left, down, mib), 8);
        assert_eq!(horizon_slots(8, 10_000.0, left, 0.0, mib), 8);
    }

    #[test]
    fn it_should_keep_sent_requests_for_twice_the_horizon_new_ones_stop_at() {
        let mib = 1 << 20;
        let left = 20 * mib as u64;
        let down = 10.0 * f64::from(mib);
        // 2 s to go, kept for 4 s: a 1.5 MiB/s source keeps 6 where it is given 3 new ones.
        assert_eq!(keep_slots(1.5 * f64::from(mib), left, down, mib), Some(6));
        assert!(
            keep_slots(1.5 * f64::from(mib), left, down, mib).unwrap()
                >= horizon_slots(64, 1.5 * f64::from(mib), left, down, mib)
        );
        // A thin source keeps the one it is bringing.
        assert_eq!(keep_slots(10_000.0, left, down, mib), Some(1));
        // Nothing measured: nothing is cancelled.
        assert_eq!(keep_slots(0.0, left, down, mib), None);
        assert_eq!(keep_slots(10_000.0, left, 0.0, mib), None);
    }

    #[test]
    fn it_should_size_a_pipeline_for_a_rate_that_just_rose_and_let_it_fall_slowly() {
        let mib = 1048576.0;
        let mut p = PeerScore::default();
        p.record_rtt(600.0);
        for _ in 0..10 {
            p.record_throughput(mib);
        }
        let before = p.slots(1 << 20, 4, 64);
        // A second at 4 MiB/s: the average moves to 1.6, the pipeline is sized for 4.
        p.record_throughput(4.0 * mib);
        assert!(p.throughput < 2.0 * mib);
        assert_eq!(p.rate(), 4.0 * mib);
        let risen = p.slots(1 << 20, 4, 64);
        assert_eq!(risen, (pipeline_secs(0.6) * 4.0 + 1.0).ceil() as usize);
        assert!(risen > before);
        // A slow second after it: the average (1.38 MiB/s), not the sample.
        p.record_throughput(0.5 * mib);
        assert_eq!(p.rate(), p.throughput);
        let fallen = (pipeline_secs(0.6) * p.throughput / mib + 1.0).ceil() as usize;
        assert_eq!(p.slots(1 << 20, 4, 64), fallen);
    }

    #[test]
    fn it_should_rank_the_nearer_of_two_equally_fast_peers_higher_and_pipeline_deeper_to_the_farther(
    ) {
        let mut near = PeerScore::default();
        let mut far = PeerScore::default();
        for p in [&mut near, &mut far] {
            p.record_throughput(10.0 * 1048576.0);
        }
        near.record_rtt(20.0);
        far.record_rtt(600.0);
        assert!(near.score() > far.score());
        assert!(far.slots(1 << 20, 4, 32) > near.slots(1 << 20, 4, 32));
    }
}
