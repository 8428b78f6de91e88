//! A tree torrent's data, for its owner: open (per file: the placed final file, or a working
//! file), recheck, and place finished files. Blocking: call from blocking threads.
//!
//! Per file, the truth is on disk: a file whose working file is gone and whose final file is
//! there was placed (renamed after its pieces were synced), so its unclaimed pieces are
//! hashed and claimed (a cut between the rename and the store's commit); a selected file
//! without either gets a fresh working file. Files not selected and not started are not
//! opened, and nothing is created for them.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;

use super::owner::{out_dir_of, parked, Opened};
use crate::bitfield::Bitfield;
use crate::metainfo::{Hash, Metainfo};
use crate::storage::files::{self, Working};
use crate::storage::tree::{self as tstore, TreeStorage};
use crate::storage::{Storage, StorageError};
use crate::store::{TorrentRecord, TorrentState};

/// The selection of `rec` over `meta`'s entries (every entry if the globs no longer parse,
/// which cannot happen: they were checked when given).
pub fn selection(meta: &Metainfo, rec: &TorrentRecord) -> Vec<bool> {
    crate::tree::select(&meta.files, &rec.only).unwrap_or_else(|_| vec![true; meta.files.len()])
}

/// The pieces the picker leaves alone: those of unselected entries.
pub fn skip_bits(meta: &Metainfo, rec: &TorrentRecord) -> Bitfield {
    let n = meta.piece_count();
    let wanted = crate::tree::wanted_pieces(&meta.files, &selection(meta, rec), n);
    let mut skip = Bitfield::new(n);
    for i in 0..n {
        if !wanted.get(i) {
            skip.set(i);
        }
    }
    skip
}

fn hash_ok(s: &Storage, local: u32, meta: &Metainfo, global: u32, bounce: &mut [u8]) -> bool {
    s.prefetch(local);
    let ok = crate::hashing::sha256_mapped(s.piece(local), bounce) == meta.pieces[global as usize];
    s.release(local);
    ok
}

fn storage_err(hex: &str, rec: TorrentRecord, e: StorageError, bits: Bitfield) -> Opened {
    match e {
        StorageError::NoSpace { .. } => parked(
            rec,
            TorrentState::Failed,
            format!("{e}; free some space, then run `shoal recheck {hex}`"),
            bits,
        ),
        StorageError::Missing { .. } | StorageError::TooShort { .. } => parked(
            rec,
            TorrentState::NeedsRecheck,
            format!("{e}; run `shoal recheck {hex}`"),
            bits,
        ),
        e => parked(rec, TorrentState::Failed, e.to_string(), bits),
    }
}

