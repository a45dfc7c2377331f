//! `shard_executor`: one per UAV, the data plane. Follows the scheduler's assignments (epochs),
//! runs its native layers and the live replica of its successor's head, streams boundary
//! snapshots, replays after a failure, heartbeats. All engine work happens on one worker thread
//! that owns the [`ShardHost`] and spins the node itself: DDS wakes it directly when an
//! activation arrives. The async side only heartbeats and handles shutdown.
use crate::dataplane::{DataPlaneError, Emit, ShardHost, SwarmPlan};
use crate::linkrate::Goodput;
use crate::ros::auth::{NodeAuth, AUTH_DIAGNOSTICS_PERIOD};
use crate::ros::diagnostics::Diagnostics;
use crate::ros::{clock, convert, names, now_stamp, shutdown_phase, NodeContext, ShutdownPhase, SPIN_TIMEOUT};
use aerokv_auth::Role;
use aerokv_codec::KvCodec;
use aerokv_engine::{models_root, Manifest, Runtime, RuntimeConfig};
use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use r2r::aerokv::msg::{Activation, Assignment, Heartbeat, KvSnapshot, RequestKv, TokenChunk};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::param_docs;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Defaults to the node's namespace.
    pub uav_id: String,
    pub heartbeat_period_s: f64,
    /// Model parts root (`models/generated`); empty = `$AEROKV_MODELS`.
    pub models_dir: String,
    pub variant: String,
    /// ONNX Runtime intra-op threads. Every executor must use the same value: replicas and
    /// replays are only bit-identical under identical settings.
    pub threads: usize,
    /// How this UAV's KV snapshots and seeds travel: "raw" or "zstd" (lossless; every receiver
    /// decodes either, so UAVs may differ). The activation codec is the swarm's (scheduler).
    pub kv_codec: String,
    /// Keystore directory (docs/security.md); empty: authentication off.
    pub keystore: String,
    /// A file holding the text of `iw dev wlan0 station dump`, refreshed about once a second (on
    /// a drone a timer writes it; over the emulated radio the emulator does): the heartbeat
    /// reports the radio's PHY rate toward this stage's next hop from it (`link_phy_bps`,
    /// docs/radio.md). Empty: off.
    pub station_dump_file: String,
    /// Which radio each host of the swarm has, `uav2=02:00:00:00:00:03, control=...`: the next
    /// hop's station in the dump. Empty: the median over the dump's stations.
    pub station_macs: String,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            uav_id: String::new(),
            heartbeat_period_s: 0.1,
            models_dir: String::new(),
            variant: "q4".into(),
            threads: 1,
            kv_codec: "raw".into(),
            keystore: String::new(),
            station_dump_file: String::new(),
            station_macs: String::new(),
        }
    }
}

enum Event {
    Assignment(Assignment),
    /// Input of `owner`'s layers (this UAV's, or its successor's for the head replica).
    Input {
        owner: String,
        msg: Activation,
    },
    Kv(KvSnapshot),
    Replay {
        failed: String,
        msg: Activation,
    },
    /// A request's last token chunk (`done`, on `/aerokv/finished`) frees its caches.
    Finished(TokenChunk),
}

impl Event {
    fn epoch(&self) -> u64 {
        match self {
            Event::Assignment(a) => a.epoch,
            Event::Input { msg, .. } | Event::Replay { msg, .. } => msg.epoch,
            Event::Kv(k) => k.epoch,
            Event::Finished(t) => t.epoch,
        }
    }
}

/// What the heartbeat reports; written by the worker.
#[derive(Default, Clone)]
struct Status {
    hb: Heartbeat,
    /// Messages that could not be used (undecodable, for another UAV, not applicable).
    ignored: u64,
    /// The host this stage's activations go to: its successor, or `control` (the gateway) for
    /// the last stage.
    next_hop: Option<String>,
}

/// Reads the station dump (`station_dump_file`) for the heartbeat's `link_phy_bps`, at most once
/// a second; the parsing and the choice of station are `crate::stations`'.
struct StationDump {
    path: std::path::PathBuf,
    macs: std::collections::BTreeMap<String, crate::stations::Mac>,
    read_at: Option<std::time::Instant>,
    phy_bps: f64,
    /// The last problem logged (each new one is logged once).
    problem: String,
}

