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

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use shoal::bitfield::Bitfield;
use shoal::metainfo::{Hash, Metainfo};
use shoal::store::{part_path, FileId, Store, TorrentRecord, TorrentState, STORE_DIR};

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

/// The data dir's lock, released by the kernel when the process ends.
struct DirLock(#[allow(dead_code)] File);

/// Take the lock a running daemon holds (`flock` on `daemon.lock`), or say who holds it.
fn lock(dir: &Path) -> anyhow::Result<DirLock> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = dir.join(shoal::daemon::LOCK_NAME);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let pid = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another shoal process (pid {}) is already running on {}: a daemon (stop it first: \
             `shoal peer stop --data-dir {}`) or another shoal-tools; nothing was changed",
            pid.trim(),
            dir.display(),
            dir.display()
        );
    }
    // Our pid, so whoever meets the lock next is told who holds it (the file is the lock,
    // not part of the store).
    f.set_len(0)?;
    f.write_all(std::process::id().to_string().as_bytes())?;
    Ok(DirLock(f))
}

/// Where the sled files are: `store/`, or `store.old/` left by an interrupted compaction.
fn store_source(dir: &Path) -> anyhow::Result<PathBuf> {
    for name in [STORE_DIR.to_owned(), format!("{STORE_DIR}.old")] {
        if dir.join(&name).join("conf").is_file() {
            return Ok(dir.join(name));
        }
    }
    bail!(
        "{} is not a shoal data directory (no {STORE_DIR}/ inside); nothing was changed",
        dir.display()
    )
}

/// Check DIR is a store, lock it, open it for writing.
fn open(dir: &Path) -> anyhow::Result<(DirLock, Store)> {
    store_source(dir)?;
    let lock = lock(dir)?;
    let store = Store::open(dir, false)?;
    Ok((lock, store))
}

/// A store opened from a private copy: what the read-only commands use.
struct ReadOnly {
    store: Store,
    /// The real store directory, for messages.
    path: PathBuf,
    _lock: DirLock,
    _copy: tempfile::TempDir,
}

/// Check DIR is a store, lock it (so no daemon changes it while it is copied), copy its
/// sled files to a private temporary directory (mode 0700) and open the copy.
fn open_read_only(dir: &Path) -> anyhow::Result<ReadOnly> {
    let src = store_source(dir)?;
    let lock = lock(dir)?;
    let copy = tempfile::Builder::new()
        .prefix("shoal-tools-")
        .tempdir()
        .context("cannot make a temporary directory for the store's copy")?;
    copy_tree(&src, &copy.path().join(STORE_DIR))
        .with_context(|| format!("cannot copy {}", src.display()))?;
    let store = Store::open(copy.path(), false)?;
    Ok(ReadOnly {
        store,
        path: src,
        _lock: lock,
        _copy: copy,
    })
}

/// Copy directories and regular files only: sled makes no links, so a symlink in a store is
/// something we did not create, and it is refused rather than followed.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            bail!("{} is not a regular file or directory", src.display());
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.cmd {
        Cmd::Inspect { dir, json } => inspect(&dir, json),
        Cmd::Verify {
            dir,
            info_hash,
            json,
        } => verify(&dir, info_hash.as_deref(), json),
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
    /// Why the data file is not trusted, if it is not.
    untrusted: Option<String>,
    downloaded: u64,
    uploaded: u64,
    note: Option<String>,
    scores: Vec<serde_json::Value>,
}

fn inspect(dir: &Path, json: bool) -> anyhow::Result<bool> {
    let ro = open_read_only(dir)?;
    let store = &ro.store;
    let mut out = Vec::new();
    for (hash, rec) in store.torrents()? {
        let meta = rec
            .descriptor
            .as_deref()
            .map(|d| Metainfo::from_json(d.as_bytes()));
        let (name, pieces) = match &meta {
            Some(Ok(m)) => (m.name.clone(), m.piece_count()),
            Some(Err(e)) => (format!("(damaged descriptor: {e})"), 0),
            None => ("(descriptor not fetched yet)".into(), 0),
        };
        let have = store.bitfield(&hash, pieces)?.map_or(0, |b| b.count());
        let data = locate(&rec, &hash);
        let untrusted = match &meta {
            Some(Ok(m)) => data.distrust(&rec, m.length),
            _ => None,
        };
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
            data_path: data.path.display().to_string(),
            untrusted,
            downloaded: rec.downloaded,
            uploaded: rec.uploaded,
            note: rec.note.clone(),
            scores,
        });
    }
    let size = store.size_on_disk()?;
    let path = ro.path.display().to_string();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"store": path, "store_bytes": size, "torrents": out})
            )?
        );
        return Ok(true);
    }
    println!("store {path} ({})", shoal::units::fmt_bytes(size));
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
        if let Some(u) = &t.untrusted {
            println!("    untrusted data file: {u}");
        }
        if let Some(n) = &t.note {
            println!("    note: {n}");
        }
        for s in &t.scores {
            println!("    peer {s}");
        }
    }
    Ok(true)
}

