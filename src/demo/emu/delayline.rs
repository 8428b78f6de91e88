//! A one-way delay line between two TAP queues: every frame read from one side is held for the
//! link's one-way delay, or dropped with the link's loss probability, then written to the other
//! side in order. This kernel has no netem, so delay and loss are done here; the rate is the
//! kernel's (tc tbf on the sending interface), upstream of the line.
//!
//! Every frame of every emulated host crosses two lines, so their cost per frame is what
//! bounds how much traffic one machine can emulate: the reader drains its queue without a poll
//! per frame and hands frames over in batches, and the writer wakes once per batch (frames
//! due within [`QUANTUM`] go together), not once per frame.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use super::sys;

/// Bytes a line holds at most; beyond it frames are dropped like a full router buffer
/// (256 Mbit/s held for 1 s fits).
const MAX_HELD_BYTES: usize = 32 << 20;
/// The largest frame a TAP queue gives (MTU up to 64 KiB).
const MAX_FRAME: usize = 65_536 + 64;
/// Frames read before they are handed to the writer at most (one lock, one wake-up).
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

#[derive(Default)]
struct Held {
    q: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// Start the two threads of one direction; they stop when `stop` is set (within 100 ms).
/// `from` must be non-blocking ([`sys::open_tap`] opens it so).
pub(crate) fn spawn(
    name: String,
    from: Arc<File>,
    to: Arc<File>,
    delay: Duration,
    loss: f64,
    stop: Arc<AtomicBool>,
    stats: Arc<LineStats>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let held = Arc::new((Mutex::new(Held::default()), Condvar::new()));
    let reader = {
        let (held, stop, stats) = (held.clone(), stop.clone(), stats.clone());
        std::thread::Builder::new()
            .name(format!("{name}-in"))
            .spawn(move || {
                let mut rng = rand::thread_rng();
                let mut buf = vec![0u8; MAX_FRAME];
                let mut f = &*from;
                let mut batch: Vec<(Instant, Vec<u8>)> = Vec::with_capacity(READ_BATCH);
                while !stop.load(Ordering::Relaxed) {
                    // Drain what is queued, then hand it over at once.
                    let mut gone = false;
                    while batch.len() < READ_BATCH {
                        match f.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                stats.frames.fetch_add(1, Ordering::Relaxed);
                                if loss > 0.0 && rng.gen::<f64>() < loss {
                                    stats.lost.fetch_add(1, Ordering::Relaxed);
                                    continue;
                                }
                                batch.push((Instant::now() + delay, buf[..n].to_vec()));
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => {
                                gone = true; // The device went away: the emulation is ending.
                                break;
                            }
                        }
                    }
                    if !batch.is_empty() {
                        let (lock, cv) = &*held;
                        let mut h = lock.lock().expect("delay line lock");
                        // The delay is the same for every frame, so a frame queued behind
                        // others is due after them: only an empty queue's writer needs waking.
                        let was_empty = h.q.is_empty();
                        for (due, frame) in batch.drain(..) {
                            if h.bytes + frame.len() > MAX_HELD_BYTES {
                                stats.overflow.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            h.bytes += frame.len();
                            h.q.push_back((due, frame));
                        }
                        drop(h);
                        if was_empty {
                            cv.notify_one();
                        }
                        continue; // More may be queued: read again before polling.
                    }
                    if gone {
                        break;
                    }
                    sys::readable(&from, 100);
                }
            })?
    };
    let writer = std::thread::Builder::new()
        .name(format!("{name}-out"))
        .spawn(move || {
            let mut f = &*to;
            let (lock, cv) = &*held;
            let mut h = lock.lock().expect("delay line lock");
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Some(&(due, _)) = h.q.front() else {
                    h = cv
                        .wait_timeout(h, Duration::from_millis(100))
                        .expect("delay line lock")
                        .0;
                    continue;
                };
                let now = Instant::now();
                if due > now + QUANTUM {
                    h = cv
                        .wait_timeout(h, due - now - QUANTUM / 2)
                        .expect("delay line lock")
                        .0;
                    continue;
                }
                // Everything due (within the quantum) goes out in one batch, outside the lock.
                let horizon = now + QUANTUM;
                while h.q.front().is_some_and(|(d, _)| *d <= horizon) {
                    let (due, frame) = h.q.pop_front().expect("front");
                    h.bytes -= frame.len();
                    out.push((due, frame));
                }
                drop(h);
                for (due, frame) in out.drain(..) {
                    let late = Instant::now().saturating_duration_since(due);
                    if late > LATE {
                        stats.late.fetch_add(1, Ordering::Relaxed);
                    }
                    stats
                        .late_max_us
                        .fetch_max(late.as_micros() as u64, Ordering::Relaxed);
                    // A full queue on the far side drops the frame, as a wire would.
                    let _ = f.write(&frame);
                }
                h = lock.lock().expect("delay line lock");
            }
        })?;
    Ok(vec![reader, writer])
}
