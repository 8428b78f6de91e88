//! `shoal demo`: a whole swarm on this machine, with the real binary in separate processes,
//! each peer on its own loopback address, playing a scenario of faults (the seed's
//! experiments), then a report whose checks decide the exit code.
//!
//! Every child is started by [`Demo`], which kills them all by PID when it is dropped: at the
//! end, on an error, and on Ctrl-C.

mod live;
mod report;
mod scenario;
mod scheduler;
mod supervisor;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::units::{fmt_bytes, parse_size};
use scenario::{Action, Scenario};
use supervisor::{Demo, TrackerNode};

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
        r = scheduler::play(&mut demo, &sc, size, piece, &args) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every process of the demo is stopped"),
    }
}
