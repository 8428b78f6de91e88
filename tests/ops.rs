//! Operators' interfaces over HTTP: `/metrics`, the JSON API, the bearer token, and the
//! dashboard in a headless browser.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

/// The `http://ADDR/` a process printed on its first line.
pub fn http_addr(line_holder: &str) -> SocketAddr {
    line_holder
        .split("http://")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no http address in {line_holder:?}"))
}

/// Start a peer with HTTP on an ephemeral loopback port; returns it and the HTTP address.
fn peer_with_http(
    d: &Path,
    name: &str,
    trackers: &[SocketAddr],
    extra: &[&str],
) -> (PeerProc, SocketAddr) {
    let mut args = vec!["--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = start_peer(d, name, trackers, &args);
    let line = first_line(&p);
    let a = http_addr(&line);
    (p, a)
}

/// `http://ADDR/` of a peer, from its log (the helper keeps only the address of its first
/// stdout line).
fn first_line(p: &PeerProc) -> String {
    wait_for(Duration::from_secs(10), "HTTP address in the log", || {
        let e = p.proc.stderr();
        e.lines()
            .find(|l| l.contains("HTTP serving"))
            .and_then(|l| l.split("http_addr=").nth(1))
            .map(|s| format!("http://{}/", s.split_whitespace().next().unwrap_or("")))
    })
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read reply");
    let text = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, rest) = text.split_once("\r\n\r\n").expect("header end");
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn get_json(addr: SocketAddr, path: &str, token: Option<&str>) -> serde_json::Value {
    let (code, body) = http(addr, "GET", path, token, None);
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

// === A STRICT READER OF THE EXPOSITION FORMAT ===

/// Parse Prometheus/OpenMetrics text strictly: every line is a HELP, TYPE or UNIT comment, a
/// sample of a declared family with a suffix its type allows, or the final `# EOF`; label
/// values are quoted and escaped; values are floats; histogram buckets only grow and end at
/// `+Inf` = `_count`. Returns each series (`name{labels}`) with its value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeMap::new();
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.last(), Some(&""), "ends with a newline");
    let lines = &lines[..lines.len() - 1];
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for (i, line) in lines[..lines.len() - 1].iter().enumerate() {
        assert!(!line.is_empty(), "line {i}: blank line");
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap_or_else(|| panic!("line {i}: {line}"));
            assert!(name_ok(name), "line {i}: bad name {name}");
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    let t = parts.next().unwrap_or_default();
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&t),
                        "line {i}: type {t}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "line {i}: {name} declared twice"
                    );
                }
                other => panic!("line {i}: unknown comment {other}"),
            }
            continue;
        }
        // name{labels} value
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {i}: {line}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("line {i}: value {v:?}")),
        };
        let (name, labels) = match key.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("line {i}: {key}"));
                check_labels(l, i);
                (n, l)
            }
            None => (key, ""),
        };
        assert!(name_ok(name), "line {i}: bad name {name}");
        let family = types
            .iter()
            .filter(|(f, t)| {
                let suffixes: &[&str] = match t.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    "summary" => &["", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name == format!("{f}{s}"))
            })
            .map(|(f, _)| f.clone())
            .next();
        assert!(family.is_some(), "line {i}: {name} has no declared family");
        let _ = labels;
        assert!(
            series.insert(key.to_string(), v).is_none(),
            "line {i}: {key} twice"
        );
    }
    // Histograms: buckets grow, +Inf equals _count.
    for (f, t) in &types {
        if t != "histogram" {
            continue;
        }
        let buckets: Vec<(f64, f64)> = series
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{f}_bucket{{")))
            .map(|(k, v)| {
                let le = k.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        let mut sorted = buckets.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            sorted.windows(2).all(|w| w[0].1 <= w[1].1),
            "{f}: buckets shrink"
        );
        let inf = sorted.last().expect("a +Inf bucket");
        assert!(inf.0.is_infinite());
        assert_eq!(Some(&inf.1), series.get(&format!("{f}_count")), "{f}");
    }
    series
}

fn check_labels(l: &str, i: usize) {
    let mut rest = l;
    while !rest.is_empty() {
        let (k, v) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("line {i}: labels {l}"));
        assert!(
            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.is_empty(),
            "line {i}: label name {k}"
        );
        // The value runs to the first unescaped quote.
        let mut end = None;
        let mut esc = false;
        for (j, c) in v.char_indices() {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => {
                    end = Some(j);
                    break;
                }
                (false, '\n') => panic!("line {i}: raw newline in a label"),
                _ => {}
            }
        }
        let end = end.unwrap_or_else(|| panic!("line {i}: unterminated label value"));
        rest = &v[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no series {key} in {:?}", m.keys().collect::<Vec<_>>()))
}

// === THE TESTS ===

#[test]
fn it_should_expose_strict_metrics_whose_counters_move_during_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_s1, _s2], hash, desc) = seeded(
        d,
        24,
        [
            ("s1", &["--sabotage", "delay=30ms"]),
            ("s2", &["--sabotage", "delay=30ms"]),
        ],
    );
    let (leecher, http_at) = peer_with_http(d, "leecher", &[t.addr], &[]);
    let before = parse_exposition(&http(http_at, "GET", "/metrics", None, None).1);
    assert_eq!(metric(&before, "shoal_pieces_verified_total"), 0.0);
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    // Mid-download: some pieces counted, not all.
    let mid = wait_for(Duration::from_secs(60), "pieces counted", || {
        let m = parse_exposition(&http(http_at, "GET", "/metrics", None, None).1);
        (metric(&m, "shoal_pieces_verified_total") > 0.0).then_some(m)
    });
    let hk = format!("{{info_hash=\"{hash}\"}}");
    assert_eq!(metric(&mid, &format!("shoal_torrent_pieces{hk}")), 24.0);
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = parse_exposition(&http(http_at, "GET", "/metrics", None, None).1);
    assert_eq!(metric(&after, "shoal_pieces_verified_total"), 24.0);
    assert_eq!(
        metric(&after, "shoal_downloaded_bytes_total"),
        (24 << 20) as f64
    );
    assert_eq!(
        metric(&after, &format!("shoal_torrent_pieces_have{hk}")),
        24.0
    );
    assert!(metric(&after, "shoal_flush_seconds_count") >= 1.0);
    assert!(metric(&after, "shoal_peers_connected") >= 1.0);
    assert_eq!(metric(&after, "shoal_pieces_rejected_total"), 0.0);
    // The tracker's side: its own /metrics counts the announces by event.
    drop(t);
}

