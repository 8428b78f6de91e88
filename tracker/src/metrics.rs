//! The tracker's Prometheus metrics: one process-wide registry.
//!
//! Events are counted where they happen with one-line calls (`metrics::tracker().announce(ev)`);
//! the live swarm's size and the database's size are read at scrape time.

use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proto::{Event, FileEntry};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, &'static str)>;

pub struct TrackerMetrics {
    registry: Registry,
    announces: Family<Labels, Counter>,
    /// Connections refused at the limit.
    pub refused: Counter,
    /// Requests answered "busy" (load shedding).
    pub busy: Counter,
    /// Announces that came as UDP datagrams (also counted in `announces`).
    pub datagram_announces: Counter,
    /// Datagrams dropped unread: their source was past its rate.
    pub datagrams_dropped: Counter,
    /// Seconds to commit one batch of changes to SQLite.
    pub batch_commit_seconds: Histogram,
    live_peers: Gauge,
    seeders: Gauge,
    swarms: Gauge,
    db_bytes: Gauge,
    /// Scrapes refill the gauges; one at a time.
    render_lock: Mutex<()>,
}

static TRACKER: LazyLock<TrackerMetrics> = LazyLock::new(TrackerMetrics::new);

pub fn tracker() -> &'static TrackerMetrics {
    &TRACKER
}

impl TrackerMetrics {
    fn new() -> TrackerMetrics {
        let mut m = TrackerMetrics {
            registry: Registry::default(),
            announces: Family::default(),
            refused: Counter::default(),
            busy: Counter::default(),
            datagram_announces: Counter::default(),
            datagrams_dropped: Counter::default(),
            // 100 us to ~6.5 s.
            batch_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            live_peers: Gauge::default(),
            seeders: Gauge::default(),
            swarms: Gauge::default(),
            db_bytes: Gauge::default(),
            render_lock: Mutex::new(()),
        };
        let r = &mut m.registry;
        r.register(
            "shoal_tracker_announces",
            "Announces answered, by event",
            m.announces.clone(),
        );
        r.register(
            "shoal_tracker_refused_connections",
            "Connections refused at the connection limit",
            m.refused.clone(),
        );
        r.register(
            "shoal_tracker_busy_replies",
            "Requests answered busy",
            m.busy.clone(),
        );
        r.register(
            "shoal_tracker_datagram_announces",
            "Announces that came as UDP datagrams",
            m.datagram_announces.clone(),
        );
        r.register(
            "shoal_tracker_datagrams_dropped",
            "Datagrams dropped unread because their source address was past its rate",
            m.datagrams_dropped.clone(),
        );
        r.register(
            "shoal_tracker_batch_commit_seconds",
            "Time to commit one batch of swarm changes to SQLite",
            m.batch_commit_seconds.clone(),
        );
        r.register(
            "shoal_tracker_live_peers",
            "Peer entries in the live swarm (one per file and peer)",
            m.live_peers.clone(),
        );
        r.register(
            "shoal_tracker_seeders",
            "Live peer entries that have the whole file",
            m.seeders.clone(),
        );
        r.register(
            "shoal_tracker_swarms",
            "Files with at least one live peer",
            m.swarms.clone(),
        );
        r.register(
            "shoal_tracker_database_bytes",
            "Size of the SQLite database and its WAL",
            m.db_bytes.clone(),
        );
        m
    }

    /// Count one announce.
    pub fn announce(&self, event: Event) {
        let ev: &'static str = match event {
            Event::Started => "started",
            Event::Progress => "progress",
            Event::Completed => "completed",
            Event::Stopped => "stopped",
        };
        self.announces.get_or_create(&vec![("event", ev)]).inc();
    }

    /// Run one batch commit and record how long it took.
    pub fn timed_commit<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let r = f();
        self.batch_commit_seconds
            .observe(t0.elapsed().as_secs_f64());
        r
    }
}

/// The exposition, with the live-swarm gauges taken from `files`.
pub fn render(files: &[FileEntry], db_bytes: u64) -> String {
    let m = tracker();
    let _one = m.render_lock.lock().unwrap_or_else(|p| p.into_inner());
    let live = files.iter().map(|f| f.seeders + f.leechers).sum::<u64>();
    let seeders = files.iter().map(|f| f.seeders).sum::<u64>();
    m.live_peers.set(i64::try_from(live).unwrap_or(i64::MAX));
    m.seeders.set(i64::try_from(seeders).unwrap_or(i64::MAX));
    m.swarms
        .set(files.iter().filter(|f| f.seeders + f.leechers > 0).count() as i64);
    m.db_bytes.set(i64::try_from(db_bytes).unwrap_or(i64::MAX));
    let mut s = String::new();
    encode(&mut s, &m.registry).expect("encode to String");
    s
}
