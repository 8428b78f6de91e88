//! Crash points for the crash-safety tests: with `SHOAL_TEST_CRASH_AT=NAME` in its
//! environment, the process aborts (no destructors, no flushes, like a power cut for our
//! state) the first time it reaches the point called NAME. Only the flush path has points, so
//! the cost is one cached comparison per flush, never per byte.

use std::sync::OnceLock;

pub fn crash_point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("SHOAL_TEST_CRASH_AT").ok());
    if at.as_deref() == Some(name) {
        eprintln!("SHOAL_TEST_CRASH_AT: crashing at {name}");
        std::process::abort();
    }
}
