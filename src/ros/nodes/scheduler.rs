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
use crate::requests::{Answer, Finish, Job, Spec, MAX_RUNNING};
use crate::ros::auth::{verified, NodeAuth, SignedPublisher, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::diagnostics::Diagnostics;
use crate::ros::fallback::{self, Input};
use crate::ros::{clock, convert, hop_ms, names, percentiles, stamp_secs, unix_now, NodeContext, Publishers};
use crate::standby::{self, KvRestart, Phase, Resume, TokenStep, Watch};
use aerokv_auth::{NodeId, Role};
use aerokv_codec::{ActivationCodec, Encoded, KvCodec};
use aerokv_engine::{
    models_root, Detokenizer, Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Sampler, Sampling, Shard,
};
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

/// A (re)started scheduler plans once it heard `expected_uavs` executors' heartbeats, or after
/// this many member timeouts of listening (docs/design.md, "Epochs").
const EPOCH_SETTLE_TIMEOUTS: f64 = 2.0;

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
    /// A standby's running request to resume once it took over.
    resumed: Option<Resumed>,
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
        followed_inputs: None,
        fallback,
        assign_pub: SignedPublisher::new(
            ctx.publisher(names::ASSIGNMENT, names::latched())?,
            auth.clone(),
            NodeAuth::sign_assignment,
        ),
        auth: auth.clone(),
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
                let id = job.request_id;
                let answer = tokio::select! {
                    a = s.serve(job, resumed) => a,
                    // Nobody wants it any more: no further steps (the executors' KV of it is
                    // dropped by the next request's plan).
                    _ = desk.canceled(id) => s.canceled(id),
                    _ = &mut shutdown => { desk.shutdown(); return Ok(()); }
                };
                desk.finish(&answer);
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
        self.fallback.send(Input::Assignment(epoch, msg.ring.clone()));
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

    /// Serves one generation request (checked by [`crate::requests::check`]); `resumed`: a
    /// request the primary ran, from the tokens this standby followed.
    async fn serve(&mut self, job: Job, resumed: Option<Resumed>) -> Answer {
        self.announce(&job);
        self.await_settled().await;
        let members = self.members();
        if members.is_empty() {
            let why = crate::requests::Refusal::NoUav;
            tracing::warn!("request refused: {why}");
            return Answer::refused(job.request_id, &why);
        }
        let tokens = (job.prompt_ids.len() + job.max_tokens) as u64;
        if let Verdict::Refuse(why) = admission::admit(&self.uav_memory(), &[], MAX_RUNNING, tokens) {
            tracing::warn!(request = job.request_id, "request refused: {why}");
            return Answer::refused(job.request_id, &why);
        }
        let mut run = Run::new(job.request_id, job.prompt_ids, job.max_tokens, job.sampling);
        run.ignore_eos = job.ignore_eos;
        let result = match resumed {
            Some(r) => self.resume(&mut run, r).await,
            None => self.generate(&mut run).await,
        };
        self.requests_served += 1;
        let finish = result.as_ref().map_or(Finish::Error, |&f| f);
        // The done chunk carries what the detokenizer still held (an incomplete character).
        let rest = run.detok.finish(&self.gateway).ok().flatten().unwrap_or_default();
        self.publish_done(run.request_id, run.tokens.len(), rest, finish);
        let text = self.gateway.decode(&run.tokens).unwrap_or_default();
        let decode_s = run.first_token_at.map_or(0.0, |t| clock::since(t).as_secs_f64());
        let tokens_per_s =
            if run.tokens.len() > 1 && decode_s > 0.0 { (run.tokens.len() - 1) as f64 / decode_s } else { 0.0 };
        let stats = serde_json::json!({
            "request_id": run.request_id,
            "activation_codec": self.codec.name(),
            "epochs": run.epochs,
            "incidents": run.incidents,
            "stale_dropped": self.stale_dropped,
            "watchdog": self.fallback.status(),
            "auth": self.auth.counters_json(),
            "prefill_s": run.prefill_s,
            "gateway_hop_ms": percentiles(&std::mem::take(&mut self.hops)),
            "steps": step_stats(&run.steps),
            "prediction": self.prediction(&run.steps, &run.compute_ms),
            "layout": self.current.as_ref().map(|c| c.plan.stages.iter().map(|s| serde_json::json!({"uav": s.uav, "start": s.start, "layers": s.len, "k": s.k, "t": s.t})).collect::<Vec<_>>()),
        });
        let (accepted, error) = match result {
            Ok(_) => (true, String::new()),
            Err(e) => {
                tracing::error!(request = run.request_id, "generation failed: {e}");
                (run.started, e.to_string())
            }
        };
        Answer {
            accepted,
            error,
            request_id: run.request_id,
            prompt_ids: run.prompt_ids,
            tokens: run.tokens,
            text,
            finish,
            tokens_per_s,
            stats_json: stats.to_string(),
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
                let prompt_ids = self.desk.running().map(|(j, _)| j.prompt_ids).unwrap_or_default();
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
        if let Some((job, have)) = self.desk.running() {
            tracing::info!(request = job.request_id, tokens = have, "resuming the primary's running request");
            self.resumed = Some(Resumed { job, have, at: unix_now(), silent_s: t.silent_s });
        }
        Ok(())
    }

    /// A request the primary ran, from the tokens followed: an exact restart (the prompt and those
    /// tokens are fed again; the sampler stands where the primary's stood).
    async fn resume(&mut self, run: &mut Run, r: Resumed) -> Result<Finish, Interrupt> {
        let (mut known, _) = self.desk.progress(run.request_id);
        known.truncate(r.have);
        for &t in &known {
            let _ = run.detok.push(&self.gateway, t);
        }
        run.sampler.skip(known.len());
        let have = known.len();
        run.tokens = known;
        run.incidents.push(Incident {
            uav: "scheduler".into(),
            reason: "primary silent".into(),
            token: have,
            mode: "takeover".into(),
            resume_position: 0,
            replay_from: 0,
            epoch: self.next_epoch(),
            detected_at: r.at,
            recovered_at: 0.0,
            next_token_at: 0.0,
            planned_recovery_s: 0.0,
            why: format!("the primary was silent for {:.3} s", r.silent_s),
            stages: BTreeMap::new(),
        });
        match standby::resume(have, run.max_tokens, run.prompt_ids.len(), self.max_context) {
            Resume::Finished(finish) => Ok(finish),
            Resume::Continue { from } => {
                tracing::info!(request = run.request_id, from, "resuming from the followed tokens");
                let started = clock::now();
                self.plan_takeover(run).await?;
                self.decode(run, started).await
            }
        }
    }

    /// The takeover's plan for the running request: on the executors' KV caches when every
    /// stage of a fresh plan, or else of the primary's latest plan, holds them up to the last
    /// followed token ([`standby::kv_restart`]: it resumes there), else an exact restart from
    /// position 0.
    async fn plan_takeover(&mut self, run: &mut Run) -> Result<(), Interrupt> {
        let members = self.members();
        let held: BTreeMap<String, standby::KvHolder> =
            self.kv_holders().into_iter().filter(|(uav, _)| members.contains(uav)).collect();
        let mut why = Vec::new();
        // A fresh plan, else the primary's latest plan (decided again from its inputs): the
        // layout the executors hold, when a battery's drain since moved a boundary.
        let fresh = if members.is_empty() {
            Err("no member yet".to_string())
        } else {
            let decision = Decision::Initial { members };
            let inputs = self.inputs(self.next_epoch(), run.request_id, decision, run.total_tokens(), 0);
            self.decide(&inputs).map(|p| (p, inputs)).map_err(|e| e.to_string())
        };
        for candidate in [fresh, self.primary_plan(run.request_id)] {
            let (planned, inputs) = match candidate {
                Ok(c) => c,
                Err(e) => {
                    why.push(e);
                    continue;
                }
            };
            let restart = standby::kv_restart(
                &planned.plan.stages,
                &held,
                run.request_id,
                run.prompt_ids.len(),
                run.tokens.len(),
            );
            match restart {
                KvRestart::Resume { position } => match self.resume_on_kv(run, planned, inputs, position).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        why.push(format!("the plan resuming at {position} did not apply: {e}"));
                        break;
                    }
                },
                KvRestart::Refeed(r) => why.push(r.to_string()),
            }
        }
        let why = why.join("; ");
        tracing::info!(request = run.request_id, %why, "takeover: feeding the prompt and the followed tokens again");
        if let Some(inc) = run.incidents.last_mut() {
            inc.why = format!("{}; fed again: {why}", inc.why);
        }
        run.rewind();
        self.plan_restart(run, "takeover").await
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

    /// Publishes `planned` resuming at `position` and waits until every stage applied it.
    async fn resume_on_kv(
        &mut self,
        run: &mut Run,
        mut planned: Planned,
        inputs: PlanInputs,
        position: usize,
    ) -> Result<(), Interrupt> {
        let inputs = PlanInputs { resume_position: position, ..inputs };
        planned.plan.resume_position = position;
        self.publish(planned, &inputs, "takeover").map_err(|e| Interrupt::Fatal(e.to_string()))?;
        run.epochs.push(self.epoch);
        self.wait_ready().await?;
        tracing::info!(request = run.request_id, position, "takeover: resuming on the executors' KV caches");
        run.position = position;
        run.sent_until = position;
        if let Some(inc) = run.incidents.last_mut() {
            inc.resume_position = position;
        }
        Ok(())
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
    }
}

