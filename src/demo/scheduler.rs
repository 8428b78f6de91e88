//! The scheduler: plays the scenario's steps against the swarm while polling every peer, until
//! every downloader has the whole file, then builds the report.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::emu::{self, Emulator, Link};
use super::report::{build_report, render_report, KillSnapshot, Observed, RECENT};
use super::scenario::{Action, Scenario};
use super::supervisor::{Demo, Role};
use super::DemoArgs;
use crate::units::fmt_bytes;

pub(crate) async fn play(
    demo: &mut Demo,
    sc: &Scenario,
    size: u64,
    piece: u32,
    args: &DemoArgs,
    links: Option<Vec<(String, Link)>>,
) -> anyhow::Result<()> {
    let mut o = Observed {
        upload_cap: crate::units::parse_size(&sc.upload_rate).unwrap_or(0),
        ..Default::default()
    };
    {
        let file = demo.file.clone();
        tokio::task::spawn_blocking(move || write_random(&file, size)).await??;
    }
    if let Some(links) = links {
        let mtu = sc.mtu;
        let (emu, paths) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let swept = emu::sweep_stale();
            if !swept.is_empty() {
                println!(
                    "removed {} namespaces of earlier runs that were killed",
                    swept.len()
                );
            }
            let emu = Emulator::start(&links, mtu)?;
            // From the seeder to every other host, before any traffic.
            let seeder = emu
                .hosts
                .iter()
                .position(|h| h.name == "seeder")
                .unwrap_or(0);
            let others: Vec<usize> = (0..emu.hosts.len()).filter(|&i| i != seeder).collect();
            let paths = emu::measure(&emu, seeder, &others);
            Ok((emu, paths))
        })
        .await??;
        demo.log(format!(
            "emulated network up: {} hosts in namespaces {}-*",
            emu.hosts.len(),
            emu.prefix
        ));
        for t in demo.trackers.iter_mut() {
            if let Some(h) = emu.host(&t.name) {
                t.listen = format!("{}:0", h.ip);
                t.ns = Some(h.ns.clone());
            }
        }
        demo.emu = Some(emu);
        o.paths = paths?;
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
    }
    // Every leecher is given the download at once: the start of the distribution.
    demo.t0 = Some(demo.now());
    demo.t0_unix_ms = Some(crate::fsutil::unix_ms());
    futures_util::future::try_join_all(leechers.iter().map(|&i| demo.get(i, false))).await?;

    demo.log(format!(
        "{} leechers started; the swarm forms (the seed's experiments 1-2)",
        leechers.len()
    ));
    let mut fired = vec![false; sc.steps.len()];
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
                    o.saboteur = Some(i);
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
                    o.killed_tracker_at = Some(progress);
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
                    if let Some(k) = snapshot(demo, i).await {
                        o.kills.insert(i, k);
                    }
                    demo.kill_node(i);
                    let name = demo.nodes[i].name.clone();
                    demo.log(format!("{pct:.0}%: {name} killed with SIGKILL"));
                    if step.action == Action::RestartPeer {
                        // What was sent before this point went to the dead process.
                        if let Some(k) = o.kills.get_mut(&i) {
                            k.sent_to_it = sent_to(demo, i, &k.peer_id).await;
                        }
                        demo.start_node(i)?;
                        let back = restored(demo, i).await;
                        if let Some(k) = o.kills.get_mut(&i) {
                            k.have_at_restart = back;
                        }
                        demo.nodes[i].restarts += 1;
                        o.restarted = Some(i);
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
        if o.killed_tracker_at.is_some() && demo.trackers[0].child.is_none() {
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
            o.tracker_down_seen = o.tracker_down_seen.max(seen);
        }
        if demo.trackers[0].child.is_some() && o.killed_tracker_at.is_some() {
            if let Some(n) = demo.swarm_of(0).await {
                o.primary_back = Some(o.primary_back.map_or(n, |m: usize| m.max(n)));
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
    o.elapsed = demo.now();
    demo.log("every peer has the whole file".into());
    // Let the restored primary hear a heartbeat from everyone.
    if o.killed_tracker_at.is_some() && demo.trackers[0].child.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(n) = demo.swarm_of(0).await {
            o.primary_back = Some(o.primary_back.map_or(n, |m| m.max(n)));
        }
    }
    demo.refresh().await;
    let report = build_report(demo, size, piece, &o);
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

/// Peer `i` just before a kill: its own verified count. None when it is not running (killed
/// already).
async fn snapshot(demo: &Demo, i: usize) -> Option<KillSnapshot> {
    demo.nodes[i].child.as_ref()?;
    let own = demo.torrent(i).await?;
    let piece = u64::from(own.piece_length);
    let have_bytes = if own.have >= own.pieces {
        own.length
    } else {
        (u64::from(own.have) * piece).min(own.length)
    };
    // Its count at the start of the window, from the demo's polls (0 if it is younger).
    let since = demo.now() - RECENT.as_secs_f64();
    let then = demo.nodes[i]
        .have_log
        .iter()
        .rev()
        .find(|(t, _)| *t <= since)
        .map_or(0, |&(_, h)| h);
    Some(KillSnapshot {
        peer_id: demo.nodes[i].peer_id.clone(),
        have_bytes,
        recent_bytes: u64::from(own.have.saturating_sub(then)) * piece,
        sent_to_it: 0,
        have_at_restart: None,
    })
}

/// What the honest peers have sent to `peer_id` (killed), once they noticed it is gone (at
/// most 3 s): their counters include what they queued for the dead process, which it never
/// received.
async fn sent_to(demo: &Demo, i: usize, peer_id: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut sent = 0;
        let mut connected = false;
        for j in (0..demo.nodes.len()).filter(|&j| j != i && demo.nodes[j].role != Role::Saboteur) {
            if let Some(t) = demo.torrent(j).await {
                for p in t.peers.iter().filter(|p| p.peer_id == peer_id) {
                    sent += p.bytes_to;
                    connected |= p.connected;
                }
            }
        }
        if !connected || Instant::now() > deadline {
            return sent;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The verified bytes of restarted peer `i` as first reported (at most 5 s of asking): what
/// its store gave back. Read at once, so it can only include a few pieces fetched since,
/// which makes the resume check more lenient, never stricter.
async fn restored(demo: &Demo, i: usize) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(t) = demo.torrent(i).await {
            let piece = u64::from(t.piece_length);
            return Some(if t.have >= t.pieces {
                t.length
            } else {
                (u64::from(t.have) * piece).min(t.length)
            });
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
