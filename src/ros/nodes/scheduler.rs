//! `scheduler`: one per swarm, the control plane and the gateway. Tokenizes, embeds, applies the
//! LM head and samples; plans layouts and protection with the planning core ([`Controller`]) from
//! live battery health and measured layer latency; publishes assignments (epochs); serves
//! `/aerokv/generate` (an action and a service over one queue: [`Desk`]) and streams
//! `/aerokv/tokens`; recovers from failures (failover, or an exact
//! restart when the state to fail over is not there) and retires UAVs before their batteries die.
use super::discovery::uavs_with_topic;
use super::generate_api::Desk;
use crate::admission::{self, Verdict};
use crate::control::{self, Airframe, Controller, Heard, Membership, ModelSize, Planned, Telemetry, TelemetryKind};
use crate::dataplane::{gateway_steps, step_at, SwarmPlan};
use crate::decision::{self, Decision, PlanInputs, SnapshotHeld};
use crate::detector::FailureReason;
use crate::epoch::{self as epochs, EpochClock, ExecutorState, Readiness};
use crate::linkrate::LinkRates;
use crate::requests::{Answer, Finish, Job, Spec};
use crate::ros::auth::{verified, NodeAuth, SignedPublisher, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::diagnostics::Diagnostics;
use crate::ros::fallback::{self, Input};
use crate::ros::{clock, convert, hop_ms, names, percentiles, stamp_secs, unix_now, NodeContext, Publishers};
use crate::standby::{self, KvRestart, Phase, Resume, TokenStep, Watch};
use aerokv_auth::{NodeId, Role};
use aerokv_codec::{ActivationCodec, Encoded, KvCodec};
use aerokv_engine::{models_root, Detokenizer, Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Sampler, Shard};
use futures::StreamExt;
use r2r::aerokv::msg::{
    Activation, Assignment, BatteryHealth, FailureEvent, Heartbeat, PromptProgress, RequestSpec, TokenChunk,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most steps the gateway has sent without their output (one per stage keeps a prompt's chunks
/// flowing through the stages as a pipeline). Well below the data plane's DDS history (8) and
/// r2r's subscription queue (10), which drop what overflows.
const MAX_STEPS_IN_FLIGHT: usize = 4;

/// Most requests `max_running` may allow: each holds KV on every stage, the steps in flight are
/// shared among them, and a failover sends one replay per request (the replay topics keep 8).
const MAX_RUNNING_LIMIT: usize = 8;

/// A (re)started scheduler plans once it heard `expected_uavs` executors' heartbeats, or after
/// this many member timeouts of listening (docs/design.md, "Epochs").
const EPOCH_SETTLE_TIMEOUTS: f64 = 2.0;

mod serving;
use serving::{BatchEnd, Run, Step};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Plan once this many UAVs are up.
    pub expected_uavs: usize,
    pub models_dir: String,
    pub variant: String,
    /// ONNX Runtime threads for the embedding and the head (the executors use their own).
    pub threads: usize,
    /// Longest answer a request may ask for.
    pub max_tokens_limit: u32,
    /// Longest prompt a request may bring. The prompt goes through the pipeline in chunks
    /// (`PREFILL_CHUNK_TOKENS`), each attending to everything before it, so its time grows with
    /// the square of its length (one process: 1.2 s at 887 tokens, 7.9 s at 3,650).
    pub max_prompt_tokens: u32,
    /// Request length (prompt + answer) the idle plan is made for.
    pub plan_tokens: u64,
    /// Per-UAV figures the messages do not carry.
    pub memory_budget_bytes: f64,
    pub flight_power_w: f64,
    pub inference_power_w: f64,
    pub tx_power_w: f64,
    pub link_rate_bps: f64,
    /// The links share one 802.11 channel: plan with what it carries (MAC overhead, retries at
    /// `frame_loss`, docs/failure-detection.md) instead of `link_rate_bps` itself.
    pub shared_channel: bool,
    /// Probability that one transmission attempt of a frame fails (with `shared_channel`).
    pub frame_loss: f64,
    /// Recovery deadline tau and the weight loading rate (docs/design.md §3).
    pub recovery_deadline_s: f64,
    pub weight_load_bps: f64,
    pub snapshot_periods: Vec<u32>,
    /// Lifetime beyond this many times the request counts as enough (0: pure max-min).
    pub lifetime_target_factor: f64,
    /// A UAV whose heartbeat is older than this is not counted as up.
    pub member_timeout_s: f64,
    /// A UAV declared failed that is heard again without a gap for this long is a member again
    /// (it rejoins through the next plan).
    pub rejoin_after_s: f64,
    /// How long executors may take to apply a plan.
    pub ready_timeout_s: f64,
    /// A pipeline step that takes longer (with no failure declared) fails the request.
    pub step_timeout_s: f64,
    /// How often an idle swarm re-plans from fresh battery health.
    pub replan_period_s: f64,
    /// Move the layers of a UAV whose battery will not last the request before it dies ...
    pub retirement: bool,
    /// ... once it has fewer than this many tokens left (it serves until then).
    pub retirement_horizon_tokens: u64,
    /// How hidden states travel, for the whole swarm: "raw" (exact), "f16", "int8"
    /// (docs/codecs.md). Sent to the executors with every assignment.
    pub activation_codec: String,
    /// How the executors' KV snapshots travel ("raw" or "zstd": their `kv_codec`, set from the
    /// same launch configuration): the cost model counts the snapshots' bytes with it.
    pub kv_codec: String,
    /// Keystore directory (docs/security.md); empty: authentication off.
    pub keystore: String,
    /// Requests that may wait for the swarm (a request that arrives while it is idle waits too,
    /// for an instant); more are refused (docs/generate-api.md).
    pub max_queue: usize,
    /// Finished answers kept for clients that resume them by request id.
    pub finished_kept: usize,
    /// Requests served at once, their steps interleaved (docs/generate-api.md).
    pub max_running: usize,
    /// Seconds per layer every plan assumes; 0: measured at start-up (a live replay pins the
    /// recorded figure, docs/bags.md).
    pub layer_latency_s: f64,
    /// "primary" (serves from the start) or "standby" (follows the primary, takes over when it
    /// dies: docs/failure-detection.md, "The standby scheduler").
    pub role: String,
    /// How often this scheduler beats on `/aerokv/scheduler/heartbeat`.
    pub scheduler_heartbeat_period_s: f64,
    /// A standby takes over once the primary has been silent this long.
    pub primary_timeout_s: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            expected_uavs: 4,
            models_dir: String::new(),
            variant: "q4".into(),
            threads: 1,
            max_tokens_limit: 1024,
            max_prompt_tokens: 4096,
            plan_tokens: 512,
            memory_budget_bytes: 2.0e9,
            flight_power_w: 80.0,
            inference_power_w: 35.0,
            tx_power_w: 2.5,
            link_rate_bps: 20e6,
            shared_channel: false,
            frame_loss: 0.0,
            recovery_deadline_s: 0.25,
            weight_load_bps: 8e9,
            snapshot_periods: vec![1, 2, 4, 8, 16, 32, 64],
            lifetime_target_factor: 0.0,
            member_timeout_s: 1.0,
            rejoin_after_s: 1.0,
            ready_timeout_s: 60.0,
            step_timeout_s: 30.0,
            replan_period_s: 1.0,
            retirement: true,
            retirement_horizon_tokens: 32,
            activation_codec: "raw".into(),
            kv_codec: "raw".into(),
            keystore: String::new(),
            max_queue: 16,
            finished_kept: 32,
            max_running: 4,
            layer_latency_s: 0.0,
            role: "primary".into(),
            scheduler_heartbeat_period_s: 0.1,
            primary_timeout_s: 0.5,
        }
    }
}