/// Where one decode step's time went.
#[derive(Clone, Copy)]
struct Step {
    position: usize,
    /// From sending the step to its output: every stage and hop.
    round_trip_ms: f64,
    /// LM head, sampling, embedding and sending the next token.
    gateway_ms: f64,
}

/// The steps' round trips and gateway times, and the slowest round trips with their positions.
fn step_stats(steps: &[Step]) -> serde_json::Value {
    let round_trips: Vec<f64> = steps.iter().map(|s| s.round_trip_ms).collect();
    let gateway: Vec<f64> = steps.iter().map(|s| s.gateway_ms).collect();
    let mut slowest = steps.to_vec();
    slowest.sort_by(|a, b| b.round_trip_ms.total_cmp(&a.round_trip_ms));
    let slowest: Vec<_> = slowest
        .iter()
        .take(3)
        .map(|s| serde_json::json!({"position": s.position, "round_trip_ms": s.round_trip_ms}))
        .collect();
    serde_json::json!({"round_trip_ms": percentiles(&round_trips), "gateway_ms": percentiles(&gateway), "slowest": slowest})
}

/// The state of one request.
struct Run {
    request_id: u64,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampler: Sampler,
    ignore_eos: bool,
    detok: Detokenizer,
    tokens: Vec<u32>,
    /// The oldest step without output (a prompt chunk, or one token): its first position.
    position: usize,
    /// Steps are sent up to here: several ahead of `position` when their ids are known (the
    /// prompt's chunks, tokens fed again after a restart), so that the stages work as a pipeline.
    sent_until: usize,
    started: bool,
    first_token_at: Option<Instant>,
    prefill_s: f64,
    epochs: Vec<u64>,
    incidents: Vec<Incident>,
    /// When the step in flight left the gateway.
    sent_at: Option<Instant>,
    /// The decode steps so far.
    steps: Vec<Step>,
    /// Per UAV, its executor's compute per layer as its heartbeat said at each decode step.
    compute_ms: crate::linkrate::RunMeans,
}

