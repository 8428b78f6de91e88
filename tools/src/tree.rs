//! Trees (descriptor format 2), per file: where each entry's bytes are (its working file
//! `OUT/.shoal-parts/<hex>-<i>.part` first, as the daemon looks, then its placed file
//! `OUT/NAME/...`), whether that file can be trusted, and which of its pieces are good.
//! Every open goes through the library's walkers (`O_NOFOLLOW` from directory descriptors), so
//! a symlink in the output tree is reported, never followed.
//!
//! Pieces are aligned to files, so a file's damage never touches another's pieces: repair
//! clears or sets bits per file, takes a damaged placed file back as its working file (as
//! `shoal recheck` does, its good pieces kept) and leaves every other file alone.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal::bitfield::Bitfield;
use shoal::metainfo::{Hash, Metainfo};
use shoal::storage::tree as tstore;
use shoal::store::{TorrentRecord, TorrentState};

use crate::verify::{FileKind, Verdict};

/// One entry of a tree, as verify found it.
#[derive(Debug, Serialize)]
pub(crate) struct FileVerdict {
    pub(crate) index: usize,
    pub(crate) path: String,
    pub(crate) data_path: String,
    pub(crate) kind: FileKind,
    pub(crate) length: u64,
    pub(crate) selected: bool,
    /// Claimed and good on disk.
    pub(crate) good: u32,
    /// Claimed but bad, claimed but absent, good but not claimed (global piece indices).
    pub(crate) bad: Vec<u32>,
    pub(crate) missing: Vec<u32>,
    pub(crate) good_unclaimed: Vec<u32>,
    /// Why this file is not trusted (nothing in it is vouched for then).
    pub(crate) untrusted: Option<String>,
    /// A placed file holding more bytes than its entry's length.
    pub(crate) extra_bytes: u64,
    /// Bytes in the file found (0 when absent or untrusted).
    #[serde(skip)]
    pub(crate) found_len: u64,
}

