//! Commands that make or move files: `create`, `show`, `publish`, `get`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::out;
use super::render::SHORT_HASH;
use crate::config::Config;
use crate::control::{self, CtlRequest, CtlResponse, StatusReport, TorrentStatus};
use crate::metainfo::{self, Metainfo};
use crate::units::{fmt_bytes, parse_size};

/// `get --wait --timeout` ran out of time; `main` exits with code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

/// What a command is about to hash must be a regular file or a folder tree: say so plainly
/// instead of the OS's error.
fn check_regular_file(path: &Path, verb: &str) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("cannot {verb} {}: no such file", path.display())
        }
        Err(e) => bail!("cannot {verb} {}: {e}", path.display()),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if !m.is_file() => bail!(
            "cannot {verb} {}: not a regular file or a folder",
            path.display()
        ),
        Ok(_) => Ok(()),
    }
}

pub async fn create(
    cfg: &Config,
    file: &Path,
    output: Option<PathBuf>,
    piece_size: Option<String>,
    trackers: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    let ps = match piece_size {
        Some(s) => parse_size(&s).map_err(anyhow::Error::msg)?,
        None => u64::from(cfg.peer.piece_length()),
    };
    let ps = u32::try_from(ps).map_err(|_| anyhow::anyhow!("piece size {ps} is over 16 MiB"))?;
    metainfo::check_piece_length(ps)?;
    check_regular_file(file, "describe")?;
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
    let out_path = output.unwrap_or_else(|| PathBuf::from(format!("{}.json", meta.name)));
    meta.save(&out_path)?;
    if json {
        return out::json(&serde_json::json!({
            "descriptor": out_path, "info_hash": meta.info_hash_hex(), "name": meta.name,
            "length": meta.length, "piece_length": meta.piece_length, "pieces": meta.piece_count(),
        }));
    }
    out::line(&format!("wrote {}", out_path.display()))?;
    out::line(&format!("info hash: {}", meta.info_hash_hex()))?;
    Ok(())
}

pub fn show(path: &Path, json: bool) -> anyhow::Result<()> {
    let m = load_descriptor(path)?;
    if json {
        let mut v = serde_json::json!({
            "name": m.name, "length": m.length, "piece_length": m.piece_length,
            "pieces": m.piece_count(), "trackers": m.trackers, "created_at": m.created_at,
            "file_sha256": hex::encode(m.file_sha256), "info_hash": m.info_hash_hex(),
        });
        crate::cli_tree::show_files_json(&m, &mut v);
        return out::json(&v);
    }
    let trackers = if m.trackers.is_empty() {
        "(none)".into()
    } else {
        m.trackers.join(", ")
    };
    out::print(&format!(
        "name: {}\nlength: {} ({})\npiece length: {} ({})\npieces: {}\ntrackers: {}\ncreated at: {}\nfile sha256: {}\ninfo hash: {}\n",
        m.name,
        m.length,
        fmt_bytes(m.length),
        m.piece_length,
        fmt_bytes(u64::from(m.piece_length)),
        m.piece_count(),
        trackers,
        m.created_at,
        hex::encode(m.file_sha256),
        m.info_hash_hex()
    ))?;
    crate::cli_tree::show_files(&m);
    Ok(())
}

/// Load a descriptor; the error names the path once.
fn load_descriptor(path: &Path) -> anyhow::Result<Metainfo> {
    if !path.exists() {
        bail!("no descriptor file {}", path.display());
    }
    // The error already names the path.
    Ok(Metainfo::load(path)?)
}

pub async fn publish(dir: &Path, file: &Path, private: bool, json: bool) -> anyhow::Result<()> {
    check_regular_file(file, "publish")?;
    let req = CtlRequest::Publish {
        private,
        path: std::path::absolute(file)
            .with_context(|| format!("cannot publish {}", file.display()))?,
    };
    // Hashing a large file takes a while before the daemon answers.
    match control::call(dir, &req, Duration::from_secs(3600)).await? {
        CtlResponse::Published {
            info_hash,
            descriptor,
        } => {
            if json {
                return out::json(
                    &serde_json::json!({"info_hash": info_hash, "descriptor": descriptor}),
                );
            }
            out::line(&format!("info hash: {info_hash}"))?;
            out::line(&format!("descriptor: {}", descriptor.display()))?;
            Ok(())
        }
        other => bail!("unexpected reply {other:?}"),
    }
}

pub struct GetArgs {
    pub what: String,
    pub output: Option<PathBuf>,
    pub trackers: Vec<String>,
    pub wait: bool,
    pub timeout: Option<Duration>,
    pub json: bool,
    /// A tree: only the files these globs match.
    pub only: Vec<String>,
}

