//! End-to-end tests: each starts real `shoal` processes on loopback.

mod common;

// `shoal create` / `shoal show`, descriptors and config errors.
mod descriptor;
// `shoal tracker run`: the contract, persistence across kill -9, pruning, bad input.
mod tracker;
// The tracker under floods and at scale: bounds per address, huge listings, poison values.
mod tracker_flood;
// Keys and private swarms on the tracker: signed announces, replays, members only.
mod tracker_auth;
// `shoal peer run`: publish, swarm downloads, metadata from the swarm, failover, corruption.
mod peer;
// Crashes, restarts, sabotage, banning and Smart Swarm scoring.
mod faults;
mod identity;
mod private;
// `status`, `query`, pause/resume/remove and the usual mistakes.
mod status;
// `shoal demo`: the whole emulated swarm.
mod demo;
// The storage boundary: hostile files, failing syncs, one owner, bounded state, cuts.
mod storage;
// HTTP: /metrics, the JSON API, the bearer token, the dashboard in headless Chromium.
mod ops;
// The command line as a newcomer meets it: help, errors, pipes, prefixes, --json, README.
mod cli;
// Folder trees (format 2): publish/get of trees, --only and select, kills, hostile paths.
mod folders;
// Swarm efficiency: super-seeding, control ahead of data, RTT apart from throughput.
mod swarm;
