//! HTTP for operators: `/metrics` (Prometheus), a JSON API and a web dashboard. Off unless
//! `--http ADDR` or `http = "..."` in config.
//!
//! Two halves. The generic one, used by the peer too: [`bind`] refuses to listen beyond
//! loopback without a bearer token, and [`require_bearer`] answers 401 to requests without it.
//! The tracker's own routes read the tracker through its public protocol (a [`TrackerClient`]
//! on its own address) and its database read-only: they need nothing of the server's
//! internals, so the server can change under them.
//!
//! Every asset is compiled in (`include_str!`): the dashboard loads nothing from the network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::TrackerClient;
use crate::metrics;

/// The dashboard's shared stylesheet and chart helpers, served at `/shoal.css` and `/shoal.js`.
pub const COMMON_CSS: &str = include_str!("../assets/shoal.css");
pub const COMMON_JS: &str = include_str!("../assets/shoal.js");
const TRACKER_HTML: &str = include_str!("../assets/tracker.html");

/// Longest a request to the tracker behind the API may take.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many history points go into one reply.
const MAX_HISTORY_POINTS: u64 = 1440;
/// At most this many events are read to draw the history.
const MAX_HISTORY_EVENTS: i64 = 200_000;

/// Bind an HTTP listener on `addr`, refusing a non-loopback address without a token.
///
/// # Errors
/// The address does not resolve, it is beyond loopback and `token` is empty, or it cannot be
/// bound.
pub async fn bind(addr: &str, token: Option<&str>) -> anyhow::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("HTTP address {addr} does not resolve"))?
        .collect();
    if addrs.is_empty() {
        bail!("HTTP address {addr} does not resolve");
    }
    let has_token = token.is_some_and(|t| !t.is_empty());
    if !has_token && addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing to serve HTTP on {addr} without a bearer token: it is beyond loopback. \
             Set http_token in config (or SHOAL_HTTP_TOKEN), or listen on 127.0.0.1"
        );
    }
    TcpListener::bind(addrs[0])
        .await
        .with_context(|| format!("cannot listen for HTTP on {addr}"))
}

/// The bearer token every protected route wants; `None` lets everyone in (loopback only, as
/// [`bind`] checked).
#[derive(Clone)]
pub struct Auth(pub Option<Arc<str>>);

/// Middleware: 401 unless `Authorization: Bearer <token>` matches (when a token is set).
pub async fn require_bearer(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if let Some(want) = &auth.0 {
        let got = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(got.as_bytes(), want.as_bytes()) {
            let mut r = (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    next.run(req).await
}

/// Compare without stopping at the first difference, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON error reply: `{"error": "..."}`.
pub fn error_reply(code: StatusCode, reason: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({"error": reason.into()}))).into_response()
}

/// The static assets every dashboard shares.
pub fn common_assets<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/shoal.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], COMMON_CSS) }),
        )
        .route(
            "/shoal.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], COMMON_JS) }),
        )
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_HTTP_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed (hyper alone would wait forever
/// for a slow request's headers).
const HTTP_IDLE: Duration = Duration::from_secs(30);

/// Serve `app` on `listener` until `cancel`, at most [`MAX_HTTP_CONNECTIONS`] at once, each
/// closed after [`HTTP_IDLE`] without a byte from the client.
///
/// # Errors
/// The server's accept loop failed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listener = BoundedListener {
        inner: listener,
        permits: Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS)),
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .context("HTTP server")
}

