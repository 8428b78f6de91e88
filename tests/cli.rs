//! The command line as a newcomer meets it (issue 18): closed pipes, hash prefixes, the
//! unknown-hash wait, SQL refusals, `--json` everywhere, help texts, completions, rates after
//! completion, and the README's quick start run as written.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Start `shoal ARGS` with stdout piped, read one line, close the pipe, and return how the
/// process ended (bounded) and its stderr.
fn read_one_line_then_close(d: &Path, args: &[&str]) -> (Option<i32>, String) {
    let err_path = d.join(format!("pipe-{}.stderr", args[0]));
    let mut child = Command::new(shoal_bin())
        .args(args)
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "{args:?} printed nothing");
    drop(r); // The reader goes away, as `head -1` does.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} kept running after its reader left");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(err_path).unwrap())
}

#[test]
fn it_should_exit_0_quietly_when_the_reader_of_a_watch_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = start_tracker(d, "t", &[]);
    let p = start_peer(d, "p", &[t.addr], &[]);
    let (code, err) = read_one_line_then_close(
        d,
        &[
            "status",
            "--watch",
            "--data-dir",
            p.data_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    let tr = t.addr.to_string();
    let (code, err) = read_one_line_then_close(
        d,
        &["tracker", "monitor", "--tracker", &tr, "--interval", "50ms"],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
}

#[test]
fn it_should_accept_the_hash_prefix_that_status_shows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, [seeder], hash, _desc) = seeded(d, 2, [("seeder", &[])]);
    let dd = &seeder.data_dir;
    // The status screen shows 16 digits; they name the torrent.
    let screen = peer_ok(d, dd, &["status"], T);
    assert!(screen.contains(&hash[..16]), "{screen}");
    assert!(!screen.contains(&hash), "status shows a prefix only");
    let out = peer_ok(d, dd, &["pause", &hash[..16]], T);
    assert!(out.starts_with("paused"), "{out}");
    let out = peer_ok(d, dd, &["resume", &hash[..8].to_ascii_uppercase()], T);
    assert!(out.starts_with("resumed"), "{out}");
    let out = peer_ok(d, dd, &["recheck", &hash[..12]], T);
    assert!(out.contains("pieces good"), "{out}");
    // Too short, not hex, or naming nothing: a plain refusal.
    for (bad, says) in [
        (&hash[..7], "a unique prefix of at least 8"),
        ("zzzzzzzzzz", "is not an info hash"),
        (
            "0000000000",
            "no torrent in this peer has an info hash starting with 0000000000",
        ),
    ] {
        let o = shoal(d, &["pause", bad, "--data-dir", dd.to_str().unwrap()], T);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr_of(&o).contains(says), "{bad}: {}", stderr_of(&o));
    }
    let out: serde_json::Value =
        serde_json::from_str(&peer_ok(d, dd, &["remove", &hash[..10], "--json"], T)).unwrap();
    assert!(
        out["message"].as_str().unwrap().starts_with("removed"),
        "{out}"
    );
}

#[test]
fn it_should_say_who_was_asked_when_nobody_has_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let p = start_peer(d, "p", &[t.addr], &[]);
    let nobody = "ab".repeat(32);
    let t0 = Instant::now();
    let o = shoal(
        d,
        &[
            "get",
            &nobody,
            "--wait",
            "--timeout",
            "3s",
            "--data-dir",
            p.data_dir.to_str().unwrap(),
        ],
        T,
    );
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(3), "exit code 3 on timeout: {err}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(err.contains("stopped waiting after 3s"), "{err}");
    assert!(
        err.contains("no peer has sent the descriptor after"),
        "{err}"
    );
    assert!(
        err.contains(&format!("trackers asked: {} (answered)", t.addr)),
        "{err}"
    );
    assert!(err.contains("no tracker has returned a peer"), "{err}");
    assert!(
        err.contains(&format!("shoal remove {}", &nobody[..16])),
        "{err}"
    );
    // And it is still there, as promised, until removed by that prefix.
    assert_eq!(torrent(d, &p)["state"], "FETCHING METADATA");
    let out = peer_ok(d, &p.data_dir, &["remove", &nobody[..16]], T);
    assert!(out.contains("still being fetched"), "{out}");
}

#[test]
fn it_should_refuse_a_second_statement_and_keep_column_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_t, [seeder], _hash, _desc) = seeded(d, 1, [("seeder", &[])]);
    let dd = seeder.data_dir.to_str().unwrap();
    let o = shoal(
        d,
        &["query", "SELECT 1; DELETE FROM torrents", "--data-dir", dd],
        T,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains("refused: give one statement, not 2"),
        "{}",
        stderr_of(&o)
    );
    let o = shoal(
        d,
        &["query", "SELEC name FROM torrents", "--data-dir", dd],
        T,
    );
    let err = stderr_of(&o);
    assert!(
        err.contains("SQL error: near \"SELEC\": syntax error"),
        "{err}"
    );
    assert!(!err.contains("Error code"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nothing was deleted, and --json keeps the query's column order.
    let json = peer_ok(
        d,
        &seeder.data_dir,
        &[
            "query",
            "SELECT state, name, length FROM torrents",
            "--json",
        ],
        T,
    );
    let at = |k: &str| json.find(&format!("\"{k}\"")).unwrap();
    assert!(
        at("state") < at("name") && at("name") < at("length"),
        "{json}"
    );
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["name"], "file.bin");
}