impl StationDump {
    /// A dump older than this is no longer the radio's state (its writer stopped).
    const STALE: Duration = Duration::from_secs(5);
    const PERIOD: Duration = Duration::from_secs(1);

    fn new(p: &Params) -> anyhow::Result<Option<StationDump>> {
        if p.station_dump_file.is_empty() {
            return Ok(None);
        }
        let macs = crate::stations::parse_mac_map(&p.station_macs)?;
        Ok(Some(StationDump {
            path: p.station_dump_file.clone().into(),
            macs,
            read_at: None,
            phy_bps: 0.0,
            problem: String::new(),
        }))
    }

    /// The PHY rate toward `next_hop`, bit/s (0: unknown), re-read when a period has passed.
    fn phy_bps(&mut self, next_hop: Option<&str>) -> f64 {
        if self.read_at.is_some_and(|t| t.elapsed() < Self::PERIOD) {
            return self.phy_bps;
        }
        self.read_at = Some(std::time::Instant::now());
        let read = || -> anyhow::Result<f64> {
            let age = std::fs::metadata(&self.path)?.modified()?.elapsed().unwrap_or_default();
            anyhow::ensure!(age < Self::STALE, "not written for {:.0} s", age.as_secs_f64());
            let stations = crate::stations::parse_station_dump(&std::fs::read_to_string(&self.path)?)?;
            Ok(crate::stations::phy_rate_bps(&stations, &self.macs, next_hop))
        };
        let (rate, problem) = match read() {
            Ok(r) => (r, String::new()),
            Err(e) => (0.0, format!("{e:#}")),
        };
        if problem != self.problem {
            if problem.is_empty() {
                tracing::info!(path = %self.path.display(), phy_bps = rate, "station dump readable again");
            } else {
                tracing::warn!(path = %self.path.display(), "station dump: {problem} (link_phy_bps 0 until it is fixed)");
            }
            self.problem = problem;
        }
        if (rate - self.phy_bps).abs() > 0.0 {
            tracing::debug!(phy_bps = rate, next_hop, "radio PHY rate");
        }
        self.phy_bps = rate;
        rate
    }
}

