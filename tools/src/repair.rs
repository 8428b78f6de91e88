//! `repair` and `undo`: make the store agree with the data (claim good pieces, drop bad
//! ones, rename a finished working file), with an undo journal written before the first
//! change. A tree is repaired per file (see [`crate::tree`]).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shoal::bitfield::Bitfield;
use shoal::metainfo::{Hash, Metainfo};
use shoal::store::{FileId, Store, TorrentRecord, TorrentState};

use crate::data_dir::open;
use crate::verify::{open_data, verify_all, FileKind, Verdict};

/// What a repair changes of one torrent, to undo it. The whole journal is durable before the
/// first change, so it names changes that may not have happened: undo checks each.
#[derive(Serialize, Deserialize)]
pub(crate) struct UndoEntry {
    info_hash: String,
    old_bits_hex: String,
    old_record: TorrentRecord,
    /// (from, to) of a rename the repair makes.
    renamed: Option<(PathBuf, PathBuf)>,
    /// The renamed file's length before the repair extended it.
    #[serde(default)]
    old_len: Option<u64>,
    /// A tree's placed files taken back as working files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    adopted: Vec<crate::tree::Adopted>,
}

/// One torrent's repair, planned before anything is written.
pub(crate) struct Plan {
    hash: Hash,
    bits: Bitfield,
    rec: TorrentRecord,
    length: u64,
    /// The file whose bytes the new bits vouch for (synced before the commit).
    data: Option<PathBuf>,
    renamed: Option<(PathBuf, PathBuf)>,
    /// Create the working file at full length (it is absent).
    create: Option<PathBuf>,
    /// The renamed file is short: extend it to the torrent's length (the daemon fills it).
    extend: bool,
    /// A tree's file changes (then `data`, `renamed` and `create` are unused).
    tree: Option<crate::tree::TreePlan>,
    undo: UndoEntry,
}

pub(crate) fn plan_one(store: &Store, v: &Verdict) -> anyhow::Result<Option<Plan>> {
    let mut rec = store.get_torrent(&v.hash)?.context("torrent vanished")?;
    let meta = Metainfo::from_json(rec.descriptor.as_deref().unwrap_or_default().as_bytes())?;
    let old_bits = store
        .bitfield(&v.hash, v.pieces)?
        .unwrap_or_else(|| Bitfield::new(v.pieces));
    let old_record = rec.clone();
    let tag = &v.info_hash[..16];
    if meta.is_tree() {
        return Ok(plan_tree(v, &meta, rec, old_bits, old_record));
    }
    if v.extra_bytes > 0 && v.untrusted.is_none() {
        // Cutting a user's file is not for a tool to decide.
        println!(
            "{tag}: {} has {} bytes past the torrent's end: left as it is (truncate it to {} \
             bytes by hand if it is the right file, then repair again)",
            v.data_path, v.extra_bytes, meta.length
        );
        return Ok(None);
    }
    let mut bits = Bitfield::new(v.pieces);
    if let Some(u) = &v.untrusted {
        // Never vouch for a file we cannot tell is ours: every claim goes, the file stays
        // for the daemon to re-create, with a note.
        println!("{tag}: untrusted data file ({u}) -> every bit cleared");
        rec.note = Some(format!(
            "shoal-tools repair: untrusted data file, every piece is fetched again: {u}"
        ));
    } else {
        for (i, ok) in v.ok_bits.iter().enumerate() {
            if *ok {
                bits.set(u32::try_from(i)?);
            }
        }
        rec.note = None;
    }
    for i in &v.bad {
        println!("{tag} piece {i}: claimed but bad on disk -> bit cleared");
    }
    for i in &v.missing {
        println!("{tag} piece {i}: claimed but missing (file gone or short) -> bit cleared");
    }
    if v.untrusted.is_none() {
        for i in &v.good_unclaimed {
            println!("{tag} piece {i}: good on disk but not claimed -> bit set");
        }
    }
    let data = PathBuf::from(&v.data_path);
    // The working name whatever the state (a seeding record names its final file).
    let working = shoal::storage::files::working_path(
        rec.data_path.parent().unwrap_or(Path::new(".")),
        &v.hash,
    );
    let mut renamed = None;
    let mut create = None;
    let mut extend = false;
    let mut old_len = None;
    if v.untrusted.is_some() {
        if rec.state == TorrentState::Seeding {
            rec.state = TorrentState::Downloading;
            rec.completed_at = None;
        }
    } else if bits.is_complete() && v.extra_bytes == 0 {
        if v.data_kind != FileKind::Final {
            println!(
                "{tag}: rename {} -> {}",
                data.display(),
                rec.data_path.display()
            );
            renamed = Some((data.clone(), rec.data_path.clone()));
        }
        if rec.state != TorrentState::Seeding {
            println!("{tag}: every piece is good -> marked complete (SEEDING)");
            rec.state = TorrentState::Seeding;
            rec.paused_from = None;
            rec.completed_at = Some(shoal::fsutil::unix_ms());
        }
        rec.working_file = None;
    } else {
        if v.data_kind == FileKind::Final {
            // Not whole: it goes back to being a download, under the working name (the daemon
            // fills it in place).
            println!("{tag}: rename {} -> {}", data.display(), working.display());
            renamed = Some((data.clone(), working.clone()));
            let len = std::fs::symlink_metadata(&data).map_or(0, |m| m.len());
            if len < meta.length {
                println!("{tag}: extend it from {len} to {} bytes", meta.length);
                extend = true;
                old_len = Some(len);
            }
        } else if v.data_kind == FileKind::Absent {
            println!(
                "{tag}: create {} at {} bytes",
                working.display(),
                meta.length
            );
            create = Some(working.clone());
        }
        if matches!(
            rec.state,
            TorrentState::Seeding | TorrentState::NeedsRecheck | TorrentState::Failed
        ) || rec.is_final()
        {
            println!(
                "{tag}: {} of {} pieces good -> DOWNLOADING",
                bits.count(),
                v.pieces
            );
            rec.state = TorrentState::Downloading;
            rec.paused_from = None;
            rec.completed_at = None;
        }
    }
    if bits == old_bits && rec == old_record && renamed.is_none() && create.is_none() {
        return Ok(None);
    }
    Ok(Some(Plan {
        hash: v.hash,
        data: (v.untrusted.is_none() && bits.count() > 0).then_some(data),
        bits,
        rec,
        length: meta.length,
        renamed: renamed.clone(),
        create,
        extend,
        undo: UndoEntry {
            info_hash: v.info_hash.clone(),
            old_bits_hex: hex::encode(old_bits.as_bytes()),
            old_record,
            renamed,
            old_len,
            adopted: Vec::new(),
        },
        tree: None,
    }))
}