impl Params {
    fn codec(&self) -> anyhow::Result<ActivationCodec> {
        self.activation_codec.parse().map_err(|e| anyhow::anyhow!("parameter `activation_codec`: {e}"))
    }

    fn kv_codec(&self) -> anyhow::Result<KvCodec> {
        self.kv_codec.parse().map_err(|e| anyhow::anyhow!("parameter `kv_codec`: {e}"))
    }

    fn role(&self) -> anyhow::Result<standby::Role> {
        self.role.parse().map_err(|e| anyhow::anyhow!("parameter `role`: {e}"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.codec()?;
        self.kv_codec()?;
        self.role()?;
        anyhow::ensure!(
            self.primary_timeout_s > self.scheduler_heartbeat_period_s,
            "parameter `primary_timeout_s` ({}) must be above `scheduler_heartbeat_period_s` ({})",
            self.primary_timeout_s,
            self.scheduler_heartbeat_period_s
        );
        anyhow::ensure!(self.expected_uavs >= 1, "parameter `expected_uavs` must be at least 1");
        anyhow::ensure!(self.threads >= 1, "parameter `threads` must be at least 1");
        anyhow::ensure!(self.max_tokens_limit >= 1, "parameter `max_tokens_limit` must be at least 1");
        anyhow::ensure!(self.max_prompt_tokens >= 1, "parameter `max_prompt_tokens` must be at least 1");
        anyhow::ensure!(self.max_queue >= 1, "parameter `max_queue` must be at least 1");
        anyhow::ensure!(
            (1..=MAX_RUNNING_LIMIT).contains(&self.max_running),
            "parameter `max_running` must be in 1..={MAX_RUNNING_LIMIT}, not {}",
            self.max_running
        );
        anyhow::ensure!(
            self.layer_latency_s.is_finite() && (0.0..=10.0).contains(&self.layer_latency_s),
            "parameter `layer_latency_s` must be in [0, 10] (0: measure), not {}",
            self.layer_latency_s
        );
        for (name, v) in [
            ("memory_budget_bytes", self.memory_budget_bytes),
            ("link_rate_bps", self.link_rate_bps),
            ("recovery_deadline_s", self.recovery_deadline_s),
            ("weight_load_bps", self.weight_load_bps),
            ("member_timeout_s", self.member_timeout_s),
            ("rejoin_after_s", self.rejoin_after_s),
            ("ready_timeout_s", self.ready_timeout_s),
            ("step_timeout_s", self.step_timeout_s),
            ("replan_period_s", self.replan_period_s),
            ("scheduler_heartbeat_period_s", self.scheduler_heartbeat_period_s),
            ("primary_timeout_s", self.primary_timeout_s),
        ] {
            anyhow::ensure!(v.is_finite() && v > 0.0, "parameter `{name}` must be positive, not {v}");
        }
        anyhow::ensure!(
            !self.snapshot_periods.is_empty() && self.snapshot_periods.iter().all(|&t| t >= 1),
            "parameter `snapshot_periods` must list periods >= 1"
        );
        anyhow::ensure!(self.lifetime_target_factor >= 0.0, "parameter `lifetime_target_factor` must be >= 0");
        anyhow::ensure!(
            (0.0..1.0).contains(&self.frame_loss),
            "parameter `frame_loss` must be in [0, 1), not {}",
            self.frame_loss
        );
        Ok(())
    }
}

/// Telemetry gathered by the subscription tasks.
#[derive(Default)]
struct Live {
    beats: BTreeMap<String, (Instant, Heartbeat)>,
    /// Unbroken runs of heartbeats, for membership.
    heard: BTreeMap<String, Heard>,
    battery: BTreeMap<String, BatteryHealth>,
    /// Telemetry refused by the checks in `control` (wrong UAV, non-finite or absurd figures).
    rejects: control::TelemetryRejects,
    /// Epochs issued and reported: a (re)started scheduler continues above the swarm's.
    clock: Option<EpochClock>,
}

/// Why a generation could not go on.
#[derive(Debug, thiserror::Error)]
enum Interrupt {
    #[error("{0} failed")]
    Failed(String),
    #[error("{0}")]
    Fatal(String),
    #[error("{uav} runs epoch {epoch}, above this plan's")]
    Superseded { uav: String, epoch: u64 },
}

/// One failure (or retirement) during a request, for `stats_json` and `aerokv swarm --json`.
#[derive(Debug, Clone, serde::Serialize)]
struct Incident {
    uav: String,
    reason: String,
    /// Generated tokens when it was handled.
    token: usize,
    /// How it was handled: "failover" (replica + snapshot + replay), "restart" (exact replay of
    /// the whole context), "retirement".
    mode: String,
    resume_position: usize,
    /// The failed tail's inputs were replayed from here (its successor's snapshot held the rest).
    replay_from: usize,
    epoch: u64,
    /// Wall-clock seconds (UNIX): declared, swarm ready again, next token out.
    detected_at: f64,
    recovered_at: f64,
    next_token_at: f64,
    planned_recovery_s: f64,
    /// Why a restart replaced the failover (empty for a failover).
    why: String,
    /// Per stage of the new plan, seconds after the declaration: `loaded_s` when its heartbeat
    /// first carried the new epoch (layers loaded), `ready_s` when it said ready (replay done).
    stages: BTreeMap<String, StageReady>,
}

/// When a stage was seen to apply a plan and to be ready with it (UNIX seconds while waiting,
/// then seconds after the failure's declaration in an [`Incident`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct StageReady {
    loaded_s: f64,
    ready_s: f64,
}

/// This scheduler's role and phase, shared with its heartbeat and subscription tasks.
struct Duty {
    role: standby::Role,
    serving: AtomicBool,
    origin: Instant,
    /// The primary as a standby hears it (unused by a primary).
    watch: Mutex<Watch>,
}

impl Duty {
    fn new(role: standby::Role, primary_timeout_s: f64) -> Self {
        Duty {
            role,
            serving: AtomicBool::new(Phase::initial(role) == Phase::Serving),
            origin: clock::now(),
            watch: Mutex::new(Watch::new(primary_timeout_s)),
        }
    }

    fn phase(&self) -> Phase {
        if self.serving.load(Ordering::Acquire) {
            Phase::Serving
        } else {
            Phase::Following
        }
    }

    fn secs(&self) -> f64 {
        clock::now().saturating_duration_since(self.origin).as_secs_f64()
    }

