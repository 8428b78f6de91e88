//! `shoal-tools`: offline verify, repair, inspect and compact of a stopped peer's data dir.
//!
//! Every command first checks that DIR is a shoal store (nothing is written otherwise), then
//! takes the data dir's lock, the same one a running daemon holds: a tool never opens a store
//! behind a daemon's back, and a daemon cannot start while a tool works.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use shoal::bitfield::Bitfield;
use shoal::metainfo::{Hash, Metainfo};
use shoal::store::{part_path, Store, TorrentRecord, TorrentState, STORE_DIR};

#[derive(Parser)]
#[command(
    name = "shoal-tools",
    version,
    about = "Offline verify, repair, inspect and compact of a shoal peer's data dir"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Torrents, states, have/total, data paths, store size, scores.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every piece, claimed or not; exit 0 only if the store and the data agree.
    Verify {
        dir: PathBuf,
        info_hash: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make the store agree with the data (a dry run unless --apply); writes an undo file.
    Repair {
        dir: PathBuf,
        info_hash: Option<String>,
        #[arg(long)]
        apply: bool,
    },
    /// Undo a repair from the undo file it wrote.
    Undo { dir: PathBuf, file: PathBuf },
    /// Reclaim the store's space (a fresh copy swapped in; safe to interrupt).
    Compact { dir: PathBuf },
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

/// Check DIR is a store, lock it, open it.
fn open(dir: &Path) -> anyhow::Result<(shoal::daemon::DirLock, Store)> {
    if !dir.join(STORE_DIR).join("conf").exists() {
        bail!(
            "{} is not a shoal data directory (no {STORE_DIR}/ inside); nothing was changed",
            dir.display()
        );
    }
    let lock = shoal::daemon::lock_data_dir(dir)?;
    let store = Store::open(dir, false)?;
    Ok((lock, store))
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Inspect { dir, json } => inspect(&dir, json),
        Cmd::Verify {
            dir,
            info_hash,
            json,
        } => {
            let (_lock, store) = open(&dir)?;
            let results = verify_all(&store, info_hash.as_deref())?;
            let agree = results.iter().all(Verdict::agrees);
            if json {
                println!("{}", serde_json::to_string_pretty(&results)?);
            } else {
                for v in &results {
                    println!(
                        "{} {}: {} good, {} bad {:?}, {} missing {:?}, {} rescued {:?} of {} pieces ({})",
                        &v.info_hash[..16],
                        v.name,
                        v.good,
                        v.bad.len(),
                        v.bad,
                        v.missing.len(),
                        v.missing,
                        v.rescued.len(),
                        v.rescued,
                        v.pieces,
                        v.data_path
                    );
                }
                println!(
                    "{}",
                    if agree {
                        "store and data agree"
                    } else {
                        "store and data DISAGREE: run `shoal-tools repair`"
                    }
                );
            }
            Ok(agree)
        }
        Cmd::Repair {
            dir,
            info_hash,
            apply,
        } => repair(&dir, info_hash.as_deref(), apply),
        Cmd::Undo { dir, file } => undo(&dir, &file),
        Cmd::Compact { dir } => compact(&dir),
    }
}

#[derive(Serialize)]
struct InspectTorrent {
    info_hash: String,
    name: String,
    state: String,
    have: u32,
    pieces: u32,
    data_path: String,
    downloaded: u64,
    uploaded: u64,
    note: Option<String>,
    scores: Vec<serde_json::Value>,
}

fn inspect(dir: &Path, json: bool) -> anyhow::Result<bool> {
    let (_lock, store) = open(dir)?;
    let mut out = Vec::new();
    for (hash, rec) in store.torrents()? {
        let (name, pieces) = match rec
            .descriptor
            .as_deref()
            .map(|d| Metainfo::from_json(d.as_bytes()))
        {
            Some(Ok(m)) => (m.name.clone(), m.piece_count()),
            Some(Err(e)) => (format!("(damaged descriptor: {e})"), 0),
            None => ("(descriptor not fetched yet)".into(), 0),
        };
        let have = store.bitfield(&hash, pieces)?.map_or(0, |b| b.count());
        let scores = store
            .scores(&hash)?
            .into_iter()
            .map(|(id, s)| {
                serde_json::json!({"peer_id": id, "addr": s.addr, "pieces_from": s.pieces_from,
                "pieces_to": s.pieces_to, "failures": s.failures, "latency_ms": s.latency_ms,
                "banned_until": (s.banned_until > 0).then_some(s.banned_until)})
            })
            .collect();
        out.push(InspectTorrent {
            info_hash: hex::encode(hash),
            name,
            state: rec.state.label().into(),
            have,
            pieces,
            data_path: rec.working_path_for(&hash).display().to_string(),
            downloaded: rec.downloaded,
            uploaded: rec.uploaded,
            note: rec.note.clone(),
            scores,
        });
    }
    let size = store.size_on_disk()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"store": store.path(), "store_bytes": size, "torrents": out})
            )?
        );
        return Ok(true);
    }
    println!("store {} ({})", store.path(), shoal::units::fmt_bytes(size));
    for t in &out {
        println!(
            "{}  {:<24} {:<14} {:>6}/{:<6} {}",
            &t.info_hash[..16],
            t.name,
            t.state,
            t.have,
            t.pieces,
            t.data_path
        );
        if let Some(n) = &t.note {
            println!("    note: {n}");
        }
        for s in &t.scores {
            println!("    peer {}", s);
        }
    }
    Ok(true)
}