impl Run {
    fn new(request_id: u64, prompt_ids: Vec<u32>, max_tokens: usize, sampling: Sampling) -> Self {
        Run {
            request_id,
            prompt_ids,
            max_tokens,
            sampler: Sampler::new(sampling),
            ignore_eos: false,
            detok: Detokenizer::new(),
            tokens: Vec::new(),
            position: 0,
            sent_until: 0,
            started: false,
            first_token_at: None,
            prefill_s: 0.0,
            epochs: Vec::new(),
            incidents: Vec::new(),
            sent_at: None,
            steps: Vec::new(),
            compute_ms: Default::default(),
        }
    }

    /// The ids of the step that starts at `position`, once they are known.
    fn step_at(&self, position: usize) -> Option<&[u32]> {
        step_at(&self.prompt_ids, &self.tokens, position)
    }

    /// How many steps have been sent and have no output yet.
    fn in_flight(&self) -> usize {
        let (mut at, mut n) = (self.position, 0);
        while at < self.sent_until {
            at += self.step_at(at).map_or(1, <[u32]>::len);
            n += 1;
        }
        n
    }

    fn total_tokens(&self) -> u64 {
        (self.prompt_ids.len() + self.max_tokens) as u64
    }

    /// Back to the start: every known token is fed again, in the steps first computed.
    fn rewind(&mut self) {
        self.position = 0;
        self.sent_until = 0;
    }
}