    fn watch(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn executor_heard(&self) {
        if self.role == standby::Role::Standby {
            let now = self.secs();
            self.watch().executor_heard(now);
        }
    }

    /// A standby's takeover, once its rule says so (see [`Watch::check`]).
    fn check(&self) -> Option<standby::Takeover> {
        let now = self.secs();
        let t = self.watch().check(now)?;
        self.serving.store(true, Ordering::Release);
        Some(t)
    }
}

/// What a standby hears of the primary's work.
enum Followed {
    Request(RequestSpec),
    Token(TokenChunk),
    Plan(u64),
    /// What one of its plans was decided from.
    Inputs(Box<r2r::aerokv::msg::PlanInputs>),
}

/// The request a standby resumes after its takeover: followed this far, taken over at `at`
/// (UNIX seconds) after the primary's silence of `silent_s`.
struct Resumed {
    job: Job,
    have: usize,
    at: f64,
    silent_s: f64,
}

struct Scheduler {
    ctx: NodeContext,
    duty: Arc<Duty>,
    request_pub: SignedPublisher<RequestSpec>,
    limits: crate::requests::Limits,
    /// A standby's running request to resume once it took over, and the primary's other running
    /// requests (fed again beside it).
    resumed: Option<Resumed>,
    resumed_more: Vec<Resumed>,
    /// Steps sent so far (the interleaving's clock).
    steps_sent: u64,
    /// What the primary's latest plan was decided from (a standby's).
    followed_inputs: Option<PlanInputs>,
    p: Params,
    codec: ActivationCodec,
    kv_codec: KvCodec,
    gateway: Gateway,
    controller: Controller,
    own_layer_latency_s: f64,
    max_context: usize,
    live: Arc<Mutex<Live>>,
    /// What every decision depends on besides telemetry (published with it: `PlanInputs`).
    plan_params: decision::Parameters,
    inputs_pub: SignedPublisher<r2r::aerokv::msg::PlanInputs>,
    watched: BTreeSet<String>,
    /// Who may be planned: UAVs declared failed or retired are kept out until they are back.
    membership: Membership,
    assign_pub: SignedPublisher<Assignment>,
    auth: Arc<NodeAuth>,
    token_pub: SignedPublisher<TokenChunk>,
    /// Each request's last chunk again, for the executors (`names::FINISHED`).
    finished_pub: SignedPublisher<TokenChunk>,
    progress_pub: SignedPublisher<PromptProgress>,
    /// Failure detection while the watchdog is silent.
    fallback: fallback::Handle,
    /// Stage inputs, and replays of the embeddings a stage around the gateway was fed; by topic.
    activation_pubs: Publishers<Activation>,
    /// The last stage's outputs, read straight from the subscription (not through a draining
    /// task like the other topics): at most `MAX_STEPS_IN_FLIGHT` steps are in flight, so r2r's
    /// queue of 10 never fills, and every token saves a thread hand-off.
    outputs: futures::stream::BoxStream<'static, Activation>,
    failures: mpsc::UnboundedReceiver<FailureEvent>,
    /// The requests: queued, running (their goals' feedback), finished.
    desk: Arc<Desk>,
    /// Requests run to an end (any finish reason), for /diagnostics.
    requests_served: u64,
    current: Option<Planned>,
    epoch: u64,
    stale_dropped: u64,
    diagnostics: Diagnostics,
    /// Latency of the last hop (last stage -> gateway) of every step, ms.
    hops: Vec<f64>,
    /// Per UAV, the measured link rate the planner uses (the executors' heartbeats).
    links: Mutex<LinkRates>,
    /// Elements of one token's hidden state.
    hidden: usize,
}

pub async fn run(ctx: NodeContext, p: Params) -> anyhow::Result<()> {
    p.validate()?;
    let root = if p.models_dir.is_empty() { models_root() } else { p.models_dir.clone().into() };
    let runtime = Runtime::init(RuntimeConfig::with_threads(p.threads))?;
    let manifest = Manifest::load_variant(&root, &p.variant)?;
    let gateway = Gateway::load(&runtime, &manifest)?;
    let own_layer_latency_s =
        if p.layer_latency_s > 0.0 { p.layer_latency_s } else { measure_layer_latency(&runtime, &manifest)? };
    let arch = &manifest.architecture;
    let model = ModelSize {
        num_layers: arch.layers as u32,
        weight_bytes_per_layer: manifest.interval_memory(0, arch.layers)?.weight_bytes as f64 / arch.layers as f64,
        kv_bytes_per_token_layer: arch.kv_bytes_per_token_per_layer() as f64,
    };
    let plan_params = decision::Parameters {
        recovery_deadline_s: p.recovery_deadline_s,
        weight_load_bps: p.weight_load_bps,
        snapshot_periods: p.snapshot_periods.clone(),
        lifetime_target_factor: p.lifetime_target_factor,
        shared_channel: p.shared_channel,
        frame_loss: p.frame_loss,
        airframe: Airframe {
            flight_power_w: p.flight_power_w,
            compute_power_w: p.inference_power_w,
            tx_power_w: p.tx_power_w,
            link_bps: p.link_rate_bps,
            memory_bytes: p.memory_budget_bytes,
        },
        model,
        member_timeout_s: p.member_timeout_s,
    };
    tracing::info!(variant = %p.variant, layers = arch.layers, layer_ms = own_layer_latency_s * 1e3, "gateway loaded");
    let links = LinkRates::new(p.link_rate_bps, plan_params.config().channel.unwrap_or_default());

    let role = p.role()?;
    let auth = match role {
        standby::Role::Primary => NodeAuth::load(&p.keystore, Role::Scheduler, None)?,
        standby::Role::Standby => NodeAuth::load_as(&p.keystore, NodeId::standby_scheduler())?,
    };
    let duty = Arc::new(Duty::new(role, p.primary_timeout_s));
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    let outputs = {
        let auth = auth.clone();
        let stream = ctx.lock().subscribe::<Activation>(names::GATEWAY_INPUT, names::data_plane())?;
        stream.filter(move |m| futures::future::ready(auth.accept_activation(names::GATEWAY_INPUT, m))).boxed()
    };
    // The watchdog's declarations, and the scheduler's own while the watchdog is silent.
    let (failures_tx, failures) = mpsc::unbounded_channel();
    let fallback = fallback::spawn(&ctx, auth.clone(), failures_tx.clone())?;
    let mut declared =
        verified(ctx.subscribe(names::FAILURES, names::events())?, auth.clone(), NodeAuth::accept_failure);
    tokio::spawn(async move {
        while let Some(ev) = declared.recv().await {
            if failures_tx.send(ev).is_err() {
                break;
            }
        }
    });
    let limits = crate::requests::Limits {
        max_tokens: p.max_tokens_limit,
        max_prompt_tokens: p.max_prompt_tokens,
        max_context: manifest.architecture.max_context,
        max_queue: p.max_queue,
        finished_kept: p.finished_kept,
        max_running: p.max_running,
    };
    let desk = Desk::new(gateway.encoder(), limits);
    if role == standby::Role::Primary {
        desk.serve(&ctx)?;
    }
    let (step_down, mut stepped_down) = mpsc::unbounded_channel();
    beat_and_hear_schedulers(&ctx, auth.clone(), duty.clone(), p.scheduler_heartbeat_period_s, step_down)?;
    let mut followed = match role {
        standby::Role::Standby => follow_primary(&ctx, auth.clone(), duty.clone())?,
        standby::Role::Primary => mpsc::unbounded_channel().1,
    };
    let (member_timeout, rejoin_after) =
        (Duration::from_secs_f64(p.member_timeout_s), Duration::from_secs_f64(p.rejoin_after_s));
    let mut s = Scheduler {
        duty: duty.clone(),
        request_pub: SignedPublisher::new(
            ctx.publisher(names::REQUESTS, names::events())?,
            auth.clone(),
            NodeAuth::sign_request,
        ),
        limits,
        resumed: None,
        resumed_more: Vec::new(),
        steps_sent: 0,
        followed_inputs: None,
        fallback,
        assign_pub: SignedPublisher::new(
            ctx.publisher(names::ASSIGNMENT, names::latched())?,
            auth.clone(),
            NodeAuth::sign_assignment,
        ),
        auth: auth.clone(),
        finished_pub: SignedPublisher::new(
            ctx.publisher(names::FINISHED, names::events())?,
            auth.clone(),
            NodeAuth::sign_finished,
        ),
        token_pub: SignedPublisher::new(
            ctx.publisher(names::TOKENS, names::events())?,
            auth.clone(),
            NodeAuth::sign_token,
        ),
        progress_pub: SignedPublisher::new(
            ctx.publisher(names::PROGRESS, names::events())?,
            auth.clone(),
            NodeAuth::sign_progress,
        ),
        ctx: ctx.clone(),
        codec: p.codec()?,
        kv_codec: p.kv_codec()?,
        p,
        gateway,
        controller: plan_params.controller(&[]),
        plan_params,
        inputs_pub: SignedPublisher::new(
            ctx.publisher(names::PLAN_INPUTS, names::latched())?,
            auth.clone(),
            NodeAuth::sign_plan_inputs,
        ),
        own_layer_latency_s,
        max_context: manifest.architecture.max_context,
        live: Arc::default(),
        watched: BTreeSet::new(),
        membership: Membership::new(member_timeout, rejoin_after),
        activation_pubs: Publishers::default(),
        outputs,
        failures,
        desk: desk.clone(),
        requests_served: 0,
        current: None,
        epoch: 0,
        stale_dropped: 0,
        diagnostics: Diagnostics::new(&ctx)?,
        hops: Vec::new(),
        links: Mutex::new(links),
        hidden: arch.hidden,
    };
    // Listen to the executors before the first plan (docs/design.md, "Epochs").
    s.lock().clock = Some(EpochClock::new(
        clock::now(),
        Duration::from_secs_f64(EPOCH_SETTLE_TIMEOUTS * s.p.member_timeout_s),
        s.p.expected_uavs,
    ));
    let mut live = crate::ros::params::serve(&ctx, s.p.clone(), super::param_docs::SCHEDULER, |p| {
        p.validate().map_err(|e| e.to_string())
    })?;
    let mut tick = clock::interval(Duration::from_secs_f64(s.p.replan_period_s.min(0.25)));
    let mut last_replan = clock::now();
    let mut takeover_check = clock::interval(Duration::from_millis(50));
    if role == standby::Role::Standby {
        tracing::info!(timeout_s = s.p.primary_timeout_s, "standby: following the primary");
    }
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    loop {
        let serving = duty.phase() == Phase::Serving;
        tokio::select! {
            _ = &mut shutdown => { desk.shutdown(); return Ok(()); }
            Some(()) = stepped_down.recv() => {
                desk.shutdown();
                anyhow::bail!("the standby scheduler took over (this one was taken for dead): stopping so that one scheduler plans");
            }
            (job, resumed) = next_job(&mut s.resumed, &desk), if serving => {
                if let BatchEnd::Shutdown = s.serve_batch(job, resumed, &mut shutdown).await {
                    desk.shutdown();
                    return Ok(());
                }
            }
            Some(ev) = s.failures.recv() => { s.note_failure(&ev); }
            Some(f) = followed.recv(), if !serving => s.follow(f),
            _ = takeover_check.tick(), if !serving => {
                if let Some(t) = duty.check() {
                    s.take_over(t)?;
                }
            }
            Ok(()) = live.changed() => { s.p = live.borrow_and_update().clone(); }
            Some(msg) = s.outputs.next() => { s.stale_dropped += 1; tracing::debug!(epoch = msg.epoch, "activation outside a request dropped"); }
            _ = tick.tick() => {
                s.discover()?;
                s.publish_diagnostics(None);
                if serving && clock::since(last_replan).as_secs_f64() >= s.p.replan_period_s {
                    last_replan = clock::now();
                    if let Err(e) = s.idle_replan() {
                        tracing::warn!("idle planning: {e:#}");
                    }
                }
            }
        }
    }
}

/// Beats on `/aerokv/scheduler/heartbeat` (its role in `uav_id`, its phase in `state`) and hears
/// the other scheduler's beats: a standby learns that the primary lives; a serving primary that
/// hears a serving standby steps down (`step_down`).
fn beat_and_hear_schedulers(
    ctx: &NodeContext,
    auth: Arc<NodeAuth>,
    duty: Arc<Duty>,
    period_s: f64,
    step_down: mpsc::UnboundedSender<()>,
) -> anyhow::Result<()> {
    let publisher = ctx.publisher::<Heartbeat>(names::SCHEDULER_HEARTBEAT, names::heartbeat_qos())?;
    let mut beats = ctx.subscribe::<Heartbeat>(names::SCHEDULER_HEARTBEAT, names::telemetry())?;
    let (a, d, shutdown) = (auth.clone(), duty.clone(), ctx.shutdown());
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut tick = clock::interval(Duration::from_secs_f64(period_s));
        let mut sequence = 0u64;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    sequence += 1;
                    let mut hb = Heartbeat {
                        uav_id: d.role.as_str().into(),
                        state: d.phase().as_str().into(),
                        sequence,
                        stamp: crate::ros::now_stamp(),
                        auth_counters: a.counters(),
                        ..Default::default()
                    };
                    a.sign_scheduler_heartbeat(&mut hb);
                    if let Err(e) = publisher.publish(&hb) {
                        tracing::warn!("publish the scheduler heartbeat: {e}");
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(hb) = beats.recv().await {
            if !auth.accept_scheduler_heartbeat(&hb) {
                continue;
            }
            let (Ok(role), Some(phase)) = (hb.uav_id.parse::<standby::Role>(), Phase::parse(&hb.state)) else {
                continue;
            };
            match standby::peer(duty.role, duty.phase(), role, phase) {
                standby::Peer::PrimaryAlive => {
                    let now = duty.secs();
                    duty.watch().primary_heartbeat(now);
                }
                standby::Peer::StepDown => {
                    tracing::error!("the standby scheduler serves: this one steps down");
                    let _ = step_down.send(());
                }
                standby::Peer::Ignore => {}
            }
        }
    });
    Ok(())
}

/// A standby's subscriptions to the primary's work: the requests it starts, the tokens it streams,
/// the epochs of its plans (authenticated: only a scheduler may sign them).
fn follow_primary(
    ctx: &NodeContext,
    auth: Arc<NodeAuth>,
    duty: Arc<Duty>,
) -> anyhow::Result<mpsc::UnboundedReceiver<Followed>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let requests = verified(ctx.subscribe(names::REQUESTS, names::events())?, auth.clone(), NodeAuth::accept_request);
    let tokens = verified(ctx.subscribe(names::TOKENS, names::events())?, auth.clone(), NodeAuth::accept_token);
    let plans =
        verified(ctx.subscribe(names::ASSIGNMENT, names::latched_reader())?, auth.clone(), NodeAuth::accept_assignment);
    let inputs =
        verified(ctx.subscribe(names::PLAN_INPUTS, names::latched_reader())?, auth, NodeAuth::accept_plan_inputs);
    fn forward<T: Send + 'static>(
        mut rx: mpsc::UnboundedReceiver<T>,
        tx: mpsc::UnboundedSender<Followed>,
        duty: Arc<Duty>,
        wrap: fn(T) -> Followed,
    ) {
        tokio::spawn(async move {
            // Once serving, what is on these topics is this scheduler's own.
            while let Some(m) = rx.recv().await {
                if duty.phase() == Phase::Serving || tx.send(wrap(m)).is_err() {
                    break;
                }
            }
        });
    }
    forward(requests, tx.clone(), duty.clone(), Followed::Request);
    forward(tokens, tx.clone(), duty.clone(), Followed::Token);
    forward(plans, tx.clone(), duty.clone(), |a: Assignment| Followed::Plan(a.epoch));
    forward(inputs, tx, duty, |i: r2r::aerokv::msg::PlanInputs| Followed::Inputs(Box::new(i)));
    Ok(rx)
}

