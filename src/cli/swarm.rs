//! `aerokv swarm --uavs N --user "QUESTION" --max-tokens M [--json] [--kill UAV:WHEN ...]`:
//! starts a swarm on this machine from the package's launch files (`control.launch.xml` once,
//! `uav.launch.xml` per UAV: the node set and configuration `ros2 launch` would start), waits until
//! the scheduler has planned over every UAV, sends a goal to the `/aerokv/generate` action, prints
//! the answer as its feedback streams it (Ctrl-C cancels the goal), and stops every process it
//! started.
//!
//! `--kill uav2:10` sends SIGKILL to uav2's shard executor once 10 tokens are out, `--kill uav2:p256`
//! once the first 256 prompt tokens are through the swarm (in the middle of a long prompt's
//! prefill); the JSON output then lists, per failure, the detection, recovery and next-token times
//! measured from the kill. A long prompt's progress (`/aerokv/progress`) goes to stderr.
use super::swarm_radio::Radio;
use crate::launch::{Launcher, NodeProcess};
use crate::requests;
use crate::supervisor::{bin_dir, share_dir, Supervisor};
use anyhow::Context;
use futures::StreamExt;
use r2r::aerokv::action::Generate;
use r2r::aerokv::msg::{Assignment, Heartbeat, PromptProgress};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::time::timeout;

#[derive(clap::Args, Debug)]
pub struct SwarmArgs {
    /// Number of UAVs (uav1..uavN).
    #[arg(long, default_value_t = 4)]
    pub uavs: usize,
    /// The question (wrapped in the model's chat template).
    #[arg(long)]
    pub user: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// One JSON object on stdout instead of the streamed text.
    #[arg(long)]
    pub json: bool,
    /// SIGKILL UAV's shard executor after TOKEN generated tokens, e.g. uav2:10, or once the first
    /// N prompt tokens are through the swarm, e.g. uav2:p256 (repeatable). With --standby,
    /// `scheduler:TOKEN` kills the primary scheduler; the goal is resumed from the standby.
    #[arg(long, value_name = "UAV:TOKEN|UAV:pN")]
    pub kill: Vec<String>,
    /// Also start a standby scheduler (control.launch.xml standby:=true) that takes over when the
    /// primary dies; this command then resumes its goal by request id from the standby.
    #[arg(long)]
    pub standby: bool,
    /// Initial state of charge of one UAV's simulated battery (repeatable), e.g. uav3=0.6.
    #[arg(long, value_name = "UAV=SOC")]
    pub soc: Vec<String>,
    /// Parameter file for every UAV's nodes (default: the package's config/uav.yaml).
    #[arg(long)]
    pub uav_params: Option<PathBuf>,
    /// Parameter file for the scheduler and the watchdog (default: config/swarm.yaml; with
    /// --radio, config/radio/swarm-params.yaml).
    #[arg(long)]
    pub swarm_params: Option<PathBuf>,
    /// Sampling temperature (0 = greedy), top-p and seed.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the nodes' logs go (default: a new directory under the system's temp dir).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Generate exactly --max-tokens tokens (benchmarks).
    #[arg(long, hide = true)]
    pub ignore_eos: bool,
    /// Also write the JSON object to FILE (while the answer streams to stdout).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Give up when the swarm is not ready after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub ready_timeout_s: f64,
    /// The swarm's activation codec: raw, f16, int8 (the scheduler's `activation_codec`,
    /// overriding the parameter file).
    #[arg(long, value_name = "CODEC")]
    pub codec: Option<aerokv_codec::ActivationCodec>,
    /// Every UAV's KV codec: raw, zstd (the executors' `kv_codec`, overriding the parameter file).
    #[arg(long, value_name = "CODEC")]
    pub kv_codec: Option<aerokv_codec::KvCodec>,
    /// Plan with this many seconds per layer instead of measuring it at start-up (the
    /// scheduler's `layer_latency_s`; `aerokv bag replay` pins the recorded one).
    #[arg(long, value_name = "S")]
    pub layer_latency_s: Option<f64>,
    /// Run the control station and every UAV on hosts of their own (network namespaces) joined
    /// by an emulated 802.11 ad-hoc network described by this scenario (config/radio/*.yaml).
    /// The command must itself run inside `unshare -n`.
    #[arg(long, value_name = "SCENARIO")]
    pub radio: Option<PathBuf>,
    /// With --radio: after the answer, wait this long for UAVs declared failed (and not killed)
    /// to rejoin through a new plan.
    #[arg(long, default_value_t = 30.0)]
    pub rejoin_timeout_s: f64,
    /// Record the mission into this new bag directory (`aerokv bag record --mission`, started
    /// before the swarm and finished after it).
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// With --record: also the data plane's activations (stage inputs, replays).
    #[arg(long, requires = "record")]
    pub record_activations: bool,
    /// With --record: also the KV rows (snapshots and replica seeds).
    #[arg(long, requires = "record")]
    pub record_kv_rows: bool,
    /// Every node follows `/clock` (`use_sim_time:=true`) instead of the wall clock and waits for
    /// it before it starts; something else must publish it (`aerokv bag replay` does).
    #[arg(long)]
    pub use_sim_time: bool,
}

