//! The report: who fed whom, rejected pieces, bans, failovers, resume, and the checks that
//! decide the exit code.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::supervisor::{Demo, Role};
use crate::units::fmt_bytes;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) ok: bool,
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn build_report(
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

pub(crate) fn render_report(demo: &Demo, r: &Report) -> String {
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
