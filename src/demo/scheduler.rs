//! The scheduler: plays the scenario's steps against the swarm while polling every peer, until
//! every downloader has the whole file, then builds the report.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::report::{build_report, render_report};
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
) -> anyhow::Result<()> {
    {
        let file = demo.file.clone();
        tokio::task::spawn_blocking(move || write_random(&file, size)).await??;
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
        demo.get(i, false).await?;
    }

    demo.log(format!(
        "{} leechers started; the swarm forms (the seed's experiments 1-2)",
        leechers.len()
    ));
    let mut fired = vec![false; sc.steps.len()];
    let mut saboteur: Option<usize> = None;
    let mut restarted: Option<usize> = None;
    let mut killed_tracker_at: Option<f64> = None;
    let mut tracker_down_seen = 0usize;
    let mut primary_back: Option<usize> = None;
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
                    saboteur = Some(i);
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
                    killed_tracker_at = Some(progress);
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
                    demo.kill_node(i);
                    let name = demo.nodes[i].name.clone();
                    demo.log(format!("{pct:.0}%: {name} killed with SIGKILL"));
                    if step.action == Action::RestartPeer {
                        demo.start_node(i)?;
                        demo.nodes[i].restarts += 1;
                        restarted = Some(i);
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
        if killed_tracker_at.is_some() && demo.trackers[0].child.is_none() {
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
            tracker_down_seen = tracker_down_seen.max(seen);
        }
        if demo.trackers[0].child.is_some() && killed_tracker_at.is_some() {
            if let Some(n) = demo.swarm_of(0).await {
                primary_back = Some(primary_back.map_or(n, |m: usize| m.max(n)));
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
    let elapsed = demo.now();
    demo.log("every peer has the whole file".into());
    // Let the restored primary hear a heartbeat from everyone.
    if killed_tracker_at.is_some() && demo.trackers[0].child.is_some() {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        if let Some(n) = demo.swarm_of(0).await {
            primary_back = Some(primary_back.map_or(n, |m| m.max(n)));
        }
    }
    demo.refresh().await;
    let report = build_report(
        demo,
        size,
        piece,
        elapsed,
        saboteur,
        restarted,
        killed_tracker_at,
        tracker_down_seen,
        primary_back,
    );
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
