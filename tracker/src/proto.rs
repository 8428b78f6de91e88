//! The peer-to-tracker messages: a contract other clients speak (see DESIGN.md), so names and
//! fields stay as they are; new fields are optional and readers ignore fields they do not know.

use serde::{Deserialize, Serialize};

/// Longest peer id accepted.
pub const MAX_PEER_ID_CHARS: usize = 64;
/// Longest file name accepted, in bytes (after escaping control characters).
pub const MAX_NAME_BYTES: usize = 1024;
/// Largest integer accepted in `have`, `total` and `length`: what SQLite's INTEGER holds. A
/// larger value cannot be stored, and an unstorable row must never reach the writer.
pub const MAX_INT: u64 = i64::MAX as u64;
/// Largest page of SWARM / FILES entries a tracker sends in one reply; the reply must also fit
/// the 64 KiB frame header, so the tracker may stop earlier (see [`PAGE_BUDGET_BYTES`]).
pub const MAX_PAGE_ENTRIES: usize = 1000;
/// Bytes of entries a tracker puts in one SWARM / FILES reply at most, leaving room in the
/// 64 KiB header for the envelope and the `next` cursor.
pub const PAGE_BUDGET_BYTES: usize = 60 * 1024;
/// Longest announced `addr`, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    #[default]
    Started,
    Progress,
    Completed,
    Stopped,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub info_hash: String,
    pub peer_id: String,
    pub port: u16,
    pub event: Event,
    pub have: u64,
    pub total: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub length: u64,
    /// How many peers the asker wants at most (an extension; default: the tracker's setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numwant: Option<u32>,
    /// The address the peer says it has; believed only when the tracker trusts announced
    /// addresses (overlay networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Unix milliseconds of the announcer's clock; required with `sig` or `mac` (see
    /// [`crate::auth`]): within the tracker's window and above the last one it accepted for
    /// this (swarm, peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// 128 hex: Ed25519 signature by the key that is `peer_id` over [`crate::auth::signing_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// 64 hex: HMAC-SHA256 of the same bytes under the session key (instead of `sig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 64 hex: the announcer's X25519 public key, in a signed announce that opens a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dh: Option<String>,
    /// Private swarm proof: the authority's key (64 hex) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// ... and the content (public) info hash (64 hex), with
    /// `private_info_hash(content, authority) == info_hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The version of the roster the announcer holds (0 or absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster_version: Option<u64>,
    /// A roster the announcer delivers (kept by the tracker if valid and newer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roster: Option<crate::roster::Roster>,
}

