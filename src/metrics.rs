//! The peer's Prometheus metrics: one process-wide registry.
//!
//! Two kinds of figures. Event counters and the flush histogram are bumped where the event
//! happens, with one-line calls (`metrics::peer().pieces_verified.inc()`), so they count every
//! event even between scrapes. Per-torrent figures (pieces, bytes, rates, peers, RTT) are
//! already in the daemon's status report; [`render`] copies them from it at scrape time instead
//! of keeping a second bookkeeping in step.
//!
//! Labels are info hashes and peer ids only (hex and ids the daemon checked), never names from
//! descriptors: a label value is written as is, and a stranger's quote or newline would break
//! the exposition.

use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::control::StatusReport;

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, AtomicU64>;

/// Per-torrent series kept at most for this many torrents, and RTT series for this many peers
/// per torrent: a scrape stays small whatever the daemon holds.
const MAX_TORRENT_SERIES: usize = 1000;
const MAX_PEER_SERIES: usize = 200;

pub struct PeerMetrics {
    registry: Registry,
    pub pieces_verified: Counter,
    pub pieces_rejected: Counter,
    pub bytes_downloaded: Counter,
    pub bytes_uploaded: Counter,
    pub bans: Counter,
    pub disk_errors: Counter,
    /// Seconds of one data-file sync (step 2 of the flush).
    pub flush_seconds: Histogram,
    peers_connected: Gauge,
    torrents: Gauge,
    torrent_pieces_have: Family<Labels, Gauge>,
    torrent_pieces_total: Family<Labels, Gauge>,
    torrent_bytes_downloaded: Family<Labels, Gauge>,
    torrent_bytes_uploaded: Family<Labels, Gauge>,
    torrent_down_rate: Family<Labels, FGauge>,
    torrent_up_rate: Family<Labels, FGauge>,
    torrent_rejected: Family<Labels, Gauge>,
    torrent_peers_connected: Family<Labels, Gauge>,
    peer_rtt_seconds: Family<Labels, FGauge>,
    /// The uplink pacer's rate (0: not pacing) and the queueing it last measured.
    pub uplink_paced_rate: FGauge,
    pub uplink_queue_seconds: FGauge,
    /// Scrapes refill the per-torrent series; one at a time.
    render_lock: Mutex<()>,
}

static PEER: LazyLock<PeerMetrics> = LazyLock::new(PeerMetrics::new);

/// The process's metrics.
pub fn peer() -> &'static PeerMetrics {
    &PEER
}

/// Run a data sync and record how long it took; a failure counts as a disk error.
pub fn timed_sync<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let t0 = Instant::now();
    let r = f();
    peer().flush_seconds.observe(t0.elapsed().as_secs_f64());
    if r.is_err() {
        peer().disk_errors.inc();
    }
    r
}

impl PeerMetrics {
    /// One piece of `bytes` received, verified and written.
    pub fn verified(&self, bytes: u64) {
        self.pieces_verified.inc();
        self.bytes_downloaded.inc_by(bytes);
    }

