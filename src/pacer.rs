//! Upload pacing: keep our own uplink from queueing in front of our downloads.
//!
//! Why: on an asymmetric link (a home uplink of 10 Mbit/s under a 100 Mbit/s downlink) our
//! uploads fill the uplink's queue, and the ACKs and REQUESTs of our *downloads* wait behind
//! them. A BBR sender keeps at most about two of its minimum RTTs of data in flight, so a
//! 40 ms path whose ACKs queue 110 ms runs at about half its rate. Measured in the
//! heterogeneous scenario: the 10 Mbit/s leecher's flows from the seeder had an RTT of
//! 150 ms for 40, it downloaded at 4-6 of 11.9 MiB/s and finished last but one; with its
//! upload capped by hand at 85 % of its link it finished first. Real clients avoid this with
//! LEDBAT (RFC 6817, uTP's congestion control); we keep TCP and apply the idea to the rate
//! our pieces go out at, part by part.
//!
//! The signal: a PONG carries the responder's clock when our PING arrived, so each
//! connection yields a one-way delay, ours to it, up to a constant (the clocks' offset). Its
//! windowed minimum is the path's base; what is above it is queueing on our uplink, on the
//! peer's downlink, or behind our own bytes on that connection. The least over all
//! connections in a tick is our uplink's: every sample waits in our queue, only some in a
//! busy downlink (a seeder's downlink is idle: the path to it reads our queue alone).
//! [`Pacer`] turns it into a rate.

use std::time::{Duration, Instant};

/// Queueing delay above which the pacer holds our uplink under its capacity, at the least:
/// above the jitter of a busy host's scheduler.
pub const TARGET_MS: f64 = 25.0;
/// ... and at the most the RTT to our nearest peer (its least sample, the distance): a
/// shorter queue costs our downloads nothing (a BBR sender's window covers two of its RTTs),
/// so pacing it away would only cost upload. Measured: with a flat 25 ms target the far and
/// fast leechers paced too (heterogeneous, 21.5-23.7 s against 22.2-22.3 s unpaced). With
/// half the RTT, a 100 Mbit/s leecher 40 ms from everyone paced at the odd tick of 27-33 ms
/// and stayed at 51-77 % of its link for the rest of the run (homogeneous, 4 + 4 runs
/// alternated: 12.6-13.5 s against 12.3-12.7 s with the whole RTT, which still paces the
/// 10 Mbit/s leecher of the heterogeneous scenario: its queue reads about 110 ms for a
/// nearest RTT of 40).
const TARGET_RTT_SHARE: f64 = 1.0;
/// While queueing, pieces go out at this share of the fastest rate our uplink has carried
/// lately (its capacity, when it was the bottleneck): the queue drains at the rest.
const BACKOFF: f64 = 0.85;
/// The peak is the highest median of this many consecutive ticks' rates: a tick that
/// counted a connection's bytes twice (its own tick fell twice in ours) is not a peak, and a
/// rate that just rose counts after two ticks (a mean of five held a thin uplink at a quarter
/// of its rate for ten seconds: the ticks before its uploads began).
const MEDIAN_TICKS: usize = 3;
/// With no queue at all the paced rate rises this much a tick, and less the nearer the queue
/// is to the target. (Rising only when the queue read under 2 ms held a homogeneous swarm's
/// leechers at 51-77 % of their uplinks: there the queue is mostly the busy peers'.)
const RAISE: f64 = 1.1;
/// Ticks (seconds) over which the fastest rate is remembered.
const PEAK_TICKS: usize = 30;
/// The rate never goes under this, bytes per second.
pub const MIN_RATE: f64 = 32.0 * 1024.0;
/// Ticks without a measure, or with far less to send than the paced rate, after which
/// pacing stops.
const IDLE_TICKS: u32 = 5;
/// A base older than this is replaced: the two clocks drift apart (tens of ppm).
const BASE_WINDOW: Duration = Duration::from_secs(60);

/// Microseconds since this process's first call, plus one (0 means "not given" on the wire).
/// A moment before the first call reads 1.
pub fn clock_us(at: Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    at.saturating_duration_since(origin).as_micros() as u64 + 1
}

