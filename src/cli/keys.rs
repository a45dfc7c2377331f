//! `aerokv keys`: the swarm's keystore (docs/security.md).
//!
//! `aerokv keys init --uavs 4 DIR` makes one Ed25519 key per node and the roster;
//! `aerokv keys show DIR` checks and lists it; `aerokv keys bench` prints what signing costs.
use aerokv_auth::bench::{measure, Cost, Measured};
use aerokv_auth::{swarm_identities, Keystore};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Create a keystore: a private key per node (mode 0600) and the public roster.
    Init {
        /// UAVs uav1..uavN, each with a shard executor and a battery monitor.
        #[arg(long)]
        uavs: usize,
        /// Replace an existing keystore (every node then needs its new key).
        #[arg(long)]
        force: bool,
        dir: PathBuf,
    },
    /// Check a keystore (roster, every private key present, private and matching) and list it.
    Show { dir: PathBuf },
    /// Print sign and verify cost per message (Ed25519ph and HMAC-SHA256) and per token.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// UAVs in the swarm the per-token figure is for.
    #[arg(long, default_value_t = 4)]
    pub uavs: usize,
    /// Snapshot period T (tokens) and tail layers per UAV behind the snapshot stream.
    #[arg(long, default_value_t = 8)]
    pub snapshot_period: usize,
    #[arg(long, default_value_t = 6)]
    pub tail_layers: usize,
    /// Token rate the per-second telemetry is spread over.
    #[arg(long, default_value_t = 56.0)]
    pub tokens_per_s: f64,
    /// Time spent measuring each figure.
    #[arg(long, default_value_t = 300)]
    pub budget_ms: u64,
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    match args.command {
        KeysCommand::Init { uavs, force, dir } => {
            anyhow::ensure!(uavs >= 1, "--uavs must be at least 1");
            let ks = Keystore::init(&dir, &swarm_identities(uavs)?, force)?;
            println!("keystore {}: {} identities, private keys mode 0600", dir.display(), ks.roster.members().count());
            println!(
                "give every node {0}/roster.yaml and only its own {0}/private/<namespace>/<node>.pem",
                dir.display()
            );
            Ok(())
        }
        KeysCommand::Show { dir } => show(&dir),
        KeysCommand::Bench(b) => bench(&b),
    }
}

fn show(dir: &std::path::Path) -> anyhow::Result<()> {
    let ks = Keystore::open(dir)?;
    println!("{:<24} {:<16} public key (Ed25519)", "identity", "role");
    let mut problems = 0;
    for m in ks.roster.members() {
        let key = match ks.signing_key(&m.id) {
            Ok(_) => "private key ok".to_string(),
            Err(e) => {
                problems += 1;
                format!("PROBLEM: {e}")
            }
        };
        println!("{:<24} {:<16} {}  {key}", m.id.as_str(), m.role.to_string(), m.public_key_hex());
    }
    println!("UAVs on the roster: {}", ks.roster.uavs().into_iter().collect::<Vec<_>>().join(" "));
    anyhow::ensure!(problems == 0, "{problems} private key(s) missing or unusable");
    Ok(())
}

/// One kind of message in the per-token budget.
struct Traffic {
    what: &'static str,
    bytes: usize,
    signs_per_token: f64,
    verifies_per_token: f64,
}

