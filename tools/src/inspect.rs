//! `inspect`: torrents, states, have/total, data files, store size, scores.

use std::path::Path;

use serde::Serialize;
use shoal::metainfo::Metainfo;

use crate::data_dir::open_read_only;
use crate::verify::locate;

#[derive(Serialize)]
pub(crate) struct InspectTorrent {
    info_hash: String,
    name: String,
    state: String,
    have: u32,
    pieces: u32,
    data_path: String,
    /// Why the data file is not trusted, if it is not (a tree: its first untrusted file).
    untrusted: Option<String>,
    /// A tree's files by where their bytes are.
    #[serde(skip_serializing_if = "Option::is_none")]
    files: Option<crate::tree::Counts>,
    downloaded: u64,
    uploaded: u64,
    note: Option<String>,
    scores: Vec<serde_json::Value>,
}

pub(crate) fn inspect(dir: &Path, json: bool) -> anyhow::Result<bool> {
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
        let (data_path, untrusted, files) = match &meta {
            Some(Ok(m)) if m.is_tree() => {
                let c = crate::tree::counts(m, &rec);
                let u = c.first_untrusted.clone();
                (rec.data_path.display().to_string(), u, Some(c))
            }
            Some(Ok(m)) => {
                let data = locate(&rec, &hash);
                let u = data.distrust(&rec, m.length);
                (data.path.display().to_string(), u, None)
            }
            _ => (locate(&rec, &hash).path.display().to_string(), None, None),
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
            data_path,
            untrusted,
            files,
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
        if let Some(c) = &t.files {
            println!(
                "    files: {} placed, {} working, {} not started, {} empty entries; {} untrusted",
                c.placed, c.working, c.absent, c.empty, c.untrusted
            );
        }
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
