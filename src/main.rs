//! The `shoal` binary: parse arguments, run, map the outcome to an exit code (see
//! `shoal --help` for the codes).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
