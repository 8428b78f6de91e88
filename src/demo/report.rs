//! The report: who fed whom, rejected pieces, bans, failovers, resume, and the checks that
//! decide the exit code.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use super::emu::{fmt_rate, Link, PathCheck};
use super::supervisor::{Demo, Role};
use super::FLUSH_INTERVAL;
use crate::units::fmt_bytes;

/// What the scheduler saw while playing, for the report.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    /// Seconds from the demo's start to every peer complete.
    pub(crate) elapsed: f64,
    pub(crate) saboteur: Option<usize>,
    pub(crate) restarted: Option<usize>,
    pub(crate) killed_tracker_at: Option<f64>,
    pub(crate) tracker_down_seen: usize,
    pub(crate) primary_back: Option<usize>,
    /// Each killed peer (by node index), just before its last kill while running.
    pub(crate) kills: BTreeMap<usize, KillSnapshot>,
    /// The emulated paths, measured before the swarm started.
    pub(crate) paths: Vec<PathCheck>,
    /// The per-peer application upload cap on loopback (bytes/s; 0 = none).
    pub(crate) upload_cap: u64,
}

/// A killed peer: its own verified count just before the kill, and what every honest peer had
/// sent it by its restart (so whatever comes later went to the new process).
#[derive(Debug, Clone)]
pub(crate) struct KillSnapshot {
    pub(crate) peer_id: String,
    pub(crate) have_bytes: u64,
    /// What it verified in the [`RECENT`] window before the kill.
    pub(crate) recent_bytes: u64,
    /// What its store gave back: its verified bytes as first seen after the restart.
    pub(crate) have_at_restart: Option<u64>,
    pub(crate) sent_to_it: u64,
}

/// The window of pieces a kill may lose: one flush interval, plus one for the flush that was
/// under way (its fsync).
pub(crate) const RECENT: std::time::Duration = FLUSH_INTERVAL.saturating_mul(2);

/// The resume invariant: after a kill, a peer receives at most what it lacked at the kill
/// plus what it may have verified but not yet made durable (what it verified in the
/// [`RECENT`] window), plus one piece (its count is read a moment before the kill).
pub(crate) fn resume_allowance(lacked: u64, recent: u64, piece: u32) -> u64 {
    lacked + recent + u64::from(piece)
}

/// The demo's resume check: what the peer received after its kill is within the allowance.
pub(crate) fn resume_within_bound(
    received_after: u64,
    lacked: u64,
    recent: u64,
    piece: u32,
) -> bool {
    received_after <= resume_allowance(lacked, recent, piece)
}

/// Kumar & Ross (2006): the least time to give N leechers a file of `size` bytes, from a
/// seeder uploading `u_s` and leechers downloading `d` and uploading `u` (bytes/s; 0 = not
/// limited). None when nothing is limited.
pub(crate) fn t_min(size: u64, u_s: f64, downs: &[f64], ups: &[f64]) -> Option<f64> {
    let inf = |x: f64| if x > 0.0 { x } else { f64::INFINITY };
    let f = size as f64;
    let d_min = downs.iter().copied().map(inf).fold(f64::INFINITY, f64::min);
    let total_up = inf(u_s) + ups.iter().copied().map(inf).sum::<f64>();
    let t = (f / inf(u_s))
        .max(f / d_min)
        .max(downs.len() as f64 * f / total_up);
    (t > 0.0 && t.is_finite()).then_some(t)
}

