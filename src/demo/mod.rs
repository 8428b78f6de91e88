//! `shoal demo`: a whole swarm on this machine, with the real binary in separate processes,
//! each peer on its own loopback address, playing a scenario of faults (the seed's
//! experiments), then a report whose checks decide the exit code.
//!
//! Every child is started by [`Demo`], which kills them all by PID when it is dropped: at the
//! end, on an error, and on Ctrl-C.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use shoal_tracker::client::TrackerClient;

use crate::control::{self, CtlRequest, CtlResponse, StatusReport, TorrentStatus};
use crate::units::{fmt_bytes, parse_size};

const DEFAULT_SCENARIO: &str = include_str!("default.toml");

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Leechers to start (default from the scenario: 4).
    #[arg(long)]
    pub peers: Option<usize>,
    /// Size of the generated file (default 256MiB).
    #[arg(long)]
    pub size: Option<String>,
    /// Piece size (default 1MiB).
    #[arg(long)]
    pub piece_size: Option<String>,
    /// Upload limit per peer per second, so the steps can be watched ("0": full speed).
    #[arg(long)]
    pub upload_rate: Option<String>,
    /// A scenario TOML file (the default one is src/demo/default.toml).
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Keep the working files (databases, stores, logs, downloads) in DIR.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Also write the report as JSON to this path.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub timeout: Duration,
    /// Serve the last leecher's dashboard on ADDR, e.g. 127.0.0.1:8081, to watch the swarm in a browser [default: off].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    peers: usize,
    size: String,
    piece_size: String,
    #[serde(default = "no_limit")]
    upload_rate: String,
    #[serde(default, rename = "step")]
    steps: Vec<Step>,
}

fn no_limit() -> String {
    "0".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    at_progress: Option<f64>,
    at_secs: Option<f64>,
    action: Action,
    peer: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Sabotage,
    KillTracker,
    RestartTracker,
    KillPeer,
    RestartPeer,
    AddPeer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    Seeder,
    Leecher,
    Saboteur,
    Late,
}

struct Node {
    name: String,
    ip: String,
    role: Role,
    data_dir: PathBuf,
    out_dir: PathBuf,
    child: Option<Child>,
    peer_id: String,
    last: Option<TorrentStatus>,
    restarts: u32,
}

struct TrackerNode {
    name: String,
    listen: String,
    db: PathBuf,
    child: Option<Child>,
}

/// The swarm: owns every child process.
struct Demo {
    exe: PathBuf,
    work: PathBuf,
    keep: bool,
    config: PathBuf,
    trackers: Vec<TrackerNode>,
    nodes: Vec<Node>,
    start: Instant,
    timeline: Vec<(f64, String)>,
    hash: String,
    descriptor: PathBuf,
    file: PathBuf,
    /// The node that serves the dashboard (`--http`), and where.
    http: Option<(usize, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for c in self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.as_mut())
            .chain(self.trackers.iter_mut().filter_map(|t| t.child.as_mut()))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Start a child and read its first stdout line (its address), bounded.
fn spawn_child(exe: &Path, args: &[String], log: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .env("RUST_LOG", "info")
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink); // Keep the pipe drained.
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if !line.is_empty() => Ok((child, line)),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{args:?} did not start; its log {}: {}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

fn addr_in(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.parse::<std::net::SocketAddr>().is_ok())
        .unwrap_or_default()
        .to_string()
}

impl Demo {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn log(&mut self, msg: String) {
        let t = self.now();
        if !std::io::stdout().is_terminal() {
            println!("{t:6.1}s  {msg}");
        }
        self.timeline.push((t, msg));
    }

    fn tracker_addrs(&self) -> Vec<String> {
        self.trackers.iter().map(|t| t.listen.clone()).collect()
    }