#[derive(Debug, Serialize)]
struct Verdict {
    info_hash: String,
    name: String,
    pieces: u32,
    data_path: String,
    good: u32,
    /// Claimed, but the bytes on disk are wrong.
    bad: Vec<u32>,
    /// Claimed, but the file is gone or too short.
    missing: Vec<u32>,
    /// Not claimed, but correct on disk.
    rescued: Vec<u32>,
    #[serde(skip)]
    ok_bits: Vec<bool>,
    #[serde(skip)]
    hash: Hash,
}

impl Verdict {
    fn agrees(&self) -> bool {
        self.bad.is_empty() && self.missing.is_empty() && self.rescued.is_empty()
    }
}

/// Where a torrent's bytes are now: the final file, else the `.part`.
fn data_file(rec: &TorrentRecord) -> PathBuf {
    let part = part_path(&rec.data_path);
    match rec.state {
        TorrentState::Seeding if rec.data_path.exists() => rec.data_path.clone(),
        _ if part.exists() => part,
        _ => rec.data_path.clone(),
    }
}

fn verify_all(store: &Store, only: Option<&str>) -> anyhow::Result<Vec<Verdict>> {
    let mut out = Vec::new();
    for (hash, rec) in store.torrents()? {
        if only.is_some_and(|o| !o.eq_ignore_ascii_case(&hex::encode(hash))) {
            continue;
        }
        let Some(desc) = rec.descriptor.as_deref() else {
            continue; // Nothing to verify before the descriptor is known.
        };
        let meta = Metainfo::from_json(desc.as_bytes())
            .with_context(|| format!("torrent {}", hex::encode(hash)))?;
        let claimed = store
            .bitfield(&hash, meta.piece_count())?
            .unwrap_or_else(|| Bitfield::new(meta.piece_count()));
        out.push(verify_one(&meta, &claimed, &data_file(&rec))?);
    }
    if let Some(o) = only {
        if out.is_empty() {
            bail!("no torrent {o} in this store");
        }
    }
    Ok(out)
}

/// Hash every piece present in `path` on both cores.
fn verify_one(meta: &Metainfo, claimed: &Bitfield, path: &Path) -> anyhow::Result<Verdict> {
    let n = meta.piece_count();
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let present =
        |i: u32| u64::from(i) * u64::from(meta.piece_length) + u64::from(meta.piece_size(i)) <= len;
    let good = if len > 0 {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let map = shoal::storage::map_read_only(&file)
            .with_context(|| format!("cannot map {}", path.display()))?;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(len.min(meta.length));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("template"),
            );
            b
        });
        let good = shoal::hashing::hash_pieces(&map, meta, &|done| {
            if let Some(b) = &bar {
                b.set_position(done);
            }
        });
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        good
    } else {
        Bitfield::new(n)
    };
    let ok_bits: Vec<bool> = (0..n).map(|i| good.get(i)).collect();
    let mut v = Verdict {
        info_hash: meta.info_hash_hex(),
        name: meta.name.clone(),
        pieces: n,
        data_path: path.display().to_string(),
        good: 0,
        bad: Vec::new(),
        missing: Vec::new(),
        rescued: Vec::new(),
        ok_bits: Vec::new(),
        hash: meta.info_hash,
    };
    for i in 0..n {
        match (claimed.get(i), present(i), ok_bits[i as usize]) {
            (true, true, true) => v.good += 1,
            (true, true, false) => v.bad.push(i),
            (true, false, _) => v.missing.push(i),
            (false, true, true) => v.rescued.push(i),
            (false, _, _) => {}
        }
    }
    v.ok_bits = ok_bits;
    Ok(v)
}

/// What a repair changed, to undo it.
#[derive(Serialize, Deserialize)]
struct UndoEntry {
    info_hash: String,
    old_bits_hex: String,
    old_record: TorrentRecord,
    /// (from, to) of a rename the repair made.
    renamed: Option<(PathBuf, PathBuf)>,
}