/// The next request to serve: the one a standby resumes after its takeover, then the queue.
async fn next_job(resumed: &mut Option<Resumed>, desk: &Desk) -> (Job, Option<Resumed>) {
    if let Some(r) = resumed.take() {
        return (r.job.clone(), Some(r));
    }
    (desk.next().await, None)
}

/// Decode latency of one layer on this machine (the executors report theirs; this is the
/// figure used until they do).
fn measure_layer_latency(runtime: &Runtime, manifest: &Manifest) -> anyhow::Result<f64> {
    let mut shard = Shard::load(runtime, manifest, 0..1)?;
    let width = manifest.architecture.hidden;
    let x = Hidden::new(vec![0.01; 8 * width], width)?;
    shard.forward(&x, 0)?;
    let one = Hidden::new(vec![0.01; width], width)?;
    let started = Instant::now();
    for i in 0..16 {
        shard.forward(&one, 8 + i)?;
    }
    Ok(started.elapsed().as_secs_f64() / 16.0)
}

impl Scheduler {
    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has this scheduler listened long enough to know the swarm's epoch?
    fn settled(&self) -> bool {
        self.lock().clock.as_ref().is_none_or(|c| c.settled(clock::now()))
    }

    /// Waits (bounded) until [`Self::settled`].
    async fn await_settled(&mut self) {
        // Ends by the clock's bound at the latest.
        while !self.settled() {
            clock::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The epoch the next plan will get (above everything issued or heard).
    fn next_epoch(&self) -> u64 {
        self.lock().clock.as_ref().map_or(self.epoch + 1, EpochClock::peek)
    }

    /// The last heartbeat of every stage of `plan`.
    fn reports(&self, plan: &SwarmPlan) -> Vec<(String, Option<epochs::Report>)> {
        let live = self.lock();
        plan.stages
            .iter()
            .map(|s| {
                let r = live.beats.get(&s.uav).map(|(at, hb)| epochs::Report {
                    epoch: hb.epoch,
                    state: ExecutorState::parse(&hb.state),
                    request_id: hb.request_id,
                    kv_tokens: hb.kv_tokens,
                    age: at.elapsed(),
                });
                (s.uav.clone(), r)
            })
            .collect()
    }

    /// Subscribes to the heartbeats and battery health of UAVs that appeared.
    fn discover(&mut self) -> anyhow::Result<()> {
        for uav in uavs_with_topic(&self.ctx, "heartbeat") {
            if !self.watched.insert(uav.clone()) || !self.auth.admits_uav(&uav) {
                continue;
            }
            tracing::info!(%uav, "UAV discovered");
            // Its input publisher now, not when a failover first makes it the first stage.
            self.activation_pub(&names::stage_input(&uav))?;
            let mut beats = self.ctx.subscribe::<Heartbeat>(&names::heartbeat(&uav), names::telemetry())?;
            let mut battery = self.ctx.subscribe::<BatteryHealth>(&names::battery(&uav), names::telemetry())?;
            let (live, u, layers) = (self.live.clone(), uav.clone(), self.controller.model.num_layers);
            let member_timeout = self.membership.member_timeout;
            let (auth, topic, fallback) = (self.auth.clone(), names::heartbeat(&uav), self.fallback.tx.clone());
            let (desk, duty) = (self.desk.clone(), self.duty.clone());
            tokio::spawn(async move {
                while let Some(hb) = beats.recv().await {
                    let now = clock::now();
                    if !auth.accept_heartbeat(&topic, &hb) {
                        continue;
                    }
                    duty.executor_heard();
                    let checked = control::validate_heartbeat(&convert::heartbeat_fields(&hb), &u, layers);
                    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                    if !live.rejects.passed(&u, TelemetryKind::Heartbeat, checked) {
                        continue;
                    }
                    let mut heard = Heard::next(live.heard.get(&u).copied(), hb.sequence, now, member_timeout);
                    heard.battery =
                        live.battery.get(&u).is_some_and(|b| !control::is_depleted(&convert::battery_health_fields(b)));
                    live.heard.insert(u.clone(), heard);
                    if let Some(c) = live.clock.as_mut() {
                        if c.observe(&u, hb.epoch) {
                            tracing::info!(uav = %u, epoch = hb.epoch, "an executor runs a later epoch than this scheduler issued");
                        }
                    }
                    // New ids above any request an executor still holds (a restarted scheduler).
                    desk.ids_above(hb.request_id);
                    let _ = fallback.send(Input::Heartbeat(u.clone(), hb.sequence, now));
                    live.beats.insert(u.clone(), (now, hb));
                }
            });
            let (live, u) = (self.live.clone(), uav.clone());
            let (auth, topic, fallback) = (self.auth.clone(), names::battery(&uav), self.fallback.tx.clone());
            tokio::spawn(async move {
                while let Some(b) = battery.recv().await {
                    if !auth.accept_battery(&topic, &b) {
                        continue;
                    }
                    let checked = control::validate_battery_health(&convert::battery_health_fields(&b), &u);
                    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                    if live.rejects.passed(&u, TelemetryKind::BatteryHealth, checked) {
                        let _ = fallback.send(Input::Battery(u.clone(), b.energy_j, clock::now()));
                        live.battery.insert(u.clone(), b);
                    }
                }
            });
        }
        Ok(())
    }

    /// UAVs with a recent heartbeat and battery health (not empty), not kept out, in ring order.
    fn members(&mut self) -> Vec<String> {
        let heard = self.lock().heard.clone();
        self.membership.members(&heard, clock::now())
    }

    fn telemetry(&self) -> BTreeMap<String, Telemetry> {
        self.uav_inputs().into_iter().map(|(uav, i)| (uav, i.telemetry)).collect()
    }

    /// Every UAV's figures as held now, and the messages they came from.
    fn uav_inputs(&self) -> BTreeMap<String, decision::UavInputs> {
        let live = self.lock();
        // Measured link rates plan only over a radio (shared memory is no link to plan with).
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (uav, (_, hb)) in live.beats.iter().filter(|_| self.p.shared_channel) {
            links.observe(uav, hb.link_phy_bps, hb.link_goodput_bps);
        }
        live.battery
            .iter()
            .map(|(uav, b)| {
                // One figure measured at start-up for every UAV of this (homogeneous) swarm: the
                // executors' per-token figures are too noisy to plan on without churning layouts.
                let telemetry = Telemetry {
                    energy_j: b.energy_j,
                    capacity_j: b.capacity_j,
                    layer_latency_s: self.own_layer_latency_s,
                    link_bps: links.measured(uav),
                };
                let heartbeat = live.beats.get(uav).map(|(_, hb)| decision::HeartbeatSeen {
                    sequence: hb.sequence,
                    stamp_ns: crate::ros::record::stamp_ns(&hb.stamp),
                });
                (
                    uav.clone(),
                    decision::UavInputs {
                        telemetry,
                        battery_stamp_ns: crate::ros::record::stamp_ns(&b.stamp),
                        heartbeat,
                    },
                )
            })
            .collect()
    }

    /// What a decision of `epoch` is made from, now.
    fn inputs(
        &mut self,
        epoch: u64,
        request_id: u64,
        decision: Decision,
        total_tokens: u64,
        resume: usize,
    ) -> PlanInputs {
        // Numbered in ring order as they are first planned; recorded with the inputs.
        if let Decision::Initial { members } = &decision {
            members.iter().for_each(|m| _ = self.controller.id(m));
        }
        PlanInputs {
            epoch,
            request_id,
            decision,
            total_tokens,
            resume_position: resume,
            planning_ids: self.controller.planning_ids(),
            uavs: self.uav_inputs(),
            params: self.plan_params.clone(),
            stamp_ns: crate::ros::record::stamp_ns(&crate::ros::now_stamp()),
        }
    }

    /// Decides from `inputs` (the same call `aerokv bag audit` makes).
    fn decide(&mut self, inputs: &PlanInputs) -> Result<Planned, decision::DecideError> {
        decision::decide(&mut self.controller, inputs, self.current.as_ref())
    }

    /// Takes a failure event; false when this scheduler heard from the UAV so recently that the
    /// declaration cannot be right (the watchdog's view was stale: a stalled process, not a dead
    /// drone). A dead executor has been silent for the whole timeout when it is declared. A
    /// declaration made in an older epoch is dropped (and counted): it may be about a UAV that
    /// has since rejoined; the watchdog declares a UAV that stays silent again in the new epoch.
    fn note_failure(&mut self, ev: &FailureEvent) -> bool {
        if ev.epoch < self.epoch {
            self.stale_dropped += 1;
            tracing::info!(uav = %ev.uav_id, epoch = ev.epoch, current = self.epoch, "failure declaration of an older epoch dropped");
            return false;
        }
        let (age, sent) = self.lock().beats.get(&ev.uav_id).map_or((f64::INFINITY, f64::NEG_INFINITY), |(t, hb)| {
            (clock::since(*t).as_secs_f64(), stamp_secs(&hb.stamp))
        });
        let reason = match ev.reason.parse::<FailureReason>() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(uav = %ev.uav_id, "failure event dropped: {e}");
                return false;
            }
        };
        if reason == FailureReason::HeartbeatTimeout && ev.silence_s.is_finite() {
            // The watchdog last heard from it at `declared - silence`; a heartbeat sent after that
            // (same machine clock) or received just now means the watchdog's view was stale.
            let declared = stamp_secs(&ev.stamp);
            if age < ev.silence_s / 2.0 || sent > declared - ev.silence_s / 2.0 {
                tracing::warn!(uav = %ev.uav_id, silence_s = ev.silence_s, heard_s_ago = age, sent_after_declaration_s = sent - declared, "failure declaration ignored: the UAV is alive");
                return false;
            }
        }
        self.membership.declare_failed(&ev.uav_id, clock::now());
        tracing::warn!(uav = %ev.uav_id, reason = %ev.reason, "failure noted");
        true
    }

