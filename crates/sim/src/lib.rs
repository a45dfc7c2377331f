//! AeroKV mission simulator (pure Rust, no ROS). Its missions are the paper's evaluation: docs/results.md.
//!
//! [`run`] simulates a scenario for one or more seeds and methods (NP, OO, SO, AeroKV and
//! ablations) with the same planner code the live scheduler uses, and writes:
//! - `summary.csv`: one row per method and seed;
//! - `aggregate.csv` (several seeds): mean and sd per method;
//! - `tokens.csv`, `uavs.csv`, `recoveries.csv`: per-token, per-UAV (every 64 tokens and at events)
//!   and per-recovery traces (one seed, or every seed with `traces`);
//! - `energy_<method>.png`, `layers_<method>.png`, `recovery.png`.
pub mod error;
pub mod mission;
pub mod output;
pub mod plot;
pub mod report;
pub mod scenario;

use std::path::PathBuf;
use std::time::Instant;

use tracing::info;

pub use error::SimError;
pub use mission::{failure_events, run_mission, run_mission_with, FailureEvent, Method, MissionOutput, Summary};
pub use scenario::Scenario;

/// What `aerokv sim` asked for.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub scenario: PathBuf,
    pub seeds: Vec<u64>,
    pub methods: Vec<Method>,
    pub out: PathBuf,
    /// Write per-token / per-UAV traces even for several seeds (they are always written for one).
    pub traces: bool,
    pub plots: bool,
}

/// Parse `A..B` (B exclusive) or a single seed.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>, SimError> {
    if let Some((a, b)) = s.split_once("..") {
        let a: u64 = a.trim().parse().map_err(|_| SimError::SeedRange(s.into()))?;
        let b: u64 = b.trim().parse().map_err(|_| SimError::SeedRange(s.into()))?;
        if a >= b {
            return Err(SimError::SeedRange(s.into()));
        }
        Ok((a..b).collect())
    } else {
        Ok(vec![s.trim().parse().map_err(|_| SimError::SeedRange(s.into()))?])
    }
}

/// Run everything, write the files, return the summaries and the printed table.
pub fn run(opts: &SimOptions) -> Result<(Vec<Summary>, String), SimError> {
    let scn = Scenario::load(&opts.scenario)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| SimError::Io { path: opts.out.display().to_string(), source: e })?;
    let traces = opts.traces || opts.seeds.len() == 1;
    let mut summaries = Vec::new();
    let mut tokens = Vec::new();
    let mut uavs = Vec::new();
    let mut recs = Vec::new();
    let t0 = Instant::now();
    let total = opts.seeds.len();
    for (i, &seed) in opts.seeds.iter().enumerate() {
        for &m in &opts.methods {
            let out = run_mission(&scn, m, seed, traces);
            if let Some(s) = out.summary {
                summaries.push(s);
            }
            tokens.extend(out.tokens);
            uavs.extend(out.uavs);
            recs.extend(out.recoveries);
        }
        info!(scenario = %scn.name, "seed {seed} done ({}/{total}, {:.1} s)", i + 1, t0.elapsed().as_secs_f64());
    }
    let dir = &opts.out;
    output::write_summary(&dir.join("summary.csv"), &summaries)?;
    output::write_recoveries(&dir.join("recoveries.csv"), &recs)?;
    if total > 1 {
        output::write_aggregate(&dir.join("aggregate.csv"), &summaries)?;
    }
    if traces {
        output::write_tokens(&dir.join("tokens.csv"), &tokens)?;
        output::write_uavs(&dir.join("uavs.csv"), &uavs)?;
    }
    if opts.plots {
        let names: Vec<String> = opts.methods.iter().map(|m| m.name().to_string()).collect();
        // per-UAV plots need one mission per method: only for a single seed
        if total == 1 {
            for n in &names {
                plot::method_plots(dir, n, &uavs, &recs)?;
            }
        }
        plot::recovery_plot(&dir.join("recovery.png"), &recs, &names, scn.deadline_s)?;
    }
    let table = output::table(&summaries);
    Ok((summaries, table))
}