pub async fn run(ctx: NodeContext, mut p: Params) -> anyhow::Result<()> {
    if p.uav_id.is_empty() {
        p.uav_id = ctx.namespace.clone();
    }
    anyhow::ensure!(!p.uav_id.is_empty(), "parameter `uav_id` is empty and the node has no namespace");
    anyhow::ensure!(p.heartbeat_period_s > 0.0, "parameter `heartbeat_period_s` must be positive");
    let kv_codec: KvCodec = p.kv_codec.parse().map_err(|e| anyhow::anyhow!("parameter `kv_codec`: {e}"))?;
    let root = if p.models_dir.is_empty() { models_root() } else { p.models_dir.clone().into() };
    let runtime = Runtime::init(RuntimeConfig::with_threads(p.threads))?;
    let manifest = Manifest::load_variant(&root, &p.variant)?;
    // A failover may bring any layer here: a corrupt layer file stops the executor before it serves.
    manifest.check_files(manifest.layer_files.iter().map(|f| f.name.as_str()))?;
    let host = ShardHost::new(runtime, manifest, p.uav_id.clone())?;
    let auth = NodeAuth::load(&p.keystore, Role::ShardExecutor, Some(&p.uav_id))?;
    auth.publish_diagnostics(&ctx, AUTH_DIAGNOSTICS_PERIOD)?;
    // Made before the data-plane thread spins the node (it holds the node's lock most of the time).
    let mut live = crate::ros::params::serve(&ctx, p.clone(), param_docs::SHARD_EXECUTOR, |p| {
        if p.heartbeat_period_s.is_finite() && p.heartbeat_period_s > 0.0 {
            Ok(())
        } else {
            Err(format!("heartbeat_period_s must be positive, not {}", p.heartbeat_period_s))
        }
    })?;
    let mut diagnostics = Diagnostics::new(&ctx)?;

    // Heartbeats leave through a DDS participant and writer of their own, published from this
    // async task, never from the data-plane thread that publishes KV snapshots and replays: when
    // a neighbour dies, pushes to its shared-memory port can stall the data plane's participant
    // for up to a second, and the watchdog must not mistake that for this UAV's death.
    let mut hb_node =
        r2r::Node::create(r2r::Context::create()?, &format!("shard_executor_heartbeat_{}", p.uav_id), "")?;
    let hb_pub = hb_node.create_publisher::<Heartbeat>(&names::heartbeat(&p.uav_id), names::heartbeat_qos())?;
    let status = Arc::new(Mutex::new(Status {
        hb: Heartbeat { uav_id: p.uav_id.clone(), state: "waiting".into(), ..Default::default() },
        ignored: 0,
        next_hop: None,
    }));
    let mut station_dump = StationDump::new(&p).map_err(|e| anyhow::anyhow!("parameter `station_macs`: {e}"))?;
    let (hb_auth, hb_topic) = (auth.clone(), names::heartbeat(&p.uav_id));
    // The worker wakes the heartbeat at a change of state: the scheduler resumes after a failover
    // once every stage says `ready`, and should not wait for the next period to hear it.
    let beat_now = Arc::new(tokio::sync::Notify::new());
    let mut worker = Worker {
        ctx: ctx.clone(),
        uav: p.uav_id.clone(),
        host,
        kv_codec,
        status: status.clone(),
        beat_now: beat_now.clone(),
        inbox: SelectAll::new(),
        subscribed: BTreeSet::new(),
        publishers: Publishers::default(),
        feeds_successor: false,
        early: Vec::new(),
        prepare: None,
        served: false,
        failed_epoch: 0,
        hops: Vec::new(),
        decode_steps: 0,
        preempted_in_decode: 0,
        auth,
        goodput: Goodput::default(),
        sent: Sent::default(),
    };
    worker.subscribe(names::ASSIGNMENT.to_string(), names::latched_reader(), Event::Assignment)?;
    worker.subscribe(names::kv_inbox(&p.uav_id), names::data_plane(), Event::Kv)?;
    worker.subscribe(names::FINISHED.to_string(), names::events(), Event::Finished)?;
    let worker = std::thread::Builder::new().name("data-plane".into()).spawn(move || worker.run())?;
    let mut beat = clock::interval(Duration::from_secs_f64(p.heartbeat_period_s));
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    tracing::info!(uav = %p.uav_id, variant = %p.variant, threads = p.threads, "shard executor up");
    let mut sequence = 0;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = beat_now.notified() => {
                sequence += 1;
                beat_once(&hb_pub, &status, sequence, &hb_auth, &hb_topic);
            }
            Ok(()) = live.changed() => {
                let period = live.borrow_and_update().heartbeat_period_s;
                beat = clock::interval(Duration::from_secs_f64(period));
            }
            _ = beat.tick() => {
                if let Some(dump) = station_dump.as_mut() {
                    let next_hop = status.lock().unwrap_or_else(|e| e.into_inner()).next_hop.clone();
                    let phy = dump.phy_bps(next_hop.as_deref());
                    status.lock().unwrap_or_else(|e| e.into_inner()).hb.link_phy_bps = phy;
                }
                sequence += 1;
                let (hb, ignored) = beat_once(&hb_pub, &status, sequence, &hb_auth, &hb_topic);
                diagnostics.due(|| vec![crate::diagnostics::executor(&view(&hb, ignored))]);
                // A worker that stopped because the node is stopping (a signal during start-up) is
                // no failure.
                if worker.is_finished() && !ctx.stop_requested() { anyhow::bail!("the data-plane worker stopped"); }
            }
        }
    }
    // The worker drops the engine state before the process exits (ONNX Runtime must not be torn
    // down under a live session); inside a long computation it stops after it. Waiting has no
    // timeout of its own: the runtime's shutdown deadline covers a worker that never stops.
    if !matches!(tokio::task::spawn_blocking(move || worker.join()).await, Ok(Ok(()))) {
        tracing::warn!("the data-plane worker panicked");
    }
    // From here on only DDS is torn down, starting with the heartbeat participant when this
    // function returns: a teardown cut off by the deadline is then still a clean exit.
    shutdown_phase(ShutdownPhase::ClosingDds);
    Ok(())
}

/// Publishes one signed heartbeat; returns it with the count of ignored messages.
fn beat_once(
    hb_pub: &r2r::Publisher<Heartbeat>,
    status: &Mutex<Status>,
    sequence: u64,
    auth: &NodeAuth,
    topic: &str,
) -> (Heartbeat, u64) {
    let (mut hb, ignored) = {
        let st = status.lock().unwrap_or_else(|e| e.into_inner());
        (st.hb.clone(), st.ignored)
    };
    hb.sequence = sequence;
    hb.stamp = now_stamp();
    auth.sign_heartbeat(topic, &mut hb);
    if let Err(e) = hb_pub.publish(&hb) {
        tracing::warn!("publish heartbeat: {e}");
    }
    (hb, ignored)
}