    fn start_tracker(&mut self, i: usize) -> anyhow::Result<()> {
        let t = &self.trackers[i];
        let args: Vec<String> = [
            "tracker",
            "run",
            "--listen",
            &t.listen,
            "--db",
            &t.db.display().to_string(),
            "--interval",
            "1s",
            "--ttl",
            "6s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.work.join(format!("{}.log", t.name));
        let (child, line) = spawn_child(&self.exe, &args, &log)?;
        let t = &mut self.trackers[i];
        t.listen = addr_in(&line);
        t.child = Some(child);
        Ok(())
    }

    fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let n = &self.nodes[i];
        let mut args: Vec<String> = vec![
            "--config".into(),
            self.config.display().to_string(),
            "peer".into(),
            "run".into(),
            "--data-dir".into(),
            n.data_dir.display().to_string(),
            "--listen".into(),
            format!("{}:0", n.ip),
        ];
        for t in self.tracker_addrs() {
            args.push("--tracker".into());
            args.push(t);
        }
        if n.role == Role::Saboteur {
            args.push("--sabotage".into());
            args.push("corrupt=1.0".into());
        }
        if let Some((_, addr)) = self.http.as_ref().filter(|(node, _)| *node == i) {
            args.push("--http".into());
            args.push(addr.clone());
        }
        let log = self.work.join(format!("{}.log", n.name));
        let (child, line) = spawn_child(&self.exe, &args, &log)?;
        let peer_id = line
            .split("peer id ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_default()
            .to_string();
        if let Some(url) = line.split(" http on ").nth(1) {
            let name = self.nodes[i].name.clone();
            self.log(format!("{name}'s dashboard: {}", url.trim()));
        }
        let n = &mut self.nodes[i];
        n.child = Some(child);
        n.peer_id = peer_id;
        Ok(())
    }

    fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn add_node(&mut self, role: Role) -> usize {
        let i = self.nodes.len();
        let name = match role {
            Role::Seeder => "seeder".to_string(),
            Role::Saboteur => "saboteur".to_string(),
            Role::Late => "late".to_string(),
            Role::Leecher => format!(
                "leecher{}",
                self.nodes
                    .iter()
                    .filter(|n| n.role == Role::Leecher)
                    .count()
                    + 1
            ),
        };
        // Each peer on its own loopback address, so the tables show distinct hosts.
        let ip = format!("127.0.0.{}", i + 2);
        self.nodes.push(Node {
            data_dir: self.work.join(&name),
            out_dir: self.work.join(format!("{name}-files")),
            name,
            ip,
            role,
            child: None,
            peer_id: String::new(),
            last: None,
            restarts: 0,
        });
        i
    }

    async fn call(&self, i: usize, req: CtlRequest) -> anyhow::Result<CtlResponse> {
        control::call(&self.nodes[i].data_dir, &req, Duration::from_secs(120)).await
    }

    async fn publish(&mut self, i: usize) -> anyhow::Result<()> {
        match self
            .call(
                i,
                CtlRequest::Publish {
                    path: self.file.clone(),
                    private: false,
                },
            )
            .await?
        {
            CtlResponse::Published {
                info_hash,
                descriptor,
            } => {
                self.hash = info_hash;
                self.descriptor = descriptor;
                Ok(())
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }

    async fn get(&self, i: usize, by_hash: bool) -> anyhow::Result<()> {
        let req = CtlRequest::Add {
            descriptor: if by_hash {
                None
            } else {
                Some(std::fs::read_to_string(&self.descriptor)?)
            },
            info_hash: by_hash.then(|| self.hash.clone()),
            output: Some(self.nodes[i].out_dir.clone()),
            trackers: Vec::new(),
            only: Vec::new(),
        };
        self.call(i, req).await?;
        Ok(())
    }

    async fn status(&self, i: usize) -> Option<StatusReport> {
        self.nodes[i].child.as_ref()?;
        match control::call(
            &self.nodes[i].data_dir,
            &CtlRequest::Status,
            Duration::from_secs(5),
        )
        .await
        {
            Ok(CtlResponse::Status(r)) => Some(r),
            _ => None,
        }
    }

    async fn refresh(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(r) = self.status(i).await {
                if let Some(t) = r.torrents.into_iter().find(|t| t.info_hash == self.hash) {
                    self.nodes[i].last = Some(t);
                }
            }
        }
    }

    fn downloaders(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.role, Role::Leecher | Role::Late))
    }

    fn leecher_progress(&self) -> f64 {
        let v: Vec<f64> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Leecher)
            .map(|n| n.last.as_ref().map_or(0.0, |t| t.progress))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    fn all_done(&self) -> bool {
        self.downloaders()
            .all(|n| n.child.is_some() && n.last.as_ref().is_some_and(|t| t.state == "SEEDING"))
    }

    fn name_of(&self, peer_id: &str) -> String {
        self.nodes
            .iter()
            .find(|n| n.peer_id == peer_id)
            .map_or_else(|| peer_id.to_string(), |n| n.name.clone())
    }