/// `aerokv bag record --mission` as a process of its own, so that recording never competes with
/// this process's ROS node, and a SIGINT finishes the bag.
struct Recorder {
    child: std::process::Child,
    dir: PathBuf,
}

impl Recorder {
    fn start(a: &SwarmArgs, dir: &std::path::Path, log_dir: &std::path::Path) -> anyhow::Result<Self> {
        if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
            anyhow::bail!("--record {}: not empty (a bag is written into a new directory)", dir.display());
        }
        std::fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let log_path = log_dir.join("bag_recorder.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the aerokv executable")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["bag", "record", "--mission", "-o"]).arg(dir).stdin(std::process::Stdio::null());
        if a.record_activations {
            cmd.arg("--activations");
        }
        if a.record_kv_rows {
            cmd.arg("--kv-rows");
        }
        cmd.stdout(log.try_clone()?).stderr(log);
        // SIGTERM: an orphaned recorder still finishes its bag.
        crate::supervisor::signal_when_parent_dies(&mut cmd, libc::SIGTERM);
        let child = cmd.spawn().context("starting the bag recorder")?;
        eprintln!("[swarm] recording the mission into {} (pid {})", dir.display(), child.id());
        Ok(Recorder { child, dir: dir.to_path_buf() })
    }

    /// SIGINT, then waits for the bag to be finished.
    fn finish(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on the pid of our own child, not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "the bag recorder for {} ended with {status}", self.dir.display());
                eprintln!("[swarm] mission recorded in {}", self.dir.display());
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("the bag recorder for {} did not finish within 20 s", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// When `--kill` strikes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KillPoint {
    /// Once this many tokens are generated.
    AfterTokens(u32),
    /// Once this many prompt tokens are through every layer (prefill progress).
    AfterPromptTokens(u32),
}

impl std::fmt::Display for KillPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillPoint::AfterTokens(n) => write!(f, "after {n} tokens"),
            KillPoint::AfterPromptTokens(n) => write!(f, "after {n} prompt tokens"),
        }
    }
}

struct Kill {
    uav: String,
    point: KillPoint,
    at: Option<Instant>,
}

/// The node a kill of `target` (a UAV, or "scheduler") strikes.
fn kill_fqn(target: &str) -> String {
    if target == "scheduler" {
        "/aerokv/scheduler".into()
    } else {
        format!("/{target}/shard_executor")
    }
}

fn parse_kills(v: &[String], uavs: usize, standby: bool) -> anyhow::Result<Vec<Kill>> {
    v.iter()
        .map(|s| {
            let (uav, when) = s
                .split_once(':')
                .with_context(|| format!("--kill {s}: expected UAV:TOKEN or UAV:pN, e.g. uav2:10 or uav2:p256"))?;
            let (n, point): (u32, fn(u32) -> KillPoint) = match when.strip_prefix('p') {
                Some(n) => (
                    n.parse().with_context(|| format!("--kill {s}: N in pN must be a number"))?,
                    KillPoint::AfterPromptTokens,
                ),
                None => (
                    when.parse().with_context(|| format!("--kill {s}: TOKEN must be a number"))?,
                    KillPoint::AfterTokens,
                ),
            };
            anyhow::ensure!(n >= 1, "--kill {s}: the count must be at least 1");
            if uav == "scheduler" {
                anyhow::ensure!(standby, "--kill {s}: killing the scheduler needs --standby");
                anyhow::ensure!(
                    matches!(point(n), KillPoint::AfterTokens(_)),
                    "--kill {s}: the scheduler is killed after tokens"
                );
                return Ok(Kill { uav: uav.into(), point: point(n), at: None });
            }
            let index: usize = uav
                .strip_prefix("uav")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("--kill {s}: UAVs are named uav1..uav{uavs}"))?;
            anyhow::ensure!((1..=uavs).contains(&index), "--kill {s}: this swarm has uav1..uav{uavs}");
            Ok(Kill { uav: uav.into(), point: point(n), at: None })
        })
        .collect()
}

