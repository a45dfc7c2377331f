//! `aerokv bag replay DIR --out NEW --user "QUESTION"`: a recorded mission again, live, in a fresh
//! swarm under simulated time (`aerokv swarm --use-sim-time` with the recorded kills at the same
//! token and the recorded layer latency), `/clock` and the battery inputs played from the
//! recording (crate::ros::replay), recorded into NEW; then the decisions and the answer are
//! compared (crate::replay).
use crate::mission::Mission;
use crate::replay::{compare, script, unheard, Pacer};
use anyhow::Context;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The recorded mission (a bag `aerokv swarm --record` wrote).
    pub bag: PathBuf,
    /// The new mission's bag directory (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The recorded mission's question (a service request, not in the bag).
    #[arg(long)]
    pub user: String,
    /// Default: as many tokens as the recorded answer has.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// The new swarm's logs (default: a directory of its own beside --out).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

pub fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let read = |dir: &PathBuf| -> anyhow::Result<Mission> {
        crate::ros::record::read_mission(dir).with_context(|| format!("reading {}", dir.display()))
    };
    let rec = script(&read(&a.bag)?);
    anyhow::ensure!(!rec.uavs.is_empty(), "{}: no assignment recorded: nothing to replay", a.bag.display());
    let tokens = rec.answer.iter().filter(|t| !t.done).count() as u32;
    anyhow::ensure!(tokens > 0, "{}: no answer recorded: nothing to replay", a.bag.display());
    let uavs = rec.uavs.len();
    for u in &rec.uavs {
        let n: Option<usize> = u.strip_prefix("uav").and_then(|n| n.parse().ok());
        anyhow::ensure!(
            n.is_some_and(|n| (1..=uavs).contains(&n)),
            "{}: UAV {u} is not one of uav1..uav{uavs} that `aerokv swarm` starts",
            a.bag.display()
        );
    }
    let kills: Vec<String> = rec.kills.iter().map(|k| k.arg()).collect();
    eprintln!(
        "[replay] {}: {uavs} UAVs, {} decisions, {tokens} tokens, kills [{}], layer latency {}, {} battery inputs",
        a.bag.display(),
        rec.decisions.len(),
        kills.join(" "),
        rec.layer_latency_s.map_or("not recorded (measured again)".into(), |s| format!("{:.3} ms", s * 1e3)),
        rec.battery.len()
    );

    let exe = std::env::current_exe().context("finding the aerokv executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("swarm").args(["--uavs", &uavs.to_string(), "--user", &a.user]);
    cmd.args(["--max-tokens", &a.max_tokens.unwrap_or(tokens).to_string()]);
    cmd.arg("--record").arg(&a.out).arg("--use-sim-time");
    for k in &kills {
        cmd.args(["--kill", k]);
    }
    // Each battery starts where the recording's did (its simulation runs until the played input
    // arrives), so the plans made before that are made from the recorded charge too.
    let mut started = std::collections::BTreeSet::new();
    for b in rec.battery.iter().filter(|b| started.insert(b.uav.as_str())) {
        cmd.args(["--soc", &format!("{}={}", b.uav, b.state_of_charge)]);
    }
    if let Some(s) = rec.layer_latency_s {
        cmd.args(["--layer-latency-s", &s.to_string()]);
    }
    let log_dir = a.log_dir.clone().unwrap_or_else(|| a.out.with_extension("logs"));
    cmd.arg("--log-dir").arg(&log_dir);
    // The answer is read from the new bag; the swarm's progress goes to stderr.
    cmd.stdin(Stdio::null()).stdout(Stdio::null());

    let stop = AtomicBool::new(false);
    let pacer = Pacer::new(rec.start_ns, rec.token_ns.clone());
    // Every played topic is read by the UAV's battery monitor and by the new swarm's recorder.
    const READERS: usize = 2;
    let match_timeout = std::time::Duration::from_secs(120);
    let (status, fed) = std::thread::scope(|s| {
        let feeder = s.spawn(|| crate::ros::replay::drive(pacer, &rec.battery, READERS, match_timeout, &stop));
        let status = cmd.status().context("starting `aerokv swarm`");
        stop.store(true, Ordering::Relaxed);
        let fed = feeder.join().map_err(|_| anyhow::anyhow!("the battery feeder panicked"));
        (status, fed)
    });
    let status = status?;
    let fed = fed??;
    anyhow::ensure!(status.success(), "the replayed swarm ended with {status} (logs in {})", log_dir.display());
    eprintln!("[replay] {} battery inputs published, the new swarm made {} tokens", fed.published, fed.tokens_out);
    println!(
        "sim time: /clock from {:.3} s (the recording's start) to {:.3} s; inputs read after {:.1} s; recorded times shifted by {:+.3} s (the first token); {} holds at a token's recorded time, {} given up (the clock at most {:.3} s past a token's time)",
        rec.start_ns as f64 / 1e9,
        fed.end_ns as f64 / 1e9,
        fed.matched_after_s,
        fed.offset_s,
        fed.holds,
        fed.released,
        fed.ahead_s
    );

    let new_mission = read(&a.out)?;
    let new = script(&new_mission);
    let played: std::collections::BTreeSet<&str> = rec.battery.iter().map(|b| b.uav.as_str()).collect();
    let lost = unheard(&new_mission, &played, rec.start_ns);
    if let Some(first) = lost.first() {
        anyhow::bail!(
            "replay: {}: {} battery report(s) after the clock started did not come from the played input (first: {} at {:.3} s, from {})",
            a.out.display(),
            lost.len(),
            first.uav,
            first.stamp_ns as f64 / 1e9,
            first.source
        );
    }
    println!(
        "battery inputs followed by: {}",
        new.battery_state_followed.iter().map(String::as_str).collect::<Vec<_>>().join(" ")
    );
    for (i, d) in rec.decisions.iter().enumerate() {
        let same = new.decisions.get(i) == Some(d);
        println!("decision {:>2}  {:<32} {}", i + 1, d.reason, if same { "same" } else { "DIFFERS" });
    }
    if rec.after_answer + new.after_answer > 0 {
        println!(
            "after the answer (idle re-plans, not compared): recorded {}, replayed {}",
            rec.after_answer, new.after_answer
        );
    }
    match compare(&rec, &new) {
        None => {
            let text: String = rec.answer.iter().map(|t| t.text.as_str()).collect();
            println!("answer: {tokens} tokens, identical: {text:?}");
            println!(
                "replay: {} -> {}: the same {} decisions and an identical answer",
                a.bag.display(),
                a.out.display(),
                rec.decisions.len()
            );
            Ok(())
        }
        Some(d) => Err(anyhow::anyhow!("replay: {} -> {}: first difference at {d}", a.bag.display(), a.out.display())),
    }
}
