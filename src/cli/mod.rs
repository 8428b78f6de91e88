//! The `shoal` command line: parse, load config, apply flags over it, and call the library.
//!
//! Layout:
//! - [`args`]: every command, flag and argument, with its help and default;
//! - [`overlay`]: flags over config;
//! - [`transfer`] (`create`, `show`, `publish`, `get`), [`peer`] (a running peer's commands),
//!   [`tracker`] (`tracker run/monitor`, `list`): one module per command family;
//! - [`render`]: the text views; [`out`]: stdout writes that survive a closed pipe.

pub mod args;
pub mod out;
pub mod overlay;
pub mod peer;
pub mod render;
pub mod tracker;
pub mod transfer;

use std::io::IsTerminal;

pub use args::{Cli, Cmd, PeerCmd, SwarmCmd, TrackerCmd};
pub use transfer::TimedOut;

use crate::config::Config;
use crate::control::CtlRequest;
use overlay::data_dir;

/// `main`'s exit code for an error: 3 for a `get --wait` timeout, 1 otherwise; a closed
/// stdout is a success (`shoal status | head -1`).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return 0;
    }
    if e.downcast_ref::<TimedOut>().is_some() {
        return 3;
    }
    1
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init(); // Already set (tests calling run twice): keep the first.
}

/// Run a parsed command line.
///
/// # Errors
/// Whatever the command failed with, with context; `main` prints it and picks the exit code
/// with [`exit_code`].
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Completions { shell } = cli.cmd {
        use clap::CommandFactory;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut buf);
        out::print(&String::from_utf8_lossy(&buf))?;
        return Ok(());
    }
    let cfg = Config::load(cli.config.as_deref())?;
    init_logging(&cfg.peer.log);
    match cli.cmd {
        Cmd::Completions { .. } => unreachable!("handled above"),
        Cmd::Create {
            file,
            output,
            piece_size,
            trackers,
            json,
        } => transfer::create(&cfg, &file, output, piece_size, trackers, json.json).await,
        Cmd::Show { descriptor, json } => transfer::show(&descriptor, json.json),
        Cmd::Tracker { cmd } => match cmd {
            TrackerCmd::Run {
                listen,
                db,
                ttl,
                interval,
                allow_unsigned,
                http,
            } => {
                let mut tc = overlay::tracker(
                    &cfg,
                    overlay::TrackerFlags {
                        listen,
                        db,
                        ttl,
                        interval,
                        http,
                    },
                );
                tc.allow_unsigned |= allow_unsigned;
                tracker::run(tc).await
            }
            TrackerCmd::Monitor {
                tracker,
                once,
                interval,
                json,
            } => tracker::monitor(&tracker, once, interval, json).await,
        },
        Cmd::List { trackers, json } => tracker::list(&trackers, json.json).await,
        Cmd::Peer { cmd } => match cmd {
            PeerCmd::Run {
                dir,
                listen,
                trackers,
                sabotage,
                http,
            } => {
                let pc = overlay::peer(&cfg, &dir, listen, trackers, http);
                let sabotage = match sabotage {
                    Some(s) => crate::sabotage::Sabotage::parse(&s).map_err(anyhow::Error::msg)?,
                    None => Default::default(),
                };
                crate::daemon::run(pc, sabotage).await
            }
            PeerCmd::Stop { dir } => {
                peer::simple(&data_dir(&cfg, &dir), CtlRequest::Shutdown, false).await
            }
        },
        Cmd::Publish {
            file,
            private,
            dir,
            json,
        } => transfer::publish(&data_dir(&cfg, &dir), &file, private, json.json).await,
        Cmd::Swarm { cmd } => {
            let (info_hash, add, revoke, dir) = match cmd {
                SwarmCmd::List { info_hash, dir } => (info_hash, vec![], vec![], dir),
                SwarmCmd::Add {
                    info_hash,
                    peers,
                    dir,
                } => (info_hash, peers, vec![], dir),
                SwarmCmd::Revoke {
                    info_hash,
                    peers,
                    dir,
                } => (info_hash, vec![], peers, dir),
            };
            let req = CtlRequest::Swarm {
                info_hash,
                add,
                revoke,
            };
            peer::simple(&data_dir(&cfg, &dir), req, false).await
        }
        Cmd::Get {
            what,
            output,
            trackers,
            wait,
            timeout,
            only,
            dir,
            json,
        } => {
            transfer::get(
                &data_dir(&cfg, &dir),
                transfer::GetArgs {
                    what,
                    output,
                    trackers,
                    wait,
                    timeout,
                    json: json.json,
                    only,
                },
            )
            .await
        }
        Cmd::Select {
            info_hash,
            only,
            all,
            dir,
        } => crate::cli_tree::select(&data_dir(&cfg, &dir), info_hash, only, all).await,
        Cmd::Status { json, watch, dir } => {
            peer::status(&data_dir(&cfg, &dir), json.json, watch).await
        }
        Cmd::Query { sql, json, dir } => peer::query(&data_dir(&cfg, &dir), sql, json.json).await,
        Cmd::Pause { target, dir, json } => {
            let req = CtlRequest::Pause {
                info_hash: target.info_hash,
            };
            peer::simple(&data_dir(&cfg, &dir), req, json.json).await
        }
        Cmd::Resume { target, dir, json } => {
            let req = CtlRequest::Resume {
                info_hash: target.info_hash,
            };
            peer::simple(&data_dir(&cfg, &dir), req, json.json).await
        }
        Cmd::Recheck { target, dir, json } => {
            let req = CtlRequest::Recheck {
                info_hash: target.info_hash,
            };
            peer::simple(&data_dir(&cfg, &dir), req, json.json).await
        }
        Cmd::Remove {
            target,
            delete_data,
            dir,
            json,
        } => {
            let req = CtlRequest::Remove {
                info_hash: target.info_hash,
                delete_data,
            };
            peer::simple(&data_dir(&cfg, &dir), req, json.json).await
        }
        Cmd::Demo(args) => crate::demo::run(args).await,
    }
}
