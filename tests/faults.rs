use std::path::Path;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::common::*;

const T: Duration = Duration::from_secs(120);

/// The invariant, checked from outside: open the (stopped) peer's sled store with the shoal
/// library, and hash every piece whose bit is set against the descriptor.
fn assert_every_set_bit_is_a_good_piece(data_dir: &Path, desc: &Path, out_dir: &Path) -> u32 {
    let meta = shoal::metainfo::Metainfo::load(desc).unwrap();
    let part = shoal::storage::files::working_path(out_dir, &meta.info_hash);
    let store = shoal::store::Store::open(data_dir, false).unwrap();
    let Some(bits) = store.bitfield(&meta.info_hash, meta.piece_count()).unwrap() else {
        return 0;
    };
    // A finished download has been renamed from its working name to NAME.
    let done = out_dir.join(&meta.name);
    let data = std::fs::read(&part)
        .or_else(|_| std::fs::read(&done))
        .unwrap_or_default();
    for i in bits.ones() {
        let start = i as usize * meta.piece_length as usize;
        let end = (start + meta.piece_size(i) as usize).min(data.len());
        let got: [u8; 32] = Sha256::digest(&data[start.min(end)..end]).into();
        assert_eq!(
            got, meta.pieces[i as usize],
            "bit {i} is set but the piece on disk is bad"
        );
    }
    bits.count()
}

fn write_config(d: &Path, body: &str) -> String {
    let p = d.join("peer.toml");
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn it_should_resume_after_repeated_sigkill_without_refetching_more_than_a_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size_mib = 256u64;
    random_file(&d.join("file.bin"), (size_mib << 20) as usize);
    let cfg = write_config(
        d,
        "[peer]\nflush_interval = \"200ms\"\nmax_requests_per_peer = 8\n",
    );
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    // About 50 pieces a second, so the kills land mid-download.
    let seeder = start_peer(
        d,
        "seeder",
        &[t.addr],
        &["--config", &cfg, "--sabotage", "delay=20ms"],
    );
    let (_, desc) = publish(d, &seeder, "file.bin");
    let mut leecher = start_peer(d, "leecher", &[t.addr], &["--config", &cfg]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let part = d.join("out");
    let mut rng = rand::thread_rng();
    let mut kills = 0;
    while kills < 5 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..900)));
        let st = torrent(d, &leecher);
        if st["state"] == "SEEDING" {
            break;
        }
        leecher.proc.kill9();
        kills += 1;
        let good = assert_every_set_bit_is_a_good_piece(&leecher.data_dir, Path::new(&desc), &part);
        println!("kill {kills}: {good} pieces durable and verified");
        leecher = start_peer(d, "leecher", &[t.addr], &["--config", &cfg]);
    }
    assert_eq!(
        kills, 5,
        "the download finished before five kills; slow the seeder"
    );
    wait_for(Duration::from_secs(90), "the download to finish", || {
        (torrent(d, &leecher)["state"] == "SEEDING").then_some(())
    });
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    // What the leecher received is what the only seeder sent.
    let sent = torrent(d, &seeder)["uploaded"].as_u64().unwrap();
    // Per kill: at most a flush interval of pieces (about 10 at 50/s, doubled for slack) plus
    // the pipelined requests in flight (8).
    let bound = (size_mib + kills * (20 + 8)) << 20;
    println!(
        "received {:.1} MiB for a {size_mib} MiB file over {kills} kills (bound {} MiB)",
        sent as f64 / 1048576.0,
        bound >> 20
    );
    assert!(sent >= size_mib << 20);
    assert!(sent <= bound, "re-fetched too much: {sent} > {bound}");
    // Scores survive restarts: what the leecher counts from the seeder adds up over all
    // its sessions to at least the whole file.
    let t = torrent(d, &leecher);
    let from_seeder = t["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == seeder.peer_id.as_str())
        .unwrap()["pieces_from"]
        .as_u64()
        .unwrap();
    assert!(
        from_seeder >= size_mib,
        "pieces_from {from_seeder} was reset by a restart"
    );
}