/// What `/diagnostics` shows of the data plane (from the heartbeat's figures).
fn view(hb: &Heartbeat, ignored: u64) -> crate::diagnostics::ExecutorView {
    let a = &hb.auth_counters;
    crate::diagnostics::ExecutorView {
        uav: hb.uav_id.clone(),
        state: hb.state.clone(),
        epoch: hb.epoch,
        layers: (hb.layer_start, hb.layer_end),
        replica: (hb.replica_start, hb.replica_end),
        kv_tokens: hb.kv_tokens,
        memory_bytes: hb.memory_bytes,
        stale_messages: hb.stale_messages,
        ignored_messages: ignored,
        auth_rejected: a.not_signed + a.unknown_sender + a.wrong_role + a.bad_signature + a.replayed + a.malformed,
    }
}

#[derive(Default)]
struct Publishers {
    activations: crate::ros::Publishers<Activation>,
    kv: crate::ros::Publishers<KvSnapshot>,
}

struct Worker {
    ctx: NodeContext,
    uav: String,
    host: ShardHost,
    kv_codec: KvCodec,
    status: Arc<Mutex<Status>>,
    beat_now: Arc<tokio::sync::Notify>,
    /// Every subscription's messages, drained after each spin.
    inbox: SelectAll<BoxStream<'static, Event>>,
    subscribed: BTreeSet<String>,
    publishers: Publishers,
    /// This stage's output is its successor's input: the head replica is computed from it
    /// directly instead of subscribing to it.
    feeds_successor: bool,
    /// Messages of an epoch whose assignment has not arrived yet.
    early: Vec<Event>,
    /// The plan whose failover writers are still to be made (when the worker is idle).
    prepare: Option<SwarmPlan>,
    /// An input was computed in the current epoch.
    served: bool,
    /// The epoch of an assignment that could not be applied (reported with the error).
    failed_epoch: u64,
    /// Latency of each activation hop into this stage (sender's stamp to receipt), ms.
    hops: Vec<f64>,
    /// Decode steps computed, and how often this thread lost its core during them (other threads'
    /// wakeups taking the core: zero on a drone with a core to spare).
    decode_steps: u64,
    preempted_in_decode: u64,
    auth: Arc<NodeAuth>,
    /// Goodput of the bulk data received (reported in the heartbeat; docs/radio.md).
    goodput: Goodput,
    sent: Sent,
}

/// Payload bytes sent, by kind (logged at the end: `make bench-radio` reads them).
#[derive(Default)]
struct Sent {
    decode_activation_bytes: u64,
    decode_activations: u64,
    activation_bytes: u64,
    kv_bytes: u64,
    kv_raw_bytes: u64,
    replay_bytes: u64,
}

impl Worker {
    fn run(mut self) {
        let spinner = self.ctx.spin_here();
        while !self.ctx.stop_requested() {
            spinner.spin_once(SPIN_TIMEOUT);
            while let Some(Some(ev)) = self.inbox.next().now_or_never() {
                self.handle_event(ev);
                self.update_status();
            }
            // Making a DDS entity took 0.05-0.3 s on a loaded machine: not while a replay is due
            // here, nor before the first step after a failover has gone through.
            let settled = self.host.ready() && self.host.plan().is_some_and(|p| p.resume_position == 0 || self.served);
            if settled {
                if let Some(plan) = self.prepare.take() {
                    if let Err(e) = self.prepare_failover_writers(&plan) {
                        tracing::warn!("writers for a failover: {e:#}");
                    }
                }
            }
        }
        if !self.hops.is_empty() {
            let p = crate::ros::percentiles(&self.hops);
            let u = &self.host.usage;
            let ms_per_layer_token = if u.decode_layer_tokens > 0 {
                u.decode_compute.as_secs_f64() * 1e3 / u.decode_layer_tokens as f64
            } else {
                f64::NAN
            };
            let preempted_per_step = self.preempted_in_decode as f64 / self.decode_steps.max(1) as f64;
            tracing::info!(hops = self.hops.len(), p50_ms = %p["p50"], p99_ms = %p["p99"], ms_per_layer_token, preempted_per_step, "activation hop latency");
        }
        let s = &self.sent;
        tracing::info!(
            decode_activation_bytes = s.decode_activation_bytes,
            decode_activations = s.decode_activations,
            activation_bytes = s.activation_bytes,
            kv_bytes = s.kv_bytes,
            kv_raw_bytes = s.kv_raw_bytes,
            replay_bytes = s.replay_bytes,
            link_goodput_bps = self.goodput.bps(),
            "payload bytes sent"
        );
    }