impl Scheduler {
    /// Runs `run` to its end; returns the finish reason.
    async fn generate(&mut self, run: &mut Run) -> Result<Finish, Interrupt> {
        let started = clock::now();
        // A fresh plan for this request from current battery health and membership.
        self.plan_restart(run, "request").await?;
        self.decode(run, started).await
    }

    /// Runs `run` to its end on the current plan, from `run.position`.
    async fn decode(&mut self, run: &mut Run, started: Instant) -> Result<Finish, Interrupt> {
        run.started = true;
        // A takeover's recovery ends with the first plan.
        for inc in run.incidents.iter_mut().filter(|i| i.recovered_at == 0.0) {
            inc.recovered_at = unix_now();
            inc.epoch = self.epoch;
        }
        // The next step leaves as soon as its token is sampled; streaming the token and the
        // retirement check happen while the swarm computes it.
        loop {
            self.send_steps(run)?;
            let hidden = match self.await_output(run).await {
                Ok(h) => h,
                Err(Interrupt::Failed(uav)) => {
                    self.recover(run, &uav, "failure").await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let step = run.step_at(run.position).map_or(1, <[u32]>::len);
            if run.position < run.prompt_ids.len() {
                self.report_progress(run, run.position + step);
            }
            // The output of the prompt's last chunk yields token 0, each token's the next one.
            let Some(index) = (run.position + step).checked_sub(run.prompt_ids.len()) else {
                run.position += step; // a prompt chunk before the last
                continue;
            };
            if index < run.tokens.len() {
                run.position += step; // a known token fed again after a restart
                continue;
            }
            let received_at = clock::now();
            // Decode steps only, not the prompt's.
            let round_trip_ms = run
                .sent_at
                .filter(|_| run.position >= run.prompt_ids.len())
                .map(|t| (received_at - t).as_secs_f64() * 1e3);
            let logits = self.gateway.logits(&hidden).map_err(|e| Interrupt::Fatal(format!("LM head: {e}")))?;
            let id = run.sampler.sample(&logits).map_err(|e| Interrupt::Fatal(format!("sampling: {e}")))?;
            if run.first_token_at.is_none() {
                run.first_token_at = Some(clock::now());
                run.prefill_s = clock::since(started).as_secs_f64();
            }
            let now = unix_now();
            for inc in run.incidents.iter_mut().filter(|i| i.next_token_at == 0.0) {
                inc.next_token_at = now;
            }
            if !run.ignore_eos && self.gateway.is_stop(id) {
                return Ok(Finish::Eos);
            }
            run.tokens.push(id);
            run.position += step;
            let finish = if run.tokens.len() >= run.max_tokens {
                Some(Finish::Length)
            } else if run.position + 1 > self.max_context {
                Some(Finish::Context)
            } else {
                self.send_steps(run)?;
                None
            };
            if let Some(round_trip_ms) = round_trip_ms {
                for (uav, (_, hb)) in &self.lock().beats {
                    run.compute_ms.observe(uav, hb.compute_ms_per_layer);
                }
                run.steps.push(Step {
                    position: run.position,
                    round_trip_ms,
                    gateway_ms: clock::since(received_at).as_secs_f64() * 1e3,
                });
            }
            self.stream_token(run, index, id);
            if let Some(reason) = finish {
                return Ok(reason);
            }
            if self.p.retirement {
                self.maybe_retire(run).await?;
            }
        }
    }

    fn report_progress(&self, run: &Run, done: usize) {
        let total = run.prompt_ids.len();
        tracing::debug!(request = run.request_id, done, total, "prompt progress");
        let msg = PromptProgress {
            request_id: run.request_id,
            done: done as u32,
            total: total as u32,
            epoch: self.epoch,
            ..Default::default()
        };
        if let Err(e) = self.progress_pub.publish(&msg) {
            tracing::warn!("publish prompt progress: {e}");
        }
    }

    fn stream_token(&mut self, run: &mut Run, index: usize, id: u32) {
        let text = run.detok.push(&self.gateway, id).ok().flatten().unwrap_or_default();
        let chunk = TokenChunk {
            request_id: run.request_id,
            index: index as u32,
            token_id: id as i32,
            text: text.clone(),
            done: false,
            finish_reason: String::new(),
            epoch: self.epoch,
            ..Default::default()
        };
        // On the token topic before the goals' feedback (a primary killed in between leaves its
        // standby no token behind its clients); a request nobody wants any more streams nothing.
        let token_pub = &self.token_pub;
        let wanted = self.desk.token(run.request_id, id, &text, || {
            if let Err(e) = token_pub.publish(&chunk) {
                tracing::warn!("publish token: {e}");
            }
        });
        if !wanted {
            return;
        }
        self.publish_diagnostics(Some(&*run));
    }

    /// Embeds and sends to the owner of layer 0 every step whose ids are known and that has not
    /// been sent, while fewer than one per stage (at most [`MAX_STEPS_IN_FLIGHT`]) are in flight.
    fn send_steps(&mut self, run: &mut Run) -> Result<(), Interrupt> {
        let plan = &self.current.as_ref().ok_or_else(|| Interrupt::Fatal("no plan".into()))?.plan;
        let first = plan.first().ok_or_else(|| Interrupt::Fatal("the plan has no first stage".into()))?.uav.clone();
        let (epoch, window) = (plan.epoch, plan.stages.len().clamp(1, MAX_STEPS_IN_FLIGHT));
        let topic = names::stage_input(&first);
        let mut in_flight = run.in_flight();
        while in_flight < window {
            let Some(ids) = run.step_at(run.sent_until) else { break };
            let hidden = self.embed(ids)?;
            let mut msg =
                convert::activation(epoch, run.request_id, 0, run.sent_until, 0, names::GATEWAY_SOURCE, &hidden);
            self.auth.sign_activation(&topic, &mut msg);
            let publisher = self.activation_pub(&topic).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            publisher.publish(&msg).map_err(|e| Interrupt::Fatal(format!("publish to {topic}: {e}")))?;
            run.sent_until += hidden.rows();
            run.sent_at = Some(clock::now());
            in_flight += 1;
        }
        Ok(())
    }

    /// The embeddings of `ids`, encoded as they travel.
    fn embed(&mut self, ids: &[u32]) -> Result<Encoded, Interrupt> {
        let hidden = self.gateway.embed(ids).map_err(|e| Interrupt::Fatal(format!("embedding: {e}")))?;
        Encoded::encode(self.codec, hidden.as_slice(), hidden.width())
            .map_err(|e| Interrupt::Fatal(format!("encoding the embeddings: {e}")))
    }

    /// The publisher of a stage input or replay topic.
    fn activation_pub(&mut self, topic: &str) -> anyhow::Result<&r2r::Publisher<Activation>> {
        self.activation_pubs.get(&self.ctx, topic, names::activation_qos(topic))
    }

    /// A stage around the gateway fails: its recovering successor replays the tail's layers after
    /// the gateway with the embeddings they were fed, which only the gateway has. Every step that
    /// fed layer 0 from `from` (the successor's snapshot holds the rest) to the resume position,
    /// chunked as it was sent (the prompt's chunks, then a token at a time).
    fn replay_embeddings(&mut self, run: &Run, failed: &str, from: usize) -> Result<(), Interrupt> {
        let mut chunks = Vec::new();
        for (position, ids) in gateway_steps(&run.prompt_ids, &run.tokens, from, run.position) {
            // Encoded again: the same bytes the stage was fed (the codecs are deterministic).
            chunks.push((position, self.embed(ids)?));
        }
        let mut msg = convert::packed_activation(self.epoch, run.request_id, 0, names::GATEWAY_SOURCE, &chunks)
            .map_err(|e| Interrupt::Fatal(format!("replay of {failed}'s embeddings: {e}")))?;
        let topic = names::replay(failed);
        self.auth.sign_activation(&topic, &mut msg);
        tracing::info!(
            failed,
            steps = chunks.len(),
            tokens = msg.token_count,
            "replaying the embeddings of a stage around the gateway"
        );
        let publisher = self.activation_pub(&topic).map_err(|e| Interrupt::Fatal(e.to_string()))?;
        publisher.publish(&msg).map_err(|e| Interrupt::Fatal(format!("publish to {topic}: {e}")))
    }

    /// Waits for the last stage's output of the step in flight.
    async fn await_output(&mut self, run: &Run) -> Result<Hidden, Interrupt> {
        let deadline = clock::sleep(Duration::from_secs_f64(self.p.step_timeout_s));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some(msg) = self.outputs.next() => {
                    if msg.epoch != self.epoch || msg.request_id != run.request_id || msg.position as usize != run.position {
                        self.stale_dropped += 1;
                        tracing::debug!(epoch = msg.epoch, position = msg.position, "stale output dropped");
                        continue;
                    }
                    match convert::hidden(&msg) {
                        Ok(h) => {
                            self.hops.push(hop_ms(&msg.stamp));
                            return Ok(h);
                        }
                        // Not the stage's output (that one decodes): keep waiting for it.
                        Err(e) => tracing::warn!(source = %msg.source, "undecodable output ignored: {e}"),
                    }
                }
                Some(ev) = self.failures.recv() => {
                    if self.note_failure(&ev) && self.in_plan(&ev.uav_id) {
                        return Err(Interrupt::Failed(ev.uav_id));
                    }
                }
                _ = &mut deadline => {
                    let plan = self.current.as_ref().map(|c| c.plan.clone()).ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
                    let reports = self.reports(&plan);
                    let why = epochs::diagnose_stall(plan.epoch, run.request_id, reports.iter().map(|(u, r)| (u.as_str(), r.as_ref())), self.membership.member_timeout);
                    return Err(Interrupt::Fatal(format!("no output for position {} within {} s and no failure declared; {why}", run.position, self.p.step_timeout_s)));
                }
            }
        }
    }

