//! `config.toml`: one serde struct per section, defaults from one place, unknown keys refused.
//!
//! Precedence, lowest first: built-in defaults, the file (`--config PATH`, or `./config.toml`
//! when present), environment variables `SHOAL__SECTION__KEY` (e.g. `SHOAL__PEER__FLUSH_INTERVAL=2s`),
//! then command-line flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
pub use shoal_tracker::TrackerConfig;

/// The config file schema version this build reads.
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Schema version of this file.
    pub version: u32,
    pub tracker: TrackerConfig,
    pub peer: PeerConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: CONFIG_VERSION,
            tracker: TrackerConfig::default(),
            peer: PeerConfig::default(),
        }
    }
}

/// How pieces are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PieceSelection {
    /// Rarest first, random among equals for the first pieces, endgame at the end.
    RarestFirst,
    /// The seed's policy: plain random order.
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerConfig {
    /// State directory: sled store, control socket, descriptors, default downloads.
    pub data_dir: PathBuf,
    /// Address to listen on for other peers (HOST:PORT; port 0 picks one).
    pub listen: String,
    /// Trackers to announce to (HOST:PORT), besides those in each descriptor.
    pub trackers: Vec<String>,
    /// Piece size for `shoal publish` and `shoal create` (power of two, 16KiB to 16MiB).
    pub piece_size: String,
    /// Connections per torrent we open at most.
    pub max_peers_per_torrent: usize,
    /// Connections in total (in and out) at most.
    pub max_connections: usize,
    /// Outstanding requests per connection at most (pipelining depth for the best peers).
    pub max_requests_per_peer: usize,
    /// Outstanding requests for a peer we have not measured yet.
    pub initial_requests_per_peer: usize,
    /// Requests from one peer we queue for upload at most; more are rejected.
    pub max_uploads_per_peer: usize,
    /// Verified pieces become durable (data flush, then sled) at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Timeout to connect to a peer or a tracker.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A connection with no frame for this long is closed (keep-alives are sent at a third).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Once a frame has started, the rest must arrive within this time.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// A tracker that does not answer within this time is skipped for now.
    #[serde(with = "humantime_serde")]
    pub tracker_timeout: Duration,
    /// Send heartbeats (progress announces) to a tracker as UDP datagrams once a session with
    /// it is open (over TCP), falling back to TCP when one goes unanswered.
    pub tracker_udp: bool,
    /// Retry backoff for an unreachable tracker grows up to this.
    #[serde(with = "humantime_serde")]
    pub tracker_backoff_max: Duration,
    /// A request unanswered for this long is given up and the piece goes to another peer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Pieces failing their hash from one peer before it is banned from the torrent.
    pub ban_threshold: u32,
    /// How long a ban lasts.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    /// Piece selection policy: "rarest-first" or "random".
    pub piece_selection: PieceSelection,
    /// With rarest-first: the first this many pieces are picked at random among equals.
    pub random_first_pieces: u32,
    /// Pieces being verified (hashed) at once at most, per daemon; bounds buffered memory.
    pub max_pieces_verifying: usize,
    /// Upload rate limit per second for the whole daemon, e.g. "16MiB" ("0": unlimited).
    pub max_upload_rate: String,
    /// A torrent that starts complete spreads its pieces one leecher at a time until every
    /// piece reached one (super-seeding, after BEP 16), while no other seeder is known.
    pub super_seed: bool,
    /// Log filter when RUST_LOG is not set (tracing env-filter syntax).
    pub log: String,
    /// HTTP address for `/metrics`, the JSON API and the dashboard ("": off).
    pub http: String,
    /// Bearer token the HTTP server requires ("": none; then it listens on loopback only).
    pub http_token: String,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            data_dir: PathBuf::from("shoal-data"),
            listen: "127.0.0.1:0".into(),
            trackers: Vec::new(),
            piece_size: "1MiB".into(),
            max_peers_per_torrent: 30,
            max_connections: 256,
            max_requests_per_peer: 32,
            initial_requests_per_peer: 4,
            max_uploads_per_peer: 64,
            flush_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            read_timeout: Duration::from_secs(30),
            tracker_timeout: Duration::from_secs(3),
            tracker_udp: true,
            tracker_backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            ban_threshold: 3,
            ban_duration: Duration::from_secs(600),
            piece_selection: PieceSelection::RarestFirst,
            random_first_pieces: 4,
            max_pieces_verifying: 8,
            max_upload_rate: "0".into(),
            super_seed: true,
            log: "info".into(),
            http: String::new(),
            http_token: String::new(),
        }
    }
}

