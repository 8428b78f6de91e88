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

/// Fault points for the fault tests: with `SHOAL_TEST_FAULT=NAME` (or `NAME:ERRNO`) in its
/// environment, every call of the point called NAME fails with that OS error (EIO by
/// default), as a failing disk would. Used only where a failure must be shown to be handled.
///
/// # Errors
/// The injected error, when this point is the one named.
pub fn fault_point(name: &str) -> std::io::Result<()> {
    static AT: OnceLock<Option<(String, i32)>> = OnceLock::new();
    let at = AT.get_or_init(|| {
        let v = std::env::var("SHOAL_TEST_FAULT").ok()?;
        let (n, e) = v.split_once(':').unwrap_or((&v, "5"));
        Some((n.to_string(), e.parse().unwrap_or(libc::EIO)))
    });
    match at {
        Some((n, errno)) if n == name => Err(std::io::Error::from_raw_os_error(*errno)),
        _ => Ok(()),
    }
}

/// With `SHOAL_TEST_PONG_DELAY_MS=N` in its environment, the peer answers every PING N ms
/// late, as a link with that much more round trip would: the RTT test's injected delay. Read
/// once; a PING comes about once a second per connection, so the cost is nil.
pub fn pong_delay() -> Option<std::time::Duration> {
    static AT: OnceLock<Option<std::time::Duration>> = OnceLock::new();
    *AT.get_or_init(|| {
        std::env::var("SHOAL_TEST_PONG_DELAY_MS")
            .ok()?
            .parse()
            .ok()
            .map(std::time::Duration::from_millis)
    })
}
