//! The `shoal` command line: parse, load config, apply flags over it, and call the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use shoal_tracker::client::TrackerClient;
use shoal_tracker::proto::{Request, Response};

use crate::config::Config;
use crate::control::{self, CtlRequest, CtlResponse, StatusReport};
use crate::metainfo::{self, Metainfo};
use crate::units::{fmt_bytes, fmt_rate, parse_size};

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Private-swarm file distribution: redundant trackers, verified pieces, crash-safe resume"
)]
pub struct Cli {
    /// Config file (default: ./config.toml when present).
    #[arg(long, global = true, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write the descriptor (.json) of a file or a folder tree.
    Create {
        file: PathBuf,
        /// Output path (default: <file name>.json in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Piece size, e.g. 1MiB, 256KiB (default from config: 1MiB).
        #[arg(long)]
        piece_size: Option<String>,
        /// Tracker HOST:PORT to put in the descriptor (repeatable).
        #[arg(long = "tracker")]
        trackers: Vec<String>,
    },
    /// Print what a descriptor describes.
    Show {
        descriptor: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Run or watch a tracker.
    Tracker {
        #[command(subcommand)]
        cmd: TrackerCmd,
    },
    /// The files a swarm offers (asks the first tracker that answers).
    List {
        #[arg(long = "tracker", required = true)]
        trackers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run or control a peer.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// Hash a file or a folder tree and seed it in place from the running peer.
    Publish {
        file: PathBuf,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Download a file, from its descriptor or its info hash.
    Get {
        /// A descriptor path, or a 64-hex-digit info hash.
        what: String,
        /// Directory for the file (default: DATA_DIR/downloads).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Extra tracker HOST:PORT (repeatable).
        #[arg(long = "tracker")]
        trackers: Vec<String>,
        /// Show progress and return when the file is complete and verified.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// A tree: download only the files this glob matches (repeatable; a folder's name
        /// selects what is below it). Change it later with `shoal select`.
        #[arg(long = "only")]
        only: Vec<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// A tree: change which files are downloaded (files already there stay).
    Select {
        info_hash: String,
        /// Download the files this glob matches (repeatable).
        #[arg(long = "only", required_unless_present = "all")]
        only: Vec<String>,
        /// Download every file.
        #[arg(long, conflicts_with = "only")]
        all: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Torrents with progress, state, rates, and who we trade with.
    Status {
        #[arg(long)]
        json: bool,
        /// Redraw every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Read-only SQL over the running peer's state (tables: torrents, pieces, peers, trackers).
    Query {
        sql: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop transferring a torrent (kept, resumable).
    Pause {
        info_hash: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Resume a paused torrent.
    Resume {
        info_hash: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Re-hash a torrent's data and fix its bitfield both ways.
    Recheck {
        info_hash: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Forget a torrent; its data is kept unless --delete-data.
    Remove {
        info_hash: String,
        #[arg(long)]
        delete_data: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Emulate a whole swarm on this machine and play the seed's experiments.
    Demo(crate::demo::DemoArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DataDir {
    /// The peer's data directory (default from config: shoal-data).
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum TrackerCmd {
    /// Run a tracker.
    Run {
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        db: Option<PathBuf>,
        /// Prune peers silent for longer than this (e.g. 30s).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Heartbeat interval handed to peers (e.g. 10s).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
    },
    /// The live swarm table: file, peer, %, role.
    Monitor {
        #[arg(long = "tracker", required = true)]
        tracker: String,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Run the peer daemon.
    Run {
        #[command(flatten)]
        dir: DataDir,
        /// Address for other peers (HOST:PORT).
        #[arg(long)]
        listen: Option<String>,
        /// Tracker HOST:PORT (repeatable; adds to config).
        #[arg(long = "tracker")]
        trackers: Vec<String>,
        /// TESTING ONLY: corrupt, drop or delay served pieces, e.g. corrupt=0.3,drop=0.1,delay=200ms.
        #[arg(long)]
        sabotage: Option<String>,
    },
    /// Ask the running peer to stop cleanly.
    Stop {
        #[command(flatten)]
        dir: DataDir,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init(); // Already set (tests calling run twice): keep the first.
}

fn data_dir(cfg: &Config, d: &DataDir) -> PathBuf {
    d.data_dir
        .clone()
        .unwrap_or_else(|| cfg.peer.data_dir.clone())
}

/// Run a parsed command line.
///
/// # Errors
/// Whatever the command failed with, with context; `main` prints it and exits non-zero.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    init_logging(&cfg.peer.log);
    match cli.cmd {
        Cmd::Create {
            file,
            output,
            piece_size,
            trackers,
        } => create(&cfg, &file, output, piece_size, trackers).await,
        Cmd::Show { descriptor, json } => show(&descriptor, json),
        Cmd::Tracker { cmd } => match cmd {
            TrackerCmd::Run {
                listen,
                db,
                ttl,
                interval,
            } => {
                let mut tc = cfg.tracker.clone();
                if let Some(l) = listen {
                    tc.listen = l;
                }
                if let Some(db) = db {
                    tc.db = db;
                }
                if let Some(t) = ttl {
                    tc.ttl = t;
                }
                if let Some(i) = interval {
                    tc.interval = i;
                }
                run_tracker(tc).await
            }
            TrackerCmd::Monitor {
                tracker,
                once,
                interval,
                json,
            } => monitor(&tracker, once, interval, json).await,
        },
        Cmd::List { trackers, json } => list(&trackers, json).await,
        Cmd::Peer { cmd } => match cmd {
            PeerCmd::Run {
                dir,
                listen,
                trackers,
                sabotage,
            } => {
                let mut pc = cfg.peer.clone();
                pc.data_dir = data_dir(&cfg, &dir);
                if let Some(l) = listen {
                    pc.listen = l;
                }
                pc.trackers.extend(trackers);
                let sabotage = match sabotage {
                    Some(s) => crate::sabotage::Sabotage::parse(&s).map_err(anyhow::Error::msg)?,
                    None => Default::default(),
                };
                crate::daemon::run(pc, sabotage).await
            }
            PeerCmd::Stop { dir } => simple(&data_dir(&cfg, &dir), CtlRequest::Shutdown).await,
        },
        Cmd::Publish { file, dir } => {
            let req = CtlRequest::Publish {
                path: std::path::absolute(&file)
                    .with_context(|| format!("cannot publish {}", file.display()))?,
            };
            // Hashing a large file takes a while before the daemon answers.
            match control::call(&data_dir(&cfg, &dir), &req, Duration::from_secs(3600)).await? {
                CtlResponse::Published {
                    info_hash,
                    descriptor,
                } => {
                    println!("info hash: {info_hash}");
                    println!("descriptor: {}", descriptor.display());
                    Ok(())
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        Cmd::Get {
            what,
            output,
            trackers,
            wait,
            timeout,
            only,
            dir,
        } => {
            get(
                &data_dir(&cfg, &dir),
                &what,
                output,
                trackers,
                wait,
                timeout,
                only,
            )
            .await
        }
        Cmd::Select {
            info_hash,
            only,
            all,
            dir,
        } => crate::cli_tree::select(&data_dir(&cfg, &dir), info_hash, only, all).await,
        Cmd::Status { json, watch, dir } => status(&data_dir(&cfg, &dir), json, watch).await,
        Cmd::Query { sql, json, dir } => query(&data_dir(&cfg, &dir), sql, json).await,
        Cmd::Pause { info_hash, dir } => {
            simple(&data_dir(&cfg, &dir), CtlRequest::Pause { info_hash }).await
        }
        Cmd::Resume { info_hash, dir } => {
            simple(&data_dir(&cfg, &dir), CtlRequest::Resume { info_hash }).await
        }
        Cmd::Recheck { info_hash, dir } => {
            simple(&data_dir(&cfg, &dir), CtlRequest::Recheck { info_hash }).await
        }
        Cmd::Remove {
            info_hash,
            delete_data,
            dir,
        } => {
            simple(
                &data_dir(&cfg, &dir),
                CtlRequest::Remove {
                    info_hash,
                    delete_data,
                },
            )
            .await
        }
        Cmd::Demo(args) => crate::demo::run(args).await,
    }
}

async fn simple(dir: &Path, req: CtlRequest) -> anyhow::Result<()> {
    match control::call(dir, &req, Duration::from_secs(600)).await? {
        CtlResponse::Ok { message } => {
            println!("{message}");
            Ok(())
        }
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn run_tracker(tc: shoal_tracker::TrackerConfig) -> anyhow::Result<()> {
    let tracker = shoal_tracker::Tracker::bind(tc).await?;
    // Tests and scripts read this line for the bound port.
    println!("tracker listening on {}", tracker.local_addr()?);
    std::io::stdout().flush()?;
    let token = tokio_util::sync::CancellationToken::new();
    let t2 = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        t2.cancel();
    });
    tracker.run(token).await
}

async fn create(
    cfg: &Config,
    file: &Path,
    output: Option<PathBuf>,
    piece_size: Option<String>,
    trackers: Vec<String>,
) -> anyhow::Result<()> {
    let ps = match piece_size {
        Some(s) => parse_size(&s).map_err(anyhow::Error::msg)?,
        None => u64::from(cfg.peer.piece_length()),
    };
    let ps = u32::try_from(ps).map_err(|_| anyhow::anyhow!("piece size {ps} is over 16 MiB"))?;
    metainfo::check_piece_length(ps)?;
    let len = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    let progress = Arc::new(metainfo::HashProgress::default());
    let bar = (std::io::stderr().is_terminal() && len > 64 << 20).then(|| {
        let b = indicatif::ProgressBar::new(len);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "hashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b
    });
    let f = file.to_path_buf();
    let p2 = progress.clone();
    let job = tokio::task::spawn_blocking(move || metainfo::create(&f, ps, trackers, &p2));
    let meta = if let Some(bar) = &bar {
        let mut job = job;
        loop {
            tokio::select! {
                r = &mut job => break r??,
                _ = tokio::time::sleep(Duration::from_millis(100)) => bar.set_position(progress.bytes.load(Ordering::Relaxed)),
            }
        }
    } else {
        job.await??
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let out = output.unwrap_or_else(|| PathBuf::from(format!("{}.json", meta.name)));
    meta.save(&out)?;
    println!("wrote {}", out.display());
    println!("info hash: {}", meta.info_hash_hex());
    Ok(())
}

fn show(path: &Path, json: bool) -> anyhow::Result<()> {
    let m = Metainfo::load(path).with_context(|| format!("descriptor {}", path.display()))?;
    if json {
        let mut v = serde_json::json!({
            "name": m.name, "length": m.length, "piece_length": m.piece_length,
            "pieces": m.piece_count(), "trackers": m.trackers, "created_at": m.created_at,
            "file_sha256": hex::encode(m.file_sha256), "info_hash": m.info_hash_hex(),
        });
        crate::cli_tree::show_files_json(&m, &mut v);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("name: {}", m.name);
    println!("length: {} ({})", m.length, fmt_bytes(m.length));
    println!(
        "piece length: {} ({})",
        m.piece_length,
        fmt_bytes(u64::from(m.piece_length))
    );
    println!("pieces: {}", m.piece_count());
    println!(
        "trackers: {}",
        if m.trackers.is_empty() {
            "(none)".into()
        } else {
            m.trackers.join(", ")
        }
    );
    println!("created at: {}", m.created_at);
    println!("file sha256: {}", hex::encode(m.file_sha256));
    println!("info hash: {}", m.info_hash_hex());
    crate::cli_tree::show_files(&m);
    Ok(())
}

async fn ask_first(trackers: &[String], req: &Request) -> anyhow::Result<Response> {
    let mut errors = Vec::new();
    for t in trackers {
        match TrackerClient::connect(t, None, Duration::from_secs(3)).await {
            Ok(mut c) => match c.request(req).await {
                Ok(r) => return Ok(r),
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    bail!("no tracker answered: {}", errors.join("; "))
}

async fn list(trackers: &[String], json: bool) -> anyhow::Result<()> {
    let Response::Files { files } = ask_first(trackers, &Request::ListFiles).await? else {
        bail!("unexpected reply to LIST_FILES");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&files)?);
        return Ok(());
    }
    println!(
        "{:<30} {:>12} {:>8} {:>8}  INFO HASH",
        "NAME", "SIZE", "SEEDERS", "LEECHERS"
    );
    for f in files {
        println!(
            "{:<30} {:>12} {:>8} {:>8}  {}",
            f.name,
            fmt_bytes(f.length),
            f.seeders,
            f.leechers,
            f.info_hash
        );
    }
    Ok(())
}

fn monitor_table(peers: &[shoal_tracker::proto::SwarmEntry]) -> String {
    let mut s = format!("{:<24} {:<22} {:>7}  {}\n", "FILE", "PEER", "%", "ROLE");
    for p in peers {
        let pct = if p.total == 0 {
            0.0
        } else {
            100.0 * p.have as f64 / p.total as f64
        };
        s.push_str(&format!(
            "{:<24} {:<22} {:>6.1}%  {}\n",
            p.name,
            format!("{}:{}", p.addr, p.port),
            pct,
            p.role.as_str()
        ));
    }
    if peers.is_empty() {
        s.push_str("(no live peers)\n");
    }
    s
}

async fn monitor(tracker: &str, once: bool, interval: Duration, json: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal() && !once && !json;
    loop {
        let Response::Swarm { peers } =
            ask_first(&[tracker.to_string()], &Request::Swarm { info_hash: None }).await?
        else {
            bail!("unexpected reply to SWARM");
        };
        if json {
            println!("{}", serde_json::to_string(&peers)?);
        } else {
            let table = monitor_table(&peers);
            if tty {
                // Clear and redraw in place.
                print!("\x1b[2J\x1b[H{tracker} — live swarm\n\n{table}");
            } else {
                print!("{table}");
            }
        }
        std::io::stdout().flush()?;
        if once {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

async fn get(
    dir: &Path,
    what: &str,
    output: Option<PathBuf>,
    trackers: Vec<String>,
    wait: bool,
    timeout: Option<Duration>,
    only: Vec<String>,
) -> anyhow::Result<()> {
    let output = output.map(|o| std::path::absolute(&o)).transpose()?;
    let is_hash = what.len() == 64
        && what.bytes().all(|b| b.is_ascii_hexdigit())
        && !Path::new(what).exists();
    let req = if is_hash {
        CtlRequest::Add {
            descriptor: None,
            info_hash: Some(what.to_ascii_lowercase()),
            output,
            trackers,
            only,
        }
    } else {
        let m = Metainfo::load(Path::new(what)).with_context(|| format!("descriptor {what}"))?;
        CtlRequest::Add {
            descriptor: Some(String::from_utf8(m.to_json())?),
            info_hash: None,
            output,
            trackers,
            only,
        }
    };
    let CtlResponse::Added { info_hash } =
        control::call(dir, &req, Duration::from_secs(60)).await?
    else {
        bail!("unexpected reply to ADD");
    };
    println!("info hash: {info_hash}");
    if !wait {
        return Ok(());
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b
    });
    let mut last_line = std::time::Instant::now();
    loop {
        let CtlResponse::Status(report) =
            control::call(dir, &CtlRequest::Status, Duration::from_secs(10)).await?
        else {
            bail!("unexpected reply to STATUS");
        };
        if let Some(t) = report.torrents.iter().find(|t| t.info_hash == info_hash) {
            let done = (t.have as u64 * t.piece_length as u64).min(t.length);
            if let Some(b) = &bar {
                b.set_length(t.length);
                b.set_position(done);
                b.set_message(t.name.clone());
            } else if last_line.elapsed() > Duration::from_secs(5) {
                eprintln!("{}: {:.1}% ({})", t.name, t.progress * 100.0, t.state);
                last_line = std::time::Instant::now();
            }
            match t.state.as_str() {
                "SEEDING" => {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    println!("complete and verified: {}", t.data_path);
                    return Ok(());
                }
                "FAILED" | "NEEDS RECHECK" => {
                    bail!(
                        "download of {} stopped: {}",
                        t.name,
                        t.note.clone().unwrap_or_else(|| t.state.clone())
                    )
                }
                _ => {}
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() > d) {
            bail!(
                "gave up waiting after {}",
                humantime::format_duration(timeout.unwrap_or_default())
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The human status view: per torrent a progress bar line, then the load-balancing table.
pub fn render_status(r: &StatusReport) -> String {
    let mut s = format!("peer {} listening on {}\n", r.peer_id, r.listen);
    if r.torrents.is_empty() {
        s.push_str("no torrents\n");
    }
    for t in &r.torrents {
        let width = 30usize;
        let filled = ((t.progress * width as f64).round() as usize).min(width);
        let eta = t.eta_secs.map_or("-".to_string(), |e| {
            humantime::format_duration(Duration::from_secs(e)).to_string()
        });
        s.push_str(&format!(
            "\n{} ({})  {}\n[{}{}] {:5.1}%  {:<13} down {}  up {}  eta {}\n",
            t.name,
            fmt_bytes(t.length),
            &t.info_hash[..16.min(t.info_hash.len())],
            "#".repeat(filled),
            "-".repeat(width - filled),
            t.progress * 100.0,
            t.state,
            fmt_rate(t.down_rate),
            fmt_rate(t.up_rate),
            eta
        ));
        if let Some(n) = &t.note {
            s.push_str(&format!("  note: {n}\n"));
        }
        if !t.peers.is_empty() {
            s.push_str(&format!(
                "  {:<24} {:<22} {:>9} {:>7} {:>7} {:>7} {}\n",
                "PEER", "ADDRESS", "LATENCY", "SCORE", "FROM", "TO", "STATE"
            ));
            for p in &t.peers {
                let st = if p.banned_until.is_some() {
                    "banned"
                } else if p.connected {
                    "connected"
                } else {
                    "-"
                };
                s.push_str(&format!(
                    "  {:<24} {:<22} {:>7.1}ms {:>7.2} {:>7} {:>7} {}\n",
                    p.peer_id,
                    format!("{}:{}", p.addr, p.port),
                    p.latency_ms,
                    p.score,
                    p.pieces_from,
                    p.pieces_to,
                    st
                ));
            }
        }
    }
    for tr in &r.trackers {
        s.push_str(&format!(
            "tracker {}: {}{}\n",
            tr.addr,
            if tr.reachable { "ok" } else { "unreachable" },
            tr.last_error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        ));
    }
    s
}

async fn status(dir: &Path, json: bool, watch: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let CtlResponse::Status(report) =
            control::call(dir, &CtlRequest::Status, Duration::from_secs(10)).await?
        else {
            bail!("unexpected reply to STATUS");
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else if watch && tty {
            print!("\x1b[2J\x1b[H{}", render_status(&report));
        } else {
            print!("{}", render_status(&report));
        }
        std::io::stdout().flush()?;
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn query(dir: &Path, sql: String, json: bool) -> anyhow::Result<()> {
    let CtlResponse::Rows { columns, rows } =
        control::call(dir, &CtlRequest::Query { sql }, Duration::from_secs(30)).await?
    else {
        bail!("unexpected reply to QUERY");
    };
    if json {
        let objs: Vec<serde_json::Map<String, serde_json::Value>> = rows
            .into_iter()
            .map(|r| columns.iter().cloned().zip(r).collect())
            .collect();
        println!("{}", serde_json::to_string_pretty(&objs)?);
        return Ok(());
    }
    println!("{}", columns.join("\t"));
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        println!("{}", cells.join("\t"));
    }
    Ok(())
}
