//! The storage boundary: files nobody can trick, one owner per torrent, durability that a
//! failing disk cannot fake, bounded state, and completion that survives a cut.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(120);

fn hash_bytes(hex_hash: &str) -> [u8; 32] {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

fn working(out: &Path, hex_hash: &str) -> PathBuf {
    shoal::storage::files::working_path(out, &hash_bytes(hex_hash))
}

#[test]
fn it_should_never_write_through_a_symlink_planted_at_a_working_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, [seeder], hash, desc) = seeded(d, 4, [("seeder", &[])]);
    let victim = d.join("victim.txt");
    std::fs::write(&victim, b"do not touch").unwrap();
    let out = d.join("out");
    std::fs::create_dir_all(out.join(shoal::storage::files::PARTS_DIR)).unwrap();
    // Both the old working name and the new one point at the victim.
    std::os::unix::fs::symlink(&victim, out.join("file.bin.part")).unwrap();
    std::os::unix::fs::symlink(&victim, working(&out, &hash)).unwrap();
    let leecher = start_peer(d, "leecher", &[_t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not touch");
    drop(seeder);
}

#[test]
fn it_should_not_trust_a_stale_longer_working_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 4, [("seeder", &[])]);
    let out = d.join("out");
    std::fs::create_dir_all(out.join(shoal::storage::files::PARTS_DIR)).unwrap();
    // A leftover of another run: the right prefix, 1 MiB too long.
    let mut stale = std::fs::read(d.join("file.bin")).unwrap();
    stale.extend(vec![0xEE; 1 << 20]);
    std::fs::write(working(&out, &hash), &stale).unwrap();
    std::fs::write(out.join("file.bin.part"), &stale).unwrap();
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    assert_eq!(
        std::fs::metadata(out.join("file.bin")).unwrap().len(),
        4 << 20,
        "exactly the descriptor's length"
    );
}

#[test]
fn it_should_keep_v_and_v_part_apart_in_one_output_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("v"), 3 << 20);
    random_file(&src.join("v.part"), 2 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (_, dv) = publish(d, &seeder, "src/v");
    let (_, dvp) = publish(d, &seeder, "src/v.part");
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    for desc in [&dvp, &dv] {
        let o = get_wait(d, &leecher, desc, "out");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(sha256sum(&d.join("out/v")), sha256sum(&src.join("v")));
    assert_eq!(
        sha256sum(&d.join("out/v.part")),
        sha256sum(&src.join("v.part"))
    );
    let st = status(d, &leecher.data_dir);
    for tor in st["torrents"].as_array().unwrap() {
        assert_eq!(tor["state"], "SEEDING", "{tor}");
    }
}

#[test]
fn it_should_stop_with_a_note_when_the_working_file_is_deleted_mid_download() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let slow = write_config(d, "slow.toml", "[peer]\nmax_upload_rate = \"2MiB\"\n");
    let (t, [_seeder], hash, desc) = seeded(d, 16, [("seeder", &["--config", &slow])]);
    let cfg = write_config(d, "fast.toml", "[peer]\nflush_interval = \"200ms\"\n");
    let leecher = start_peer(d, "leecher", &[t.addr], &["--config", &cfg]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let out = d.join("out");
    wait_for(T, "a few pieces", || {
        (torrent(d, &leecher)["have"].as_u64().unwrap() >= 2).then_some(())
    });
    std::fs::remove_file(working(&out, &hash)).unwrap();
    let st = wait_for(Duration::from_secs(20), "NEEDS RECHECK", || {
        let st = torrent(d, &leecher);
        (st["state"] == "NEEDS RECHECK").then_some(st)
    });
    assert!(
        st["note"].as_str().unwrap().contains("deleted or replaced"),
        "{st}"
    );
    // It stays stopped: never "complete" on a file that is gone.
    std::thread::sleep(Duration::from_secs(2));
    let st = torrent(d, &leecher);
    assert_eq!(st["state"], "NEEDS RECHECK", "{st}");
    assert!(!out.join("file.bin").exists());
    // A recheck starts it again from what is really there (nothing) and it completes.
    peer_ok(d, &leecher.data_dir, &["recheck", &hash], T);
    let o = get_wait(d, &leecher, &hash, "out");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        sha256sum(&out.join("file.bin")),
        sha256sum(&d.join("file.bin"))
    );
}

