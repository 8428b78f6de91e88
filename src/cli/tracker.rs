//! Tracker commands: `tracker run`, `tracker monitor`, `list`.

use std::io::IsTerminal;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{out, render};
use crate::units::fmt_bytes;

pub async fn run(tc: shoal_tracker::TrackerConfig) -> anyhow::Result<()> {
    // Refuse a bad HTTP setting before anything starts.
    let http = if tc.http.is_empty() {
        None
    } else {
        let token = Some(tc.http_token.as_str()).filter(|t| !t.is_empty());
        Some(shoal_tracker::http::bind(&tc.http, token).await?)
    };
    let db = tc.db.clone();
    let token_cfg = tc.http_token.clone();
    let tracker = shoal_tracker::Tracker::bind(tc).await?;
    let addr = tracker.local_addr()?;
    let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
    // Tests and scripts read this line for the bound ports.
    out::line(&format!(
        "tracker listening on {addr}{}",
        http_addr.map_or(String::new(), |a| format!(" http on http://{a}/"))
    ))?;
    let token = CancellationToken::new();
    if let (Some(listener), Some(http_addr)) = (http, http_addr) {
        let app = shoal_tracker::http::tracker_app(addr, db, Some(token_cfg));
        let t2 = token.clone();
        tokio::spawn(async move {
            if let Err(e) = shoal_tracker::http::serve(listener, app, t2).await {
                error!(cause = %format!("{e:#}"), "HTTP server stopped");
            }
        });
        info!(%http_addr, "tracker HTTP serving");
    }
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

pub async fn list(trackers: &[String], json: bool) -> anyhow::Result<()> {
    let files = shoal_tracker::client::files_from_first(trackers, Duration::from_secs(3)).await?;
    if json {
        return out::json(&files);
    }
    let mut s = format!(
        "{:<30} {:>12} {:>8} {:>8}  INFO HASH\n",
        "NAME", "SIZE", "SEEDERS", "LEECHERS"
    );
    for f in files {
        s.push_str(&format!(
            "{:<30} {:>12} {:>8} {:>8}  {}\n",
            f.name,
            fmt_bytes(f.length),
            f.seeders,
            f.leechers,
            f.info_hash
        ));
    }
    out::print(&s)?;
    Ok(())
}

pub async fn monitor(
    tracker: &str,
    once: bool,
    interval: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal() && !once && !json;
    loop {
        let peers =
            shoal_tracker::client::swarm_from_first(&[tracker.to_string()], Duration::from_secs(3))
                .await?;
        if json {
            out::line(&serde_json::to_string(&peers)?)?;
        } else {
            let table = render::monitor_table(&peers);
            if tty {
                // Clear and redraw in place.
                out::print(&format!("\x1b[2J\x1b[H{tracker} — live swarm\n\n{table}"))?;
            } else {
                out::print(&table)?;
            }
        }
        if once {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}
