//! The frame codec shared by every shoal connection (peer to peer, peer to tracker).
//!
//! A frame is a 4-byte big-endian header length, a UTF-8 JSON object whose `"type"` names the
//! message, then, when the header has a `"len"` field, exactly that many payload bytes.
//!
//! Two layers, as in mini-redis: [`decode`] is pure (bytes in, a frame and the bytes consumed
//! out, `Ok(None)` for "need more"), and [`Connection`] owns a socket and reads frames with
//! timeouts. Both go through [`parse_header`], so the limits are checked in exactly one place and
//! always before anything is allocated for the header or the payload.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

/// Bytes of the header length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;
/// Largest JSON header accepted or sent.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Largest payload accepted or sent: the largest legal piece.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Limits a reader enforces; a connection may be stricter than the protocol maxima (a tracker
/// never expects a payload at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: MAX_HEADER_BYTES,
            max_payload_bytes: MAX_PAYLOAD_BYTES,
        }
    }
}

impl Limits {
    /// Limits for a connection that never carries payloads (the tracker).
    pub fn headers_only() -> Self {
        Self {
            max_header_bytes: MAX_HEADER_BYTES,
            max_payload_bytes: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame header of {len} bytes is over the limit of {max} bytes")]
    HeaderTooLarge { len: usize, max: usize },
    #[error("frame header is empty")]
    EmptyHeader,
    #[error("frame payload of {len} bytes is over the limit of {max} bytes")]
    PayloadTooLarge { len: u64, max: usize },
    #[error("frame header is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("frame header is not a JSON object")]
    NotAnObject,
    #[error("frame header has no string field \"type\"")]
    MissingType,
    #[error("frame header field \"len\" is not a non-negative integer")]
    BadLen,
    #[error("connection closed in the middle of a frame ({context})")]
    UnexpectedEof { context: &'static str },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the peer sent something malformed (as opposed to a transport failure); such
    /// errors deserve an `ERROR` frame before the close.
    pub fn is_protocol_violation(&self) -> bool {
        !matches!(
            self,
            FrameError::Io(_) | FrameError::UnexpectedEof { .. } | FrameError::Timeout(_)
        )
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The JSON header as received (an object with a string `type`, already checked).
    pub header: Bytes,
    kind: String,
    /// The payload: empty unless the header had `len`.
    pub payload: Bytes,
}

impl Frame {
    /// The message type named by the header.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Decode the header into a typed message, straight from the bytes (no intermediate
    /// `Value`: this is the hot path of the tracker).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.header)
    }

    /// The header as a JSON value (for tools and tests).
    pub fn header_value(&self) -> Value {
        serde_json::from_slice(&self.header).expect("checked when decoded")
    }
}

/// The fields every header has, read without building a map.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    len: Option<u64>,
}

/// Validate a header length prefix against the limits.
pub fn check_header_len(len: usize, limits: &Limits) -> Result<(), FrameError> {
    if len == 0 {
        return Err(FrameError::EmptyHeader);
    }
    if len > limits.max_header_bytes {
        return Err(FrameError::HeaderTooLarge {
            len,
            max: limits.max_header_bytes,
        });
    }
    Ok(())
}

/// Validate a header; returns its type with the payload length it announces, already checked
/// against the limits.
pub fn parse_header(bytes: &[u8], limits: &Limits) -> Result<(String, usize), FrameError> {
    let env: Envelope = match serde_json::from_slice(bytes) {
        Ok(e) => e,
        Err(_) => return Err(diagnose(bytes)),
    };
    let payload_len = match env.len {
        None => 0,
        Some(len) => {
            if len > limits.max_payload_bytes as u64 {
                return Err(FrameError::PayloadTooLarge {
                    len,
                    max: limits.max_payload_bytes,
                });
            }
            // Bounded by max_payload_bytes above, so it fits in usize.
            len as usize
        }
    };
    Ok((env.kind, payload_len))
}

/// Why a header failed the fast parse (the slow path, for bad input only).
fn diagnose(bytes: &[u8]) -> FrameError {
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return FrameError::InvalidJson(e),
    };
    let Value::Object(map) = value else {
        return FrameError::NotAnObject;
    };
    if !map.get("type").is_some_and(Value::is_string) {
        return FrameError::MissingType;
    }
    FrameError::BadLen
}

/// Decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more and call again), and
/// `Ok(Some((frame, consumed)))` otherwise. An error means the stream is garbage and the
/// connection must close.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX_BYTES) else {
        return Ok(None);
    };
    let header_len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    check_header_len(header_len, limits)?;
    let header_end = LEN_PREFIX_BYTES + header_len;
    let Some(header_bytes) = buf.get(LEN_PREFIX_BYTES..header_end) else {
        return Ok(None);
    };
    let (kind, payload_len) = parse_header(header_bytes, limits)?;
    let frame_end = header_end + payload_len;
    let Some(payload) = buf.get(header_end..frame_end) else {
        return Ok(None);
    };
    Ok(Some((
        Frame {
            header: Bytes::copy_from_slice(header_bytes),
            kind,
            payload: Bytes::copy_from_slice(payload),
        },
        frame_end,
    )))
}