#[test]
fn it_should_show_zero_download_rate_once_complete_and_rates_after_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_s], hash, desc) = seeded(d, 64, [("seeder", &["--sabotage", "delay=80ms"])]);
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "some progress", || {
        (torrent(d, &leecher)["have"].as_u64()? >= 4).then_some(())
    });
    peer_ok(d, &leecher.data_dir, &["pause", &hash[..16]], T);
    let have_paused = torrent(d, &leecher)["have"].as_u64().unwrap();
    peer_ok(d, &leecher.data_dir, &["resume", &hash[..16]], T);
    // After resume, while pieces arrive, the rate is not 0.
    wait_for(
        Duration::from_secs(30),
        "a rate while progress climbs",
        || {
            let t = torrent(d, &leecher);
            (t["state"] == "DOWNLOADING"
                && t["have"].as_u64()? > have_paused + 2
                && t["down_rate"].as_f64()? > 0.0)
                .then_some(())
        },
    );
    // After a kill -9 and a restart too.
    let mut leecher = leecher;
    leecher.proc.kill9();
    let leecher = start_peer(d, "leecher", &[t.addr], &[]);
    let have_restart = torrent(d, &leecher)["have"].as_u64().unwrap();
    wait_for(Duration::from_secs(30), "a rate after restart", || {
        let t = torrent(d, &leecher);
        (t["state"] == "DOWNLOADING"
            && t["have"].as_u64()? > have_restart + 2
            && t["down_rate"].as_f64()? > 0.0)
            .then_some(())
    });
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(out.status.success(), "{}", stderr_of(&out));
    // The moment it is complete, the download rate is 0, not fading.
    let t = torrent(d, &leecher);
    assert_eq!(t["state"], "SEEDING");
    assert_eq!(t["down_rate"].as_f64(), Some(0.0), "{t}");
    assert!(t["eta_secs"].is_null());
}

#[test]
fn it_should_explain_missing_files_and_descriptors_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("somedir")).unwrap();
    let t = start_tracker(d, "t", &[]);
    let p = start_peer(d, "p", &[t.addr], &[]);
    let dd = p.data_dir.to_str().unwrap();
    // A missing path is named plainly, without the OS's error twice.
    let o = shoal(d, &["publish", "nosuchdir", "--data-dir", dd], T);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("cannot publish nosuchdir: no such file"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    let o = shoal(d, &["get", "nosuch.json", "--data-dir", dd], T);
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("nosuch.json is neither a descriptor file nor an info hash"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    let o = shoal(d, &["show", "nosuch.json"], T);
    let err = stderr_of(&o);
    assert_eq!(err.matches("nosuch.json").count(), 1, "{err}");
}

#[test]
fn it_should_print_json_from_create_publish_get_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("f.bin"), 300_000);
    let c: serde_json::Value = serde_json::from_str(&shoal_ok(
        d,
        &["create", "f.bin", "--json", "--piece-size", "64KiB"],
        T,
    ))
    .unwrap();
    assert_eq!(c["pieces"], 5);
    assert_eq!(c["descriptor"], "f.bin.json");
    let t = start_tracker(d, "t", &["--interval", "1s"]);
    let s = start_peer(d, "s", &[t.addr], &[]);
    let pbl: serde_json::Value =
        serde_json::from_str(&peer_ok(d, &s.data_dir, &["publish", "f.bin", "--json"], T)).unwrap();
    let hash = pbl["info_hash"].as_str().unwrap().to_string();
    assert_eq!(hash.len(), 64);
    let l = start_peer(d, "l", &[t.addr], &[]);
    let desc = pbl["descriptor"].as_str().unwrap();
    let g: serde_json::Value = serde_json::from_str(&peer_ok(
        d,
        &l.data_dir,
        &[
            "get",
            desc,
            "--output",
            "out",
            "--wait",
            "--json",
            "--timeout",
            "50s",
        ],
        T,
    ))
    .unwrap();
    assert_eq!(g["info_hash"], hash.as_str());
    assert_eq!(g["state"], "SEEDING");
    assert!(g["data_path"].as_str().unwrap().ends_with("out/f.bin"));
    let r: serde_json::Value = serde_json::from_str(&peer_ok(
        d,
        &l.data_dir,
        &["remove", &hash, "--json", "--delete-data"],
        T,
    ))
    .unwrap();
    assert!(r["message"].as_str().unwrap().contains("deleted"), "{r}");
}

