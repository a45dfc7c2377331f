//! `aerokv`: the command-line entry point (generate, sim, launch, keys, swarm, bag, report).
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "aerokv", version, about = "Resilient LLM inference across a UAV swarm")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole model in one process and stream the answer.
    Generate(aerokv::cli::generate::GenerateArgs),
    /// Run the mission simulator (NP / OO / SO / AeroKV) and write CSV traces and plots.
    Sim(aerokv::cli::sim::SimArgs),
    /// The swarm's keystore: `init --uavs N DIR`, `show DIR`, `bench` (docs/security.md).
    Keys(aerokv::cli::keys::KeysArgs),
    /// Start the nodes of a ROS 2 XML launch file on this machine (a `ros2 launch` stand-in).
    Launch(aerokv::cli::launch::LaunchArgs),
    /// Measure the wire codecs on the real model in one process (bytes, CPU, agreement with raw).
    Codecs(aerokv::cli::codecs::CodecsArgs),
    /// Start a swarm on this machine, generate through it (optionally killing drones), stop it.
    #[cfg(feature = "ros")]
    Swarm(aerokv::cli::swarm::SwarmArgs),
    /// Record, play, check and audit rosbag2 bags (MCAP) of missions.
    Bag(aerokv::cli::bag::BagArgs),
    /// A mission report from a recorded mission: PNG figures and a one-page summary.
    #[cfg(feature = "ros")]
    Report(aerokv::cli::report::ReportArgs),
}

fn main() -> std::process::ExitCode {
    aerokv::cli::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => aerokv::cli::generate::run(args),
        Command::Sim(args) => aerokv::cli::sim::run(args),
        Command::Launch(args) => aerokv::cli::launch::run(args),
        Command::Codecs(args) => aerokv::cli::codecs::run(args),
        Command::Keys(args) => aerokv::cli::keys::run(args),
        #[cfg(feature = "ros")]
        Command::Swarm(args) => aerokv::cli::swarm::run(args),
        Command::Bag(args) => aerokv::cli::bag::run(args),
        #[cfg(feature = "ros")]
        Command::Report(args) => aerokv::cli::report::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