#[test]
fn it_should_serve_tracker_metrics_swarm_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (proc, line) = spawn_with_line(
        d,
        "t",
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            d.join("t.db").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            // The test announces by hand with made-up ids.
            "--allow-unsigned",
        ],
        &[],
    );
    let _keep = proc;
    let taddr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    let h = http_addr(&line);
    for ev in ["started", "progress"] {
        let r = announce(taddr, &"ab".repeat(32), "p1", 7001, ev, 3, 10);
        assert_eq!(r["type"], "PEERS", "{r}");
    }
    let m = parse_exposition(&http(h, "GET", "/metrics", None, None).1);
    assert_eq!(
        metric(&m, "shoal_tracker_announces_total{event=\"started\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "shoal_tracker_announces_total{event=\"progress\"}"),
        1.0
    );
    assert_eq!(metric(&m, "shoal_tracker_live_peers"), 1.0);
    assert!(metric(&m, "shoal_tracker_database_bytes") > 0.0);
    let swarm = get_json(h, "/api/swarm", None);
    assert_eq!(swarm[0]["peer_id"], "p1");
    let files = get_json(h, "/api/files", None);
    assert_eq!(files[0]["leechers"], 1);
    // The history chart: the last point is the live swarm now.
    wait_for(Duration::from_secs(10), "history sees the peer", || {
        let hist = get_json(h, "/api/history?secs=60&step=5", None);
        (hist.as_array().unwrap().last().unwrap()["live"] == 1).then_some(())
    });
    let (code, page) = http(h, "GET", "/", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("/api/history"), "{page}");
}

