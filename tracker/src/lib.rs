//! shoal-tracker: the lowest layer of shoal.
//!
//! Layout:
//! - [`wire`]: the frame codec every shoal connection speaks (peer to peer too), with its limits.
//! - [`proto`]: the peer-to-tracker messages, a contract other clients use.
//! - [`swarm`]: the live swarm in memory, pure rules (roles, events, pruning).
//! - [`store`]: SQLite persistence and the schema migrations from `migrations/`.
//! - [`server`]: the tokio server, the prune task and the writer thread; [`conn`]: its side
//!   of a connection; [`udp`]: its datagram socket (session announces, batched system calls).
//! - [`client`]: a tracker client with bounded waits.
//! - [`keys`], [`roster`]: peer keys and private-swarm rosters, shared with the peer crate.
//! - [`auth`]: signed announces and the tracker sessions that make repeat announces cheap.
//! - [`http`], [`metrics`]: `/metrics`, the JSON API and the dashboard (off by default).
//! - [`config`]: the `[tracker]` section of `config.toml`.
//!
//! The peer crate (`shoal`) depends on this one, never the other way round.

pub mod auth;
pub mod client;
pub mod config;
pub mod conn;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod proto;
pub mod roster;
pub mod server;
pub mod store;
pub mod swarm;
pub mod udp;
pub mod wire;

pub use config::TrackerConfig;
pub use server::Tracker;