/// One connection's base one-way delay: the minimum of its samples over the last one or two
/// windows (two buckets, so the minimum never jumps to a fresh, empty window).
#[derive(Debug, Default)]
pub struct OwdBase {
    current: Option<(i64, Instant)>,
    previous: Option<i64>,
}

impl OwdBase {
    /// Take a raw sample (the peer's clock minus ours, µs) and return the queueing above the
    /// base, µs. `queue_now_us`: the queueing our other connections see now. A connection's
    /// first sample may come while our queue is full (a peer that joins late); taken as its
    /// base, every later sample would read that queue as none, and the least over all
    /// connections too (seen: new connections reading 0 while the others read 95-125 ms).
    /// So its base starts that much under its first sample.
    pub fn sample(&mut self, raw_us: i64, now: Instant, queue_now_us: u64) -> u64 {
        match &mut self.current {
            Some((min, since)) if now.duration_since(*since) < BASE_WINDOW => {
                *min = (*min).min(raw_us);
            }
            None => {
                let q = i64::try_from(queue_now_us).unwrap_or(i64::MAX);
                self.current = Some((raw_us.saturating_sub(q), now));
            }
            _ => {
                self.previous = self.current.map(|(m, _)| m);
                self.current = Some((raw_us, now));
            }
        }
        let cur = self.current.map_or(raw_us, |(m, _)| m);
        let base = self.previous.map_or(cur, |p| p.min(cur));
        (raw_us - base).max(0) as u64
    }
}

/// The uplink's rate controller, ticked about once a second with the least queueing delay
/// any connection saw in the tick and the rate our pieces went out at.
///
/// Why not cut further while the queue stays: the least delay over our connections is our
/// uplink's queue only if one of the peers' downlinks is idle. When every downlink is busy
/// (every leecher downloading at its full rate) their queues remain whatever we send; cutting
/// on would take our upload to nothing (seen in a first version: 32 KiB/s within 4 s). So
/// the rate is held at most one more [`BACKOFF`] step under [`BACKOFF`] of the peak, which
/// drains a queue of ours and costs at most about a quarter of our upload when the queue is
/// someone else's.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Bytes per second our pieces may go out at; None: not pacing.
    rate: Option<f64>,
    /// The rates of the last [`PEAK_TICKS`] ticks.
    recent: std::collections::VecDeque<f64>,
    idle: u32,
}

impl Pacer {
    /// One tick. `queue_ms`: None if no connection measured anything this tick.
    pub fn on_tick(
        &mut self,
        queue_ms: Option<f64>,
        nearest_rtt_ms: f64,
        sent_per_sec: f64,
    ) -> Option<f64> {
        // A queue shorter than our nearest peer's RTT costs our downloads nothing (a BBR
        // sender's window covers two of its RTTs): pacing it away would cost upload.
        let target_ms = TARGET_MS.max(TARGET_RTT_SHARE * nearest_rtt_ms);
        if self.recent.len() == PEAK_TICKS {
            self.recent.pop_front();
        }
        self.recent.push_back(sent_per_sec);
        let peak = peak_median(&self.recent);
        self.rate = match (queue_ms, self.rate) {
            (Some(q), None) if q > target_ms => {
                self.idle = 0;
                // What went out this tick counts too: the queue says the link is full now,
                // whatever the ticks before (while our uploads began) say.
                Some((BACKOFF * peak.max(sent_per_sec)).max(MIN_RATE))
            }
            (Some(q), Some(r)) if q > target_ms => {
                self.idle = 0;
                // Already pacing: under the rate that queued, if that is less than the peak,
                // but never further than one more step under the peak (module doc). Not this
                // tick's rate alone: acknowledgements bunch (a delay line or a host that
                // stalls), and one second read 1.46 MB/s on an 8 Mbit/s link.
                let base = r.min(peak).max(BACKOFF * peak);
                Some((BACKOFF * base).max(MIN_RATE))
            }
            (_, None) => None,
            (q, Some(r)) => {
                if q.is_none() || sent_per_sec < 0.5 * r {
                    self.idle += 1;
                } else {
                    self.idle = 0;
                }
                // Under the target, probe upward in proportion to the room left (LEDBAT's
                // rule, RFC 6817): a rate set while our flows were still starting is low, and
                // a busy swarm's queues (its peers' downlinks) seldom read empty.
                // Never far above what the link has carried: on a thin link the rate would
                // float over the link's, and the bursts it then allows read as a higher peak
                // (measured: cut to 1.03 MB/s on an 8 Mbit/s link, which drains nothing).
                let next = match q {
                    Some(q) if q < target_ms => {
                        let carried = peak.max(sent_per_sec);
                        (r * (1.0 + (RAISE - 1.0) * (1.0 - q / target_ms))).min(RAISE * carried)
                    }
                    _ => r,
                };
                (self.idle < IDLE_TICKS).then_some(next)
            }
        };
        self.rate
    }
}

