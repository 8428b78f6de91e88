//! shoal-tools against real data dirs made by real daemons.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

/// Run shoal-tools: (exit code, stdout, stderr); no code means killed by a signal.
fn tools_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(tools_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tools(args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = tools_env(args, &[]);
    (code == Some(0), out, err)
}

fn verify_json(dd: &Path) -> (bool, serde_json::Value) {
    let (ok, out, err) = tools(&["verify", dd.to_str().unwrap(), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (ok, v[0].clone())
}

fn uploaded(d: &Path, peer: &PeerProc) -> u64 {
    status(d, &peer.data_dir)["torrents"][0]["uploaded"]
        .as_u64()
        .unwrap()
}

/// Every file under `dir`: its SHA-256, length and mtime (ns).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        let m = std::fs::symlink_metadata(&d).unwrap();
        out.insert(
            d.clone(),
            (
                "dir".into(),
                0,
                i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ),
        );
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                todo.push(p);
            } else {
                let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
                out.insert(p.clone(), (sha256sum(&p), m.len(), mtime));
            }
        }
    }
    out
}

/// The working file of the one download into `out` (`out/.shoal-parts/<hash>.part`).
fn working_file(out: &Path, _name: &str) -> PathBuf {
    let parts = out.join(shoal::storage::files::PARTS_DIR);
    for e in std::fs::read_dir(&parts).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "part") {
            return p;
        }
    }
    panic!("no working file in {}", parts.display());
}

/// Flip one byte of a file in place (same inode, same length).
fn flip(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0xFF]).unwrap();
}

/// A leecher of a 16-piece file killed with SIGKILL after some durable progress, its
/// working file then holding the original bytes everywhere: pieces beyond the bitfield, as
/// after a crash between the data sync and the commit. Returns the tracker, the seeder, the
/// leecher's data dir, the descriptor and the number of claimed pieces.
fn killed_mid_download(d: &Path) -> (TrackerProc, PeerProc, PathBuf, String, u64) {
    random_file(&d.join("file.bin"), 16 * MIB);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &["--sabotage", "delay=300ms"]);
    let (_, desc) = publish(d, &seeder, "file.bin");
    std::fs::write(
        d.join("fast-flush.toml"),
        "[peer]\nflush_interval = \"200ms\"\n",
    )
    .unwrap();
    let cfg = d.join("fast-flush.toml");
    let mut leecher = start_peer(
        d,
        "leecher",
        &[t.addr],
        &["--config", cfg.to_str().unwrap()],
    );
    let dd = leecher.data_dir.clone();
    peer_ok(d, &dd, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "some durable progress", || {
        let st = status(d, &dd);
        (st["torrents"][0]["have"].as_u64().unwrap_or(0) >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500)); // A flush interval or two: the bits reach sled.
    leecher.proc.kill9();
    let (_, v) = verify_json(&dd);
    let claimed = v["good"].as_u64().unwrap();
    assert!((1..16).contains(&claimed), "{v}");
    // Rewrite the original bytes in place (same inode and length): every piece is good.
    let w = working_file(&d.join("out"), "file.bin");
    std::fs::write(&w, std::fs::read(d.join("file.bin")).unwrap()).unwrap();
    (t, seeder, dd, desc, claimed)
}

/// A finished 8-piece download, stopped, then damaged: pieces 2 and 5 flipped, piece 7 cut.
fn damaged_download(d: &Path) -> (TrackerProc, PeerProc, PathBuf, String) {
    random_file(&d.join("file.bin"), 8 * MIB);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (_, desc) = publish(d, &seeder, "file.bin");
    let mut leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let dd = leecher.data_dir.clone();
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    // The tools refuse while the daemon runs, and say how to stop it.
    for cmd in ["inspect", "verify"] {
        let (ok, _, err) = tools(&[cmd, dd.to_str().unwrap()]);
        assert!(!ok && err.contains("already running"), "{cmd}: {err}");
        assert!(err.contains("shoal peer stop --data-dir"), "{err}");
    }
    assert_eq!(
        leecher
            .proc
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true)
    );
    let (ok, v) = verify_json(&dd);
    assert!(ok, "a fresh download agrees: {v}");
    assert_eq!(v["good"], 8);
    let f = d.join("out/file.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[2 * MIB + 100] ^= 0xFF;
    bytes[5 * MIB + 7] ^= 0x01;
    bytes.truncate(7 * MIB);
    std::fs::write(&f, &bytes).unwrap();
    (t, seeder, dd, desc)
}

fn assert_damage_found(dd: &Path) {
    let (ok, v) = verify_json(dd);
    assert!(!ok, "verify must fail on damaged claimed data: {v}");
    assert_eq!(v["bad"], serde_json::json!([2, 5]), "{v}");
    assert_eq!(v["missing"], serde_json::json!([7]), "{v}");
    assert_eq!(v["good_unclaimed"], serde_json::json!([]), "{v}");
    assert_eq!(v["good"], 5, "{v}");
}

