//! The supervisor: starts every tracker and peer as a child process of the same binary, talks
//! to them over their control sockets, and kills them all by PID when dropped (at the end, on an
//! error, and on Ctrl-C).

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use shoal_tracker::client::TrackerClient;

use super::emu::{in_netns, Emulator};
use super::scenario::late_name;
use crate::control::{self, CtlRequest, CtlResponse, StatusReport, TorrentStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    Seeder,
    Leecher,
    Saboteur,
    Late,
}

pub(crate) struct Node {
    pub(crate) name: String,
    pub(crate) ip: String,
    pub(crate) role: Role,
    pub(crate) data_dir: PathBuf,
    pub(crate) out_dir: PathBuf,
    pub(crate) child: Option<Child>,
    pub(crate) peer_id: String,
    pub(crate) last: Option<TorrentStatus>,
    pub(crate) restarts: u32,
    /// Its emulated host's namespace (None on loopback).
    pub(crate) ns: Option<String>,
    /// Seconds from the start of the downloads to when it was first seen complete.
    pub(crate) finished_at: Option<f64>,
    /// (seconds since start, pieces verified) of the last few seconds of polls.
    pub(crate) have_log: std::collections::VecDeque<(f64, u32)>,
}

pub(crate) struct TrackerNode {
    pub(crate) name: String,
    pub(crate) listen: String,
    pub(crate) db: PathBuf,
    pub(crate) child: Option<Child>,
    pub(crate) ns: Option<String>,
}