#[test]
fn it_should_answer_the_api_with_the_cli_json_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_seeder], hash, desc) = seeded(d, 8, [("seeder", &[])]);
    let (leecher, h) = peer_with_http(d, "leecher", &[t.addr], &[]);
    let out = get_wait(d, &leecher, &desc, "out");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rates, times and measured figures move between two reads; everything else must match.
    fn steady(mut v: serde_json::Value) -> serde_json::Value {
        for t in v["torrents"].as_array_mut().unwrap() {
            for k in ["down_rate", "up_rate", "eta_secs"] {
                t[k] = serde_json::Value::Null;
            }
            for p in t["peers"].as_array_mut().unwrap() {
                for k in ["latency_ms", "score"] {
                    p[k] = serde_json::Value::Null;
                }
            }
        }
        for tr in v["trackers"].as_array_mut().unwrap() {
            tr["last_ok"] = serde_json::Value::Null;
        }
        v
    }
    let api = get_json(h, "/api/status", None);
    let cli = status(d, &leecher.data_dir);
    assert_eq!(api["torrents"][0]["state"], "SEEDING");
    assert_eq!(steady(api), steady(cli));
    // Query: same rows, same column order, as `shoal query --json`.
    let sql = "SELECT state, name, have FROM torrents";
    let (_, body) = http(
        h,
        "GET",
        &format!(
            "/api/query?sql={}",
            sql.replace(' ', "%20").replace(',', "%2C")
        ),
        None,
        None,
    );
    let cli_q = peer_ok(d, &leecher.data_dir, &["query", sql, "--json"], T);
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(parse(&body), parse(&cli_q));
    for text in [&body, &cli_q] {
        let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
        assert!(
            at("state") < at("name") && at("name") < at("have"),
            "{text}"
        );
    }
    // Pause by prefix over HTTP, resume by the CLI with --json: same {"message"} shape.
    let (code, paused) = http(
        h,
        "POST",
        &format!("/api/torrents/{}/pause", &hash[..10]),
        None,
        None,
    );
    assert_eq!(code, 200, "{paused}");
    let paused: serde_json::Value = serde_json::from_str(&paused).unwrap();
    assert!(
        paused["message"].as_str().unwrap().starts_with("paused"),
        "{paused}"
    );
    assert_eq!(torrent(d, &leecher)["state"], "PAUSED");
    let resumed: serde_json::Value = serde_json::from_str(&peer_ok(
        d,
        &leecher.data_dir,
        &["resume", &hash[..16], "--json"],
        T,
    ))
    .unwrap();
    assert!(
        resumed["message"].as_str().unwrap().starts_with("resumed"),
        "{resumed}"
    );
    // An unknown torrent is a 404 with the reason.
    let (code, body) = http(h, "POST", "/api/torrents/ffffffffff/pause", None, None);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no torrent"), "{body}");
    // Remove over HTTP.
    let (code, body) = http(h, "DELETE", &format!("/api/torrents/{hash}"), None, None);
    assert_eq!(code, 200, "{body}");
    assert!(get_json(h, "/api/status", None)["torrents"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn it_should_refuse_to_serve_beyond_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = shoal(
        d,
        &[
            "peer",
            "run",
            "--data-dir",
            d.join("p").to_str().unwrap(),
            "--http",
            "0.0.0.0:0",
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refusing to serve HTTP on 0.0.0.0:0 without a bearer token"),
        "{err}"
    );
    let out = shoal(
        d,
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            d.join("t.db").to_str().unwrap(),
            "--http",
            "0.0.0.0:0",
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("without a bearer token"), "{err}");
}

#[test]
fn it_should_answer_401_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // With a token it may listen on every interface; tests talk to it on loopback.
    let p = start_peer_env(
        d,
        "p",
        &[],
        &["--http", "0.0.0.0:0"],
        &[("SHOAL_HTTP_TOKEN", "s3cret-token")],
    );
    let h = http_addr(&first_line(&p));
    let h = SocketAddr::new("127.0.0.1".parse().unwrap(), h.port());
    for path in ["/api/status", "/metrics"] {
        let (code, body) = http(h, "GET", path, None, None);
        assert_eq!(code, 401, "{path}: {body}");
        let (code, _) = http(h, "GET", path, Some("wrong"), None);
        assert_eq!(code, 401, "{path}");
        let (code, _) = http(h, "GET", path, Some("s3cret-token"), None);
        assert_eq!(code, 200, "{path}");
    }
    let (code, _) = http(h, "POST", "/api/torrents/abcdef0123/pause", None, None);
    assert_eq!(code, 401);
    // The page itself holds no data; it asks for the token in its fragment.
    let (code, page) = http(h, "GET", "/", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("/api/status"));
}

// === THE DASHBOARD IN A BROWSER ===

fn chromium() -> Option<String> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        let ok = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(c.to_string());
        }
    }
    None
}

/// Run headless Chromium with `args` on `url`, killed after `limit`; returns stdout.
fn run_chromium(
    bin: &str,
    profile: &Path,
    args: &[&str],
    url: &str,
    limit: Duration,
) -> Option<String> {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().ok()
}

/// `data-have` of the first torrent in a dumped dashboard, and its peer nodes.
fn read_dom(dom: &str) -> Option<(u64, usize)> {
    let have = dom
        .split("data-have=\"")
        .nth(1)?
        .split('"')
        .next()?
        .parse()
        .ok()?;
    Some((have, dom.matches("class=\"peer-node\"").count()))
}