    async fn swarm_of(&self, tracker: usize) -> Option<usize> {
        let mut c =
            TrackerClient::connect(&self.trackers[tracker].listen, None, Duration::from_secs(1))
                .await
                .ok()?;
        c.swarm_all(Some(&self.hash)).await.ok().map(|p| p.len())
    }

    fn render(&self) -> String {
        let mut s = format!(
            "shoal demo — {:.1}s — {}\n\n",
            self.now(),
            self.work.display()
        );
        for n in &self.nodes {
            let (p, st) = n.last.as_ref().map_or((0.0, "starting".to_string()), |t| {
                (t.progress, t.state.clone())
            });
            let w = 30;
            let f = ((p * w as f64) as usize).min(w);
            let alive = if n.child.is_some() { "" } else { " (down)" };
            s.push_str(&format!(
                "{:<10} {:<11} [{}{}] {:5.1}% {}{}\n",
                n.name,
                n.ip,
                "#".repeat(f),
                "-".repeat(w - f),
                p * 100.0,
                st,
                alive
            ));
        }
        s.push('\n');
        for (i, t) in self.trackers.iter().enumerate() {
            s.push_str(&format!(
                "tracker {} {} {}\n",
                ["A (primary)", "B"][i.min(1)],
                t.listen,
                if t.child.is_some() { "up" } else { "DOWN" }
            ));
        }
        s.push_str("\nlast events:\n");
        for (t, m) in self.timeline.iter().rev().take(6).rev() {
            s.push_str(&format!("  {t:6.1}s  {m}\n"));
        }
        s
    }
}

#[derive(Debug, Default, Serialize)]
struct Report {
    ok: bool,
    seconds_to_full_distribution: f64,
    size: u64,
    piece_size: u32,
    timeline: Vec<(f64, String)>,
    /// receiver -> sender -> bytes.
    fed: BTreeMap<String, BTreeMap<String, u64>>,
    /// receiver -> sender -> corrupt pieces rejected.
    rejected: BTreeMap<String, BTreeMap<String, u32>>,
    /// Who banned the saboteur.
    bans: Vec<String>,
    tracker_failovers: usize,
    restarted_peer_received: Option<u64>,
    restarted_peer_refetched: Option<u64>,
    primary_tracker_swarm_after_restart: Option<usize>,
    verified: BTreeMap<String, bool>,
    checks: Vec<(String, bool)>,
}

fn sha256_file(path: &Path) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(h.finalize().into())
}

