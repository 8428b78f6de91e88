//! Emulated links: each host in its own network namespace, joined by a bridge in a switch
//! namespace, addresses from 198.18.0.0/15 (the benchmarking range) and no route out.
//!
//! A host's link is a pair of TAP devices, `eth0` in the host and `p<i>` on the bridge, with
//! this process copying frames between them through two [`delayline`]s (one-way delay and
//! loss; the kernel here has no netem). The rates are the kernel's: tc tbf on `eth0` (upload)
//! and on `p<i>` (download). A packet from host a to host b thus crosses a's upload, a's delay,
//! the bridge, b's download and b's delay: RTT = 2 x (delay a + delay b).
//!
//! Everything is named with a per-run prefix (`shoaldemo-<pid>-`) and removed by name when the
//! [`Emulator`] is dropped; runs whose process is gone are swept at start.

mod delayline;
mod measure;
mod sys;

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

pub(crate) use delayline::LineStats;
pub(crate) use measure::{measure, PathCheck};

/// Namespace names start with this, then the owner's pid.
const PREFIX: &str = "shoaldemo-";

/// One host's access link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Link {
    /// Bits per second; 0 = not limited.
    pub(crate) up_bps: u64,
    pub(crate) down_bps: u64,
    /// One way, in each direction.
    pub(crate) delay: Duration,
    /// Probability per packet, in each direction.
    pub(crate) loss: f64,
}

/// A link as the scenario writes it; missing fields come from the scenario's `[link]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LinkSpec {
    pub(crate) up: Option<String>,
    pub(crate) down: Option<String>,
    pub(crate) delay: Option<String>,
    pub(crate) loss: Option<f64>,
}

impl LinkSpec {
    /// This spec over `base`.
    pub(crate) fn over(&self, base: &LinkSpec) -> LinkSpec {
        LinkSpec {
            up: self.up.clone().or_else(|| base.up.clone()),
            down: self.down.clone().or_else(|| base.down.clone()),
            delay: self.delay.clone().or_else(|| base.delay.clone()),
            loss: self.loss.or(base.loss),
        }
    }

    pub(crate) fn resolve(&self) -> anyhow::Result<Link> {
        let rate = |s: &Option<String>| s.as_deref().map_or(Ok(0), parse_rate);
        let delay = match &self.delay {
            Some(d) => humantime::parse_duration(d).with_context(|| format!("delay {d:?}"))?,
            None => Duration::ZERO,
        };
        let loss = self.loss.unwrap_or(0.0);
        if !(0.0..1.0).contains(&loss) {
            bail!("loss {loss} is not a probability below 1");
        }
        if delay > Duration::from_secs(5) {
            bail!("delay {delay:?} is above 5s");
        }
        Ok(Link {
            up_bps: rate(&self.up)?,
            down_bps: rate(&self.down)?,
            delay,
            loss,
        })
    }
}

/// `100Mbit`, `1.5Gbit`, `512kbit`, `20Mbps` -> bits per second (decimal units, as tc's).
pub(crate) fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a rate (try 100Mbit)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "bit" | "bps" => 1e0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        other => bail!("{s:?}: unknown rate unit {other:?} (use bit, kbit, Mbit, Gbit)"),
    };
    let v = n * mult;
    if !v.is_finite() || !(0.0..=1e12).contains(&v) {
        bail!("{s:?} is out of range");
    }
    Ok(v.round() as u64)
}

/// Print a rate in bits per second.
pub(crate) fn fmt_rate(bps: u64) -> String {
    match bps {
        0 => "unlimited".into(),
        b if b >= 1_000_000_000 => format!("{:.1} Gbit/s", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.0} Mbit/s", b as f64 / 1e6),
        b => format!("{:.0} kbit/s", b as f64 / 1e3),
    }
}

/// One emulated host.
pub(crate) struct Host {
    pub(crate) name: String,
    pub(crate) ns: String,
    pub(crate) ip: String,
    pub(crate) link: Link,
    pub(crate) up_stats: Arc<LineStats>,
    pub(crate) down_stats: Arc<LineStats>,
}

/// The emulated network; dropping it removes everything it created.
pub(crate) struct Emulator {
    pub(crate) prefix: String,
    pub(crate) hosts: Vec<Host>,
    switch: String,
    created: Vec<String>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    taps: Vec<Arc<File>>,
}