/// Every argument and option of every command has a description.
#[test]
fn it_should_describe_every_argument_in_help() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let commands: &[&[&str]] = &[
        &[],
        &["create"],
        &["show"],
        &["tracker", "run"],
        &["tracker", "monitor"],
        &["list"],
        &["peer", "run"],
        &["peer", "stop"],
        &["publish"],
        &["get"],
        &["status"],
        &["query"],
        &["pause"],
        &["resume"],
        &["recheck"],
        &["remove"],
        &["completions"],
        &["demo"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = shoal_ok(d, &args, T);
        let lines: Vec<&str> = help.lines().collect();
        let mut in_items = false;
        for (i, l) in lines.iter().enumerate() {
            if l.ends_with(':') && !l.starts_with(' ') {
                in_items = *l == "Arguments:" || *l == "Options:";
                continue;
            }
            let item = l
                .strip_prefix("  ")
                .is_some_and(|r| r.starts_with('-') || r.starts_with('<') || r.starts_with('['));
            if !in_items || !item {
                continue;
            }
            let same_line = l
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, h)| !h.trim().is_empty());
            let next_line = lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
            assert!(
                same_line || next_line,
                "{cmd:?}: no description for {l:?}\n{help}"
            );
        }
    }
    let top = shoal_ok(d, &["--help"], T);
    assert!(top.contains("Exit codes: 0 success"), "{top}");
    let run = shoal_ok(d, &["tracker", "run", "--help"], T);
    assert!(
        run.contains("[default: tracker.listen from config, 127.0.0.1:5000]"),
        "{run}"
    );
    assert!(
        run.contains("[default: tracker.db from config, \"tracker.db\"]"),
        "{run}"
    );
}

#[test]
fn it_should_print_shell_completions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bash = shoal_ok(d, &["completions", "bash"], T);
    assert!(
        bash.contains("_shoal()") && bash.contains("complete -F _shoal"),
        "{bash}"
    );
    assert!(bash.contains("--data-dir"));
    let zsh = shoal_ok(d, &["completions", "zsh"], T);
    assert!(zsh.starts_with("#compdef shoal"), "{zsh}");
    let fish = shoal_ok(d, &["completions", "fish"], T);
    assert!(fish.contains("complete -c shoal"), "{fish}");
}

/// README's "Quick start by hand", run line by line as written: background lines start
/// processes (killed at the end), the tracker's fixed port becomes an ephemeral one, and the
/// placeholders `<hash>`/`<hash16>` take the hash `publish` printed.
#[test]
fn it_should_run_the_readme_quick_start_as_written() {
    let readme = include_str!("../README.md");
    let block = readme
        .split("<!-- quick start: tests/cli.rs runs these lines -->")
        .nth(1)
        .expect("quick start marker")
        .split("```sh\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin_dir = shoal_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut background: Vec<std::process::Child> = Vec::new();
    let mut tracker_addr: Option<String> = None;
    let mut hash = String::new();
    let mut outputs = Vec::new();
    for raw in block.lines() {
        let line = raw.split(" #").next().unwrap().trim();
        if line.is_empty() || line.starts_with("cargo ") {
            continue;
        }
        let mut line = line.to_string();
        if let Some(a) = &tracker_addr {
            line = line.replace("127.0.0.1:5000", a);
        } else if line.starts_with("shoal tracker run") {
            line = line.replace("127.0.0.1:5000", "127.0.0.1:0");
        }
        line = line
            .replace("<hash16>", hash.get(..16).unwrap_or(""))
            .replace("<hash>", &hash);
        if let Some(bg) = line.strip_suffix('&') {
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(format!("exec {bg}"))
                .current_dir(d)
                .env("PATH", &path)
                .env_remove("SHOAL_CONFIG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut r = BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            r.read_line(&mut first).unwrap();
            assert!(!first.is_empty(), "{bg} did not start");
            std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
            if first.starts_with("tracker listening on ") {
                tracker_addr = first.split_whitespace().nth(3).map(str::to_string);
            }
            background.push(child);
            continue;
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&line)
            .current_dir(d)
            .env("PATH", &path)
            .env_remove("SHOAL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{line} did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "README line failed: {line}\n{stdout}\n{}",
            stderr_of(&out)
        );
        if let Some(h) = stdout.lines().find_map(|l| l.strip_prefix("info hash: ")) {
            if hash.is_empty() {
                hash = h.to_string();
            }
        }
        outputs.push((line, stdout));
    }
    for c in &mut background {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert_eq!(hash.len(), 64, "publish printed the hash");
    let said = |cmd: &str, what: &str| {
        let (_, out) = outputs
            .iter()
            .find(|(l, _)| l.starts_with(cmd))
            .unwrap_or_else(|| panic!("README runs {cmd}"));
        assert!(out.contains(what), "{cmd}: {out}");
    };
    said("shoal get seeder/descriptors", "complete and verified");
    said(&format!("shoal get {hash}"), "complete and verified");
    said("shoal query", "SEEDING");
    assert_eq!(
        sha256sum(&d.join("big.iso")),
        sha256sum(&d.join("late/downloads/big.iso"))
    );
}
