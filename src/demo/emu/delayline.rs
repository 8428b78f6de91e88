//! A one-way delay line between two TAP queues: every frame read from one side is held for the
//! link's one-way delay, or dropped with the link's loss probability, then written to the other
//! side in order. This kernel has no netem, so delay and loss are done here; the rate is the
//! kernel's (tc tbf on the sending interface), upstream of the line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
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

/// What a line did, for the report.
#[derive(Debug, Default)]
pub(crate) struct LineStats {
    pub(crate) frames: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) overflow: AtomicU64,
}

#[derive(Default)]
struct Held {
    q: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// Start the two threads of one direction; they stop when `stop` is set (within 100 ms).
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
                while !stop.load(Ordering::Relaxed) {
                    if !sys::readable(&from, 100) {
                        continue;
                    }
                    let n = match f.read(&mut buf) {
                        Ok(n) if n > 0 => n,
                        Ok(_) => continue,
                        Err(_) => break, // The device went away: the emulation is ending.
                    };
                    stats.frames.fetch_add(1, Ordering::Relaxed);
                    if loss > 0.0 && rng.gen::<f64>() < loss {
                        stats.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let (lock, cv) = &*held;
                    let mut h = lock.lock().expect("delay line lock");
                    if h.bytes + n > MAX_HELD_BYTES {
                        stats.overflow.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    h.bytes += n;
                    h.q.push_back((Instant::now() + delay, buf[..n].to_vec()));
                    cv.notify_one();
                }
            })?
    };
    let writer = std::thread::Builder::new()
        .name(format!("{name}-out"))
        .spawn(move || {
            let mut f = &*to;
            let (lock, cv) = &*held;
            let mut h = lock.lock().expect("delay line lock");
            while !stop.load(Ordering::Relaxed) {
                let Some(&(due, _)) = h.q.front() else {
                    h = cv
                        .wait_timeout(h, Duration::from_millis(100))
                        .expect("delay line lock")
                        .0;
                    continue;
                };
                let now = Instant::now();
                if due > now {
                    h = cv.wait_timeout(h, due - now).expect("delay line lock").0;
                    continue;
                }
                // Everything due goes out in one batch, outside the lock.
                let mut out = Vec::new();
                while h.q.front().is_some_and(|(d, _)| *d <= now) {
                    let (_, frame) = h.q.pop_front().expect("front");
                    h.bytes -= frame.len();
                    out.push(frame);
                }
                drop(h);
                for frame in out {
                    // A full queue on the far side drops the frame, as a wire would.
                    let _ = f.write(&frame);
                }
                h = lock.lock().expect("delay line lock");
            }
        })?;
    Ok(vec![reader, writer])
}