#[test]
fn it_should_go_to_needs_recheck_and_set_no_bit_when_the_data_sync_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 8, [("seeder", &[])]);
    let mut leecher = start_peer_env(
        d,
        "leecher",
        &[t.addr],
        &[],
        &[("SHOAL_TEST_FAULT", "data-sync")],
    );
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let st = wait_for(T, "NEEDS RECHECK", || {
        let st = torrent(d, &leecher);
        (st["state"] == "NEEDS RECHECK").then_some(st)
    });
    assert!(
        st["note"].as_str().unwrap().contains("Input/output error"),
        "the OS error is in the note: {st}"
    );
    leecher.proc.terminate(Duration::from_secs(20));
    let store = shoal::store::Store::open(&leecher.data_dir, false).unwrap();
    let h = hash_bytes(&hash);
    let bits = store
        .bitfield(&h, 8)
        .unwrap()
        .unwrap_or(shoal::bitfield::Bitfield::new(8));
    assert_eq!(bits.count(), 0, "no bit without a successful sync");
    assert!(!d.join("out/file.bin").exists());
}

#[test]
fn it_should_keep_one_owner_through_50_concurrent_commands_on_one_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 8, [("seeder", &[])]);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let cmds = ["pause", "resume", "recheck", "get", "remove"];
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let (d, dd, hash, desc) = (
                d.to_path_buf(),
                leecher.data_dir.clone(),
                hash.clone(),
                desc.clone(),
            );
            let cmd = cmds[i % cmds.len()];
            std::thread::spawn(move || {
                let args: Vec<&str> = match cmd {
                    "get" => vec!["get", &desc, "--output", "out"],
                    c => vec![c, &hash],
                };
                let mut all = args.clone();
                all.extend(["--data-dir", dd.to_str().unwrap()]);
                shoal(&d, &all, T)
            })
        })
        .collect();
    for h in handles {
        // Each may succeed or fail cleanly ("no torrent", "being removed"); none may hang.
        let o = h.join().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{err}");
    }
    let st = status(d, &leecher.data_dir);
    let n = st["torrents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["info_hash"] == hash.as_str())
        .count();
    assert!(n <= 1, "one owner per hash: {st}");
    // Whatever state it was left in, it can be brought to completion, correctly.
    if n == 1 {
        let _ = shoal(
            d,
            &[
                "resume",
                &hash,
                "--data-dir",
                leecher.data_dir.to_str().unwrap(),
            ],
            T,
        );
    }
    // The download may have finished and then been removed (data kept) by a later command:
    // the finished file is then there, and a new `get` rightly refuses to overwrite it.
    if n == 1 || !d.join("out/file.bin").exists() {
        let o = get_wait(d, &leecher, &desc, "out");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
}

#[test]
fn it_should_keep_scores_bounded_under_10000_fresh_peer_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, [mut seeder], hash, _desc) = seeded(d, 1, [("seeder", &[])]);
    let addr = seeder.addr;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let hash = hash.clone();
            std::thread::spawn(move || {
                for _ in 0..1250 {
                    // A fresh key each time: the real handshake, then a HELLO under it.
                    let id = shoal::secure::Identity::generate();
                    let Ok(mut s) = crate::common::wire::Wire::connect(addr, &id) else {
                        continue;
                    };
                    let hello = serde_json::json!({"type":"HELLO","v":1,"info_hash":hash,
                        "peer_id":id.peer_id(),"port":1});
                    if s.write(&frame(&hello, &[])).is_err() {
                        continue;
                    }
                    // Wait for its HELLO, so the connection was registered.
                    let _ = s.read_frame();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rows = peer_ok(
        d,
        &seeder.data_dir,
        &["query", "SELECT count(*) AS n FROM peers", "--json"],
        T,
    );
    let v: serde_json::Value = serde_json::from_str(&rows).unwrap();
    let n = v[0]["n"].as_u64().unwrap_or_else(|| panic!("{v}"));
    assert!(n > 100, "the flood reached the seeder: {n}");
    assert!(n <= 512, "scores are capped: {n}");
    seeder.proc.terminate(Duration::from_secs(20));
    let store = shoal::store::Store::open(&seeder.data_dir, false).unwrap();
    let stored = store.score_count(&hash_bytes(&hash)).unwrap();
    assert!(stored <= 512, "the store is bounded too: {stored}");
}

#[test]
fn it_should_seed_without_a_command_after_a_cut_right_after_completion() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], _hash, desc) = seeded(d, 4, [("seeder", &[])]);
    let mut leecher = start_peer_env(
        d,
        "leecher",
        &[t.addr],
        &[],
        &[("SHOAL_TEST_CRASH_AT", "after-rename")],
    );
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    let deadline = Instant::now() + T;
    while leecher.proc.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "never reached the crash point");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(leecher.proc.stderr().contains("crashing at after-rename"));
    assert!(d.join("out/file.bin").exists(), "the rename happened");
    // Restart with no command at all: it finds the finished file and seeds it.
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let st = torrent(d, &leecher);
    assert_eq!(st["state"], "SEEDING", "{st}");
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
}

