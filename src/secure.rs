//! Identity and the secure channel between peers.
//!
//! - **Identity.** Each data dir holds an Ed25519 key (`identity.key`, mode 0600, made at first
//!   start). The peer id is the public key in hex (64 digits), so an id cannot be used without
//!   its key; [`fingerprint`] is its short form for tables.
//! - **Channel.** Every peer connection is a Noise `XX` handshake (the `snow` crate:
//!   X25519, AES-256-GCM, SHA-256), then every byte is encrypted and authenticated. The Noise
//!   static key is made per daemon start and signed by the Ed25519 identity; each side sends
//!   its identity and that signature inside the handshake (encrypted), and the other checks it,
//!   so the channel is bound to the key behind the peer id (the libp2p-noise construction).
//!   AES-GCM because these CPUs have AES-NI and carry-less multiply: it costs a fraction of
//!   the SHA-256 every piece already pays. Transport messages are a 2-byte length and at most
//!   65,535 bytes of ciphertext; the frame layer runs on top unchanged.
//! - A connection starts with an 8-byte magic, so a peer speaking the old plaintext protocol is
//!   recognized and refused with a plain ERROR frame saying why.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What an initiator sends first.
pub const MAGIC: &[u8; 8] = b"SHOALNX1";
const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
const MAX_MSG: usize = 65535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_MSG - TAG;
/// Signed with the identity key, with the Noise static key after it.
const STATIC_CONTEXT: &[u8] = b"shoal-noise-static-key-v1:";
/// Name of the identity key file in a data dir.
pub const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("handshake failed: {0}")]
    Noise(String),
    #[error("the peer speaks the old plaintext protocol")]
    Plaintext,
    #[error("not a shoal peer (bad magic)")]
    BadMagic,
    #[error("the peer's identity does not check: {0}")]
    BadIdentity(String),
}

impl From<snow::Error> for SecureError {
    fn from(e: snow::Error) -> Self {
        SecureError::Noise(e.to_string())
    }
}