    fn handle_event(&mut self, ev: Event) {
        // Only a request's last chunk (`done`) belongs on /aerokv/finished: nothing else is checked.
        if matches!(&ev, Event::Finished(t) if !t.done) {
            return;
        }
        if !self.authentic(&ev) {
            return;
        }
        // When it is taken from DDS, whatever its epoch: a message of an epoch not applied yet
        // waits in `early`, and that wait is not the link's.
        match &ev {
            Event::Input { msg, .. } | Event::Replay { msg, .. } => {
                let sent = crate::ros::stamp_secs(&msg.stamp);
                self.goodput.observe(&msg.source, msg.payload.len(), sent, crate::ros::unix_now());
            }
            Event::Kv(m) => self.goodput.observe_paced(&m.source, crate::ros::unix_now()),
            Event::Assignment(_) | Event::Finished(_) => {}
        }
        self.handle_checked(ev);
    }

    /// An event that passed [`Self::authentic`].
    fn handle_checked(&mut self, ev: Event) {
        if let Event::Finished(t) = &ev {
            // Whatever its epoch: the request is over, its stragglers are stale from now on (only
            // `done` chunks get here: `handle_event`).
            tracing::debug!(request = t.request_id, finish = %t.finish_reason, "request finished: its caches are freed");
            self.host.finish_request(t.request_id);
            return;
        }
        let current = self.host.epoch();
        let epoch = ev.epoch();
        let is_assignment = matches!(ev, Event::Assignment(_));
        if !is_assignment {
            if epoch < current {
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                st.hb.stale_messages += 1;
                tracing::warn!(epoch, current, count = st.hb.stale_messages, "dropped a message from an older epoch");
                return;
            }
            if epoch > current {
                self.early.push(ev);
                return;
            }
        }
        let result = match ev {
            Event::Assignment(a) if a.epoch <= current.max(self.failed_epoch) => Ok(()),
            Event::Assignment(a) => {
                let epoch = a.epoch;
                let r = self.on_assignment(a);
                if r.is_err() {
                    self.failed_epoch = epoch;
                }
                r
            }
            Event::Input { owner, msg } => self.on_input(&owner, &msg),
            Event::Kv(m) if m.holder == self.uav => convert::kv_rows(&m, self.host.architecture())
                .map_err(anyhow::Error::from)
                .and_then(|rows| Ok(self.host.on_kv(&m.source, m.request_id, rows)?))
                .and_then(|emits| self.emit(emits)),
            Event::Kv(m) => {
                self.status.lock().unwrap_or_else(|e| e.into_inner()).ignored += 1;
                tracing::warn!(holder = %m.holder, source = %m.source, "KV rows for another UAV in this UAV's inbox: ignored");
                Ok(())
            }
            Event::Replay { failed, msg } => convert::unpack(&msg)
                .and_then(|chunks| Ok((chunks, convert::context_tokens(&msg, self.host.architecture())?)))
                .map_err(anyhow::Error::from)
                .and_then(|(chunks, context)| {
                    Ok(self.host.on_replay(&failed, msg.layer_boundary as usize, msg.request_id, chunks, context)?)
                })
                .and_then(|emits| self.emit(emits)),
            Event::Finished(_) => Ok(()),
        };
        if let Err(e) = result {
            let refused = e.downcast_ref::<DataPlaneError>();
            if let Some(stale) = refused.filter(|d| d.is_stale()) {
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                st.hb.stale_messages += 1;
                tracing::info!(count = st.hb.stale_messages, "{stale}");
            } else if let Some(full @ DataPlaneError::TooManyRequests { .. }) = refused {
                // The requests held are served on; this one is not started here.
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                st.ignored += 1;
                tracing::warn!(count = st.ignored, "{full}");
            } else if let Some(bad @ convert::ConvertError::ContextTokens { .. }) = e.downcast_ref() {
                // A sender's wrong figure: this message is dropped, the epoch is served on.
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                st.ignored += 1;
                tracing::warn!(count = st.ignored, "message dropped: {bad}");
            } else if is_assignment || !self.host.ready() {
                // This epoch cannot be served: say so, the scheduler re-plans.
                tracing::error!("{e:#}");
                self.status.lock().unwrap_or_else(|e| e.into_inner()).hb.state = format!("error: {e:#}");
            } else {
                self.status.lock().unwrap_or_else(|e| e.into_inner()).ignored += 1;
                tracing::warn!("message ignored: {e:#}");
            }
        }
    }