/// One emulated host in the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HostReport {
    name: String,
    ip: String,
    link: Link,
    frames_up: u64,
    frames_down: u64,
    lost: u64,
    /// Frames dropped because a delay line held its maximum.
    overflow: u64,
    /// Frames a delay line released more than 1 ms late, and the latest (ms): delay the
    /// scenario did not ask for, added by a busy machine.
    late: u64,
    late_max_ms: f64,
    /// Packets the host's rate limiters dropped, upload and download: their queue (about
    /// 100 ms of the rate) was full. Senders see them as loss (null: `tc` did not tell).
    queue_drops_up: Option<u64>,
    queue_drops_down: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub(crate) ok: bool,
    seconds_to_full_distribution: f64,
    /// From giving the leechers the download to the last one complete.
    distribution_secs: Option<f64>,
    /// The scenario's theoretical minimum (Kumar & Ross) and our time over it.
    t_min_secs: Option<f64>,
    t_min_ratio: Option<f64>,
    /// Per downloader: seconds from the start of the downloads to complete (polled every 0.2 s).
    finish_secs: BTreeMap<String, f64>,
    /// From the seeder's own counters.
    seeder_uploaded: u64,
    seeder_copies: f64,
    /// "namespaces" or "loopback".
    network: String,
    hosts: Vec<HostReport>,
    paths: Vec<PathCheck>,
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
    /// Received after its kill, what it lacked at the kill, and what the invariant allows.
    /// Bytes sent to it after its kill (the others' counters, endgame duplicates included).
    restarted_peer_received_after_kill: Option<u64>,
    restarted_peer_lacked_at_kill: Option<u64>,
    /// What it had to verify again: the file less what its store gave back at the restart.
    restarted_peer_verified_after_kill: Option<u64>,
    restarted_peer_allowed: Option<u64>,
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