/// Encode a frame. `header` must serialize to a JSON object with a `type`; when `payload` is
/// not empty, callers put its length in the header's `len` field (the typed messages do).
///
/// # Errors
/// The header or payload is over the protocol limits, or does not serialize.
pub fn encode(
    header: &impl Serialize,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let json = serde_json::to_vec(header).map_err(FrameError::InvalidJson)?;
    check_header_len(json.len(), &Limits::default())?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(FrameError::PayloadTooLarge {
            len: payload.len() as u64,
            max: MAX_PAYLOAD_BYTES,
        });
    }
    out.reserve(LEN_PREFIX_BYTES + json.len() + payload.len());
    #[allow(clippy::cast_possible_truncation)] // checked against MAX_HEADER_BYTES above
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(payload);
    Ok(())
}

/// Run `fut` with a deadline, naming what was awaited when it expires.
pub async fn with_timeout<T>(
    what: &'static str,
    dur: Duration,
    fut: impl std::future::Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    match tokio::time::timeout(dur, fut).await {
        Ok(r) => r,
        Err(_) => Err(FrameError::Timeout(what)),
    }
}

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long to wait for the first byte of the next frame.
    pub idle: Duration,
    /// How long the rest of a frame may take once it has started.
    pub read: Duration,
}

/// The reading half of a framed connection.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    limits: Limits,
    timeouts: Timeouts,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, limits: Limits, timeouts: Timeouts) -> Self {
        Self {
            // Large enough that a stream of small frames needs few syscalls; payloads bypass it.
            inner: BufReader::with_capacity(64 * 1024, inner),
            limits,
            timeouts,
        }
    }

    /// Whether bytes of a next frame are already buffered (a pipelined request).
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }

    pub fn set_timeouts(&mut self, timeouts: Timeouts) {
        self.timeouts = timeouts;
    }

    /// Read the next frame. `Ok(None)` is a clean close between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.read_frame_observing(|_, _| {}).await
    }

    /// Like [`FrameReader::read_frame`], and hand each run of payload bytes (with the frame's
    /// type) to `observe` as soon as it is read, while it is still in this core's cache (a peer hashes pieces this
    /// way: hashing them later, on another thread, measured 30% slower).
    pub async fn read_frame_observing(
        &mut self,
        mut observe: impl FnMut(&str, &[u8]),
    ) -> Result<Option<Frame>, FrameError> {
        let mut prefix = [0u8; LEN_PREFIX_BYTES];
        // The first byte may take as long as the idle timeout; the rest of the frame must follow
        // within the read timeout.
        let first = with_timeout("the next frame", self.timeouts.idle, async {
            Ok(self.inner.read(&mut prefix[..1]).await?)
        })
        .await?;
        if first == 0 {
            return Ok(None);
        }
        let read_timeout = self.timeouts.read;
        let limits = self.limits;
        let inner = &mut self.inner;
        with_timeout("the rest of a frame", read_timeout, async move {
            read_exact(inner, &mut prefix[1..], "length prefix").await?;
            let header_len = u32::from_be_bytes(prefix) as usize;
            check_header_len(header_len, &limits)?;
            let mut header_bytes = vec![0u8; header_len];
            read_exact(inner, &mut header_bytes, "header").await?;
            let (kind, payload_len) = parse_header(&header_bytes, &limits)?;
            let payload = if payload_len == 0 {
                Bytes::new()
            } else {
                // The length is checked against the limits above: only now is it allocated.
                let mut buf = Vec::with_capacity(payload_len);
                read_payload(inner, &mut buf, payload_len, &mut |b| observe(&kind, b)).await?;
                Bytes::from(buf)
            };
            Ok(Some(Frame {
                header: Bytes::from(header_bytes),
                kind,
                payload,
            }))
        })
        .await
    }
}