/// This peer's long-term identity.
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// Load the data dir's key, or make one (0600) at first start.
    ///
    /// # Errors
    /// The key file cannot be read or written, or is damaged.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Identity> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join(IDENTITY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let bytes: [u8; 32] = hex::decode(s.trim())
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| anyhow::anyhow!("{} is damaged", path.display()))?;
                Ok(Identity {
                    key: SigningKey::from_bytes(&bytes),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&tmp)?;
                f.write_all(hex::encode(key.to_bytes()).as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                crate::fsutil::sync_dir(data_dir)?;
                Ok(Identity { key })
            }
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        }
    }

    /// A fresh identity (tests, benches).
    pub fn generate() -> Identity {
        Identity {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// The peer id: the public key in hex.
    pub fn peer_id(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.key.sign(msg).to_bytes()
    }

    /// The key itself (the tracker client signs announces with it).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }
}

/// The short form of a peer id (or any key) for tables: its first 16 hex digits.
pub fn fingerprint(peer_id: &str) -> String {
    peer_id.chars().take(16).collect()
}

/// Check `sig` (hex) over `msg` by the key named by `peer_id` (64 hex digits).
///
/// # Errors
/// The id is not a key, the signature is malformed, or it does not verify.
pub fn verify(peer_id: &str, msg: &[u8], sig_hex: &str) -> Result<(), String> {
    let key: [u8; 32] = hex::decode(peer_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("the peer id is not an Ed25519 public key (64 hex digits)")?;
    let key = VerifyingKey::from_bytes(&key).map_err(|e| e.to_string())?;
    let sig: [u8; 64] = hex::decode(sig_hex)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or("the signature is not 128 hex digits")?;
    key.verify(msg, &Signature::from_bytes(&sig))
        .map_err(|_| "the signature does not verify".to_string())
}

/// The per-start Noise key and the identity's signature of it.
pub struct NoiseKeys {
    private: Vec<u8>,
    /// Identity public key (32) + signature of the static key (64).
    payload: Vec<u8>,
}

impl NoiseKeys {
    /// # Panics
    /// The Noise parameters fail to parse (a constant).
    pub fn new(id: &Identity) -> NoiseKeys {
        let builder = snow::Builder::new(NOISE_PARAMS.parse().expect("valid Noise params"));
        let kp = builder.generate_keypair().expect("keypair");
        let mut msg = STATIC_CONTEXT.to_vec();
        msg.extend_from_slice(&kp.public);
        let mut payload = id.key.verifying_key().to_bytes().to_vec();
        payload.extend_from_slice(&id.sign(&msg));
        NoiseKeys {
            private: kp.private,
            payload,
        }
    }
}

/// Check a handshake payload against the remote's Noise static key; returns its peer id.
fn check_payload(payload: &[u8], remote_static: &[u8]) -> Result<String, SecureError> {
    if payload.len() != 96 {
        return Err(SecureError::BadIdentity(format!(
            "identity payload of {} bytes, expected 96",
            payload.len()
        )));
    }
    let id = hex::encode(&payload[..32]);
    let mut msg = STATIC_CONTEXT.to_vec();
    msg.extend_from_slice(remote_static);
    verify(&id, &msg, &hex::encode(&payload[32..])).map_err(SecureError::BadIdentity)?;
    Ok(id)
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(2 + m.len());
    buf.extend_from_slice(&(m.len() as u16).to_be_bytes());
    buf.extend_from_slice(m);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    r.read_exact(buf).await?;
    Ok(())
}

/// An established channel: the two halves and the remote's authenticated peer id.
pub struct Channel<R, W> {
    pub reader: SecureRead<R>,
    pub writer: SecureWrite<W>,
    pub remote_id: String,
}

/// Dial side of the handshake (the caller bounds it with a timeout).
///
/// # Errors
/// I/O, a failed handshake, or an identity that does not check.
pub async fn initiate<R, W>(
    mut r: R,
    mut w: W,
    keys: &NoiseKeys,
) -> Result<Channel<R, W>, SecureError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = snow::Builder::new(NOISE_PARAMS.parse().expect("valid Noise params"))
        .local_private_key(&keys.private)
        .build_initiator()?;
    let mut out = vec![0u8; MAX_MSG];
    let mut inb = Vec::new();
    let mut payload = vec![0u8; MAX_MSG];
    // -> magic, e
    let n = hs.write_message(&[], &mut out)?;
    let mut first = MAGIC.to_vec();
    first.extend_from_slice(&(n as u16).to_be_bytes());
    first.extend_from_slice(&out[..n]);
    w.write_all(&first).await?;
    w.flush().await?;
    // <- e, ee, s, es + responder identity
    read_msg(&mut r, &mut inb).await?;
    let n = hs.read_message(&inb, &mut payload)?;
    let remote_id = remote_identity(&hs, &payload[..n])?;
    // -> s, se + our identity
    let n = hs.write_message(&keys.payload, &mut out)?;
    write_msg(&mut w, &out[..n]).await?;
    channel(hs, r, w, remote_id)
}

/// Accept side of the handshake (the caller bounds it with a timeout). A peer speaking the
/// old plaintext protocol gets a plain ERROR frame saying why.
///
/// # Errors
/// I/O, a plaintext or foreign peer, a failed handshake, or an identity that does not check.
pub async fn respond<R, W>(
    mut r: R,
    mut w: W,
    keys: &NoiseKeys,
) -> Result<Channel<R, W>, SecureError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        // A plaintext frame starts with a 4-byte length and a JSON object.
        if magic[4] == b'{' {
            let reason = "this peer accepts encrypted connections only (Noise XX); upgrade shoal";
            let body = serde_json::json!({"type": "ERROR", "reason": reason}).to_string();
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body.as_bytes());
            let _ = w.write_all(&f).await; // Best effort: we are closing anyway.
            let _ = w.flush().await;
            return Err(SecureError::Plaintext);
        }
        return Err(SecureError::BadMagic);
    }
    let mut hs = snow::Builder::new(NOISE_PARAMS.parse().expect("valid Noise params"))
        .local_private_key(&keys.private)
        .build_responder()?;
    let mut out = vec![0u8; MAX_MSG];
    let mut inb = Vec::new();
    let mut payload = vec![0u8; MAX_MSG];
    read_msg(&mut r, &mut inb).await?;
    hs.read_message(&inb, &mut payload)?;
    let n = hs.write_message(&keys.payload, &mut out)?;
    write_msg(&mut w, &out[..n]).await?;
    read_msg(&mut r, &mut inb).await?;
    let n = hs.read_message(&inb, &mut payload)?;
    let remote_id = remote_identity(&hs, &payload[..n])?;
    channel(hs, r, w, remote_id)
}

