//! `aerokv sim`: the mission simulator (owned by the planning work, issue 4).
//!
//! `aerokv sim --scenario config/scenarios/paper.yaml --seeds 0..20 --methods np,oo,so,aerokv --out out/sim`
//! prints a table (mean ± sd over seeds) on stdout and writes CSV traces and PNG plots to `--out`.
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct SimArgs {
    /// Scenario YAML (config/scenarios/*.yaml).
    #[arg(long, default_value = "config/scenarios/paper.yaml")]
    pub scenario: PathBuf,
    /// One seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Several seeds, `A..B` (B exclusive); overrides --seed and aggregates them.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Comma-separated: np, oo, so, aerokv, aerokv-nop2, aerokv-uniform, aerokv-beam, aerokv-noretire.
    #[arg(long, default_value = "np,oo,so,aerokv")]
    pub methods: String,
    /// Output directory.
    #[arg(long, default_value = "out/sim")]
    pub out: PathBuf,
    /// Write per-token and per-UAV traces for every seed (always written for a single seed).
    #[arg(long)]
    pub traces: bool,
    /// Do not draw PNG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Also write a mission report (the figures and summary `aerokv report` writes for a bag) of
    /// the first seed's mission with the first method, into this directory.
    #[arg(long, value_name = "OUT")]
    pub report: Option<PathBuf>,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let seeds = match &args.seeds {
        Some(s) => aerokv_sim::parse_seeds(s)?,
        None => vec![args.seed],
    };
    let methods = aerokv_sim::Method::parse_list(&args.methods)?;
    anyhow::ensure!(!methods.is_empty(), "--methods is empty");
    let opts = aerokv_sim::SimOptions {
        scenario: args.scenario.clone(),
        seeds,
        methods,
        out: args.out.clone(),
        traces: args.traces,
        plots: !args.no_plots,
    };
    let start = std::time::Instant::now();
    let (_, table) = aerokv_sim::run(&opts).with_context(|| format!("simulating {}", args.scenario.display()))?;
    print!("{table}");
    if let Some(out) = &args.report {
        let scn = aerokv_sim::Scenario::load(&args.scenario)?;
        let (method, seed) = (opts.methods[0], opts.seeds[0]);
        let mission = aerokv_sim::run_mission(&scn, method, seed, true);
        let series = aerokv_sim::report::from_simulation(&scn, &mission, method.name(), seed);
        let files = aerokv_sim::report::write_report(&series, out)?;
        eprintln!("[sim] report: {}", files.summary.display());
    }
    tracing::info!(out = %args.out.display(), "wrote results in {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}
