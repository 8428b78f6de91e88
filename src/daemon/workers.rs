//! A fixed pool of threads that write verified pieces through the map.
//!
//! `tokio::task::spawn_blocking` per piece spawned new threads under load (20 during one 1 GiB
//! download: each a stack mmap and an arena, taking the process's mmap lock and stalling every
//! page fault behind it) and its shared queue lock spun in `sched_yield` (1,249 calls in that
//! download). The work is CPU-bound (page faults and copies), so one thread per core is all
//! it can use.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};

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
    /// network-bound long before writing pieces limits it).
    pub fn per_core(name: &str) -> Workers {
        Workers::new(
            name,
            std::thread::available_parallelism().map_or(2, |n| n.get().min(16)),
        )
    }

    /// Run `f` on a worker thread.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let (lock, cond) = &*self.shared;
        lock.lock()
            .expect("worker queue lock")
            .jobs
            .push_back(Box::new(f));
        cond.notify_one();
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
        // A panicking job is lost (its piece is fetched again after a restart); the thread
        // goes on serving the others.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn it_should_run_jobs_on_its_threads_and_survive_a_panic() {
        let w = Workers::new("test-worker", 2);
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        w.spawn(move || {
            t.send(std::thread::current().name().map(str::to_string))
                .unwrap()
        });
        let name = rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert!(name.starts_with("test-worker-"), "{name}");
        // A panicking job takes neither thread down: 100 more jobs still run.
        w.spawn(|| panic!("boom"));
        w.spawn(|| panic!("boom"));
        for i in 0..100u64 {
            let t = tx.clone();
            w.spawn(move || t.send(Some(i.to_string())).unwrap());
        }
        let mut got: Vec<u64> = (0..100)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(5))
                    .unwrap()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}