#[test]
fn it_should_never_claim_a_piece_when_crashing_between_the_data_sync_and_the_store_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 64, [("seeder", &["--sabotage", "delay=20ms"])]);
    // First crash at the very first flush: data synced, bits not yet committed.
    let mut leecher = start_peer_env(
        d,
        "leecher",
        &[t.addr],
        &[],
        &[("SHOAL_TEST_CRASH_AT", "between-sync-and-commit")],
    );
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "the crash point", || {
        leecher.proc.child.try_wait().ok().flatten()
    });
    assert!(leecher
        .proc
        .stderr()
        .contains("crashing at between-sync-and-commit"));
    let part = d.join("out");
    let claimed = assert_every_set_bit_is_a_good_piece(&leecher.data_dir, Path::new(&desc), &part);
    assert_eq!(claimed, 0, "nothing was committed before the crash");
    // Then crash right after a commit, a few times: whatever is claimed is good.
    for round in 0..3 {
        leecher = start_peer_env(
            d,
            "leecher",
            &[t.addr],
            &[],
            &[("SHOAL_TEST_CRASH_AT", "after-flush")],
        );
        wait_for(Duration::from_secs(30), "the crash point", || {
            leecher.proc.child.try_wait().ok().flatten()
        });
        let claimed =
            assert_every_set_bit_is_a_good_piece(&leecher.data_dir, Path::new(&desc), &part);
        println!("round {round}: {claimed} pieces claimed, all good");
    }
    leecher = start_peer(d, "leecher", &[t.addr], &[]);
    wait_for(Duration::from_secs(60), "the download to finish", || {
        (torrent(d, &leecher)["state"] == "SEEDING").then_some(())
    });
    assert_eq!(torrent(d, &leecher)["info_hash"], hash);
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
}

fn read_bytes(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("read_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn drop_from_page_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: fadvise on a descriptor we own.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

#[test]
fn it_should_restart_a_seeder_without_reading_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("file.bin");
    random_file(&file, 256 << 20);
    let mut seeder = start_peer(d, "seeder", &[], &[]);
    publish(d, &seeder, "file.bin");
    assert_eq!(
        seeder
            .proc
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true)
    );
    std::process::Command::new("sync").status().unwrap();
    drop_from_page_cache(&file);
    let seeder = start_peer(d, "seeder", &[], &[]);
    wait_for(Duration::from_secs(20), "seeding", || {
        (torrent(d, &seeder)["state"] == "SEEDING").then_some(())
    });
    let read = read_bytes(seeder.proc.pid());
    // Control: the same file, read now by this test process, does cost disk reads, so the
    // counter would have shown a re-hash.
    drop_from_page_cache(&file);
    let me = std::process::id();
    let before = read_bytes(me);
    let _ = std::fs::read(&file).unwrap();
    let control = read_bytes(me) - before;
    println!("seeder restart read {read} bytes from disk; reading the file reads {control}");
    assert!(
        control >= 128 << 20,
        "page cache not dropped ({control}); the test cannot tell"
    );
    assert!(
        read < 4 << 20,
        "the restarted seeder read {read} bytes: it re-hashed the file"
    );
}

#[test]
fn it_should_ban_a_saboteur_among_three_seeders_after_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_s1, _s2, bad], _, desc) = seeded(
        d,
        32,
        // The honest seeders answer a little slower than the saboteur, so the download
        // cannot finish before the saboteur has had its threshold of chances, however busy
        // the machine is (under parallel load it once finished after 2).
        [
            ("s1", &["--sabotage", "delay=30ms"]),
            ("s2", &["--sabotage", "delay=30ms"]),
            // Another host: it is banned by address too, and the honest ones must not be.
            (
                "bad",
                &["--sabotage", "corrupt=1.0", "--listen", "127.0.0.66:0"],
            ),
        ],
    );
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    let tor = torrent(d, &leecher);
    let saboteur = tor["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == bad.peer_id.as_str())
        .cloned()
        .expect("the saboteur was met");
    println!("saboteur as the leecher sees it: {saboteur}");
    assert!(
        saboteur["banned_until"].as_i64().is_some(),
        "the saboteur is banned"
    );
    assert_eq!(
        saboteur["failures"], 3,
        "exactly the threshold of corrupt pieces, no more"
    );
    assert_eq!(saboteur["pieces_from"], 0);
    assert!(
        leecher.proc.stderr().contains("peer banned"),
        "the ban is logged"
    );
}