    fn new() -> PeerMetrics {
        let m = PeerMetrics {
            registry: Registry::default(),
            pieces_verified: Counter::default(),
            pieces_rejected: Counter::default(),
            bytes_downloaded: Counter::default(),
            bytes_uploaded: Counter::default(),
            bans: Counter::default(),
            disk_errors: Counter::default(),
            // 100 us to ~6.5 s.
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            peers_connected: Gauge::default(),
            torrents: Gauge::default(),
            torrent_pieces_have: Family::default(),
            torrent_pieces_total: Family::default(),
            torrent_bytes_downloaded: Family::default(),
            torrent_bytes_uploaded: Family::default(),
            torrent_down_rate: Family::default(),
            torrent_up_rate: Family::default(),
            torrent_rejected: Family::default(),
            torrent_peers_connected: Family::default(),
            peer_rtt_seconds: Family::default(),
            uplink_paced_rate: FGauge::default(),
            uplink_queue_seconds: FGauge::default(),
            render_lock: Mutex::new(()),
        };
        let mut m = m;
        let r = &mut m.registry;
        r.register(
            "shoal_pieces_verified",
            "Pieces received, verified and written",
            m.pieces_verified.clone(),
        );
        r.register(
            "shoal_pieces_rejected",
            "Pieces received that failed their SHA-256 and were discarded",
            m.pieces_rejected.clone(),
        );
        r.register(
            "shoal_downloaded_bytes",
            "Bytes of verified pieces received",
            m.bytes_downloaded.clone(),
        );
        r.register(
            "shoal_uploaded_bytes",
            "Bytes of pieces served to other peers",
            m.bytes_uploaded.clone(),
        );
        r.register(
            "shoal_bans",
            "Peers banned for sending corrupt pieces",
            m.bans.clone(),
        );
        r.register(
            "shoal_disk_errors",
            "Data-file syncs that failed",
            m.disk_errors.clone(),
        );
        r.register(
            "shoal_flush_seconds",
            "Time to make a batch of verified pieces durable (data-file sync)",
            m.flush_seconds.clone(),
        );
        r.register(
            "shoal_peers_connected",
            "Peer connections open, all torrents",
            m.peers_connected.clone(),
        );
        r.register(
            "shoal_torrents",
            "Torrents in this peer",
            m.torrents.clone(),
        );
        r.register(
            "shoal_torrent_pieces_have",
            "Pieces verified, by torrent",
            m.torrent_pieces_have.clone(),
        );
        r.register(
            "shoal_torrent_pieces",
            "Pieces in the torrent",
            m.torrent_pieces_total.clone(),
        );
        r.register(
            "shoal_torrent_downloaded_bytes",
            "Bytes downloaded, by torrent (kept across restarts)",
            m.torrent_bytes_downloaded.clone(),
        );
        r.register(
            "shoal_torrent_uploaded_bytes",
            "Bytes uploaded, by torrent (kept across restarts)",
            m.torrent_bytes_uploaded.clone(),
        );
        r.register(
            "shoal_torrent_download_rate_bytes_per_second",
            "Download throughput, by torrent",
            m.torrent_down_rate.clone(),
        );
        r.register(
            "shoal_torrent_upload_rate_bytes_per_second",
            "Upload throughput, by torrent",
            m.torrent_up_rate.clone(),
        );
        r.register(
            "shoal_torrent_rejected_pieces",
            "Pieces rejected this session, by torrent",
            m.torrent_rejected.clone(),
        );
        r.register(
            "shoal_torrent_peers_connected",
            "Connected peers, by torrent",
            m.torrent_peers_connected.clone(),
        );
        r.register(
            "shoal_peer_rtt_seconds",
            "Measured piece latency of each known peer, by torrent",
            m.peer_rtt_seconds.clone(),
        );
        r.register(
            "shoal_uplink_paced_rate_bytes_per_second",
            "Rate the uplink pacer holds our uploads to while our uplink queues (0: not pacing)",
            m.uplink_paced_rate.clone(),
        );
        r.register(
            "shoal_uplink_queue_seconds",
            "Least one-way queueing delay our connections measured in the last second",
            m.uplink_queue_seconds.clone(),
        );
        m
    }

    /// Copy the status report's figures into the per-torrent series (dropping the series of
    /// torrents that are gone).
    fn observe(&self, r: &StatusReport) {
        for f in [
            &self.torrent_pieces_have,
            &self.torrent_pieces_total,
            &self.torrent_bytes_downloaded,
            &self.torrent_bytes_uploaded,
            &self.torrent_rejected,
            &self.torrent_peers_connected,
        ] {
            f.clear();
        }
        self.torrent_down_rate.clear();
        self.torrent_up_rate.clear();
        self.peer_rtt_seconds.clear();
        self.torrents.set(r.torrents.len() as i64);
        let mut connected_total = 0i64;
        for t in r.torrents.iter().take(MAX_TORRENT_SERIES) {
            let l: Labels = vec![("info_hash", t.info_hash.clone())];
            let connected = t.peers.iter().filter(|p| p.connected).count() as i64;
            connected_total += connected;
            self.torrent_pieces_have
                .get_or_create(&l)
                .set(i64::from(t.have));
            self.torrent_pieces_total
                .get_or_create(&l)
                .set(i64::from(t.pieces));
            self.torrent_bytes_downloaded
                .get_or_create(&l)
                .set(i64::try_from(t.downloaded).unwrap_or(i64::MAX));
            self.torrent_bytes_uploaded
                .get_or_create(&l)
                .set(i64::try_from(t.uploaded).unwrap_or(i64::MAX));
            self.torrent_rejected
                .get_or_create(&l)
                .set(i64::try_from(t.rejected_pieces).unwrap_or(i64::MAX));
            self.torrent_peers_connected
                .get_or_create(&l)
                .set(connected);
            self.torrent_down_rate.get_or_create(&l).set(t.down_rate);
            self.torrent_up_rate.get_or_create(&l).set(t.up_rate);
            for p in t.peers.iter().take(MAX_PEER_SERIES) {
                if p.latency_ms > 0.0 && is_plain_label(&p.peer_id) {
                    let pl: Labels = vec![
                        ("info_hash", t.info_hash.clone()),
                        ("peer_id", p.peer_id.clone()),
                    ];
                    self.peer_rtt_seconds
                        .get_or_create(&pl)
                        .set(p.latency_ms / 1000.0);
                }
            }
        }
        self.peers_connected.set(connected_total);
    }
}

/// Peer ids are 1-64 chars chosen by the remote; only quiet ones become label values.
fn is_plain_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// The exposition (OpenMetrics text, which Prometheus reads), with the per-torrent series
/// taken from `report`.
pub fn render(report: &StatusReport) -> String {
    let m = peer();
    let _one = m.render_lock.lock().unwrap_or_else(|p| p.into_inner());
    m.observe(report);
    let mut s = String::new();
    // Writing to a String cannot fail.
    encode(&mut s, &m.registry).expect("encode to String");
    s
}

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