/// A listener that holds a permit per open connection and gives each an idle timeout.
struct BoundedListener {
    inner: TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for BoundedListener {
    type Io = IdleStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (IdleStream, SocketAddr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            IdleStream {
                io,
                _permit: permit,
                idle: Box::pin(tokio::time::sleep(HTTP_IDLE)),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection whose reads fail with `TimedOut` after [`HTTP_IDLE`] of silence.
struct IdleStream {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for IdleStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let next = tokio::time::Instant::now() + HTTP_IDLE;
                self.idle.as_mut().reset(next);
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for IdleStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// === THE TRACKER'S ROUTES ===

#[derive(Clone)]
struct TrackerBackend {
    /// The tracker's own protocol address (loopback when it listens on every interface).
    tracker: String,
    db: PathBuf,
}

impl TrackerBackend {
    /// Every file the tracker lists, all pages.
    async fn files(&self) -> anyhow::Result<Vec<crate::proto::FileEntry>> {
        let mut c = TrackerClient::connect(&self.tracker, None, BACKEND_TIMEOUT).await?;
        Ok(tokio::time::timeout(BACKEND_TIMEOUT, c.files_all())
            .await
            .context("the tracker did not answer in time")??)
    }

    /// The live swarm (of one file, or all), all pages.
    async fn swarm(
        &self,
        info_hash: Option<&str>,
    ) -> anyhow::Result<Vec<crate::proto::SwarmEntry>> {
        let mut c = TrackerClient::connect(&self.tracker, None, BACKEND_TIMEOUT).await?;
        Ok(
            tokio::time::timeout(BACKEND_TIMEOUT, c.swarm_all(info_hash))
                .await
                .context("the tracker did not answer in time")??,
        )
    }
}

/// The tracker's HTTP app: `/`, `/metrics`, `/api/files`, `/api/swarm`, `/api/history`.
pub fn tracker_app(tracker_addr: SocketAddr, db: PathBuf, token: Option<String>) -> Router {
    let tracker = if tracker_addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", tracker_addr.port())
    } else {
        tracker_addr.to_string()
    };
    let backend = TrackerBackend { tracker, db };
    let auth = Auth(token.filter(|t| !t.is_empty()).map(Arc::from));
    let api = Router::new()
        .route("/metrics", get(tracker_metrics))
        .route("/api/files", get(api_files))
        .route("/api/swarm", get(api_swarm))
        .route("/api/history", get(api_history))
        .with_state(backend)
        .route_layer(axum::middleware::from_fn_with_state(auth, require_bearer));
    Router::new()
        .route("/", get(|| async { Html(TRACKER_HTML) }))
        .merge(common_assets())
        .merge(api)
}

async fn tracker_metrics(State(b): State<TrackerBackend>) -> Response {
    let files = match b.files().await {
        Ok(files) => files,
        Err(e) => return error_reply(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    };
    let db_bytes = ["", "-wal"]
        .iter()
        .filter_map(|s| {
            let mut p = b.db.clone().into_os_string();
            p.push(s);
            std::fs::metadata(p).ok().map(|m| m.len())
        })
        .sum();
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&files, db_bytes),
    )
        .into_response()
}

async fn api_files(State(b): State<TrackerBackend>) -> Response {
    match b.files().await {
        Ok(files) => Json(files).into_response(),
        Err(e) => error_reply(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

#[derive(Deserialize)]
struct SwarmQuery {
    info_hash: Option<String>,
}

async fn api_swarm(State(b): State<TrackerBackend>, Query(q): Query<SwarmQuery>) -> Response {
    match b.swarm(q.info_hash.as_deref()).await {
        Ok(peers) => Json(peers).into_response(),
        Err(e) => error_reply(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// Window in seconds back from now (default one hour, at most a day).
    secs: Option<u64>,
    /// Seconds per point (default 10).
    step: Option<u64>,
}

/// The live swarm's size over time, rebuilt from the `events` table: walking back from the
/// live count now, a `started` means one fewer before it, a `stopped`/`expired` one more.
async fn api_history(State(b): State<TrackerBackend>, Query(q): Query<HistoryQuery>) -> Response {
    let secs = q.secs.unwrap_or(3600).clamp(10, 86_400);
    let step = q
        .step
        .unwrap_or(10)
        .max(1)
        .max(secs.div_ceil(MAX_HISTORY_POINTS));
    let live_now = match b.swarm(None).await {
        Ok(peers) => peers.len() as i64,
        Err(e) => return error_reply(StatusCode::BAD_GATEWAY, format!("{e:#}")),
    };
    let db = b.db.clone();
    let now = crate::server::unix_ms() / 1000;
    let since = now - secs as i64;
    let events = tokio::task::spawn_blocking(move || read_events(&db, since)).await;
    let events = match events {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => return error_reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => return error_reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    Json(history_points(live_now, &events, now, secs, step)).into_response()
}

fn read_events(db: &std::path::Path, since: i64) -> anyhow::Result<Vec<(i64, String)>> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {} read-only", db.display()))?;
    conn.busy_timeout(Duration::from_secs(2))?;
    let mut st = conn.prepare(
        "SELECT at, event FROM events WHERE at >= ?1 AND event IN ('started','stopped','expired') \
         ORDER BY at DESC LIMIT ?2",
    )?;
    let rows = st
        .query_map(rusqlite::params![since, MAX_HISTORY_EVENTS], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// `[{"at": unix secs, "live": peers}]`, oldest first, one point per `step`.
fn history_points(
    live_now: i64,
    events_newest_first: &[(i64, String)],
    now: i64,
    secs: u64,
    step: u64,
) -> Vec<serde_json::Value> {
    let mut points = Vec::new();
    let mut live = live_now;
    let mut ev = events_newest_first.iter().peekable();
    let mut t = now;
    let start = now - secs as i64;
    while t >= start {
        points.push(serde_json::json!({"at": t, "live": live.max(0)}));
        let next = t - step as i64;
        // Undo the events in (next, t].
        while let Some((at, e)) = ev.peek() {
            if *at <= next {
                break;
            }
            match e.as_str() {
                "started" => live -= 1,
                "stopped" | "expired" => live += 1,
                _ => {}
            }
            ev.next();
        }
        t = next;
    }
    points.reverse();
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_rebuild_the_live_count_backwards_from_events() {
        let ev = vec![
            (95, "expired".to_string()),
            (85, "started".to_string()),
            (75, "started".to_string()),
        ];
        let p = history_points(1, &ev, 100, 30, 10);
        let live: Vec<i64> = p.iter().map(|v| v["live"].as_i64().unwrap()).collect();
        // t=70: 0, t=80: 1 (75 started), t=90: 2 (85 started), t=100: 1 (95 expired).
        assert_eq!(live, vec![0, 1, 2, 1]);
    }

    #[test]
    fn it_should_compare_tokens_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
