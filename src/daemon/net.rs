//! What connections and announcers may use of the daemon: our identity and addresses, the
//! limits, the write pool, the upload cap, sabotage, and the trackers' health. They never see
//! the daemon, the registry or the store.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::bans::Bans;
use super::workers::Workers;
use crate::config::PeerConfig;
use crate::control::TrackerStatus;
use crate::sabotage::Sabotage;
use crate::secure::{Identity, NoiseKeys};

pub struct Net {
    pub cfg: PeerConfig,
    /// Our key; the peer id is its public half.
    pub identity: Arc<Identity>,
    /// This start's Noise static key, signed by `identity`.
    pub noise: NoiseKeys,
    /// The peer id: `identity`'s public key in hex.
    pub peer_id: String,
    /// Incoming connections still in their handshake: a bound, so half-open sockets cannot
    /// take every connection slot.
    pub half_open: Arc<Semaphore>,
    /// Signs announces with `identity`'s key and holds the session with each tracker.
    pub tracker_signer: shoal_tracker::auth::Signer,
    pub listen: SocketAddr,
    /// Outgoing sockets bind here, so trackers and peers see the address we listen on.
    pub bind_ip: Option<IpAddr>,
    pub conn_limit: Arc<Semaphore>,
    /// Pieces held in memory between arrival and write.
    pub verify_limit: Arc<Semaphore>,
    /// Where verified pieces are written.
    pub writers: Workers,
    pub sabotage: Sabotage,
    pub uplink: Arc<Uplink>,
    pub trackers: Mutex<HashMap<String, TrackerHealth>>,
    /// Who may not connect: by key and by address, across torrents.
    pub bans: Bans,
}

impl Net {
    pub fn tracker_status(&self) -> Vec<TrackerStatus> {
        let mut v: Vec<_> = self
            .trackers
            .lock()
            .expect("trackers lock")
            .iter()
            .map(|(a, h)| {
                let mut st = h.status(a);
                st.datagrams = self.cfg.tracker_udp
                    && self.tracker_signer.has_session(a)
                    && h.datagrams_off_until.is_none_or(|t| t <= Instant::now());
                st
            })
            .collect();
        v.sort_by(|a, b| a.addr.cmp(&b.addr));
        v
    }
}

#[derive(Debug, Clone, Default)]
/// What we know of one tracker's reachability, daemon-wide (shown in `status`).
pub struct TrackerHealth {
    pub failures: u32,
    pub next_try: Option<Instant>,
    pub last_ok: Option<i64>,
    pub last_error: Option<String>,
    /// Heartbeats go over TCP until then: a datagram went unanswered (UDP filtered on the way,
    /// or a tracker with `udp = false`).
    pub datagrams_off_until: Option<Instant>,
}

impl TrackerHealth {
    pub fn status(&self, addr: &str) -> TrackerStatus {
        TrackerStatus {
            addr: addr.to_string(),
            reachable: self.failures == 0 && self.last_ok.is_some(),
            last_ok: self.last_ok,
            last_error: self.last_error.clone(),
            failures: self.failures,
            datagrams: false,
        }
    }
}

/// The daemon's uplink: every piece we upload starts through here. Its rate is the
/// operator's cap (`max_upload_rate`), lowered while [`crate::pacer`] finds our uplink
/// queueing; unlimited when neither applies.
pub struct Uplink {
    /// The operator's cap, bytes per second.
    user: Option<f64>,
    /// The pacer's rate (f64 bits; 0: not pacing).
    paced: AtomicU64,
    /// Token bucket: (tokens, last refill).
    bucket: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
    /// The sockets to other hosts, each with the bytes it had acknowledged at the last tick.
    /// The tick reads them all itself: summing the connections' own once-a-second reads
    /// counted a connection twice or not at all when its tick fell near ours (seen: 1.29 MB/s
    /// "sent" in a second on an 8 Mbit/s link, a peak the pacer then cut from).
    socks: Mutex<Vec<(std::sync::Weak<std::os::fd::OwnedFd>, u64)>>,
    /// Least queueing delay any connection measured since the last tick, µs (MAX: none).
    queue_min_us: AtomicU64,
    /// The same over the last tick that had a measure, µs.
    queue_last_us: AtomicU64,
    /// The least distance (RTT floor) of a connection that measured, since the last tick, µs.
    rtt_min_us: AtomicU64,
    rtt_last_us: AtomicU64,
    pacer: Mutex<crate::pacer::Pacer>,
    last_tick: Mutex<Instant>,
}

