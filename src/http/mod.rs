//! The peer's HTTP server: `/metrics`, a JSON API that mirrors the control socket, and the
//! dashboard. Off unless `--http ADDR` or `peer.http` in config.
//!
//! It reaches the daemon through one narrow door, a [`Handler`] that answers a [`CtlRequest`]
//! with a [`CtlResponse`] exactly as the control socket does, so the API cannot do anything
//! the CLI cannot, and its JSON is the CLI's `--json` output:
//!
//! | route | CLI twin |
//! | --- | --- |
//! | `GET /api/status` | `shoal status --json` |
//! | `GET /api/query?sql=...`, `POST /api/query {"sql"}` | `shoal query --json` |
//! | `POST /api/torrents {"descriptor"? "info_hash"? "output"? "trackers"?}` | `shoal get --json` |
//! | `POST /api/torrents/{hash}/pause`, `.../resume` | `shoal pause/resume --json` |
//! | `DELETE /api/torrents/{hash}?delete_data=true` | `shoal remove --json` |
//!
//! Binding and the bearer token are [`shoal_tracker::http`]'s, shared with the tracker.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use shoal_tracker::http::{common_assets, error_reply, require_bearer, Auth};

use crate::control::{CtlRequest, CtlResponse};

pub use shoal_tracker::http::{bind, serve};

const PEER_HTML: &str = include_str!("dashboard.html");

/// How the server asks the daemon: the control socket's own request and reply.
pub type Handler = Arc<dyn Fn(CtlRequest) -> BoxFuture<'static, CtlResponse> + Send + Sync>;

/// The peer's HTTP app.
pub fn app(handler: Handler, token: Option<String>) -> Router {
    let auth = Auth(token.filter(|t| !t.is_empty()).map(Arc::from));
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/query", get(query_get).post(query_post))
        .route("/api/torrents", post(add))
        .route("/api/torrents/{hash}/pause", post(pause))
        .route("/api/torrents/{hash}/resume", post(resume))
        .route("/api/torrents/{hash}", delete(remove))
        .with_state(handler)
        .route_layer(axum::middleware::from_fn_with_state(auth, require_bearer));
    Router::new()
        .route("/", get(|| async { Html(PEER_HTML) }))
        .merge(common_assets())
        .merge(api)
}

/// A refusal from the daemon as an HTTP error: 404 for an unknown torrent, 400 otherwise.
fn refusal(reason: String) -> Response {
    let code = if reason.starts_with("no torrent") {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::BAD_REQUEST
    };
    error_reply(code, reason)
}

fn unexpected(r: &CtlResponse) -> Response {
    error_reply(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected reply from the daemon: {r:?}"),
    )
}

async fn metrics(State(h): State<Handler>) -> Response {
    match h(CtlRequest::Status).await {
        CtlResponse::Status(r) => (
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            crate::metrics::render(&r),
        )
            .into_response(),
        CtlResponse::Error { reason } => refusal(reason),
        other => unexpected(&other),
    }
}

async fn status(State(h): State<Handler>) -> Response {
    match h(CtlRequest::Status).await {
        CtlResponse::Status(r) => Json(r).into_response(),
        CtlResponse::Error { reason } => refusal(reason),
        other => unexpected(&other),
    }
}

#[derive(Deserialize)]
struct Sql {
    sql: String,
}

async fn query_get(State(h): State<Handler>, Query(q): Query<Sql>) -> Response {
    query(h, q.sql).await
}

async fn query_post(State(h): State<Handler>, Json(q): Json<Sql>) -> Response {
    query(h, q.sql).await
}

async fn query(h: Handler, sql: String) -> Response {
    match h(CtlRequest::Query { sql }).await {
        CtlResponse::Rows { columns, rows } => {
            Json(crate::query::RowObjects::new(&columns, &rows)).into_response()
        }
        CtlResponse::Error { reason } => refusal(reason),
        other => unexpected(&other),
    }
}

#[derive(Deserialize)]
struct AddBody {
    descriptor: Option<String>,
    info_hash: Option<String>,
    output: Option<PathBuf>,
    #[serde(default)]
    trackers: Vec<String>,
    /// A tree: only the files these globs match.
    #[serde(default)]
    only: Vec<String>,
}

async fn add(State(h): State<Handler>, Json(b): Json<AddBody>) -> Response {
    match h(CtlRequest::Add {
        descriptor: b.descriptor,
        info_hash: b.info_hash,
        output: b.output,
        trackers: b.trackers,
        only: b.only,
    })
    .await
    {
        CtlResponse::Added { info_hash } => {
            Json(serde_json::json!({ "info_hash": info_hash })).into_response()
        }
        CtlResponse::Error { reason } => refusal(reason),
        other => unexpected(&other),
    }
}

async fn simple(h: Handler, req: CtlRequest) -> Response {
    match h(req).await {
        CtlResponse::Ok { message } => {
            Json(serde_json::json!({ "message": message })).into_response()
        }
        CtlResponse::Error { reason } => refusal(reason),
        other => unexpected(&other),
    }
}

async fn pause(State(h): State<Handler>, Path(hash): Path<String>) -> Response {
    simple(h, CtlRequest::Pause { info_hash: hash }).await
}

async fn resume(State(h): State<Handler>, Path(hash): Path<String>) -> Response {
    simple(h, CtlRequest::Resume { info_hash: hash }).await
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    delete_data: bool,
}

async fn remove(
    State(h): State<Handler>,
    Path(hash): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Response {
    simple(
        h,
        CtlRequest::Remove {
            info_hash: hash,
            delete_data: q.delete_data,
        },
    )
    .await
}

/// Bind the configured HTTP address, if any: refused beyond loopback without a token. Called
/// before the daemon starts anything, so a bad setting stops it at once.
///
/// # Errors
/// See [`bind`].
pub async fn bind_configured(
    addr: &str,
    token: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        bind(addr, Some(token).filter(|t| !t.is_empty())).await?,
    ))
}

/// Serve the peer's app on `listener` in `tasks` until `cancel`.
pub fn spawn(
    tasks: &tokio_util::task::TaskTracker,
    listener: tokio::net::TcpListener,
    handler: Handler,
    token: &str,
    cancel: tokio_util::sync::CancellationToken,
) {
    let app = app(handler, Some(token.to_string()));
    if let Ok(a) = listener.local_addr() {
        tracing::info!(http_addr = %a, "HTTP serving");
    }
    tasks.spawn(async move {
        if let Err(e) = serve(listener, app, cancel).await {
            tracing::error!(cause = %format!("{e:#}"), "HTTP server stopped");
        }
    });
}