/// The output dir of a tree (its record's `data_path` is `OUT/NAME`).
pub(crate) fn out_dir(rec: &TorrentRecord) -> PathBuf {
    rec.data_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A file found for an entry, before hashing.
struct Found {
    kind: FileKind,
    path: PathBuf,
    file: Option<File>,
    len: u64,
    untrusted: Option<String>,
}

/// Where entry `i`'s bytes are, and whether to trust them: a working file must be the one
/// the store recorded and of the entry's length; any file must be a regular file reached
/// without a symlink.
fn find(meta: &Metainfo, rec: &TorrentRecord, i: usize) -> Found {
    let f = &meta.files[i];
    let out = out_dir(rec);
    let working = out
        .join(shoal::storage::files::PARTS_DIR)
        .join(tstore::working_name(&meta.info_hash, i));
    let final_path = f.under(&rec.data_path);
    let bad = |kind, path: PathBuf, why: String| Found {
        kind,
        path,
        file: None,
        len: 0,
        untrusted: Some(why),
    };
    match tstore::open_working_file(&out, &meta.info_hash, i, false) {
        Ok(Some((file, id))) => {
            let len = id.len;
            let why = match (
                file.metadata().map(|m| m.is_file()),
                rec.working_files.get(&(i as u32)),
            ) {
                (Ok(false), _) | (Err(_), _) => Some("not a regular file".to_string()),
                (_, None) => Some("a file the store did not record".to_string()),
                (_, Some(want)) if !want.is_same_file(&id) => Some(format!(
                    "not the working file the store recorded (device {}, inode {}; found device \
                     {}, inode {})",
                    want.dev, want.ino, id.dev, id.ino
                )),
                _ if len != f.length => Some(format!("{len} bytes, not the entry's {}", f.length)),
                _ => None,
            };
            match why {
                Some(w) => bad(
                    FileKind::Working,
                    working.clone(),
                    format!("{}: {w}", working.display()),
                ),
                None => Found {
                    kind: FileKind::Working,
                    path: working,
                    file: Some(file),
                    len,
                    untrusted: None,
                },
            }
        }
        Err(e) => bad(FileKind::Working, working, e.to_string()),
        Ok(None) => match tstore::open_final_any(&out, &meta.name, &f.path) {
            Ok(Some(file)) => match file.metadata() {
                Ok(m) if m.is_file() => Found {
                    kind: FileKind::Final,
                    path: final_path,
                    file: Some(file),
                    len: m.len(),
                    untrusted: None,
                },
                _ => {
                    let why = format!("{} is not a regular file", final_path.display());
                    bad(FileKind::Final, final_path, why)
                }
            },
            Err(e) => bad(FileKind::Final, final_path, e.to_string()),
            Ok(None) => Found {
                kind: FileKind::Absent,
                path: working,
                file: None,
                len: 0,
                untrusted: None,
            },
        },
    }
}

/// A tree's files by where their bytes are, for `inspect`.
#[derive(Debug, Serialize)]
pub(crate) struct Counts {
    pub(crate) placed: usize,
    pub(crate) working: usize,
    pub(crate) absent: usize,
    /// Empty files and folders (no bytes, no pieces).
    pub(crate) empty: usize,
    pub(crate) untrusted: usize,
    pub(crate) first_untrusted: Option<String>,
}

/// Where each file of a tree is (nothing is hashed).
pub(crate) fn counts(meta: &Metainfo, rec: &TorrentRecord) -> Counts {
    let mut c = Counts {
        placed: 0,
        working: 0,
        absent: 0,
        empty: 0,
        untrusted: 0,
        first_untrusted: None,
    };
    for (i, f) in meta.files.iter().enumerate() {
        if f.piece_count == 0 {
            c.empty += 1;
            continue;
        }
        let found = find(meta, rec, i);
        match found.kind {
            FileKind::Working => c.working += 1,
            FileKind::Absent => c.absent += 1,
            _ => c.placed += 1,
        }
        if let Some(u) = found.untrusted {
            c.untrusted += 1;
            c.first_untrusted.get_or_insert(u);
        }
    }
    c
}

/// Which pieces of entry `i` (global indices, in order) are good in `file` of `len` bytes.
fn hash_file(meta: &Metainfo, i: usize, file: &File, len: u64, done: &AtomicU64) -> Vec<bool> {
    let f = &meta.files[i];
    let mut ok = vec![false; f.piece_count as usize];
    if len == 0 {
        return ok;
    }
    let Ok(map) = shoal::storage::map_read_only(file) else {
        return ok;
    };
    let pl = u64::from(meta.piece_length);
    for (k, slot) in ok.iter_mut().enumerate() {
        let p = f.first_piece + k as u32;
        let start = k as u64 * pl;
        let end = start + u64::from(meta.piece_size(p));
        if end <= len.min(map.len() as u64) {
            let got: [u8; 32] = Sha256::digest(&map[start as usize..end as usize]).into();
            *slot = got == meta.pieces[p as usize];
            done.fetch_add(end - start, Ordering::Relaxed);
        }
    }
    ok
}

/// Verify a tree per file, hashing files on every core.
///
/// # Errors
/// The selection globs of the record do not parse (a damaged record).
pub(crate) fn verify_tree(
    meta: &Metainfo,
    claimed: &Bitfield,
    rec: &TorrentRecord,
) -> anyhow::Result<Verdict> {
    let n = meta.piece_count();
    let selected = shoal::tree::select(&meta.files, &rec.only)
        .with_context(|| format!("the record's selection {:?}", rec.only))?;
    let mut found: Vec<Option<Found>> = (0..meta.files.len())
        .map(|i| (meta.files[i].piece_count > 0).then(|| find(meta, rec, i)))
        .collect();
    // Hash on every core: files are taken in turn from a shared counter.
    let total: u64 = found.iter().flatten().map(|f| f.len).sum();
    let done = AtomicU64::new(0);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Vec<bool>>>> = Mutex::new(vec![None; found.len()]);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("template"),
        );
        b
    });
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = found.get(i) else { break };
                if let Some(Found {
                    file: Some(file),
                    len,
                    ..
                }) = slot
                {
                    let ok = hash_file(meta, i, file, *len, &done);
                    results.lock().expect("results lock")[i] = Some(ok);
                }
                if let Some(b) = &bar {
                    b.set_position(done.load(Ordering::Relaxed));
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let results = results.into_inner().expect("results lock");
    let mut ok_bits = vec![false; n as usize];
    let mut files = Vec::new();
    let mut missing_entries = Vec::new();
    for (i, f) in meta.files.iter().enumerate() {
        let Some(fd) = found[i].take() else {
            // An empty file or folder: a tree recorded complete must have it.
            if rec.state == TorrentState::Seeding && selected[i] && !empty_entry_there(meta, rec, i)
            {
                missing_entries.push(f.display());
            }
            continue;
        };
        let ok = results[i]
            .clone()
            .unwrap_or_else(|| vec![false; f.piece_count as usize]);
        let mut v = FileVerdict {
            index: i,
            path: f.display(),
            data_path: fd.path.display().to_string(),
            kind: fd.kind,
            length: f.length,
            selected: selected[i],
            good: 0,
            bad: Vec::new(),
            missing: Vec::new(),
            good_unclaimed: Vec::new(),
            extra_bytes: if fd.kind == FileKind::Final {
                fd.len.saturating_sub(f.length)
            } else {
                0
            },
            untrusted: fd.untrusted,
            found_len: fd.len,
        };
        let pl = u64::from(meta.piece_length);
        for (k, good) in ok.iter().enumerate() {
            let p = f.first_piece + k as u32;
            let present = k as u64 * pl + u64::from(meta.piece_size(p)) <= fd.len;
            ok_bits[p as usize] = *good;
            match (claimed.get(p), present, *good) {
                (true, true, true) => v.good += 1,
                (true, true, false) => v.bad.push(p),
                (true, false, _) => v.missing.push(p),
                (false, true, true) => v.good_unclaimed.push(p),
                (false, _, _) => {}
            }
        }
        files.push(v);
    }
    let untrusted = files.iter().filter(|f| f.untrusted.is_some()).count();
    Ok(Verdict {
        info_hash: meta.info_hash_hex(),
        name: meta.name.clone(),
        pieces: n,
        data_path: rec.data_path.display().to_string(),
        data_kind: FileKind::Tree,
        good: files.iter().map(|f| f.good).sum(),
        bad: files.iter().flat_map(|f| f.bad.iter().copied()).collect(),
        missing: files
            .iter()
            .flat_map(|f| f.missing.iter().copied())
            .collect(),
        good_unclaimed: files
            .iter()
            .flat_map(|f| f.good_unclaimed.iter().copied())
            .collect(),
        untrusted: (untrusted > 0).then(|| format!("{untrusted} files of the tree (see files)")),
        extra_bytes: files.iter().map(|f| f.extra_bytes).sum(),
        files,
        missing_entries,
        ok_bits,
        hash: meta.info_hash,
    })
}

