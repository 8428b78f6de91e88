//! The peer-to-tracker messages: a contract other clients speak (see DESIGN.md), so names and
//! fields stay as they are; new fields are optional and readers ignore fields they do not know.

use serde::{Deserialize, Serialize};

/// Longest peer id accepted.
pub const MAX_PEER_ID_CHARS: usize = 64;

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
        if self.name.len() > 1024 {
            return Err("name is longer than 1024 bytes".into());
        }
        Ok(())
    }
}

/// Whether `s` is 64 hex digits.
pub fn is_info_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Request {
    Announce(Announce),
    ListFiles,
    Swarm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info_hash: Option<String>,
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
    Files {
        files: Vec<FileEntry>,
    },
    Swarm {
        peers: Vec<SwarmEntry>,
    },
    Error {
        reason: String,
    },
}
