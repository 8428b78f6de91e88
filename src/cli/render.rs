//! The text views: the status screen, the tracker's live-swarm table, query rows.

use std::time::Duration;

use crate::control::StatusReport;
use crate::units::{fmt_bytes, fmt_rate};

/// Width of the state column: the longest state, "FETCHING METADATA".
const STATE_WIDTH: usize = 17;
/// Digits of the info hash shown; every command takes this as a prefix.
pub const SHORT_HASH: usize = 16;

/// The human status view: per torrent a progress bar line, then the load-balancing table.
pub fn status(r: &StatusReport) -> String {
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
            "\n{} ({})  {}\n[{}{}] {:5.1}%  {:<STATE_WIDTH$}  down {}  up {}  eta {}\n",
            t.name,
            fmt_bytes(t.length),
            &t.info_hash[..SHORT_HASH.min(t.info_hash.len())],
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
        if t.private {
            s.push_str(&format!(
                "  private swarm, roster version {}\n",
                t.roster_version
            ));
        }
        if !t.peers.is_empty() {
            // RTT (PING/PONG) and throughput are separate measures, so separate columns.
            s.push_str(&format!(
                "  {:<17} {:<22} {:>9} {:>11} {:>7} {:>7} {:>7} {}\n",
                "PEER KEY", "ADDRESS", "RTT", "RATE", "SCORE", "FROM", "TO", "STATE"
            ));
            for p in &t.peers {
                let mut st = if p.banned_until.is_some() {
                    "banned"
                } else if p.connected {
                    "connected"
                } else {
                    "-"
                }
                .to_string();
                match p.member {
                    Some(true) => st.push_str(", member"),
                    Some(false) => st.push_str(", NOT A MEMBER"),
                    None => {}
                }
                s.push_str(&format!(
                    "  {:<17} {:<22} {:>7.1}ms {:>11} {:>7.2} {:>7} {:>7} {}\n",
                    crate::secure::fingerprint(&p.peer_id),
                    format!("{}:{}", p.addr, p.port),
                    p.rtt_ms,
                    fmt_rate(p.throughput),
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
            "tracker {}: {}{}{}\n",
            tr.addr,
            if tr.reachable { "ok" } else { "unreachable" },
            if tr.reachable && tr.datagrams {
                ", heartbeats by UDP"
            } else {
                ""
            },
            tr.last_error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        ));
    }
    s
}

/// The tracker's live swarm, the seed's figure 7: file, peer, %, role.
pub fn monitor_table(peers: &[shoal_tracker::proto::SwarmEntry]) -> String {
    let mut s = format!(
        "{:<24} {:<22} {:<16} {:>7}  {}\n",
        "FILE", "PEER", "KEY", "%", "ROLE"
    );
    for p in peers {
        let pct = if p.total == 0 {
            0.0
        } else {
            100.0 * p.have as f64 / p.total as f64
        };
        // The key's fingerprint; a legacy tracker sends none, then the id's start.
        let key = if p.fingerprint.is_empty() {
            shoal_tracker::keys::fingerprint(&p.peer_id)
        } else {
            p.fingerprint.clone()
        };
        s.push_str(&format!(
            "{:<24} {:<22} {:<16} {:>6.1}%  {}\n",
            p.name,
            format!("{}:{}", p.addr, p.port),
            key,
            pct,
            p.role.as_str()
        ));
    }
    if peers.is_empty() {
        s.push_str("(no live peers)\n");
    }
    s
}

/// Query rows as tab-separated text with a header line.
pub fn rows(columns: &[String], rows: &[Vec<serde_json::Value>]) -> String {
    let mut s = columns.join("\t");
    s.push('\n');
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        s.push_str(&cells.join("\t"));
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::TorrentStatus;

    #[test]
    fn it_should_align_every_state_including_fetching_metadata() {
        let mk = |state: &str| TorrentStatus {
            info_hash: "ab".repeat(32),
            name: "f".into(),
            state: state.into(),
            ..Default::default()
        };
        let r = StatusReport {
            torrents: vec![mk("FETCHING METADATA"), mk("SEEDING")],
            ..Default::default()
        };
        let text = status(&r);
        let cols: Vec<usize> = text
            .lines()
            .filter(|l| l.starts_with('['))
            .map(|l| l.find("down").unwrap())
            .collect();
        assert_eq!(cols.len(), 2);
        assert_eq!(cols[0], cols[1], "{text}");
    }
}
