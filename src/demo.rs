//! `shoal demo`: the swarm emulator.

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Leechers to start.
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
}

/// # Errors
/// Always, until the emulator lands.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("`shoal demo` is not built yet")
}
