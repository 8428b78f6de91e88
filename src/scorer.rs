//! Smart Swarm: what we know of each remote peer, and how much we ask of it.
//!
//! The pipelining depth for a peer follows its measured bandwidth-delay product: enough
//! requests to keep [`TARGET_QUEUE_SECS`] of its measured throughput in flight, clamped between
//! one (so slow peers are still probed) and the configured maximum. Failures scale it down.
//! Scores are kept in the store and survive restarts.

use serde::{Deserialize, Serialize};

/// Seconds of a peer's throughput we keep requested.
pub const TARGET_QUEUE_SECS: f64 = 0.5;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.2;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerScore {
    /// Moving average of request-to-piece time, milliseconds (0: not measured).
    pub latency_ms: f64,
    /// Moving average of delivered bytes per second (0: not measured).
    pub throughput: f64,
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
    }

    pub fn success_rate(&self) -> f64 {
        let bad = f64::from(self.failures + self.timeouts);
        let good = self.pieces_from as f64;
        (good + 1.0) / (good + bad + 1.0)
    }

    /// One number for ordering peers: delivered MiB/s, discounted by failures.
    pub fn score(&self) -> f64 {
        (self.throughput / (1024.0 * 1024.0)) * self.success_rate()
    }

    /// Requests to keep outstanding with this peer.
    pub fn slots(&self, piece_len: u32, initial: usize, max: usize) -> usize {
        if self.throughput <= 0.0 {
            return initial.min(max);
        }
        let bdp = self.throughput * TARGET_QUEUE_SECS / f64::from(piece_len);
        let n = (bdp * self.success_rate()).ceil() as usize;
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

fn ewma(old: f64, sample: f64) -> f64 {
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
            fast.record_throughput(500.0 * 1048576.0);
            slow.record_piece(1 << 20, 300.0);
            slow.record_throughput(3.0 * 1048576.0);
        }
        assert_eq!(PeerScore::default().slots(1 << 20, 4, 32), 4);
        assert_eq!(fast.slots(1 << 20, 4, 32), 32);
        assert_eq!(slow.slots(1 << 20, 4, 32), 2);
        slow.failures = 50;
        assert_eq!(
            slow.slots(1 << 20, 4, 32),
            1,
            "failing peers are still probed"
        );
        assert!(fast.score() > slow.score());
    }
}
