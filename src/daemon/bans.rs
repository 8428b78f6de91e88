//! Daemon-wide bans, by key and by address.
//!
//! A peer that sends corrupt pieces is banned by its key (its peer id, proven by the Noise
//! handshake) and by its address (IPv4 /32, IPv6 /64, where one host's addresses live), so
//! fresh keys from the same host gain nothing: the corrupt pieces a host can send before its
//! ban is the threshold, counted over every key it uses. Nobody can get someone else banned:
//! the key was authenticated and the address answered the TCP handshake.
//!
//! The table is bounded ([`MAX_ENTRIES`]): expired entries go first, then the counters that are
//! not bans, then the bans that end soonest. Bans are persisted (through the callback the
//! daemon gives, which writes to the store off the runtime), so a restart does not forgive.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Entries (failure counters and bans) kept at most.
pub const MAX_ENTRIES: usize = 4096;

/// Writes `(key, banned_until_ms)`; the daemon's store behind a blocking thread.
pub type Persist = Arc<dyn Fn(String, i64) + Send + Sync>;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    failures: u32,
    /// Unix ms; 0 when not banned.
    until: i64,
}

pub struct Bans {
    inner: Mutex<HashMap<String, Entry>>,
    persist: Option<Persist>,
}

/// The table key of a peer's key.
fn key_of(peer_id: &str) -> String {
    format!("key:{peer_id}")
}