    /// Signed by whom it says (dropped and counted otherwise; docs/security.md). Messages of an
    /// epoch not applied yet are checked once, when they arrive.
    fn authentic(&self, ev: &Event) -> bool {
        match ev {
            Event::Assignment(a) => self.auth.accept_assignment(a),
            Event::Input { owner, msg } => self.auth.accept_activation(&names::stage_input(owner), msg),
            Event::Replay { failed, msg } => self.auth.accept_activation(&names::replay(failed), msg),
            Event::Kv(k) => self.auth.accept_kv(&names::kv_inbox(&self.uav), k),
            Event::Finished(t) => self.auth.accept_finished(t),
        }
    }

    fn on_assignment(&mut self, a: Assignment) -> anyhow::Result<()> {
        let plan = convert::plan(&a);
        self.host.set_activation_codec(convert::assignment_codec(&a)?);
        tracing::info!(epoch = a.epoch, reason = %a.reason, resume = a.resume_position, stage = ?plan.stage(&self.uav), "new assignment");
        self.status.lock().unwrap_or_else(|e| e.into_inner()).hb.state = "loading".into();
        // A plan that came before the previous one settled: its failover may be this one, and
        // this UAV may be the one to get a replay (transient local: subscribing now still gets it).
        if let Some(previous) = self.prepare.take() {
            self.prepare_failover_writers(&previous)?;
        }
        // Subscribe before anything is sent in this epoch (publishers keep a transient-local history).
        self.feeds_successor = false;
        // Where this stage's activations go: the radio's rate toward it is the heartbeat's.
        let next_hop = plan.stage(&self.uav).map(|me| {
            let succ = plan.succ(&self.uav).filter(|s| s.uav != self.uav).map(|s| s.uav.as_str());
            crate::stations::next_hop(me.start + me.len, plan.num_layers, succ, crate::radio::scenario::CONTROL_HOST)
        });
        self.status.lock().unwrap_or_else(|e| e.into_inner()).next_hop = next_hop;
        if let Some(me) = plan.stage(&self.uav).cloned() {
            self.ensure_input(&me.uav)?;
            if let Some(succ) = plan.succ(&self.uav).cloned().filter(|s| s.uav != self.uav) {
                // The last stage's output goes to the gateway; its successor's input comes from there.
                self.feeds_successor = me.start + me.len < plan.num_layers && succ.start == me.start + me.len;
                if !self.feeds_successor {
                    self.ensure_input(&succ.uav)?;
                }
            }
            // If the successor fails, its own successor takes over its layers and this stage's
            // output goes there: a publisher made now is matched before a failover needs it
            // (over a radio, matching a new one cost the first step after recovery ~2 s).
            if let Some(next) = plan.succ(&self.uav).and_then(|s| plan.succ(&s.uav)).map(|s| s.uav.clone()) {
                if next != self.uav && me.start + me.len < plan.num_layers {
                    self.activation_pub(&names::stage_input(&next))?;
                }
            }
        }
        let gone: Vec<String> = self
            .host
            .plan()
            .map(|old| old.stages.iter().filter(|s| plan.stage(&s.uav).is_none()).map(|s| s.uav.clone()).collect())
            .unwrap_or_default();
        let emits = self.host.apply_plan(plan.clone())?;
        self.emit(emits)?;
        // Nothing more for a UAV that left the plan: what its writers still queue (a KV snapshot
        // of ~1 MB, paced over a second) would take airtime, every frame retried by the radio
        // for a UAV that may be out of range, ahead of the frames for the UAVs still in range.
        for uav in gone {
            self.publishers.kv.remove(&self.ctx, &names::kv_inbox(&uav));
            self.publishers.activations.remove(&self.ctx, &names::stage_input(&uav));
        }
        self.prepare = Some(plan);
        self.served = false;
        // Messages that arrived before their assignment.
        let early = std::mem::take(&mut self.early);
        for ev in early {
            self.handle_checked(ev);
        }
        Ok(())
    }

