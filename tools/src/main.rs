//! `shoal-tools`: offline verify, repair, inspect and compact of a stopped peer's data dir.
//!
//! Every command first checks that DIR is a shoal store (nothing is written otherwise), then
//! takes the data dir's lock (`daemon.lock`, the flock a running daemon holds, with this
//! process's pid written in it): a tool never works behind a daemon's back, and a daemon cannot
//! start while a tool works.
//!
//! `inspect` and `verify` only read: sled has no read-only mode and may write when it opens a
//! store (recovery after a crash, its config, a snapshot), so they copy `store/` into a private
//! temporary directory and open the copy; the store itself is left byte for byte and mtime for
//! mtime as it was.
//!
//! `verify` sorts what it finds into the store's claims (a claimed piece that is bad or missing,
//! or a working file that is not the one the store recorded: exit 1) and the normal leftovers
//! of a crash (pieces good on disk but not yet claimed: reported, exit 0). `repair --apply`
//! writes its undo journal (fsynced, its directory too) before its first change, and syncs
//! every data file it vouches for before it commits a bit.
//!
//! Layout: [`data_dir`] (lock, store copy) <- [`verify`] (one file) and [`tree`] (a tree,
//! per file) <- [`repair`] (plans, journal, undo); [`inspect`] and [`compact`] stand alone.

mod compact;
mod data_dir;
mod inspect;
mod repair;
mod tree;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shoal-tools",
    version,
    about = "Offline verify, repair, inspect and compact of a stopped shoal peer's data dir"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Torrents, states, have/total, data files, store size, scores (reads a private copy of
    /// the store: nothing in DIR is written).
    Inspect {
        /// The stopped peer's data dir (the one holding `store/`).
        dir: PathBuf,
        /// Print JSON instead of a table [default: a table].
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every piece, claimed or not (reads a private copy of the store). Exit 0 when
    /// every claimed piece is good (good pieces not yet claimed are reported), 1 when the
    /// store claims a bad or missing piece or an untrusted file, 2 on an error.
    Verify {
        /// The stopped peer's data dir (the one holding `store/`).
        dir: PathBuf,
        /// Only this torrent (64 hex digits) [default: every torrent].
        info_hash: Option<String>,
        /// Print JSON instead of text [default: text].
        #[arg(long)]
        json: bool,
    },
    /// Make the store agree with the data: claim good pieces, drop bad ones, rename a
    /// finished working file. A dry run unless --apply; writes an undo journal first.
    Repair {
        /// The stopped peer's data dir (the one holding `store/`).
        dir: PathBuf,
        /// Only this torrent (64 hex digits) [default: every torrent].
        info_hash: Option<String>,
        /// Make the changes [default: off, a dry run that only prints them].
        #[arg(long)]
        apply: bool,
    },
    /// Undo a repair from its undo journal (safe to run again if interrupted).
    Undo {
        /// The stopped peer's data dir (the one holding `store/`).
        dir: PathBuf,
        /// The undo journal `repair --apply` wrote and printed (DIR/repair-undo-MS.json).
        file: PathBuf,
    },
    /// Reclaim the store's space (a fresh copy swapped in; safe to interrupt).
    Compact {
        /// The stopped peer's data dir (the one holding `store/`).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("shoal-tools: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Inspect { dir, json } => inspect::inspect(&dir, json),
        Cmd::Verify {
            dir,
            info_hash,
            json,
        } => verify::verify(&dir, info_hash.as_deref(), json),
        Cmd::Repair {
            dir,
            info_hash,
            apply,
        } => repair::repair(&dir, info_hash.as_deref(), apply),
        Cmd::Undo { dir, file } => repair::undo(&dir, &file),
        Cmd::Compact { dir } => compact::compact(&dir),
    }
}
