//! `aerokv bag record | play | info`: rosbag2 bags (MCAP) without rosbag2.
//!
//! `record -o DIR --mission` keeps every AeroKV topic, the battery inputs, /diagnostics and /clock
//! (activations and KV rows with `--activations` / `--kv-rows`), following topics as they appear;
//! `record -o DIR TOPIC...` keeps the named ones. SIGINT or SIGTERM finishes the bag properly.
//! `play DIR` republishes a bag with its recorded timing and QoS; `info DIR` checks a bag and
//! lists its topics; `audit DIR` decides every recorded assignment again (crate::audit); `replay DIR`
//! runs the mission again live (crate::replay, cli::replay).
use crate::bag::Bag;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct BagArgs {
    #[command(subcommand)]
    pub command: BagCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BagCommand {
    /// Record topics into a new bag directory until SIGINT/SIGTERM.
    #[cfg(feature = "ros")]
    Record(RecordArgs),
    /// Republish a bag with its recorded timing and QoS.
    #[cfg(feature = "ros")]
    Play(PlayArgs),
    /// Read a whole bag, check it, and list its topics and message counts.
    Info(InfoArgs),
    /// Decide every recorded assignment again from its recorded inputs (exit 1 at a divergence).
    #[cfg(feature = "ros")]
    Audit(AuditArgs),
    /// Run the recorded mission again in a fresh swarm under simulated time (/clock and the
    /// battery inputs from the recording, its kills at the same tokens), record it, and compare
    /// the decisions and the answer (exit 1 at a difference).
    #[cfg(feature = "ros")]
    Replay(super::replay::ReplayArgs),
}

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// The bag directory to create (must not exist or be empty).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Topics to record (each is recorded once a publisher of it appears).
    #[arg(required_unless_present = "mission", conflicts_with = "mission")]
    pub topics: Vec<String>,
    /// Record a mission: every AeroKV topic, the battery inputs, /diagnostics and /clock.
    #[arg(long)]
    pub mission: bool,
    /// With --mission: also the data plane's activations (stage inputs, replays).
    #[arg(long, requires = "mission")]
    pub activations: bool,
    /// With --mission: also the KV rows (snapshots and replica seeds).
    #[arg(long, requires = "mission")]
    pub kv_rows: bool,
    /// Messages waiting for the disk before new ones are dropped (and counted).
    #[arg(long, default_value_t = 10_000)]
    pub queue: usize,
}

#[derive(clap::Args, Debug)]
pub struct PlayArgs {
    /// The bag directory (with metadata.yaml).
    pub bag: PathBuf,
    /// Speed factor (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Publish /clock with the bag's time, at HZ times a second (default 40).
    #[arg(long, value_name = "HZ", num_args = 0..=1, default_missing_value = "40")]
    pub clock: Option<f64>,
    /// Only these topics.
    #[arg(long, num_args = 1..)]
    pub topics: Vec<String>,
    /// Play again from the start when the bag ends, until SIGINT/SIGTERM.
    #[arg(long = "loop")]
    pub repeat: bool,
    /// Seconds to wait after creating the publishers, so that subscribers can match them.
    #[arg(long, default_value_t = 0.5)]
    pub delay: f64,
    /// First wait until every topic played has a subscriber (in another process), then --delay.
    #[arg(long)]
    pub wait_for_subscribers: bool,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    pub bag: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    pub bag: PathBuf,
    /// The swarm's keystore (`aerokv keys init`): also verify every signed message recorded, as a
    /// node would on receipt, and fail on any unsigned or forged one (named with its byte offset).
    #[arg(long, value_name = "DIR")]
    pub keystore: Option<PathBuf>,
}

pub fn run(a: BagArgs) -> anyhow::Result<()> {
    match a.command {
        #[cfg(feature = "ros")]
        BagCommand::Record(r) => record(r),
        #[cfg(feature = "ros")]
        BagCommand::Play(p) => play(p),
        BagCommand::Info(i) => info(i),
        #[cfg(feature = "ros")]
        BagCommand::Audit(a) => audit(a),
        #[cfg(feature = "ros")]
        BagCommand::Replay(r) => super::replay::run(r),
    }
}

#[cfg(feature = "ros")]
fn record(a: RecordArgs) -> anyhow::Result<()> {
    use crate::bag::Selection;
    use anyhow::Context;
    let stop = crate::os::stop_on_signals();
    let selection = if a.mission {
        Selection::Mission { activations: a.activations, kv_rows: a.kv_rows }
    } else {
        Selection::Topics(a.topics)
    };
    let opts = crate::ros::bag::RecordOptions {
        dir: a.output.clone(),
        selection,
        discovery_period: std::time::Duration::from_millis(250),
        queue: a.queue,
    };
    let report = crate::ros::bag::record(opts, stop).with_context(|| format!("recording {}", a.output.display()))?;
    let info = &report.summary.info;
    eprintln!(
        "[bag] {}: {} messages on {} topics over {:.1} s",
        report.summary.dir.display(),
        info.message_count,
        info.topics_with_message_count.len(),
        info.duration.nanoseconds as f64 / 1e9
    );
    for (topic, n) in &report.dropped {
        eprintln!("[bag] warning: {n} messages on {topic} dropped (the disk fell behind)");
    }
    for (topic, why) in &report.skipped {
        eprintln!("[bag] warning: {topic} not recorded: {why}");
    }
    for topic in &report.never_seen {
        eprintln!("[bag] warning: {topic} never appeared");
    }
    Ok(())
}

