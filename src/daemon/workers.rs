//! A fixed pool of threads for piece verification (hash, then write through the map).
//!
//! `tokio::task::spawn_blocking` per piece spawned new threads under load (20 during one 1 GiB
//! download: each a stack mmap and an arena, taking the process's mmap lock and stalling every
//! page fault behind it) and its shared queue lock spun in `sched_yield` (1,249 calls in that
//! download). Piece hashing is CPU-bound, so one thread per core is all it can use.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

pub struct Workers {
    shared: Arc<(Mutex<Queue>, Condvar)>,
}

impl Workers {
    /// Start `threads` threads (at least one), named `NAME-I`.
    pub fn new(name: &str, threads: usize) -> Workers {
        let shared = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&shared))
                .expect("cannot start a worker thread");
        }
        Workers { shared }
    }

    /// One thread per core the process may use (at most 16: past that, a download is
    /// network-bound long before it is hash-bound).
    pub fn per_core(name: &str) -> Workers {
        Workers::new(
            name,
            std::thread::available_parallelism().map_or(2, |n| n.get().min(16)),
        )
    }

    /// Run `f` on a worker. The receiver fails only if `f` panicked.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f()); // The asker may have gone; the work is done either way.
        });
        let (lock, cond) = &*self.shared;
        lock.lock().expect("worker queue lock").jobs.push_back(job);
        cond.notify_one();
        rx
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let (lock, cond) = &*self.shared;
        lock.lock().expect("worker queue lock").closed = true;
        cond.notify_all();
    }
}

fn worker(shared: &(Mutex<Queue>, Condvar)) {
    let (lock, cond) = shared;
    loop {
        let job = {
            let mut q = lock.lock().expect("worker queue lock");
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = cond.wait(q).expect("worker queue lock");
            }
        };
        // A panicking job drops its sender (the asker sees an error); the thread goes on.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn it_should_run_jobs_on_its_threads_and_survive_a_panic() {
        let w = Workers::new("test-worker", 2);
        let name = w
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("test-worker-"));
        assert!(w.run(|| panic!("boom")).await.is_err());
        let results: Vec<u64> = futures_join(&w).await;
        assert_eq!(results, (0..100u64).map(|i| i * i).collect::<Vec<_>>());
    }

    async fn futures_join(w: &Workers) -> Vec<u64> {
        let rxs: Vec<_> = (0..100u64).map(|i| w.run(move || i * i)).collect();
        let mut out = Vec::new();
        for rx in rxs {
            out.push(rx.await.unwrap());
        }
        out
    }
}
