//! A hand-driven peer connection for tests that play an attacker or a fake peer: the real
//! Noise handshake (`shoal::secure`) under a key of the test's choosing, then raw frames, so a
//! test can send what no honest peer would.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use shoal::secure::{Identity, NoiseKeys, SecureRead, SecureWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const LIMIT: Duration = Duration::from_secs(10);

pub struct Wire {
    rt: tokio::runtime::Runtime,
    r: SecureRead<OwnedReadHalf>,
    w: SecureWrite<OwnedWriteHalf>,
    /// The remote's authenticated peer id.
    pub remote_id: String,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

type Channel = shoal::secure::Channel<OwnedReadHalf, OwnedWriteHalf>;

/// Either side of the handshake, bounded.
async fn finish(
    hs: impl std::future::Future<Output = Result<Channel, shoal::secure::SecureError>>,
) -> Result<Channel, String> {
    tokio::time::timeout(LIMIT, hs)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())
}

impl Wire {
    /// Dial `addr` and run the handshake as `id`.
    pub fn connect(addr: SocketAddr, id: &Identity) -> Result<Wire, String> {
        Self::connect_from(addr, None, id)
    }

    /// Dial `addr` from the local address `from` (another loopback address: another host).
    pub fn connect_from(
        addr: SocketAddr,
        from: Option<std::net::IpAddr>,
        id: &Identity,
    ) -> Result<Wire, String> {
        let rt = runtime();
        let keys = NoiseKeys::new(id);
        let ch = rt.block_on(async {
            let sock = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            if let Some(ip) = from {
                sock.bind(SocketAddr::new(ip, 0))
                    .map_err(|e| e.to_string())?;
            }
            let s = tokio::time::timeout(LIMIT, sock.connect(addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let (r, w) = s.into_split();
            finish(shoal::secure::initiate(r, w, &keys)).await
        })?;
        Ok(Wire::of(rt, ch))
    }

    /// Answer the handshake of an accepted socket as `id`.
    pub fn accept(s: std::net::TcpStream, id: &Identity) -> Result<Wire, String> {
        let rt = runtime();
        let keys = NoiseKeys::new(id);
        let ch = rt.block_on(async {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            let s = tokio::net::TcpStream::from_std(s).map_err(|e| e.to_string())?;
            let (r, w) = s.into_split();
            finish(shoal::secure::respond(r, w, &keys)).await
        })?;
        Ok(Wire::of(rt, ch))
    }

    fn of(rt: tokio::runtime::Runtime, ch: Channel) -> Wire {
        Wire {
            rt,
            r: ch.reader,
            w: ch.writer,
            remote_id: ch.remote_id,
        }
    }

    /// Send raw bytes (frames from `common::frame`, or garbage) inside the channel.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let w = &mut self.w;
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, async {
                w.write_all(bytes).await?;
                w.flush().await
            })
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
        })
    }

    /// The next frame, or None on close, error or a 10 s silence.
    pub fn read_frame(&mut self) -> Option<(serde_json::Value, Vec<u8>)> {
        let r = &mut self.r;
        self.rt.block_on(async {
            tokio::time::timeout(LIMIT, async {
                let mut len = [0u8; 4];
                r.read_exact(&mut len).await.ok()?;
                let n = u32::from_be_bytes(len) as usize;
                if n > 1 << 20 {
                    return None;
                }
                let mut h = vec![0u8; n];
                r.read_exact(&mut h).await.ok()?;
                let v: serde_json::Value = serde_json::from_slice(&h).ok()?;
                let plen = v
                    .get("len")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                if plen > 64 << 20 {
                    return None;
                }
                let mut p = vec![0u8; plen as usize];
                r.read_exact(&mut p).await.ok()?;
                Some((v, p))
            })
            .await
            .ok()
            .flatten()
        })
    }
}
