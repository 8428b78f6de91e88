//! Writing results to stdout without `println!`, which panics when the reader has gone
//! (`shoal status --watch | head -1`). A closed pipe comes back as an `io::Error` of kind
//! `BrokenPipe`, and `main` turns it into a quiet exit 0.

use std::io::Write;

/// Write `s` as is and flush.
///
/// # Errors
/// The write failed (a closed pipe included).
pub fn print(s: &str) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.flush()
}

/// Write `s` and a newline, and flush.
///
/// # Errors
/// The write failed (a closed pipe included).
pub fn line(s: &str) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.write_all(b"\n")?;
    o.flush()
}

/// Pretty JSON and a newline.
///
/// # Errors
/// The write failed.
pub fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    line(&serde_json::to_string_pretty(v)?)?;
    Ok(())
}