#[test]
fn it_should_find_bad_and_missing_pieces_and_repair_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, _seeder, dd, _desc) = damaged_download(d);
    assert_damage_found(&dd);
    let (code, out, _) = tools_env(&["verify", dd.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("claims bad or missing"), "{out}");
    // A dry run changes nothing.
    let (ok, out, _) = tools(&["repair", dd.to_str().unwrap()]);
    assert!(ok && out.contains("dry run"), "{out}");
    assert_damage_found(&dd);
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(
        out.contains("piece 2") && out.contains("piece 7") && out.contains("to undo"),
        "{out}"
    );
    let (ok, v) = verify_json(&dd);
    assert!(ok, "after repair the store agrees: {v}");
    assert_eq!(v["good"], 5);
    assert_eq!(v["data_kind"], "working", "{v}");
    assert!(
        !d.join("out/file.bin").exists(),
        "no final file while incomplete"
    );
}

#[test]
fn it_should_refetch_exactly_the_repaired_pieces_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, seeder, dd, desc) = damaged_download(d);
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    let before = uploaded(d, &seeder);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    fetch_and_verify(d, &leecher, &desc, "out", "file.bin");
    let refetched = uploaded(d, &seeder) - before;
    assert_eq!(
        refetched,
        3 * MIB as u64,
        "only the three damaged pieces are fetched again"
    );
}

