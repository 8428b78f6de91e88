//! Peer keys, shared by the tracker and the peer crate (which cannot be depended on from here).
//!
//! A peer id that is a key is its Ed25519 public key in hex: 64 lower-case digits. Whoever
//! speaks for such an id must hold the key. Only the lower-case spelling is a key, so one key
//! has one id (an upper-case spelling would otherwise be a second id for the same key).

use ed25519_dalek::{Signature, VerifyingKey};

/// Digit values of hex characters; 0x10 marks a non-digit (the `hex` crate's general decoder
/// was a visible part of every announce, which decodes several of these).
const HEX_LOWER: [u8; 256] = hex_table(false);
const HEX_ANY: [u8; 256] = hex_table(true);

const fn hex_table(upper: bool) -> [u8; 256] {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        if upper {
            t[b'A' as usize + i] = 10 + i as u8;
        }
        i += 1;
    }
    t
}

fn decode32(s: &str, table: &[u8; 256]) -> Option<[u8; 32]> {
    let b: &[u8; 64] = s.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let (h, l) = (table[usize::from(pair[0])], table[usize::from(pair[1])]);
        bad |= h | l;
        *o = (h << 4) | l;
    }
    (bad & 0x10 == 0).then_some(out)
}

/// The 32 bytes behind 64 lower-case hex digits.
pub fn hex32(s: &str) -> Option<[u8; 32]> {
    decode32(s, &HEX_LOWER)
}

/// The 32 bytes behind 64 hex digits of either case (an info hash).
pub fn hex32_any_case(s: &str) -> Option<[u8; 32]> {
    decode32(s, &HEX_ANY)
}

/// The public key a peer id names: 64 lower-case hex digits of a valid Ed25519 point that is
/// not of small order (a small-order key lets anyone make signatures that verify).
pub fn verifying_key(peer_id: &str) -> Option<VerifyingKey> {
    let key = VerifyingKey::from_bytes(&hex32(peer_id)?).ok()?;
    (!key.is_weak()).then_some(key)
}

/// Whether `peer_id` is a key (see [`verifying_key`]).
pub fn is_key(peer_id: &str) -> bool {
    verifying_key(peer_id).is_some()
}

/// Whether `peer_id` is shaped like a key (64 hex digits in any case), valid point or not. A
/// tracker never accepts such an id unsigned, so nobody can claim a key's id by spelling it.
pub fn looks_like_key(peer_id: &str) -> bool {
    peer_id.len() == 64 && peer_id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The short form of a peer id (or any key) for tables: its first 16 hex digits.
pub fn fingerprint(peer_id: &str) -> String {
    peer_id.chars().take(16).collect()
}

/// Parse a signature from 128 hex digits.
///
/// # Errors
/// Not 128 hex digits.
pub fn signature(sig_hex: &str) -> Result<Signature, String> {
    let mut sig = [0u8; 64];
    if sig_hex.len() != 128 || hex::decode_to_slice(sig_hex, &mut sig).is_err() {
        return Err("the signature is not 128 hex digits".into());
    }
    Ok(Signature::from_bytes(&sig))
}

/// Check `sig` (hex) over `msg` by the key named by `peer_id` (64 hex digits). Strict
/// verification: no malleable signatures, no small-order keys.
///
/// # Errors
/// The id is not a key, the signature is malformed, or it does not verify.
pub fn verify(peer_id: &str, msg: &[u8], sig_hex: &str) -> Result<(), String> {
    let key = verifying_key(peer_id)
        .ok_or("the peer id is not an Ed25519 public key (64 lower-case hex digits)")?;
    key.verify_strict(msg, &signature(sig_hex)?)
        .map_err(|_| "the signature does not verify".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    #[test]
    fn ids_are_lower_case_hex_of_valid_points() {
        let k = key();
        let id = hex::encode(k.verifying_key().to_bytes());
        assert!(is_key(&id));
        assert!(looks_like_key(&id));
        assert!(!is_key(&id.to_uppercase()));
        assert!(looks_like_key(&id.to_uppercase()));
        assert!(!is_key(&id[..63]));
        assert!(!is_key("shoal-0123"));
        // The identity point has small order: anyone could sign for it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(!is_key(&hex::encode(identity)));
        // Not every 32 bytes decompress to a point; find one that does not.
        let bad = (0u8..=255)
            .map(|b| hex::encode([b; 32]))
            .find(|h| VerifyingKey::from_bytes(&hex32(h).unwrap()).is_err())
            .expect("some byte pattern is not a point");
        assert!(!is_key(&bad));
        assert!(looks_like_key(&bad));
    }

    #[test]
    fn fingerprint_is_the_first_16_digits() {
        assert_eq!(fingerprint(&"ab".repeat(32)), "abababababababab");
        assert_eq!(fingerprint("short"), "short");
    }

    #[test]
    fn verify_accepts_the_key_and_nothing_else() {
        let k = key();
        let id = hex::encode(k.verifying_key().to_bytes());
        let sig = hex::encode(k.sign(b"hello").to_bytes());
        assert_eq!(verify(&id, b"hello", &sig), Ok(()));
        assert!(verify(&id, b"hellO", &sig).is_err());
        let other = hex::encode(key().verifying_key().to_bytes());
        assert!(verify(&other, b"hello", &sig).is_err());
        assert!(verify(&id, b"hello", &sig[..126]).is_err());
        assert!(verify(&id, b"hello", "zz").is_err());
        assert!(verify("not-a-key", b"hello", &sig).is_err());
    }

    #[test]
    fn it_should_decode_hex_like_the_hex_crate() {
        let lower = hex::encode([0xa5u8, 0x0f].repeat(16));
        let want: [u8; 32] = [0xa5u8, 0x0f].repeat(16).try_into().unwrap();
        assert_eq!(hex32(&lower), Some(want));
        assert_eq!(hex32(&lower.to_uppercase()), None);
        assert_eq!(hex32_any_case(&lower.to_uppercase()), Some(want));
        assert_eq!(hex32(&lower[..62]), None);
        for bad in ["g", "G", " ", "/", ":", "@", "`", "\u{e9}"] {
            let s = format!("{bad}{}", &lower[bad.len()..]);
            assert_eq!(hex32_any_case(&s), None, "{s}");
        }
    }
}