/// Whether empty entry `i` (an empty file or folder) is placed, of the right kind.
fn empty_entry_there(meta: &Metainfo, rec: &TorrentRecord, i: usize) -> bool {
    let f = &meta.files[i];
    match tstore::open_final_any(&out_dir(rec), &meta.name, &f.path) {
        Ok(Some(file)) => file.metadata().is_ok_and(|m| {
            if f.dir {
                m.is_dir()
            } else {
                m.is_file() && m.len() == 0
            }
        }),
        _ => false,
    }
}

/// A placed file a repair takes back as its working file (its bad pieces are fetched again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Adopted {
    pub(crate) index: usize,
    /// Its length before the repair extended it (an undo cuts it back).
    pub(crate) old_len: u64,
}

/// What a repair of a tree changes on disk, beyond its bits and record.
pub(crate) struct TreePlan {
    out_dir: PathBuf,
    meta: Metainfo,
    /// Placed files to take back as working files.
    pub(crate) adopt: Vec<Adopted>,
    /// Entries whose files the new bits vouch for (synced before the commit).
    vouch: Vec<usize>,
}

/// Plan a tree's repair: the bits of trusted files as found, per-file records fixed, damaged
/// placed files taken back, and the state that follows. Prints every change.
pub(crate) fn plan_tree(
    v: &Verdict,
    meta: &Metainfo,
    rec: &mut TorrentRecord,
) -> (Bitfield, TreePlan) {
    let tag = &v.info_hash[..16];
    let mut bits = Bitfield::new(v.pieces);
    let mut adopt = Vec::new();
    let mut vouch = Vec::new();
    let mut notes = Vec::new();
    let mut whole = true;
    let mut placed = v.missing_entries.is_empty();
    for e in &v.missing_entries {
        println!("{tag} {e}: an empty entry of a complete tree is not there -> placed again");
    }
    for f in &v.files {
        let entry = &meta.files[f.index];
        let range = entry.first_piece..entry.first_piece + entry.piece_count;
        for i in &f.bad {
            println!(
                "{tag} piece {i} ({}): claimed but bad on disk -> bit cleared",
                f.path
            );
        }
        for i in &f.missing {
            println!(
                "{tag} piece {i} ({}): claimed but missing -> bit cleared",
                f.path
            );
        }
        if let Some(u) = &f.untrusted {
            println!("{tag} {}: untrusted ({u}) -> its bits cleared", f.path);
            notes.push(format!("{}: {u}", f.path));
            // The daemon replaces an unrecorded working file; a placed one stays for the user.
            rec.working_files.remove(&(f.index as u32));
            whole &= !f.selected;
            placed &= !f.selected;
            continue;
        }
        for i in &f.good_unclaimed {
            println!(
                "{tag} piece {i} ({}): good on disk but not claimed -> bit set",
                f.path
            );
        }
        let mut good = 0;
        for p in range.clone() {
            if v.ok_bits[p as usize] {
                bits.set(p);
                good += 1;
            }
        }
        if good > 0 {
            vouch.push(f.index);
        }
        let complete = good == entry.piece_count;
        whole &= complete || !f.selected;
        match f.kind {
            FileKind::Final if !complete => {
                println!(
                    "{tag} {}: {good} of {} pieces good -> taken back as its working file",
                    f.path, entry.piece_count
                );
                adopt.push(Adopted {
                    index: f.index,
                    old_len: f.found_len,
                });
                placed &= !f.selected;
            }
            FileKind::Absent => {
                // Nothing on disk: the daemon starts a fresh working file, with no note.
                rec.working_files.remove(&(f.index as u32));
                placed &= !f.selected;
            }
            FileKind::Working => placed &= !f.selected,
            _ => {}
        }
    }
    rec.note = (!notes.is_empty()).then(|| {
        format!(
            "shoal-tools repair: untrusted files, fetched again: {}",
            notes.join("; ")
        )
    });
    if whole && placed {
        if rec.state != TorrentState::Seeding {
            println!("{tag}: every selected file is good and placed -> marked complete (SEEDING)");
            rec.state = TorrentState::Seeding;
            rec.paused_from = None;
            rec.completed_at = Some(shoal::fsutil::unix_ms());
        }
    } else if matches!(
        rec.state,
        TorrentState::Seeding | TorrentState::NeedsRecheck | TorrentState::Failed
    ) {
        // The daemon fetches what is missing and places what is finished.
        println!(
            "{tag}: {} of {} pieces good -> DOWNLOADING",
            bits.count(),
            v.pieces
        );
        rec.state = TorrentState::Downloading;
        rec.paused_from = None;
        rec.completed_at = None;
    }
    (
        bits,
        TreePlan {
            out_dir: out_dir(rec),
            meta: meta.clone(),
            adopt,
            vouch,
        },
    )
}