impl PeerConfig {
    /// # Errors
    /// A message naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        let ps = crate::units::parse_size(&self.piece_size)
            .map_err(|e| anyhow::anyhow!("peer.piece_size: {e}"))?;
        crate::metainfo::check_piece_length(u32::try_from(ps).unwrap_or(u32::MAX))
            .map_err(|e| anyhow::anyhow!("peer.piece_size: {e}"))?;
        if self.max_requests_per_peer == 0 || self.initial_requests_per_peer == 0 {
            bail!(
                "peer.max_requests_per_peer and peer.initial_requests_per_peer must be at least 1"
            );
        }
        if self.max_pieces_verifying == 0
            || self.max_connections == 0
            || self.max_peers_per_torrent == 0
        {
            bail!("peer.max_pieces_verifying, peer.max_connections and peer.max_peers_per_torrent must be at least 1");
        }
        if self.flush_interval.is_zero() || self.idle_timeout < Duration::from_secs(1) {
            bail!("peer.flush_interval must be over zero and peer.idle_timeout at least 1s");
        }
        crate::units::parse_size(&self.max_upload_rate)
            .map_err(|e| anyhow::anyhow!("peer.max_upload_rate: {e}"))?;
        if self.ban_threshold == 0 {
            bail!("peer.ban_threshold must be at least 1");
        }
        Ok(())
    }

    /// The upload limit in bytes per second; `None` when unlimited.
    pub fn upload_rate(&self) -> Option<u64> {
        crate::units::parse_size(&self.max_upload_rate)
            .ok()
            .filter(|&r| r > 0)
    }

    pub fn piece_length(&self) -> u32 {
        crate::units::parse_size(&self.piece_size)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(crate::metainfo::DEFAULT_PIECE_LENGTH)
    }
}

impl Config {
    /// Load: defaults, then the file (if `path` is given it must exist; else `./config.toml`
    /// is read when present), then `SHOAL__*` environment variables.
    ///
    /// # Errors
    /// An unreadable file, an unknown key or a bad value, naming the key.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?,
            ),
            None => std::fs::read_to_string("config.toml").ok(),
        };
        let mut value: toml::Value = match &text {
            Some(t) => {
                let name = path.map_or("config.toml".into(), |p| p.display().to_string());
                toml::from_str(t).with_context(|| format!("config {name}"))?
            }
            None => toml::Value::Table(Default::default()),
        };
        apply_env(&mut value, std::env::vars())?;
        let cfg: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("config: {}", e.message().trim()))?;
        if cfg.version != CONFIG_VERSION {
            bail!(
                "config: version {} is not one this shoal reads ({CONFIG_VERSION})",
                cfg.version
            );
        }
        cfg.peer.validate()?;
        cfg.tracker.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }
}

/// Apply `SHOAL__SECTION__KEY=value` overrides. Values are parsed as TOML when they parse
/// (numbers, booleans, arrays), else taken as strings.
fn apply_env(
    value: &mut toml::Value,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("SHOAL__") else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let parsed = toml::from_str::<toml::Table>(&format!("x = {v}"))
            .ok()
            .and_then(|mut t| t.remove("x"))
            .unwrap_or(toml::Value::String(v.clone()));
        let mut cur = &mut *value;
        for (i, seg) in path.iter().enumerate() {
            let table = cur
                .as_table_mut()
                .with_context(|| format!("environment variable {k}: {seg} is not a section"))?;
            if i + 1 == path.len() {
                table.insert(seg.clone(), parsed.clone());
                break;
            }
            cur = table
                .entry(seg.clone())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_ship_a_config_toml_equal_to_the_defaults() {
        let shipped = include_str!("../config.toml");
        let cfg: Config = toml::from_str(shipped).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn it_should_name_an_unknown_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[peer]\nflush_intervall = \"1s\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("flush_intervall"), "{e}");
        std::fs::write(&p, "[tracker]\nttl = \"soon\"\n").unwrap();
        let e = format!("{:#}", Config::load(Some(&p)).unwrap_err());
        assert!(e.contains("ttl") || e.contains("soon"), "{e}");
    }

    #[test]
    fn it_should_let_the_environment_override_the_file() {
        let mut v = toml::Value::Table(Default::default());
        apply_env(
            &mut v,
            vec![
                ("SHOAL__PEER__FLUSH_INTERVAL".to_string(), "2s".to_string()),
                (
                    "SHOAL__TRACKER__MAX_CONNECTIONS".to_string(),
                    "7".to_string(),
                ),
            ]
            .into_iter(),
        )
        .unwrap();
        let cfg: Config = v.try_into().unwrap();
        assert_eq!(cfg.peer.flush_interval, Duration::from_secs(2));
        assert_eq!(cfg.tracker.max_connections, 7);
    }
}
