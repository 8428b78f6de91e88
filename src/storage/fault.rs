//! A fault-injecting piece store, for proving that the durability tests can fail.
//!
//! It wraps a real [`Storage`] (so reads and hashes see real bytes) and keeps a model of
//! the disk: every write is volatile until a sync that the store really performed covers it.
//! [`FaultStore::cut`] is a power cut: it freezes the store (every later sync fails) and
//! returns what the disk holds, with every write not covered by a completed sync dropped.
//! Its syncs can be real, no-ops that lie (to show a test detects the lie), or failing.

use std::sync::Mutex;

use super::durable::{Ledger, PieceStore, SyncFailed, Synced, Written};
use super::mmap::Storage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Sync for real: covered writes become durable.
    Real,
    /// Claim success and make nothing durable: the bug the power-cut test must catch.
    Noop,
    /// Succeed this many times, then fail with EIO.
    FailAfter(u32),
}

struct Model {
    /// What the disk holds per piece (None: never durably written: zeros).
    disk: Vec<Option<Vec<u8>>>,
    /// Writes since the last real sync: (receipt number, piece, bytes).
    volatile: Vec<(u64, u32, Vec<u8>)>,
    next: u64,
    syncs: u32,
    frozen: bool,
}

pub struct FaultStore {
    inner: Storage,
    ledger: Ledger,
    mode: SyncMode,
    model: Mutex<Model>,
}

impl FaultStore {
    pub fn new(inner: Storage, pieces: u32, mode: SyncMode) -> FaultStore {
        FaultStore {
            inner,
            ledger: Ledger::default(),
            mode,
            model: Mutex::new(Model {
                disk: vec![None; pieces as usize],
                volatile: Vec::new(),
                next: 0,
                syncs: 0,
                frozen: false,
            }),
        }
    }

    /// Cut the power: from now on every sync fails, and the returned image is what survived
    /// (per piece, its durable bytes or None for never durably written).
    pub fn cut(&self) -> Vec<Option<Vec<u8>>> {
        let mut m = self.model.lock().expect("model lock");
        m.frozen = true;
        m.volatile.clear();
        m.disk.clone()
    }
}

impl PieceStore for FaultStore {
    fn write_piece(&self, index: u32, data: &[u8]) -> Written {
        let mut m = self.model.lock().expect("model lock");
        self.inner.write_piece(index, data);
        if !m.frozen {
            let seq = m.next;
            m.next += 1;
            m.volatile.push((seq, index, data.to_vec()));
        }
        // Taken under the model lock, so receipt numbers and model numbers agree.
        self.ledger.receipt(index)
    }