    /// Publishes a plan under a new epoch, above every epoch issued or heard, after the inputs it
    /// was decided from (a recorder has them before the assignment).
    fn publish(&mut self, mut planned: Planned, inputs: &PlanInputs, reason: &str) -> anyhow::Result<()> {
        let epoch = match self.lock().clock.as_mut() {
            Some(c) => c.issue()?,
            None => self.epoch + 1,
        };
        planned.plan.epoch = epoch;
        self.epoch = epoch;
        // Decided under `next_epoch()`; a heartbeat heard since may have moved the epoch up.
        let inputs = PlanInputs { epoch, ..inputs.clone() };
        self.inputs_pub.publish(&crate::ros::record::plan_inputs_msg(&inputs))?;
        let msg = convert::assignment(&planned.plan, &self.p.variant, reason, self.codec);
        let layout: Vec<String> =
            planned.plan.stages.iter().map(|s| format!("{}[{}+{} K{} T{}]", s.uav, s.start, s.len, s.k, s.t)).collect();
        tracing::info!(epoch = planned.plan.epoch, reason, resume = planned.plan.resume_position, layout = %layout.join(" "), min_expected_tokens = planned.protection.min_expected_tokens, "assignment published");
        self.assign_pub.publish(&msg)?;
        self.fallback.send(Input::Assignment(epoch, msg.ring.clone(), clock::now()));
        // Ready before a failure needs it: matching a new publisher costs the recovery time.
        let plan = &planned.plan;
        for s in plan.stages.iter().filter(|s| plan.tail_needs_gateway_replay(s)) {
            self.activation_pub(&names::replay(&s.uav))?;
        }
        self.current = Some(planned);
        Ok(())
    }

