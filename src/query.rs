//! `shoal query`: read-only SQL over a snapshot of the daemon's live state.
//!
//! Each query loads a consistent snapshot (taken under the torrents' locks by `status`) into a
//! fresh in-memory SQLite database and runs the statement there, so a query can never touch
//! the daemon's real state. An authorizer allows reading and functions only: writes, ATTACH,
//! PRAGMA and the rest are refused; a query running past [`QUERY_TIMEOUT`] is interrupted.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{params, types::ValueRef, Connection};

use crate::control::StatusReport;

pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The tables, for the README and `shoal query --help`.
pub const SCHEMA: &str = "
CREATE TABLE torrents (info_hash TEXT PRIMARY KEY, name TEXT, length INTEGER, piece_length INTEGER,
  pieces INTEGER, have INTEGER, state TEXT, progress REAL, downloaded INTEGER, uploaded INTEGER,
  down_rate REAL, up_rate REAL, added_at INTEGER, completed_at INTEGER, data_path TEXT);
CREATE TABLE pieces (info_hash TEXT, idx INTEGER, have INTEGER, availability INTEGER, in_flight INTEGER,
  PRIMARY KEY (info_hash, idx));
CREATE TABLE peers (info_hash TEXT, peer_id TEXT, addr TEXT, port INTEGER, connected INTEGER,
  latency_ms REAL, score REAL, pieces_from INTEGER, pieces_to INTEGER, bytes_from INTEGER,
  bytes_to INTEGER, failures INTEGER, banned_until INTEGER);
CREATE TABLE files (info_hash TEXT, idx INTEGER, path TEXT, length INTEGER, have INTEGER,
  selected INTEGER, PRIMARY KEY (info_hash, idx));
CREATE TABLE trackers (addr TEXT PRIMARY KEY, reachable INTEGER, last_ok INTEGER, last_error TEXT,
  failures INTEGER);
";

fn load(conn: &mut Connection, r: &StatusReport) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let tx = conn.transaction()?;
    {
        let mut t = tx.prepare(
            "INSERT INTO torrents VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)",
        )?;
        let mut p = tx.prepare("INSERT INTO pieces VALUES (?1,?2,?3,?4,?5)")?;
        let mut fi = tx.prepare("INSERT INTO files VALUES (?1,?2,?3,?4,?5,?6)")?;
        let mut pe =
            tx.prepare("INSERT INTO peers VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)")?;
        for x in &r.torrents {
            t.execute(params![
                x.info_hash,
                x.name,
                x.length,
                x.piece_length,
                x.pieces,
                x.have,
                x.state,
                x.progress,
                x.downloaded,
                x.uploaded,
                x.down_rate,
                x.up_rate,
                x.added_at,
                x.completed_at,
                x.data_path
            ])?;
            for (i, (have, avail, inflight)) in x.piece_states.iter().enumerate() {
                p.execute(params![x.info_hash, i as i64, have, avail, inflight])?;
            }
            for (i, f) in x.files.iter().enumerate() {
                fi.execute(params![
                    x.info_hash,
                    i as i64,
                    f.path,
                    f.length,
                    f.have,
                    f.selected
                ])?;
            }
            for q in &x.peers {
                pe.execute(params![
                    x.info_hash,
                    q.peer_id,
                    q.addr,
                    q.port,
                    q.connected,
                    q.latency_ms,
                    q.score,
                    q.pieces_from,
                    q.pieces_to,
                    q.bytes_from,
                    q.bytes_to,
                    q.failures,
                    q.banned_until
                ])?;
            }
        }
        let mut tr = tx.prepare("INSERT INTO trackers VALUES (?1,?2,?3,?4,?5)")?;
        for x in &r.trackers {
            tr.execute(params![
                x.addr,
                x.reachable,
                x.last_ok,
                x.last_error,
                x.failures
            ])?;
        }
    }
    tx.commit()
}

