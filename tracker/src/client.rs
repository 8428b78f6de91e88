//! A tracker client: one persistent connection, one request in flight, every wait bounded.
//! Used by the peer, `shoal list`, `shoal tracker monitor`, the tests and the load benchmark.
//!
//! SWARM and FILES replies are paged by the tracker (each page fits the 64 KiB frame header);
//! [`TrackerClient::swarm_all`] and [`TrackerClient::files_all`] fetch every page and return
//! the whole listing, bounded by [`MAX_LISTING_ENTRIES`]. A tracker's reply is untrusted: every
//! string in a listing comes back with control characters escaped, ready to print.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::auth::{Signer, SESSION_UNKNOWN};
use crate::proto::{escape_control, Announce, FileEntry, PeerEntry, Request, Response, SwarmEntry};
use crate::roster::Roster;
use crate::wire::{FrameError, FrameReader, FrameWriter, Limits, Timeouts};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("tracker {addr}: cannot connect: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tracker {addr}: timed out connecting")]
    ConnectTimeout { addr: String },
    #[error("tracker {addr}: {source}")]
    Frame {
        addr: String,
        #[source]
        source: FrameError,
    },
    #[error("tracker {addr} closed the connection")]
    Closed { addr: String },
    #[error("tracker {addr} sent a reply that does not parse: {reason}")]
    BadReply { addr: String, reason: String },
    #[error("tracker {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
    #[error(
        "tracker {addr} sent a listing of more than {max} entries or one that does not advance"
    )]
    EndlessListing { addr: String, max: usize },
    #[error("tracker {addr}: no reply to a UDP announce within {after:?}")]
    DatagramTimeout { addr: String, after: Duration },
    #[error("tracker {addr}: no session to announce with over UDP (announce over TCP first)")]
    NoSession { addr: String },
}

/// Entries of one SWARM or FILES listing accepted at most (a tracker that pages forever is
/// cut off here rather than filling memory).
pub const MAX_LISTING_ENTRIES: usize = 2_000_000;

/// Every tracker asked failed; each one's error is in the message.
#[derive(Debug, thiserror::Error)]
#[error("no tracker answered: {}", .0.join("; "))]
pub struct NoTrackerAnswered(pub Vec<String>);

