//! Flags over config: each command-line value, when given, replaces the config's.

use std::path::PathBuf;

use super::args::{DataDir, Http};
use crate::config::{Config, PeerConfig, TrackerConfig};

pub fn data_dir(cfg: &Config, d: &DataDir) -> PathBuf {
    d.data_dir
        .clone()
        .unwrap_or_else(|| cfg.peer.data_dir.clone())
}

pub struct TrackerFlags {
    pub listen: Option<String>,
    pub db: Option<PathBuf>,
    pub ttl: Option<std::time::Duration>,
    pub interval: Option<std::time::Duration>,
    pub http: Http,
}

pub fn tracker(cfg: &Config, f: TrackerFlags) -> TrackerConfig {
    let mut tc = cfg.tracker.clone();
    if let Some(l) = f.listen {
        tc.listen = l;
    }
    if let Some(db) = f.db {
        tc.db = db;
    }
    if let Some(t) = f.ttl {
        tc.ttl = t;
    }
    if let Some(i) = f.interval {
        tc.interval = i;
    }
    if let Some(h) = f.http.http {
        tc.http = h;
    }
    if let Some(t) = f.http.http_token {
        tc.http_token = t;
    }
    tc
}

pub fn peer(
    cfg: &Config,
    dir: &DataDir,
    listen: Option<String>,
    trackers: Vec<String>,
    http: Http,
) -> PeerConfig {
    let mut pc = cfg.peer.clone();
    pc.data_dir = data_dir(cfg, dir);
    if let Some(l) = listen {
        pc.listen = l;
    }
    pc.trackers.extend(trackers);
    if let Some(h) = http.http {
        pc.http = h;
    }
    if let Some(t) = http.http_token {
        pc.http_token = t;
    }
    pc
}