/// Why the emulator cannot run here, or None when it can.
pub(crate) fn unavailable() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("network namespaces need Linux".into());
    }
    if !sys::is_root() {
        return Some("not running as root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("no `{tool}` command (iproute2)"));
        }
    }
    None
}

/// Run `ip`/`tc` with these arguments; an error carries its stderr.
fn run(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Run the `ip` commands in `batch` (one per line) in namespace `ns`.
fn run_batch(ns: &str, batch: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run ip")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(batch.as_bytes())
        .context("ip -batch")?;
    let out = child.wait_with_output().context("ip -batch")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kill every process left in namespace `ns`, then delete it.
fn remove_ns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            sys::kill9(pid);
        }
    }
    let _ = run("ip", &["netns", "del", ns]);
}

/// The namespaces of earlier runs whose process is gone (killed with SIGKILL): remove them.
pub(crate) fn sweep_stale() -> Vec<String> {
    let mut swept = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return swept;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "shoal" || pid == std::process::id());
        if !alive {
            remove_ns(&name);
            swept.push(name);
        }
    }
    swept
}

/// The address of host `i` (0-based): 198.18.0.1, 198.18.0.2, ...
fn host_ip(i: usize) -> String {
    let n = i + 1;
    format!("198.18.{}.{}", n >> 8, n & 0xff)
}

/// The MAC address of host `i`'s `eth0` (locally administered, from its address), so every
/// host can be told every other's ahead of time.
fn host_mac(i: usize) -> String {
    let n = i + 1;
    format!("02:00:c6:12:{:02x}:{:02x}", n >> 8, n & 0xff)
}

/// tc tbf arguments for `bps`: a burst of about 4 ms (at least 4 frames) and a buffer of about
/// 100 ms (at least 16 frames), a home router's order of magnitude.
fn tbf(bps: u64, mtu: u32) -> [String; 6] {
    let bytes_per_sec = bps / 8;
    let burst = (bytes_per_sec / 250).max(u64::from(mtu) * 4);
    let limit = (bytes_per_sec / 10).max(u64::from(mtu) * 16);
    [
        "rate".into(),
        format!("{bps}bit"),
        "burst".into(),
        burst.to_string(),
        "limit".into(),
        limit.to_string(),
    ]
}

impl Emulator {
    /// Create the switch and one namespace per host, with its link.
    pub(crate) fn start(hosts: &[(String, Link)], mtu: u32) -> anyhow::Result<Emulator> {
        if hosts.len() > 250 {
            bail!("at most 250 emulated hosts");
        }
        let prefix = format!("{PREFIX}{}", std::process::id());
        let mut emu = Emulator {
            switch: format!("{prefix}-sw"),
            prefix,
            hosts: Vec::new(),
            created: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            taps: Vec::new(),
        };
        let sw = emu.switch.clone();
        run("ip", &["netns", "add", &sw])?;
        emu.created.push(sw.clone());
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        let mtu_s = mtu.to_string();
        for (i, (name, link)) in hosts.iter().enumerate() {
            let ns = format!("{}-{name}", emu.prefix);
            run("ip", &["netns", "add", &ns])?;
            emu.created.push(ns.clone());
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            let port = format!("p{i}");
            let (host_tap, sw_tap) = (
                in_netns(&ns, || sys::open_tap("eth0"))??,
                in_netns(&sw, || sys::open_tap(&port))??,
            );
            let ip = host_ip(i);
            run(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{ip}/15"), "dev", "eth0"],
            )?;
            let mac = host_mac(i);
            run(
                "ip",
                &[
                    "-n", &ns, "link", "set", "eth0", "address", &mac, "mtu", &mtu_s, "up",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n", &sw, "link", "set", &port, "mtu", &mtu_s, "master", "br0", "up",
                ],
            )?;
            for (dev_ns, dev, bps) in [(&ns, "eth0", link.up_bps), (&sw, &port, link.down_bps)] {
                if bps > 0 {
                    let t = tbf(bps, mtu);
                    let mut a = vec!["-n", dev_ns, "qdisc", "add", "dev", dev, "root", "tbf"];
                    a.extend(t.iter().map(String::as_str));
                    run("tc", &a)?;
                }
            }
            let (host_tap, sw_tap) = (Arc::new(host_tap), Arc::new(sw_tap));
            let (up_stats, down_stats) = (Arc::default(), Arc::default());
            emu.threads.extend(delayline::spawn(
                format!("{name}-up"),
                host_tap.clone(),
                sw_tap.clone(),
                link.delay,
                link.loss,
                emu.stop.clone(),
                Arc::clone(&up_stats),
            )?);
            emu.threads.extend(delayline::spawn(
                format!("{name}-down"),
                sw_tap.clone(),
                host_tap.clone(),
                link.delay,
                link.loss,
                emu.stop.clone(),
                Arc::clone(&down_stats),
            )?);
            emu.taps.extend([host_tap, sw_tap]);
            emu.hosts.push(Host {
                name: name.clone(),
                ns,
                ip,
                link: *link,
                up_stats,
                down_stats,
            });
        }
        // Every host knows every other's MAC address: address resolution would otherwise cross
        // the emulated links, and each host's first packet to another would wait a round trip
        // for ARP (measured: a 600 ms host's first tracker announce took 1.8 s, 3 round trips,
        // where the next took 1). Real hosts resolve only their router's, on their own LAN.
        for h in &emu.hosts {
            let neigh: String = (0..hosts.len())
                .filter(|&j| host_ip(j) != h.ip)
                .map(|j| {
                    format!(
                        "neigh replace {} lladdr {} dev eth0 nud permanent\n",
                        host_ip(j),
                        host_mac(j)
                    )
                })
                .collect();
            run_batch(&h.ns, &neigh)?;
        }
        Ok(emu)
    }