#[test]
fn it_should_show_progress_and_who_feeds_whom_in_a_browser() {
    let Some(bin) = chromium() else {
        println!("SKIPPED: no chromium in PATH (.ci/run installs Debian's chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (t, [_s1, _s2], _hash, desc) = seeded(
        d,
        64,
        [
            ("s1", &["--sabotage", "delay=250ms"]),
            ("s2", &["--sabotage", "delay=250ms"]),
        ],
    );
    let (leecher, h) = peer_with_http(d, "leecher", &[t.addr], &[]);
    let url = format!("http://{h}/");
    let profile = d.join("chromium-profile");
    // Is the browser usable here at all? A blank page must load.
    if run_chromium(
        &bin,
        &profile,
        &["--dump-dom"],
        "about:blank",
        Duration::from_secs(60),
    )
    .is_none()
    {
        println!("SKIPPED: {bin} is installed but cannot run headless here");
        return;
    }
    peer_ok(d, &leecher.data_dir, &["get", &desc, "--output", "out"], T);
    wait_for(Duration::from_secs(30), "two seeders feeding", || {
        let t = torrent(d, &leecher);
        let feeding = t["peers"]
            .as_array()?
            .iter()
            .filter(|p| p["pieces_from"].as_u64().unwrap_or(0) > 0)
            .count();
        (feeding >= 2).then_some(())
    });
    let dump = |budget: &str| {
        run_chromium(
            &bin,
            &profile,
            &[&format!("--virtual-time-budget={budget}"), "--dump-dom"],
            &url,
            Duration::from_secs(60),
        )
        .expect("chromium dumped the page")
    };
    let first = dump("3000");
    let (have1, nodes1) =
        read_dom(&first).unwrap_or_else(|| panic!("no torrent in the page: {first}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (have2, nodes2) = loop {
        let dom = dump("3000");
        let (have, nodes) = read_dom(&dom).expect("torrent in the page");
        if have > have1 || Instant::now() > deadline {
            break (have, nodes);
        }
    };
    assert!(
        have2 > have1,
        "progress did not change in the page: {have1} then {have2}"
    );
    assert!(have1 < 64, "the first view was taken mid-download");
    assert!(
        nodes1 >= 2 && nodes2 >= 2,
        "peers in who-feeds-whom: {nodes1}, {nodes2}"
    );
    assert!(
        first.contains("class=\"feed feed-in\""),
        "arrows from the seeders"
    );
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    let _ = run_chromium(
        &bin,
        &profile,
        &[
            "--virtual-time-budget=3000",
            "--window-size=1100,900",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
        Duration::from_secs(60),
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "screenshot at {}",
        shot.display()
    );
    println!("dashboard screenshot: {}", shot.display());
}

#[test]
fn it_should_draw_the_tracker_swarm_and_its_history_in_a_browser() {
    let Some(bin) = chromium() else {
        println!("SKIPPED: no chromium in PATH (.ci/run installs Debian's chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (proc, line) = spawn_with_line(
        d,
        "t",
        &[
            "tracker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--db",
            d.join("t.db").to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            // The test announces by hand with made-up ids.
            "--allow-unsigned",
        ],
        &[],
    );
    let _keep = proc;
    let taddr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap();
    let h = http_addr(&line);
    announce(taddr, &"cd".repeat(32), "peer-one", 7001, "started", 1, 4);
    announce(taddr, &"cd".repeat(32), "peer-two", 7002, "started", 4, 4);
    let profile = d.join("chromium-profile");
    let Some(dom) = run_chromium(
        &bin,
        &profile,
        &["--virtual-time-budget=3000", "--dump-dom"],
        &format!("http://{h}/"),
        Duration::from_secs(60),
    ) else {
        println!("SKIPPED: {bin} is installed but cannot run headless here");
        return;
    };
    assert!(
        dom.contains("<td>peer-one</td>") && dom.contains("<td>peer-two</td>"),
        "{dom}"
    );
    assert!(
        dom.contains("<td>seeder</td>") && dom.contains("<td>leecher</td>"),
        "{dom}"
    );
    // The history chart is drawn, ending at the two live peers.
    let chart = dom.split("class=\"history\"").next().unwrap();
    assert!(dom.contains("class=\"history\""), "{dom}");
    assert!(
        chart.contains(">2</text>"),
        "the chart's scale tops at 2 peers: {dom}"
    );
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tracker-dashboard.png");
    let _ = run_chromium(
        &bin,
        &profile,
        &[
            "--virtual-time-budget=3000",
            "--window-size=1000,800",
            &format!("--screenshot={}", shot.display()),
        ],
        &format!("http://{h}/"),
        Duration::from_secs(60),
    );
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "{}",
        shot.display()
    );
}

#[test]
fn it_should_let_the_demo_serve_a_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = shoal(
        d,
        &[
            "demo",
            "--peers",
            "2",
            "--size",
            "8MiB",
            // 32 pieces, so the saboteur always gets its threshold of chances before the
            // download ends (with 8 pieces it once did not, and the demo's check failed).
            "--piece-size",
            "256KiB",
            "--upload-rate",
            "4MiB",
            "--http",
            "127.0.0.1:0",
            "--timeout",
            "150s",
        ],
        Duration::from_secs(180),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = stdout
        .lines()
        .find_map(|l| l.split("'s dashboard: ").nth(1))
        .unwrap_or_else(|| panic!("no dashboard line: {stdout}"));
    let a: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    assert_ne!(a.port(), 0, "{url}");
    assert!(stdout.contains("the seed's experiment 4"), "{stdout}");
}
