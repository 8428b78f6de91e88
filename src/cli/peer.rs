//! Commands for a running peer: `peer run/stop`, `status`, `query`, `pause`, `resume`,
//! `recheck`, `remove`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use super::{out, render};
use crate::control::{self, CtlRequest, CtlResponse};

/// A command answered with a message: print it (or `{"message": ...}`).
pub async fn simple(dir: &Path, req: CtlRequest, json: bool) -> anyhow::Result<()> {
    match control::call(dir, &req, Duration::from_secs(600)).await? {
        CtlResponse::Ok { message } => {
            if json {
                return out::json(&serde_json::json!({ "message": message }));
            }
            out::line(&message)?;
            Ok(())
        }
        other => bail!("unexpected reply {other:?}"),
    }
}

pub async fn status(dir: &Path, json: bool, watch: bool) -> anyhow::Result<()> {
    let tty = std::io::stdout().is_terminal();
    loop {
        let CtlResponse::Status(report) =
            control::call(dir, &CtlRequest::Status, Duration::from_secs(10)).await?
        else {
            bail!("unexpected reply to STATUS");
        };
        if json {
            out::json(&report)?;
        } else if watch && tty {
            out::print(&format!("\x1b[2J\x1b[H{}", render::status(&report)))?;
        } else {
            out::print(&render::status(&report))?;
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn query(dir: &Path, sql: String, json: bool) -> anyhow::Result<()> {
    let CtlResponse::Rows { columns, rows } =
        control::call(dir, &CtlRequest::Query { sql }, Duration::from_secs(30)).await?
    else {
        bail!("unexpected reply to QUERY");
    };
    if json {
        return out::json(&crate::query::RowObjects::new(&columns, &rows));
    }
    out::print(&render::rows(&columns, &rows))?;
    Ok(())
}