    fn in_plan(&self, uav: &str) -> bool {
        self.current.as_ref().is_some_and(|c| c.plan.stage(uav).is_some())
    }

    /// Failover of `failed` at the oldest step in flight; an exact restart when failover is
    /// impossible.
    async fn recover(&mut self, run: &mut Run, failed: &str, reason: &str) -> Result<(), Interrupt> {
        let detected_at = unix_now();
        let current = self.current.clone().ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
        let graceful = reason == "retirement";
        let snapshot = self.snapshot_held_after(&current.plan, failed, run.request_id);
        let decision =
            Decision::Failover { failed: failed.into(), graceful, based_on_epoch: current.plan.epoch, snapshot };
        let inputs = self.inputs(self.next_epoch(), run.request_id, decision, run.total_tokens(), run.position);
        let planned = self.decide(&inputs).map_err(|e| e.to_string());
        let needs_embeddings = current.plan.stage(failed).is_some_and(|s| current.plan.tail_needs_gateway_replay(s));
        let mut incident = Incident {
            uav: failed.into(),
            reason: reason.into(),
            token: run.tokens.len(),
            mode: if graceful { "retirement" } else { "failover" }.into(),
            resume_position: run.position,
            replay_from: 0,
            epoch: self.next_epoch(),
            detected_at,
            recovered_at: 0.0,
            next_token_at: 0.0,
            planned_recovery_s: 0.0,
            why: String::new(),
            stages: BTreeMap::new(),
        };
        let why = match planned {
            Ok(planned) if planned.plan.resume_position > 0 => {
                incident.planned_recovery_s = planned.protection.worst_recovery_s;
                incident.replay_from = planned.plan.replay_from;
                self.publish(planned, &inputs, &format!("{reason} of {failed}"))
                    .map_err(|e| Interrupt::Fatal(e.to_string()))?;
                incident.epoch = self.epoch;
                run.epochs.push(self.epoch);
                if needs_embeddings {
                    self.replay_embeddings(run, failed, incident.replay_from)?;
                }
                match self.wait_ready().await {
                    Ok(stages) => {
                        incident.stages = stages
                            .into_iter()
                            .map(|(uav, t)| {
                                (
                                    uav,
                                    StageReady { loaded_s: t.loaded_s - detected_at, ready_s: t.ready_s - detected_at },
                                )
                            })
                            .collect();
                        None
                    }
                    Err(Interrupt::Failed(other)) => Some(format!("another failure during recovery: {other}")),
                    Err(e) => Some(format!("failover did not complete: {e}")),
                }
            }
            Ok(_) => Some("the failure came during the prompt's first chunk: nothing to recover".to_string()),
            Err(why) => Some(format!("no failover plan: {why}")),
        };
        if let Some(why) = why {
            tracing::warn!(failed, %why, "restarting exactly");
            incident.why = why;
            incident.mode = "restart".into();
            run.rewind();
            self.plan_restart(run, &format!("restart after {reason} of {failed}")).await?;
            incident.epoch = self.epoch;
            incident.resume_position = 0;
            incident.replay_from = 0;
        }
        // The steps in flight went out in an older epoch: they are sent again.
        run.sent_until = run.position;
        incident.recovered_at = unix_now();
        tracing::info!(failed, mode = %incident.mode, recovery_s = incident.recovered_at - detected_at, "recovered");
        run.incidents.push(incident);
        Ok(())
    }