/// SIGKILLs the shard executor of every kill due at `reached` that has not struck yet.
fn strike(sup: &mut Supervisor, kills: &mut [Kill], reached: KillPoint) {
    let due = |k: &Kill| match (k.point, reached) {
        (KillPoint::AfterTokens(n), KillPoint::AfterTokens(r)) => r >= n,
        (KillPoint::AfterPromptTokens(n), KillPoint::AfterPromptTokens(r)) => r >= n,
        _ => false,
    };
    for k in kills.iter_mut().filter(|k| k.at.is_none() && due(k)) {
        let fqn = kill_fqn(&k.uav);
        if sup.signal(&fqn, libc::SIGKILL) {
            k.at = Some(Instant::now());
            eprintln!("[swarm] killed {fqn} {reached}");
        }
    }
}

/// The swarm's processes: `control.launch.xml` + `uav.launch.xml` for uav1..uavN.
fn nodes(a: &SwarmArgs, log_dir: &std::path::Path) -> anyhow::Result<Vec<NodeProcess>> {
    let share = share_dir();
    let launcher = Launcher::new(&share);
    let n = a.uavs.to_string();
    // Over the radio the watchdog and the planner need the radio's values.
    let radio_params = a.radio.as_ref().map(|_| share.join("config/radio/swarm-params.yaml"));
    let swarm_params = a.swarm_params.as_ref().or(radio_params.as_ref()).map(|p| p.display().to_string());
    let sim_time = if a.use_sim_time { "true" } else { "false" };
    let mut args = vec![("expected_uavs", n.as_str()), ("use_sim_time", sim_time)];
    if a.standby {
        args.push(("standby", "true"));
    }
    if let Some(p) = &swarm_params {
        args.push(("params_file", p.as_str()));
    }
    let mut nodes = launcher.load(&share.join("launch/control.launch.xml"), &args)?;
    let socs: Vec<(String, String)> = a
        .soc
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(u, v)| (u.to_string(), v.to_string()))
                .with_context(|| format!("--soc {s}: expected UAV=SOC"))
        })
        .collect::<anyhow::Result<_>>()?;
    let uav_params = a.uav_params.as_ref().map(|p| p.display().to_string());
    for i in 1..=a.uavs {
        let id = format!("uav{i}");
        let mut args = vec![("uav_id", id.as_str()), ("use_sim_time", sim_time)];
        if let Some(p) = &uav_params {
            args.push(("params_file", p.as_str()));
        }
        if let Some((_, soc)) = socs.iter().find(|(u, _)| *u == id) {
            args.push(("initial_soc", soc.as_str()));
        }
        nodes.extend(launcher.load(&share.join("launch/uav.launch.xml"), &args)?);
    }
    for n in &mut nodes {
        match (n.executable.as_str(), a.codec, a.kv_codec) {
            ("scheduler", c, k) => {
                if let Some(c) = c {
                    n.params.push(("activation_codec".into(), c.to_string()));
                }
                // The cost model counts the snapshots with the executors' codec.
                if let Some(k) = k {
                    n.params.push(("kv_codec".into(), k.to_string()));
                }
            }
            ("shard_executor", _, Some(c)) => n.params.push(("kv_codec".into(), c.to_string())),
            _ => {}
        }
        if let (Some(_), "shard_executor") = (&a.radio, n.executable.as_str()) {
            // The radio's PHY rate per station, as `iw station dump` shows it: the emulator writes
            // each host's (crate::radio::netns).
            let uav = n.namespace.trim_matches('/').to_string();
            let hosts: Vec<String> = std::iter::once(crate::radio::scenario::CONTROL_HOST.to_string())
                .chain((1..=a.uavs).map(|i| format!("uav{i}")))
                .collect();
            let file = crate::radio::netns::station_dump_dir(log_dir).join(format!("{uav}.txt"));
            n.params.push(("station_dump_file".into(), file.display().to_string()));
            n.params.push(("station_macs".into(), crate::radio::netns::station_macs(&hosts)));
        }
        if let (Some(s), "scheduler") = (a.layer_latency_s, n.executable.as_str()) {
            // Shortest exact decimal, never an exponent or an integer (a YAML double).
            let v = if s.fract() == 0.0 { format!("{s:.1}") } else { format!("{s}") };
            n.params.push(("layer_latency_s".into(), v));
        }
    }
    Ok(nodes)
}