/// A tree's repair, per file (see [`crate::tree`]).
fn plan_tree(
    v: &Verdict,
    meta: &Metainfo,
    mut rec: TorrentRecord,
    old_bits: Bitfield,
    old_record: TorrentRecord,
) -> Option<Plan> {
    let tag = &v.info_hash[..16];
    if let Some(f) = v.files.iter().find(|f| f.extra_bytes > 0) {
        // Cutting a user's file is not for a tool to decide.
        println!(
            "{tag}: {} has {} bytes past its end: left as it is (truncate it to {} bytes by \
             hand if it is the right file, then repair again)",
            f.data_path, f.extra_bytes, f.length
        );
        return None;
    }
    let (bits, tp) = crate::tree::plan_tree(v, meta, &mut rec);
    if bits == old_bits && rec == old_record && tp.adopt.is_empty() {
        return None;
    }
    Some(Plan {
        hash: v.hash,
        data: None,
        bits,
        rec,
        length: meta.length,
        renamed: None,
        create: None,
        extend: false,
        undo: UndoEntry {
            info_hash: v.info_hash.clone(),
            old_bits_hex: hex::encode(old_bits.as_bytes()),
            old_record,
            renamed: None,
            old_len: None,
            adopted: tp.adopt.clone(),
        },
        tree: Some(tp),
    })
}

pub(crate) fn repair(dir: &Path, only: Option<&str>, apply: bool) -> anyhow::Result<bool> {
    let (_lock, store) = open(dir)?;
    let verdicts = verify_all(&store, only)?;
    let mut plans = Vec::new();
    for v in &verdicts {
        plans.extend(plan_one(&store, v)?);
    }
    if plans.is_empty() {
        if verdicts.iter().all(Verdict::claims_hold) {
            println!("nothing to repair: store and data agree");
            return Ok(true);
        }
        println!("nothing repair can change: see above");
        return Ok(false);
    }
    if !apply {
        println!("dry run: nothing was written; run again with --apply");
        return Ok(true);
    }
    // The journal is durable (file and directory synced) before the first change, so a
    // crash anywhere below leaves a journal that restores the state found here.
    let journal = dir.join(format!("repair-undo-{}.json", shoal::fsutil::unix_ms()));
    let entries: Vec<&UndoEntry> = plans.iter().map(|p| &p.undo).collect();
    shoal::fsutil::write_atomic(&journal, &serde_json::to_vec_pretty(&entries)?)
        .with_context(|| format!("cannot write the undo journal {}", journal.display()))?;
    println!(
        "undo journal: {} (to undo: shoal-tools undo {} {})",
        journal.display(),
        dir.display(),
        journal.display()
    );
    shoal::testhook::crash_point("repair-after-journal");
    for p in plans {
        apply_plan(&store, p)?;
    }
    println!("repaired");
    Ok(true)
}

