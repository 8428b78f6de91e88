use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};

use crate::common::*;

const T: Duration = Duration::from_secs(300);

/// A tree of `n` entries in nested folders: files of 0-20 KiB (every 97th empty), one empty
/// folder, names with spaces and non-ASCII, and (when `big_mib` > 0) one big file.
fn make_tree(root: &Path, n: usize, big_mib: usize) {
    let mut rng = rand::thread_rng();
    std::fs::create_dir_all(root.join("empty folder")).unwrap();
    let mut made = 1;
    if big_mib > 0 {
        std::fs::create_dir_all(root.join("big")).unwrap();
        random_file(&root.join("big/grand fichier é.bin"), big_mib << 20);
        made += 1;
    }
    let mut i = 0;
    while made < n {
        let dir = root
            .join(format!("dir {}", i % 10))
            .join(format!("sub ü{}", i % 7))
            .join(format!("深 {}", i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let len = if i % 97 == 0 {
            0
        } else {
            rng.gen_range(1..20_000)
        };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        std::fs::write(dir.join(format!("file {i} ñ.dat")), data).unwrap();
        made += 1;
        i += 1;
    }
}

/// Every entry below `root`: relative path -> SHA-256 of a file's bytes, or "dir" for a
/// folder; symlinks would show as "symlink".
fn shape(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, "symlink".into());
            } else if m.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else {
                out.insert(rel, hex::encode(Sha256::digest(std::fs::read(&p).unwrap())));
            }
        }
    }
    out
}

fn get_args<'a>(
    peer: &'a PeerProc,
    what: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "get",
        what,
        "--data-dir",
        peer.data_dir.to_str().unwrap(),
        "--output",
        out,
    ];
    a.extend_from_slice(extra);
    a
}

fn wait_seeding(d: &Path, peer: &PeerProc, limit: Duration) {
    wait_for(limit, "the tree to be complete", || {
        let t = torrent(d, peer);
        assert_ne!(t["state"], "FAILED", "{t}");
        (t["state"] == "SEEDING").then_some(())
    });
}

