//! The control socket: how `shoal get`, `publish`, `status`, `query`, `pause`, `resume` and
//! `remove` talk to a running daemon. A Unix socket in the data dir, mode 0600, so only the
//! owner can open it. The same frames as the network: a small `{"type":"CTL","len":N}` header
//! and the request or reply as JSON in the payload, so descriptors, status of many torrents and
//! query results are bounded by the 16 MiB payload limit rather than the 64 KiB header one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shoal_tracker::wire::{FrameReader, FrameWriter, Limits, Timeouts};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

/// File name of the control socket inside the data dir.
pub const SOCKET_NAME: &str = "control.sock";

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CtlRequest {
    /// Hash a file and seed it in place.
    Publish {
        path: PathBuf,
        /// A private swarm with this peer as its authority.
        #[serde(default)]
        private: bool,
    },
    /// Download: from descriptor JSON, or from an info hash alone.
    Add {
        descriptor: Option<String>,
        info_hash: Option<String>,
        output: Option<PathBuf>,
        #[serde(default)]
        trackers: Vec<String>,
        /// A tree: only the files these globs match.
        #[serde(default)]
        only: Vec<String>,
    },
    Status,
    Query {
        sql: String,
    },
    Pause {
        info_hash: String,
    },
    Resume {
        info_hash: String,
    },
    Remove {
        info_hash: String,
        delete_data: bool,
    },
    Recheck {
        info_hash: String,
    },
    /// A tree: download only the files these globs match (empty: every file).
    Select {
        info_hash: String,
        only: Vec<String>,
    },
    /// A private swarm: list its roster, or add and revoke members (the authority only).
    Swarm {
        info_hash: String,
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        revoke: Vec<String>,
    },
    Shutdown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CtlResponse {
    Ok {
        message: String,
    },
    Published {
        info_hash: String,
        descriptor: PathBuf,
    },
    Added {
        info_hash: String,
    },
    Status(StatusReport),
    Rows {
        columns: Vec<String>,
        rows: Vec<Vec<serde_json::Value>>,
    },
    Error {
        reason: String,
    },
}

/// The state a daemon shows: `shoal status --json` prints this shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub peer_id: String,
    pub listen: String,
    pub torrents: Vec<TorrentStatus>,
    pub trackers: Vec<TrackerStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TorrentStatus {
    pub info_hash: String,
    pub name: String,
    pub length: u64,
    pub piece_length: u32,
    pub pieces: u32,
    /// Pieces verified (in memory; the durable count may trail by one flush interval).
    pub have: u32,
    pub state: String,
    pub progress: f64,
    pub downloaded: u64,
    pub uploaded: u64,
    pub down_rate: f64,
    pub up_rate: f64,
    pub eta_secs: Option<u64>,
    pub added_at: i64,
    pub completed_at: Option<i64>,
    pub data_path: String,
    pub note: Option<String>,
    pub rejected_pieces: u64,
    /// A private swarm (only its authority's members may join).
    #[serde(default)]
    pub private: bool,
    /// The private swarm's roster version we hold (0: none).
    #[serde(default)]
    pub roster_version: u64,
    /// This seeder still offers pieces one peer at a time ([`crate::superseed`]).
    #[serde(default)]
    pub super_seeding: bool,
    /// Pieces this seeder sent a second time while super-seeding (0 when the rule held).
    #[serde(default)]
    pub first_round_repeats: u64,
    pub peers: Vec<PeerStatus>,
    /// Per piece: how many times we uploaded it this session; only for `query` snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub piece_uploads: Vec<u32>,
    /// Per piece: [have, availability, in_flight]; only for `query` snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub piece_states: Vec<(bool, u16, u8)>,
    /// A tree's files; only for `query` snapshots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileStatus>,
}

/// One entry of a tree, for `query`'s `files` table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileStatus {
    /// The path below the tree's folder, components joined with `/`.
    pub path: String,
    pub length: u64,
    /// Verified bytes (equal to `length` when the file is complete).
    pub have: u64,
    pub selected: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer_id: String,
    /// The short form of the peer's key (its id's first 16 hex digits).
    #[serde(default)]
    pub fingerprint: String,
    /// A private swarm: whether the roster we hold admits this peer (`None`: public swarm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<bool>,
    pub addr: String,
    pub port: u16,
    pub connected: bool,
    pub latency_ms: f64,
    /// Round-trip time from PING/PONG, ms (0: not measured).
    #[serde(default)]
    pub rtt_ms: f64,
    /// Delivered bytes per second while it had our requests (0: not measured).
    #[serde(default)]
    pub throughput: f64,
    pub score: f64,
    pub pieces_from: u64,
    pub pieces_to: u64,
    pub bytes_from: u64,
    pub bytes_to: u64,
    pub failures: u32,
    pub banned_until: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrackerStatus {
    pub addr: String,
    pub reachable: bool,
    pub last_ok: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    /// Heartbeats go to it as UDP datagrams (a session is open and datagrams were answered).
    #[serde(default)]
    pub datagrams: bool,
}

/// Send one request to the daemon of `data_dir` and read its reply.
///
/// # Errors
/// No daemon (says how to start one), a transport error, or the daemon's own refusal.
pub async fn call(
    data_dir: &Path,
    req: &CtlRequest,
    timeout: Duration,
) -> anyhow::Result<CtlResponse> {
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => bail!(
            "no shoal daemon is running for data dir {} ({}: {e}); start one with `shoal peer run --data-dir {}`",
            data_dir.display(),
            path.display(),
            data_dir.display()
        ),
    };
    let (r, w) = stream.into_split();
    let mut w = FrameWriter::new(w, timeout);
    let mut r = FrameReader::new(
        r,
        Limits::default(),
        Timeouts {
            idle: timeout,
            read: timeout,
        },
    );
    send_msg(&mut w, req)
        .await
        .context("sending to the daemon")?;
    let resp: CtlResponse = recv_msg(&mut r)
        .await
        .context("reading the daemon's reply")?
        .context("the daemon closed the control connection")?;
    if let CtlResponse::Error { reason } = resp {
        bail!("{reason}");
    }
    Ok(resp)
}

/// Send one control message (request or reply) as the payload of a `CTL` frame.
///
/// # Errors
/// Over 16 MiB, or the write fails.
pub async fn send_msg<W: AsyncWrite + Unpin>(
    w: &mut FrameWriter<W>,
    msg: &impl Serialize,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(msg)?;
    w.send(
        &serde_json::json!({"type": "CTL", "len": body.len()}),
        &body,
    )
    .await?;
    Ok(())
}

/// Read one control message; `None` on a clean close.
///
/// # Errors
/// Transport errors, or a message that does not parse.
pub async fn recv_msg<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut FrameReader<R>,
) -> anyhow::Result<Option<T>> {
    let Some(frame) = r.read_frame().await? else {
        return Ok(None);
    };
    if frame.kind() != "CTL" {
        bail!("expected a CTL frame, got {}", frame.kind());
    }
    Ok(Some(
        serde_json::from_slice(&frame.payload).context("control message does not parse")?,
    ))
}