    /// How far `failed`'s successor holds its tail's snapshot, from its last heartbeat in this
    /// plan's epoch and this request (a lower bound: snapshots only grow within an epoch).
    fn snapshot_held_after(&self, plan: &SwarmPlan, failed: &str, request_id: u64) -> Option<SnapshotHeld> {
        let succ = plan.succ(failed).filter(|s| s.uav != failed)?;
        let live = self.lock();
        let (_, hb) = live.beats.get(&succ.uav)?;
        (hb.epoch == plan.epoch && hb.request_id == request_id)
            .then_some(SnapshotHeld { tokens: hb.pred_snapshot_tokens as usize, heartbeat_sequence: hb.sequence })
    }

    /// A fresh plan over the members, from position 0 (the start of a request, or a restart).
    async fn plan_restart(&mut self, run: &mut Run, reason: &str) -> Result<(), Interrupt> {
        // A DDS stall after a drone is killed can silence live drones for a second (false failure
        // declarations); they count as members again once their heartbeats resume. Give them that
        // long before the request fails for want of drones.
        let grace = clock::now() + Duration::from_secs_f64(2.0 * self.p.member_timeout_s);
        loop {
            let members = self.members();
            if members.is_empty() {
                if clock::now() < grace {
                    clock::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                return Err(Interrupt::Fatal("no UAV left to serve the request".into()));
            }
            let decision = Decision::Initial { members };
            let inputs = self.inputs(self.next_epoch(), run.request_id, decision, run.total_tokens(), 0);
            let planned = self
                .decide(&inputs)
                .map_err(|e| Interrupt::Fatal(format!("the swarm cannot serve this request: {e}")))?;
            self.publish(planned, &inputs, reason).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            run.epochs.push(self.epoch);
            match self.wait_ready().await {
                Ok(_) => return Ok(()),
                Err(Interrupt::Failed(uav)) => {
                    tracing::warn!(%uav, "failed while the plan was applied: planning again")
                }
                Err(Interrupt::Superseded { uav, epoch }) => {
                    tracing::warn!(%uav, epoch, "an executor runs a later epoch: planning again above it")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every stage of the current plan runs it (heartbeat epoch and state "ready").
    async fn wait_ready(&mut self) -> Result<BTreeMap<String, StageReady>, Interrupt> {
        let plan = self.current.as_ref().map(|c| c.plan.clone()).ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
        let deadline = clock::now() + Duration::from_secs_f64(self.p.ready_timeout_s);
        let mut poll = clock::interval(Duration::from_millis(5));
        let mut seen: BTreeMap<String, StageReady> = BTreeMap::new();
        loop {
            tokio::select! {
                Some(ev) = self.failures.recv() => {
                    if self.note_failure(&ev) && plan.stage(&ev.uav_id).is_some() {
                        return Err(Interrupt::Failed(ev.uav_id));
                    }
                }
                _ = poll.tick() => {
                    let reports = self.reports(&plan);
                    let now = unix_now();
                    for (uav, r) in &reports {
                        if let Some(r) = r.as_ref().filter(|r| r.epoch == plan.epoch) {
                            let t = seen.entry(uav.clone()).or_insert(StageReady { loaded_s: now, ready_s: 0.0 });
                            if r.state == ExecutorState::Ready && t.ready_s == 0.0 {
                                t.ready_s = now;
                            }
                        }
                    }
                    match epochs::readiness(plan.epoch, reports.iter().map(|(u, r)| (u.as_str(), r.as_ref()))) {
                        Readiness::Ready => return Ok(seen),
                        Readiness::Superseded { uav, epoch } => return Err(Interrupt::Superseded { uav, epoch }),
                        Readiness::Refused { uav, why } => {
                            return Err(Interrupt::Fatal(format!("{uav} cannot apply epoch {}: {why}", plan.epoch)));
                        }
                        Readiness::Waiting(lags) if clock::now() > deadline => {
                            let lags: Vec<String> = lags.iter().map(ToString::to_string).collect();
                            return Err(Interrupt::Fatal(format!("not ready with epoch {} after {} s: {}", plan.epoch, self.p.ready_timeout_s, lags.join("; "))));
                        }
                        Readiness::Waiting(_) => {}
                    }
                }
            }
        }
    }

    /// Planned retirement: a member whose battery will not last the rest of the request hands
    /// its layers over now, between two tokens, with no failure.
    async fn maybe_retire(&mut self, run: &mut Run) -> Result<(), Interrupt> {
        let telemetry = self.telemetry();
        // Runs every token: borrow the plan, do not copy it.
        let Some(current) = self.current.as_ref() else { return Ok(()) };
        let done = run.position as u64;
        match self.controller.retirement_candidate(
            current,
            &telemetry,
            run.total_tokens(),
            done,
            self.p.retirement_horizon_tokens,
        ) {
            Ok(Some(uav)) => {
                tracing::warn!(%uav, "battery will not last the request: retiring it");
                self.recover(run, &uav, "retirement").await?;
                // It stays out of plans until it restarts (recharged, as a new process).
                let seq = self.lock().beats.get(&uav).map_or(0, |(_, hb)| hb.sequence);
                self.membership.retire(&uav, seq);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("retirement check: {e}"),
        }
        Ok(())
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