/// Open a tree's data for a session.
pub(super) fn open_tree(
    hash: &Hash,
    meta: &Metainfo,
    mut rec: TorrentRecord,
    bits: Bitfield,
) -> Opened {
    let hex = hex::encode(hash);
    let out_dir = out_dir_of(&rec);
    let pl = meta.piece_length;
    let selected = selection(meta, &rec);
    let mut bits = bits;
    let mut parts = Vec::with_capacity(meta.files.len());
    let mut working_files = BTreeMap::new();
    let mut notes = Vec::new();
    let mut bounce = crate::hashing::bounce_buffer();
    let mut pdir = match tstore::PartsDir::open(&out_dir) {
        Ok(p) => p,
        Err(e) => return storage_err(&hex, rec, e, bits),
    };
    // Nothing placed yet (a fresh download): no need to look for each placed file.
    let root_there = std::fs::symlink_metadata(&rec.data_path).is_ok();
    for (i, f) in meta.files.iter().enumerate() {
        if f.piece_count == 0 {
            parts.push(None);
            continue;
        }
        let range = f.first_piece..f.first_piece + f.piece_count;
        if root_there && !pdir.exists(hash, i) {
            match tstore::open_final(&out_dir, &meta.name, &f.path, f.length) {
                Ok(Some(file)) => {
                    let s = match Storage::from_file(file, f.length, pl, false) {
                        Ok(s) => s,
                        Err(source) => {
                            let path = f.under(&rec.data_path).display().to_string();
                            return storage_err(&hex, rec, StorageError::Io { path, source }, bits);
                        }
                    };
                    // Placed files were synced before their rename; pieces the store does not
                    // claim yet (a cut before the commit) are claimed once they hash right.
                    for p in range.clone() {
                        if !bits.get(p) {
                            if !hash_ok(&s, p - f.first_piece, meta, p, &mut bounce) {
                                let path = f.under(&rec.data_path);
                                return parked(
                                    rec,
                                    TorrentState::NeedsRecheck,
                                    format!("{} does not match its pieces: it changed; run `shoal recheck {hex}`", path.display()),
                                    bits,
                                );
                            }
                            bits.set(p);
                        }
                    }
                    parts.push(Some(s));
                    continue;
                }
                Ok(None) => {}
                Err(e) => return storage_err(&hex, rec, e, bits),
            }
        }
        let has_any = range.clone().any(|p| bits.get(p));
        if !selected[i] && !has_any {
            parts.push(None);
            continue;
        }
        let recorded = rec.working_files.get(&(i as u32)).copied();
        let name = tstore::working_name(hash, i);
        let w: Working = match pdir.open_working(hash, i, f.length, recorded) {
            Ok(w) => w,
            Err(e) => return storage_err(&hex, rec, e, bits),
        };
        if let Some(n) = &w.note {
            range.clone().for_each(|p| {
                bits.clear(p);
            });
            notes.push(n.clone());
        } else if let Some(from) = w.lost_from {
            for p in range.clone() {
                let end =
                    u64::from(p - f.first_piece) * u64::from(pl) + u64::from(meta.piece_size(p));
                if end > from {
                    bits.clear(p);
                }
            }
            notes.push(format!("{} was cut short behind our back", f.display()));
        }
        working_files.insert(i as u32, w.id);
        match Storage::from_file(w.file, f.length, pl, true) {
            Ok(s) => parts.push(Some(s)),
            Err(source) => {
                let path = out_dir
                    .join(files::PARTS_DIR)
                    .join(name)
                    .display()
                    .to_string();
                return storage_err(&hex, rec, StorageError::Io { path, source }, bits);
            }
        }
    }
    // Claimed pieces of entries not opened cannot be served: drop their claims.
    for (f, p) in meta.files.iter().zip(&parts) {
        if p.is_none() {
            for i in f.first_piece..f.first_piece + f.piece_count {
                bits.clear(i);
            }
        }
    }
    // One fsync makes every new working file's name durable before any bit is set for it.
    if !working_files.is_empty() {
        if let Err(e) = tstore::sync_parts_dir(&out_dir) {
            return storage_err(&hex, rec, e, bits);
        }
    }
    rec.working_files = working_files.clone();
    if !notes.is_empty() {
        let more = notes.len() - 1;
        let mut n = notes.swap_remove(0);
        if more > 0 {
            n.push_str(&format!(" (and {more} more)"));
        }
        rec.note = Some(n);
    }
    let ids = (0..meta.files.len() as u32)
        .map(|i| working_files.get(&i).copied())
        .collect();
    let storage = TreeStorage::new(meta, parts).watch_working(&out_dir, hash, ids);
    if let Some(bad) = super::torrent::spot_check(&storage, meta, &bits) {
        return parked(
            rec,
            TorrentState::NeedsRecheck,
            format!("piece {bad} no longer matches its hash: the data changed; run `shoal recheck {hex}`"),
            bits,
        );
    }
    // A seeding tree whose selection grew downloads the rest.
    let skip = skip_bits(meta, &rec);
    if rec.state == TorrentState::Seeding && (0..bits.len()).any(|i| !bits.get(i) && !skip.get(i)) {
        rec.state = TorrentState::Downloading;
        rec.completed_at = None;
    }
    Opened::Session {
        storage: Arc::new(storage),
        bits,
        rec,
        working: None,
    }
}

/// Place every selected entry that is finished: files renamed in (never replacing), empty
/// files and folders created, then every touched folder fsynced once. A working file that is
/// not the one recorded (deleted or replaced behind our back) is never placed. Returns how
/// many files were renamed.
///
/// # Errors
/// A name is taken, a symlink is on the way, a working file was replaced
/// ([`StorageError::Replaced`]), or I/O errors.
pub fn place_tree(
    hash: &Hash,
    meta: &Metainfo,
    rec: &TorrentRecord,
) -> Result<usize, StorageError> {
    let out_dir = out_dir_of(rec);
    let selected = selection(meta, rec);
    let mut placer = tstore::Placer::new(&out_dir, &meta.name);
    // Every working file is checked before any is placed: one deleted or replaced behind our
    // back stops the whole placement, with nothing moved.
    let mut to_place = Vec::new();
    for (i, f) in meta.files.iter().enumerate() {
        if !selected[i] || f.piece_count == 0 {
            continue;
        }
        // A file placed by an earlier run has no working file and no record; one that had a
        // record must still be that file (or be placed already).
        let place = match rec.working_files.get(&(i as u32)) {
            Some(&want) => placer.check_working(hash, i, &f.path, want)?,
            None => placer.working_exists(hash, i),
        };
        if place {
            to_place.push(i);
        }
    }
    for &i in &to_place {
        crate::testhook::crash_point("tree-before-place");
        placer.place_file(hash, i, &meta.files[i].path)?;
    }
    for (i, f) in meta.files.iter().enumerate() {
        if selected[i] && f.piece_count == 0 {
            placer.place_empty(&f.path, f.dir)?;
        }
    }
    placer.finish()?;
    tstore::remove_parts_dir_if_empty(&out_dir);
    Ok(to_place.len())
}