/// A small ext4 file system on a loop device, made by the test and unmounted on drop.
struct Ext4 {
    mnt: PathBuf,
}

impl Ext4 {
    /// `None` (with the reason printed) where this machine cannot do it.
    fn make(dir: &Path, mib: u64) -> Option<Ext4> {
        // SAFETY-free: geteuid has no preconditions; through libc's safe-to-call wrapper.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIPPED: the disk-full test needs root to mount a loop device");
            return None;
        }
        let img = dir.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img)
            .output();
        if !mkfs.as_ref().is_ok_and(|o| o.status.success()) {
            println!("SKIPPED: mkfs.ext4 is not usable here: {mkfs:?}");
            return None;
        }
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mount = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output();
        if !mount.as_ref().is_ok_and(|o| o.status.success()) {
            println!("SKIPPED: cannot mount a loop device here: {mount:?}");
            return None;
        }
        Some(Ext4 { mnt })
    }

    fn free(&self) -> u64 {
        shoal::storage::files::free_space(&self.mnt).unwrap()
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Lazy: a process killed a moment ago may still hold a file open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
    }
}

#[test]
fn it_should_fail_cleanly_and_give_the_space_back_when_the_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(fs) = Ext4::make(d, 48) else { return };
    // Small pieces make big records: every commit of the small download appends ~17 KB to
    // sled's log, so its log must grow on the full disk within a few seconds.
    let slow = write_config(
        d,
        "slow.toml",
        "[peer]\nmax_upload_rate = \"1MiB\"\npiece_size = \"64KiB\"\n",
    );
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    random_file(&src.join("big.bin"), 64 << 20);
    random_file(&src.join("small.bin"), 16 << 20);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &["--config", &slow]);
    let (_, big) = publish(d, &seeder, "src/big.bin");
    let (_, small) = publish(d, &seeder, "src/small.bin");
    let cfg = write_config(d, "leech.toml", "[peer]\nflush_interval = \"100ms\"\n");
    // The leecher's whole data dir (sled included) lives on the small file system.
    let mut leecher = start_peer(d, "mnt/leecher", &[t.addr], &["--config", &cfg]);
    let before = fs.free();
    // 1. A reservation larger than the free space: FAILED, the space given back.
    let o = shoal(
        d,
        &[
            "get",
            &big,
            "--output",
            "mnt/out",
            "--data-dir",
            leecher.data_dir.to_str().unwrap(),
        ],
        T,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = wait_for(T, "FAILED", || {
        let st = status(d, &leecher.data_dir);
        st["torrents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == "big.bin" && x["state"] == "FAILED")
            .cloned()
    });
    let note = st["note"].as_str().unwrap();
    assert!(
        note.contains("needs 67108864 bytes") && note.contains("free"),
        "{note}"
    );
    let after = fs.free();
    assert!(
        after + (2 << 20) >= before,
        "the failed reservation gave its blocks back: {before} free before, {after} after"
    );
    // 2. Disk full in the middle of a download (sled's writes fail): FAILED with a note,
    //    status keeps answering within a second, SIGTERM stops the daemon.
    peer_ok(
        d,
        &leecher.data_dir,
        &["get", &small, "--output", "mnt/out"],
        T,
    );
    wait_for(T, "a few pieces", || {
        let st = status(d, &leecher.data_dir);
        st["torrents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "small.bin" && x["have"].as_u64().unwrap() >= 4)
            .then_some(())
    });
    {
        // Fill every block left.
        let mut f = std::fs::File::create(fs.mnt.join("filler")).unwrap();
        let buf = vec![0u8; 1 << 20];
        while f.write_all(&buf).is_ok() {}
        let _ = f.sync_all();
    }
    let st = wait_for(Duration::from_secs(60), "FAILED on a full disk", || {
        let t0 = Instant::now();
        let st = status(d, &leecher.data_dir);
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "status took {:?} on a full disk",
            t0.elapsed()
        );
        st["torrents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| {
                x["name"] == "small.bin" && (x["state"] == "FAILED" || x["state"] == "SEEDING")
            })
            .cloned()
    });
    assert_eq!(
        st["state"], "FAILED",
        "ENOSPC mid-download is a state: {st}"
    );
    let note = st["note"].as_str().unwrap();
    assert!(note.contains("store") || note.contains("space"), "{note}");
    println!("mid-download note: {note}");
    let t0 = Instant::now();
    let exited = leecher.proc.terminate(Duration::from_secs(60));
    assert!(
        exited.is_some(),
        "SIGTERM stops the daemon on a full disk (waited {:?})",
        t0.elapsed()
    );
}