/// Burst the pacer's rate allows, in seconds of it: short, so a pause does not let a burst
/// refill the queue the pacer drained.
const PACED_BURST_SECS: f64 = 0.25;

impl Uplink {
    pub fn new(user_bytes_per_sec: Option<u64>) -> Uplink {
        Uplink {
            user: user_bytes_per_sec.map(|b| b as f64),
            paced: AtomicU64::new(0),
            bucket: tokio::sync::Mutex::new((0.0, tokio::time::Instant::now())),
            socks: Mutex::new(Vec::new()),
            queue_min_us: AtomicU64::new(u64::MAX),
            queue_last_us: AtomicU64::new(0),
            rtt_min_us: AtomicU64::new(u64::MAX),
            rtt_last_us: AtomicU64::new(0),
            pacer: Mutex::new(crate::pacer::Pacer::default()),
            last_tick: Mutex::new(Instant::now()),
        }
    }

    /// The operator's cap, if any.
    pub fn user_cap(&self) -> Option<f64> {
        self.user
    }

    /// The pacer's current rate, bytes per second, if it is pacing.
    pub fn paced(&self) -> Option<f64> {
        let r = f64::from_bits(self.paced.load(Ordering::Relaxed));
        (r > 0.0).then_some(r)
    }

    fn limit(&self) -> Option<f64> {
        match (self.user, self.paced()) {
            (Some(u), Some(p)) => Some(u.min(p)),
            (u, p) => u.or(p),
        }
    }

    /// A connection to another host: its acknowledged bytes count from now. The entry goes
    /// when the connection drops its socket (so a reused descriptor is never read).
    pub fn register(&self, sock: &Arc<std::os::fd::OwnedFd>) {
        let mark = bytes_acked(sock).unwrap_or(0);
        self.socks
            .lock()
            .expect("uplink sockets lock")
            .push((Arc::downgrade(sock), mark));
    }

    /// Bytes the registered sockets had acknowledged since the last call; forgets the closed.
    fn take_sent(&self) -> u64 {
        let mut sent = 0;
        self.socks
            .lock()
            .expect("uplink sockets lock")
            .retain_mut(|(weak, mark)| {
                let Some(fd) = weak.upgrade() else {
                    return false;
                };
                if let Some(acked) = bytes_acked(&fd) {
                    sent += acked.saturating_sub(*mark);
                    *mark = acked;
                }
                true
            });
        sent
    }

    /// Wait until a piece of `bytes` may start.
    pub async fn acquire(&self, bytes: u64) {
        let Some(rate) = self.limit() else {
            return;
        };
        // The operator's cap allows a second's burst; the pacer's only a moment's.
        let burst = if self.user == Some(rate) {
            1.0
        } else {
            PACED_BURST_SECS
        };
        let mut st = self.bucket.lock().await;
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * rate;
        st.0 = (st.0 + refill).min(rate * burst);
        st.1 = now;
        st.0 -= bytes as f64;
        if st.0 < 0.0 {
            // Holding the lock while sleeping queues the other uploads behind this one: fair.
            let wait = Duration::from_secs_f64(-st.0 / rate);
            tokio::time::sleep(wait).await;
        }
    }

    /// The least queueing our connections measured in the last tick that measured any, µs.
    pub fn queue_now_us(&self) -> u64 {
        self.queue_last_us.load(Ordering::Relaxed)
    }

    /// A connection measured `us` of queueing on the way to its peer, which is `rtt_us`
    /// away (its least RTT sample: the distance, without our queue).
    pub fn report_queue(&self, us: u64, rtt_us: u64) {
        self.queue_min_us.fetch_min(us, Ordering::Relaxed);
        self.rtt_min_us.fetch_min(rtt_us, Ordering::Relaxed);
    }