#[test]
fn it_should_publish_a_tree_of_1000_files_and_let_three_peers_fetch_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 300 MiB as the issue asks; SHOAL_TEST_TREE_BIG_MIB makes it smaller on slow machines.
    let big: usize = std::env::var("SHOAL_TEST_TREE_BIG_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let started = std::time::Instant::now();
    make_tree(&d.join("my tree"), 1000, big);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (hash, desc) = publish(d, &seeder, "my tree");
    let show = shoal_ok(d, &["show", &desc], T);
    assert!(show.contains("files: 1000"), "{show}");
    assert!(show.contains("empty folder/"), "{show}");
    let leechers: Vec<PeerProc> = (0..3)
        .map(|i| start_peer(d, &format!("l{i}"), &[t.addr], &[]))
        .collect();
    let handles: Vec<_> = leechers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            // One of the three knows only the info hash.
            let what = if i == 1 { hash.clone() } else { desc.clone() };
            let (d, dd) = (d.to_path_buf(), l.data_dir.clone());
            std::thread::spawn(move || {
                let out = format!("out{i}");
                shoal(
                    &d,
                    &[
                        "get",
                        &what,
                        "--data-dir",
                        dd.to_str().unwrap(),
                        "--output",
                        &out,
                        "--wait",
                        "--timeout",
                        "280s",
                    ],
                    T,
                )
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let want = shape(&d.join("my tree"));
    assert_eq!(
        want.len(),
        1000 + want.values().filter(|v| *v == "dir").count() - 1
    );
    for (i, l) in leechers.iter().enumerate() {
        let got = shape(&d.join(format!("out{i}/my tree")));
        assert_eq!(got.len(), want.len());
        assert!(got == want, "out{i} differs from the published tree");
        assert!(!d.join(format!("out{i}/.shoal-parts")).exists());
        let q = peer_ok(
            d,
            &l.data_dir,
            &[
                "query",
                "--json",
                "SELECT count(*) AS n, sum(have = length) AS done, sum(selected) AS sel FROM files",
            ],
            T,
        );
        let v: serde_json::Value = serde_json::from_str(&q).unwrap();
        let row = &v[0];
        assert_eq!(
            (row["n"].as_i64(), row["done"].as_i64(), row["sel"].as_i64()),
            (Some(1000), Some(1000), Some(1000)),
            "{q}"
        );
    }
    println!(
        "1000 entries with a {big} MiB file to three peers at once: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn it_should_fetch_only_the_chosen_files_then_the_rest_when_the_selection_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(&d.join("sel"), 300, 4);
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let seeder = start_peer(d, "seeder", &[t.addr], &[]);
    let (hash, desc) = publish(d, &seeder, "sel");
    let l = start_peer(d, "l", &[t.addr], &[]);
    let out = shoal(
        d,
        &get_args(
            &l,
            &desc,
            "out",
            &[
                "--only",
                "dir 3",
                "--only",
                "big/*.bin",
                "--wait",
                "--timeout",
                "100s",
            ],
        ),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = shape(&d.join("sel"));
    let got = shape(&d.join("out/sel"));
    let chosen = |p: &str| p.starts_with("dir 3/") || p == "big/grand fichier é.bin";
    let files_chosen = want
        .iter()
        .filter(|(p, v)| *v != "dir" && chosen(p))
        .count();
    assert!(files_chosen > 10);
    for (p, v) in &got {
        if v != "dir" {
            assert!(chosen(p), "{p} was not selected but was created");
            assert_eq!(want.get(p), Some(v), "{p}");
        }
    }
    assert_eq!(got.values().filter(|v| *v != "dir").count(), files_chosen);
    assert!(!got.contains_key("empty folder"));
    // Nothing was started for the other files.
    assert!(!d.join("out/.shoal-parts").exists());
    let sel = peer_ok(
        d,
        &l.data_dir,
        &["query", "--json", "SELECT sum(selected) AS s FROM files"],
        T,
    );
    assert!(sel.contains(&format!("{}", files_chosen)), "{sel}");
    // Now everything.
    peer_ok(d, &l.data_dir, &["select", &hash, "--all"], T);
    wait_seeding(d, &l, Duration::from_secs(120));
    assert!(shape(&d.join("out/sel")) == want, "the full tree differs");
}

/// After a kill: every bit the store claims is a good piece, read from the entry's working
/// file or, once placed, its final file. Returns how many bits are set.
fn assert_every_set_bit_is_a_good_piece(data_dir: &Path, desc: &Path, out_dir: &Path) -> u32 {
    let meta = shoal::metainfo::Metainfo::load(desc).unwrap();
    let store = shoal::store::Store::open(data_dir, false).unwrap();
    let Some(bits) = store.bitfield(&meta.info_hash, meta.piece_count()).unwrap() else {
        return 0;
    };
    let mut cache: Option<(usize, Vec<u8>)> = None;
    for i in bits.ones() {
        let (f, offset, len) = shoal::tree::locate(&meta, i);
        if cache.as_ref().is_none_or(|c| c.0 != f) {
            let part = out_dir
                .join(shoal::storage::files::PARTS_DIR)
                .join(shoal::storage::tree::working_name(&meta.info_hash, f));
            let done = meta.files[f].under(&out_dir.join(&meta.name));
            let data = std::fs::read(&part)
                .or_else(|_| std::fs::read(&done))
                .unwrap_or_default();
            cache = Some((f, data));
        }
        let data = &cache.as_ref().unwrap().1;
        let (start, end) = (offset as usize, offset as usize + len as usize);
        assert!(end <= data.len(), "bit {i} is set but its file is short");
        let got: [u8; 32] = Sha256::digest(&data[start..end]).into();
        assert_eq!(
            got, meta.pieces[i as usize],
            "bit {i} is set but the piece on disk is bad"
        );
    }
    bits.count()
}

#[test]
fn it_should_complete_a_tree_correctly_after_five_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(&d.join("k"), 200, 96);
    let cfg = d.join("peer.toml");
    std::fs::write(
        &cfg,
        "[peer]\nflush_interval = \"200ms\"\nmax_requests_per_peer = 8\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    // About 50 pieces a second, so the kills land mid-download.
    let seeder = start_peer(
        d,
        "seeder",
        &[t.addr],
        &["--config", &cfg, "--sabotage", "delay=20ms"],
    );
    let (_, desc) = publish(d, &seeder, "k");
    let meta = shoal::metainfo::Metainfo::load(Path::new(&desc)).unwrap();
    let mut l = start_peer(d, "l", &[t.addr], &["--config", &cfg]);
    peer_ok(d, &l.data_dir, &["get", &desc, "--output", "out"], T);
    let mut rng = rand::thread_rng();
    let mut kills = 0u64;
    while kills < 5 {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..900)));
        if torrent(d, &l)["state"] == "SEEDING" {
            break;
        }
        l.proc.kill9();
        kills += 1;
        let good =
            assert_every_set_bit_is_a_good_piece(&l.data_dir, Path::new(&desc), &d.join("out"));
        println!("kill {kills}: {good} pieces durable and verified");
        l = start_peer(d, "l", &[t.addr], &["--config", &cfg]);
    }
    assert_eq!(kills, 5, "the download finished before five kills");
    wait_seeding(d, &l, Duration::from_secs(120));
    assert!(
        shape(&d.join("out/k")) == shape(&d.join("k")),
        "the tree differs"
    );
    let sent = torrent(d, &seeder)["uploaded"].as_u64().unwrap();
    // Per kill: at most a flush interval of pieces (about 10 at 50/s, doubled) plus the
    // pipelined requests (8), as for one file.
    let bound = meta.length + kills * (20 + 8) * u64::from(meta.piece_length);
    println!(
        "received {:.1} MiB for a {:.1} MiB tree over {kills} kills (bound {:.1} MiB)",
        sent as f64 / 1048576.0,
        meta.length as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(sent >= meta.length);
    assert!(sent <= bound, "re-fetched too much: {sent} > {bound}");
}

#[test]
fn it_should_refuse_hostile_tree_descriptors_by_field_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(&d.join("h"), 20, 0);
    shoal_ok(d, &["create", "h", "--output", "h.json"], T);
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("h.json")).unwrap()).unwrap();
    let l = start_peer(d, "l", &[], &[]);
    type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
    let first_file = |v: &serde_json::Value| {
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .position(|f| f["length"].as_u64() > Some(0))
            .unwrap()
    };
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "dotdot",
            Box::new(move |v| {
                let i = first_file(v);
                v["files"][i]["path"] = serde_json::json!(["..", "x"])
            }),
        ),
        (
            "absolute",
            Box::new(move |v| {
                let i = first_file(v);
                v["files"][i]["path"] = serde_json::json!(["/x"])
            }),
        ),
        (
            "climb",
            Box::new(move |v| {
                let i = first_file(v);
                v["files"][i]["path"] = serde_json::json!(["a", "..", "..", "x"])
            }),
        ),
        (
            "climb in one",
            Box::new(move |v| {
                let i = first_file(v);
                v["files"][i]["path"] = serde_json::json!(["a/../../x"])
            }),
        ),
        (
            "case",
            Box::new(|v| {
                let files = v["files"].as_array_mut().unwrap();
                let mut twin = files[1].clone();
                let p = twin["path"].as_array_mut().unwrap();
                let last = p.last_mut().unwrap();
                *last = last.as_str().unwrap().to_uppercase().into();
                twin["length"] = 0.into();
                files.insert(2, twin);
            }),
        ),
        (
            "100001 files",
            Box::new(|v| {
                let files: Vec<serde_json::Value> = (0..100_001)
                    .map(|i| serde_json::json!({"path": [format!("f{i}")], "length": 0}))
                    .collect();
                v["files"] = files.into();
                v["length"] = 0.into();
                v["pieces"] = serde_json::json!([]);
            }),
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, mutate) in cases {
        let mut v = good.clone();
        mutate(&mut v);
        let p = d.join(format!("{name}.json"));
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
        let out_dir = format!("out {name}");
        let out = shoal(d, &get_args(&l, p.to_str().unwrap(), &out_dir, &[]), T);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains("`files`"), "{name}: {err}");
        assert!(
            !d.join(&out_dir).exists(),
            "{name}: the output dir was written"
        );
        // The daemon refuses it too, sent straight to it (the CLI above checks first).
        let req = shoal::control::CtlRequest::Add {
            descriptor: Some(serde_json::to_string(&v).unwrap()),
            info_hash: None,
            output: Some(d.join(&out_dir)),
            trackers: Vec::new(),
            only: Vec::new(),
        };
        let direct = rt.block_on(shoal::control::call(&l.data_dir, &req, T));
        let err = format!("{:#}", direct.expect_err("the daemon accepted it"));
        if name != "100001 files" {
            assert!(err.contains("`files`"), "{name}: {err}");
        }
        assert!(
            !d.join(&out_dir).exists(),
            "{name}: the daemon wrote the output dir"
        );
        let sent = peer_ok(d, &l.data_dir, &["status", "--json"], T);
        assert!(
            sent.contains("\"torrents\": []") || sent.contains("\"torrents\":[]"),
            "{name}: {sent}"
        );
    }
    assert!(!d.join("x").exists() && !d.join("l").join("x").exists());
    // A symlink placed in the output tree before the download: refused, nothing written
    // through it.
    let victim = d.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::create_dir_all(d.join("outs/h")).unwrap();
    let first_dir = good["files"][1]["path"][0].as_str().unwrap().to_string();
    std::os::unix::fs::symlink(&victim, d.join("outs/h").join(&first_dir)).unwrap();
    let out = shoal(d, &get_args(&l, "h.json", "outs", &[]), T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "symlink: accepted");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    assert!(!d.join("outs/.shoal-parts").exists());
}