/// The files offered, from the first of `trackers` that answers (`shoal list`).
///
/// # Errors
/// No tracker answered; the error lists why for each.
pub async fn files_from_first(
    trackers: &[String],
    timeout: Duration,
) -> Result<Vec<FileEntry>, NoTrackerAnswered> {
    let mut errors = Vec::new();
    for t in trackers {
        match TrackerClient::connect(t, None, timeout).await {
            Ok(mut c) => match c.files_all().await {
                Ok(files) => return Ok(files),
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(NoTrackerAnswered(errors))
}

/// The whole live swarm, from the first of `trackers` that answers (`shoal tracker monitor`).
///
/// # Errors
/// No tracker answered; the error lists why for each.
pub async fn swarm_from_first(
    trackers: &[String],
    timeout: Duration,
) -> Result<Vec<SwarmEntry>, NoTrackerAnswered> {
    let mut errors = Vec::new();
    for t in trackers {
        match TrackerClient::connect(t, None, timeout).await {
            Ok(mut c) => match c.swarm_all(None).await {
                Ok(peers) => return Ok(peers),
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(NoTrackerAnswered(errors))
}

/// A PEERS reply, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceReply {
    pub interval: u64,
    pub peers: Vec<PeerEntry>,
    /// The private swarm's roster version the tracker holds (0: none, or a public swarm).
    pub roster_version: u64,
    /// The tracker's roster when it is newer than the announce's `roster_version`, for the
    /// announce's swarm and authority, and verifies.
    pub roster: Option<Roster>,
}

impl AnnounceReply {
    /// The reply to `a`, keeping the roster only when it is newer, for `a`'s swarm and
    /// authority, and verifies.
    fn checked(
        a: &Announce,
        interval: u64,
        peers: Vec<PeerEntry>,
        roster_version: Option<u64>,
        roster: Option<Roster>,
    ) -> AnnounceReply {
        let roster = roster.filter(|r| {
            r.version > a.roster_version.unwrap_or(0)
                && r.info_hash == a.info_hash.to_ascii_lowercase()
                && Some(&r.authority) == a.authority.as_ref()
                && r.verify().is_ok()
        });
        AnnounceReply {
            interval,
            peers,
            roster_version: roster_version.unwrap_or(0),
            roster,
        }
    }
}

async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    match addr.parse() {
        Ok(a) => Ok(a),
        Err(_) => tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other("no address")),
    }
}

/// Announces as UDP datagrams to one tracker, with a session opened over TCP (the tracker
/// takes a datagram only from the address that opened the session). One datagram each way;
/// a lost one is not sent again here: the caller falls back to TCP.
pub struct DatagramClient {
    addr: String,
    sock: tokio::net::UdpSocket,
    buf: Box<[u8]>,
}

impl DatagramClient {
    /// A socket for `addr`, from `bind_ip` when given (it must be the address the session was
    /// opened from, as for [`TrackerClient::connect`]).
    ///
    /// # Errors
    /// Resolution or socket failures, naming the tracker.
    pub async fn connect(
        addr: &str,
        bind_ip: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> Result<DatagramClient, ClientError> {
        let err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let target = tokio::time::timeout(timeout, resolve(addr))
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                addr: addr.to_string(),
            })?
            .map_err(err)?;
        let local = match bind_ip {
            Some(ip) if ip.is_ipv4() == target.is_ipv4() => SocketAddr::new(ip, 0),
            _ if target.is_ipv4() => SocketAddr::from(([0, 0, 0, 0], 0)),
            _ => SocketAddr::from(([0u16; 8], 0)),
        };
        let sock = tokio::net::UdpSocket::bind(local).await.map_err(err)?;
        sock.connect(target).await.map_err(err)?;
        Ok(DatagramClient {
            addr: addr.to_string(),
            sock,
            buf: vec![0u8; 64 * 1024].into_boxed_slice(),
        })
    }

    /// Announce `a` with `signer`'s session for this tracker, waiting at most `timeout` for the
    /// reply (a PEERS counts only with the session's authenticator: see
    /// [`crate::auth::reply_mac`]).
    ///
    /// # Errors
    /// No session held, no reply in time, a refusal or an unexpected reply, naming the tracker.
    pub async fn announce(
        &mut self,
        a: &Announce,
        signer: &Signer,
        timeout: Duration,
    ) -> Result<AnnounceReply, ClientError> {
        if !signer.has_session(&self.addr) {
            return Err(ClientError::NoSession {
                addr: self.addr.clone(),
            });
        }
        let mut a = a.clone();
        if signer.authenticate(&self.addr, &mut a, false).is_some() {
            // The session went between the two calls: nothing was sent.
            return Err(ClientError::NoSession {
                addr: self.addr.clone(),
            });
        }
        let ts = a.ts.unwrap_or(0);
        let req = serde_json::to_vec(&Request::Announce(a.clone())).expect("requests serialize");
        let io_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let exchange = async {
            self.sock.send(&req).await?;
            loop {
                let n = self.sock.recv(&mut self.buf).await?;
                let reply = &self.buf[..n];
                // Anyone can send a datagram with the tracker's address: a PEERS counts only
                // with our session's authenticator over it and our announce's ts (so neither a
                // forged one nor a late one for an earlier announce). An ERROR cannot carry one
                // (the tracker may have no session for us); it only sends us to TCP.
                match serde_json::from_slice::<Response>(reply) {
                    Ok(
                        r @ Response::Peers {
                            interval,
                            roster_version,
                            ..
                        },
                    ) if signer.reply_mac_verifies(
                        &self.addr,
                        ts,
                        interval,
                        roster_version,
                        reply,
                    ) =>
                    {
                        return Ok::<_, std::io::Error>(r)
                    }
                    Ok(r @ Response::Error { .. }) => return Ok(r),
                    _ => {}
                }
            }
        };
        let resp = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::DatagramTimeout {
                addr: self.addr.clone(),
                after: timeout,
            })?
            .map_err(io_err)?;
        match resp {
            Response::Peers {
                interval,
                peers,
                roster_version,
                roster,
                ..
            } => Ok(AnnounceReply::checked(
                &a,
                interval,
                peers,
                roster_version,
                roster,
            )),
            // Unauthenticated, so the session is kept: the announce over TCP that follows
            // finds out whether the tracker still has it (and signs again if not).
            Response::Error { reason } => Err(ClientError::Refused {
                addr: self.addr.clone(),
                reason,
            }),
            _ => Err(ClientError::BadReply {
                addr: self.addr.clone(),
                reason: "expected PEERS".into(),
            }),
        }
    }
}

pub struct TrackerClient {
    addr: String,
    reader: FrameReader<OwnedReadHalf>,
    writer: FrameWriter<OwnedWriteHalf>,
}

impl TrackerClient {
    /// Connect to `addr`, optionally from `bind_ip` (a peer binds its outgoing sockets to the
    /// address it listens on, so the tracker records the right host).
    ///
    /// # Errors
    /// Resolution, connection or timeout failures, naming the tracker.
    pub async fn connect(
        addr: &str,
        bind_ip: Option<std::net::IpAddr>,
        timeout: Duration,
    ) -> Result<TrackerClient, ClientError> {
        let err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let fut = async {
            let target = resolve(addr).await.map_err(err)?;
            let stream = match bind_ip {
                Some(ip) if ip.is_ipv4() == target.is_ipv4() => {
                    let sock = if target.is_ipv4() {
                        TcpSocket::new_v4()
                    } else {
                        TcpSocket::new_v6()
                    }
                    .map_err(err)?;
                    sock.bind(SocketAddr::new(ip, 0)).map_err(err)?;
                    sock.connect(target).await.map_err(err)?
                }
                _ => TcpStream::connect(target).await.map_err(err)?,
            };
            Ok::<_, ClientError>(stream)
        };
        let stream = tokio::time::timeout(timeout, fut).await.map_err(|_| {
            ClientError::ConnectTimeout {
                addr: addr.to_string(),
            }
        })??;
        let _ = stream.set_nodelay(true); // Small request/reply frames: send at once.
        let (r, w) = stream.into_split();
        let timeouts = Timeouts {
            idle: timeout,
            read: timeout,
        };
        Ok(TrackerClient {
            addr: addr.to_string(),
            reader: FrameReader::new(r, Limits::headers_only(), timeouts),
            writer: FrameWriter::new(w, timeout),
        })
    }

    /// Send one request and read its reply. An `ERROR` reply becomes [`ClientError::Refused`].
    ///
    /// # Errors
    /// Transport failures, timeouts, unparseable replies and refusals, naming the tracker.
    pub async fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        let resp = self
            .request_many(std::slice::from_ref(req))
            .await?
            .pop()
            .expect("one reply per request");
        if let Response::Error { reason } = resp {
            return Err(ClientError::Refused {
                addr: self.addr.clone(),
                reason,
            });
        }
        Ok(resp)
    }

    fn frame_err(&self, source: FrameError) -> ClientError {
        ClientError::Frame {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Send several requests back to back, then read all replies (pipelining). `ERROR`
    /// replies are returned as they are.
    ///
    /// # Errors
    /// Transport failures, timeouts and unparseable replies, naming the tracker.
    pub async fn request_many(&mut self, reqs: &[Request]) -> Result<Vec<Response>, ClientError> {
        for r in reqs {
            self.writer
                .feed(r, &[])
                .await
                .map_err(|e| self.frame_err(e))?;
        }
        self.writer.flush().await.map_err(|e| self.frame_err(e))?;
        let mut out = Vec::with_capacity(reqs.len());
        for _ in reqs {
            let frame = match self.reader.read_frame().await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(ClientError::Closed {
                        addr: self.addr.clone(),
                    })
                }
                Err(e) => return Err(self.frame_err(e)),
            };
            out.push(frame.parse().map_err(|e| ClientError::BadReply {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?);
        }
        Ok(out)
    }

    /// Announce `a`, authenticated by `signer` when given (then `peer_id`, `ts`, `sig`, `mac`
    /// and `dh` are set here): with this tracker's session when one is held, else signed,
    /// opening a session. A tracker that lost the session is answered by signing again.
    ///
    /// # Errors
    /// Transport failures, refusals and unexpected replies, naming the tracker.
    pub async fn announce(
        &mut self,
        a: &Announce,
        signer: Option<&Signer>,
    ) -> Result<AnnounceReply, ClientError> {
        let mut sign = false;
        loop {
            let mut a = a.clone();
            let opening = signer.and_then(|s| s.authenticate(&self.addr, &mut a, sign));
            let used_session = signer.is_some() && opening.is_none();
            match self.request(&Request::Announce(a.clone())).await {
                Ok(Response::Peers {
                    interval,
                    peers,
                    session,
                    roster_version,
                    roster,
                }) => {
                    if let (Some(signer), Some(opening), Some(session)) = (signer, opening, session)
                    {
                        signer.opened(&self.addr, opening, &session);
                    }
                    return Ok(AnnounceReply::checked(
                        &a,
                        interval,
                        peers,
                        roster_version,
                        roster,
                    ));
                }
                Ok(_) => return Err(self.bad_reply("PEERS")),
                Err(ClientError::Refused { reason, .. })
                    if used_session
                        && (reason.starts_with(SESSION_UNKNOWN)
                            || reason.contains("mac does not verify")) =>
                {
                    // The tracker restarted or dropped our session: sign this one again.
                    if let Some(s) = signer {
                        s.forget(&self.addr);
                    }
                    sign = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn bad_reply(&self, what: &str) -> ClientError {
        ClientError::BadReply {
            addr: self.addr.clone(),
            reason: format!("expected {what}"),
        }
    }

    /// Follow a listing's cursor, refusing one that repeats or runs past the bound.
    fn next_cursor(
        &self,
        after: Option<String>,
        next: Option<String>,
        got: usize,
        page_len: usize,
    ) -> Result<Option<String>, ClientError> {
        if got > MAX_LISTING_ENTRIES || (next.is_some() && (page_len == 0 || next == after)) {
            return Err(ClientError::EndlessListing {
                addr: self.addr.clone(),
                max: MAX_LISTING_ENTRIES,
            });
        }
        Ok(next)
    }

    /// The whole live swarm (of one file, or of all), every page of it, sorted by file name,
    /// info hash, address and port, with control characters in its strings escaped.
    ///
    /// # Errors
    /// Transport failures, refusals, unparseable or endless replies, naming the tracker.
    pub async fn swarm_all(
        &mut self,
        info_hash: Option<&str>,
    ) -> Result<Vec<SwarmEntry>, ClientError> {
        let mut all: Vec<SwarmEntry> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let req = Request::Swarm {
                info_hash: info_hash.map(str::to_string),
                after: after.clone(),
                limit: None,
            };
            let Response::Swarm { peers, next } = self.request(&req).await? else {
                return Err(self.bad_reply("SWARM"));
            };
            let n = peers.len();
            all.extend(peers.into_iter().map(|p| SwarmEntry {
                info_hash: escape_control(&p.info_hash),
                name: escape_control(&p.name),
                peer_id: escape_control(&p.peer_id),
                addr: escape_control(&p.addr),
                fingerprint: escape_control(&p.fingerprint),
                ..p
            }));
            match self.next_cursor(after, next, all.len(), n)? {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        all.sort_by(|a, b| {
            (&a.name, &a.info_hash, &a.addr, a.port, &a.peer_id).cmp(&(
                &b.name,
                &b.info_hash,
                &b.addr,
                b.port,
                &b.peer_id,
            ))
        });
        Ok(all)
    }

    /// Every file with a live peer, every page, sorted by name then info hash, with control
    /// characters escaped.
    ///
    /// # Errors
    /// Transport failures, refusals, unparseable or endless replies, naming the tracker.
    pub async fn files_all(&mut self) -> Result<Vec<FileEntry>, ClientError> {
        let mut all: Vec<FileEntry> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let req = Request::ListFiles {
                after: after.clone(),
                limit: None,
            };
            let Response::Files { files, next } = self.request(&req).await? else {
                return Err(self.bad_reply("FILES"));
            };
            let n = files.len();
            all.extend(files.into_iter().map(|f| FileEntry {
                info_hash: escape_control(&f.info_hash),
                name: escape_control(&f.name),
                ..f
            }));
            match self.next_cursor(after, next, all.len(), n)? {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        all.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then_with(|| a.info_hash.cmp(&b.info_hash))
        });
        Ok(all)
    }
}