fn bench(b: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(b.uavs >= 1 && b.snapshot_period >= 1 && b.tokens_per_s > 0.0, "bad benchmark parameters");
    let (u, t) = (b.uavs as f64, b.snapshot_period as f64);
    // Hidden states of one token are 576 f32 (2,304 B); KV rows are 2 x 3 heads x 64 x 4 B per layer and token.
    let kv_row = 2 * 3 * 64 * 4;
    let per_s = 1.0 / b.tokens_per_s;
    let traffic = [
        // gateway -> stage 1 -> ... -> stage U -> gateway; stage 1's input is also read by its replica holder.
        Traffic {
            what: "activation, 1 token",
            bytes: 2304 + 120,
            signs_per_token: u + 1.0,
            verifies_per_token: u + 2.0,
        },
        // Verified by a client that checks the stream (no swarm node reads it).
        Traffic { what: "token chunk", bytes: 120, signs_per_token: 1.0, verifies_per_token: 1.0 },
        Traffic {
            what: "KV snapshot, T tokens of a tail",
            bytes: b.snapshot_period * b.tail_layers * kv_row + 150,
            signs_per_token: u / t,
            verifies_per_token: u / t,
        },
        // 20 Hz per executor, read by the watchdog, the scheduler and the UAV's battery monitor.
        Traffic {
            what: "heartbeat (20 Hz)",
            bytes: 200,
            signs_per_token: 20.0 * u * per_s,
            verifies_per_token: 60.0 * u * per_s,
        },
        // 2 Hz per battery monitor, read by the watchdog and the scheduler.
        Traffic {
            what: "battery (2 Hz)",
            bytes: 160,
            signs_per_token: 2.0 * u * per_s,
            verifies_per_token: 4.0 * u * per_s,
        },
        // The watchdog's own, 10 Hz, read by the scheduler.
        Traffic {
            what: "watchdog heartbeat (10 Hz)",
            bytes: 150,
            signs_per_token: 10.0 * per_s,
            verifies_per_token: 10.0 * per_s,
        },
        Traffic { what: "assignment", bytes: 400, signs_per_token: 0.0, verifies_per_token: 0.0 },
    ];
    let budget = Duration::from_millis(b.budget_ms);
    let extra: [(&str, usize); 3] = [
        ("prefill chunk, 128 tokens", 128 * 2304 + 120),
        ("KV seed, 1,024 tokens x 2 layers", 1024 * 2 * kv_row + 150),
        ("KV snapshot, 4 MiB", 4 << 20),
    ];
    println!("CPU time per message (us; Ed25519ph = what AeroKV signs with, HMAC-SHA256 for comparison)");
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "message", "bytes", "ed sign", "ed verify", "hmac sign", "hmac vfy"
    );
    let mut measured: Vec<(&Traffic, Measured)> = Vec::new();
    let row = |what: &str, m: &Measured| {
        println!(
            "{:<36} {:>10} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            what, m.bytes, m.ed25519.sign_us, m.ed25519.verify_us, m.hmac_sha256.sign_us, m.hmac_sha256.verify_us
        )
    };
    for tr in &traffic {
        let m = measure(tr.bytes, budget);
        row(tr.what, &m);
        measured.push((tr, m));
    }
    for (what, bytes) in extra {
        row(what, &measure(bytes, budget));
    }
    let total = |pick: fn(&Measured) -> Cost| -> (f64, f64, f64, f64) {
        let mut out = (0.0, 0.0, 0.0, 0.0);
        for (tr, m) in &measured {
            let c = pick(m);
            out.0 += tr.signs_per_token;
            out.1 += tr.verifies_per_token;
            out.2 += tr.signs_per_token * c.sign_us;
            out.3 += tr.verifies_per_token * c.verify_us;
        }
        out
    };
    println!(
        "\nper token, {} UAVs (T = {}, {} tail layers, telemetry spread over {} tokens/s):",
        b.uavs, b.snapshot_period, b.tail_layers, b.tokens_per_s
    );
    let token_ms = 1e3 / b.tokens_per_s;
    let activation = measured[0].1;
    for (name, pick) in
        [("Ed25519ph", (|m: &Measured| m.ed25519) as fn(&Measured) -> Cost), ("HMAC-SHA256", |m| m.hmac_sha256)]
    {
        let (signs, verifies, sign_us, verify_us) = total(pick);
        // Every hop of the pipeline signs its output and its receiver verifies it before computing.
        let hop = pick(&activation);
        let path_ms = (u + 1.0) * (hop.sign_us + hop.verify_us) / 1e3;
        println!(
            "  {name:<12} {signs:.1} signatures + {verifies:.1} verifications: {:.2} ms CPU summed over all nodes; \
             on the critical path {path_ms:.2} ms ({} hops x (sign + verify), {:.1} % of a token's {token_ms:.1} ms)",
            (sign_us + verify_us) / 1e3,
            b.uavs + 1,
            100.0 * path_ms / token_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn init_then_show_then_refuse_overwrite() {
        let tmp = std::env::temp_dir().join(format!("aerokv-keys-cli-{}", std::process::id()));
        let init = |force| run(KeysArgs { command: KeysCommand::Init { uavs: 2, force, dir: tmp.clone() } });
        init(false).unwrap();
        show(&tmp).unwrap();
        let err = init(false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        init(true).unwrap();
        std::fs::remove_dir_all(&tmp).context("cleanup").unwrap();
    }
}
