//! The `[tracker]` section of `config.toml`. Each default lives in one function, used by both
//! serde and `Default`, so the file, the docs and the code cannot drift apart.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackerConfig {
    /// Address to listen on (HOST:PORT).
    pub listen: String,
    /// SQLite database path.
    pub db: PathBuf,
    /// A peer silent for longer than this leaves the live swarm (an `expired` event).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The heartbeat interval handed to peers in every PEERS reply.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The writer commits what it collected at most this long after the first change.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// History (`events`) older than this is deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// A connection with no frame for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Once a frame has started, the rest must arrive within this time.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Open connections at most. When full, the idlest connection of the address holding the
    /// most is closed to make room, so one address cannot lock out the others.
    pub max_connections: usize,
    /// Open connections from one source address at most; past it that address's idlest
    /// connection is closed to make room.
    pub max_connections_per_addr: usize,
    /// Live (file, peer) entries announced from one source address at most.
    pub max_live_per_addr: usize,
    /// Files one source address may add to the live swarm per minute at most.
    pub max_new_files_per_minute: u32,
    /// Rows waiting for the writer at most; past it announces get `ERROR "busy, retry in N s"`.
    pub max_pending_rows: usize,
    /// Peers in one PEERS reply at most.
    pub max_peers_per_reply: usize,
    /// Believe the `addr` a peer announces instead of the connection's source (overlay networks).
    pub trust_announced_addr: bool,
    /// HTTP address for `/metrics`, the JSON API and the dashboard ("": off).
    pub http: String,
    /// Bearer token the HTTP server requires ("": none; then it listens on loopback only).
    pub http_token: String,
    /// Accept unsigned announces from ids that are not keys (legacy peers). An id shaped like a
    /// key (64 hex digits) must always be signed by it.
    pub allow_unsigned: bool,
    /// Announce sessions kept at most (about 100 bytes each); past it one is dropped at random
    /// and its peer signs again.
    pub max_sessions: usize,
    /// Threads that serve connections. One (a single-threaded runtime of its own) costs the
    /// least CPU per announce: the swarm is one lock anyway, and a second thread mostly adds
    /// wake-ups between threads. More help when signature checks (tens of microseconds each)
    /// dominate. The writer always has a thread of its own.
    pub net_threads: usize,
    /// Also answer announces sent as UDP datagrams on the `listen` port: the heartbeats of
    /// peers holding a session, at about half the CPU of a TCP announce.
    pub udp: bool,
}

fn default_listen() -> String {
    "127.0.0.1:5000".into()
}
fn default_db() -> PathBuf {
    "tracker.db".into()
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            db: default_db(),
            ttl: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            batch_interval: Duration::from_millis(50),
            retention: Duration::from_secs(90 * 24 * 3600),
            idle_timeout: Duration::from_secs(120),
            read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_addr: 256,
            max_live_per_addr: 10_000,
            max_new_files_per_minute: 1_000,
            max_pending_rows: 200_000,
            max_peers_per_reply: 50,
            trust_announced_addr: false,
            http: String::new(),
            http_token: String::new(),
            allow_unsigned: false,
            max_sessions: 1 << 20,
            net_threads: 1,
            udp: true,
        }
    }
}

impl TrackerConfig {
    /// # Errors
    /// A message naming the setting whose value cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval >= self.ttl {
            return Err(format!(
                "tracker.interval ({}) must be shorter than tracker.ttl ({}), or live peers are pruned",
                humantime::format_duration(self.interval),
                humantime::format_duration(self.ttl)
            ));
        }
        if self.ttl.is_zero() || self.batch_interval.is_zero() || self.idle_timeout.is_zero() {
            return Err(
                "tracker.ttl, tracker.batch_interval and tracker.idle_timeout must be over zero"
                    .into(),
            );
        }
        if self.max_connections == 0
            || self.max_connections_per_addr == 0
            || self.max_live_per_addr == 0
            || self.max_new_files_per_minute == 0
            || self.max_pending_rows == 0
            || self.max_sessions == 0
            || self.net_threads == 0
        {
            return Err(
                "tracker.max_connections, max_connections_per_addr, max_live_per_addr, \
                 max_new_files_per_minute, max_pending_rows, max_sessions and net_threads must \
                 be at least 1"
                    .into(),
            );
        }
        Ok(())
    }
}
