//! Measure what the emulated network really does between two hosts: the round-trip time
//! (TCP connect time, SYN to SYN-ACK) and the one-way loss (numbered UDP datagrams, paced far
//! below the link rate so tc never drops them).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{in_netns, Emulator};

const RTT_SAMPLES: usize = 7;
const LOSS_DATAGRAMS: u32 = 1000;

/// One path's expected and measured figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PathCheck {
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) expected_rtt_ms: f64,
    /// Median of the connect times.
    pub(crate) measured_rtt_ms: f64,
    pub(crate) expected_loss: f64,
    pub(crate) measured_loss: f64,
    /// The first connect to the host, which resolves nothing on the way: one RTT, as on a
    /// real network (NaN if its SYN was lost).
    pub(crate) first_connect_ms: f64,
}

/// Measure from host `from` to each of `to`, all paths at once.
///
/// # Errors
/// A namespace that cannot be entered, or a path that does not answer at all.
pub(crate) fn measure(emu: &Emulator, from: usize, to: &[usize]) -> anyhow::Result<Vec<PathCheck>> {
    std::thread::scope(|s| {
        let jobs: Vec<_> = to
            .iter()
            .map(|&t| s.spawn(move || measure_one(emu, from, t)))
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .map_err(|_| anyhow::anyhow!("measurement panicked"))?
            })
            .collect()
    })
}

fn measure_one(emu: &Emulator, from: usize, to: usize) -> anyhow::Result<PathCheck> {
    let (a, b) = (&emu.hosts[from], &emu.hosts[to]);
    let (tcp, udp) = in_netns(&b.ns, || -> std::io::Result<_> {
        Ok((
            TcpListener::bind((b.ip.as_str(), 0))?,
            UdpSocket::bind((b.ip.as_str(), 0))?,
        ))
    })??;
    let (tcp_addr, udp_addr) = (tcp.local_addr()?, udp.local_addr()?);
    // Sockets keep the namespace they were made in, so the far ends can be served from here.
    tcp.set_nonblocking(true)?;
    udp.set_read_timeout(Some(Duration::from_millis(200)))?;
    let served = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            // Accept (and drop) connections until the measurement is over.
            while !served.load(std::sync::atomic::Ordering::Relaxed) {
                if tcp.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        let counted = s.spawn(|| {
            let mut seen = vec![false; LOSS_DATAGRAMS as usize];
            let mut buf = [0u8; 64];
            let deadline = Instant::now() + Duration::from_secs(20);
            while !served.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(n) = udp.recv(&mut buf) {
                    if n >= 4 {
                        let k = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                        if let Some(v) = seen.get_mut(k as usize) {
                            *v = true;
                        }
                    }
                }
            }
            seen.iter().filter(|&&v| v).count()
        });
        let probe = in_netns(&a.ns, || probe(&a.ip, tcp_addr, udp_addr));
        // Late datagrams: wait one more worst-case one-way delay before counting.
        std::thread::sleep(Duration::from_millis(300) + a.link.delay + b.link.delay);
        served.store(true, std::sync::atomic::Ordering::Relaxed);
        let got = counted.join().unwrap_or(0);
        let (rtt_ms, first_ms) = probe??;
        let expected_loss = 1.0 - (1.0 - a.link.loss) * (1.0 - b.link.loss);
        Ok(PathCheck {
            from: a.name.clone(),
            to: b.name.clone(),
            expected_rtt_ms: 2.0 * (a.link.delay + b.link.delay).as_secs_f64() * 1e3,
            measured_rtt_ms: rtt_ms,
            expected_loss,
            measured_loss: 1.0 - got as f64 / f64::from(LOSS_DATAGRAMS),
            first_connect_ms: first_ms,
        })
    })
}

/// From inside the sending host: connect times (the first, timed apart, then the least of
/// the rest), then the numbered datagrams at 1 per ms.
fn probe(ip: &str, tcp: SocketAddr, udp: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let timeout = Duration::from_secs(8);
    // The first connect, tried again on a lossy link before calling the host silent.
    let t = Instant::now();
    let mut warm = TcpStream::connect_timeout(&tcp, timeout);
    let first_ms = if warm.is_ok() {
        t.elapsed().as_secs_f64() * 1e3
    } else {
        f64::NAN
    };
    for _ in 0..2 {
        if warm.is_ok() {
            break;
        }
        warm = TcpStream::connect_timeout(&tcp, timeout);
    }
    if let Err(e) = warm {
        return Err(anyhow::anyhow!("{tcp} does not answer: {e}"));
    }
    let mut rtts = Vec::new();
    for _ in 0..RTT_SAMPLES {
        let t = Instant::now();
        let c = TcpStream::connect_timeout(&tcp, timeout);
        let took = t.elapsed();
        // The least sample is the path's RTT, as ping's min: the delay line never releases a
        // frame early, so only a lost SYN (a 1 s retransmission) or a busy CPU adds to it.
        if c.is_ok() {
            rtts.push(took.as_secs_f64() * 1e3);
        }
    }
    let sock = UdpSocket::bind((ip, 0))?;
    for k in 0..LOSS_DATAGRAMS {
        let mut d = [0u8; 64];
        d[..4].copy_from_slice(&k.to_be_bytes());
        let _ = sock.send_to(&d, udp);
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok((
        rtts.into_iter().reduce(f64::min).unwrap_or(f64::NAN),
        first_ms,
    ))
}