/// The working file of entry `index` of the tree `hex_hash` downloading into `out`.
fn tree_working(out: &Path, hex_hash: &str, index: usize) -> std::path::PathBuf {
    let hash: [u8; 32] = hex::decode(hex_hash).unwrap().try_into().unwrap();
    out.join(shoal::storage::files::PARTS_DIR)
        .join(shoal::storage::tree::working_name(&hash, index))
}

fn wait_needs_recheck(d: &Path, peer: &PeerProc) -> serde_json::Value {
    wait_for(Duration::from_secs(60), "NEEDS RECHECK", || {
        let st = torrent(d, peer);
        assert_ne!(
            st["state"], "SEEDING",
            "completed over a file that is gone: {st}"
        );
        (st["state"] == "NEEDS RECHECK").then_some(st)
    })
}

#[test]
fn it_should_need_a_recheck_when_one_working_file_of_a_tree_is_deleted_or_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("wt");
    std::fs::create_dir_all(src.join("a")).unwrap();
    for i in 0..3 {
        random_file(&src.join(format!("a/f{i}.bin")), 4 << 20);
    }
    let slow = d.join("slow.toml");
    std::fs::write(&slow, "[peer]\nmax_upload_rate = \"2MiB\"\n").unwrap();
    let fast = d.join("fast.toml");
    std::fs::write(&fast, "[peer]\nflush_interval = \"200ms\"\n").unwrap();
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let _seeder = start_peer(
        d,
        "seeder",
        &[t.addr],
        &["--config", slow.to_str().unwrap()],
    );
    let (hash, desc) = publish(d, &_seeder, "wt");
    let l = start_peer(d, "l", &[t.addr], &["--config", fast.to_str().unwrap()]);
    peer_ok(d, &l.data_dir, &["get", &desc, "--output", "out"], T);
    let out = d.join("out");
    let have = |d: &Path| torrent(d, &l)["have"].as_u64().unwrap();

    // Deleted: entry 0's working file, mid-download.
    wait_for(T, "a few pieces", || (have(d) >= 2).then_some(()));
    std::fs::remove_file(tree_working(&out, &hash, 0)).unwrap();
    let st = wait_needs_recheck(d, &l);
    let note = st["note"].as_str().unwrap();
    assert!(note.contains("deleted or replaced"), "{st}");
    assert!(
        note.contains(&format!("{hash}-0.part")),
        "names the file: {st}"
    );
    // It stays stopped, and nothing is placed.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(torrent(d, &l)["state"], "NEEDS RECHECK");
    assert!(!out.join("wt").exists());

    // Replaced: entry 1's working file by a copy (same bytes, another file).
    peer_ok(d, &l.data_dir, &["recheck", &hash], T);
    let from = have(d);
    wait_for(T, "more pieces", || (have(d) >= from + 2).then_some(()));
    let w1 = tree_working(&out, &hash, 1);
    let bytes = std::fs::read(&w1).unwrap();
    std::fs::remove_file(&w1).unwrap();
    std::fs::write(&w1, bytes).unwrap();
    let st = wait_needs_recheck(d, &l);
    assert!(
        st["note"]
            .as_str()
            .unwrap()
            .contains(&format!("{hash}-1.part")),
        "{st}\n{}",
        l.proc.stderr()
    );
    assert!(!out.join("wt").exists());

    // A recheck starts again from what is really there, and the tree completes.
    peer_ok(d, &l.data_dir, &["recheck", &hash], T);
    wait_seeding(d, &l, Duration::from_secs(120));
    assert!(shape(&out.join("wt")) == shape(&src), "the tree differs");
}
