//! `shoal demo`: a whole swarm on this machine, with the real binary in separate processes,
//! each peer on its own host (an emulated one with real links in a network namespace, or a
//! loopback address), playing a scenario of faults (the seed's experiments), then a report
//! whose checks decide the exit code.
//!
//! Layout (dependencies point down): this file (arguments, set-up), [`scheduler`] (plays the
//! steps), [`live`] and [`report`] (what is shown), [`supervisor`] (the child processes),
//! [`emu`] (the emulated network), [`scenario`] (the file).
//!
//! Every child is started by the supervisor's `Demo`, which kills them all by PID when it is
//! dropped (at the end, on an error, on Ctrl-C or SIGTERM), then removes the emulated network.

mod emu;
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
use scenario::Scenario;
use supervisor::{Demo, TrackerNode};

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
    /// A scenario TOML file, or a shipped one by name: default, homogeneous, heterogeneous, seed.
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
    /// Where the hosts run: "auto" (emulated links when the scenario has `[link]` and this is
    /// root on Linux), "namespaces" (emulated or fail), "loopback".
    #[arg(long, default_value = "auto")]
    pub net: String,
    /// Serve the last leecher's dashboard on ADDR, e.g. 127.0.0.1:8081, to watch the swarm in a browser [default: off].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
}

/// Run the demo.
///
/// # Errors
/// A process that does not start, a timeout, or a failed check (after the report).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut sc = Scenario::load(args.scenario.as_deref())?;
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
    sc.validate()?;
    let size = parse_size(&sc.size).map_err(anyhow::Error::msg)?;
    let piece = u32::try_from(parse_size(&sc.piece_size).map_err(anyhow::Error::msg)?)?;
    crate::metainfo::check_piece_length(piece)?;
    parse_size(&sc.upload_rate).map_err(anyhow::Error::msg)?;
    let links = sc.links()?;
    let net = network_mode(&args, links.is_some())?;
    let work = match &args.keep {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("shoal-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let work = std::fs::canonicalize(&work)?;
    let config = work.join("demo-peer.toml");
    // Timeouts meant for loopback would cut connections over a 600 ms path: give every
    // exchange a few of the worst round trips on top.
    let slack = match (&net, &links) {
        (Net::Namespaces, Some(l)) => {
            let mut d: Vec<Duration> = l.iter().map(|(_, l)| l.delay).collect();
            d.sort();
            let worst_rtt = 2 * d.iter().rev().take(2).sum::<Duration>();
            worst_rtt * 8
        }
        _ => Duration::ZERO,
    };
    let ms = |base: u64| format!("{}ms", base + slack.as_millis() as u64);
    std::fs::write(
        &config,
        format!(
            "[peer]\nflush_interval = \"{}ms\"\nmax_upload_rate = \"{}\"\npiece_size = \"{}\"\n\
             tracker_timeout = \"{}\"\ntracker_backoff_max = \"2s\"\nconnect_timeout = \"{}\"\n",
            FLUSH_INTERVAL.as_millis(),
            sc.upload_rate,
            sc.piece_size,
            ms(1000),
            ms(2000)
        ),
    )?;
    let tracker = |name: &str| TrackerNode {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        db: work.join(format!("{name}.db")),
        child: None,
        ns: None,
    };
    let mut demo = Demo {
        exe: std::env::current_exe()?,
        keep: args.keep.is_some(),
        config,
        trackers: vec![tracker("trackerA"), tracker("trackerB")],
        nodes: Vec::new(),
        start: Instant::now(),
        timeline: Vec::new(),
        hash: String::new(),
        descriptor: PathBuf::new(),
        file: work.join("demo.bin"),
        work,
        http: None,
        t0: None,
        t0_unix_ms: None,
        emu: None,
    };
    println!(
        "shoal demo: {} leechers, {} file in {} pieces; working in {}",
        sc.peers,
        fmt_bytes(size),
        fmt_bytes(u64::from(piece)),
        demo.work.display()
    );
    match (&net, &links) {
        (Net::Loopback(why), Some(_)) => println!(
            "links: the scenario describes links, but they are not emulated ({why}): \
             running on loopback aliases, where only `upload_rate` limits"
        ),
        (Net::Loopback(_), None) => {
            println!("links: loopback aliases (127.0.0.x); the scenario describes no links")
        }
        (Net::Namespaces, _) => println!(
            "links: emulated, one network namespace per host (198.18.0.0/15, no route out), \
             rates by tc tbf, delay and loss by this process's delay lines"
        ),
    }
    let links = if net == Net::Namespaces { links } else { None };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = scheduler::play(&mut demo, &sc, size, piece, &args, links) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; every process of the demo is stopped"),
        _ = term.recv() => bail!("terminated; every process of the demo is stopped"),
    }
}

/// How long a peer may keep verified pieces in memory before they are durable; the resume
/// check allows one interval's worth of re-fetch.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Where the hosts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Net {
    Namespaces,
    /// Loopback aliases, and why.
    Loopback(String),
}

fn network_mode(args: &DemoArgs, has_links: bool) -> anyhow::Result<Net> {
    let why_not = emu::unavailable();
    Ok(match (args.net.as_str(), has_links) {
        ("loopback", _) => Net::Loopback("--net loopback".into()),
        (_, false) => Net::Loopback("no [link] in the scenario".into()),
        ("namespaces", true) => match why_not {
            Some(w) => bail!("--net namespaces: the emulator cannot run here: {w}"),
            None => Net::Namespaces,
        },
        ("auto", true) => match why_not {
            Some(w) => Net::Loopback(w),
            None => Net::Namespaces,
        },
        (other, _) => bail!("--net {other}: use auto, namespaces or loopback"),
    })
    .and_then(|n| {
        if n == Net::Namespaces && args.http.is_some() {
            bail!("--http serves on loopback, out of the emulated network's reach: add --net loopback")
        }
        Ok(n)
    })
}
