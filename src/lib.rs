//! shoal: private-swarm file distribution.
//!
//! Layout (dependencies point down the list, never up):
//! - [`units`], [`fsutil`], [`bitfield`]: small helpers.
//! - [`metainfo`], [`tree`]: the `.json` descriptor and the info hash; folder trees.
//! - [`peer_proto`]: peer-to-peer messages over the codec of [`shoal_tracker::wire`].
//! - [`storage`]: piece I/O through memory maps (all `unsafe` lives there).
//! - [`store`]: the sled state: torrents, durable bitfields, scores.
//! - [`picker`], [`scorer`], [`superseed`]: which piece next, how much to ask of whom, and
//!   which pieces a seeder offers to whom first.
//! - [`pacer`]: how fast our uplink may go, from the one-way delay our PINGs measure.
//! - [`sabotage`]: the testing mode that misbehaves on purpose.
//! - [`daemon`]: `shoal peer run`, tying it all together.
//! - [`control`], [`query`]: the local control socket and the SQL view of the state.
//! - [`hashprefix`]: info hashes typed by people (unique prefixes).
//! - [`metrics`], [`http`]: Prometheus metrics, the JSON API and the dashboard (off by default).
//! - [`cli`], [`demo`]: the command line and the swarm emulator.

pub mod bitfield;
pub mod cli;
pub mod cli_tree;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod fsutil;
pub mod hashing;
pub mod hashprefix;
pub mod http;
pub mod metainfo;
pub mod metrics;
pub mod pacer;
pub mod peer_proto;
pub mod picker;
pub mod query;
pub mod sabotage;
pub mod scorer;
pub mod secure;
pub mod storage;
pub mod store;
pub mod superseed;
pub mod testhook;
pub mod tree;
pub mod units;