/// The highest median of [`MEDIAN_TICKS`] consecutive rates (of all of them, if fewer).
fn peak_median(rates: &std::collections::VecDeque<f64>) -> f64 {
    let v: Vec<f64> = rates.iter().copied().collect();
    let w = MEDIAN_TICKS.min(v.len()).max(1);
    v.windows(w)
        .map(|x| {
            let mut x = x.to_vec();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_measure_queueing_above_the_base_whatever_the_clocks_offset() {
        let t0 = Instant::now();
        let mut b = OwdBase::default();
        let offset = -7_000_000_000i64;
        assert_eq!(
            b.sample(offset + 20_000, t0, 0),
            0,
            "the first sample is the base"
        );
        assert_eq!(b.sample(offset + 25_000, t0, 0), 5_000);
        assert_eq!(
            b.sample(offset + 18_000, t0, 0),
            0,
            "a lower sample is the new base"
        );
        assert_eq!(b.sample(offset + 118_000, t0, 0), 100_000);
        // A window later the old base still counts; two windows later it is gone.
        let later = t0 + BASE_WINDOW + Duration::from_secs(1);
        assert_eq!(b.sample(offset + 30_000, later, 0), 12_000);
        let much_later = later + BASE_WINDOW + Duration::from_secs(1);
        assert_eq!(b.sample(offset + 40_000, much_later, 0), 10_000);
        let even_later = much_later + BASE_WINDOW + Duration::from_secs(1);
        b.sample(offset + 40_000, even_later, 0);
        assert_eq!(b.sample(offset + 41_000, even_later, 0), 1_000);
    }

    #[test]
    fn it_should_take_a_late_connections_first_sample_as_queued_as_the_others_say() {
        let t0 = Instant::now();
        let mut late = OwdBase::default();
        // Joining while our queue holds 100 ms: its first sample reads that queue, not 0.
        assert_eq!(late.sample(500_000, t0, 100_000), 100_000);
        assert_eq!(late.sample(430_000, t0, 100_000), 30_000);
        assert_eq!(
            late.sample(390_000, t0, 100_000),
            0,
            "a lower sample still wins"
        );
    }

    #[test]
    fn it_should_pace_under_the_peak_while_queueing_and_stop_when_idle() {
        let mut p = Pacer::default();
        assert_eq!(
            p.on_tick(Some(5.0), 40.0, 1.0e6),
            None,
            "no queue: no pacing"
        );
        assert_eq!(p.on_tick(None, 40.0, 1.2e6), None);
        for _ in 0..3 {
            assert_eq!(p.on_tick(Some(0.0), 40.0, 1.1e6), None);
        }
        // 100 ms of queue: paced under the best median of 3 ticks lately (1.2, 1.1 x 4).
        let r = p.on_tick(Some(100.0), 40.0, 1.1e6).unwrap();
        assert!((r - BACKOFF * 1.1e6).abs() < 1.0, "{r}");
        // The queue stays (someone else's): one step further, then held there.
        let held = BACKOFF * BACKOFF * 1.1e6;
        let r = p.on_tick(Some(90.0), 40.0, r).unwrap();
        assert!((r - held).abs() < 1.0, "{r}");
        assert_eq!(p.on_tick(Some(90.0), 40.0, r), Some(r));
        // Under the target: raised, less the nearer the queue is to it; none: a whole step.
        let r1 = p.on_tick(Some(30.0), 40.0, r).unwrap();
        assert!((r1 - r * (1.0 + (RAISE - 1.0) * 0.25)).abs() < 1.0, "{r1}");
        let r2 = p.on_tick(Some(0.0), 40.0, r1).unwrap();
        assert!((r2 - r1 * RAISE).abs() < 1.0, "{r2}");
        // Queueing again: back under the peak.
        let r3 = p.on_tick(Some(60.0), 40.0, r2).unwrap();
        assert!(r3 < r2, "{r3} < {r2}");
        // Little to send, or nothing measured, for a while: pacing stops.
        let mut last = Some(r3);
        for _ in 0..IDLE_TICKS {
            last = p.on_tick(Some(0.0), 40.0, 1000.0);
        }
        assert_eq!(last, None);
        let mut p = Pacer::default();
        p.on_tick(Some(100.0), 40.0, 1e6).unwrap();
        for _ in 0..IDLE_TICKS {
            last = p.on_tick(None, 40.0, 1e6);
        }
        assert_eq!(last, None);
        // Never under the floor.
        let mut p = Pacer::default();
        assert_eq!(p.on_tick(Some(500.0), 40.0, 10.0), Some(MIN_RATE));
    }

    #[test]
    fn it_should_let_a_queue_shorter_than_the_nearest_rtt_be() {
        // 300 ms of queue when the nearest peer is 350 ms away: not paced; 30 ms when it is
        // 40 ms away: not paced either (the flat target alone would).
        let mut p = Pacer::default();
        assert_eq!(p.on_tick(Some(300.0), 350.0, 2.5e6), None);
        assert_eq!(p.on_tick(Some(30.0), 40.0, 2.5e6), None);
        assert_eq!(p.on_tick(Some(400.0), 350.0, 2.5e6), Some(BACKOFF * 2.5e6));
    }

    #[test]
    fn it_should_take_neither_a_lone_spike_nor_the_ticks_before_a_rise_for_the_peak() {
        let mut p = Pacer::default();
        for r in [0.0, 0.0, 0.0, 1.0e6, 3.0e6, 1.0e6, 1.0e6] {
            p.on_tick(None, 40.0, r);
        }
        assert_eq!(p.on_tick(Some(100.0), 40.0, 1.0e6), Some(BACKOFF * 1.0e6));
        // Queueing in the first tick our uploads went out: that tick's rate is the peak.
        let mut p = Pacer::default();
        p.on_tick(None, 40.0, 0.0);
        p.on_tick(None, 40.0, 0.0);
        assert_eq!(p.on_tick(Some(60.0), 40.0, 1.0e6), Some(BACKOFF * 1.0e6));
    }

    #[test]
    fn it_should_rise_under_the_target_but_not_far_over_what_the_link_carried() {
        // A thin link carries 1 MB/s whatever the rate allows.
        let mut p = Pacer::default();
        let mut r = p.on_tick(Some(100.0), 40.0, 1e6).unwrap();
        for _ in 0..20 {
            r = p.on_tick(Some(0.0), 40.0, 1e6).unwrap();
        }
        assert!((r - RAISE * 1e6).abs() < 1.0, "{r}");
        // Then a queue, in a second whose acknowledgements bunched (1.46 MB/s read): cut
        // under the link's rate, not from that second.
        let cut = p.on_tick(Some(30.0), 20.0, 1.46e6).unwrap();
        assert!((cut - BACKOFF * 1e6).abs() < 1.0, "{cut}");
        // Carrying more as it rises (a link that was not full), it rises on.
        let mut p = Pacer::default();
        let mut r = p.on_tick(Some(100.0), 40.0, 1e6).unwrap();
        for _ in 0..20 {
            r = p.on_tick(Some(0.0), 40.0, r).unwrap();
        }
        assert!(r > 3e6, "{r}");
    }

    #[test]
    fn it_should_forget_a_peak_older_than_its_window() {
        let mut p = Pacer::default();
        p.on_tick(None, 40.0, 5e6);
        for _ in 0..PEAK_TICKS {
            p.on_tick(None, 40.0, 1e6);
        }
        assert_eq!(p.on_tick(Some(100.0), 40.0, 1e6), Some(BACKOFF * 1e6));
    }
}
