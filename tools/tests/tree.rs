//! shoal-tools on folder trees (format 2), against data dirs made by real daemons: verify,
//! repair, undo and inspect per file.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

/// Run shoal-tools: (exit code, stdout, stderr).
fn tools(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(tools_bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify_json(dd: &Path) -> (Option<i32>, serde_json::Value) {
    let (code, out, err) = tools(&["verify", dd.to_str().unwrap(), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, v[0].clone())
}

/// Every entry below `root`: relative path -> SHA-256 of a file, or "dir".
fn shape(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel, "dir".into());
                todo.push(p);
            } else {
                out.insert(rel, sha256sum(&p));
            }
        }
    }
    out
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0xFF;
    // In place: same inode, same length.
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &b))
        .unwrap();
}

fn state(dd: &Path) -> serde_json::Value {
    let (code, out, err) = tools(&["inspect", dd.to_str().unwrap(), "--json"]);
    assert_eq!(code, Some(0), "{out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["torrents"][0].clone()
}

/// Files (in descriptor order, 1 MiB pieces): a/one.bin 0-2, b/two.bin 3-4, c.txt 5, then
/// the empty file `empty.txt` and the empty folder `void`.
#[test]
fn it_should_verify_repair_and_undo_a_tree_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("tr");
    for sub in ["a", "b", "void"] {
        std::fs::create_dir_all(src.join(sub)).unwrap();
    }
    random_file(&src.join("a/one.bin"), 3 * MIB);
    random_file(&src.join("b/two.bin"), 2 * MIB);
    std::fs::write(src.join("c.txt"), b"a small file").unwrap();
    std::fs::write(src.join("empty.txt"), b"").unwrap();
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (_, desc) = publish(d, &seeder, "tr");
    let mut l = start_peer(d, "l", &[t.addr], &[]);
    let dd = l.data_dir.clone();
    let o = get_wait(d, &l, &desc, "out");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        l.proc
            .terminate(Duration::from_secs(20))
            .map(|s| s.success()),
        Some(true)
    );
    let placed = d.join("out/tr");
    assert!(shape(&placed) == shape(&src));

    // A finished tree agrees, file by file.
    let (code, v) = verify_json(&dd);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (v["good"].as_u64(), v["data_kind"].as_str()),
        (Some(6), Some("tree")),
        "{v}"
    );
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "one verdict per non-empty file: {v}");
    assert!(files.iter().all(|f| f["kind"] == "final"), "{v}");
    let st = state(&dd);
    assert_eq!(st["files"]["placed"], 3, "{st}");
    assert_eq!(st["files"]["empty"], 2, "{st}");

    // Damage: one.bin's piece 1 flipped, two.bin cut to its first piece, empty.txt gone.
    flip(&placed.join("a/one.bin"), MIB + 5);
    let two = std::fs::read(placed.join("b/two.bin")).unwrap();
    std::fs::write(placed.join("b/two.bin"), &two[..MIB]).unwrap();
    std::fs::remove_file(placed.join("empty.txt")).unwrap();
    let damaged = shape(&placed);
    let assert_damage = |v: &serde_json::Value| {
        assert_eq!(v["bad"], serde_json::json!([1]), "{v}");
        assert_eq!(v["missing"], serde_json::json!([4]), "{v}");
        assert_eq!(
            v["missing_entries"],
            serde_json::json!(["empty.txt"]),
            "{v}"
        );
        assert_eq!(v["good"], 4, "{v}");
    };
    let (code, v) = verify_json(&dd);
    assert_eq!(
        code,
        Some(1),
        "verify must fail on damaged claimed data: {v}"
    );
    assert_damage(&v);
    let (code, out, _) = tools(&["verify", dd.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("a/one.bin: bad pieces [1]"), "{out}");

    // A dry run changes nothing.
    let (code, out, _) = tools(&["repair", dd.to_str().unwrap()]);
    assert!(code == Some(0) && out.contains("dry run"), "{out}");
    assert!(shape(&placed) == damaged);

    // Repair: the two damaged files go back to being working files, the rest stays.
    let (code, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        out.contains("a/one.bin: 2 of 3 pieces good -> taken back"),
        "{out}"
    );
    let journal = out
        .lines()
        .find_map(|l| l.strip_prefix("undo journal: "))
        .and_then(|l| l.split(' ').next())
        .unwrap()
        .to_string();
    let (code, v) = verify_json(&dd);
    assert_eq!(code, Some(0), "after repair the store agrees: {v}");
    assert_eq!(v["good"], 4, "{v}");
    let kinds: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["working", "working", "final"], "{v}");
    assert!(!placed.join("a/one.bin").exists() && !placed.join("b/two.bin").exists());
    assert_eq!(state(&dd)["state"], "DOWNLOADING");

    // Undo puts every file back as it was found, with the old bits.
    let (code, out, err) = tools(&["undo", dd.to_str().unwrap(), &journal]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(shape(&placed) == damaged, "undo restores the damaged files");
    let (code, v) = verify_json(&dd);
    assert_eq!(code, Some(1));
    assert_damage(&v);
    assert_eq!(state(&dd)["state"], "SEEDING");

    // Repaired again and restarted, the daemon fetches only the damaged pieces and places
    // everything.
    let (code, out, err) = tools(&["repair", dd.to_str().unwrap(), "--apply"]);
    assert_eq!(code, Some(0), "{out} {err}");
    let before = torrent(d, &seeder)["uploaded"].as_u64().unwrap();
    let l = start_peer(d, "l", &[t.addr], &[]);
    wait_for(T, "the repaired tree to be complete", || {
        let t = torrent(d, &l);
        assert_ne!(t["state"], "FAILED", "{t}");
        (t["state"] == "SEEDING").then_some(())
    });
    assert!(
        shape(&placed) == shape(&src),
        "the tree differs after repair"
    );
    let refetched = torrent(d, &seeder)["uploaded"].as_u64().unwrap() - before;
    assert_eq!(refetched, 2 * MIB as u64, "only the two damaged pieces");
    drop(l);
}