    /// When idle: the first plan once enough UAVs are up, then a new one whenever membership or
    /// battery health changes the layout.
    fn idle_replan(&mut self) -> anyhow::Result<()> {
        if self.resumed.is_some() {
            // A standby that just took over: its plan for the running request comes next, on the
            // executors' KV caches, which an idle plan would drop.
            return Ok(());
        }
        let members = self.members();
        if members.len() < self.p.expected_uavs && self.current.is_none() {
            return Ok(());
        }
        if members.is_empty() || !self.settled() {
            return Ok(());
        }
        let inputs = self.inputs(self.next_epoch(), 0, Decision::Initial { members }, self.p.plan_tokens, 0);
        let candidate = self.decide(&inputs)?;
        let behind = self.lock().clock.as_ref().and_then(EpochClock::behind);
        let changed = behind.is_some() || self.current.as_ref().is_none_or(|c| c.plan.stages != candidate.plan.stages);
        if changed {
            let reason = if self.current.is_none() { "initial" } else { "battery or membership change" };
            self.publish(candidate, &inputs, reason)?;
        }
        Ok(())
    }

    /// The cost model's tokens/s for the current plan with the activation codec's bytes, the
    /// gateway's mean time per step in `steps` and each stage's compute per layer as its executor
    /// measures it (`compute_ms`: the mean of its heartbeats' figure over this answer's steps;
    /// the latest heartbeat's, or the start-up figure, where none was seen): with the link
    /// rates the planner uses (measured where measured) and with the configured rate. Planning
    /// keeps the start-up figure (see [`Self::uav_inputs`]); a prediction of this run's speed
    /// wants what this run's hosts did.
    fn prediction(&mut self, steps: &[Step], compute_ms: &crate::linkrate::RunMeans) -> serde_json::Value {
        let Some(current) = self.current.clone() else { return serde_json::Value::Null };
        let gateway_s = steps.iter().map(|s| s.gateway_ms).sum::<f64>() / steps.len().max(1) as f64 / 1e3;
        let traffic = crate::linkrate::traffic(self.codec, self.kv_codec, self.hidden, gateway_s);
        let mut telemetry = self.telemetry();
        let (phy, source): (BTreeMap<String, f64>, BTreeMap<String, Option<crate::linkrate::LinkSource>>) = {
            let live = self.lock();
            let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            current
                .plan
                .stages
                .iter()
                .map(|s| {
                    let phy = live.beats.get(&s.uav).map_or(0.0, |(_, hb)| hb.link_phy_bps);
                    ((s.uav.clone(), phy), (s.uav.clone(), links.source(&s.uav)))
                })
                .unzip()
        };
        // The answer's mean where its steps saw a figure, else the latest heartbeat's.
        let measured_ms: BTreeMap<String, f64> = {
            let live = self.lock();
            live.beats
                .iter()
                .filter_map(|(u, (_, hb))| {
                    compute_ms
                        .mean(u)
                        .or((hb.compute_ms_per_layer > 0.0).then_some(hb.compute_ms_per_layer))
                        .map(|ms| (u.clone(), ms))
                })
                .collect()
        };
        for (uav, t) in telemetry.iter_mut() {
            if let Some(ms) = measured_ms.get(uav) {
                t.layer_latency_s = ms / 1e3;
            }
        }
        let configured: BTreeMap<String, Telemetry> =
            telemetry.iter().map(|(u, t)| (u.clone(), Telemetry { link_bps: None, ..*t })).collect();
        match (
            self.controller.predict(&current, &telemetry, &traffic),
            self.controller.predict(&current, &configured, &traffic),
        ) {
            (Ok(p), Ok(c)) => serde_json::json!({
                "model": p,
                "configured_rate_tokens_per_s": c.tokens_per_s,
                "activation_bytes_per_token": traffic.activation_bytes(),
                "gateway_s": traffic.gateway_s,
                "compute_ms_per_layer": current.plan.stages.iter().map(|s| (s.uav.clone(), telemetry.get(&s.uav).map(|t| t.layer_latency_s * 1e3))).collect::<BTreeMap<_, _>>(),
                "planning_compute_ms_per_layer": self.own_layer_latency_s * 1e3,
                "link_bps": current.plan.stages.iter().map(|s| (s.uav.clone(), telemetry.get(&s.uav).and_then(|t| t.link_bps))).collect::<BTreeMap<_, _>>(),
                "configured_link_bps": self.p.link_rate_bps,
                "link_phy_bps": phy,
                "link_source": source,
                "kv_codec": self.kv_codec.name(),
                "kv_bytes_per_element": traffic.kv_bytes_per_element,
            }),
            (Err(e), _) | (_, Err(e)) => serde_json::json!({"error": e.to_string()}),
        }
    }

