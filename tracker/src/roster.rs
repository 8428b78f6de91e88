//! Private swarms: the authority and its signed, versioned roster of members.
//!
//! A private swarm is named by an *authority*, an Ed25519 public key. Its info hash covers the
//! authority ([`private_info_hash`]), so nobody can claim another authority for the same hash.
//! Membership is a [`Roster`]: the sorted member ids, a version, and the authority's signature.
//! Anyone may carry a roster (peers gossip it, trackers serve it); a receiver keeps one only if
//! it verifies and its version is higher than the one it holds. Revoking a member is publishing
//! a higher version without it.

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys;

/// Most members a roster lists (bounds its size to about 270 KiB of JSON).
pub const MAX_MEMBERS: usize = 4096;
const HASH_TAG: &[u8] = b"shoal-private-v1\0";
const ROSTER_TAG: &[u8] = b"shoal-roster-v1\0";

/// The info hash of a private swarm: SHA-256("shoal-private-v1\0" || content || authority key
/// bytes), where `content` is the descriptor's ordinary (public) info hash. A tracker told
/// (content, authority) can check them against the info hash without the descriptor.
///
/// # Errors
/// `authority` is not a key.
pub fn private_info_hash(content: &[u8; 32], authority: &str) -> Result<[u8; 32], String> {
    if !keys::is_key(authority) {
        return Err("the authority is not an Ed25519 public key (64 lower-case hex)".into());
    }
    let auth = keys::hex32(authority).expect("is_key checked the digits");
    let mut h = Sha256::new();
    h.update(HASH_TAG);
    h.update(content);
    h.update(auth);
    Ok(h.finalize().into())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// 64 hex: the private info hash.
    pub info_hash: String,
    /// 64 hex: the authority's key.
    pub authority: String,
    /// Strictly increasing; 1 for the first roster.
    pub version: u64,
    /// Sorted, unique peer ids (64 lower-case hex), at most [`MAX_MEMBERS`].
    pub members: Vec<String>,
    /// 128 hex: the authority's Ed25519 signature over [`Roster::signing_bytes`].
    pub sig: String,
}

impl Roster {
    /// "shoal-roster-v1\0" || info_hash bytes (32) || authority bytes (32) || version (u64 BE)
    /// || member count (u32 BE) || each member's key bytes (32). A field that is not 64 hex
    /// digits is encoded as zeros; [`Roster::verify`] refuses such a roster before this matters.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let b32 = |s: &str| keys::hex32(s).unwrap_or([0; 32]);
        let mut out = Vec::with_capacity(ROSTER_TAG.len() + 76 + 32 * self.members.len());
        out.extend_from_slice(ROSTER_TAG);
        out.extend_from_slice(&b32(&self.info_hash));
        out.extend_from_slice(&b32(&self.authority));
        out.extend_from_slice(&self.version.to_be_bytes());
        let count = u32::try_from(self.members.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for m in &self.members {
            out.extend_from_slice(&b32(m));
        }
        out
    }

    /// A roster signed by `key` (the authority), with `members` sorted and deduplicated.
    pub fn sign(key: &SigningKey, info_hash: &str, version: u64, members: Vec<String>) -> Roster {
        let mut members = members;
        members.sort();
        members.dedup();
        let mut r = Roster {
            info_hash: info_hash.to_string(),
            authority: hex::encode(key.verifying_key().to_bytes()),
            version,
            members,
            sig: String::new(),
        };
        r.sig = hex::encode(key.sign(&r.signing_bytes()).to_bytes());
        r
    }

