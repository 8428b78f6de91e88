//! A host's link between two TAP queues, both ways: every frame read from one side is held for
//! the link's one-way delay, or dropped with the link's loss probability, then written to the
//! other side in order. This kernel has no netem, so delay and loss are done here; the rate is
//! the kernel's (tc tbf on the sending interface), upstream of the line.
//!
//! Every frame of every emulated host crosses two links, so their cost per frame is what
//! bounds how much traffic one machine can emulate, and what they take from the peers they
//! carry: one thread per link drains both queues without a poll per frame, and sleeps until
//! the next frame arrives or is due (frames due within [`QUANTUM`] go together).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use super::sys;

/// Bytes a line holds at most; beyond it frames are dropped like a full router buffer
/// (256 Mbit/s held for 1 s fits).
const MAX_HELD_BYTES: usize = 32 << 20;
/// The largest frame a TAP queue gives (MTU up to 64 KiB).
const MAX_FRAME: usize = 65_536 + 64;
/// Frames read from one side before the thread writes what is due and reads the other.
const READ_BATCH: usize = 64;
/// Frames due within this much of the first due one leave with it: a frame leaves at most
/// this early, and the writer wakes once per batch instead of once per frame.
const QUANTUM: Duration = Duration::from_micros(200);

/// What a line did, for the report.
#[derive(Debug, Default)]
pub(crate) struct LineStats {
    pub(crate) frames: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) overflow: AtomicU64,
    /// Frames released more than [`LATE`] after they were due (the machine did not run this
    /// line in time): each adds that much to some packet's RTT.
    pub(crate) late: AtomicU64,
    /// The latest release, microseconds after due.
    pub(crate) late_max_us: AtomicU64,
}

/// Lateness that counts as late.
pub(crate) const LATE: Duration = Duration::from_millis(1);

/// One direction of a host's link, run by [`spawn_link`]'s thread.
struct Direction {
    from: Arc<File>,
    to: Arc<File>,
    held: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    stats: Arc<LineStats>,
    /// The source device went away.
    gone: bool,
}

impl Direction {
    fn new(from: Arc<File>, to: Arc<File>, stats: Arc<LineStats>) -> Direction {
        Direction {
            from,
            to,
            held: VecDeque::new(),
            bytes: 0,
            stats,
            gone: false,
        }
    }

    /// Read what is queued (at most a batch); true if the batch filled (more may wait).
    fn read(&mut self, buf: &mut [u8], delay: Duration, loss: f64, rng: &mut impl Rng) -> bool {
        let mut f = &*self.from;
        let now = Instant::now();
        for _ in 0..READ_BATCH {
            match f.read(buf) {
                Ok(0) => return false,
                Ok(n) => {
                    self.stats.frames.fetch_add(1, Ordering::Relaxed);
                    if loss > 0.0 && rng.gen::<f64>() < loss {
                        self.stats.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if self.bytes + n > MAX_HELD_BYTES {
                        self.stats.overflow.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    self.bytes += n;
                    self.held.push_back((now + delay, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.gone = true;
                    return false;
                }
            }
        }
        true
    }

    /// Send every frame due by `now` (within [`QUANTUM`]).
    fn write_due(&mut self, now: Instant) {
        let horizon = now + QUANTUM;
        let mut f = &*self.to;
        while self.held.front().is_some_and(|(d, _)| *d <= horizon) {
            let (due, frame) = self.held.pop_front().expect("front");
            self.bytes -= frame.len();
            let late = Instant::now().saturating_duration_since(due);
            if late > LATE {
                self.stats.late.fetch_add(1, Ordering::Relaxed);
            }
            self.stats
                .late_max_us
                .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            // A full queue on the far side drops the frame, as a wire would.
            let _ = f.write(&frame);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.held.front().map(|(d, _)| *d)
    }
}

/// Start the one thread that carries both directions of a host's link: frames from `host`
/// (its `eth0`) go to `sw` (its bridge port) and back, each held for `delay` or lost with
/// probability `loss`. One thread that sleeps until the next frame is due or arrives, instead
/// of a reader and a writer per direction handing frames over, whose wake-ups were most of
/// the lines' CPU (`perf` over 8 s of the homogeneous run: the lines took 23 % of both cores,
/// mostly in the scheduler's wake and switch; one thread per link takes 17 %, and releases
/// fewer frames late).
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn_link(
    name: String,
    host: Arc<File>,
    sw: Arc<File>,
    delay: Duration,
    loss: f64,
    stop: Arc<AtomicBool>,
    up_stats: Arc<LineStats>,
    down_stats: Arc<LineStats>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; MAX_FRAME];
        let mut up = Direction::new(host.clone(), sw.clone(), up_stats);
        let mut down = Direction::new(sw.clone(), host.clone(), down_stats);
        // A device that went away ends the link: the emulation is ending.
        while !(stop.load(Ordering::Relaxed) || up.gone || down.gone) {
            let more_up = up.read(&mut buf, delay, loss, &mut rng);
            let more_down = down.read(&mut buf, delay, loss, &mut rng);
            let now = Instant::now();
            up.write_due(now);
            down.write_due(now);
            if more_up || more_down {
                continue; // More may be queued: read again before sleeping.
            }
            let wait = match (up.next_due(), down.next_due()) {
                (Some(a), Some(b)) => a.min(b).saturating_duration_since(now),
                (a, b) => a.or(b).map_or(Duration::from_millis(100), |d| {
                    d.saturating_duration_since(now)
                }),
            };
            sys::readable_either(&host, &sw, wait.min(Duration::from_millis(100)));
        }
    })
}
