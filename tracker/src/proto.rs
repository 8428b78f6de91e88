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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Started,
    Progress,
    Completed,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
