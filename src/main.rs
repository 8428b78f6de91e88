//! The `shoal` binary: parse arguments, run, map the outcome to an exit code (see
//! `shoal --help` for the codes).

use std::process::ExitCode;

use clap::Parser;

#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    tracker_heap::reexec_if_tracker();
    let cli = shoal::cli::Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shoal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(shoal::cli::run(cli));
    // A blocking thread stuck in the kernel (sled on a full disk) must not keep the process
    // alive after the daemon has stopped: give them a moment, then exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = shoal::cli::exit_code(&e);
            // A closed pipe (`shoal status | head`) is not a failure, and nobody reads a message.
            if code != 0 {
                eprintln!("shoal: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}

/// `shoal tracker run` keeps its heap on transparent huge pages.
///
/// At 100,000 live peers an announce touches a few scattered entries of a heap of hundreds
/// of MiB, and on 4 KiB pages each of those was a TLB miss as well as a cache miss: about a
/// third of the tracker's CPU per announce (tracker_load: 16-17 us with 4 KiB pages, 11-12 us
/// on huge pages, alternated in one sitting). jemalloc reads its options once, at the first
/// allocation, before `main`; so the tracker executes itself again with them set. Only the
/// tracker: a peer's small heap would only grow (17 to 62 MiB when tried). An operator's own
/// `_RJEM_MALLOC_CONF` is left as it is (`thp:default` turns this off).
#[cfg(target_os = "linux")]
mod tracker_heap {
    use std::ffi::OsString;
    use std::os::unix::process::CommandExt;

    /// jemalloc's MALLOC_CONF, under the prefix tikv-jemallocator builds it with.
    pub const VAR: &str = "_RJEM_MALLOC_CONF";
    const TRACKER_CONF: &str = "thp:always,metadata_thp:always";

    pub fn reexec_if_tracker() {
        if std::env::var_os(VAR).is_some() {
            return;
        }
        let mut args = std::env::args_os();
        let argv0 = args.next().unwrap_or_default();
        let rest: Vec<OsString> = args.collect();
        let is_tracker_run = rest
            .windows(2)
            .position(|w| w[0] == "tracker" && w[1] == "run")
            .is_some_and(|at| {
                rest[..at]
                    .iter()
                    .all(|a| a.to_string_lossy().starts_with('-'))
            });
        if !is_tracker_run {
            return;
        }
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        // Only returns on failure; the tracker then runs on ordinary pages.
        let err = std::process::Command::new(exe)
            .arg0(argv0)
            .args(&rest)
            .env(VAR, TRACKER_CONF)
            .exec();
        eprintln!("shoal: the tracker runs without huge pages (re-executing failed: {err})");
    }
}