    /// Once a second: the pacer's step. Returns the least queueing delay seen (ms), if any,
    /// and the rate our uplink carried (bytes per second).
    pub fn tick(&self) -> (Option<f64>, f64) {
        let now = Instant::now();
        let dt = {
            let mut last = self.last_tick.lock().expect("uplink tick lock");
            let dt = now.duration_since(*last).as_secs_f64();
            *last = now;
            dt
        };
        let sent = self.take_sent();
        let q = self.queue_min_us.swap(u64::MAX, Ordering::Relaxed);
        if q != u64::MAX {
            self.queue_last_us.store(q, Ordering::Relaxed);
        }
        let rtt = self.rtt_min_us.swap(u64::MAX, Ordering::Relaxed);
        if rtt != u64::MAX {
            self.rtt_last_us.store(rtt, Ordering::Relaxed);
        }
        let rtt_ms = self.rtt_last_us.load(Ordering::Relaxed) as f64 / 1000.0;
        let q_ms = (q != u64::MAX).then(|| q as f64 / 1000.0);
        if dt <= 0.0 {
            return (q_ms, 0.0);
        }
        let carried = sent as f64 / dt;
        let rate = self
            .pacer
            .lock()
            .expect("pacer lock")
            .on_tick(q_ms, rtt_ms, carried);
        self.paced
            .store(rate.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        (q_ms, carried)
    }
}

/// Let the kernel pace this TCP socket at most `bytes_per_sec` (`SO_MAX_PACING_RATE`; TCP
/// paces by itself with BBR, or under the `fq` qdisc). Best effort: without it, the
/// congestion control's own pacing applies.
pub fn cap_pacing_rate(fd: &std::os::fd::OwnedFd, bytes_per_sec: f64) {
    let v = bytes_per_sec as u64;
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_MAX_PACING_RATE,
        "SO_MAX_PACING_RATE",
        v,
    );
}

/// Bytes of ours a TCP socket's peer has acknowledged (`tcpi_bytes_acked`, Linux 4.1+);
/// None where the kernel does not say.
pub fn bytes_acked(fd: &std::os::fd::OwnedFd) -> Option<u64> {
    use std::os::fd::AsRawFd;
    /// The head of Linux's `struct tcp_info` up to `tcpi_bytes_acked` (uapi/linux/tcp.h);
    /// the kernel fills what fits.
    #[repr(C)]
    #[derive(Default)]
    struct TcpInfoHead {
        bytes: [u8; 8],
        words: [u32; 24],
        pacing_rate: u64,
        max_pacing_rate: u64,
        bytes_acked: u64,
    }
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: getsockopt on an open socket, into a buffer of `len` bytes it may fill.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize >= std::mem::size_of::<TcpInfoHead>()).then_some(info.bytes_acked)
}

/// Receive buffer asked of peer sockets (the kernel doubles it for its bookkeeping).
const RECV_BUFFER: usize = 4 << 20;

/// Give a peer socket, before it connects or listens, a receive buffer sized for a far fast
/// link, where the host allows one that large (`net.core.rmem_max`).
///
/// Why: Linux's receive-window autotuning starts at `tcp_rmem`'s default (128 KiB) and
/// grows the window about once per round trip, by what the application read in the last one.
/// On a 600 ms path that holds a connection to a few hundred KiB per round trip for seconds
/// (measured in the heterogeneous scenario: windows of 56-260 KiB on every connection of the
/// 600 ms peer, 5-10 s into the run; its pieces took 2-6 s each). A buffer set up front lets
/// the window open as fast as the sender's congestion window grows. Where `rmem_max` is
/// smaller (many distributions ship 208 KiB), setting it would cap the window below what
/// autotuning reaches, so the socket is left alone.
pub fn size_recv_buffer(sock: &tokio::net::TcpSocket) {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let allowed = *ALLOWED.get_or_init(|| {
        sysctl_value("/proc/sys/net/core/rmem_max", 0).is_some_and(|max| max >= RECV_BUFFER)
    });
    if allowed {
        // Best effort: the default is what it was without this.
        let _ = sock.set_recv_buffer_size(RECV_BUFFER as u32);
    }
}

/// Send buffer asked of a far connection's socket at most (the kernel doubles it).
const FAR_SEND_BUFFER: usize = 16 << 20;

/// The send buffer to ask of a far connection's socket: the most the host allows
/// (`net.core.wmem_max`, up to [`FAR_SEND_BUFFER`]), or None where that is no more than what
/// autotuning reaches alone (`net.ipv4.tcp_wmem`'s maximum), which setting it would freeze.
fn far_send_buffer() -> Option<usize> {
    static ASK: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *ASK.get_or_init(|| {
        let max = sysctl_value("/proc/sys/net/core/wmem_max", 0)?;
        let auto = sysctl_value("/proc/sys/net/ipv4/tcp_wmem", 2)?;
        let ask = max.min(FAR_SEND_BUFFER);
        (2 * ask > auto).then_some(ask)
    })
}

