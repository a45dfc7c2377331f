//! `aerokv generate`: the whole model in one process (owned by the engine work, issue 3).
#[derive(clap::Args)]
pub struct GenerateArgs {}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`aerokv generate` is not implemented yet")
}