    /// The subscription and writers a failover of this plan needs, made when the worker has
    /// nothing else to do, so that they are matched before the next failure: the predecessor's
    /// replay, the replay of the successor's tail inputs (made at the failure, it waited up to
    /// 0.4 s for its creation and match over a radio) and the seed for the predecessor's
    /// predecessor (this UAV's predecessor if its predecessor fails).
    fn prepare_failover_writers(&mut self, plan: &SwarmPlan) -> anyhow::Result<()> {
        if plan.stage(&self.uav).is_none() {
            return Ok(());
        }
        // The replay of the predecessor's tail, should it fail (a transient-local topic: a
        // subscription made a little after this plan still gets it).
        if let Some(pred) = plan.pred(&self.uav).map(|s| s.uav.clone()).filter(|s| *s != self.uav) {
            self.ensure_replay(&pred)?;
        }
        if let Some(succ) = plan.succ(&self.uav).filter(|s| s.uav != self.uav) {
            if plan.tail_input_from_pred(succ).is_some() {
                self.activation_pub(&names::replay(&succ.uav))?;
            }
        }
        if let Some(pp) = plan.pred(&self.uav).and_then(|p| plan.pred(&p.uav)).map(|s| s.uav.clone()) {
            if pp != self.uav {
                self.publishers.kv.get(&self.ctx, &names::kv_inbox(&pp), names::data_plane())?;
            }
        }
        Ok(())
    }

    fn on_input(&mut self, owner: &str, msg: &Activation) -> anyhow::Result<()> {
        let h = convert::encoded(msg)?;
        let context = convert::context_tokens(msg, self.host.architecture())?;
        let (req, boundary, pos) = (msg.request_id, msg.layer_boundary as usize, msg.position as usize);
        if owner == self.uav {
            self.hops.push(crate::ros::hop_ms(&msg.stamp));
            let before = crate::os::thread_preemptions();
            let output = self.host.on_input(req, boundary, pos, &h, context)?;
            if h.rows() == 1 {
                self.decode_steps += 1;
                self.preempted_in_decode += crate::os::thread_preemptions().saturating_sub(before);
            }
            self.emit(output)?;
            self.served = true;
            let snapshot = self.host.snapshot_due()?;
            self.emit(snapshot)
        } else {
            Ok(self.host.on_successor_input(req, boundary, pos, &h, context)?)
        }
    }

    fn emit(&mut self, emits: Vec<Emit>) -> anyhow::Result<()> {
        let epoch = self.host.epoch();
        for e in emits {
            match e {
                Emit::Activation { to, boundary, request_id, position, hidden, context_tokens } => {
                    let topic = to.as_deref().map_or(names::GATEWAY_INPUT.to_string(), names::stage_input);
                    let mut msg = convert::activation(epoch, request_id, 0, position, boundary, &self.uav, &hidden);
                    msg.context_tokens = context_tokens as u32;
                    self.auth.sign_activation(&topic, &mut msg);
                    self.count_tx(msg.payload.len());
                    self.sent.activation_bytes += msg.payload.len() as u64;
                    if hidden.rows() == 1 {
                        self.sent.decode_activation_bytes += msg.payload.len() as u64;
                        self.sent.decode_activations += 1;
                    }
                    self.activation_pub(&topic)?.publish(&msg)?;
                    if self.feeds_successor && to.is_some() {
                        self.host.on_successor_input(request_id, boundary, position, &hidden, context_tokens)?;
                    }
                }
                Emit::Kv { holder, request_id, rows } => {
                    let mut msg = convert::kv_snapshot(epoch, request_id, &self.uav, &holder, &rows, self.kv_codec)?;
                    let topic = names::kv_inbox(&holder);
                    self.auth.sign_kv(&topic, &mut msg);
                    tracing::debug!(%holder, layers = ?(msg.layer_start, msg.layer_end), tokens = ?(msg.token_start, msg.token_end), codec = %self.kv_codec, bytes = msg.payload.len(), raw_bytes = rows.byte_len(), "kv rows sent");
                    self.count_tx(msg.payload.len());
                    self.sent.kv_bytes += msg.payload.len() as u64;
                    self.sent.kv_raw_bytes += rows.byte_len() as u64;
                    self.publishers.kv.get(&self.ctx, &topic, names::data_plane())?.publish(&msg)?;
                }
                Emit::Replay { failed, to, boundary, request_id, chunks, context_tokens } => {
                    let mut msg = convert::packed_activation(epoch, request_id, boundary, &self.uav, &chunks)?;
                    msg.context_tokens = context_tokens as u32;
                    let topic = names::replay(&failed);
                    self.auth.sign_activation(&topic, &mut msg);
                    let (tokens, bytes) = (msg.token_count, msg.payload.len());
                    tracing::info!(%failed, %to, chunks = chunks.len(), tokens, bytes, "replay of the tail's inputs sent");
                    self.count_tx(msg.payload.len());
                    self.sent.replay_bytes += msg.payload.len() as u64;
                    self.activation_pub(&topic)?.publish(&msg)?;
                }
            }
        }
        Ok(())
    }

