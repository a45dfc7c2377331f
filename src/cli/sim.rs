//! `aerokv sim`: the mission simulator (owned by the planning work, issue 4).
#[derive(clap::Args)]
pub struct SimArgs {}

pub fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("`aerokv sim` is not implemented yet")
}
