//! Where a torrent's bytes live, and the one rule that makes resume crash-safe.
//!
//! - [`mmap`]: piece I/O through memory maps; all `unsafe` of shoal lives there.
//! - [`files`]: opening data files so that nobody can trick us: no symlink is followed, a
//!   working file lives under a name no other torrent can have, and a working file is trusted
//!   only if it is the one we recorded. Reservation, free space, the no-replace rename.
//! - [`durable`]: the piece-store layer. Writing a piece yields a [`durable::Written`]
//!   receipt; [`durable::PieceStore::sync`] yields a [`durable::Synced`] token; a bit can be
//!   set only by presenting both ([`durable::Durable::commit`]). A failed sync poisons the
//!   store for good: it is never retried and trusted.
//! - [`tree`]: a folder tree's working files, its piece store over them, and placing
//!   finished files below the output folder without following a symlink.
//! - [`fault`]: a fault-injecting piece store (failing or no-op syncs, power cuts) that proves
//!   the tests can fail.

pub mod durable;
pub mod fault;
pub mod files;
pub mod mmap;
pub mod tree;

pub use durable::{Durable, PieceStore, SyncFailed, Synced, Written};
pub use mmap::{map_read_only, prefetch_mapped, release_mapped, OpenMode, Storage, StorageError};