/// Re-hash a stopped tree's data and return the bits and record that agree with it. Placed
/// files that no longer match go back to being working files (their good pieces kept). The
/// data is synced before the bits are returned.
///
/// # Errors
/// The data cannot be synced, or an unsafe path.
pub fn recheck_tree(
    hash: &Hash,
    meta: &Metainfo,
    mut rec: TorrentRecord,
) -> anyhow::Result<(Bitfield, TorrentRecord)> {
    let out_dir = out_dir_of(&rec);
    let pl = meta.piece_length;
    let selected = selection(meta, &rec);
    let mut bits = Bitfield::new(meta.piece_count());
    let mut bounce = crate::hashing::bounce_buffer();
    rec.note = None;
    let mut adopted = 0;
    for (i, f) in meta.files.iter().enumerate() {
        if f.piece_count == 0 {
            continue;
        }
        let mut hash_file = |file: std::fs::File, writable: bool| -> anyhow::Result<u32> {
            file.sync_all()
                .context("syncing the data before vouching for it")?;
            let s = Storage::from_file(file, f.length, pl, writable)?;
            let mut good = 0;
            for p in f.first_piece..f.first_piece + f.piece_count {
                if hash_ok(&s, p - f.first_piece, meta, p, &mut bounce) {
                    bits.set(p);
                    good += 1;
                }
            }
            Ok(good)
        };
        if !tstore::working_exists(&out_dir, hash, i) {
            if let Some(file) = tstore::open_final(&out_dir, &meta.name, &f.path, f.length)? {
                let good = hash_file(file, false)?;
                if good < f.piece_count {
                    let w = tstore::adopt_final(&out_dir, hash, i, &meta.name, &f.path)?;
                    rec.working_files.insert(i as u32, w.id);
                    adopted += 1;
                }
                continue;
            }
            if !selected[i] {
                continue;
            }
        }
        let recorded = rec.working_files.get(&(i as u32)).copied();
        let w = files::open_working_named(
            &out_dir,
            &tstore::working_name(hash, i),
            f.length,
            recorded,
            false,
        )?;
        rec.working_files.insert(i as u32, w.id);
        if w.note.is_none() {
            hash_file(w.file, true)?;
        }
    }
    if !rec.working_files.is_empty() {
        tstore::sync_parts_dir(&out_dir)?;
    }
    if adopted > 0 {
        rec.note = Some(format!(
            "{adopted} placed files had bad pieces; they are fetched again"
        ));
    }
    // Downloading until the session sees every selected piece and places the files.
    rec.state = TorrentState::Downloading;
    rec.completed_at = None;
    Ok((bits, rec))
}

/// Per entry of a tree: path, length, verified bytes, selected (for `query`).
pub fn file_states(
    meta: &Metainfo,
    rec: &TorrentRecord,
    have: impl Fn(u32) -> bool,
) -> Vec<crate::control::FileStatus> {
    if !meta.is_tree() {
        return Vec::new();
    }
    let sel = selection(meta, rec);
    meta.files
        .iter()
        .zip(sel)
        .map(|(f, selected)| crate::control::FileStatus {
            path: f.display(),
            length: f.length,
            have: (f.first_piece..f.first_piece + f.piece_count)
                .filter(|&p| have(p))
                .map(|p| u64::from(meta.piece_size(p)))
                .sum(),
            selected,
        })
        .collect()
}

/// Sync every file of a tree about to be published from `root` (the bits about to be
/// committed vouch for them).
///
/// # Errors
/// A file cannot be opened (or is a symlink) or synced.
pub fn sync_tree(meta: &Metainfo, root: &std::path::Path) -> anyhow::Result<()> {
    let out_dir = root.parent().unwrap_or(std::path::Path::new("/"));
    for f in meta.files.iter().filter(|f| !f.dir) {
        let file = tstore::open_final(out_dir, &meta.name, &f.path, f.length)?
            .ok_or_else(|| anyhow::anyhow!("{} disappeared", f.under(root).display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", f.under(root).display()))?;
    }
    Ok(())
}