    /// Publishes the spec of a request that starts, for a standby (docs/generate-api.md, "Standby").
    fn announce(&self, job: &Job) {
        let Some(spec) = self.desk.spec(job.request_id) else { return };
        let msg = RequestSpec {
            request_id: job.request_id,
            prompt_ids: job.prompt_ids.clone(),
            max_tokens: spec.max_tokens,
            temperature: spec.temperature,
            top_p: spec.top_p,
            seed: spec.seed,
            ignore_eos: spec.ignore_eos,
            user: spec.user,
            prompt: spec.prompt,
            ..Default::default()
        };
        if let Err(e) = self.request_pub.publish(&msg) {
            tracing::warn!("publish the request's spec: {e}");
        }
    }

    /// A standby applies what it heard of the primary's work.
    fn follow(&mut self, f: Followed) {
        match f {
            Followed::Plan(epoch) => {
                if let Some(c) = self.lock().clock.as_mut() {
                    c.followed(epoch);
                }
                self.epoch = self.epoch.max(epoch);
            }
            Followed::Request(r) => {
                let spec = Spec {
                    user: r.user,
                    prompt: r.prompt,
                    max_tokens: r.max_tokens,
                    temperature: r.temperature,
                    top_p: r.top_p,
                    seed: r.seed,
                    ignore_eos: r.ignore_eos,
                };
                // Checked like a client's request, with the prompt ids the primary made of it.
                let ids = r.prompt_ids;
                match crate::requests::check(&spec, &self.limits, |_| Ok(ids)) {
                    Ok(mut job) if r.request_id != 0 => {
                        job.request_id = r.request_id;
                        if self.desk.follow(spec, job) {
                            tracing::info!(request = r.request_id, "following the primary's request");
                        }
                    }
                    Ok(_) => tracing::warn!("followed request without an id ignored"),
                    Err(why) => tracing::warn!(request = r.request_id, "followed request refused: {why}"),
                }
            }
            Followed::Token(t) => self.follow_token(t),
            Followed::Inputs(msg) => match crate::ros::record::plan_inputs(&msg) {
                Ok(i) if self.followed_inputs.as_ref().is_none_or(|f| f.epoch < i.epoch) => {
                    self.followed_inputs = Some(i)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("the primary's plan inputs ignored: {e}"),
            },
        }
    }

    fn follow_token(&mut self, t: TokenChunk) {
        let id = t.request_id;
        let Some(have) = self.desk.followed_tokens(id) else { return };
        match standby::token_step(have, t.index as usize, t.done, &t.finish_reason) {
            TokenStep::Append => match u32::try_from(t.token_id) {
                Ok(token) => _ = self.desk.followed_token(id, token, t.text),
                Err(_) => tracing::warn!(request = id, token = t.token_id, "followed token with a negative id ignored"),
            },
            TokenStep::Duplicate | TokenStep::Invalid => {}
            // Every chunk after a gap is beyond it too (debug only); resumption starts at the gap,
            // a request that ends with one is forgotten (warned below).
            TokenStep::Gap { have, got } => {
                tracing::debug!(request = id, have, got, "a followed token is missing: resumption would start at it")
            }
            TokenStep::Done { finish, tokens } if tokens == have => {
                let (tokens, _) = self.desk.progress(id);
                let prompt_ids = self.desk.prompt_ids(id);
                let error = match finish {
                    Finish::Error => "the primary scheduler's generation failed",
                    Finish::Canceled => "canceled by the client",
                    _ => "",
                };
                let answer = Answer {
                    accepted: finish != Finish::Refused,
                    error: error.into(),
                    request_id: id,
                    prompt_ids,
                    text: self.gateway.decode(&tokens).unwrap_or_default(),
                    tokens,
                    finish,
                    tokens_per_s: 0.0,
                    stats_json: String::new(),
                };
                tracing::info!(
                    request = id,
                    tokens = answer.tokens.len(),
                    finish = finish.as_str(),
                    "followed request finished"
                );
                self.desk.finish(&answer);
            }
            TokenStep::Done { tokens, .. } => {
                tracing::warn!(
                    request = id,
                    have,
                    tokens,
                    "followed request ended with tokens missing here: forgotten"
                );
                self.desk.forget(id);
            }
        }
    }

    /// The standby takes over: it serves clients, and resumes the request that was running.
    fn take_over(&mut self, t: standby::Takeover) -> anyhow::Result<()> {
        let next_epoch = self.next_epoch();
        tracing::warn!(silent_s = t.silent_s, next_epoch, "PRIMARY SILENT: the standby takes over");
        self.desk.serve(&self.ctx)?;
        let mut running = self.desk.running().into_iter().map(|(job, have)| {
            tracing::info!(request = job.request_id, tokens = have, "resuming the primary's running request");
            Resumed { job, have, at: unix_now(), silent_s: t.silent_s }
        });
        self.resumed = running.next();
        self.resumed_more = running.collect();
        Ok(())
    }

    /// The primary's latest plan, decided again from its inputs as `aerokv bag audit` does, when
    /// it is a plan for `request_id` from position 0 and this controller numbers the UAVs as the
    /// primary's did (its later failovers name them).
    fn primary_plan(&mut self, request_id: u64) -> Result<(Planned, PlanInputs), String> {
        let i = self.followed_inputs.clone().ok_or("no plan of the primary's heard")?;
        if i.request_id != request_id || i.resume_position != 0 || !matches!(i.decision, Decision::Initial { .. }) {
            return Err(format!("the primary's plan of epoch {} is no plan of this request from 0", i.epoch));
        }
        let planned =
            decision::decide(&mut i.params.controller(&i.planning_ids), &i, None).map_err(|e| e.to_string())?;
        self.controller.restore_ids(&i.planning_ids);
        if self.controller.planning_ids() != i.planning_ids {
            return Err("the UAVs are numbered otherwise than in the primary's plan".into());
        }
        Ok((planned, i))
    }

    /// What each executor holds, from its last heartbeat.
    fn kv_holders(&self) -> BTreeMap<String, standby::KvHolder> {
        self.lock()
            .beats
            .iter()
            .map(|(uav, (_, hb))| {
                let holder = standby::KvHolder {
                    layer_start: hb.layer_start as usize,
                    layer_end: hb.layer_end as usize,
                    kv: hb.kv.iter().map(|k| (k.request_id, k.kv_tokens as usize)).collect(),
                };
                (uav.clone(), holder)
            })
            .collect()
    }

    /// Every UAV's memory under the current plan (none before the first plan), with the weights
    /// its executor reports loaded.
    fn uav_memory(&self) -> Vec<admission::UavMemory> {
        let Some(current) = &self.current else { return Vec::new() };
        let reported = self.lock().beats.iter().map(|(uav, (_, hb))| (uav.clone(), hb.weight_bytes)).collect();
        let m = &self.plan_params.model;
        let model = admission::ModelBytes {
            weight_bytes_per_layer: m.weight_bytes_per_layer as u64,
            kv_bytes_per_token_layer: m.kv_bytes_per_token_layer as u64,
            activation_bytes_per_token: self.codec.row_bytes(self.hidden) as u64,
        };
        admission::plan_memory(&current.plan, model, self.p.memory_budget_bytes as u64, &reported)
    }

    /// The answer of a request stopped because nobody wants it any more.
    fn canceled(&mut self, request_id: u64) -> Answer {
        self.hops.clear();
        let (tokens, text) = self.desk.progress(request_id);
        tracing::info!(request = request_id, tokens = tokens.len(), "request canceled: the swarm stops its work on it");
        self.publish_done(request_id, tokens.len(), String::new(), Finish::Canceled);
        Answer {
            accepted: true,
            error: "canceled by the client".into(),
            request_id,
            prompt_ids: Vec::new(),
            tokens,
            text,
            finish: Finish::Canceled,
            tokens_per_s: 0.0,
            stats_json: String::new(),
        }
    }

    /// The last chunk of a request on the token topic (with what the detokenizer still held).
    fn publish_done(&self, request_id: u64, index: usize, text: String, finish: Finish) {
        let chunk = TokenChunk {
            request_id,
            index: index as u32,
            token_id: -1,
            text,
            done: true,
            finish_reason: finish.as_str().into(),
            epoch: self.epoch,
            ..Default::default()
        };
        if let Err(e) = self.token_pub.publish(&chunk) {
            tracing::warn!("publish the last token chunk: {e}");
        }
        // The executors free the request's caches on it.
        if let Err(e) = self.finished_pub.publish(&chunk) {
            tracing::warn!("publish the request's end on {}: {e}", names::FINISHED);
        }
    }
}

impl Scheduler {
    /// The scheduler's status on `/diagnostics`, at most once per period.
    fn publish_diagnostics(&mut self, run: Option<&Run>) {
        let now = clock::now();
        if !self.diagnostics.is_due(now) {
            return;
        }
        let (heard, telemetry_refused) = {
            let live = self.lock();
            (live.heard.clone(), live.rejects.total())
        };
        let members = self.membership.current(&heard, now);
        let view = crate::diagnostics::SchedulerView {
            request_id: run.map_or(0, |r| r.request_id),
            request_tokens: run.map_or(0, |r| r.tokens.len()),
            requests_served: self.requests_served,
            epoch: self.epoch,
            members,
            ring: self
                .current
                .as_ref()
                .map(|c| c.plan.stages.iter().map(|s| s.uav.clone()).collect())
                .unwrap_or_default(),
            expected_uavs: self.p.expected_uavs,
            stale_dropped: self.stale_dropped,
            telemetry_refused,
        };
        self.diagnostics.publish_at(now, vec![crate::diagnostics::scheduler(&view)]);
    }
}