    pub(crate) fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Packets each host's rate limiters dropped so far, (upload, download): their queues
    /// (about 100 ms of the rate, [`tbf`]) were full. The delay lines' own drops are in
    /// [`LineStats`]; these are the kernel's, which senders see as loss on the path. `None`
    /// where `tc` could not tell.
    pub(crate) fn queue_drops(&self) -> Vec<(Option<u64>, Option<u64>)> {
        let drops = |ns: &str, dev: &str| {
            let out = Command::new("tc")
                .args(["-n", ns, "-s", "qdisc", "show", "dev", dev])
                .output()
                .ok()?;
            out.status.success().then_some(())?;
            parse_dropped(&String::from_utf8_lossy(&out.stdout))
        };
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let up = if h.link.up_bps > 0 {
                    drops(&h.ns, "eth0")
                } else {
                    Some(0)
                };
                let port = format!("p{i}");
                let down = if h.link.down_bps > 0 {
                    drops(&self.switch, &port)
                } else {
                    Some(0)
                };
                (up, down)
            })
            .collect()
    }

    /// The namespaces this run created.
    #[cfg(test)]
    pub(crate) fn namespaces(&self) -> &[String] {
        &self.created
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Closing the queues removes the TAP devices.
        self.taps.clear();
        for ns in self.created.drain(..).rev() {
            remove_ns(&ns);
        }
    }
}

/// The packets dropped, summed over the qdiscs in `tc -s qdisc show` output ("... (dropped N,
/// overlimits ...)"); `None` if it names none.
fn parse_dropped(out: &str) -> Option<u64> {
    let mut total = None;
    for part in out.split("dropped ").skip(1) {
        let n: u64 = part
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        total = Some(total.unwrap_or(0) + n);
    }
    total
}

