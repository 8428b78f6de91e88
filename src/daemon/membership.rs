//! Who may join a private swarm, as this peer knows it.
//!
//! A private descriptor names an authority (its key is under the info hash). The authority
//! signs a versioned roster of member keys ([`shoal_tracker::roster::Roster`]); anyone may
//! carry it, and a roster is kept only if it checks against this swarm and is newer than the
//! one held. Until a roster arrives, only the authority is admitted. Revoking a member is a
//! newer roster without it: peers that learn it close their connections to the member and
//! refuse its next ones.

use std::sync::{Arc, Mutex};

use shoal_tracker::roster::Roster;

use crate::metainfo::{Hash, Metainfo};

pub struct Membership {
    info_hash: String,
    content: Hash,
    authority: String,
    roster: Mutex<Option<Arc<Roster>>>,
}

impl Membership {
    /// The membership of `meta`'s swarm, or `None` for a public swarm. A stored roster that
    /// does not check (damaged, or for another swarm) is dropped.
    pub fn of(meta: &Metainfo, stored: Option<Roster>) -> Option<Membership> {
        let authority = meta.authority.clone()?;
        let m = Membership {
            info_hash: meta.info_hash_hex(),
            content: meta.content_hash(),
            authority,
            roster: Mutex::new(None),
        };
        if let Some(r) = stored {
            if let Err(e) = m.adopt(r) {
                tracing::warn!(info_hash = %m.info_hash, cause = %e, "stored roster refused");
            }
        }
        Some(m)
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn content_hex(&self) -> String {
        hex::encode(self.content)
    }

    /// The roster held, if any.
    pub fn roster(&self) -> Option<Arc<Roster>> {
        self.roster.lock().expect("roster lock").clone()
    }

    /// The held roster's version; 0 when none.
    pub fn version(&self) -> u64 {
        self.roster().map_or(0, |r| r.version)
    }

    /// Whether `peer_id` may take part: the authority, or a member of the held roster.
    pub fn admits(&self, peer_id: &str) -> bool {
        peer_id == self.authority || self.roster().is_some_and(|r| r.admits(peer_id))
    }

    /// Keep `r` if it is this swarm's, signed by its authority, and newer than the one held.
    /// Returns whether it was kept (an older or equal version is no error: gossip crosses).
    ///
    /// # Errors
    /// The roster is not this swarm's or its signature does not check.
    pub fn adopt(&self, r: Roster) -> Result<bool, String> {
        if r.info_hash != self.info_hash {
            return Err("the roster is for another swarm".into());
        }
        if r.authority != self.authority {
            return Err("the roster is not signed by this swarm's authority".into());
        }
        if r.version <= self.version() {
            return Ok(false);
        }
        // Checked outside the lock: a signature costs tens of microseconds.
        r.verify_for(&self.content)?;
        let mut held = self.roster.lock().expect("roster lock");
        if held.as_ref().is_some_and(|h| h.version >= r.version) {
            return Ok(false);
        }
        *held = Some(Arc::new(r));
        Ok(true)
    }
}

/// The roster after the authority adds and revokes members: one version above `held`.
///
/// # Errors
/// An id that is not a key, or more members than a roster may list.
pub fn next_roster(
    authority: &ed25519_dalek::SigningKey,
    info_hash: &str,
    held: Option<&Roster>,
    add: &[String],
    revoke: &[String],
) -> Result<Roster, String> {
    for id in add.iter().chain(revoke) {
        if !shoal_tracker::keys::is_key(id) {
            return Err(format!(
                "{id:?} is not a peer id (64 hex digits, as `shoal status` shows)"
            ));
        }
    }
    let mut members: Vec<String> = held.map(|r| r.members.clone()).unwrap_or_default();
    members.extend(add.iter().cloned());
    members.retain(|m| !revoke.contains(m));
    members.sort();
    members.dedup();
    if members.len() > shoal_tracker::roster::MAX_MEMBERS {
        return Err(format!(
            "{} members, over the limit of {}",
            members.len(),
            shoal_tracker::roster::MAX_MEMBERS
        ));
    }
    let version = held.map_or(0, |r| r.version) + 1;
    Ok(Roster::sign(authority, info_hash, version, members))
}

/// What `shoal swarm list` prints.
pub fn describe(info_hash: &str, authority: &str, roster: Option<&Roster>) -> String {
    let mut s = format!("private swarm {info_hash}\nauthority: {authority}\n");
    match roster {
        None => s.push_str("roster: none yet (only the authority is admitted)"),
        Some(r) => {
            s.push_str(&format!(
                "roster version {}: {} member(s)",
                r.version,
                r.members.len()
            ));
            for m in &r.members {
                s.push_str(&format!("\n  {m}"));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn private_meta(key: &SigningKey) -> Metainfo {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.bin");
        std::fs::write(&f, vec![1u8; 65536]).unwrap();
        let mut m = crate::metainfo::create(&f, 16384, vec![], &Default::default()).unwrap();
        m.make_private(&hex::encode(key.verifying_key().to_bytes()))
            .unwrap();
        m
    }

    #[test]
    fn it_should_add_and_revoke_one_version_at_a_time() {
        let auth = SigningKey::generate(&mut rand::rngs::OsRng);
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        let h = "cd".repeat(32);
        let v1 = next_roster(&auth, &h, None, &[b.clone(), a.clone()], &[]).unwrap();
        assert_eq!(
            (v1.version, v1.members.clone()),
            (1, vec![a.clone(), b.clone()])
        );
        let v2 = next_roster(&auth, &h, Some(&v1), &[], std::slice::from_ref(&a)).unwrap();
        assert_eq!((v2.version, v2.members.clone()), (2, vec![b]));
        v2.verify().unwrap();
        assert!(next_roster(&auth, &h, Some(&v2), &["nope".into()], &[]).is_err());
    }

    #[test]
    fn it_should_admit_the_authority_then_members_of_newer_rosters_only() {
        let auth = SigningKey::generate(&mut rand::rngs::OsRng);
        let meta = private_meta(&auth);
        let m = Membership::of(&meta, None).unwrap();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        assert!(m.admits(m.authority()));
        assert!(!m.admits(&a), "no roster yet: only the authority");
        let hash = meta.info_hash_hex();
        let v1 = Roster::sign(&auth, &hash, 1, vec![a.clone(), b.clone()]);
        assert_eq!(m.adopt(v1.clone()), Ok(true));
        assert!(m.admits(&a) && m.admits(&b));
        let v2 = Roster::sign(&auth, &hash, 2, vec![a.clone()]);
        assert_eq!(m.adopt(v2), Ok(true));
        assert!(!m.admits(&b), "revoked");
        assert_eq!(m.adopt(v1), Ok(false), "an older roster changes nothing");
        assert!(!m.admits(&b));
        // Signed by someone else, or for another swarm: refused.
        let other = SigningKey::generate(&mut rand::rngs::OsRng);
        assert!(m
            .adopt(Roster::sign(&other, &hash, 9, vec![b.clone()]))
            .is_err());
        assert!(m
            .adopt(Roster::sign(&auth, &"cd".repeat(32), 9, vec![b.clone()]))
            .is_err());
        let mut forged = Roster::sign(&auth, &hash, 9, vec![a]);
        forged.members.push(b.clone());
        assert!(m.adopt(forged).is_err());
        assert!(!m.admits(&b));
    }
}
