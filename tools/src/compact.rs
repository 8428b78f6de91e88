//! `compact`: reclaim the store's space (a fresh copy swapped in; safe to interrupt).

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use shoal::store::{Store, STORE_DIR};

use crate::data_dir::open;

pub(crate) fn compact(dir: &Path) -> anyhow::Result<bool> {
    let (lock, store) = open(dir)?;
    let before = store.size_on_disk()?;
    drop(store);
    let live = dir.join(STORE_DIR);
    let tmp = dir.join(format!("{STORE_DIR}.compact-tmp"));
    let aside = dir.join(format!("{STORE_DIR}.old"));
    // Leftovers of an interrupted compaction: the copy is rebuilt, the aside store is only
    // removed once the live one is in place.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    if aside.exists() && live.join("conf").exists() {
        std::fs::remove_dir_all(&aside)?;
    }
    {
        let old = sled::open(&live).context("opening the store")?;
        let new = sled::open(&tmp).context("creating the compacted copy")?;
        new.import(old.export());
        new.flush()?;
    }
    // sled's flush is not durable (see shoal::store): the copy is synced, file by file and
    // directory by directory, before it replaces the store.
    sync_tree(&tmp).with_context(|| format!("cannot sync {}", tmp.display()))?;
    // Interrupted from here on, the store is found again by Store::open (it takes `.old` back).
    std::fs::rename(&live, &aside)?;
    std::fs::rename(&tmp, &live)?;
    shoal::fsutil::sync_dir(dir)?;
    std::fs::remove_dir_all(&aside)?;
    let store = Store::open(dir, false)?;
    let after = store.size_on_disk()?;
    drop(lock);
    println!(
        "compacted {}: {} -> {}",
        live.display(),
        shoal::units::fmt_bytes(before),
        shoal::units::fmt_bytes(after)
    );
    Ok(true)
}

/// fsync every file and directory under `dir`, the directories after their entries.
pub(crate) fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_data()?;
        }
    }
    shoal::fsutil::sync_dir(dir)
}
