//! One owner per info hash: the registry maps a hash to the handle of the task that owns the
//! torrent. A hash is claimed atomically, so two concurrent commands can never start two
//! owners of one torrent; everything else about a torrent is a message to its owner.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::torrent::Torrent;
use crate::control::TorrentStatus;
use crate::metainfo::Hash;

/// A command to a torrent's owner. Each gets a reply once its effect is durable.
#[derive(Debug)]
pub enum Cmd {
    Pause,
    Resume,
    Recheck,
    Remove {
        delete_data: bool,
    },
    /// The daemon stops: stop the torrent's tasks, persist, end.
    Shutdown,
    /// A tree: download only the files these globs match (empty: every file).
    Select {
        only: Vec<String>,
    },
    /// A private swarm: list its roster, or (the authority) add and revoke members.
    Swarm {
        add: Vec<String>,
        revoke: Vec<String>,
    },
}

pub struct Envelope {
    pub cmd: Cmd,
    pub reply: oneshot::Sender<anyhow::Result<String>>,
}

/// Commands queued per torrent before senders wait.
pub const MAILBOX: usize = 64;

/// What the daemon and incoming connections hold of a torrent.
pub struct TorrentHandle {
    pub hash: Hash,
    tx: mpsc::Sender<Envelope>,
    /// The running session, if the torrent is active (downloading or seeding).
    live: Mutex<Option<Arc<Torrent>>>,
    /// Status while not active (and the name), so `status` never waits for the owner.
    snapshot: Mutex<TorrentStatus>,
    closing: AtomicBool,
}

impl TorrentHandle {
    pub fn new(
        hash: Hash,
        snapshot: TorrentStatus,
    ) -> (Arc<TorrentHandle>, mpsc::Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel(MAILBOX);
        (
            Arc::new(TorrentHandle {
                hash,
                tx,
                live: Mutex::new(None),
                snapshot: Mutex::new(snapshot),
                closing: AtomicBool::new(false),
            }),
            rx,
        )
    }

    /// Send a command and wait for its reply.
    ///
    /// # Errors
    /// The owner has ended (the torrent was removed), or the command failed.
    pub async fn call(&self, cmd: Cmd) -> anyhow::Result<String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Envelope { cmd, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the torrent was removed"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the torrent was removed"))?
    }

    pub fn live(&self) -> Option<Arc<Torrent>> {
        self.live.lock().expect("live lock").clone()
    }

    pub fn set_live(&self, t: Option<Arc<Torrent>>) {
        *self.live.lock().expect("live lock") = t;
    }

    /// Say why a torrent waits (shown while it has no session).
    pub fn set_note(&self, note: String) {
        self.snapshot.lock().expect("snapshot lock").note = Some(note);
    }

    pub fn set_snapshot(&self, s: TorrentStatus) {
        *self.snapshot.lock().expect("snapshot lock") = s;
    }

    pub fn status(&self, with_pieces: bool) -> TorrentStatus {
        match self.live() {
            Some(t) => t.status(with_pieces),
            None => {
                let mut s = self.snapshot.lock().expect("snapshot lock").clone();
                if !with_pieces {
                    s.piece_states.clear();
                    s.files.clear();
                }
                s
            }
        }
    }

    pub fn name(&self) -> String {
        self.snapshot.lock().expect("snapshot lock").name.clone()
    }

    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Hash, Arc<TorrentHandle>>>,
}

impl Registry {
    pub fn get(&self, hash: &Hash) -> Option<Arc<TorrentHandle>> {
        self.map.lock().expect("registry lock").get(hash).cloned()
    }

    /// Insert `handle` unless the hash already has an owner; returns the existing one then.
    pub fn claim(&self, handle: Arc<TorrentHandle>) -> Result<(), Arc<TorrentHandle>> {
        let mut m = self.map.lock().expect("registry lock");
        if let Some(h) = m.get(&handle.hash) {
            return Err(h.clone());
        }
        m.insert(handle.hash, handle);
        Ok(())
    }

    /// Remove the owner of `hash`, if it is `handle` (an owner removes only itself).
    pub fn release(&self, handle: &Arc<TorrentHandle>) {
        let mut m = self.map.lock().expect("registry lock");
        if m.get(&handle.hash).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            m.remove(&handle.hash);
        }
    }

    pub fn all(&self) -> Vec<Arc<TorrentHandle>> {
        self.map
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Find a torrent by its full info hash or a unique prefix of at least 8 hex digits.
    ///
    /// # Errors
    /// Not hex, too short, unknown, or ambiguous; each says which.
    pub fn resolve(&self, s: &str) -> anyhow::Result<Arc<TorrentHandle>> {
        let m = self.map.lock().expect("registry lock");
        let h = crate::hashprefix::resolve(s, m.keys())?;
        Ok(m.get(&h).cloned().expect("resolved among the keys"))
    }
}