/// Run `f` on a thread inside namespace `ns` (sockets it opens live there).
pub(crate) fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            sys::enter_netns(ns).with_context(|| format!("cannot enter namespace {ns}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in namespace {ns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_parse_rates_in_bits() {
        assert_eq!(parse_rate("100Mbit").unwrap(), 100_000_000);
        assert_eq!(parse_rate("1.5Gbit").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate("512kbit").unwrap(), 512_000);
        assert!(parse_rate("100MiB").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn it_should_sum_the_drops_tc_reports() {
        let out = "qdisc tbf 8004: root refcnt 2 rate 50Mbit burst 25000b lat 96ms \n Sent 1400 bytes 1 pkt (dropped 37, overlimits 3 requeues 0) \n backlog 0b 0p requeues 0\nqdisc x 1: Sent 0 bytes 0 pkt (dropped 5, overlimits 0 requeues 0)\n";
        assert_eq!(parse_dropped(out), Some(42));
        assert_eq!(parse_dropped("qdisc noqueue 0: root refcnt 2"), None);
    }

    #[test]
    fn it_should_fill_a_host_link_from_the_defaults() {
        let base = LinkSpec {
            up: Some("100Mbit".into()),
            down: Some("100Mbit".into()),
            delay: Some("10ms".into()),
            loss: None,
        };
        let host = LinkSpec {
            up: Some("10Mbit".into()),
            ..Default::default()
        };
        let l = host.over(&base).resolve().unwrap();
        assert_eq!(l.up_bps, 10_000_000);
        assert_eq!(l.down_bps, 100_000_000);
        assert_eq!(l.delay, Duration::from_millis(10));
        assert!(LinkSpec {
            loss: Some(1.5),
            ..Default::default()
        }
        .resolve()
        .is_err());
    }

    /// Creates a two-host network, measures it, and checks that dropping it removes every
    /// namespace. Needs root, /dev/net/tun and iproute2: elsewhere it says why and passes.
    #[test]
    fn it_should_emulate_the_delay_and_loss_and_remove_its_namespaces() {
        if let Some(why) = unavailable() {
            println!("skipped: the emulator cannot run here: {why}");
            return;
        }
        let link = |delay_ms: u64, loss: f64| Link {
            up_bps: 50_000_000,
            down_bps: 50_000_000,
            delay: Duration::from_millis(delay_ms),
            loss,
        };
        let hosts = [
            ("emutest-a".to_string(), link(10, 0.0)),
            ("emutest-b".to_string(), link(25, 0.05)),
            ("emutest-c".to_string(), link(40, 0.0)),
        ];
        let emu = Emulator::start(&hosts, 1500).unwrap();
        let names: Vec<String> = emu.namespaces().to_vec();
        assert_eq!(names.len(), 4, "the switch and three hosts: {names:?}");
        let listed = || {
            std::fs::read_dir("/run/netns")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        assert!(
            names.iter().all(|n| listed().contains(n)),
            "{names:?} not in {:?}",
            listed()
        );
        let paths = measure(&emu, 0, &[1, 2]).unwrap();
        let p = &paths[0];
        // A burst far over a's uplink (50 Mbit/s, a queue of about 625 KB) from 8 sockets at
        // once (one socket's own buffer would block it first): the kernel's queue drops, and
        // the report can say so.
        let to = format!("{}:9", emu.hosts[2].ip);
        in_netns(&emu.hosts[0].ns, || {
            let socks: Vec<_> = (0..8)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
                .collect();
            for s in &socks {
                s.set_nonblocking(true).unwrap();
                for _ in 0..200 {
                    let _ = s.send_to(&[0u8; 1400], &to);
                }
            }
        })
        .unwrap();
        let drops = emu.queue_drops();
        println!("queue drops (up, down) per host: {drops:?}");
        assert!(
            drops.iter().all(|(u, d)| u.is_some() && d.is_some()),
            "tc told no drop count: {drops:?}"
        );
        assert!(
            drops[0].0.unwrap() > 0,
            "a 2.2 MB burst into a's 625 KB uplink queue dropped nothing: {drops:?}"
        );
        drop(emu);
        // The first packet to a host waits for no address resolution across the emulated
        // links: a first connect of one RTT (2 x (10 + 40) ms), not two.
        let c = &paths[1];
        assert_eq!(c.expected_rtt_ms, 100.0);
        assert!(
            c.first_connect_ms < 160.0,
            "first connect {} ms for an RTT of {} ms",
            c.first_connect_ms,
            c.expected_rtt_ms
        );
        let left: Vec<String> = listed().into_iter().filter(|n| names.contains(n)).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        // RTT = 2 x (10 + 25) ms; loss on the path = 5 % (b's downlink only).
        assert_eq!(p.expected_rtt_ms, 70.0);
        let err = (p.measured_rtt_ms / p.expected_rtt_ms - 1.0).abs();
        assert!(
            err < 0.2,
            "RTT {} ms for {} ms",
            p.measured_rtt_ms,
            p.expected_rtt_ms
        );
        assert!((p.expected_loss - 0.05).abs() < 1e-9);
        // 1000 datagrams: the standard deviation is 0.7 points; allow 3.
        assert!(
            (p.measured_loss - 0.05).abs() < 0.03,
            "loss {}",
            p.measured_loss
        );
    }
}