/// Which of a torrent's possible files holds its bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum FileKind {
    /// The final file (`data_path`).
    Final,
    /// The per-info-hash working file.
    Working,
    /// An old-style `NAME.part` of a store written before per-info-hash names.
    LegacyPart,
    /// No file at all (the path is where the working file would be).
    Absent,
}

struct Located {
    path: PathBuf,
    kind: FileKind,
}

/// Where a torrent's bytes are: the final file when the record says it is done; else the
/// working file, an old-style `.part`, or a final file (a completion whose record was not
/// yet updated), in that order.
fn locate(rec: &TorrentRecord, hash: &Hash) -> Located {
    let at = |path: PathBuf, kind| Located { path, kind };
    let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
    if rec.is_final() {
        return at(rec.data_path.clone(), FileKind::Final);
    }
    let working = rec.working_path_for(hash);
    let legacy = part_path(&rec.data_path);
    if exists(&working) {
        at(working, FileKind::Working)
    } else if exists(&legacy) {
        at(legacy, FileKind::LegacyPart)
    } else if exists(&rec.data_path) {
        at(rec.data_path.clone(), FileKind::Final)
    } else {
        at(working, FileKind::Absent)
    }
}

impl Located {
    /// Why the file must not be trusted: a symlink (shoal never makes one), or a working
    /// file that is not the one the store recorded or not of the torrent's length.
    fn distrust(&self, rec: &TorrentRecord, length: u64) -> Option<String> {
        let m = std::fs::symlink_metadata(&self.path).ok()?;
        if m.file_type().is_symlink() {
            return Some(format!("{} is a symlink", self.path.display()));
        }
        if !m.is_file() {
            return Some(format!("{} is not a regular file", self.path.display()));
        }
        if matches!(self.kind, FileKind::Working | FileKind::LegacyPart) {
            let found = FileId::of(&m);
            if let Some(want) = rec.working_file.filter(|w| !w.is_same_file(&found)) {
                return Some(format!(
                    "{} is not the working file the store recorded (device {}, inode {}, {} \
                     bytes; found device {}, inode {}, {} bytes)",
                    self.path.display(),
                    want.dev,
                    want.ino,
                    want.len,
                    found.dev,
                    found.ino,
                    found.len
                ));
            }
            if m.len() != length {
                return Some(format!(
                    "{} has {} bytes, not the torrent's {length}",
                    self.path.display(),
                    m.len()
                ));
            }
        }
        None
    }
}

#[derive(Debug, Serialize)]
struct Verdict {
    info_hash: String,
    name: String,
    pieces: u32,
    data_path: String,
    data_kind: FileKind,
    /// Claimed and good on disk.
    good: u32,
    /// Claimed, but the bytes on disk are wrong.
    bad: Vec<u32>,
    /// Claimed, but the file is gone or too short.
    missing: Vec<u32>,
    /// Not claimed, but good on disk: the normal state after a crash (written, not yet
    /// committed). Not an error.
    good_unclaimed: Vec<u32>,
    /// Why the data file is not trusted (nothing in it is vouched for then).
    untrusted: Option<String>,
    /// The final file holds more bytes than the torrent's length.
    extra_bytes: u64,
    #[serde(skip)]
    ok_bits: Vec<bool>,
    #[serde(skip)]
    hash: Hash,
}

impl Verdict {
    /// Every claim of the store holds.
    fn claims_hold(&self) -> bool {
        self.bad.is_empty()
            && self.missing.is_empty()
            && self.untrusted.is_none()
            && self.extra_bytes == 0
    }
}