fn repair(dir: &Path, only: Option<&str>, apply: bool) -> anyhow::Result<bool> {
    let (_lock, store) = open(dir)?;
    let verdicts = verify_all(&store, only)?;
    let mut undo = Vec::new();
    let mut changed = false;
    for v in &verdicts {
        let mut rec = store.get_torrent(&v.hash)?.context("torrent vanished")?;
        let meta = Metainfo::from_json(rec.descriptor.as_deref().unwrap_or_default().as_bytes())?;
        let old_bits = store
            .bitfield(&v.hash, v.pieces)?
            .unwrap_or_else(|| Bitfield::new(v.pieces));
        let mut bits = Bitfield::new(v.pieces);
        for (i, ok) in v.ok_bits.iter().enumerate() {
            if *ok {
                bits.set(i as u32);
            }
        }
        let tag = &v.info_hash[..16];
        for i in &v.bad {
            println!("{tag} piece {i}: claimed but bad on disk -> bit cleared");
        }
        for i in &v.missing {
            println!("{tag} piece {i}: claimed but missing (file gone or short) -> bit cleared");
        }
        for i in &v.rescued {
            println!("{tag} piece {i}: correct on disk but not claimed -> bit set");
        }
        let old_record = rec.clone();
        let data = PathBuf::from(&v.data_path);
        let part = part_path(&rec.data_path);
        let mut renamed = None;
        let mut file_actions = Vec::new();
        if bits.is_complete() {
            if data == part {
                file_actions.push(format!(
                    "rename {} -> {}",
                    part.display(),
                    rec.data_path.display()
                ));
                renamed = Some((part.clone(), rec.data_path.clone()));
            }
            if rec.state != TorrentState::Seeding {
                println!("{tag}: every piece is good -> marked complete (SEEDING)");
                rec.state = TorrentState::Seeding;
                rec.completed_at = Some(shoal::fsutil::unix_ms());
            }
        } else {
            if data == rec.data_path && data.exists() {
                file_actions.push(format!("rename {} -> {}", data.display(), part.display()));
                renamed = Some((data.clone(), part.clone()));
            }
            let len = std::fs::metadata(&data).map_or(0, |m| m.len());
            if !data.exists() {
                file_actions.push(format!(
                    "create {} at {} bytes",
                    part.display(),
                    meta.length
                ));
            } else if len < meta.length {
                file_actions.push(format!(
                    "extend {} from {len} to {} bytes",
                    part.display(),
                    meta.length
                ));
            }
            if matches!(
                rec.state,
                TorrentState::Seeding | TorrentState::NeedsRecheck | TorrentState::Failed
            ) {
                println!(
                    "{tag}: {} of {} pieces good -> DOWNLOADING",
                    bits.count(),
                    v.pieces
                );
                rec.state = TorrentState::Downloading;
                rec.completed_at = None;
            }
        }
        for a in &file_actions {
            println!("{tag}: {a}");
        }
        rec.note = None;
        let differs = bits != old_bits || rec != old_record || !file_actions.is_empty();
        if !differs {
            continue;
        }
        changed = true;
        if apply {
            if let Some((from, to)) = &renamed {
                std::fs::rename(from, to).with_context(|| {
                    format!("cannot rename {} to {}", from.display(), to.display())
                })?;
            }
            if !bits.is_complete() {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&part)
                    .with_context(|| format!("cannot open {}", part.display()))?;
                if f.metadata()?.len() < meta.length {
                    f.set_len(meta.length)?;
                }
                f.sync_all()?;
            }
            store.commit_progress(&v.hash, &bits, &rec)?;
        }
        undo.push(UndoEntry {
            info_hash: v.info_hash.clone(),
            old_bits_hex: hex::encode(old_bits.as_bytes()),
            old_record,
            renamed,
        });
    }
    if !changed {
        println!("nothing to repair: store and data agree");
        return Ok(true);
    }
    if apply {
        let path = dir.join(format!("repair-undo-{}.json", shoal::fsutil::unix_ms()));
        shoal::fsutil::write_atomic(&path, &serde_json::to_vec_pretty(&undo)?)?;
        println!(
            "repaired; to undo: shoal-tools undo {} {}",
            dir.display(),
            path.display()
        );
    } else {
        println!("dry run: nothing was written; run again with --apply");
    }
    Ok(true)
}

fn undo(dir: &Path, file: &Path) -> anyhow::Result<bool> {
    let (_lock, store) = open(dir)?;
    let entries: Vec<UndoEntry> = serde_json::from_slice(
        &std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
    )
    .with_context(|| format!("{} is not a repair undo file", file.display()))?;
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
            .context("bad bitfield in undo file")?;
        if let Some((from, to)) = &e.renamed {
            std::fs::rename(to, from)?;
            println!(
                "{}: renamed {} back to {}",
                &e.info_hash[..16],
                to.display(),
                from.display()
            );
        }
        store.commit_progress(&hash, &bits, &e.old_record)?;
        println!("{}: bitfield and record restored", &e.info_hash[..16]);
    }
    Ok(true)
}

fn compact(dir: &Path) -> anyhow::Result<bool> {
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
