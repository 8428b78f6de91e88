//! Latency of `Store::flush` (the store's one durable commit): commits a changed bitfield
//! and record N times in a fresh store under DIR (default: a temp dir in the current
//! directory, so the figure is for the disk the store would live on, not tmpfs) and prints
//! the median and range. Run: `cargo run --release -p shoal-tools --example store_flush [N] [DIR]`.

use std::time::Instant;

use shoal::bitfield::Bitfield;
use shoal::store::{Store, TorrentRecord, TorrentState};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    let parent = args.next().unwrap_or_else(|| ".".into());
    let dir = tempfile::tempdir_in(parent)?;
    let store = Store::open(dir.path(), true)?;
    let hash = [3u8; 32];
    let mut rec = TorrentRecord {
        descriptor: None,
        data_path: dir.path().join("x"),
        state: TorrentState::Downloading,
        paused_from: None,
        added_at: 0,
        completed_at: None,
        downloaded: 0,
        uploaded: 0,
        trackers: vec![],
        note: None,
        working_file: None,
        working_files: Default::default(),
        only: Vec::new(),
    };
    let mut bits = Bitfield::new(1024);
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        bits.set(u32::try_from(i % 1024)?);
        rec.downloaded += 1 << 20;
        let t = Instant::now();
        store.commit_progress(&hash, &bits, &rec)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "Store::commit_progress (insert + flush), {n} commits on {}: median {:.2} ms, min {:.2} ms, max {:.2} ms, p90 {:.2} ms",
        dir.path().display(),
        ms[n / 2],
        ms[0],
        ms[n - 1],
        ms[n * 9 / 10]
    );
    Ok(())
}