fn verify(dir: &Path, only: Option<&str>, json: bool) -> anyhow::Result<bool> {
    let ro = open_read_only(dir)?;
    let results = verify_all(&ro.store, only)?;
    let hold = results.iter().all(Verdict::claims_hold);
    let unclaimed: usize = results.iter().map(|v| v.good_unclaimed.len()).sum();
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(hold);
    }
    for v in &results {
        println!(
            "{} {}: {} of {} pieces claimed and good; {} bad {:?}, {} missing {:?}; {} good but not yet claimed {:?} ({})",
            &v.info_hash[..16],
            v.name,
            v.good,
            v.pieces,
            v.bad.len(),
            v.bad,
            v.missing.len(),
            v.missing,
            v.good_unclaimed.len(),
            v.good_unclaimed,
            v.data_path
        );
        if let Some(u) = &v.untrusted {
            println!(
                "{}: untrusted data file, nothing in it is vouched for: {u}",
                &v.info_hash[..16]
            );
        }
        if v.extra_bytes > 0 {
            println!(
                "{}: the final file has {} bytes past the torrent's end",
                &v.info_hash[..16],
                v.extra_bytes
            );
        }
    }
    if !hold {
        println!("the store claims bad or missing data: run `shoal-tools repair`");
    } else if unclaimed > 0 {
        println!(
            "every claimed piece is good; {unclaimed} good but not yet claimed (normal after a \
             crash: the daemon fetches them again, `shoal-tools repair --apply` claims them)"
        );
    } else {
        println!("store and data agree");
    }
    Ok(hold)
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
        out.push(verify_one(&meta, &claimed, &rec)?);
    }
    if let Some(o) = only {
        if out.is_empty() {
            bail!("no torrent {o} in this store");
        }
    }
    Ok(out)
}

/// Open a data file for reading, never through a symlink.
fn open_data(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Hash every piece present in the torrent's data file on every core.
fn verify_one(meta: &Metainfo, claimed: &Bitfield, rec: &TorrentRecord) -> anyhow::Result<Verdict> {
    let n = meta.piece_count();
    let data = locate(rec, &meta.info_hash);
    let untrusted = data.distrust(rec, meta.length);
    let len = match (&untrusted, data.kind) {
        (Some(_), _) | (_, FileKind::Absent) => 0,
        _ => std::fs::symlink_metadata(&data.path).map_or(0, |m| m.len()),
    };
    let present =
        |i: u32| u64::from(i) * u64::from(meta.piece_length) + u64::from(meta.piece_size(i)) <= len;
    let good = if len > 0 {
        let file = open_data(&data.path)?;
        let map = shoal::storage::map_read_only(&file)
            .with_context(|| format!("cannot map {}", data.path.display()))?;
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
        data_path: data.path.display().to_string(),
        data_kind: data.kind,
        good: 0,
        bad: Vec::new(),
        missing: Vec::new(),
        good_unclaimed: Vec::new(),
        untrusted,
        extra_bytes: if data.kind == FileKind::Final {
            len.saturating_sub(meta.length)
        } else {
            0
        },
        ok_bits: Vec::new(),
        hash: meta.info_hash,
    };
    for i in 0..n {
        match (claimed.get(i), present(i), ok_bits[i as usize]) {
            (true, true, true) => v.good += 1,
            (true, true, false) => v.bad.push(i),
            (true, false, _) => v.missing.push(i),
            (false, true, true) => v.good_unclaimed.push(i),
            (false, _, _) => {}
        }
    }
    v.ok_bits = ok_bits;
    Ok(v)
}

/// What a repair changes of one torrent, to undo it. The whole journal is durable before the
/// first change, so it names changes that may not have happened: undo checks each.
#[derive(Serialize, Deserialize)]
struct UndoEntry {
    info_hash: String,
    old_bits_hex: String,
    old_record: TorrentRecord,
    /// (from, to) of a rename the repair makes.
    renamed: Option<(PathBuf, PathBuf)>,
    /// The renamed file's length before the repair extended it.
    #[serde(default)]
    old_len: Option<u64>,
}

/// One torrent's repair, planned before anything is written.
struct Plan {
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
    undo: UndoEntry,
}

fn plan_one(store: &Store, v: &Verdict) -> anyhow::Result<Option<Plan>> {
    let mut rec = store.get_torrent(&v.hash)?.context("torrent vanished")?;
    let meta = Metainfo::from_json(rec.descriptor.as_deref().unwrap_or_default().as_bytes())?;
    let old_bits = store
        .bitfield(&v.hash, v.pieces)?
        .unwrap_or_else(|| Bitfield::new(v.pieces));
    let old_record = rec.clone();
    let tag = &v.info_hash[..16];
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
        },
    }))
}

fn repair(dir: &Path, only: Option<&str>, apply: bool) -> anyhow::Result<bool> {
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
fn apply_plan(store: &Store, mut p: Plan) -> anyhow::Result<()> {
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
fn rename_no_replace(from: &Path, to: &Path) -> anyhow::Result<()> {
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

fn sync_parent(p: &Path) -> anyhow::Result<()> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    shoal::fsutil::sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))
}

fn undo(dir: &Path, file: &Path) -> anyhow::Result<bool> {
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
fn sync_tree(dir: &Path) -> std::io::Result<()> {
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