/// The remote's peer id, from its handshake payload checked against its Noise static key.
fn remote_identity(hs: &snow::HandshakeState, payload: &[u8]) -> Result<String, SecureError> {
    let remote_static = hs
        .get_remote_static()
        .ok_or_else(|| SecureError::Noise("no remote static key".into()))?;
    check_payload(payload, remote_static)
}

fn channel<R, W>(
    hs: snow::HandshakeState,
    r: R,
    w: W,
    remote_id: String,
) -> Result<Channel<R, W>, SecureError> {
    let ts = Arc::new(hs.into_stateless_transport_mode()?);
    Ok(Channel {
        reader: SecureRead::new(r, ts.clone()),
        writer: SecureWrite::new(w, ts),
        remote_id,
    })
}

/// The reading half: decrypts transport messages and serves their plaintext.
pub struct SecureRead<R> {
    inner: R,
    ts: Arc<snow::StatelessTransportState>,
    nonce: u64,
    /// Ciphertext being read: length prefix then message.
    cbuf: Vec<u8>,
    cfill: usize,
    /// Decrypted bytes not yet handed out.
    pbuf: Vec<u8>,
    ppos: usize,
    plen: usize,
}

impl<R> SecureRead<R> {
    fn new(inner: R, ts: Arc<snow::StatelessTransportState>) -> Self {
        SecureRead {
            inner,
            ts,
            nonce: 0,
            cbuf: vec![0u8; 2 + MAX_MSG],
            cfill: 0,
            pbuf: vec![0u8; MAX_MSG],
            ppos: 0,
            plen: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for SecureRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        loop {
            if me.ppos < me.plen {
                let n = (me.plen - me.ppos).min(out.remaining());
                out.put_slice(&me.pbuf[me.ppos..me.ppos + n]);
                me.ppos += n;
                return Poll::Ready(Ok(()));
            }
            // Read the 2-byte length, then the message; EOF between messages is a clean end.
            let want = if me.cfill < 2 {
                2
            } else {
                2 + usize::from(u16::from_be_bytes([me.cbuf[0], me.cbuf[1]]))
            };
            if me.cfill < want {
                let mut rb = ReadBuf::new(&mut me.cbuf[me.cfill..want]);
                ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
                let got = rb.filled().len();
                if got == 0 {
                    if me.cfill == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside an encrypted message",
                    )));
                }
                me.cfill += got;
                continue;
            }
            if want == 2 {
                // A zero-length message cannot carry a tag.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "empty encrypted message",
                )));
            }
            let n = me
                .ts
                .read_message(me.nonce, &me.cbuf[2..want], &mut me.pbuf)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "an encrypted message failed authentication",
                    )
                })?;
            me.nonce += 1;
            me.cfill = 0;
            me.ppos = 0;
            me.plen = n;
        }
    }
}

