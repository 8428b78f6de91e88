//! Tracker load: N persistent client connections on loopback announcing as fast as they can
//! for a fixed time against a real `shoal tracker run` with its SQLite database on disk.
//! Reports announces per second and latency percentiles, then checks durability: every live
//! peer is in the database with a last_seen no older than the run's end minus a second.
//!
//! Run: `cargo bench --bench tracker_load` (SHOAL_BENCH_CLIENTS, SHOAL_BENCH_SECS,
//! SHOAL_BENCH_FILES, SHOAL_BENCH_NUMWANT, SHOAL_BENCH_DEPTH to vary).

#[path = "common.rs"]
mod common;

use std::time::{Duration, Instant};

use shoal_tracker::client::TrackerClient;
use shoal_tracker::proto::{Announce, Event, Request, Response};

fn main() {
    let clients = common::env_or("SHOAL_BENCH_CLIENTS", 1000);
    // Live peers; each client announces for peers/clients of them in turn.
    let peers = common::env_or("SHOAL_BENCH_PEERS", 1000).max(clients);
    let secs = common::env_or("SHOAL_BENCH_SECS", 10);
    let files = common::env_or("SHOAL_BENCH_FILES", 50);
    let numwant = std::env::var("SHOAL_BENCH_NUMWANT")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    let depth = common::env_or("SHOAL_BENCH_DEPTH", 1) as usize;
    let dir = common::bench_dir();
    let db = dir.path().join("tracker.db");
    let tracker = common::spawn(
        dir.path(),
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            db.to_str().unwrap(),
        ],
    );
    let addr = common::addr_of(&tracker.line);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (count, mut lat, end_unix) = rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        let start = Instant::now() + Duration::from_millis(500);
        let stop = start + Duration::from_secs(secs);
        for c in 0..clients {
            let addr = addr.clone();
            set.spawn(async move {
                let mut client = TrackerClient::connect(&addr, None, Duration::from_secs(10))
                    .await
                    .unwrap();
                let mut mine: Vec<Announce> = (c..peers)
                    .step_by(clients as usize)
                    .map(|p| Announce {
                        info_hash: format!("{:064x}", p % files),
                        peer_id: format!("bench-{p}"),
                        port: 10000 + (p % 50000) as u16,
                        event: Event::Started,
                        have: 0,
                        total: 1000,
                        name: format!("file-{}", p % files),
                        length: 1 << 30,
                        numwant,
                        addr: None,
                    })
                    .collect();
                for a in &mut mine {
                    client.request(&Request::Announce(a.clone())).await.unwrap();
                    a.event = Event::Progress;
                }
                tokio::time::sleep_until(start.into()).await;
                let mut lat = Vec::new();
                let mut n = 0u64;
                let mut k = 0usize;
                while Instant::now() < stop {
                    let m = mine.len();
                    let a = &mut mine[k % m];
                    k += 1;
                    a.have = (a.have + 1) % 1000;
                    let reqs = vec![Request::Announce(a.clone()); depth];
                    let t = Instant::now();
                    let replies = client.request_many(&reqs).await.unwrap();
                    let dt = t.elapsed().as_secs_f64() * 1000.0;
                    for r in replies {
                        assert!(matches!(r, Response::Peers { .. }), "{r:?}");
                        lat.push(dt);
                        n += 1;
                    }
                }
                (n, lat)
            });
        }
        let mut count = 0;
        let mut lat = Vec::new();
        while let Some(r) = set.join_next().await {
            let (n, l) = r.unwrap();
            count += n;
            lat.extend(l);
        }
        let end_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        (count, lat, end_unix)
    });
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    println!(
        "tracker load: {peers} live peers over {clients} persistent connections, {files} files, {secs} s, numwant {}, pipelining depth {depth}",
        numwant.map_or("default (50)".to_string(), |n| n.to_string())
    );
    println!(
        "  announces: {count}  ->  {:.0} per second",
        count as f64 / secs as f64
    );
    println!(
        "  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    // The tracker's own CPU time: the client shares these two cores, so this is the figure
    // that says what the tracker would do with the machine to itself.
    let cpu_s = common::proc_cpu(tracker.child.id());
    println!(
        "  tracker CPU: {cpu_s:.1} s for {count} announces = {:.1} us each -> {:.0} announces per CPU-second",
        cpu_s * 1e6 / count as f64,
        count as f64 / cpu_s
    );
    // Durability: let one batch interval pass, then kill -9 and read the database.
    std::thread::sleep(Duration::from_millis(200));
    drop(tracker);
    let c = rusqlite::Connection::open(&db).unwrap();
    let (rows, oldest): (i64, i64) = c
        .query_row("SELECT count(*), min(last_seen) FROM peers", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    println!(
        "  after kill -9: {rows} live peers in the database (want {peers}), oldest last_seen {}s before the end; journal {mode}, synchronous=FULL",
        end_unix - oldest
    );
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(db.with_extension("db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!("  database + WAL size: {} KiB", size / 1024);
}
