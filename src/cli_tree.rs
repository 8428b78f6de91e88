//! The tree parts of the command line: `shoal select`, and the file list of `shoal show`.
//! Kept apart from `cli.rs` so they move as one piece.

use std::path::Path;
use std::time::Duration;

use crate::control::{self, CtlRequest, CtlResponse};
use crate::metainfo::Metainfo;
use crate::units::fmt_bytes;

/// `shoal select HASH --only GLOB... | --all`.
///
/// # Errors
/// The daemon refuses (unknown hash, not a tree, globs that match nothing).
pub async fn select(
    dir: &Path,
    info_hash: String,
    only: Vec<String>,
    all: bool,
) -> anyhow::Result<()> {
    let only = if all { Vec::new() } else { only };
    match control::call(
        dir,
        &CtlRequest::Select { info_hash, only },
        Duration::from_secs(60),
    )
    .await?
    {
        CtlResponse::Ok { message } => {
            println!("{message}");
            Ok(())
        }
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

/// The file list of a tree, after the rest of `show`.
pub fn show_files(m: &Metainfo) {
    if !m.is_tree() {
        return;
    }
    println!("files: {}", m.files.len());
    for f in &m.files {
        if f.dir {
            println!("  {:>12}  {}/", "(folder)", f.display());
        } else {
            println!("  {:>12}  {}", fmt_bytes(f.length), f.display());
        }
    }
}

/// The file list of a tree in `show --json`.
pub fn show_files_json(m: &Metainfo, v: &mut serde_json::Value) {
    if m.is_tree() {
        v["format"] = 2.into();
        v["files"] = m
            .files
            .iter()
            .map(|f| serde_json::json!({"path": f.display(), "length": f.length, "dir": f.dir}))
            .collect();
    }
}
