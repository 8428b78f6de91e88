//! What connections and announcers may use of the daemon: our identity and addresses, the
//! limits, the write pool, the upload cap, sabotage, and the trackers' health. They never see
//! the daemon, the registry or the store.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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
    pub upload_limit: Option<RateLimiter>,
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

/// A token bucket shared by every upload of the daemon.
pub struct RateLimiter {
    bytes_per_sec: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            bytes_per_sec: bytes_per_sec as f64,
            state: tokio::sync::Mutex::new((0.0, tokio::time::Instant::now())),
        }
    }

    /// Wait until `bytes` may be sent. Up to one second of burst is allowed.
    pub async fn acquire(&self, bytes: u64) {
        let mut st = self.state.lock().await;
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.bytes_per_sec;
        st.0 = (st.0 + refill).min(self.bytes_per_sec);
        st.1 = now;
        st.0 -= bytes as f64;
        if st.0 < 0.0 {
            // Holding the lock while sleeping queues the other uploads behind this one: fair.
            let wait = Duration::from_secs_f64(-st.0 / self.bytes_per_sec);
            tokio::time::sleep(wait).await;
        }
    }
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
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|max| max >= RECV_BUFFER)
    });
    if allowed {
        // Best effort: the default is what it was without this.
        let _ = sock.set_recv_buffer_size(RECV_BUFFER as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_should_size_the_receive_buffer_only_where_the_host_allows_it() {
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
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
}