#[test]
fn it_should_take_most_pieces_from_the_fast_seeder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [fast, slow], _, desc) = seeded(
        d,
        64,
        [("fast", &[]), ("slow", &["--sabotage", "delay=300ms"])],
    );
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tor = torrent(d, &leecher);
    let from = |id: &str| {
        tor["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == id)
            .map_or(0, |p| p["pieces_from"].as_u64().unwrap())
    };
    let (f, s) = (from(&fast.peer_id), from(&slow.peer_id));
    println!("fast seeder served {f} pieces, slow seeder {s}");
    assert_eq!(f + s, 64);
    assert!(
        f >= 56,
        "the fast seeder should serve most pieces (got {f} of 64)"
    );
    // The status table shows the load balancing with RTT and throughput, each peer by its
    // key's fingerprint.
    let table = shoal_ok(
        d,
        &["status", "--data-dir", leecher.data_dir.to_str().unwrap()],
        T,
    );
    println!("{table}");
    assert!(table.contains("RTT") && table.contains("RATE") && table.contains(&fast.peer_id[..16]));
}

#[test]
fn it_should_catch_a_seeded_file_changed_behind_its_back_and_recheck_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("file.bin"), 4 << 20);
    let mut seeder = start_peer(d, "seeder", &[], &[]);
    let (hash, _) = publish(d, &seeder, "file.bin");
    seeder.proc.terminate(Duration::from_secs(20));
    // Replace the content, same length: a spot check at start must notice.
    let original = std::fs::read(d.join("file.bin")).unwrap();
    let mut changed = original.clone();
    for b in changed.iter_mut().step_by(4096) {
        *b ^= 0x5A;
    }
    std::fs::write(d.join("file.bin"), &changed).unwrap();
    let seeder = start_peer(d, "seeder", &[], &[]);
    let t = torrent(d, &seeder);
    assert_eq!(t["state"], "NEEDS RECHECK", "{t}");
    assert!(t["note"].as_str().unwrap().contains("shoal recheck"), "{t}");
    // Put half of it back: the recheck finds exactly those pieces and the torrent resumes
    // as a download of the rest.
    changed[..2 << 20].copy_from_slice(&original[..2 << 20]);
    std::fs::write(d.join("file.bin"), &changed).unwrap();
    let out = peer_ok(d, &seeder.data_dir, &["recheck", &hash], T);
    assert!(out.contains("2 of 4 pieces good"), "{out}");
    let t = torrent(d, &seeder);
    assert_eq!(t["state"], "DOWNLOADING");
    assert_eq!(t["have"], 2);
    assert!(
        !d.join("file.bin").exists(),
        "a damaged seed goes back to being a download under its working name"
    );
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn it_should_refuse_a_download_that_does_not_fit_on_the_disk_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = d.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        // Needs root (CI and the dev machines run as root); say so rather than pass silently.
        println!("SKIPPED: cannot mount a tmpfs here");
        return;
    }
    let _disk = SmallDisk(small.clone());
    let (t, [_seeder], _, desc) = seeded(d, 16, [("seeder", &[])]);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(
        d,
        &leecher.data_dir,
        &["get", &desc, "--output", small.to_str().unwrap()],
        T,
    );
    let tor = wait_for(Duration::from_secs(20), "the torrent to show", || {
        let tor = torrent(d, &leecher);
        (!tor.is_null()).then_some(tor)
    });
    assert_eq!(tor["state"], "FAILED", "{tor}");
    assert!(
        tor["note"]
            .as_str()
            .unwrap()
            .contains("not enough disk space"),
        "{tor}"
    );
    // The daemon is alive and still answers.
    assert!(status(d, &leecher.data_dir)["peer_id"].is_string());
}