/// The `field`th number of a sysctl file (`tcp_wmem` holds three).
fn sysctl_value(path: &str, field: usize) -> Option<usize> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .nth(field)?
        .parse()
        .ok()
}

/// Set a socket option whose value is a plain integer of `T`'s size (a `c_int`, or a `u64`
/// for `SO_MAX_PACING_RATE`). Best effort: what fails is logged, and the socket keeps the
/// kernel's default.
pub fn set_option<T: Copy>(
    fd: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    what: &str,
    v: T,
) {
    // SAFETY: setsockopt on an open socket, with a pointer to a `T` and its size; callers
    // pass the integer type the option is documented to take.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(v).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(cause = %std::io::Error::last_os_error(), "{what} not set");
    }
}

/// Give the socket of a far connection (one whose RTT is long) the largest send buffer the
/// host allows. Best effort: without it, autotuning's limit applies.
///
/// Why: the kernel keeps every byte until it is acknowledged, so a connection carries at most
/// its send buffer per round trip. Autotuning stops at `tcp_wmem`'s maximum, 4 MiB by default,
/// of which about two thirds hold data: 4.5 MB/s on a 600 ms path, whatever the link
/// (measured: `sndbuf_limited` in `ss`, 2.7 MB in flight; one seeder to one leecher over
/// 200 Mbit/s and 600 ms, 128 MiB, took 39-40 s, and 26-27 s with the 8 MiB that
/// `wmem_max`'s default of 4 MiB allows). Near connections keep autotuning: their round
/// trip drains the default in time, and a fixed size would hold memory they do not need.
pub fn widen_send_buffer(fd: &impl std::os::fd::AsRawFd) {
    let Some(ask) = far_send_buffer() else {
        return;
    };
    let v = libc::c_int::try_from(ask).unwrap_or(libc::c_int::MAX);
    set_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, "SO_SNDBUF", v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_should_cap_a_connections_pacing_rate() {
        use std::os::fd::{AsFd, AsRawFd};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, _server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let fd = client.as_fd().try_clone_to_owned().unwrap();
        let read = |fd: &std::os::fd::OwnedFd| {
            let mut v: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: getsockopt on an open socket into a u64 and its size.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MAX_PACING_RATE,
                    std::ptr::addr_of_mut!(v).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            v
        };
        let before = read(&fd);
        cap_pacing_rate(&fd, 3_000_000.0);
        assert_eq!(read(&fd), 3_000_000, "was {before}");
    }

    #[tokio::test]
    async fn it_should_size_the_receive_buffer_only_where_the_host_allows_it() {
        let max = sysctl_value("/proc/sys/net/core/rmem_max", 0).unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        let before = sock.recv_buffer_size().unwrap() as usize;
        size_recv_buffer(&sock);
        let after = sock.recv_buffer_size().unwrap() as usize;
        if max >= RECV_BUFFER {
            // The kernel reports twice what was asked (its bookkeeping share).
            assert!(after >= RECV_BUFFER, "rmem_max {max}: buffer {after}");
        } else {
            eprintln!("rmem_max is {max} here: the buffer must stay as the kernel set it");
            assert_eq!(after, before);
        }
    }

    #[tokio::test]
    async fn it_should_widen_a_far_sockets_send_buffer_only_past_what_autotuning_reaches() {
        let max = sysctl_value("/proc/sys/net/core/wmem_max", 0).unwrap();
        let auto = sysctl_value("/proc/sys/net/ipv4/tcp_wmem", 2).unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        let before = sock.send_buffer_size().unwrap() as usize;
        widen_send_buffer(&sock);
        let after = sock.send_buffer_size().unwrap() as usize;
        let ask = max.min(FAR_SEND_BUFFER);
        if 2 * ask > auto {
            // The kernel reports twice what was asked (its bookkeeping share).
            assert_eq!(after, 2 * ask, "wmem_max {max}, tcp_wmem max {auto}");
            assert!(after > auto, "{after} is past autotuning's {auto}");
        } else {
            eprintln!("wmem_max {max} allows no more than autotuning's {auto}: left alone");
            assert_eq!(after, before);
        }
    }
}