/// The swarm: owns every child process.
pub(crate) struct Demo {
    pub(crate) exe: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) keep: bool,
    pub(crate) config: PathBuf,
    pub(crate) trackers: Vec<TrackerNode>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) start: Instant,
    pub(crate) timeline: Vec<(f64, String)>,
    pub(crate) hash: String,
    pub(crate) descriptor: PathBuf,
    pub(crate) file: PathBuf,
    /// The node that serves the dashboard (`--http`), and where.
    pub(crate) http: Option<(usize, String)>,
    /// When the leechers were given the download (seconds since `start`).
    pub(crate) t0: Option<f64>,
    /// The same moment in unix milliseconds, to read the leechers' own `completed_at` against.
    pub(crate) t0_unix_ms: Option<i64>,
    /// The emulated network; declared last so it goes after the children are killed.
    pub(crate) emu: Option<Emulator>,
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
pub(crate) fn spawn_child(
    exe: &Path,
    args: &[String],
    log: &Path,
    ns: Option<&str>,
) -> anyhow::Result<(Child, String)> {
    // `ip netns exec` execs in place: the child's PID is the shoal process's.
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        // SHOAL_DEMO_LOG sets the hosts' log filter (e.g. `shoal=debug`) to see why a run is slow.
        .env(
            "RUST_LOG",
            std::env::var("SHOAL_DEMO_LOG").unwrap_or_else(|_| "info".into()),
        )
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
    pub(crate) fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub(crate) fn log(&mut self, msg: String) {
        let t = self.now();
        if !std::io::stdout().is_terminal() {
            println!("{t:6.1}s  {msg}");
        }
        self.timeline.push((t, msg));
    }

    pub(crate) fn tracker_addrs(&self) -> Vec<String> {
        self.trackers.iter().map(|t| t.listen.clone()).collect()
    }

    pub(crate) fn start_tracker(&mut self, i: usize) -> anyhow::Result<()> {
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
        let (child, line) = spawn_child(&self.exe, &args, &log, t.ns.as_deref())?;
        let t = &mut self.trackers[i];
        t.listen = addr_in(&line);
        t.child = Some(child);
        Ok(())
    }

    pub(crate) fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
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
        let (child, line) = spawn_child(&self.exe, &args, &log, n.ns.as_deref())?;
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

    pub(crate) fn kill_node(&mut self, i: usize) {
        self.nodes[i].have_log.clear();
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn add_node(&mut self, role: Role) -> usize {
        let i = self.nodes.len();
        let name = match role {
            Role::Seeder => "seeder".to_string(),
            Role::Saboteur => "saboteur".to_string(),
            Role::Late => late_name(self.nodes.iter().filter(|n| n.role == Role::Late).count() + 1),
            Role::Leecher => format!(
                "leecher{}",
                self.nodes
                    .iter()
                    .filter(|n| n.role == Role::Leecher)
                    .count()
                    + 1
            ),
        };
        // Each peer on its own emulated host, or its own loopback address, so the tables show
        // distinct hosts.
        let (ip, ns) = match self.emu.as_ref().and_then(|e| e.host(&name)) {
            Some(h) => (h.ip.clone(), Some(h.ns.clone())),
            None => (format!("127.0.0.{}", i + 2), None),
        };
        self.nodes.push(Node {
            ns,
            finished_at: None,
            have_log: Default::default(),
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

    pub(crate) async fn call(&self, i: usize, req: CtlRequest) -> anyhow::Result<CtlResponse> {
        control::call(&self.nodes[i].data_dir, &req, Duration::from_secs(120)).await
    }

    pub(crate) async fn publish(&mut self, i: usize) -> anyhow::Result<()> {
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

    pub(crate) async fn get(&self, i: usize, by_hash: bool) -> anyhow::Result<()> {
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

    pub(crate) async fn status(&self, i: usize) -> Option<StatusReport> {
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

    pub(crate) async fn refresh(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(r) = self.status(i).await {
                if let Some(t) = r.torrents.into_iter().find(|t| t.info_hash == self.hash) {
                    let now = self.now();
                    let since = self.t0.map(|t0| now - t0);
                    let n = &mut self.nodes[i];
                    n.have_log.push_back((now, t.have));
                    while n.have_log.front().is_some_and(|(at, _)| *at < now - 5.0) {
                        n.have_log.pop_front();
                    }
                    if t.state == "SEEDING" && n.finished_at.is_none() && n.role != Role::Seeder {
                        // The leecher's own record of when it completed (same host clock), not
                        // when this poll saw it: polls are 200 ms apart, and a status round
                        // over every node takes tens of milliseconds more.
                        let own = t
                            .completed_at
                            .zip(self.t0_unix_ms)
                            .map(|(done, t0)| (done - t0) as f64 / 1000.0)
                            .filter(|&secs| secs >= 0.0 && since.is_some_and(|s| secs <= s));
                        n.finished_at = own.or(since);
                    }
                    n.last = Some(t);
                }
            }
        }
    }

    /// The status of one torrent of node `i`, asked now.
    pub(crate) async fn torrent(&self, i: usize) -> Option<TorrentStatus> {
        self.status(i)
            .await?
            .torrents
            .into_iter()
            .find(|t| t.info_hash == self.hash)
    }

    pub(crate) fn downloaders(&self) -> impl Iterator<Item = &Node> {
        self.nodes
            .iter()
            .filter(|n| matches!(n.role, Role::Leecher | Role::Late))
    }

    pub(crate) fn leecher_progress(&self) -> f64 {
        let v: Vec<f64> = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Leecher)
            .map(|n| n.last.as_ref().map_or(0.0, |t| t.progress))
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    pub(crate) fn all_done(&self) -> bool {
        self.downloaders()
            .all(|n| n.child.is_some() && n.last.as_ref().is_some_and(|t| t.state == "SEEDING"))
    }

    pub(crate) fn name_of(&self, peer_id: &str) -> String {
        self.nodes
            .iter()
            .find(|n| n.peer_id == peer_id)
            .map_or_else(|| peer_id.to_string(), |n| n.name.clone())
    }

    pub(crate) async fn swarm_of(&self, tracker: usize) -> Option<usize> {
        let t = &self.trackers[tracker];
        let (addr, hash) = (t.listen.clone(), self.hash.clone());
        let Some(ns) = t.ns.clone() else {
            return swarm_size(&addr, &hash).await;
        };
        // The tracker is only reachable from inside the emulated network: ask from a thread
        // there, with its own small runtime.
        tokio::task::spawn_blocking(move || {
            in_netns(&ns, || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(swarm_size(&addr, &hash))
            })
            .ok()
            .flatten()
        })
        .await
        .ok()
        .flatten()
    }
}

async fn swarm_size(addr: &str, hash: &str) -> Option<usize> {
    let mut c = TrackerClient::connect(addr, None, Duration::from_secs(2))
        .await
        .ok()?;
    c.swarm_all(Some(hash)).await.ok().map(|p| p.len())
}
