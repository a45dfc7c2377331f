//! Subcommands of the `aerokv` CLI. Each file owns one subcommand: its `clap::Args` and `run`.
pub mod bag;
pub mod codecs;
pub mod generate;
pub mod keys;
pub mod launch;
#[cfg(feature = "ros")]
pub mod replay;
#[cfg(feature = "ros")]
pub mod report;
pub mod sim;
#[cfg(feature = "ros")]
pub mod swarm;
#[cfg(feature = "ros")]
pub mod swarm_radio;

/// Logs go to stderr (stdout carries answers and JSON); `RUST_LOG` overrides the level.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
