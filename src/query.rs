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
  uploads INTEGER, PRIMARY KEY (info_hash, idx));
CREATE TABLE peers (info_hash TEXT, peer_id TEXT, addr TEXT, port INTEGER, connected INTEGER,
  latency_ms REAL, score REAL, pieces_from INTEGER, pieces_to INTEGER, bytes_from INTEGER,
  bytes_to INTEGER, failures INTEGER, banned_until INTEGER, rtt_ms REAL, throughput REAL,
  fingerprint TEXT, member INTEGER);
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
        let mut p = tx.prepare("INSERT INTO pieces VALUES (?1,?2,?3,?4,?5,?6)")?;
        let mut fi = tx.prepare("INSERT INTO files VALUES (?1,?2,?3,?4,?5,?6)")?;
        let mut pe = tx.prepare(
            "INSERT INTO peers VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)",
        )?;
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
                let uploads = x.piece_uploads.get(i).copied().unwrap_or(0);
                p.execute(params![
                    x.info_hash,
                    i as i64,
                    have,
                    avail,
                    inflight,
                    uploads
                ])?;
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
                    q.banned_until,
                    q.rtt_ms,
                    q.throughput,
                    q.fingerprint,
                    q.member
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

const READ_ONLY: &str =
    "refused: `shoal query` is read-only (SELECT over torrents, pieces, peers, trackers)";

/// SQLite's own message, without rusqlite's generic "Error code 1: SQL error or missing
/// database" tail, and the read-only refusal in our words.
fn clean(e: rusqlite::Error) -> anyhow::Error {
    let msg = match &e {
        rusqlite::Error::SqlInputError { msg, offset, .. } => {
            format!("{msg} (at character {offset})")
        }
        rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
        other => other.to_string(),
    };
    if msg.contains("not authorized") {
        anyhow::anyhow!("{READ_ONLY}")
    } else {
        anyhow::anyhow!("SQL error: {msg}")
    }
}

/// Rows as JSON objects whose keys keep the query's column order (a `serde_json::Map` would
/// sort them): `shoal query --json` and `GET /api/query` print this.
pub struct RowObjects<'a> {
    columns: &'a [String],
    rows: &'a [Vec<serde_json::Value>],
}

impl<'a> RowObjects<'a> {
    pub fn new(columns: &'a [String], rows: &'a [Vec<serde_json::Value>]) -> Self {
        RowObjects { columns, rows }
    }
}

impl serde::Serialize for RowObjects<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Row<'b>(&'b [String], &'b [serde_json::Value]);
        impl serde::Serialize for Row<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0.iter().zip(self.1) {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
        let mut seq = s.serialize_seq(Some(self.rows.len()))?;
        for r in self.rows {
            seq.serialize_element(&Row(self.columns, r))?;
        }
        seq.end()
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
    // One statement only (counted before the authorizer, which would refuse a second
    // DELETE with a less helpful message): SQLite would run the first of `SELECT 1; DELETE ...` and ignore
    // the rest silently, which reads as if the whole text ran.
    let mut statements = 0;
    {
        let mut batch = rusqlite::Batch::new(&conn, sql);
        while let Some(_prepared) = batch.next().map_err(clean)? {
            statements += 1;
        }
    }
    match statements {
        0 => bail!("no SQL statement given"),
        1 => {}
        n => bail!("refused: give one statement, not {n} (`shoal query` runs a single SELECT)"),
    }
    conn.authorizer(Some(authorize));
    let deadline = Instant::now() + QUERY_TIMEOUT;
    conn.progress_handler(10_000, Some(move || Instant::now() > deadline));
    let stmt = conn.prepare(sql).map_err(clean)?;
    if !stmt.readonly() {
        bail!("{READ_ONLY}");
    }
    let columns: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let ncol = columns.len();
    let mut stmt = stmt;
    let mut rows = stmt.query([]).map_err(clean)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| {
        if matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::OperationInterrupted)
        ) {
            anyhow::anyhow!("query interrupted after {}s", QUERY_TIMEOUT.as_secs())
        } else {
            clean(e)
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
    fn it_should_refuse_a_second_statement_and_speak_plainly() {
        let e = format!(
            "{:#}",
            run(&report(), "SELECT 1; DELETE FROM torrents").unwrap_err()
        );
        assert!(e.contains("refused: give one statement"), "{e}");
        let e = format!("{:#}", run(&report(), "SELEC 1").unwrap_err());
        assert!(e.starts_with("SQL error: near \"SELEC\""), "{e}");
        assert!(!e.contains("Error code"), "{e}");
        let (_, rows) = run(&report(), "SELECT 1;  -- trailing comment").unwrap();
        assert_eq!(rows[0][0], 1);
    }

    #[test]
    fn it_should_keep_column_order_in_json() {
        let cols = vec!["zeta".to_string(), "alpha".to_string()];
        let rows = vec![vec![serde_json::json!(1), serde_json::json!(2)]];
        let s = serde_json::to_string(&RowObjects::new(&cols, &rows)).unwrap();
        assert_eq!(s, r#"[{"zeta":1,"alpha":2}]"#);
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
