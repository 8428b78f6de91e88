//! A tracker client: one persistent connection, one request in flight, every wait bounded.
//! Used by the peer, `shoal list`, `shoal tracker monitor`, the tests and the load benchmark.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::proto::{Request, Response};
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
            let target: SocketAddr = match addr.parse() {
                Ok(a) => a,
                Err(_) => tokio::net::lookup_host(addr)
                    .await
                    .map_err(err)?
                    .next()
                    .ok_or_else(|| err(std::io::Error::other("no address")))?,
            };
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
}