#[cfg(feature = "ros")]
fn play(a: PlayArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    anyhow::ensure!(a.delay.is_finite() && a.delay >= 0.0, "--delay must be a number of seconds");
    let stop = crate::os::stop_on_signals();
    let opts = crate::ros::bag::PlayOptions {
        dir: a.bag.clone(),
        rate: a.rate,
        clock_hz: a.clock,
        topics: a.topics,
        repeat: a.repeat,
        delay: std::time::Duration::from_secs_f64(a.delay),
        wait_for_subscribers: a.wait_for_subscribers,
    };
    let report = crate::ros::bag::play(opts, stop).with_context(|| format!("playing {}", a.bag.display()))?;
    let total: u64 = report.published.values().sum();
    eprintln!("[bag] published {total} messages on {} topics", report.published.len());
    if report.clock_ticks > 0 {
        eprintln!("[bag] /clock published {} times", report.clock_ticks);
    }
    for (topic, why) in &report.skipped {
        eprintln!("[bag] warning: {topic} not played: {why}");
    }
    Ok(())
}

/// Prints every assignment decided again, the warnings, and the first divergence (an error);
/// with a keystore first the signatures (any message refused is an error too).
#[cfg(feature = "ros")]
fn audit(a: AuditArgs) -> anyhow::Result<()> {
    use aerokv_auth::{Keystore, Rejection};
    use anyhow::Context;
    let roster = a
        .keystore
        .as_deref()
        .map(|dir| Keystore::open(dir).map(|k| k.roster).with_context(|| format!("--keystore {}", dir.display())))
        .transpose()?;
    let (mission, authenticity) = crate::ros::record::read_mission_verified(&a.bag, roster)
        .with_context(|| format!("auditing {}", a.bag.display()))?;
    let mut refused = 0;
    if let Some(auth) = &authenticity {
        const SHOWN: usize = 10;
        for r in auth.refused.iter().take(SHOWN) {
            println!("not authentic: {r}");
        }
        if auth.refused.len() > SHOWN {
            println!("not authentic: ... and {} more", auth.refused.len() - SHOWN);
        }
        let c = &auth.counts;
        let forged: Vec<String> = Rejection::ALL
            .iter()
            .filter(|&&why| why != Rejection::Unsigned)
            .map(|&why| format!("{} {}", why.name(), c.rejected(why)))
            .collect();
        println!(
            "signatures: {} verified, {} unsigned, forged: {} ({}); {} recorded twice (checked once)",
            c.accepted,
            c.rejected(Rejection::Unsigned),
            c.rejected_total() - c.rejected(Rejection::Unsigned),
            forged.join(", "),
            auth.duplicates
        );
        refused = auth.refused.len();
    }
    let report = crate::audit::audit(&mission);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for c in &report.checked {
        println!(
            "epoch {:>3} at {:>8.3} s  {:<10} {:<40} decided again exactly",
            c.epoch, c.at_s, c.decision, c.reason
        );
    }
    match report.divergence {
        Some(d) => Err(anyhow::anyhow!("audit: {}: divergence at {d}", a.bag.display())),
        None if refused > 0 => Err(anyhow::anyhow!(
            "audit: {}: {refused} message(s) not authentic (the first: {})",
            a.bag.display(),
            authenticity.as_ref().and_then(|a| a.refused.first()).map_or(String::new(), |r| r.to_string())
        )),
        None => {
            println!(
                "audit: {}: {} assignments decided again exactly, no divergence{}",
                a.bag.display(),
                report.checked.len(),
                if authenticity.is_some() { ", every signed message authentic" } else { "" }
            );
            Ok(())
        }
    }
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let bag = Bag::open(&a.bag)?;
    let contents = bag.check()?;
    let info = &bag.info;
    println!("bag:       {}", bag.dir.display());
    println!("files:     {}", info.relative_file_paths.join(", "));
    println!("messages:  {}", info.message_count);
    println!("duration:  {:.3} s", info.duration.nanoseconds as f64 / 1e9);
    println!("ros_distro: {}", info.ros_distro);
    for t in &info.topics_with_message_count {
        let m = &t.topic_metadata;
        let qos = m
            .offered_qos_profiles
            .0
            .first()
            .map(|q| format!(" ({}, {})", q.reliability.name(), q.durability.name()))
            .unwrap_or_default();
        println!(
            "topic:     {} | {} | {} messages{qos}",
            m.name,
            m.type_name,
            contents.counts.get(&m.name).unwrap_or(&0)
        );
    }
    Ok(())
}
