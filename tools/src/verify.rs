//! `verify`: re-hash every piece of every torrent and sort what is found into the store's
//! claims (bad or missing claimed pieces, untrusted files: exit 1) and the normal leftovers
//! of a crash (good pieces not yet claimed). A tree is verified per file (see [`crate::tree`]).

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use shoal::bitfield::Bitfield;
use shoal::metainfo::{Hash, Metainfo};
use shoal::store::{part_path, FileId, Store, TorrentRecord};

use crate::data_dir::open_read_only;

/// Which of a torrent's possible files holds its bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FileKind {
    /// The final file (`data_path`).
    Final,
    /// The per-info-hash working file.
    Working,
    /// An old-style `NAME.part` of a store written before per-info-hash names.
    LegacyPart,
    /// No file at all (the path is where the working file would be).
    Absent,
    /// A folder tree: each file has its own kind (see `files`).
    Tree,
}

pub(crate) struct Located {
    pub(crate) path: PathBuf,
    pub(crate) kind: FileKind,
}

/// Where a torrent's bytes are: the final file when the record says it is done; else the
/// working file, an old-style `.part`, or a final file (a completion whose record was not
/// yet updated), in that order.
pub(crate) fn locate(rec: &TorrentRecord, hash: &Hash) -> Located {
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
    pub(crate) fn distrust(&self, rec: &TorrentRecord, length: u64) -> Option<String> {
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
pub(crate) struct Verdict {
    pub(crate) info_hash: String,
    pub(crate) name: String,
    pub(crate) pieces: u32,
    pub(crate) data_path: String,
    pub(crate) data_kind: FileKind,
    /// Claimed and good on disk.
    pub(crate) good: u32,
    /// Claimed, but the bytes on disk are wrong.
    pub(crate) bad: Vec<u32>,
    /// Claimed, but the file is gone or too short.
    pub(crate) missing: Vec<u32>,
    /// Not claimed, but good on disk: the normal state after a crash (written, not yet
    /// committed). Not an error.
    pub(crate) good_unclaimed: Vec<u32>,
    /// Why the data file is not trusted (nothing in it is vouched for then).
    pub(crate) untrusted: Option<String>,
    /// The final file holds more bytes than the torrent's length.
    pub(crate) extra_bytes: u64,
    /// A tree's files, one verdict each (empty for one file).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) files: Vec<crate::tree::FileVerdict>,
    /// Empty files and folders of a tree recorded complete that are not there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) missing_entries: Vec<String>,
    #[serde(skip)]
    pub(crate) ok_bits: Vec<bool>,
    #[serde(skip)]
    pub(crate) hash: Hash,
}

impl Verdict {
    /// Every claim of the store holds.
    pub(crate) fn claims_hold(&self) -> bool {
        self.bad.is_empty()
            && self.missing.is_empty()
            && self.untrusted.is_none()
            && self.extra_bytes == 0
            && self.missing_entries.is_empty()
    }
}

pub(crate) fn verify(dir: &Path, only: Option<&str>, json: bool) -> anyhow::Result<bool> {
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
        if let Some(u) = v.untrusted.as_ref().filter(|_| v.files.is_empty()) {
            println!(
                "{}: untrusted data file, nothing in it is vouched for: {u}",
                &v.info_hash[..16]
            );
        }
        if v.extra_bytes > 0 && v.files.is_empty() {
            println!(
                "{}: the final file has {} bytes past the torrent's end",
                &v.info_hash[..16],
                v.extra_bytes
            );
        }
        print_files(v);
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

/// A tree's files that need a word: damaged, untrusted, too long, or with unclaimed pieces.
fn print_files(v: &Verdict) {
    let tag = &v.info_hash[..16];
    for f in &v.files {
        if let Some(u) = &f.untrusted {
            println!(
                "{tag} {}: untrusted, nothing in it is vouched for: {u}",
                f.path
            );
        }
        if !f.bad.is_empty() || !f.missing.is_empty() {
            println!(
                "{tag} {}: bad pieces {:?}, missing pieces {:?} ({})",
                f.path, f.bad, f.missing, f.data_path
            );
        }
        if f.extra_bytes > 0 {
            println!(
                "{tag} {}: {} bytes past the entry's end ({})",
                f.path, f.extra_bytes, f.data_path
            );
        }
    }
    for e in &v.missing_entries {
        println!("{tag} {e}: the tree is recorded complete, but this empty entry is not there");
    }
}

pub(crate) fn verify_all(store: &Store, only: Option<&str>) -> anyhow::Result<Vec<Verdict>> {
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
        out.push(if meta.is_tree() {
            crate::tree::verify_tree(&meta, &claimed, &rec)?
        } else {
            verify_one(&meta, &claimed, &rec)?
        });
    }
    if let Some(o) = only {
        if out.is_empty() {
            bail!("no torrent {o} in this store");
        }
    }
    Ok(out)
}

/// Open a data file for reading, never through a symlink.
pub(crate) fn open_data(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

/// Hash every piece present in the torrent's data file on every core.
pub(crate) fn verify_one(
    meta: &Metainfo,
    claimed: &Bitfield,
    rec: &TorrentRecord,
) -> anyhow::Result<Verdict> {
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
        files: Vec::new(),
        missing_entries: Vec::new(),
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
