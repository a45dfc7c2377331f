//! `aerokv report DIR --out OUT`: a recorded mission (a bag) as PNG figures and a one-page
//! summary, drawn by the simulator's report code (`aerokv_sim::report`) from the series
//! `crate::mission::series` extracts.
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The bag directory (with metadata.yaml), e.g. from `aerokv swarm --record DIR`.
    pub bag: PathBuf,
    /// Where the figures and summary.md go (created).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let mission = crate::ros::record::read_mission(&a.bag).with_context(|| format!("reporting {}", a.bag.display()))?;
    let series = crate::mission::series(&mission);
    let files = aerokv_sim::report::write_report(&series, &a.out)?;
    println!("{}", files.summary.display());
    Ok(())
}