    /// Check bounds, member ids (64 lower-case hex), sortedness and uniqueness, and the
    /// authority's signature. Members need not be valid points: an id that is no key can never
    /// sign, so listing it admits nobody. The cheap checks run before the signature.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn verify(&self) -> Result<(), String> {
        if keys::hex32(&self.info_hash).is_none() {
            return Err("roster info_hash must be 64 lower-case hex digits".into());
        }
        if self.version == 0 {
            return Err("roster version must be at least 1".into());
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(format!(
                "roster lists {} members, over the limit of {MAX_MEMBERS}",
                self.members.len()
            ));
        }
        if let Some(m) = self.members.iter().find(|m| keys::hex32(m).is_none()) {
            return Err(format!(
                "roster member {:?} is not 64 lower-case hex digits",
                keys::fingerprint(m)
            ));
        }
        if self.members.windows(2).any(|w| w[0] >= w[1]) {
            return Err("roster members must be sorted and unique".into());
        }
        keys::verify(&self.authority, &self.signing_bytes(), &self.sig)
            .map_err(|e| format!("roster signature: {e}"))
    }

    /// [`Roster::verify`], and that `info_hash` is the private hash of (`content`, authority).
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn verify_for(&self, content: &[u8; 32]) -> Result<(), String> {
        let expect = hex::encode(private_info_hash(content, &self.authority)?);
        if expect != self.info_hash {
            return Err(
                "roster info_hash is not the private hash of its content and authority".into(),
            );
        }
        self.verify()
    }

    /// Whether `peer_id` may take part: the authority or a listed member.
    pub fn admits(&self, peer_id: &str) -> bool {
        peer_id == self.authority
            || self
                .members
                .binary_search_by(|m| m.as_str().cmp(peer_id))
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }
    fn id(k: &SigningKey) -> String {
        hex::encode(k.verifying_key().to_bytes())
    }

    #[test]
    fn private_hash_binds_content_and_authority() {
        let (a, b) = (key(), key());
        let c = [7u8; 32];
        let h = private_info_hash(&c, &id(&a)).unwrap();
        assert_eq!(h, private_info_hash(&c, &id(&a)).unwrap());
        assert_ne!(h, private_info_hash(&c, &id(&b)).unwrap());
        assert_ne!(h, private_info_hash(&[8u8; 32], &id(&a)).unwrap());
        assert_ne!(h, c);
        assert!(private_info_hash(&c, "nope").is_err());
        assert!(private_info_hash(&c, &id(&a).to_uppercase()).is_err());
    }

    #[test]
    fn signed_roster_verifies_and_admits() {
        let auth = key();
        let (m1, m2, out) = (key(), key(), key());
        let c = [1u8; 32];
        let h = hex::encode(private_info_hash(&c, &id(&auth)).unwrap());
        let r = Roster::sign(&auth, &h, 1, vec![id(&m2), id(&m1), id(&m2)]);
        assert_eq!(r.members.len(), 2);
        assert!(r.members[0] < r.members[1]);
        assert_eq!(r.verify(), Ok(()));
        assert_eq!(r.verify_for(&c), Ok(()));
        assert!(r.verify_for(&[2u8; 32]).is_err());
        assert!(r.admits(&id(&auth)));
        assert!(r.admits(&id(&m1)) && r.admits(&id(&m2)));
        assert!(!r.admits(&id(&out)));
        // JSON round trip keeps it valid.
        let back: Roster = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.verify(), Ok(()));
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let auth = key();
        let h = hex::encode([3u8; 32]);
        let r = Roster::sign(&auth, &h, 2, vec![id(&key())]);
        let mut t = r.clone();
        t.version = 3;
        assert!(t.verify().is_err());
        let mut t = r.clone();
        t.members.push("f".repeat(64));
        assert!(t.verify().is_err());
        let mut t = r.clone();
        t.members.clear();
        assert!(t.verify().is_err());
        let mut t = r.clone();
        t.info_hash = hex::encode([4u8; 32]);
        assert!(t.verify().is_err());
        // Someone else signing for the authority's name.
        let mut t = Roster::sign(&key(), &h, 9, vec![]);
        t.authority = r.authority.clone();
        assert!(t.verify().is_err());
    }

    #[test]
    fn malformed_rosters_are_refused_before_the_signature() {
        let auth = key();
        let h = hex::encode([3u8; 32]);
        let mut r = Roster::sign(&auth, &h, 1, vec![id(&key()), id(&key())]);
        r.members.reverse();
        assert!(r.verify().unwrap_err().contains("sorted"));
        let r = Roster::sign(&auth, &h, 0, vec![]);
        assert!(r.verify().unwrap_err().contains("version"));
        let r = Roster::sign(&auth, &h, 1, vec!["ABC".into()]);
        assert!(r.verify().unwrap_err().contains("hex"));
        let many: Vec<String> = (0..=MAX_MEMBERS as u32)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&i.to_be_bytes());
                hex::encode(b)
            })
            .collect();
        let r = Roster::sign(&auth, &h, 1, many);
        assert!(r.verify().unwrap_err().contains("over the limit"));
    }
}