/// Apply a tree's file changes durably (before its bits are committed): damaged placed files
/// renamed back to working files (extended to their length, recorded), then every file the
/// new bits vouch for synced.
///
/// # Errors
/// A rename, an extension or a sync failed.
pub(crate) fn apply_tree(p: &TreePlan, rec: &mut TorrentRecord) -> anyhow::Result<()> {
    let (meta, hash) = (&p.meta, &p.meta.info_hash);
    for a in &p.adopt {
        let f = &meta.files[a.index];
        let w = tstore::adopt_final(&p.out_dir, hash, a.index, &meta.name, &f.path)
            .with_context(|| format!("cannot take {} back", f.display()))?;
        if a.old_len < f.length {
            w.file.set_len(f.length)?;
            w.file.sync_all()?;
        }
        rec.working_files.insert(a.index as u32, w.id);
    }
    for &i in &p.vouch {
        let f = &meta.files[i];
        let file = match tstore::open_working_file(&p.out_dir, hash, i, false)? {
            Some((file, _)) => file,
            None => tstore::open_final_any(&p.out_dir, &meta.name, &f.path)?
                .with_context(|| format!("{} disappeared", f.display()))?,
        };
        file.sync_all()
            .with_context(|| format!("cannot sync {}", f.display()))?;
    }
    Ok(())
}

/// Undo the adoptions of a repair: each working file renamed back to its placed name (never
/// replacing anything) and cut back to the length it had. Safe to run again.
///
/// # Errors
/// A rename or a cut failed.
pub(crate) fn undo_adopted(
    hash: &Hash,
    meta: &Metainfo,
    rec: &TorrentRecord,
    adopted: &[Adopted],
) -> anyhow::Result<()> {
    let out = out_dir(rec);
    let mut placer = tstore::Placer::new(&out, &meta.name);
    for a in adopted {
        let f = &meta.files[a.index];
        let Some((file, _)) = tstore::open_working_file(&out, hash, a.index, true)? else {
            continue; // Not taken back, or already undone.
        };
        if tstore::open_final_any(&out, &meta.name, &f.path)?.is_some() {
            continue;
        }
        if file.metadata()?.len() > a.old_len {
            file.set_len(a.old_len)?;
            file.sync_all()?;
        }
        placer.place_file(hash, a.index, &f.path)?;
        println!(
            "{}: {} put back ({} bytes)",
            &hex::encode(hash)[..16],
            f.under(&rec.data_path).display(),
            a.old_len
        );
    }
    placer.finish()?;
    Ok(())
}