pub async fn get(dir: &Path, a: GetArgs) -> anyhow::Result<()> {
    let output = a.output.map(|o| std::path::absolute(&o)).transpose()?;
    let path = Path::new(&a.what);
    let is_hash =
        a.what.len() == 64 && a.what.bytes().all(|b| b.is_ascii_hexdigit()) && !path.exists();
    let req = if is_hash {
        CtlRequest::Add {
            descriptor: None,
            info_hash: Some(a.what.to_ascii_lowercase()),
            output,
            trackers: a.trackers,
            only: a.only,
        }
    } else {
        if !path.exists() {
            bail!(
                "{} is neither a descriptor file nor an info hash (64 hex digits)",
                a.what
            );
        }
        let m = load_descriptor(path)?;
        CtlRequest::Add {
            descriptor: Some(String::from_utf8(m.to_json())?),
            info_hash: None,
            output,
            trackers: a.trackers,
            only: a.only,
        }
    };
    let CtlResponse::Added { info_hash } =
        control::call(dir, &req, Duration::from_secs(60)).await?
    else {
        bail!("unexpected reply to ADD");
    };
    if !a.wait {
        if a.json {
            return out::json(&serde_json::json!({ "info_hash": info_hash }));
        }
        out::line(&format!("info hash: {info_hash}"))?;
        return Ok(());
    }
    if !a.json {
        out::line(&format!("info hash: {info_hash}"))?;
    }
    let t = wait_done(dir, &info_hash, a.timeout, a.json).await?;
    if a.json {
        return out::json(&serde_json::json!({
            "info_hash": info_hash, "state": t.state, "data_path": t.data_path,
        }));
    }
    out::line(&format!("complete and verified: {}", t.data_path))?;
    Ok(())
}

/// Who was asked for a torrent whose descriptor has not come yet: the trackers and their
/// health, and the daemon's note on the peers it tried.
pub fn describe_wait(t: &TorrentStatus, r: &StatusReport, waited: Duration) -> String {
    let short = &t.info_hash[..SHORT_HASH.min(t.info_hash.len())];
    let trackers = if r.trackers.is_empty() {
        "no tracker is configured (add --tracker HOST:PORT)".to_string()
    } else {
        let list: Vec<String> = r
            .trackers
            .iter()
            .map(|tr| {
                if tr.reachable {
                    format!("{} (answered)", tr.addr)
                } else {
                    format!(
                        "{} (unreachable{})",
                        tr.addr,
                        tr.last_error
                            .as_ref()
                            .map_or(String::new(), |e| format!(": {e}"))
                    )
                }
            })
            .collect();
        format!("trackers asked: {}", list.join(", "))
    };
    format!(
        "{short}: no peer has sent the descriptor after {}; {trackers}; {}. \
         The daemon keeps trying until `shoal remove {short}`.",
        humantime::format_duration(Duration::from_secs(waited.as_secs())),
        t.note.as_deref().unwrap_or("no peer has been found yet")
    )
}

async fn wait_done(
    dir: &Path,
    info_hash: &str,
    timeout: Option<Duration>,
    quiet: bool,
) -> anyhow::Result<TorrentStatus> {
    let started = Instant::now();
    let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b
    });
    let mut last_line = Instant::now();
    let mut last_seen: Option<(TorrentStatus, StatusReport)> = None;
    loop {
        let CtlResponse::Status(report) =
            control::call(dir, &CtlRequest::Status, Duration::from_secs(10)).await?
        else {
            bail!("unexpected reply to STATUS");
        };
        if let Some(t) = report.torrents.iter().find(|t| t.info_hash == info_hash) {
            let fetching = t.state == "FETCHING METADATA";
            let done = (u64::from(t.have) * u64::from(t.piece_length)).min(t.length);
            if let (Some(b), false) = (&bar, fetching) {
                b.set_length(t.length);
                b.set_position(done);
                b.set_message(t.name.clone());
            } else if !quiet && last_line.elapsed() > Duration::from_secs(5) {
                let msg = if fetching {
                    describe_wait(t, &report, started.elapsed())
                } else {
                    format!("{}: {:.1}% ({})", t.name, t.progress * 100.0, t.state)
                };
                match &bar {
                    Some(b) => b.println(msg),
                    None => eprintln!("{msg}"),
                }
                last_line = Instant::now();
            }
            match t.state.as_str() {
                "SEEDING" => {
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                    return Ok(t.clone());
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
            last_seen = Some((t.clone(), report.clone()));
        }
        if let Some(limit) = timeout {
            if started.elapsed() > limit {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                let why = match &last_seen {
                    Some((t, r)) if t.state == "FETCHING METADATA" => {
                        describe_wait(t, r, started.elapsed())
                    }
                    Some((t, _)) => format!(
                        "{} is at {:.1}% ({}); the daemon goes on downloading (see `shoal status`, stop it with `shoal remove {}`)",
                        t.name,
                        t.progress * 100.0,
                        t.state,
                        &t.info_hash[..SHORT_HASH.min(t.info_hash.len())]
                    ),
                    None => "the torrent is not in the daemon's status".into(),
                };
                return Err(TimedOut(format!(
                    "stopped waiting after {}: {why}",
                    humantime::format_duration(limit)
                ))
                .into());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