    fn activation_pub(&mut self, topic: &str) -> anyhow::Result<&r2r::Publisher<Activation>> {
        self.publishers.activations.get(&self.ctx, topic, names::activation_qos(topic))
    }

    fn count_tx(&self, bytes: usize) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).hb.tx_bytes_total += bytes as u64;
    }

    /// Adds a subscription's messages to the inbox (once per topic).
    fn subscribe<T, F>(&mut self, topic: String, qos: r2r::QosProfile, wrap: F) -> anyhow::Result<()>
    where
        T: r2r::WrappedTypesupport + Send + 'static,
        F: Fn(T) -> Event + Send + 'static,
    {
        if !self.subscribed.insert(topic.clone()) {
            return Ok(());
        }
        let stream = self.ctx.lock().subscribe::<T>(&topic, qos)?;
        self.inbox.push(stream.map(wrap).boxed());
        Ok(())
    }

    fn ensure_input(&mut self, owner: &str) -> anyhow::Result<()> {
        let o = owner.to_string();
        self.subscribe(names::stage_input(owner), names::data_plane(), move |msg| Event::Input {
            owner: o.clone(),
            msg,
        })
    }
    fn ensure_replay(&mut self, failed: &str) -> anyhow::Result<()> {
        let f = failed.to_string();
        self.subscribe(names::replay(failed), names::replay_qos(), move |msg| Event::Replay { failed: f.clone(), msg })
    }

    fn update_status(&self) {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let hb = &mut st.hb;
        hb.epoch = self.host.epoch().max(self.failed_epoch);
        if let Some(me) = self.host.my_stage() {
            hb.layer_start = me.start as u32;
            hb.layer_end = (me.start + me.len) as u32;
        } else {
            hb.layer_start = 0;
            hb.layer_end = 0;
        }
        let replica = self.host.replica_layers();
        hb.replica_start = replica.first().copied().unwrap_or(0) as u32;
        hb.replica_end = replica.last().map_or(hb.replica_start as usize, |l| l + 1) as u32;
        // The top-level figures are the latest step's request (the standby scheduler reads them);
        // `kv` has every request held.
        let recent = self.host.request_id();
        hb.kv_tokens = self.host.kv_tokens(recent) as u32;
        hb.request_id = recent;
        hb.pred_snapshot_tokens = self.host.pred_snapshot_tokens(recent) as u32;
        hb.compute_ms_per_layer = self.host.usage.decode_ms_per_layer;
        hb.compute_s_total = self.host.usage.compute.as_secs_f64();
        hb.link_goodput_bps = self.goodput.bps();
        let memory = self.host.memory();
        hb.memory_bytes = memory.total();
        hb.weight_bytes = memory.weight_bytes;
        hb.kv = memory
            .requests
            .iter()
            .map(|r| RequestKv {
                request_id: r.request_id,
                kv_tokens: r.kv_tokens as u32,
                kv_bytes: r.kv_bytes,
                pred_snapshot_tokens: r.pred_snapshot_tokens as u32,
            })
            .collect();
        hb.auth_counters = self.auth.counters();
        let before = std::mem::take(&mut hb.state);
        hb.state = if before.starts_with("error") {
            before.clone()
        } else if self.host.plan().is_none() {
            "waiting".into()
        } else if self.host.ready() {
            "ready".into()
        } else {
            "recovering".into()
        };
        if hb.state != before {
            tracing::info!(epoch = hb.epoch, state = %hb.state, replica_pending = self.host.replica_pending(), "state");
            self.beat_now.notify_one();
        }
    }
}