/// Read exactly `len` bytes into the empty `buf` (whose capacity is reserved), straight into
/// its spare capacity: zero-filling a payload buffer first cost a memset per byte received.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    len: usize,
    observe: &mut impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    use bytes::BufMut;
    while buf.len() < len {
        // At most 256 KiB per read, so an observer (a hash) holds the task for ~0.15 ms at a
        // time, not for a whole 16 MiB payload.
        let (from, want) = (buf.len(), (len - buf.len()).min(256 * 1024));
        if r.read_buf(&mut (&mut *buf).limit(want)).await? == 0 {
            return Err(FrameError::UnexpectedEof { context: "payload" });
        }
        observe(&buf[from..]);
    }
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    context: &'static str,
) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(FrameError::UnexpectedEof { context })
        }
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// The writing half of a framed connection.
pub struct FrameWriter<W> {
    inner: BufWriter<W>,
    scratch: Vec<u8>,
    write_timeout: Duration,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, write_timeout: Duration) -> Self {
        Self {
            inner: BufWriter::with_capacity(64 * 1024, inner),
            scratch: Vec::new(),
            write_timeout,
        }
    }

    /// Queue a frame without flushing; call [`FrameWriter::flush`] after a batch.
    pub async fn feed(
        &mut self,
        header: &impl Serialize,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        self.scratch.clear();
        // The header goes through the scratch buffer; a large payload is written straight
        // through (BufWriter passes writes larger than its buffer to the socket) so piece bytes
        // are not copied once more.
        encode(header, &[], &mut self.scratch)?;
        if !payload.is_empty() && payload.len() > MAX_PAYLOAD_BYTES {
            return Err(FrameError::PayloadTooLarge {
                len: payload.len() as u64,
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let dur = self.write_timeout;
        let scratch = &self.scratch;
        let inner = &mut self.inner;
        with_timeout("a frame to be written", dur, async move {
            inner.write_all(scratch).await?;
            if !payload.is_empty() {
                inner.write_all(payload).await?;
            }
            Ok(())
        })
        .await
    }

    /// Queue a frame whose header is already JSON (no payload), without flushing.
    ///
    /// # Errors
    /// The header is over the limit, or the write fails or times out.
    pub async fn feed_raw_header(&mut self, header_json: &[u8]) -> Result<(), FrameError> {
        check_header_len(header_json.len(), &Limits::default())?;
        let dur = self.write_timeout;
        let inner = &mut self.inner;
        #[allow(clippy::cast_possible_truncation)] // checked against MAX_HEADER_BYTES above
        let prefix = (header_json.len() as u32).to_be_bytes();
        with_timeout("a frame to be written", dur, async move {
            inner.write_all(&prefix).await?;
            inner.write_all(header_json).await?;
            Ok(())
        })
        .await
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        let dur = self.write_timeout;
        with_timeout("a flush", dur, async { Ok(self.inner.flush().await?) }).await
    }

    /// Write one frame and flush it.
    pub async fn send(
        &mut self,
        header: &impl Serialize,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        self.feed(header, payload).await?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn enc(header: Value, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&header, payload, &mut out).unwrap();
        out
    }

    #[test]
    fn it_should_round_trip_a_frame_with_payload() {
        let bytes = enc(json!({"type":"PIECE","index":3,"len":5}), b"hello");
        let (frame, used) = decode(&bytes, &Limits::default()).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame.kind(), "PIECE");
        assert_eq!(&frame.payload[..], b"hello");
    }

    #[test]
    fn it_should_ask_for_more_at_every_split_point() {
        let bytes = enc(json!({"type":"PIECE","index":3,"len":4}), b"abcd");
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], &Limits::default()).unwrap().is_none(),
                "cut at {cut} should be incomplete"
            );
        }
        assert!(decode(&bytes, &Limits::default()).unwrap().is_some());
    }

    #[test]
    fn it_should_refuse_an_oversize_header_before_reading_it() {
        let mut bytes = ((MAX_HEADER_BYTES + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{");
        assert!(matches!(
            decode(&bytes, &Limits::default()),
            Err(FrameError::HeaderTooLarge { .. })
        ));
    }

    #[test]
    fn it_should_refuse_an_oversize_payload_before_reading_it() {
        let bytes = enc(json!({"type":"PIECE","len": MAX_PAYLOAD_BYTES + 1}), b"");
        assert!(matches!(
            decode(&bytes, &Limits::default()),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        let small = enc(json!({"type":"ANNOUNCE","len": 1}), b"");
        assert!(matches!(
            decode(&small, &Limits::headers_only()),
            Err(FrameError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn it_should_refuse_garbage_headers() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"not json", "json"),
            (b"[1,2]", "object"),
            (b"{\"x\":1}", "type"),
            (b"{\"type\":5}", "type"),
            (b"{\"type\":\"A\",\"len\":-1}", "len"),
            (b"{\"type\":\"A\",\"len\":\"3\"}", "len"),
            (b"\xff\xfe", "json"),
        ];
        for (header, what) in cases {
            let mut bytes = (header.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(header);
            let err = decode(&bytes, &Limits::default()).unwrap_err();
            assert!(err.is_protocol_violation(), "{what}: {err}");
        }
        assert!(matches!(
            decode(&[0, 0, 0, 0], &Limits::default()),
            Err(FrameError::EmptyHeader)
        ));
    }

    #[tokio::test]
    async fn it_should_tell_a_clean_close_from_a_torn_frame() {
        let bytes = enc(json!({"type":"PIECE","len":4}), b"abcd");
        let t = Timeouts {
            idle: Duration::from_secs(1),
            read: Duration::from_secs(1),
        };
        let mut r = FrameReader::new(&bytes[..], Limits::default(), t);
        assert!(r.read_frame().await.unwrap().is_some());
        assert!(r.read_frame().await.unwrap().is_none());
        let torn = &bytes[..bytes.len() - 1];
        let mut r = FrameReader::new(torn, Limits::default(), t);
        assert!(matches!(
            r.read_frame().await,
            Err(FrameError::UnexpectedEof { context: "payload" })
        ));
    }

    #[tokio::test]
    async fn it_should_time_out_a_silent_connection() {
        let (_client, server) = tokio::io::duplex(64);
        let t = Timeouts {
            idle: Duration::from_millis(50),
            read: Duration::from_millis(50),
        };
        let mut r = FrameReader::new(server, Limits::default(), t);
        assert!(matches!(r.read_frame().await, Err(FrameError::Timeout(_))));
    }

    #[tokio::test]
    async fn it_should_write_what_it_reads() {
        // A small pipe: the payload arrives in many odd-sized reads.
        let (client, server) = tokio::io::duplex(997);
        let mut w = FrameWriter::new(client, Duration::from_secs(1));
        let t = Timeouts {
            idle: Duration::from_secs(1),
            read: Duration::from_secs(1),
        };
        let mut r = FrameReader::new(server, Limits::default(), t);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            w.send(
                &json!({"type":"PIECE","index":1,"len":payload.len()}),
                &payload,
            )
            .await
            .unwrap();
            w.send(&json!({"type":"HAVE","index":2}), &[])
                .await
                .unwrap();
        });
        // The observer sees every payload byte once, in order.
        let mut seen = Vec::new();
        let f = r
            .read_frame_observing(|_, b| seen.extend_from_slice(b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&f.payload[..], &expected[..]);
        assert_eq!(seen, expected);
        let f = r.read_frame().await.unwrap().unwrap();
        assert_eq!(f.kind(), "HAVE");
        writer.await.unwrap();
    }

    proptest! {
        #[test]
        fn prop_round_trip(kind in "[A-Z_]{1,12}", n in any::<u64>(), s in ".{0,40}",
                           payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let header = if payload.is_empty() {
                json!({"type": kind, "n": n, "s": s})
            } else {
                json!({"type": kind, "n": n, "s": s, "len": payload.len()})
            };
            let bytes = enc(header.clone(), &payload);
            let (frame, used) = decode(&bytes, &Limits::default()).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(frame.header_value(), header);
            prop_assert_eq!(&frame.payload[..], &payload[..]);
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes, &Limits::default());
        }
    }
}