#[test]
fn it_should_call_good_unclaimed_pieces_after_kill9_normal_and_a_corrupted_claimed_piece_an_error()
{
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, _seeder, dd, _desc, claimed) = killed_mid_download(d);
    let (ok, v) = verify_json(&dd);
    assert!(ok, "good pieces not yet claimed are not an error: {v}");
    let unclaimed: Vec<u64> = v["good_unclaimed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(unclaimed.len() as u64, 16 - claimed, "{v}");
    assert_eq!(v["good"].as_u64(), Some(claimed));
    assert!(v["bad"].as_array().unwrap().is_empty(), "{v}");
    let (code, out, _) = tools_env(&["verify", dd.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("good but not yet claimed"), "{out}");
    // Corrupt one claimed piece on disk: now the store claims a bad piece.
    let victim = (0..16u64).find(|i| !unclaimed.contains(i)).unwrap();
    let w = working_file(&d.join("out"), "file.bin");
    flip(&w, victim * MIB as u64 + 5);
    let (code, out, _) = tools_env(&["verify", dd.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("claims bad or missing"), "{out}");
    let (ok, v) = verify_json(&dd);
    assert!(!ok);
    assert_eq!(v["bad"], serde_json::json!([victim]), "{v}");
    // Put it right, and let repair claim everything: the file is complete.
    flip(&w, victim * MIB as u64 + 5);
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("marked complete"), "{out}");
    let (ok, v) = verify_json(&dd);
    assert!(ok, "{v}");
    assert_eq!(v["good"], 16);
    assert!(
        d.join("out/file.bin").exists() && !w.exists(),
        "a complete working file is renamed to its final name"
    );
    assert_eq!(
        sha256sum(&d.join("out/file.bin")),
        sha256sum(&d.join("file.bin"))
    );
    let (ok, out, _) = tools(&["inspect", dd.to_str().unwrap()]);
    assert!(ok && out.contains("SEEDING"), "{out}");
    // Compaction keeps everything.
    let (ok, out, err) = tools(&["compact", dd.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    assert!(verify_json(&dd).0);
    // And the daemon seeds it after a restart.
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    assert_eq!(
        status(d, &leecher.data_dir)["torrents"][0]["state"],
        "SEEDING"
    );
}

#[test]
fn it_should_leave_every_byte_and_mtime_of_the_store_unchanged_on_inspect_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A store left by SIGKILL: the kind sled recovers (and writes) when it opens it.
    let (_t, _seeder, dd, _desc, _) = killed_mid_download(d);
    let store = dd.join("store");
    let before = snapshot(&store);
    assert!(before.len() > 2, "{before:?}");
    for args in [
        vec!["inspect"],
        vec!["inspect", "--json"],
        vec!["verify"],
        vec!["verify", "--json"],
    ] {
        let mut a = args.clone();
        a.insert(1, dd.to_str().unwrap());
        let (code, out, err) = tools_env(&a, &[]);
        assert_eq!(code, Some(0), "{a:?}: {out} {err}");
        assert_eq!(snapshot(&store), before, "{a:?} changed the store");
    }
    // The check can fail: opening the store itself (what the tools did before) writes to it.
    drop(sled::open(&store).unwrap());
    assert_ne!(snapshot(&store), before, "opening the store is seen");
}

#[test]
fn it_should_write_a_complete_undo_journal_before_the_first_change_of_a_repair() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, _seeder, dd, _desc) = damaged_download(d);
    let journals = || -> Vec<PathBuf> {
        std::fs::read_dir(&dd)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("repair-undo-")
            })
            .collect()
    };
    let final_file = d.join("out/file.bin");
    let data_before = sha256sum(&final_file);
    // Crash right after the journal, before the first change.
    let (code, out, err) = tools_env(
        &["repair", dd.to_str().unwrap(), "--apply"],
        &[("SHOAL_TEST_CRASH_AT", "repair-after-journal")],
    );
    assert_eq!(code, None, "aborted: {out} {err}");
    assert!(err.contains("crashing at repair-after-journal"), "{err}");
    let js = journals();
    assert_eq!(js.len(), 1, "{js:?}");
    let journal = d.join("journal.json");
    std::fs::copy(&js[0], &journal).unwrap();
    let entries: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");
    assert!(
        entries[0]["renamed"].is_array(),
        "the rename is journaled: {entries}"
    );
    // Nothing changed yet.
    assert_damage_found(&dd);
    assert_eq!(sha256sum(&final_file), data_before);
    // The real repair changes the store and moves the file...
    std::thread::sleep(Duration::from_millis(5)); // Its own journal name.
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(verify_json(&dd).0);
    assert!(!final_file.exists());
    // ...and the journal written before the crash alone restores the state it found.
    let (ok, out, err) = tools(&["undo", dd.to_str().unwrap(), journal.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    assert_damage_found(&dd);
    assert!(final_file.exists());
    // Running it again (an interrupted undo) is harmless.
    let (ok, out, err) = tools(&["undo", dd.to_str().unwrap(), journal.to_str().unwrap()]);
    assert!(ok, "{out} {err}");
    assert_damage_found(&dd);
}

#[test]
fn it_should_never_vouch_for_a_working_file_that_is_not_the_recorded_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, _seeder, dd, _desc, _) = killed_mid_download(d);
    let w = working_file(&d.join("out"), "file.bin");
    // The store's record names the file the daemon made; make sure it names one (a daemon
    // from before issue 13 records none).
    record_identity(&dd, &w);
    let (ok, v) = verify_json(&dd);
    assert!(
        ok && v["untrusted"].is_null(),
        "the recorded file is trusted: {v}"
    );
    // Another file takes the working file's name: same bytes, another inode.
    let copy = d.join("impostor");
    std::fs::copy(&w, &copy).unwrap();
    std::fs::rename(&copy, &w).unwrap();
    let (code, out, _) = tools_env(&["verify", dd.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("untrusted data file"), "{out}");
    let (ok, v) = verify_json(&dd);
    assert!(!ok && v["good_unclaimed"] == serde_json::json!([]), "{v}");
    let (ok, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert!(ok, "{out} {err}");
    assert!(out.contains("every bit cleared"), "{out}");
    let (_, out, _) = tools(&["inspect", dd.to_str().unwrap(), "--json"]);
    let inspect: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inspect["torrents"][0]["have"], 0, "{inspect}");
    // A symlink in its place is refused too.
    std::fs::remove_file(&w).unwrap();
    std::os::unix::fs::symlink(d.join("file.bin"), &w).unwrap();
    let (code, out, _) = tools_env(&["verify", dd.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is a symlink"), "{out}");
}

/// Set the store's recorded working-file identity to that of `path` (a stopped daemon).
fn record_identity(dd: &Path, path: &Path) {
    let s = shoal::store::Store::open(dd, false).unwrap();
    let (hash, mut rec) = s.torrents().unwrap().remove(0);
    rec.working_file = Some(shoal::store::FileId::of_path(path).unwrap());
    let pieces =
        shoal::metainfo::Metainfo::from_json(rec.descriptor.as_deref().unwrap().as_bytes())
            .unwrap()
            .piece_count();
    let bits = s.bitfield(&hash, pieces).unwrap().unwrap();
    s.commit_progress(&hash, &bits, &rec).unwrap();
}

#[test]
fn it_should_describe_every_argument_in_help() {
    for cmd in ["inspect", "verify", "repair", "undo", "compact"] {
        let (ok, out, err) = tools(&[cmd, "--help"]);
        assert!(ok, "{err}");
        let args = out
            .split("Arguments:")
            .nth(1)
            .expect("an Arguments section");
        let mut n = 0;
        for line in args.lines().filter(|l| l.starts_with("  ")) {
            let desc = line.trim().split_once("  ").map_or("", |(_, d)| d.trim());
            assert!(!desc.is_empty(), "{cmd}: no description: {line}\n{out}");
            n += 1;
        }
        assert!(n >= 2, "{cmd}: {out}");
        assert!(!out.contains("another --data-dir"), "{out}");
    }
    let (_, out, _) = tools(&["repair", "--help"]);
    assert!(
        out.contains("--apply") && out.contains("default: off"),
        "{out}"
    );
    let (_, out, _) = tools(&["verify", "--help"]);
    assert!(out.contains("default: every torrent"), "{out}");
}

#[test]
fn it_should_refuse_what_is_not_a_store_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, err) = tools(&["verify", d.to_str().unwrap()]);
    assert!(!ok && err.contains("not a shoal data directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(d).unwrap().count(),
        0,
        "nothing was written"
    );
    // A store of a newer format.
    let p = start_peer(d, "p", &[], &[]);
    let dd = p.data_dir.clone();
    drop(p);
    {
        let db = sled::open(dd.join("store")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let (ok, _, err) = tools(&["inspect", dd.to_str().unwrap()]);
    assert!(!ok && err.contains("newer"), "{err}");
}
