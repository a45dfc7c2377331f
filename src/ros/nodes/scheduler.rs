//! `scheduler`: one per swarm, the control plane and the gateway. Tokenizes, embeds, applies the
//! LM head and samples; plans layouts and protection with the planning core ([`Controller`]) from
//! live battery health and measured layer latency; publishes assignments (epochs); serves
//! `/aerokv/generate` (an action and a service over one queue: [`Desk`]) and streams
//! `/aerokv/tokens`; recovers from failures (failover, or an exact
//! restart when the state to fail over is not there) and retires UAVs before their batteries die.
use super::discovery::uavs_with_topic;
use super::generate_api::Desk;
use crate::control::{self, Airframe, Controller, Heard, Membership, ModelSize, Planned, Telemetry, TelemetryKind};
use crate::dataplane::{gateway_steps, step_at, SwarmPlan};
use crate::detector::FailureReason;
use crate::requests::{Answer, Finish, Job};
use crate::ros::auth::{verified, NodeAuth, SignedPublisher, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::{convert, hop_ms, names, percentiles, stamp_secs, unix_now, NodeContext, Publishers};
use aerokv_auth::Role;
use aerokv_codec::{ActivationCodec, Encoded};
use aerokv_engine::{
    models_root, Detokenizer, Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Sampler, Sampling, Shard,
};
use aerokv_plan::{Channel, PlanConfig, PowerModel};
use futures::StreamExt;
use r2r::aerokv::msg::{Activation, Assignment, BatteryHealth, FailureEvent, Heartbeat, PromptProgress, TokenChunk};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most steps the gateway has sent without their output (one per stage keeps a prompt's chunks
/// flowing through the stages as a pipeline). Well below the data plane's DDS history (8) and
/// r2r's subscription queue (10), which drop what overflows.
const MAX_STEPS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone, Deserialize)]
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
    /// Keystore directory (docs/security.md); empty: authentication off.
    pub keystore: String,
    /// Requests that may wait for the swarm (a request that arrives while it is idle waits too,
    /// for an instant); more are refused (docs/generate-api.md).
    pub max_queue: usize,
    /// Finished answers kept for clients that resume them by request id.
    pub finished_kept: usize,
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
            keystore: String::new(),
            max_queue: 16,
            finished_kept: 32,
        }
    }
}