/// Run the demo.
///
/// # Errors
/// A process that does not start, a timeout, or a failed check (after the report).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let text = match &args.scenario {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read scenario {}", p.display()))?,
        None => DEFAULT_SCENARIO.to_string(),
    };
    let mut sc: Scenario = toml::from_str(&text).context("scenario")?;
    if let Some(p) = args.peers {
        sc.peers = p;
    }
    if let Some(s) = args.size.clone() {
        sc.size = s;
    }
    if let Some(s) = args.piece_size.clone() {
        sc.piece_size = s;
    }
    if let Some(s) = args.upload_rate.clone() {
        sc.upload_rate = s;
    }
    if sc.peers == 0 {
        bail!("the demo needs at least one leecher");
    }
    for s in &sc.steps {
        if s.at_progress.is_none() && s.at_secs.is_none() {
            bail!(
                "scenario: step {:?} has neither at_progress nor at_secs",
                s.action
            );
        }
        if matches!(s.action, Action::KillPeer | Action::RestartPeer)
            && !(1..=sc.peers).contains(&s.peer.unwrap_or(0))
        {
            bail!(
                "scenario: step {:?} needs `peer` from 1 to {}",
                s.action,
                sc.peers
            );
        }
    }
    let size = parse_size(&sc.size).map_err(anyhow::Error::msg)?;
    let piece = u32::try_from(parse_size(&sc.piece_size).map_err(anyhow::Error::msg)?)?;
    crate::metainfo::check_piece_length(piece)?;
    parse_size(&sc.upload_rate).map_err(anyhow::Error::msg)?;
    let work = match &args.keep {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let work = std::fs::canonicalize(&work)?;
    let config = work.join("demo-peer.toml");
    std::fs::write(
        &config,
        format!(
            "[peer]\nflush_interval = \"500ms\"\nmax_upload_rate = \"{}\"\npiece_size = \"{}\"\n\
             tracker_timeout = \"1s\"\ntracker_backoff_max = \"2s\"\nconnect_timeout = \"2s\"\n",
            sc.upload_rate, sc.piece_size
        ),
    )?;
    let mut demo = Demo {
        exe: std::env::current_exe()?,
        keep: args.keep.is_some(),
        config,
        trackers: vec![
            TrackerNode {
                name: "trackerA".into(),
                listen: "127.0.0.1:0".into(),
                db: work.join("trackerA.db"),
                child: None,
            },
            TrackerNode {
                name: "trackerB".into(),
                listen: "127.0.0.1:0".into(),
                db: work.join("trackerB.db"),
                child: None,
            },
        ],
        nodes: Vec::new(),
        start: Instant::now(),
        timeline: Vec::new(),
        hash: String::new(),
        descriptor: PathBuf::new(),
        file: work.join("demo.bin"),
        work,
        http: None,
    };
    println!(
        "shoal demo: {} leechers, {} file in {} pieces; working in {}",
        sc.peers,
        fmt_bytes(size),
        fmt_bytes(u64::from(piece)),
        demo.work.display()
    );
    tokio::select! {
        r = play(&mut demo, &sc, size, piece, &args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every process of the demo is stopped"),
    }
}

async fn play(
    demo: &mut Demo,
    sc: &Scenario,
    size: u64,
    piece: u32,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    {
        let file = demo.file.clone();
        tokio::task::spawn_blocking(move || write_random(&file, size)).await??;
    }
    demo.start_tracker(0)?;
    demo.start_tracker(1)?;
    let [a, b] = [
        demo.trackers[0].listen.clone(),
        demo.trackers[1].listen.clone(),
    ];
    demo.log(format!("trackers up: A (primary) {a}, B {b}"));
    let seeder = demo.add_node(Role::Seeder);
    demo.start_node(seeder)?;
    demo.publish(seeder).await?;
    demo.log(format!(
        "seeder {} published {} (info hash {})",
        demo.nodes[seeder].ip,
        fmt_bytes(size),
        &demo.hash[..16]
    ));
    let leechers: Vec<usize> = (0..sc.peers)
        .map(|_| demo.add_node(Role::Leecher))
        .collect();
    if let (Some(addr), Some(&last)) = (args.http.clone(), leechers.last()) {
        demo.http = Some((last, addr));
    }
    for &i in &leechers {
        demo.start_node(i)?;
        demo.get(i, false).await?;
    }

    demo.log(format!(
        "{} leechers started; the swarm forms (the seed's experiments 1-2)",
        leechers.len()
    ));
    let mut fired = vec![false; sc.steps.len()];
    let mut saboteur: Option<usize> = None;
    let mut restarted: Option<usize> = None;
    let mut killed_tracker_at: Option<f64> = None;
    let mut tracker_down_seen = 0usize;
    let mut primary_back: Option<usize> = None;
    let tty = std::io::stdout().is_terminal();
    let deadline = Instant::now() + args.timeout;
    let mut last_plain = Instant::now();
    loop {
        demo.refresh().await;
        let progress = demo.leecher_progress();
        for (k, step) in sc.steps.iter().enumerate() {
            if fired[k] {
                continue;
            }
            let due = step.at_progress.is_some_and(|p| progress >= p)
                || step.at_secs.is_some_and(|s| demo.now() >= s);
            if !due {
                continue;
            }
            fired[k] = true;
            let pct = progress * 100.0;
            match step.action {
                Action::Sabotage => {
                    let i = demo.add_node(Role::Saboteur);
                    demo.start_node(i)?;
                    demo.publish(i).await?;
                    saboteur = Some(i);
                    demo.log(format!(
                        "saboteur {} joins, serving corrupt pieces",
                        demo.nodes[i].ip
                    ));
                }
                Action::KillTracker => {
                    if let Some(mut c) = demo.trackers[0].child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    killed_tracker_at = Some(progress);
                    demo.log(format!(
                        "{pct:.0}%: primary tracker {} killed with SIGKILL (the seed's experiment 4)",
                        demo.trackers[0].listen
                    ));
                }
                Action::RestartTracker => {
                    demo.start_tracker(0)?;
                    demo.log(format!(
                        "{pct:.0}%: primary tracker restarted on its database"
                    ));
                }
                Action::KillPeer | Action::RestartPeer => {
                    let i = leechers[step.peer.unwrap_or(1) - 1];
                    demo.kill_node(i);
                    let name = demo.nodes[i].name.clone();
                    demo.log(format!("{pct:.0}%: {name} killed with SIGKILL"));
                    if step.action == Action::RestartPeer {
                        demo.start_node(i)?;
                        demo.nodes[i].restarts += 1;
                        restarted = Some(i);
                        demo.log(format!(
                            "{name} restarted: it resumes from its store (the seed's experiment 5)"
                        ));
                    }
                }
                Action::AddPeer => {
                    let i = demo.add_node(Role::Late);
                    demo.start_node(i)?;
                    demo.get(i, true).await?;
                    demo.log(format!(
                        "{pct:.0}%: late peer {} joins knowing only the info hash (the seed's experiments 3, 6)",
                        demo.nodes[i].ip
                    ));
                }
            }
        }
        // Failover: peers that noticed the dead primary and went on.
        if killed_tracker_at.is_some() && demo.trackers[0].child.is_none() {
            let mut seen = 0;
            for i in 0..demo.nodes.len() {
                if let Some(r) = demo.status(i).await {
                    if r.trackers
                        .iter()
                        .any(|t| t.addr == demo.trackers[0].listen && t.failures > 0)
                    {
                        seen += 1;
                    }
                }
            }
            tracker_down_seen = tracker_down_seen.max(seen);
        }
        if demo.trackers[0].child.is_some() && killed_tracker_at.is_some() {
            if let Some(n) = demo.swarm_of(0).await {
                primary_back = Some(primary_back.map_or(n, |m: usize| m.max(n)));
            }
        }
        if tty {
            print!("\x1b[2J\x1b[H{}", demo.render());
            std::io::stdout().flush()?;
        } else if last_plain.elapsed() > Duration::from_secs(3) {
            last_plain = Instant::now();
            println!(
                "{:6.1}s  leechers at {:.0}% on average",
                demo.now(),
                progress * 100.0
            );
        }
        let pending_steps = fired.iter().any(|f| !f);
        if demo.all_done() && !pending_steps {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the demo did not finish within {}; logs are in {}",
                humantime::format_duration(args.timeout),
                demo.work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = demo.now();
    demo.log("every peer has the whole file".into());
    // Let the restored primary hear a heartbeat from everyone.
    if killed_tracker_at.is_some() && demo.trackers[0].child.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(n) = demo.swarm_of(0).await {
            primary_back = Some(primary_back.map_or(n, |m| m.max(n)));
        }
    }
    demo.refresh().await;
    let report = build_report(
        demo,
        size,
        piece,
        elapsed,
        saboteur,
        restarted,
        killed_tracker_at,
        tracker_down_seen,
        primary_back,
    );
    print!("{}", render_report(demo, &report));
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if !report.ok {
        bail!("some checks failed; logs are in {}", demo.work.display());
    }
    Ok(())
}

fn write_random(path: &Path, len: u64) -> std::io::Result<()> {
    use rand::RngCore;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    demo: &Demo,
    size: u64,
    piece: u32,
    elapsed: f64,
    saboteur: Option<usize>,
    restarted: Option<usize>,
    killed_tracker_at: Option<f64>,
    tracker_down_seen: usize,
    primary_back: Option<usize>,
) -> Report {
    let mut r = Report {
        seconds_to_full_distribution: elapsed,
        size,
        piece_size: piece,
        timeline: demo.timeline.clone(),
        tracker_failovers: tracker_down_seen,
        primary_tracker_swarm_after_restart: primary_back,
        ..Default::default()
    };
    for n in demo.nodes.iter().filter(|n| n.role != Role::Saboteur) {
        let Some(t) = &n.last else { continue };
        for p in &t.peers {
            let from = demo.name_of(&p.peer_id);
            if p.bytes_from > 0 {
                r.fed
                    .entry(n.name.clone())
                    .or_default()
                    .insert(from.clone(), p.bytes_from);
            }
            if p.failures > 0 {
                r.rejected
                    .entry(n.name.clone())
                    .or_default()
                    .insert(from.clone(), p.failures);
            }
            if p.banned_until.is_some()
                && saboteur.is_some_and(|s| demo.nodes[s].peer_id == p.peer_id)
            {
                r.bans.push(n.name.clone());
            }
        }
    }
    let want = sha256_file(&demo.file);
    for n in demo.downloaders() {
        let ok = want.is_some() && sha256_file(&n.out_dir.join("demo.bin")) == want;
        r.verified.insert(n.name.clone(), ok);
    }
    if let Some(i) = restarted {
        // What it received = what every honest peer says it sent it.
        let id = &demo.nodes[i].peer_id;
        let got: u64 = demo
            .nodes
            .iter()
            .filter(|n| n.role != Role::Saboteur)
            .filter_map(|n| n.last.as_ref())
            .flat_map(|t| t.peers.iter())
            .filter(|p| &p.peer_id == id)
            .map(|p| p.bytes_to)
            .sum();
        r.restarted_peer_received = Some(got);
        r.restarted_peer_refetched = Some(got.saturating_sub(size));
    }
    let mut checks = vec![(
        "every peer's file matches the SHA-256 of the original".to_string(),
        !r.verified.is_empty() && r.verified.values().all(|&v| v),
    )];
    if saboteur.is_some() {
        checks.push(("the saboteur was banned".into(), !r.bans.is_empty()));
    }
    if killed_tracker_at.is_some() {
        checks.push((
            "peers saw the primary tracker down and finished through the other".into(),
            tracker_down_seen > 0 && r.verified.values().all(|&v| v),
        ));
    }
    if let Some(x) = r.restarted_peer_refetched {
        checks.push((
            "the restarted peer re-fetched less than the whole file".into(),
            x < size,
        ));
    }
    if let Some(n) = primary_back {
        checks.push(("the primary tracker came back with the swarm".into(), n > 0));
    }
    if demo.nodes.iter().any(|n| n.role == Role::Late) {
        checks.push((
            "the late peer fetched the descriptor and the file by info hash".into(),
            demo.nodes
                .iter()
                .filter(|n| n.role == Role::Late)
                .all(|n| r.verified.get(&n.name) == Some(&true)),
        ));
    }
    r.ok = checks.iter().all(|(_, ok)| *ok);
    r.checks = checks;
    r
}

fn render_report(demo: &Demo, r: &Report) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\n=== shoal demo report ===\n{} file in {} pieces; time to full distribution: {:.1} s\n\ntimeline:\n",
        fmt_bytes(r.size),
        fmt_bytes(u64::from(r.piece_size)),
        r.seconds_to_full_distribution
    ));
    for (t, m) in &r.timeline {
        s.push_str(&format!("  {t:6.1}s  {m}\n"));
    }
    let senders: Vec<String> = demo.nodes.iter().map(|n| n.name.clone()).collect();
    s.push_str("\nwho fed whom (MiB received; row = receiver, column = sender):\n");
    s.push_str(&format!("  {:<10}", ""));
    for c in &senders {
        s.push_str(&format!("{c:>10}"));
    }
    s.push('\n');
    for (recv, row) in &r.fed {
        s.push_str(&format!("  {recv:<10}"));
        for c in &senders {
            let v = row.get(c).copied().unwrap_or(0);
            s.push_str(&format!("{:>10.1}", v as f64 / 1048576.0));
        }
        s.push('\n');
    }
    s.push_str("\npieces rejected (failed SHA-256):\n");
    if r.rejected.is_empty() {
        s.push_str("  none\n");
    }
    for (recv, row) in &r.rejected {
        for (from, n) in row {
            s.push_str(&format!("  {recv}: {n} from {from}\n"));
        }
    }
    s.push_str(&format!(
        "bans: {}\n",
        if r.bans.is_empty() {
            "none".to_string()
        } else {
            format!("saboteur banned by {}", r.bans.join(", "))
        }
    ));
    s.push_str(&format!(
        "tracker failovers: {} peers saw the primary down and went on with the other\n",
        r.tracker_failovers
    ));
    if let (Some(got), Some(extra)) = (r.restarted_peer_received, r.restarted_peer_refetched) {
        s.push_str(&format!(
            "restarted peer: received {} for a {} file (re-fetched {})\n",
            fmt_bytes(got),
            fmt_bytes(r.size),
            fmt_bytes(extra)
        ));
    }
    if let Some(n) = r.primary_tracker_swarm_after_restart {
        s.push_str(&format!(
            "primary tracker back from its database: {n} peers in its live swarm\n"
        ));
    }
    s.push_str("\nverified:\n");
    for (name, ok) in &r.verified {
        s.push_str(&format!(
            "  {name:<10} SHA-256 {}\n",
            if *ok { "matches" } else { "DOES NOT MATCH" }
        ));
    }
    s.push_str("\nchecks:\n");
    for (c, ok) in &r.checks {
        s.push_str(&format!("  [{}] {c}\n", if *ok { "ok" } else { "FAILED" }));
    }
    s.push_str(if r.ok {
        "\nall checks passed\n"
    } else {
        "\nSOME CHECKS FAILED\n"
    });
    s
}