pub fn run(a: SwarmArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.uavs >= 1, "--uavs must be at least 1");
    let mut kills = parse_kills(&a.kill, a.uavs, a.standby)?;
    let log_dir =
        a.log_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("aerokv-swarm-{}", std::process::id())));
    let nodes = nodes(&a, &log_dir)?;
    let mut sup = Supervisor::new(bin_dir(), Some(log_dir.clone()));
    // Built before any node starts and before this process has a thread or a DDS participant.
    let mut radio = match &a.radio {
        Some(scenario) => Some(Radio::up(scenario, a.uavs, &share_dir(), &log_dir)?),
        None => None,
    };
    let recorder = a.record.as_deref().map(|dir| Recorder::start(&a, dir, &log_dir)).transpose()?;
    eprintln!(
        "[swarm] starting {} nodes for {} UAVs (ROS_DOMAIN_ID={}), logs in {}",
        nodes.len(),
        a.uavs,
        std::env::var("ROS_DOMAIN_ID").unwrap_or_else(|_| "0".into()),
        log_dir.display()
    );
    for n in &nodes {
        match &radio {
            Some(r) => sup.start_in(n, Some(r.host_of(n)?))?,
            None => sup.start(n)?,
        };
    }
    if let Some(r) = &radio {
        r.enter_control_station()?;
    }
    let keystore = nodes.iter().find(|n| n.executable == "scheduler").and_then(keystore_of);
    let result = drive(&a, &mut sup, &mut kills, radio.as_mut(), keystore.as_deref());
    let mut unclean = Vec::new();
    for (fqn, stopped) in sup.stop_all(Duration::from_secs(5)) {
        let killed = kills.iter().any(|k| k.at.is_some() && fqn == kill_fqn(&k.uav));
        if !stopped.is_clean() && !killed {
            unclean.push(format!("{fqn} ({stopped})"));
        }
    }
    if !unclean.is_empty() {
        eprintln!("[swarm] warning: not a clean exit: {} (see {})", unclean.join(", "), log_dir.display());
    }
    // The emulator and the hosts' namespaces go last, after every node.
    if let Some(report) = radio.as_mut().and_then(|r| r.net.stop_emulator()) {
        eprintln!(
            "[radio] emulator: {:.2} s of CPU in {:.1} s ({:.1} % of one core), max real-time lag {:.1} ms",
            report.cpu_s,
            report.wall_s,
            100.0 * report.cpu_s / report.wall_s.max(1e-9),
            report.stats.get("max_lag_ms").copied().unwrap_or(f64::NAN)
        );
    }
    drop(radio);
    // After the nodes, so that the bag holds everything up to their end.
    let recorded = recorder.map(Recorder::finish).transpose();
    result.and(recorded.map(|_| ()))
}

/// The keystore a node is given (a `-p` override, else the last parameter file that sets it).
fn keystore_of(n: &NodeProcess) -> Option<String> {
    if let Some((_, v)) = n.params.iter().rev().find(|(k, _)| k == "keystore") {
        return Some(v.clone()).filter(|v| !v.is_empty() && v != "''");
    }
    n.params_files.iter().rev().find_map(|f| {
        let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(f).ok()?).ok()?;
        doc.as_mapping()?.values().find_map(|section| {
            section.get("ros__parameters")?.get("keystore")?.as_str().filter(|k| !k.is_empty()).map(str::to_string)
        })
    })
}

/// The signed token stream (`/aerokv/tokens`), checked against the keystore's roster: what this
/// client verified of one request, for its report.
#[derive(Default)]
struct TokenStream {
    /// Per request, the verified tokens by index.
    tokens: BTreeMap<u64, BTreeMap<u32, i32>>,
    done: BTreeMap<u64, bool>,
}

