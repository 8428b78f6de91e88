//! The command line's shape: every command, flag and argument, with its help and default.
//! No behaviour here; [`super::run`] dispatches.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub const EXIT_CODES: &str = "Exit codes: 0 success (also when the reader of the output goes away, as with `| head`); \
1 failure (the message says why); 2 bad command line; 3 `get --wait --timeout` ran out of time (the download goes on in the daemon).";

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Private-swarm file distribution: redundant trackers, verified pieces, crash-safe resume",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// Config file [default: ./config.toml when present, else built-in defaults].
    #[arg(long, global = true, env = "SHOAL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Where the running peer keeps its state and control socket.
#[derive(Args, Debug, Clone)]
pub struct DataDir {
    /// The peer's data directory [default: peer.data_dir from config, "shoal-data"].
    #[arg(long, env = "SHOAL_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// `--json` for commands that print a result.
#[derive(Args, Debug, Clone, Copy)]
pub struct Json {
    /// Print the result as JSON (the same shape as the HTTP API) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A torrent named by the user.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Info hash of the torrent: 64 hex digits, or a unique prefix of 8 or more (as `status` shows).
    pub info_hash: String,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Write the descriptor (.json) of a file or a folder tree.
    Create {
        /// The file or folder to describe.
        file: PathBuf,
        /// Output path [default: <file name>.json in the current directory].
        #[arg(short, long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Piece size, e.g. 1MiB, 256KiB [default: peer.piece_size from config, 1MiB].
        #[arg(long, value_name = "SIZE")]
        piece_size: Option<String>,
        /// Tracker HOST:PORT to put in the descriptor (repeatable).
        #[arg(long = "tracker", value_name = "HOST:PORT")]
        trackers: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Print what a descriptor describes.
    Show {
        /// The descriptor (.json) to read.
        descriptor: PathBuf,
        #[command(flatten)]
        json: Json,
    },
    /// Run or watch a tracker.
    Tracker {
        #[command(subcommand)]
        cmd: TrackerCmd,
    },
    /// The files a swarm offers (asks the first tracker that answers).
    List {
        /// Tracker HOST:PORT to ask (repeatable; the first that answers is used).
        #[arg(long = "tracker", required = true, value_name = "HOST:PORT")]
        trackers: Vec<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Run or control a peer.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// Hash a file or a folder tree and seed it in place from the running peer.
    Publish {
        /// The file or folder to publish; it is seeded where it is.
        file: PathBuf,
        /// A private swarm with this peer as its authority: only the members it adds with
        /// `shoal swarm add` may join (the info hash covers the authority).
        #[arg(long)]
        private: bool,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// Download a file, from its descriptor or its info hash.
    Get {
        /// A descriptor path, or a 64-hex-digit info hash (the descriptor is then fetched from the swarm).
        what: String,
        /// Directory for the file [default: DATA_DIR/downloads].
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Extra tracker HOST:PORT (repeatable; adds to the descriptor's and config's).
        #[arg(long = "tracker", value_name = "HOST:PORT")]
        trackers: Vec<String>,
        /// Show progress and return when the file is complete and verified.
        #[arg(long)]
        wait: bool,
        /// With --wait: stop waiting after this long, e.g. 10m (exit code 3; the daemon keeps downloading) [default: wait forever].
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        timeout: Option<Duration>,
        /// A tree: download only the files this glob matches (repeatable; a folder's name
        /// selects what is below it). Change it later with `shoal select` [default: every file].
        #[arg(long = "only", value_name = "GLOB")]
        only: Vec<String>,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// A private swarm's members: list them, or (on the authority's peer) add and revoke.
    Swarm {
        #[command(subcommand)]
        cmd: SwarmCmd,
    },
    /// A tree: change which files are downloaded (files already there stay).
    Select {
        /// The torrent's info hash (or a unique prefix of 8+ hex digits).
        info_hash: String,
        /// Download the files this glob matches (repeatable).
        #[arg(long = "only", required_unless_present = "all", value_name = "GLOB")]
        only: Vec<String>,
        /// Download every file.
        #[arg(long, conflicts_with = "only")]
        all: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Torrents with progress, state, rates, and who we trade with.
    Status {
        #[command(flatten)]
        json: Json,
        /// Redraw every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Read-only SQL over the running peer's state (tables: torrents, pieces, peers, trackers).
    Query {
        /// One SELECT statement, e.g. "SELECT name, progress FROM torrents".
        sql: String,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Stop transferring a torrent (kept, resumable).
    Pause {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// Resume a paused torrent.
    Resume {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// Re-hash a torrent's data and fix its bitfield both ways.
    Recheck {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// Forget a torrent; its data is kept unless --delete-data.
    Remove {
        #[command(flatten)]
        target: Target,
        /// Also delete the downloaded file (or its unfinished .part).
        #[arg(long)]
        delete_data: bool,
        #[command(flatten)]
        dir: DataDir,
        #[command(flatten)]
        json: Json,
    },
    /// Print a shell completion script, e.g. `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Emulate a whole swarm on this machine and play the seed's experiments.
    Demo(crate::demo::DemoArgs),
}

/// `--http ADDR` and its token, on `tracker run` and `peer run`.
#[derive(Args, Debug, Clone)]
pub struct Http {
    /// Serve /metrics, the JSON API and the dashboard on ADDR, e.g. 127.0.0.1:8080 [default: http from config, "" = off].
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Bearer token HTTP requires; needed to listen beyond loopback [default: http_token from config, "" = none].
    #[arg(
        long,
        env = "SHOAL_HTTP_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub http_token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum TrackerCmd {
    /// Run a tracker.
    Run {
        /// Address to listen on for peers [default: tracker.listen from config, 127.0.0.1:5000].
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// SQLite database file [default: tracker.db from config, "tracker.db"].
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Prune peers silent for longer than this, e.g. 30s [default: tracker.ttl from config, 30s].
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        ttl: Option<Duration>,
        /// Heartbeat interval handed to peers, e.g. 10s [default: tracker.interval from config, 10s].
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        interval: Option<Duration>,
        /// Accept unsigned announces from legacy peer ids (never for an id that is a key)
        /// [default: tracker.allow_unsigned from config, false].
        #[arg(long)]
        allow_unsigned: bool,
        #[command(flatten)]
        http: Http,
    },
    /// The live swarm table: file, peer, key fingerprint, %, role.
    Monitor {
        /// Tracker HOST:PORT to watch.
        #[arg(long = "tracker", required = true, value_name = "HOST:PORT")]
        tracker: String,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Time between refreshes.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s", value_name = "DURATION")]
        interval: Duration,
        /// Print each refresh as one JSON line (an array of swarm entries).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Run the peer daemon.
    Run {
        #[command(flatten)]
        dir: DataDir,
        /// Address for other peers, HOST:PORT [default: peer.listen from config, 127.0.0.1:0].
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// Tracker HOST:PORT (repeatable; adds to config).
        #[arg(long = "tracker", value_name = "HOST:PORT")]
        trackers: Vec<String>,
        /// TESTING ONLY: corrupt, drop or delay served pieces, e.g. corrupt=0.3,drop=0.1,delay=200ms.
        #[arg(long, value_name = "SPEC")]
        sabotage: Option<String>,
        #[command(flatten)]
        http: Http,
    },
    /// Ask the running peer to stop cleanly.
    Stop {
        #[command(flatten)]
        dir: DataDir,
    },
}

#[derive(Subcommand, Debug)]
pub enum SwarmCmd {
    /// Show the swarm's authority and roster.
    List {
        /// The torrent's info hash (or a unique prefix of 8+ hex digits).
        info_hash: String,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Admit peers (their peer ids, as `shoal status` shows them): a new roster version.
    Add {
        info_hash: String,
        #[arg(required = true, value_name = "PEER_ID")]
        peers: Vec<String>,
        #[command(flatten)]
        dir: DataDir,
    },
    /// Revoke peers: a new roster version without them; peers that learn it close their
    /// connections to them and refuse the next ones.
    Revoke {
        info_hash: String,
        #[arg(required = true, value_name = "PEER_ID")]
        peers: Vec<String>,
        #[command(flatten)]
        dir: DataDir,
    },
}