/// The writing half: gathers plaintext into messages of at most 65,519 bytes, encrypts each.
pub struct SecureWrite<W> {
    inner: W,
    ts: Arc<snow::StatelessTransportState>,
    nonce: u64,
    plain: Vec<u8>,
    /// Sealed bytes (length + ciphertext) not yet written.
    sealed: Vec<u8>,
    spos: usize,
}

impl<W> SecureWrite<W> {
    fn new(inner: W, ts: Arc<snow::StatelessTransportState>) -> Self {
        SecureWrite {
            inner,
            ts,
            nonce: 0,
            plain: Vec::with_capacity(MAX_PLAIN),
            sealed: Vec::with_capacity(4 * (2 + MAX_MSG)),
            spos: 0,
        }
    }

    fn seal(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let at = self.sealed.len();
        self.sealed.resize(at + 2 + self.plain.len() + TAG, 0);
        let n = self
            .ts
            .write_message(self.nonce, &self.plain, &mut self.sealed[at + 2..])
            .map_err(|e| io::Error::other(format!("encrypting: {e}")))?;
        self.sealed[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.sealed.truncate(at + 2 + n);
        self.nonce += 1;
        self.plain.clear();
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> SecureWrite<W> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.spos < self.sealed.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.sealed[self.spos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.spos += n;
        }
        self.sealed.clear();
        self.spos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SecureWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        // Keep at most a few sealed messages queued before pushing them out.
        if me.sealed.len() - me.spos >= 4 * MAX_MSG {
            ready!(me.poll_drain(cx))?;
        }
        let n = buf.len().min(MAX_PLAIN - me.plain.len());
        me.plain.extend_from_slice(&buf[..n]);
        if me.plain.len() == MAX_PLAIN {
            me.seal()?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        me.seal()?;
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_should_carry_bytes_both_ways_and_name_each_side() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        let (ka, kb) = (NoiseKeys::new(&ia), NoiseKeys::new(&ib));
        let (ca, cb) = tokio::join!(initiate(ar, aw, &ka), respond(br, bw, &kb));
        let (mut ca, mut cb) = (ca.unwrap(), cb.unwrap());
        assert_eq!(ca.remote_id, ib.peer_id());
        assert_eq!(cb.remote_id, ia.peer_id());
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = async {
            ca.writer.write_all(&big).await.unwrap();
            ca.writer.flush().await.unwrap();
        };
        let recv = async {
            let mut got = vec![0u8; big.len()];
            cb.reader.read_exact(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert_eq!(got, big);
        cb.writer.write_all(b"pong").await.unwrap();
        cb.writer.flush().await.unwrap();
        let mut p = [0u8; 4];
        ca.reader.read_exact(&mut p).await.unwrap();
        assert_eq!(&p, b"pong");
    }

    #[tokio::test]
    async fn it_should_refuse_an_identity_that_did_not_sign_the_static_key() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (ia, ib) = (Identity::generate(), Identity::generate());
        // Claims ia's identity with a static key ia never signed.
        let mut forged = NoiseKeys::new(&ib);
        forged.payload[..32].copy_from_slice(&hex::decode(ia.peer_id()).unwrap());
        let honest = NoiseKeys::new(&ia);
        let (_, cb) = tokio::join!(initiate(ar, aw, &forged), respond(br, bw, &honest));
        assert!(
            matches!(cb, Err(SecureError::BadIdentity(_))),
            "{:?}",
            cb.err()
        );
    }

    #[tokio::test]
    async fn it_should_answer_a_plaintext_peer_with_a_plain_error() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut ar, mut aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let hello = br#"{"type":"HELLO","v":1}"#;
        let mut f = (hello.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(hello);
        aw.write_all(&f).await.unwrap();
        let k = NoiseKeys::new(&Identity::generate());
        let r = respond(br, bw, &k).await;
        assert!(matches!(r, Err(SecureError::Plaintext)));
        let mut len = [0u8; 4];
        ar.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        ar.read_exact(&mut body).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("encrypted connections only"));
    }
}