    fn sync(&self) -> Result<Synced, SyncFailed> {
        let mut m = self.model.lock().expect("model lock");
        self.ledger.sync_with(|| {
            if m.frozen {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            m.syncs += 1;
            match self.mode {
                SyncMode::FailAfter(n) if m.syncs > n => {
                    Err(std::io::Error::from_raw_os_error(libc::EIO))
                }
                SyncMode::Noop => Ok(()),
                SyncMode::Real | SyncMode::FailAfter(_) => {
                    self.inner.sync_raw()?;
                    let volatile = std::mem::take(&mut m.volatile);
                    for (_, i, bytes) in volatile {
                        m.disk[i as usize] = Some(bytes);
                    }
                    Ok(())
                }
            }
        })
    }

    fn piece(&self, index: u32) -> &[u8] {
        self.inner.piece(index)
    }

    fn data(&self) -> &[u8] {
        self.inner.data()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{Rng, SeedableRng};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::bitfield::Bitfield;
    use crate::storage::durable::{flush_step, Durable};
    use crate::storage::OpenMode;

    const PIECE: u32 = 16 * 1024;
    const PIECES: u32 = 64;

    fn piece_bytes(i: u32) -> Vec<u8> {
        (0..PIECE)
            .map(|b| (b as u8) ^ (i as u8).wrapping_mul(31) ^ 0x5a)
            .collect()
    }

    /// Writers put pieces in at random while a flusher runs the daemon's flush step and
    /// "persists" the bits it returns; at a random instant the power is cut. Returns the
    /// number of committed bits that name a piece the disk does not hold.
    fn run_cuts(mode: SyncMode, cuts: u32, seed: u64) -> (u32, u32) {
        let mut violations = 0;
        let mut committed_total = 0;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for cut in 0..cuts {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data");
            let len = u64::from(PIECE) * u64::from(PIECES);
            let storage = Storage::open(&path, len, PIECE, OpenMode::CreateOrReuse).unwrap();
            let store = Arc::new(FaultStore::new(storage, PIECES, mode));
            let durable = Arc::new(Mutex::new(Durable::new(Bitfield::new(PIECES))));
            // What "sled" holds: the last bitfield a flush committed.
            let persisted = Arc::new(Mutex::new(Bitfield::new(PIECES)));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut order: Vec<u32> = (0..PIECES).collect();
            use rand::seq::SliceRandom;
            order.shuffle(&mut rng);
            let writer = {
                let (store, durable, stop) = (store.clone(), durable.clone(), stop.clone());
                std::thread::spawn(move || {
                    for i in order {
                        if stop.load(std::sync::atomic::Ordering::SeqCst) {
                            break;
                        }
                        let w = store.write_piece(i, &piece_bytes(i));
                        durable.lock().unwrap().written(w);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                })
            };
            let flusher = {
                let (store, durable, persisted, stop) = (
                    store.clone(),
                    durable.clone(),
                    persisted.clone(),
                    stop.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        match flush_step(&*store, &durable) {
                            Ok(bits) => {
                                let mut p = persisted.lock().unwrap();
                                // A commit that lands after the cut is lost with the power.
                                if !stop.load(std::sync::atomic::Ordering::SeqCst) {
                                    *p = bits;
                                }
                            }
                            Err(_) => break,
                        }
                        std::thread::sleep(std::time::Duration::from_micros(700));
                    }
                })
            };
            std::thread::sleep(std::time::Duration::from_micros(rng.gen_range(500..12_000)));
            // The cut: the persisted bitfield and the disk at one instant.
            let bits = {
                let p = persisted.lock().unwrap();
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                p.clone()
            };
            let disk = store.cut();
            writer.join().unwrap();
            flusher.join().unwrap();
            for i in bits.ones() {
                committed_total += 1;
                let good = disk[i as usize]
                    .as_ref()
                    .is_some_and(|b| Sha256::digest(b) == Sha256::digest(piece_bytes(i)));
                if !good {
                    violations += 1;
                }
            }
            let _ = cut;
        }
        (violations, committed_total)
    }

    #[test]
    fn it_should_leave_only_good_pieces_behind_set_bits_after_every_cut() {
        let (violations, committed) = run_cuts(SyncMode::Real, 20, 7);
        assert_eq!(violations, 0, "a set bit named a piece the disk lost");
        assert!(
            committed > 0,
            "the test committed nothing: it proves nothing"
        );
    }

    #[test]
    fn it_should_detect_the_violation_when_syncs_are_no_ops() {
        let (violations, committed) = run_cuts(SyncMode::Noop, 20, 7);
        assert!(committed > 0);
        assert!(
            violations > 0,
            "with lying syncs the cuts must expose bits for lost pieces"
        );
    }

    #[test]
    fn it_should_never_commit_after_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let len = u64::from(PIECE) * 4;
        let storage =
            Storage::open(&dir.path().join("d"), len, PIECE, OpenMode::CreateOrReuse).unwrap();
        let store = FaultStore::new(storage, 4, SyncMode::FailAfter(1));
        let durable = Mutex::new(Durable::new(Bitfield::new(4)));
        durable
            .lock()
            .unwrap()
            .written(store.write_piece(0, &piece_bytes(0)));
        assert_eq!(flush_step(&store, &durable).unwrap().count(), 1);
        durable
            .lock()
            .unwrap()
            .written(store.write_piece(1, &piece_bytes(1)));
        assert!(matches!(
            flush_step(&store, &durable),
            Err(SyncFailed::Failed(_))
        ));
        durable
            .lock()
            .unwrap()
            .written(store.write_piece(2, &piece_bytes(2)));
        assert!(matches!(
            flush_step(&store, &durable),
            Err(SyncFailed::Poisoned(_))
        ));
        assert_eq!(durable.lock().unwrap().bits().count(), 1);
    }
}