fn drive(
    a: &SwarmArgs,
    sup: &mut Supervisor,
    kills: &mut [Kill],
    radio: Option<&mut Radio>,
    keystore: Option<&str>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let ctx = r2r::Context::create()?;
    let node = Arc::new(Mutex::new(r2r::Node::create(ctx, "aerokv_swarm_cli", "")?));
    let spin = crate::ros::SpinThread::start(node.clone())?;
    let out = rt.block_on(session(a, node, sup, kills, radio, keystore));
    spin.stop();
    out
}

async fn session(
    a: &SwarmArgs,
    node: Arc<Mutex<r2r::Node>>,
    sup: &mut Supervisor,
    kills: &mut [Kill],
    mut radio: Option<&mut Radio>,
    keystore: Option<&str>,
) -> anyhow::Result<()> {
    let lock = || node.lock().unwrap_or_else(|e| e.into_inner());
    // Every UAV's latest heartbeat: how many messages of older epochs it has dropped (fenced).
    let stale = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    for i in 1..=a.uavs {
        let uav = format!("uav{i}");
        let mut beats =
            lock().subscribe::<Heartbeat>(&crate::ros::names::heartbeat(&uav), crate::ros::names::telemetry())?;
        let stale = stale.clone();
        tokio::spawn(async move {
            while let Some(hb) = beats.next().await {
                let mut s = stale.lock().unwrap_or_else(|e| e.into_inner());
                let n = s.entry(hb.uav_id).or_default();
                *n = (*n).max(hb.stale_messages);
            }
        });
    }
    let mut assignments =
        lock().subscribe::<Assignment>(crate::ros::names::ASSIGNMENT, crate::ros::names::latched())?;
    let mut progress = lock().subscribe::<PromptProgress>(crate::ros::names::PROGRESS, crate::ros::names::events())?;
    let client = lock().create_action_client::<Generate::Action>(crate::ros::names::GENERATE)?;
    // With the swarm's keystore, the token stream's signatures are checked (docs/security.md).
    let verifier = match keystore.map(crate::ros::auth::NodeAuth::verifier).transpose() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("[swarm] the token stream is not verified: {e:#}");
            None
        }
    };
    let stream = Arc::new(Mutex::new(TokenStream::default()));
    if let Some(auth) = verifier.clone() {
        let mut chunks =
            lock().subscribe::<r2r::aerokv::msg::TokenChunk>(crate::ros::names::TOKENS, crate::ros::names::events())?;
        let stream = stream.clone();
        tokio::spawn(async move {
            while let Some(c) = chunks.next().await {
                if !auth.accept_token(&c) {
                    continue;
                }
                let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
                if c.done {
                    s.done.insert(c.request_id, true);
                } else {
                    s.tokens.entry(c.request_id).or_default().insert(c.index, c.token_id);
                }
            }
        });
    }
    // The schedulers' heartbeats: a standby that serves (it took over) gets the goal again.
    let mut schedulers =
        lock().subscribe::<Heartbeat>(crate::ros::names::SCHEDULER_HEARTBEAT, crate::ros::names::telemetry())?;
    let available = r2r::Node::is_available(&client)?;

    // Ready: the scheduler serves and has planned over every UAV.
    let started = Instant::now();
    let deadline = tokio::time::sleep(Duration::from_secs_f64(a.ready_timeout_s));
    tokio::pin!(deadline);
    tokio::pin!(available);
    let (mut served, mut planned) = (false, false);
    // A node that exits while the swarm starts ends the command at once (not at the deadline).
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    while !(served && planned) {
        tokio::select! {
            _ = poll.tick() => {}
            r = &mut available, if !served => { r?; served = true; }
            Some(asg) = assignments.next() => {
                planned = asg.ring.len() >= a.uavs;
                if !planned { eprintln!("[swarm] epoch {}: {} of {} UAVs planned", asg.epoch, asg.ring.len(), a.uavs); }
            }
            _ = &mut deadline => anyhow::bail!("the swarm was not ready after {} s (service up: {served}, all UAVs planned: {planned})", a.ready_timeout_s),
        }
        if let Some(report) = sup.failed_to_start(false) {
            anyhow::bail!("{report}");
        }
    }
    eprintln!("[swarm] ready in {:.1} s", started.elapsed().as_secs_f64());

    let mut goal = Generate::Goal {
        user: a.user.clone(),
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        ..Default::default()
    };
    let sent = client.send_goal_request(goal.clone())?;
    if let Some(r) = radio.as_deref_mut() {
        r.request_sent()?;
    }
    let (mut handle, result, mut feedback) = sent.await.context("the scheduler did not take the goal")?;
    let mut result = Box::pin(result);
    // The primary scheduler was killed: the goal is sent again, by request id, to the standby.
    let mut resuming = false;
    // Seconds from the primary's kill to the first token the standby sent this client.
    let mut resumed_token_s: Option<f64> = None;
    let stdout = std::io::stdout();
    let mut last_progress_print: Option<Instant> = None;
    // Tokens streamed so far; a cancel in progress.
    let mut streamed = 0usize;
    let mut canceling = false;
    // The scheduler's reply to the cancel request (the result says how the goal ended).
    let mut cancel = None;
    let response = loop {
        tokio::select! {
            r = &mut result, if !resuming => break r.context("the goal's result")?.1,
            Some(hb) = schedulers.next(), if resuming => {
                if hb.uav_id != "standby" || hb.state != "serving" {
                    continue;
                }
                goal.resume_from = streamed as u32;
                let sent = client.send_goal_request(goal.clone())?;
                // A goal request sent before the standby's server is matched is lost: sent again
                // at its next heartbeat.
                match timeout(Duration::from_millis(500), sent).await {
                    Ok(Ok((h, r, f))) => {
                        eprintln!("[swarm] resumed request {} from token {streamed} on the standby", goal.request_id);
                        (handle, result, feedback) = (h, Box::pin(r), f);
                        resuming = false;
                    }
                    Ok(Err(e)) => eprintln!("[swarm] the standby did not take the goal: {e}"),
                    Err(_) => eprintln!("[swarm] no answer to the goal yet: sending it again"),
                }
            }
            Some(p) = progress.next() => {
                // Long prompts only, at most once a second, and always the end.
                let long = p.total as usize > aerokv_engine::PREFILL_CHUNK_TOKENS;
                if long && (p.done == p.total || last_progress_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(1))) {
                    eprintln!("[swarm] prompt: {} of {} tokens through the swarm", p.done, p.total);
                    last_progress_print = Some(Instant::now());
                }
                strike(sup, kills, KillPoint::AfterPromptTokens(p.done));
            }
            Some(fb) = feedback.next() => {
                if fb.index as usize != streamed {
                    eprintln!("[swarm] warning: feedback from token {} after {streamed} tokens (feedback lost)", fb.index);
                }
                if !a.json {
                    let mut out = stdout.lock();
                    let _ = write!(out, "{}", fb.text);
                    let _ = out.flush();
                }
                streamed = fb.index as usize + fb.token_ids.len();
                goal.request_id = fb.request_id;
                if goal.resume_from > 0 && resumed_token_s.is_none() && !fb.token_ids.is_empty() {
                    resumed_token_s = kills.iter().find(|k| k.uav == "scheduler").and_then(|k| k.at).map(|t| t.elapsed().as_secs_f64());
                }
                strike(sup, kills, KillPoint::AfterTokens(streamed as u32));
                if !resuming && kills.iter().any(|k| k.uav == "scheduler" && k.at.is_some()) && goal.resume_from == 0 {
                    resuming = true;
                    // The dead primary's feedback ends here.
                    eprintln!("[swarm] waiting for the standby to take over");
                }
            }
            _ = tokio::signal::ctrl_c() => {
                anyhow::ensure!(!canceling, "interrupted again while the goal was being canceled");
                eprintln!("\n[swarm] Ctrl-C: canceling the goal after {streamed} tokens");
                canceling = true;
                match handle.cancel() {
                    Ok(reply) => cancel = Some(Box::pin(reply)),
                    Err(e) => eprintln!("[swarm] cancel request: {e}"),
                }
            }
            Some(reply) = async { Some(cancel.as_mut()?.await) }, if cancel.is_some() => {
                cancel = None;
                if let Err(e) = reply {
                    eprintln!("[swarm] the scheduler did not cancel the goal: {e}");
                }
            }
        }
    };
    anyhow::ensure!(
        response.finish_reason != requests::Finish::Canceled.as_str(),
        "canceled after {} tokens",
        response.token_ids.len()
    );
    if let Some(r) = radio.as_deref_mut() {
        r.answer_done();
    }
    if !a.json {
        println!();
    }
    anyhow::ensure!(response.accepted, "the swarm refused the request: {}", response.error);
    for k in kills.iter().filter(|k| k.at.is_none()) {
        eprintln!("[swarm] warning: --kill {} never struck: the request ended before {}", k.uav, k.point);
    }
    let stats: serde_json::Value = serde_json::from_str(&response.stats_json).unwrap_or_default();
    let failures = failure_report(&stats, kills);
    let last_epoch = stats["epochs"].as_array().and_then(|e| e.iter().filter_map(|e| e.as_u64()).max()).unwrap_or(0);
    let rejoined = match radio.as_deref() {
        Some(r) => await_rejoin(a, r, &failures, kills, last_epoch, &mut assignments).await,
        None => Vec::new(),
    };
    let stale_messages = stale.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let token_stream = match &verifier {
        None => serde_json::Value::Null,
        Some(auth) => {
            // The last chunk may still be on its way.
            let deadline = Instant::now() + Duration::from_secs(2);
            let done = || stream.lock().unwrap_or_else(|e| e.into_inner()).done.contains_key(&goal.request_id);
            while !done() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let s = stream.lock().unwrap_or_else(|e| e.into_inner());
            let verified: Vec<i32> =
                s.tokens.get(&goal.request_id).map(|t| t.values().copied().collect()).unwrap_or_default();
            let matches = verified == response.token_ids;
            let (accepted, dropped) = auth.tally();
            if !matches || !dropped.is_empty() {
                eprintln!("[swarm] WARNING: the signed token stream does not confirm the answer (verified {} of {} tokens, dropped: {dropped:?})", verified.len(), response.token_ids.len());
            }
            serde_json::json!({"verified_tokens": verified.len(), "matches_answer": matches, "accepted": accepted, "dropped": dropped.into_iter().collect::<BTreeMap<_, _>>()})
        }
    };
    let mut out = serde_json::json!({
        "prompt_ids": response.prompt_ids,
        "tokens": response.token_ids,
        "text": response.text,
        "tokens_per_s": response.tokens_per_s,
        "finish_reason": response.finish_reason,
        "error": response.error,
        "uavs": a.uavs,
        "failures": failures,
        // The primary scheduler killed: from the kill to the standby's first token at this client.
        "resumed_token_s": resumed_token_s,
        // With the keystore: the answer's tokens as the signed token stream carried them.
        "token_stream": token_stream,
        "stats": stats,
        "stale_messages": stale_messages,
    });
    if let Some(r) = radio.as_deref() {
        out["radio"] = r.report();
        out["rejoined"] = serde_json::json!(rejoined);
    }
    if let Some(path) = &a.report {
        std::fs::write(path, out.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{out}");
    } else {
        eprintln!(
            "[swarm] {} tokens, {:.1} tokens/s, finish: {}",
            response.token_ids.len(),
            response.tokens_per_s,
            response.finish_reason
        );
        for f in failures.as_array().into_iter().flatten() {
            eprintln!("[swarm] failure {f}");
        }
        for r in &rejoined {
            eprintln!("[swarm] rejoined {r}");
        }
        if let Some(r) = radio.as_deref() {
            let e = &r.report()["emulator"];
            eprintln!(
                "[radio] emulator during the answer: {:.2} s of CPU in {:.1} s ({:.1} % of one core)",
                e["answer_cpu_s"].as_f64().unwrap_or(f64::NAN),
                e["answer_wall_s"].as_f64().unwrap_or(f64::NAN),
                100.0 * e["answer_cpu_share"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    anyhow::ensure!(response.error.is_empty(), "generation failed: {}", response.error);
    Ok(())
}

/// With --radio, after the answer: waits until the scenario's movements are over and every UAV
/// declared failed that was not killed (it flew out of range) is in a plan again, made after
/// the request (the scheduler's plan for the next one). Returns, per UAV, the epoch and when (seconds on the
/// mission clock).
async fn await_rejoin(
    a: &SwarmArgs,
    radio: &Radio,
    failures: &serde_json::Value,
    kills: &[Kill],
    last_epoch: u64,
    assignments: &mut (impl futures::Stream<Item = Assignment> + Unpin),
) -> Vec<serde_json::Value> {
    let mut waiting: Vec<String> = failures
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["mode"] != "retirement")
        .filter_map(|f| f["uav"].as_str().map(str::to_string))
        .filter(|u| !kills.iter().any(|k| k.at.is_some() && k.uav == *u))
        .collect();
    waiting.dedup();
    let mut out = Vec::new();
    if waiting.is_empty() {
        return out;
    }
    eprintln!("[swarm] waiting for {} to rejoin", waiting.join(", "));
    let deadline = tokio::time::sleep(Duration::from_secs_f64(a.rejoin_timeout_s));
    tokio::pin!(deadline);
    while !waiting.is_empty() {
        tokio::select! {
            Some(asg) = assignments.next() => {
                // Only a plan made after the request, once the scenario has brought it back.
                if asg.epoch <= last_epoch || radio.mission_time_s() < radio.scenario.last_movement_s() {
                    continue;
                }
                waiting.retain(|u| {
                    let back = asg.ring.contains(u);
                    if back {
                        out.push(serde_json::json!({"uav": u, "epoch": asg.epoch, "mission_time_s": radio.mission_time_s(), "reason": asg.reason}));
                    }
                    !back
                });
            }
            _ = &mut deadline => {
                eprintln!("[swarm] warning: {} did not rejoin within {} s", waiting.join(", "), a.rejoin_timeout_s);
                break;
            }
        }
    }
    out
}

/// Per kill: detection, recovery and next-token times, from the kill (the scheduler reports
/// wall-clock instants of declaration, recovery and the next token).
fn failure_report(stats: &serde_json::Value, kills: &[Kill]) -> serde_json::Value {
    let now_unix = crate::ros::unix_now();
    let incidents = stats["incidents"].as_array().cloned().unwrap_or_default();
    let out: Vec<serde_json::Value> = incidents
        .iter()
        .map(|inc| {
            let uav = inc["uav"].as_str().unwrap_or_default();
            let kill = kills
                .iter()
                .find(|k| k.uav == uav)
                .and_then(|k| k.at.map(|t| (k, now_unix - t.elapsed().as_secs_f64())));
            let (detected, recovered, next) = (
                inc["detected_at"].as_f64().unwrap_or(0.0),
                inc["recovered_at"].as_f64().unwrap_or(0.0),
                inc["next_token_at"].as_f64().unwrap_or(0.0),
            );
            let origin = kill.map_or(detected, |(_, t)| t);
            serde_json::json!({
                "uav": uav,
                "reason": inc["reason"],
                "mode": inc["mode"],
                // A token kill's own count (the scheduler's lags it by the detection time).
                "token": match kill.map(|(k, _)| k.point) {
                    Some(KillPoint::AfterTokens(n)) => serde_json::json!(n),
                    _ => inc["token"].clone(),
                },
                "kill": kill.map(|(k, _)| k.point.to_string()),
                "detection_s": detected - origin,
                "recovery_s": recovered - detected,
                "next_token_s": if next > 0.0 { next - origin } else { f64::NAN },
                "resume_position": inc["resume_position"],
                "replay_from": inc["replay_from"],
                "why": inc["why"],
                "stages": inc["stages"],
            })
        })
        .collect();
    serde_json::Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> anyhow::Result<KillPoint> {
        Ok(parse_kills(&[spec.to_string()], 4, false)?.remove(0).point)
    }

    #[test]
    fn the_primary_scheduler_is_killed_only_with_a_standby() {
        let k = parse_kills(&["scheduler:8".to_string()], 4, true).unwrap();
        assert_eq!((k[0].uav.as_str(), k[0].point), ("scheduler", KillPoint::AfterTokens(8)));
        assert_eq!(kill_fqn("scheduler"), "/aerokv/scheduler");
        assert_eq!(kill_fqn("uav2"), "/uav2/shard_executor");
        let e = parse_kills(&["scheduler:8".to_string()], 4, false).err().unwrap();
        assert!(e.to_string().contains("needs --standby"), "{e}");
        assert!(parse_kills(&["scheduler:p8".to_string()], 4, true).is_err());
    }

    #[test]
    fn kills_strike_after_tokens_or_after_prompt_tokens() {
        assert_eq!(parse("uav2:10").unwrap(), KillPoint::AfterTokens(10));
        assert_eq!(parse("uav4:p256").unwrap(), KillPoint::AfterPromptTokens(256));
        for (bad, why) in [
            ("uav2", "expected UAV:TOKEN or UAV:pN"),
            ("uav2:x", "TOKEN must be a number"),
            ("uav2:px", "N in pN must be a number"),
            ("uav2:0", "at least 1"),
            ("uav2:p0", "at least 1"),
            ("uav5:3", "this swarm has uav1..uav4"),
            ("drone1:3", "UAVs are named uav1..uav4"),
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
