//! The tracker's side of one connection: frames of headers only (a tracker takes no payloads),
//! read into one buffer and parsed where they lie, replies queued and sent with one write per
//! batch of pipelined requests.
//!
//! Why not [`crate::wire::FrameReader`]: a tracker answers small requests, so the fixed costs
//! per request are most of its CPU. Three of them go here:
//! - a read that filled less than the buffer drained the socket, so the socket is marked not
//!   ready right away instead of finding out with one more `recv` that fails with `EAGAIN`
//!   (safe with the edge-triggered readiness tokio uses: bytes that arrive later raise a new
//!   edge);
//! - no timer while waiting for the next request: an idle connection is closed by the
//!   server's sweep of its registry ([`crate::server`]); a timer runs only once a frame has
//!   started, for the rest of it;
//! - no copy and no allocation of the header: the handler parses it from the read buffer.

use std::io::ErrorKind;
use std::ops::Range;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::wire::{check_header_len, FrameError, Limits, LEN_PREFIX_BYTES, MAX_HEADER_BYTES};

/// Bytes read at most per `recv`: a whole header of the largest size fits, with its prefix.
const READ_BUF: usize = LEN_PREFIX_BYTES + MAX_HEADER_BYTES;

pub struct Conn {
    stream: TcpStream,
    /// Received bytes live in `buf[start..end]`.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Replies queued for the next [`Conn::flush`].
    out: Vec<u8>,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl Conn {
    pub fn new(stream: TcpStream, read_timeout: Duration, write_timeout: Duration) -> Conn {
        Conn {
            stream,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            read_timeout,
            write_timeout,
        }
    }

    /// Whether bytes of a next request are already buffered (a pipelined batch).
    pub fn has_buffered(&self) -> bool {
        self.start < self.end
    }

    /// The header bytes of a frame [`Conn::next_header`] returned.
    pub fn header(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The next frame's header, as a range of the read buffer valid until the next call;
    /// `None` at a clean close between frames. Waits as long as it takes for a frame to
    /// start (see the module's note), then at most the read timeout for the rest of it.
    ///
    /// # Errors
    /// A header over the limit, a close or a timeout in the middle of a frame, an I/O error.
    pub async fn next_header(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        let limits = Limits::headers_only();
        let mut deadline = None;
        loop {
            let avail = &self.buf[self.start..self.end];
            if let Some(prefix) = avail.get(..LEN_PREFIX_BYTES) {
                let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
                check_header_len(len, &limits)?;
                if avail.len() >= LEN_PREFIX_BYTES + len {
                    let from = self.start + LEN_PREFIX_BYTES;
                    self.start = from + len;
                    return Ok(Some(from..from + len));
                }
            }
            // Make room: what is left of a frame moves to the front (it fits, being at most
            // one header with its prefix).
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            let n = if self.end == 0 {
                self.read_some().await?
            } else {
                let d = *deadline
                    .get_or_insert_with(|| tokio::time::Instant::now() + self.read_timeout);
                tokio::time::timeout_at(d, self.read_some())
                    .await
                    .map_err(|_| FrameError::Timeout("the rest of a frame"))??
            };
            if n == 0 {
                if self.end == 0 {
                    return Ok(None);
                }
                let context = if self.end < LEN_PREFIX_BYTES {
                    "length prefix"
                } else {
                    "header"
                };
                return Err(FrameError::UnexpectedEof { context });
            }
            self.end += n;
        }
    }

    /// One read into the free end of the buffer (which is not empty); 0 at end of stream.
    async fn read_some(&mut self) -> std::io::Result<usize> {
        let Conn {
            stream, buf, end, ..
        } = self;
        let spare = &mut buf[*end..];
        loop {
            stream.readable().await?;
            let mut got = 0;
            let res = stream.try_io(Interest::READABLE, || {
                got = stream.try_read(spare)?;
                if got > 0 && got < spare.len() {
                    // Drained: tell tokio now, which saves the `recv` that would say so.
                    return Err(ErrorKind::WouldBlock.into());
                }
                Ok(got)
            });
            match res {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock && got > 0 => return Ok(got),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Queue a reply whose header is already JSON (no payload).
    ///
    /// # Errors
    /// The header is over the protocol's limit.
    pub fn queue(&mut self, header_json: &[u8]) -> Result<(), FrameError> {
        check_header_len(header_json.len(), &Limits::default())?;
        #[allow(clippy::cast_possible_truncation)] // checked against MAX_HEADER_BYTES above
        self.out
            .extend_from_slice(&(header_json.len() as u32).to_be_bytes());
        self.out.extend_from_slice(header_json);
        Ok(())
    }

    /// Send what is queued, within the write timeout.
    ///
    /// # Errors
    /// The write fails or times out.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let dur = self.write_timeout;
        let Conn { stream, out, .. } = self;
        // A reply usually fits the socket buffer at once: try that before arming a timer.
        let sent = match stream.try_write(out) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e.into()),
        };
        if sent == out.len() {
            out.clear();
            return Ok(());
        }
        tokio::time::timeout(dur, stream.write_all(&out[sent..]))
            .await
            .map_err(|_| FrameError::Timeout("a reply to be written"))??;
        self.out.clear();
        Ok(())
    }
}