/// Make one torrent's file changes durable, then commit its bits and record.
pub(crate) fn apply_plan(store: &Store, mut p: Plan) -> anyhow::Result<()> {
    if let Some(tp) = &p.tree {
        crate::tree::apply_tree(tp, &mut p.rec)?;
        store.commit_progress(&p.hash, &p.bits, &p.rec)?;
        return Ok(());
    }
    let mut vouched = p.data.clone();
    if let Some((from, to)) = &p.renamed {
        rename_no_replace(from, to)?;
        if vouched.as_ref() == Some(from) {
            vouched = Some(to.clone());
        }
        if p.extend {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(to)
                .with_context(|| format!("cannot open {}", to.display()))?;
            f.set_len(p.length)?;
            f.sync_all()?;
        }
    }
    if let Some(path) = &p.create {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.set_len(p.length)?;
        f.sync_all()?;
        sync_parent(path)?;
        p.rec.working_file = Some(FileId::of(&f.metadata()?));
    } else if let (Some((_, to)), false) = (&p.renamed, p.rec.is_final()) {
        p.rec.working_file = Some(FileId::of(&std::fs::symlink_metadata(to)?));
    }
    // The bytes the new bits vouch for reach the disk before the bits do.
    if let Some(path) = &vouched {
        open_data(path)?
            .sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))?;
    }
    store.commit_progress(&p.hash, &p.bits, &p.rec)?;
    Ok(())
}

/// Rename without ever replacing a file, and make the rename durable.
pub(crate) fn rename_no_replace(from: &Path, to: &Path) -> anyhow::Result<()> {
    // The data dir is locked and the daemon stopped: nothing of ours races this check.
    if std::fs::symlink_metadata(to).is_ok() {
        bail!(
            "cannot rename {} to {}: it exists (nothing is replaced)",
            from.display(),
            to.display()
        );
    }
    if let Some(dir) = to.parent().filter(|d| !d.exists()) {
        // The daemon's working files live in their own directory.
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        sync_parent(dir)?;
    }
    std::fs::rename(from, to)
        .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    sync_parent(to)?;
    if from.parent() != to.parent() {
        sync_parent(from)?;
    }
    Ok(())
}

pub(crate) fn sync_parent(p: &Path) -> anyhow::Result<()> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    shoal::fsutil::sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))
}

pub(crate) fn undo(dir: &Path, file: &Path) -> anyhow::Result<bool> {
    let (_lock, store) = open(dir)?;
    let entries: Vec<UndoEntry> = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| format!("{} is not a repair undo journal", file.display()))?;
    for e in entries {
        let hash: Hash = hex::decode(&e.info_hash)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad info hash"))?;
        let meta = Metainfo::from_json(
            e.old_record
                .descriptor
                .as_deref()
                .unwrap_or_default()
                .as_bytes(),
        )?;
        let bits = Bitfield::from_bytes(&hex::decode(&e.old_bits_hex)?, meta.piece_count())
            .context("bad bitfield in undo journal")?;
        if !e.adopted.is_empty() {
            crate::tree::undo_adopted(&hash, &meta, &e.old_record, &e.adopted)?;
        }
        if let Some((from, to)) = &e.renamed {
            // The repair may have stopped before this rename (or an earlier undo after it).
            let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
            if exists(to) && !exists(from) {
                rename_no_replace(to, from)?;
                println!(
                    "{}: renamed {} back to {}",
                    &e.info_hash[..16],
                    to.display(),
                    from.display()
                );
            }
            if let Some(len) = e.old_len {
                // Only the zeros the repair added go: the length it found comes back.
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(from)
                    .with_context(|| format!("cannot open {}", from.display()))?;
                if f.metadata()?.len() > len {
                    f.set_len(len)?;
                    f.sync_all()?;
                    println!(
                        "{}: {} cut back to {len} bytes",
                        &e.info_hash[..16],
                        from.display()
                    );
                }
            }
        }
        store.commit_progress(&hash, &bits, &e.old_record)?;
        println!("{}: bitfield and record restored", &e.info_hash[..16]);
    }
    Ok(true)
}