impl Params {
    fn codec(&self) -> anyhow::Result<ActivationCodec> {
        self.activation_codec.parse().map_err(|e| anyhow::anyhow!("parameter `activation_codec`: {e}"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.codec()?;
        anyhow::ensure!(self.expected_uavs >= 1, "parameter `expected_uavs` must be at least 1");
        anyhow::ensure!(self.threads >= 1, "parameter `threads` must be at least 1");
        anyhow::ensure!(self.max_tokens_limit >= 1, "parameter `max_tokens_limit` must be at least 1");
        anyhow::ensure!(self.max_prompt_tokens >= 1, "parameter `max_prompt_tokens` must be at least 1");
        anyhow::ensure!(self.max_queue >= 1, "parameter `max_queue` must be at least 1");
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
}

/// Why a generation could not go on.
#[derive(Debug, thiserror::Error)]
enum Interrupt {
    #[error("{0} failed")]
    Failed(String),
    #[error("{0}")]
    Fatal(String),
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
}

struct Scheduler {
    ctx: NodeContext,
    p: Params,
    codec: ActivationCodec,
    gateway: Gateway,
    controller: Controller,
    own_layer_latency_s: f64,
    max_context: usize,
    live: Arc<Mutex<Live>>,
    watched: BTreeSet<String>,
    /// Who may be planned: UAVs declared failed or retired are kept out until they are back.
    membership: Membership,
    assign_pub: SignedPublisher<Assignment>,
    auth: Arc<NodeAuth>,
    token_pub: r2r::Publisher<TokenChunk>,
    progress_pub: r2r::Publisher<PromptProgress>,
    /// Stage inputs, and replays of the embeddings a stage around the gateway was fed; by topic.
    activation_pubs: Publishers<Activation>,
    /// The last stage's outputs, read straight from the subscription (not through a draining
    /// task like the other topics): at most `MAX_STEPS_IN_FLIGHT` steps are in flight, so r2r's
    /// queue of 10 never fills, and every token saves a thread hand-off.
    outputs: futures::stream::BoxStream<'static, Activation>,
    failures: mpsc::UnboundedReceiver<FailureEvent>,
    /// The requests: queued, running (their goals' feedback), finished.
    desk: Arc<Desk>,
    current: Option<Planned>,
    epoch: u64,
    stale_dropped: u64,
    /// Latency of the last hop (last stage -> gateway) of every step, ms.
    hops: Vec<f64>,
}

pub async fn run(ctx: NodeContext, p: Params) -> anyhow::Result<()> {
    p.validate()?;
    let root = if p.models_dir.is_empty() { models_root() } else { p.models_dir.clone().into() };
    let runtime = Runtime::init(RuntimeConfig::with_threads(p.threads))?;
    let manifest = Manifest::load_variant(&root, &p.variant)?;
    let gateway = Gateway::load(&runtime, &manifest)?;
    let own_layer_latency_s = measure_layer_latency(&runtime, &manifest)?;
    let arch = &manifest.architecture;
    let model = ModelSize {
        num_layers: arch.layers as u32,
        weight_bytes_per_layer: manifest.interval_memory(0, arch.layers)?.weight_bytes as f64 / arch.layers as f64,
        kv_bytes_per_token_layer: arch.kv_bytes_per_token_per_layer() as f64,
    };
    let config = PlanConfig {
        deadline_s: p.recovery_deadline_s,
        weight_load_bps: p.weight_load_bps,
        snapshot_periods: p.snapshot_periods.clone(),
        power: PowerModel::default(),
        recoverable_memory: true,
        lifetime_target_factor: (p.lifetime_target_factor > 0.0).then_some(p.lifetime_target_factor),
        channel: p.shared_channel.then(|| Channel { frame_loss: p.frame_loss, ..Channel::default() }),
    };
    let airframe = Airframe {
        flight_power_w: p.flight_power_w,
        compute_power_w: p.inference_power_w,
        tx_power_w: p.tx_power_w,
        link_bps: p.link_rate_bps,
        memory_bytes: p.memory_budget_bytes,
    };
    tracing::info!(variant = %p.variant, layers = arch.layers, layer_ms = own_layer_latency_s * 1e3, "gateway loaded");

    let outputs = ctx.lock().subscribe::<Activation>(names::GATEWAY_INPUT, names::data_plane())?.boxed();
    let auth = NodeAuth::load(&p.keystore, Role::Scheduler, None)?;
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    let failures = verified(ctx.subscribe(names::FAILURES, names::events())?, auth.clone(), NodeAuth::accept_failure);
    let limits = crate::requests::Limits {
        max_tokens: p.max_tokens_limit,
        max_prompt_tokens: p.max_prompt_tokens,
        max_context: manifest.architecture.max_context,
        max_queue: p.max_queue,
        finished_kept: p.finished_kept,
    };
    let desk = Desk::start(&ctx, gateway.encoder(), limits)?;
    let (member_timeout, rejoin_after) =
        (Duration::from_secs_f64(p.member_timeout_s), Duration::from_secs_f64(p.rejoin_after_s));
    let mut s = Scheduler {
        assign_pub: SignedPublisher::new(
            ctx.publisher(names::ASSIGNMENT, names::latched())?,
            auth.clone(),
            NodeAuth::sign_assignment,
        ),
        auth,
        token_pub: ctx.publisher::<TokenChunk>(names::TOKENS, names::events())?,
        progress_pub: ctx.publisher::<PromptProgress>(names::PROGRESS, names::events())?,
        ctx: ctx.clone(),
        codec: p.codec()?,
        p,
        gateway,
        controller: Controller::new(config, airframe, model),
        own_layer_latency_s,
        max_context: manifest.architecture.max_context,
        live: Arc::default(),
        watched: BTreeSet::new(),
        membership: Membership::new(member_timeout, rejoin_after),
        activation_pubs: Publishers::default(),
        outputs,
        failures,
        desk: desk.clone(),
        current: None,
        epoch: 0,
        stale_dropped: 0,
        hops: Vec::new(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(s.p.replan_period_s.min(0.25)));
    let mut last_replan = Instant::now();
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => { desk.shutdown(); return Ok(()); }
            job = desk.next() => {
                let id = job.request_id;
                let answer = tokio::select! {
                    a = s.serve(job) => a,
                    // Nobody wants it any more: no further steps (the executors' KV of it is
                    // dropped by the next request's plan).
                    _ = desk.canceled(id) => s.canceled(id),
                    _ = &mut shutdown => { desk.shutdown(); return Ok(()); }
                };
                desk.finish(&answer);
            }
            Some(ev) = s.failures.recv() => { s.note_failure(&ev); }
            Some(msg) = s.outputs.next() => { s.stale_dropped += 1; tracing::debug!(epoch = msg.epoch, "activation outside a request dropped"); }
            _ = tick.tick() => {
                s.discover()?;
                if last_replan.elapsed().as_secs_f64() >= s.p.replan_period_s {
                    last_replan = Instant::now();
                    if let Err(e) = s.idle_replan() {
                        tracing::warn!("idle planning: {e:#}");
                    }
                }
            }
        }
    }
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
            tokio::spawn(async move {
                while let Some(hb) = beats.recv().await {
                    let now = Instant::now();
                    let checked = control::validate_heartbeat(&convert::heartbeat_fields(&hb), &u, layers);
                    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                    if !live.rejects.passed(&u, TelemetryKind::Heartbeat, checked) {
                        continue;
                    }
                    let mut heard = Heard::next(live.heard.get(&u).copied(), hb.sequence, now, member_timeout);
                    heard.battery =
                        live.battery.get(&u).is_some_and(|b| !control::is_depleted(&convert::battery_health_fields(b)));
                    live.heard.insert(u.clone(), heard);
                    live.beats.insert(u.clone(), (now, hb));
                }
            });
            let (live, u) = (self.live.clone(), uav.clone());
            tokio::spawn(async move {
                while let Some(b) = battery.recv().await {
                    let checked = control::validate_battery_health(&convert::battery_health_fields(&b), &u);
                    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
                    if live.rejects.passed(&u, TelemetryKind::BatteryHealth, checked) {
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
        self.membership.members(&heard, Instant::now())
    }

    fn telemetry(&self) -> BTreeMap<String, Telemetry> {
        let live = self.lock();
        live.battery
            .iter()
            .map(|(uav, b)| {
                // One figure measured at start-up for every UAV of this (homogeneous) swarm: the
                // executors' per-token figures are too noisy to plan on without churning layouts.
                let t = Telemetry {
                    energy_j: b.energy_j,
                    capacity_j: b.capacity_j,
                    layer_latency_s: self.own_layer_latency_s,
                };
                (uav.clone(), t)
            })
            .collect()
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
        let (age, sent) =
            self.lock().beats.get(&ev.uav_id).map_or((f64::INFINITY, f64::NEG_INFINITY), |(t, hb)| {
                (t.elapsed().as_secs_f64(), stamp_secs(&hb.stamp))
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
        self.membership.declare_failed(&ev.uav_id, Instant::now());
        tracing::warn!(uav = %ev.uav_id, reason = %ev.reason, "failure noted");
        true
    }

    fn publish(&mut self, planned: Planned, reason: &str) -> anyhow::Result<()> {
        let msg = convert::assignment(&planned.plan, &self.p.variant, reason, self.codec);
        let layout: Vec<String> =
            planned.plan.stages.iter().map(|s| format!("{}[{}+{} K{} T{}]", s.uav, s.start, s.len, s.k, s.t)).collect();
        tracing::info!(epoch = planned.plan.epoch, reason, resume = planned.plan.resume_position, layout = %layout.join(" "), min_expected_tokens = planned.protection.min_expected_tokens, "assignment published");
        self.assign_pub.publish(&msg)?;
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
        let members = self.members();
        if members.len() < self.p.expected_uavs && self.current.is_none() {
            return Ok(());
        }
        if members.is_empty() {
            return Ok(());
        }
        let telemetry = self.telemetry();
        let candidate = self.controller.initial(&members, &telemetry, self.p.plan_tokens, self.epoch + 1, 0)?;
        let changed = self.current.as_ref().is_none_or(|c| c.plan.stages != candidate.plan.stages);
        if changed {
            self.epoch += 1;
            let reason = if self.current.is_none() { "initial" } else { "battery or membership change" };
            self.publish(candidate, reason)?;
        }
        Ok(())
    }

    /// Serves one generation request (checked by [`crate::requests::check`]).
    async fn serve(&mut self, job: Job) -> Answer {
        let members = self.members();
        if members.is_empty() {
            let why = crate::requests::Refusal::NoUav;
            tracing::warn!("request refused: {why}");
            return Answer::refused(job.request_id, &why);
        }
        let mut run = Run::new(job.request_id, job.prompt_ids, job.max_tokens, job.sampling);
        run.ignore_eos = job.ignore_eos;
        let result = self.generate(&mut run).await;
        let finish = result.as_ref().map_or(Finish::Error, |&f| f);
        // The done chunk carries what the detokenizer still held (an incomplete character).
        let rest = run.detok.finish(&self.gateway).ok().flatten().unwrap_or_default();
        self.publish_done(run.request_id, run.tokens.len(), rest, finish);
        let text = self.gateway.decode(&run.tokens).unwrap_or_default();
        let decode_s = run.first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let tokens_per_s =
            if run.tokens.len() > 1 && decode_s > 0.0 { (run.tokens.len() - 1) as f64 / decode_s } else { 0.0 };
        let stats = serde_json::json!({
            "request_id": run.request_id,
            "activation_codec": self.codec.name(),
            "epochs": run.epochs,
            "incidents": run.incidents,
            "stale_dropped": self.stale_dropped,
            "prefill_s": run.prefill_s,
            "gateway_hop_ms": percentiles(&std::mem::take(&mut self.hops)),
            "steps": step_stats(&run.steps),
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
        let started = Instant::now();
        // A fresh plan for this request from current battery health and membership.
        self.plan_restart(run, "request").await?;
        run.started = true;
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
            let received_at = Instant::now();
            // Decode steps only, not the prompt's.
            let round_trip_ms = run
                .sent_at
                .filter(|_| run.position >= run.prompt_ids.len())
                .map(|t| (received_at - t).as_secs_f64() * 1e3);
            let logits = self.gateway.logits(&hidden).map_err(|e| Interrupt::Fatal(format!("LM head: {e}")))?;
            let id = run.sampler.sample(&logits).map_err(|e| Interrupt::Fatal(format!("sampling: {e}")))?;
            if run.first_token_at.is_none() {
                run.first_token_at = Some(Instant::now());
                run.prefill_s = started.elapsed().as_secs_f64();
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
                run.steps.push(Step {
                    position: run.position,
                    round_trip_ms,
                    gateway_ms: received_at.elapsed().as_secs_f64() * 1e3,
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
        let msg =
            PromptProgress { request_id: run.request_id, done: done as u32, total: total as u32, epoch: self.epoch };
        if let Err(e) = self.progress_pub.publish(&msg) {
            tracing::warn!("publish prompt progress: {e}");
        }
    }

    fn stream_token(&mut self, run: &mut Run, index: usize, id: u32) {
        let text = run.detok.push(&self.gateway, id).ok().flatten().unwrap_or_default();
        // Its goals' feedback first; a request nobody wants any more streams nothing.
        if !self.desk.token(run.request_id, id, &text) {
            return;
        }
        let chunk = TokenChunk {
            request_id: run.request_id,
            index: index as u32,
            token_id: id as i32,
            text,
            done: false,
            finish_reason: String::new(),
            epoch: self.epoch,
        };
        if let Err(e) = self.token_pub.publish(&chunk) {
            tracing::warn!("publish token: {e}");
        }
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
            let msg = convert::activation(epoch, run.request_id, 0, run.sent_until, 0, "gateway", &hidden);
            let publisher = self.activation_pub(&topic).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            publisher.publish(&msg).map_err(|e| Interrupt::Fatal(format!("publish to {topic}: {e}")))?;
            run.sent_until += hidden.rows();
            run.sent_at = Some(Instant::now());
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
        let msg = convert::packed_activation(self.epoch, run.request_id, 0, "gateway", &chunks)
            .map_err(|e| Interrupt::Fatal(format!("replay of {failed}'s embeddings: {e}")))?;
        let topic = names::replay(failed);
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
        let deadline = tokio::time::sleep(Duration::from_secs_f64(self.p.step_timeout_s));
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
                    return Err(Interrupt::Fatal(format!("no output for position {} within {} s and no failure declared", run.position, self.p.step_timeout_s)));
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
        let telemetry = self.telemetry();
        let snapshot = self.snapshot_held_after(&current.plan, failed, run.request_id);
        let planned = self
            .controller
            .failover(
                &current,
                failed,
                &telemetry,
                run.total_tokens(),
                run.position,
                snapshot,
                self.epoch + 1,
                graceful,
            )
            .map_err(|e| e.to_string());
        let needs_embeddings = current.plan.stage(failed).is_some_and(|s| current.plan.tail_needs_gateway_replay(s));
        let mut incident = Incident {
            uav: failed.into(),
            reason: reason.into(),
            token: run.tokens.len(),
            mode: if graceful { "retirement" } else { "failover" }.into(),
            resume_position: run.position,
            replay_from: 0,
            epoch: self.epoch + 1,
            detected_at,
            recovered_at: 0.0,
            next_token_at: 0.0,
            planned_recovery_s: 0.0,
            why: String::new(),
        };
        let why = match planned {
            Ok(planned) if planned.plan.resume_position > 0 => {
                incident.planned_recovery_s = planned.protection.worst_recovery_s;
                incident.replay_from = planned.plan.replay_from;
                self.epoch += 1;
                self.publish(planned, &format!("{reason} of {failed}")).map_err(|e| Interrupt::Fatal(e.to_string()))?;
                run.epochs.push(self.epoch);
                if needs_embeddings {
                    self.replay_embeddings(run, failed, incident.replay_from)?;
                }
                match self.wait_ready().await {
                    Ok(()) => None,
                    Err(Interrupt::Failed(other)) => Some(format!("another failure during recovery: {other}")),
                    Err(Interrupt::Fatal(why)) => Some(format!("failover did not complete: {why}")),
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
    fn snapshot_held_after(&self, plan: &SwarmPlan, failed: &str, request_id: u64) -> Option<usize> {
        let succ = plan.succ(failed).filter(|s| s.uav != failed)?;
        let live = self.lock();
        let (_, hb) = live.beats.get(&succ.uav)?;
        (hb.epoch == plan.epoch && hb.request_id == request_id).then_some(hb.pred_snapshot_tokens as usize)
    }

    /// A fresh plan over the members, from position 0 (the start of a request, or a restart).
    async fn plan_restart(&mut self, run: &mut Run, reason: &str) -> Result<(), Interrupt> {
        // A DDS stall after a drone is killed can silence live drones for a second (false failure
        // declarations); they count as members again once their heartbeats resume. Give them that
        // long before the request fails for want of drones.
        let grace = Instant::now() + Duration::from_secs_f64(2.0 * self.p.member_timeout_s);
        loop {
            let members = self.members();
            if members.is_empty() {
                if Instant::now() < grace {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                return Err(Interrupt::Fatal("no UAV left to serve the request".into()));
            }
            let telemetry = self.telemetry();
            let planned = self
                .controller
                .initial(&members, &telemetry, run.total_tokens(), self.epoch + 1, run.request_id)
                .map_err(|e| Interrupt::Fatal(format!("the swarm cannot serve this request: {e}")))?;
            self.epoch += 1;
            self.publish(planned, reason).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            run.epochs.push(self.epoch);
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(Interrupt::Failed(uav)) => {
                    tracing::warn!(%uav, "failed while the plan was applied: planning again")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every stage of the current plan runs it (heartbeat epoch and state "ready").
    async fn wait_ready(&mut self) -> Result<(), Interrupt> {
        let plan = self.current.as_ref().map(|c| c.plan.clone()).ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
        let deadline = Instant::now() + Duration::from_secs_f64(self.p.ready_timeout_s);
        let mut poll = tokio::time::interval(Duration::from_millis(5));
        loop {
            tokio::select! {
                Some(ev) = self.failures.recv() => {
                    if self.note_failure(&ev) && plan.stage(&ev.uav_id).is_some() {
                        return Err(Interrupt::Failed(ev.uav_id));
                    }
                }
                _ = poll.tick() => {
                    let live = self.lock();
                    let mut waiting = Vec::new();
                    for s in &plan.stages {
                        match live.beats.get(&s.uav) {
                            Some((_, hb)) if hb.epoch == plan.epoch && hb.state.starts_with("error") => {
                                return Err(Interrupt::Fatal(format!("{} cannot apply epoch {}: {}", s.uav, plan.epoch, hb.state)));
                            }
                            Some((_, hb)) if hb.epoch >= plan.epoch && hb.state == "ready" => {}
                            _ => waiting.push(s.uav.clone()),
                        }
                    }
                    drop(live);
                    if waiting.is_empty() {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(Interrupt::Fatal(format!("{} not ready with epoch {} after {} s", waiting.join(", "), plan.epoch, self.p.ready_timeout_s)));
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