pub(crate) fn build_report(demo: &Demo, size: u64, piece: u32, o: &Observed) -> Report {
    let saboteur = o.saboteur;
    let mut r = Report {
        seconds_to_full_distribution: o.elapsed,
        size,
        piece_size: piece,
        timeline: demo.timeline.clone(),
        tracker_failovers: o.tracker_down_seen,
        primary_tracker_swarm_after_restart: o.primary_back,
        paths: o.paths.clone(),
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
    efficiency(demo, size, o, &mut r);
    let want = sha256_file(&demo.file);
    for n in demo.downloaders() {
        let ok = want.is_some() && sha256_file(&n.out_dir.join("demo.bin")) == want;
        r.verified.insert(n.name.clone(), ok);
    }
    if let Some(i) = o.restarted {
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
        if let Some(k) = o.kills.get(&i) {
            // Counters of a new peer id (a fresh identity) all come after the kill.
            let after = if &k.peer_id == id {
                got.saturating_sub(k.sent_to_it)
            } else {
                got
            };
            let lacked = size.saturating_sub(k.have_bytes);
            r.restarted_peer_received_after_kill = Some(after);
            r.restarted_peer_lacked_at_kill = Some(lacked);
            r.restarted_peer_verified_after_kill =
                k.have_at_restart.map(|h| size.saturating_sub(h));
            r.restarted_peer_allowed = Some(resume_allowance(lacked, k.recent_bytes, piece));
        }
    }
    let mut checks = vec![(
        "every peer's file matches the SHA-256 of the original".to_string(),
        !r.verified.is_empty() && r.verified.values().all(|&v| v),
    )];
    if o.saboteur.is_some() {
        checks.push(("the saboteur was banned".into(), !r.bans.is_empty()));
    }
    if o.killed_tracker_at.is_some() {
        checks.push((
            "peers saw the primary tracker down and finished through the other".into(),
            o.tracker_down_seen > 0 && r.verified.values().all(|&v| v),
        ));
    }
    if let (Some(lacked), Some(k)) = (
        r.restarted_peer_lacked_at_kill,
        o.restarted.and_then(|i| o.kills.get(&i)),
    ) {
        // No count from the restarted process: nothing shows it resumed, so the check fails.
        let got = r.restarted_peer_verified_after_kill.unwrap_or(u64::MAX);
        checks.push((
            "the restarted peer re-fetched at most what it lacked at the kill + one flush interval's worth".into(),
            resume_within_bound(got, lacked, k.recent_bytes, piece),
        ));
    }
    if let Some(n) = o.primary_back {
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
    s.push_str(&render_network(r));
    s.push_str(&render_efficiency(r));
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
            "restarted peer: received {} for a {} file (beyond one copy: {})\n",
            fmt_bytes(got),
            fmt_bytes(r.size),
            fmt_bytes(extra)
        ));
    }
    if let (Some(after), Some(lacked), Some(allowed)) = (
        r.restarted_peer_received_after_kill,
        r.restarted_peer_lacked_at_kill,
        r.restarted_peer_allowed,
    ) {
        s.push_str(&format!(
            "  it lacked {} at the kill; it had to fetch {} again after it (allowed with one \
             flush interval's worth: {}); {} were sent to it, duplicates included\n",
            fmt_bytes(lacked),
            r.restarted_peer_verified_after_kill
                .map_or_else(|| "an unknown amount".to_string(), fmt_bytes),
            fmt_bytes(allowed),
            fmt_bytes(after),
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

/// T_min, finish times, the seeder's upload in copies, and the emulated hosts.
fn efficiency(demo: &Demo, size: u64, o: &Observed, r: &mut Report) {
    for n in demo.downloaders() {
        if let Some(t) = n.finished_at {
            r.finish_secs.insert(n.name.clone(), t);
        }
    }
    r.distribution_secs = r.finish_secs.values().copied().reduce(f64::max);
    if let Some(s) = demo.nodes.iter().find(|n| n.role == Role::Seeder) {
        r.seeder_uploaded = s.last.as_ref().map_or(0, |t| t.uploaded);
        r.seeder_copies = r.seeder_uploaded as f64 / size.max(1) as f64;
    }
    let leechers: Vec<&str> = demo
        .nodes
        .iter()
        .filter(|n| n.role == Role::Leecher)
        .map(|n| n.name.as_str())
        .collect();
    let bps = |b: u64| b as f64 / 8.0;
    r.t_min_secs = match &demo.emu {
        Some(emu) => {
            let link = |n: &str| emu.host(n).map(|h| h.link);
            let ls: Vec<Link> = leechers.iter().filter_map(|n| link(n)).collect();
            link("seeder").and_then(|s| {
                t_min(
                    size,
                    bps(s.up_bps),
                    &ls.iter().map(|l| bps(l.down_bps)).collect::<Vec<_>>(),
                    &ls.iter().map(|l| bps(l.up_bps)).collect::<Vec<_>>(),
                )
            })
        }
        None => {
            let cap = o.upload_cap as f64;
            t_min(
                size,
                cap,
                &vec![0.0; leechers.len()],
                &vec![cap; leechers.len()],
            )
        }
    };
    r.t_min_ratio = r.t_min_secs.zip(r.distribution_secs).map(|(m, t)| t / m);
    r.network = if demo.emu.is_some() {
        "namespaces"
    } else {
        "loopback"
    }
    .into();
    if let Some(emu) = &demo.emu {
        use std::sync::atomic::Ordering::Relaxed;
        let drops = emu.queue_drops();
        r.hosts = emu
            .hosts
            .iter()
            .zip(drops)
            .map(|(h, (drops_up, drops_down))| HostReport {
                name: h.name.clone(),
                ip: h.ip.clone(),
                link: h.link,
                frames_up: h.up_stats.frames.load(Relaxed),
                frames_down: h.down_stats.frames.load(Relaxed),
                lost: h.up_stats.lost.load(Relaxed) + h.down_stats.lost.load(Relaxed),
                overflow: h.up_stats.overflow.load(Relaxed) + h.down_stats.overflow.load(Relaxed),
                late: h.up_stats.late.load(Relaxed) + h.down_stats.late.load(Relaxed),
                late_max_ms: h
                    .up_stats
                    .late_max_us
                    .load(Relaxed)
                    .max(h.down_stats.late_max_us.load(Relaxed))
                    as f64
                    / 1e3,
                queue_drops_up: drops_up,
                queue_drops_down: drops_down,
            })
            .collect();
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "?".into(), |n| n.to_string())
}

fn render_network(r: &Report) -> String {
    let mut s = String::new();
    if r.hosts.is_empty() {
        s.push_str("\nnetwork: loopback aliases (no emulated links)\n");
        return s;
    }
    s.push_str(
        "\nnetwork: one namespace per host; rates by tc tbf, delay and loss by delay lines\n",
    );
    s.push_str(&format!(
        "  {:<10} {:<13} {:>14} {:>14} {:>9} {:>6} {:>9} {:>8} {:>9} {:>9} {:>15}\n",
        "host",
        "address",
        "up",
        "down",
        "delay",
        "loss",
        "lost",
        "overflow",
        "late>1ms",
        "max late",
        "queue drops u/d"
    ));
    for h in &r.hosts {
        s.push_str(&format!(
            "  {:<10} {:<13} {:>14} {:>14} {:>7.0}ms {:>5.1}% {:>9} {:>8} {:>9} {:>7.1}ms {:>15}\n",
            h.name,
            h.ip,
            fmt_rate(h.link.up_bps),
            fmt_rate(h.link.down_bps),
            h.link.delay.as_secs_f64() * 1e3,
            h.link.loss * 100.0,
            h.lost,
            h.overflow,
            h.late,
            h.late_max_ms,
            format!("{}/{}", opt(h.queue_drops_up), opt(h.queue_drops_down))
        ));
    }
    if !r.paths.is_empty() {
        s.push_str("  measured before the swarm started (RTT = TCP connect time, least of several; first = the first connect; loss = 1000 datagrams):\n");
        for p in &r.paths {
            s.push_str(&format!(
                "    {} -> {:<10} RTT {:>6.1} ms (scenario {:>5.0} ms, {:+.1}%), first {:>6.1} ms, loss {:.1}% (scenario {:.1}%)\n",
                p.from,
                p.to,
                p.measured_rtt_ms,
                p.expected_rtt_ms,
                (p.measured_rtt_ms / p.expected_rtt_ms.max(1e-9) - 1.0) * 100.0,
                p.first_connect_ms,
                p.measured_loss * 100.0,
                p.expected_loss * 100.0
            ));
        }
    }
    s
}

fn render_efficiency(r: &Report) -> String {
    let mut s = String::new();
    if let Some(d) = r.distribution_secs {
        s.push_str(&format!(
            "\ndistribution (from the leechers' start to the last complete): {d:.1} s"
        ));
        match (r.t_min_secs, r.t_min_ratio) {
            (Some(m), Some(x)) => {
                s.push_str(&format!("; T_min (Kumar & Ross) {m:.1} s; ratio {x:.2}x\n"))
            }
            _ => s.push_str("; T_min: none (no link is limited)\n"),
        }
    }
    s.push_str(&format!(
        "seeder uploaded {} = {:.2} copies of the file (its own counters)\n",
        fmt_bytes(r.seeder_uploaded),
        r.seeder_copies
    ));
    if !r.finish_secs.is_empty() {
        s.push_str("finish times:");
        for (n, t) in &r.finish_secs {
            s.push_str(&format!(" {n} {t:.1}s"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_compute_t_min_as_kumar_and_ross() {
        let f = 128u64 << 20;
        let mbit = 1e6 / 8.0;
        // Homogeneous: 1 + 8 at 100 Mbit/s: the seeder's upload bounds it.
        let t = t_min(f, 100.0 * mbit, &[100.0 * mbit; 8], &[100.0 * mbit; 8]).unwrap();
        assert!((t - 10.737).abs() < 0.01, "{t}");
        // Thin leecher uplinks: the swarm's total upload bounds it.
        let ups = [10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 112.0, 200.0].map(|x| x * mbit);
        let t = t_min(f, 100.0 * mbit, &[100.0 * mbit; 8], &ups).unwrap();
        assert!((t - 11.897).abs() < 0.01, "{t}");
        assert_eq!(t_min(f, 0.0, &[0.0; 3], &[0.0; 3]), None);
    }

    #[test]
    fn it_should_fail_the_resume_check_above_the_bound() {
        let piece = 1u32 << 20;
        // Killed at half of 64 MiB, having verified 4 MiB in the last second: +4 MiB, +1 piece.
        let (lacked, recent) = (32u64 << 20, 4u64 << 20);
        let allowed = resume_allowance(lacked, recent, piece);
        assert_eq!(allowed, lacked + (5 << 20));
        let check = |received: u64| resume_within_bound(received, lacked, recent, piece);
        assert!(check(lacked));
        assert!(check(allowed));
        assert!(!check(allowed + 1));
        // The old check (less than the file) passed a re-fetch of 1.5x what was lacking.
        assert!(lacked * 3 / 2 < 64 << 20 && !check(lacked * 3 / 2));
    }
}