/// The table key of an address: the /32 of IPv4 (also IPv4-mapped IPv6), the /64 of IPv6.
pub fn addr_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip4:{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip4:{v4}"),
            None => {
                let s = v6.segments();
                format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

impl Bans {
    /// Start from the persisted bans (`(key, until_ms)`); expired ones are dropped.
    pub fn new(saved: Vec<(String, i64)>, persist: Option<Persist>) -> Bans {
        let now = crate::fsutil::unix_ms();
        let mut map: HashMap<String, Entry> = saved
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(k, until)| (k, Entry { failures: 0, until }))
            .collect();
        if map.len() > MAX_ENTRIES {
            let mut v: Vec<_> = map.into_iter().collect();
            v.sort_by_key(|(_, e)| std::cmp::Reverse(e.until));
            v.truncate(MAX_ENTRIES);
            map = v.into_iter().collect();
        }
        Bans {
            inner: Mutex::new(map),
            persist,
        }
    }

    fn active(map: &HashMap<String, Entry>, key: &str, now: i64) -> Option<i64> {
        map.get(key).map(|e| e.until).filter(|&u| u > now)
    }

    /// Why this address may not connect, if it is banned.
    pub fn address_banned(&self, ip: IpAddr) -> Option<String> {
        let now = crate::fsutil::unix_ms();
        let map = self.inner.lock().expect("bans lock");
        let k = addr_key(ip);
        Self::active(&map, &k, now).map(|u| reason(&k, u, now))
    }

    /// Why this key or address may not connect, if either is banned.
    pub fn banned(&self, peer_id: &str, ip: IpAddr) -> Option<String> {
        let now = crate::fsutil::unix_ms();
        let map = self.inner.lock().expect("bans lock");
        [key_of(peer_id), addr_key(ip)]
            .into_iter()
            .find_map(|k| Self::active(&map, &k, now).map(|u| reason(&k, u, now)))
    }

    /// Count a corrupt piece from `peer_id` at `ip`. When the key or the address reaches
    /// `threshold`, both are banned for `ban`; returns the ban's end (unix ms) then.
    pub fn on_corrupt(
        &self,
        peer_id: &str,
        ip: IpAddr,
        threshold: u32,
        ban: Duration,
    ) -> Option<i64> {
        let now = crate::fsutil::unix_ms();
        let keys = [key_of(peer_id), addr_key(ip)];
        let mut map = self.inner.lock().expect("bans lock");
        let mut reached = false;
        for k in &keys {
            if !map.contains_key(k) {
                make_room(&mut map, now);
            }
            let e = map.entry(k.clone()).or_default();
            e.failures = e.failures.saturating_add(1);
            reached |= e.failures >= threshold;
        }
        if !reached {
            return None;
        }
        let until = now.saturating_add(ban.as_millis() as i64);
        for k in &keys {
            let e = map.entry(k.clone()).or_default();
            e.until = e.until.max(until);
            e.failures = 0;
        }
        drop(map);
        if let Some(p) = &self.persist {
            for k in keys {
                p(k, until);
            }
        }
        Some(until)
    }

    /// Active bans, for `status` and tests: `(key, until_ms)`.
    pub fn list(&self) -> Vec<(String, i64)> {
        let now = crate::fsutil::unix_ms();
        let map = self.inner.lock().expect("bans lock");
        let mut v: Vec<_> = map
            .iter()
            .filter(|(_, e)| e.until > now)
            .map(|(k, e)| (k.clone(), e.until))
            .collect();
        v.sort();
        v
    }
}

/// Free one slot when full: an expired entry or a counter first, else the ban ending soonest.
fn make_room(map: &mut HashMap<String, Entry>, now: i64) {
    if map.len() < MAX_ENTRIES {
        return;
    }
    map.retain(|_, e| e.until > now || e.failures > 0);
    if map.len() < MAX_ENTRIES {
        return;
    }
    let victim = map
        .iter()
        .min_by_key(|(_, e)| (e.until > now, e.until, e.failures))
        .map(|(k, _)| k.clone());
    if let Some(k) = victim {
        map.remove(&k);
    }
}

fn reason(key: &str, until: i64, now: i64) -> String {
    let secs = (until - now).max(0) / 1000;
    let what = match key.split_once(':') {
        Some(("key", id)) => format!("key {}", crate::secure::fingerprint(id)),
        Some((_, addr)) => format!("address {addr}"),
        None => key.to_string(),
    };
    format!("banned ({what}) for sending corrupt pieces, {secs} s left")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn it_should_ban_the_address_so_new_keys_gain_nothing() {
        let b = Bans::new(vec![], None);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert!(b.on_corrupt("k1", ip, 3, MIN).is_none());
        assert!(b.on_corrupt("k2", ip, 3, MIN).is_none());
        // The third corrupt piece from the host bans it, whatever key it used.
        assert!(b.on_corrupt("k3", ip, 3, MIN).is_some());
        assert!(b.banned("k4", ip).is_some(), "a fresh key from the host");
        assert!(b.banned("k1", "10.0.0.8".parse().unwrap()).is_none());
        assert!(
            b.banned("k3", "10.0.0.8".parse().unwrap()).is_some(),
            "the key, elsewhere"
        );
    }

    #[test]
    fn it_should_ban_ipv6_by_its_64() {
        let b = Bans::new(vec![], None);
        let ip: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        for k in ["a", "b", "c"] {
            b.on_corrupt(k, ip, 3, MIN);
        }
        assert!(b
            .address_banned("2001:db8:1:2:ffff::1".parse().unwrap())
            .is_some());
        assert!(b
            .address_banned("2001:db8:1:3::5".parse().unwrap())
            .is_none());
        let mapped: IpAddr = "::ffff:10.1.1.1".parse().unwrap();
        assert_eq!(addr_key(mapped), "ip4:10.1.1.1");
    }

    #[test]
    fn it_should_stay_bounded_and_keep_bans_over_counters() {
        let b = Bans::new(vec![], None);
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        for k in ["x", "y", "z"] {
            b.on_corrupt(k, ip, 3, MIN);
        }
        for i in 0..(MAX_ENTRIES as u32 * 2) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            b.on_corrupt(&format!("k{i}"), ip, 100, MIN);
        }
        assert!(b.inner.lock().unwrap().len() <= MAX_ENTRIES);
        assert!(
            b.address_banned(ip).is_some(),
            "the ban outlived the counters"
        );
    }

    #[test]
    fn it_should_restore_persisted_bans_and_drop_expired_ones() {
        let now = crate::fsutil::unix_ms();
        let b = Bans::new(
            vec![
                ("ip4:10.0.0.1".into(), now + 60_000),
                ("ip4:10.0.0.2".into(), now - 1),
            ],
            None,
        );
        assert!(b.address_banned("10.0.0.1".parse().unwrap()).is_some());
        assert!(b.address_banned("10.0.0.2".parse().unwrap()).is_none());
    }
}