fn authorize(ctx: AuthContext<'_>) -> Authorization {
    match ctx.action {
        AuthAction::Select
        | AuthAction::Read { .. }
        | AuthAction::Function { .. }
        | AuthAction::Recursive => Authorization::Allow,
        _ => Authorization::Deny,
    }
}

/// Run `sql` over the snapshot. Returns column names and rows as JSON values.
///
/// # Errors
/// SQL errors, refused statements (anything but a read), more than one statement, timeouts.
pub fn run(
    report: &StatusReport,
    sql: &str,
) -> anyhow::Result<(Vec<String>, Vec<Vec<serde_json::Value>>)> {
    let mut conn = Connection::open_in_memory()?;
    load(&mut conn, report).context("loading the snapshot")?;
    conn.authorizer(Some(authorize));
    let deadline = Instant::now() + QUERY_TIMEOUT;
    conn.progress_handler(10_000, Some(move || Instant::now() > deadline));
    let mut stmt = match conn.prepare(sql) {
        Ok(s) => s,
        Err(e) if e.to_string().contains("not authorized") => {
            bail!("refused: `shoal query` is read-only (SELECT over torrents, pieces, peers, trackers)")
        }
        Err(e) => return Err(e).context("query"),
    };
    if !stmt.readonly() {
        bail!(
            "refused: `shoal query` is read-only (SELECT over torrents, pieces, peers, trackers)"
        );
    }
    let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let ncol = columns.len();
    let mut rows = stmt.query([]).context("query")?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| {
        if matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::OperationInterrupted)
        ) {
            anyhow::anyhow!("query interrupted after {}s", QUERY_TIMEOUT.as_secs())
        } else {
            anyhow::Error::new(e).context("query")
        }
    })? {
        let mut r = Vec::with_capacity(ncol);
        for i in 0..ncol {
            r.push(match row.get_ref(i)? {
                ValueRef::Null => serde_json::Value::Null,
                ValueRef::Integer(v) => v.into(),
                ValueRef::Real(v) => v.into(),
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                ValueRef::Blob(b) => hex::encode(b).into(),
            });
        }
        out.push(r);
    }
    Ok((columns, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::TorrentStatus;

    fn report() -> StatusReport {
        StatusReport {
            torrents: vec![TorrentStatus {
                info_hash: "ab".into(),
                pieces: 3,
                have: 2,
                piece_states: vec![(true, 1, 0), (true, 1, 0), (false, 0, 1)],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn it_should_answer_reads_and_refuse_everything_else() {
        let (_, rows) = run(&report(), "SELECT count(*) FROM pieces WHERE have").unwrap();
        assert_eq!(rows[0][0], 2);
        for bad in [
            "DELETE FROM torrents",
            "ATTACH DATABASE '/tmp/x.db' AS x",
            "PRAGMA writable_schema = 1",
            "CREATE TABLE x (a)",
            "INSERT INTO torrents (info_hash) VALUES ('x')",
        ] {
            let e = format!("{:#}", run(&report(), bad).unwrap_err());
            assert!(
                e.contains("refused") || e.contains("not authorized"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn it_should_interrupt_a_runaway_query() {
        let sql =
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c";
        let e = format!("{:#}", run(&report(), sql).unwrap_err());
        assert!(e.contains("interrupted"), "{e}");
    }
}

#[cfg(test)]
mod big {
    use super::*;
    use crate::control::TorrentStatus;

    #[test]
    fn it_should_answer_over_a_100k_piece_torrent() {
        let n = 100_000u32;
        let report = StatusReport {
            torrents: vec![TorrentStatus {
                info_hash: "cd".into(),
                pieces: n,
                have: n / 2,
                piece_states: (0..n).map(|i| (i % 2 == 0, (i % 5) as u16, 0)).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = Instant::now();
        let (_, rows) = run(
            &report,
            "SELECT count(*) FROM pieces WHERE have AND availability > 2",
        )
        .unwrap();
        println!("100k-piece query answered in {:?}", t.elapsed());
        assert_eq!(rows[0][0], 20_000);
    }
}