impl Announce {
    /// Check what serde cannot: the field values.
    ///
    /// # Errors
    /// A message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        for (field, v) in [
            ("have", self.have),
            ("total", self.total),
            ("length", self.length),
        ] {
            if v > MAX_INT {
                return Err(format!(
                    "{field} ({v}) is over the largest value, {MAX_INT}"
                ));
            }
        }
        if !is_info_hash(&self.info_hash) {
            return Err("info_hash must be 64 hex digits".into());
        }
        if self.peer_id.is_empty() || self.peer_id.chars().count() > MAX_PEER_ID_CHARS {
            return Err(format!(
                "peer_id must be 1 to {MAX_PEER_ID_CHARS} characters"
            ));
        }
        if self.peer_id.chars().any(char::is_control) {
            return Err("peer_id must not contain control characters".into());
        }
        if self.port == 0 {
            return Err("port must be 1 to 65535".into());
        }
        if self.have > self.total {
            return Err(format!(
                "have ({}) is more than total ({})",
                self.have, self.total
            ));
        }
        // Every piece holds at least one byte, so a known length bounds the piece count.
        if self.length > 0 && self.total > self.length {
            return Err(format!(
                "total ({}) is more pieces than length ({}) has bytes",
                self.total, self.length
            ));
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(format!("name is longer than {MAX_NAME_BYTES} bytes"));
        }
        if self.addr.as_ref().is_some_and(|a| a.len() > MAX_ADDR_BYTES) {
            return Err(format!("addr is longer than {MAX_ADDR_BYTES} bytes"));
        }
        for (field, v) in [
            ("dh", &self.dh),
            ("authority", &self.authority),
            ("content", &self.content),
            ("mac", &self.mac),
        ] {
            if v.as_ref().is_some_and(|v| crate::keys::hex32(v).is_none()) {
                return Err(format!("{field} must be 64 lower-case hex digits"));
            }
        }
        if self.authority.is_some() != self.content.is_some() {
            return Err("authority and content come together (the private swarm proof)".into());
        }
        if self.sig.is_some() && self.mac.is_some() {
            return Err("sig and mac exclude each other".into());
        }
        if (self.sig.is_some() || self.mac.is_some()) && self.ts.is_none() {
            return Err("a signed announce needs ts".into());
        }
        if self.mac.is_some() && self.dh.is_some() {
            return Err("dh opens a session: it comes with sig, not mac".into());
        }
        Ok(())
    }

    /// Bring the fields into their one stored form: the info hash in lower case (an upper-case
    /// hash is the same swarm) and the name with control characters escaped (it is printed by
    /// `list` and `monitor`, and a raw ESC or newline would forge lines or clear the screen).
    /// Call after [`Announce::validate`].
    pub fn normalize(&mut self) {
        self.info_hash.make_ascii_lowercase();
        if self.name.chars().any(char::is_control) {
            self.name = escape_control(&self.name);
            if self.name.len() > MAX_NAME_BYTES {
                let mut end = MAX_NAME_BYTES;
                while !self.name.is_char_boundary(end) {
                    end -= 1;
                }
                self.name.truncate(end);
            }
        }
    }
}

/// `s` with every control character written as a visible escape (`\u{1b}`), so text from the
/// network can be printed or stored without acting on a terminal.
pub fn escape_control(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `s` is 64 hex digits.
pub fn is_info_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
// One request at a time is parsed and handled, never stored in bulk: the size is harmless.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    Announce(Announce),
    /// Paged: `after` is the `next` cursor of the previous page (absent for the first page).
    ListFiles {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Entries wanted at most (the tracker may send fewer: see [`MAX_PAGE_ENTRIES`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Paged like `ListFiles`.
    Swarm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info_hash: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntry {
    pub peer_id: String,
    pub addr: String,
    pub port: u16,
    pub have: u64,
    pub total: u64,
}

/// [`PeerEntry`] borrowed, for serializing without copying the strings (the same JSON).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PeerEntryRef<'a> {
    pub peer_id: &'a str,
    pub addr: &'a str,
    pub port: u16,
    pub have: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub info_hash: String,
    pub name: String,
    pub length: u64,
    pub seeders: u64,
    pub leechers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmEntry {
    pub info_hash: String,
    pub name: String,
    pub peer_id: String,
    pub addr: String,
    pub port: u16,
    pub have: u64,
    pub total: u64,
    pub role: Role,
    /// The peer id's first 16 digits (what `monitor` shows of a key).
    #[serde(default)]
    pub fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Seeder,
    Leecher,
}

impl Role {
    pub fn of(have: u64, total: u64) -> Role {
        if total > 0 && have >= total {
            Role::Seeder
        } else {
            Role::Leecher
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Seeder => "seeder",
            Role::Leecher => "leecher",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Response {
    Peers {
        interval: u64,
        peers: Vec<PeerEntry>,
        /// 64 hex: the tracker's X25519 session key, when the announce opened a session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        /// The version of the private swarm's roster the tracker holds (0: none, or public).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        roster_version: Option<u64>,
        /// The tracker's roster, when newer than the announcer's `roster_version`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        roster: Option<crate::roster::Roster>,
    },
    /// `next`, when present, is an opaque cursor: send it back as `after` for the next page.
    /// Its absence means this was the last page.
    Files {
        files: Vec<FileEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Swarm {
        peers: Vec<SwarmEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Error {
        reason: String,
    },
}
