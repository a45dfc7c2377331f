//! Authentication at the nodes' publish and receive points (docs/security.md): the canonical
//! bytes of the signed messages, signing before publishing, verifying on receipt (dropping and
//! counting what fails), and the counters on `/diagnostics`.
use crate::ros::names::{self, GATEWAY_SOURCE};
use crate::ros::{now_stamp, NodeContext};
use aerokv_auth::{Auth, Claim, Counts, Encoder, Keystore, NodeId, Rejection, Role, Roster, Signer, Verifier};
use anyhow::Context;
use r2r::aerokv::msg::{
    self as m, Activation, Assignment, AuthCounters, BatteryHealth, FailureEvent, Heartbeat, KvSnapshot, PlanInputs,
    PromptProgress, RequestSpec, TokenChunk,
};
use r2r::builtin_interfaces::msg::Time;
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// How often a node publishes its authentication counters on `/diagnostics`.
pub const AUTH_DIAGNOSTICS_PERIOD: Duration = Duration::from_secs(1);

/// A node's keys and roster; `off` when the node runs without a keystore.
pub struct NodeAuth {
    id: String,
    signer: Option<Signer>,
    verifier: Option<Mutex<Verifier>>,
}

impl NodeAuth {
    /// From the `keystore` parameter: a directory, or empty to run without authentication (said
    /// loudly: then anyone on the network can plan the swarm or declare its drones dead).
    pub fn load(keystore: &str, role: Role, uav: Option<&str>) -> anyhow::Result<Arc<Self>> {
        Self::load_as(keystore, NodeId::of(role, uav)?)
    }

    /// [`Self::load`] for a node whose identity is not its role's (the standby scheduler).
    pub fn load_as(keystore: &str, id: NodeId) -> anyhow::Result<Arc<Self>> {
        if keystore.is_empty() {
            tracing::warn!(identity = %id, "AUTHENTICATION OFF: parameter `keystore` is empty; unsigned messages (plans, failure declarations, telemetry, activations) are accepted from anyone (docs/security.md)");
            return Ok(Arc::new(NodeAuth { id: id.to_string(), signer: None, verifier: None }));
        }
        let ks = Keystore::open(keystore.as_ref()).context("parameter `keystore`")?;
        let key = ks.signing_key(&id).context("parameter `keystore`")?;
        tracing::info!(identity = %id, members = ks.roster.members().count(), "authentication on");
        Ok(Arc::new(NodeAuth {
            id: id.to_string(),
            signer: Some(Signer::new(id, key)),
            verifier: Some(Mutex::new(Verifier::new(ks.roster))),
        }))
    }

    /// A member of no role that only verifies (a client reading the token stream): the roster of
    /// `keystore`, no key.
    pub fn verifier(keystore: &str) -> anyhow::Result<Arc<Self>> {
        let ks = Keystore::open(keystore.as_ref()).context("the swarm's keystore")?;
        Ok(Arc::new(NodeAuth {
            id: "client".into(),
            signer: None,
            verifier: Some(Mutex::new(Verifier::new(ks.roster))),
        }))
    }

    /// Accepted and dropped messages so far: (accepted, dropped per reason, by name).
    pub fn tally(&self) -> (u64, Vec<(&'static str, u64)>) {
        let c = self.counts();
        (c.accepted, Rejection::ALL.iter().map(|&w| (w.name(), c.rejected(w))).filter(|(_, n)| *n > 0).collect())
    }

    fn sign(&self, topic: &str, body: impl FnOnce(&mut Encoder)) -> m::Auth {
        let Some(signer) = &self.signer else { return m::Auth::default() };
        let Auth { sender, counter, signature } = signer.sign(topic, body);
        m::Auth { sender, counter, signature }
    }

    /// True when the message may be used; a dropped one is counted and logged (rate-limited).
    fn accept(&self, topic: &str, auth: &m::Auth, body: impl FnOnce(&mut Encoder)) -> bool {
        self.accept_from(topic, auth, None, body)
    }

    /// [`Self::accept`] for a message that names its author in a field: the sender must be it.
    fn accept_from(&self, topic: &str, auth: &m::Auth, author: Option<&str>, body: impl FnOnce(&mut Encoder)) -> bool {
        let Some(verifier) = &self.verifier else { return true };
        let mut v = verifier.lock().unwrap_or_else(|e| e.into_inner());
        let claim = Claim { sender: &auth.sender, counter: auth.counter, signature: &auth.signature };
        match v.verify_attributed(topic, claim, author, body) {
            Ok(_) => true,
            Err(why) => {
                let n = v.counts().rejected(why);
                if n.is_power_of_two() {
                    let sender = auth.sender.chars().take(80).collect::<String>();
                    tracing::warn!(topic, %sender, counter = auth.counter, reason = why.name(), count = n, "message dropped: {why}");
                }
                false
            }
        }
    }

    pub fn sign_assignment(&self, a: &mut Assignment) {
        a.auth = self.sign(names::ASSIGNMENT, |e| encode_assignment(e, a));
    }
    pub fn accept_assignment(&self, a: &Assignment) -> bool {
        self.accept(names::ASSIGNMENT, &a.auth, |e| encode_assignment(e, a))
    }
    pub fn sign_failure(&self, f: &mut FailureEvent) {
        f.auth = self.sign(names::FAILURES, |e| encode_failure(e, f));
    }
    pub fn accept_failure(&self, f: &FailureEvent) -> bool {
        self.accept(names::FAILURES, &f.auth, |e| encode_failure(e, f))
    }

    /// Heartbeats: an executor's on `/<uav>/heartbeat` (its `uav_id` is the sender's UAV), the
    /// watchdog's on `/aerokv/watchdog/heartbeat`.
    pub fn sign_heartbeat(&self, topic: &str, h: &mut Heartbeat) {
        h.auth = self.sign(topic, |e| encode_heartbeat(e, h));
    }
    pub fn accept_heartbeat(&self, topic: &str, h: &Heartbeat) -> bool {
        self.accept_from(topic, &h.auth, Some(&uav_node(Role::ShardExecutor, &h.uav_id)), |e| encode_heartbeat(e, h))
    }
    pub fn accept_watchdog_heartbeat(&self, h: &Heartbeat) -> bool {
        self.accept(names::WATCHDOG_HEARTBEAT, &h.auth, |e| encode_heartbeat(e, h))
    }
    pub fn sign_battery(&self, topic: &str, b: &mut BatteryHealth) {
        b.auth = self.sign(topic, |e| encode_battery(e, b));
    }
    pub fn accept_battery(&self, topic: &str, b: &BatteryHealth) -> bool {
        self.accept_from(topic, &b.auth, Some(&uav_node(Role::BatteryMonitor, &b.uav_id)), |e| encode_battery(e, b))
    }
    /// Stage inputs and outputs, replays: `source` is the sending UAV, or "gateway" (the
    /// scheduler).
    pub fn sign_activation(&self, topic: &str, a: &mut Activation) {
        a.auth = self.sign(topic, |e| encode_activation(e, a));
    }
    pub fn accept_activation(&self, topic: &str, a: &Activation) -> bool {
        self.accept_from(topic, &a.auth, Some(&activation_author(a)), |e| encode_activation(e, a))
    }
    pub fn sign_kv(&self, topic: &str, k: &mut KvSnapshot) {
        k.auth = self.sign(topic, |e| encode_kv(e, k));
    }
    pub fn accept_kv(&self, topic: &str, k: &KvSnapshot) -> bool {
        self.accept_from(topic, &k.auth, Some(&uav_node(Role::ShardExecutor, &k.source)), |e| encode_kv(e, k))
    }
    pub fn sign_token(&self, t: &mut TokenChunk) {
        t.auth = self.sign(names::TOKENS, |e| encode_token(e, t));
    }
    pub fn accept_token(&self, t: &TokenChunk) -> bool {
        self.accept(names::TOKENS, &t.auth, |e| encode_token(e, t))
    }
    /// A request's last chunk on [`names::FINISHED`].
    pub fn sign_finished(&self, t: &mut TokenChunk) {
        t.auth = self.sign(names::FINISHED, |e| encode_token(e, t));
    }
    pub fn accept_finished(&self, t: &TokenChunk) -> bool {
        self.accept(names::FINISHED, &t.auth, |e| encode_token(e, t))
    }
    /// What an assignment was decided from (read by recorders and `aerokv bag audit`).
    pub fn sign_plan_inputs(&self, i: &mut PlanInputs) {
        i.auth = self.sign(names::PLAN_INPUTS, |e| encode_plan_inputs(e, i));
    }
    pub fn accept_plan_inputs(&self, i: &PlanInputs) -> bool {
        self.accept(names::PLAN_INPUTS, &i.auth, |e| encode_plan_inputs(e, i))
    }
    /// A scheduler's heartbeat on `/aerokv/scheduler/heartbeat`; `uav_id` names its role
    /// ("primary", "standby") and must be the sender's.
    pub fn sign_scheduler_heartbeat(&self, h: &mut Heartbeat) {
        h.auth = self.sign(names::SCHEDULER_HEARTBEAT, |e| encode_heartbeat(e, h));
    }
    pub fn accept_scheduler_heartbeat(&self, h: &Heartbeat) -> bool {
        let author = heartbeat_author(names::SCHEDULER_HEARTBEAT, h);
        self.accept_from(names::SCHEDULER_HEARTBEAT, &h.auth, author.as_deref(), |e| encode_heartbeat(e, h))
    }
    pub fn sign_request(&self, r: &mut RequestSpec) {
        r.auth = self.sign(names::REQUESTS, |e| encode_request(e, r));
    }
    pub fn accept_request(&self, r: &RequestSpec) -> bool {
        self.accept(names::REQUESTS, &r.auth, |e| encode_request(e, r))
    }
    pub fn sign_progress(&self, p: &mut PromptProgress) {
        p.auth = self.sign(names::PROGRESS, |e| encode_progress(e, p));
    }
    pub fn accept_progress(&self, p: &PromptProgress) -> bool {
        self.accept(names::PROGRESS, &p.auth, |e| encode_progress(e, p))
    }

    /// A UAV may be planned only if it is on the roster (any UAV when authentication is off).
    pub fn admits_uav(&self, uav: &str) -> bool {
        let admitted = self.roster(|r| r.is_none_or(|r| r.uavs().contains(uav)));
        if !admitted {
            tracing::warn!(%uav, "UAV is not on the roster: it will not be planned");
        }
        admitted
    }

    fn roster<R>(&self, f: impl FnOnce(Option<&Roster>) -> R) -> R {
        match &self.verifier {
            Some(v) => f(Some(v.lock().unwrap_or_else(|e| e.into_inner()).roster())),
            None => f(None),
        }
    }

    fn counts(&self) -> Counts {
        self.verifier.as_ref().map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).counts()).unwrap_or_default()
    }

    /// The counters as the heartbeat carries them.
    pub fn counters(&self) -> AuthCounters {
        let c = self.counts();
        AuthCounters {
            accepted: c.accepted,
            not_signed: c.rejected(Rejection::Unsigned),
            unknown_sender: c.rejected(Rejection::UnknownSender),
            wrong_role: c.rejected(Rejection::WrongRole),
            bad_signature: c.rejected(Rejection::BadSignature),
            replayed: c.rejected(Rejection::Replayed),
            malformed: c.rejected(Rejection::Malformed),
        }
    }

    /// The counters for `stats_json`: accepted, and dropped per reason.
    pub fn counters_json(&self) -> serde_json::Value {
        let c = self.counts();
        let mut map = serde_json::Map::new();
        map.insert("accepted".into(), c.accepted.into());
        for why in Rejection::ALL {
            map.insert(why.name().into(), c.rejected(why).into());
        }
        serde_json::Value::Object(map)
    }

    /// The counters as one `/diagnostics` status, named `aerokv/auth/<identity>`.
    pub fn diagnostics(&self) -> DiagnosticArray {
        let c = self.counts();
        let dropped = c.rejected_total();
        let (level, message) = match &self.verifier {
            None => (DiagnosticStatus::WARN as u8, "authentication off".to_string()),
            Some(_) if dropped > 0 => (DiagnosticStatus::WARN as u8, format!("{dropped} message(s) dropped")),
            Some(_) => (DiagnosticStatus::OK as u8, "ok".to_string()),
        };
        let kv = |k: &str, v: u64| KeyValue { key: k.into(), value: v.to_string() };
        DiagnosticArray {
            header: r2r::std_msgs::msg::Header { stamp: now_stamp(), frame_id: String::new() },
            status: vec![DiagnosticStatus {
                level,
                name: format!("aerokv/auth/{}", self.id),
                message,
                hardware_id: self.id.clone(),
                values: std::iter::once(kv("accepted", c.accepted))
                    .chain(Rejection::ALL.iter().map(|&why| kv(why.name(), c.rejected(why))))
                    .collect(),
            }],
        }
    }

    /// Publishes [`Self::diagnostics`] every `period` until the node stops.
    pub fn publish_diagnostics(self: &Arc<Self>, ctx: &NodeContext, period: Duration) -> anyhow::Result<()> {
        let publisher = ctx.publisher::<DiagnosticArray>(names::DIAGNOSTICS, r2r::QosProfile::default())?;
        let (auth, shutdown) = (self.clone(), ctx.shutdown());
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut tick = crate::ros::clock::interval(period);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tick.tick() => if let Err(e) = publisher.publish(&auth.diagnostics()) {
                        tracing::warn!("publish auth diagnostics: {e}");
                    },
                }
            }
        });
        Ok(())
    }
}

/// A publisher that signs every message it publishes (a no-op without a keystore).
pub struct SignedPublisher<T: r2r::WrappedTypesupport> {
    publisher: r2r::Publisher<T>,
    auth: Arc<NodeAuth>,
    sign: fn(&NodeAuth, &mut T),
}

impl<T: r2r::WrappedTypesupport + 'static> SignedPublisher<T> {
    pub fn new(publisher: r2r::Publisher<T>, auth: Arc<NodeAuth>, sign: fn(&NodeAuth, &mut T)) -> Self {
        SignedPublisher { publisher, auth, sign }
    }

    pub fn publish(&self, msg: &T) -> r2r::Result<()> {
        let mut signed = msg.clone();
        (self.sign)(&self.auth, &mut signed);
        self.publisher.publish(&signed)
    }
}

/// Only the messages `accept` lets through, from a subscription's channel.
pub fn verified<T: Send + 'static>(
    mut rx: UnboundedReceiver<T>,
    auth: Arc<NodeAuth>,
    accept: fn(&NodeAuth, &T) -> bool,
) -> UnboundedReceiver<T> {
    let (tx, out) = unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if accept(&auth, &msg) && tx.send(msg).is_err() {
                break;
            }
        }
    });
    out
}

/// The identity of `uav`'s node in `role` ("" for a name that is no UAV: nobody signs as that).
fn uav_node(role: Role, uav: &str) -> String {
    NodeId::of(role, Some(uav)).map(|id| id.to_string()).unwrap_or_default()
}

/// Who signs a heartbeat on `topic`: the watchdog's own (any watchdog: the topic's rule), a
/// scheduler's as the role its `uav_id` names ("primary", "standby"), else `uav_id`'s executor.
fn heartbeat_author(topic: &str, h: &Heartbeat) -> Option<String> {
    match topic {
        names::WATCHDOG_HEARTBEAT => None,
        names::SCHEDULER_HEARTBEAT => Some(match h.uav_id.as_str() {
            "primary" => NodeId::of(Role::Scheduler, None).map(|id| id.to_string()).unwrap_or_default(),
            "standby" => NodeId::standby_scheduler().to_string(),
            _ => String::new(),
        }),
        _ => Some(uav_node(Role::ShardExecutor, &h.uav_id)),
    }
}

/// Who signs an activation: the sending UAV's executor, or the scheduler as the gateway.
fn activation_author(a: &Activation) -> String {
    let id = if a.source == GATEWAY_SOURCE {
        // The gateway is whichever scheduler serves: the primary, or the standby after its
        // takeover (the executors' epochs decide which plan counts).
        scheduler_author(&a.auth.sender)
    } else {
        NodeId::of(Role::ShardExecutor, Some(&a.source))
    };
    id.map(|id| id.to_string()).unwrap_or_default()
}

/// Verifies one recorded message (`aerokv bag audit --keystore`): its CDR bytes as recorded on
/// `topic`, under the same rules a node applies on receipt (the roster, the topic's authority,
/// the author a field names, the signature, the sender's counter on that topic). None for a type
/// that AeroKV does not sign; `Malformed` for bytes that do not decode as their type.
pub fn verify_recorded(v: &mut Verifier, topic: &str, type_name: &str, data: &[u8]) -> Option<Result<(), Rejection>> {
    fn check<T: r2r::WrappedTypesupport>(
        v: &mut Verifier,
        topic: &str,
        data: &[u8],
        claim: fn(&T) -> &m::Auth,
        author: fn(&T, &str) -> Option<String>,
        body: fn(&mut Encoder, &T),
    ) -> Result<(), Rejection> {
        let msg = T::from_serialized_bytes(data).map_err(|_| Rejection::Malformed)?;
        let auth = claim(&msg);
        let claim = Claim { sender: &auth.sender, counter: auth.counter, signature: &auth.signature };
        let author = author(&msg, topic);
        v.verify_attributed(topic, claim, author.as_deref(), |e| body(e, &msg)).map(|_| ())
    }
    Some(match type_name {
        "aerokv/msg/Assignment" => check::<Assignment>(v, topic, data, |m| &m.auth, |_, _| None, encode_assignment),
        "aerokv/msg/FailureEvent" => check::<FailureEvent>(v, topic, data, |m| &m.auth, |_, _| None, encode_failure),
        "aerokv/msg/TokenChunk" => check::<TokenChunk>(v, topic, data, |m| &m.auth, |_, _| None, encode_token),
        "aerokv/msg/PromptProgress" => {
            check::<PromptProgress>(v, topic, data, |m| &m.auth, |_, _| None, encode_progress)
        }
        "aerokv/msg/PlanInputs" => check::<PlanInputs>(v, topic, data, |m| &m.auth, |_, _| None, encode_plan_inputs),
        "aerokv/msg/RequestSpec" => check::<RequestSpec>(v, topic, data, |m| &m.auth, |_, _| None, encode_request),
        "aerokv/msg/Heartbeat" => {
            check::<Heartbeat>(v, topic, data, |m| &m.auth, |h, topic| heartbeat_author(topic, h), encode_heartbeat)
        }
        "aerokv/msg/BatteryHealth" => check::<BatteryHealth>(
            v,
            topic,
            data,
            |m| &m.auth,
            |b, _| Some(uav_node(Role::BatteryMonitor, &b.uav_id)),
            encode_battery,
        ),
        "aerokv/msg/Activation" => {
            check::<Activation>(v, topic, data, |m| &m.auth, |a, _| Some(activation_author(a)), encode_activation)
        }
        "aerokv/msg/KvSnapshot" => check::<KvSnapshot>(
            v,
            topic,
            data,
            |m| &m.auth,
            |k, _| Some(uav_node(Role::ShardExecutor, &k.source)),
            encode_kv,
        ),
        _ => return None,
    })
}

// Canonical bytes (docs/security.md): the type's name, then every field but `auth` in .msg order.

fn encode_time(e: &mut Encoder, t: &Time) {
    e.i32(t.sec).u32(t.nanosec);
}

fn encode_assignment(e: &mut Encoder, a: &Assignment) {
    e.str("aerokv/msg/Assignment").u64(a.epoch);
    encode_time(e, &a.stamp);
    e.str(&a.model_variant).u32(a.num_layers).seq(&a.ring, |e, s| {
        e.str(s);
    });
    e.seq(&a.uavs, |e, u| {
        e.str(&u.uav_id).u32(u.layer_start).u32(u.layer_end).u32(u.overlap_layers).u32(u.snapshot_period);
    });
    e.str(&a.reason).u64(a.request_id).u32(a.resume_position).u32(a.replay_from);
    e.str(&a.activation_codec);
    e.seq(&a.requests, |e, r| {
        e.u64(r.request_id).u32(r.resume_position).u32(r.replay_from);
    });
}

fn encode_failure(e: &mut Encoder, f: &FailureEvent) {
    e.str("aerokv/msg/FailureEvent").u64(f.epoch).str(&f.uav_id).str(&f.reason).f64(f.silence_s);
    encode_time(e, &f.stamp);
}

fn encode_u32s(e: &mut Encoder, v: &[u32]) {
    e.seq(v, |e, x| {
        e.u32(*x);
    });
}

fn encode_heartbeat(e: &mut Encoder, h: &Heartbeat) {
    e.str("aerokv/msg/Heartbeat").str(&h.uav_id).u64(h.epoch).u64(h.sequence).str(&h.state);
    e.u32(h.layer_start).u32(h.layer_end).u32(h.replica_start).u32(h.replica_end).u32(h.kv_tokens);
    e.u64(h.request_id).u32(h.pred_snapshot_tokens).f64(h.compute_ms_per_layer).f64(h.compute_s_total);
    e.u64(h.tx_bytes_total).u64(h.memory_bytes).u64(h.stale_messages);
    encode_time(e, &h.stamp);
    let c = &h.auth_counters;
    e.u64(c.accepted).u64(c.not_signed).u64(c.unknown_sender).u64(c.wrong_role);
    e.u64(c.bad_signature).u64(c.replayed).u64(c.malformed);
    e.f64(h.link_goodput_bps).u64(h.weight_bytes);
    e.seq(&h.kv, |e, k| {
        e.u64(k.request_id).u32(k.kv_tokens).u64(k.kv_bytes).u32(k.pred_snapshot_tokens);
    });
    e.f64(h.link_phy_bps);
}

fn encode_battery(e: &mut Encoder, b: &BatteryHealth) {
    e.str("aerokv/msg/BatteryHealth").str(&b.uav_id);
    encode_time(e, &b.stamp);
    e.f64(b.energy_j).f64(b.capacity_j).f32(b.state_of_charge).f64(b.power_w).f64(b.expected_remaining_tokens);
    e.str(&b.source);
}

fn encode_activation(e: &mut Encoder, a: &Activation) {
    e.str("aerokv/msg/Activation").u64(a.epoch).u64(a.request_id).u32(a.step).u32(a.position);
    e.u32(a.token_count).u32(a.layer_boundary).str(&a.source);
    encode_u32s(e, &a.shape);
    e.str(&a.dtype).str(&a.codec).bytes(&a.payload);
    encode_u32s(e, &a.chunk_tokens);
    encode_time(e, &a.stamp);
    e.u32(a.context_tokens);
}

fn encode_kv(e: &mut Encoder, k: &KvSnapshot) {
    e.str("aerokv/msg/KvSnapshot").u64(k.epoch).u64(k.request_id).str(&k.source).str(&k.holder);
    e.u32(k.layer_start).u32(k.layer_end).u32(k.token_start).u32(k.token_end).u32(k.kv_heads).u32(k.head_dim);
    e.str(&k.dtype).str(&k.codec).bytes(&k.payload);
    encode_time(e, &k.stamp);
}

fn encode_token(e: &mut Encoder, t: &TokenChunk) {
    e.str("aerokv/msg/TokenChunk").u64(t.request_id).u32(t.index).i32(t.token_id).str(&t.text);
    e.bool(t.done).str(&t.finish_reason).u64(t.epoch);
}

fn encode_plan_inputs(e: &mut Encoder, i: &PlanInputs) {
    e.str("aerokv/msg/PlanInputs").u64(i.epoch).u64(i.request_id).str(&i.decision).u64(i.based_on_epoch);
    e.str(&i.failed_uav).seq(&i.members, |e, s| {
        e.str(s);
    });
    e.u64(i.total_tokens).u32(i.resume_position).bool(i.snapshot_known).u32(i.snapshot_tokens);
    e.u64(i.snapshot_heartbeat_sequence).seq(&i.planning_ids, |e, s| {
        e.str(s);
    });
    e.seq(&i.telemetry, |e, t| {
        e.str(&t.uav_id).f64(t.energy_j).f64(t.capacity_j).f64(t.layer_latency_s).f64(t.link_bps);
        encode_time(e, &t.battery_stamp);
        e.u64(t.heartbeat_sequence);
        encode_time(e, &t.heartbeat_stamp);
    });
    e.f64(i.recovery_deadline_s).f64(i.weight_load_bps);
    encode_u32s(e, &i.snapshot_periods);
    e.f64(i.lifetime_target_factor).bool(i.shared_channel).f64(i.frame_loss).f64(i.flight_power_w);
    e.f64(i.inference_power_w).f64(i.tx_power_w).f64(i.link_rate_bps).f64(i.memory_budget_bytes);
    e.u32(i.num_layers).f64(i.weight_bytes_per_layer).f64(i.kv_bytes_per_token_layer).f64(i.member_timeout_s);
    encode_time(e, &i.stamp);
}

fn encode_request(e: &mut Encoder, r: &RequestSpec) {
    e.str("aerokv/msg/RequestSpec").u64(r.request_id);
    encode_u32s(e, &r.prompt_ids);
    e.u32(r.max_tokens).f32(r.temperature).f32(r.top_p).u64(r.seed).bool(r.ignore_eos);
    e.str(&r.user).str(&r.prompt);
}

/// The author a gateway activation must come from: the sender itself when it is one of the two
/// scheduler identities, else the primary's (so that anyone else is refused as wrong role).
fn scheduler_author(sender: &str) -> Result<NodeId, aerokv_auth::identity::BadNodeId> {
    let standby = NodeId::standby_scheduler();
    if sender == standby.as_str() {
        return Ok(standby);
    }
    NodeId::of(Role::Scheduler, None)
}

fn encode_progress(e: &mut Encoder, p: &PromptProgress) {
    e.str("aerokv/msg/PromptProgress").u64(p.request_id).u32(p.done).u32(p.total).u64(p.epoch);
}

#[cfg(test)]
mod tests {
    use super::*;
    use r2r::aerokv::msg::UavAssignment;
    use r2r::WrappedTypesupport;

    /// The fields of a message as serde sees them (r2r generates them in .msg order).
    fn fields<T: serde::Serialize>(msg: &T) -> Vec<String> {
        match serde_json::to_value(msg).unwrap() {
            serde_json::Value::Object(map) => map.keys().cloned().collect(),
            _ => panic!("not a struct"),
        }
    }

    /// A field added to a signed message must be added to its canonical bytes, or it would
    /// travel unauthenticated: this fails until it is.
    #[test]
    fn canonical_encodings_cover_every_field() {
        let mut a = fields(&Assignment::default());
        a.sort();
        let mut expected: Vec<&str> = vec![
            "auth",
            "epoch",
            "stamp",
            "model_variant",
            "num_layers",
            "ring",
            "uavs",
            "reason",
            "request_id",
            "resume_position",
            "replay_from",
            "requests",
            "activation_codec",
        ];
        expected.sort();
        assert_eq!(a, expected);
        let mut r = fields(&r2r::aerokv::msg::RequestResume::default());
        r.sort();
        assert_eq!(r, ["replay_from", "request_id", "resume_position"]);
        let mut u = fields(&UavAssignment::default());
        u.sort();
        assert_eq!(u, ["layer_end", "layer_start", "overlap_layers", "snapshot_period", "uav_id"]);
        let mut f = fields(&FailureEvent::default());
        f.sort();
        assert_eq!(f, ["auth", "epoch", "reason", "silence_s", "stamp", "uav_id"]);
        // The other signed messages: every field (the encoders follow the .msg order).
        fn same<T: serde::Serialize>(msg: &T, expected: &[&str]) {
            let (mut got, mut expected) = (fields(msg), expected.to_vec());
            got.sort();
            expected.sort();
            assert_eq!(got, expected);
        }
        let h = [
            "uav_id",
            "epoch",
            "sequence",
            "state",
            "layer_start",
            "layer_end",
            "replica_start",
            "replica_end",
            "kv_tokens",
            "request_id",
            "pred_snapshot_tokens",
            "compute_ms_per_layer",
            "compute_s_total",
            "tx_bytes_total",
            "memory_bytes",
            "weight_bytes",
            "kv",
            "stale_messages",
            "stamp",
            "auth_counters",
            "link_goodput_bps",
            "link_phy_bps",
            "auth",
        ];
        same(&Heartbeat::default(), &h);
        same(
            &AuthCounters::default(),
            &["accepted", "not_signed", "unknown_sender", "wrong_role", "bad_signature", "replayed", "malformed"],
        );
        same(&m::RequestKv::default(), &["request_id", "kv_tokens", "kv_bytes", "pred_snapshot_tokens"]);
        same(&m::RequestResume::default(), &["request_id", "resume_position", "replay_from"]);
        let b = [
            "uav_id",
            "stamp",
            "energy_j",
            "capacity_j",
            "state_of_charge",
            "power_w",
            "expected_remaining_tokens",
            "source",
            "auth",
        ];
        same(&BatteryHealth::default(), &b);
        let a = [
            "epoch",
            "request_id",
            "step",
            "position",
            "token_count",
            "layer_boundary",
            "source",
            "shape",
            "dtype",
            "codec",
            "payload",
            "chunk_tokens",
            "stamp",
            "context_tokens",
            "auth",
        ];
        same(&Activation::default(), &a);
        let k = [
            "epoch",
            "request_id",
            "source",
            "holder",
            "layer_start",
            "layer_end",
            "token_start",
            "token_end",
            "kv_heads",
            "head_dim",
            "dtype",
            "codec",
            "payload",
            "stamp",
            "auth",
        ];
        same(&KvSnapshot::default(), &k);
        let t = ["request_id", "index", "token_id", "text", "done", "finish_reason", "epoch", "auth"];
        same(&TokenChunk::default(), &t);
        same(&PromptProgress::default(), &["request_id", "done", "total", "epoch", "auth"]);
        let i = [
            "epoch",
            "request_id",
            "decision",
            "based_on_epoch",
            "failed_uav",
            "members",
            "total_tokens",
            "resume_position",
            "snapshot_known",
            "snapshot_tokens",
            "snapshot_heartbeat_sequence",
            "planning_ids",
            "telemetry",
            "recovery_deadline_s",
            "weight_load_bps",
            "snapshot_periods",
            "lifetime_target_factor",
            "shared_channel",
            "frame_loss",
            "flight_power_w",
            "inference_power_w",
            "tx_power_w",
            "link_rate_bps",
            "memory_budget_bytes",
            "num_layers",
            "weight_bytes_per_layer",
            "kv_bytes_per_token_layer",
            "member_timeout_s",
            "stamp",
            "auth",
        ];
        same(&PlanInputs::default(), &i);
        let t = [
            "uav_id",
            "energy_j",
            "capacity_j",
            "layer_latency_s",
            "link_bps",
            "battery_stamp",
            "heartbeat_sequence",
            "heartbeat_stamp",
        ];
        same(&m::PlanTelemetry::default(), &t);
        let r = [
            "request_id",
            "prompt_ids",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "ignore_eos",
            "user",
            "prompt",
            "auth",
        ];
        same(&RequestSpec::default(), &r);
    }

    /// `aerokv bag audit --keystore`: a recorded message verified from its CDR bytes.
    #[test]
    fn recorded_messages_are_verified_from_their_bytes() {
        let tmp = std::env::temp_dir().join(format!("aerokv-ros-auth-recorded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (scheduler, watchdog, _) = keystore(&tmp);
        let roster = || Verifier::new(Keystore::open(&tmp).unwrap().roster);
        let topic = names::PLAN_INPUTS;
        let mut i = PlanInputs {
            epoch: 4,
            decision: "retirement".into(),
            telemetry: vec![m::PlanTelemetry { uav_id: "uav1".into(), energy_j: 4.0, ..Default::default() }],
            ..Default::default()
        };
        let check = |v: &mut Verifier, i: &PlanInputs| {
            verify_recorded(v, topic, "aerokv/msg/PlanInputs", &i.to_serialized_bytes().unwrap())
        };
        assert_eq!(check(&mut roster(), &i), Some(Err(Rejection::Unsigned)));
        scheduler.sign_plan_inputs(&mut i);
        let mut v = roster();
        assert_eq!(check(&mut v, &i), Some(Ok(())));
        assert_eq!(check(&mut v, &i), Some(Err(Rejection::Replayed)), "the same counter twice");
        let mut forged = i.clone();
        forged.telemetry[0].energy_j = 5.0;
        assert_eq!(check(&mut roster(), &forged), Some(Err(Rejection::BadSignature)));
        let mut by_watchdog = i.clone();
        watchdog.sign_plan_inputs(&mut by_watchdog);
        assert_eq!(check(&mut roster(), &by_watchdog), Some(Err(Rejection::WrongRole)));
        assert_eq!(
            verify_recorded(&mut roster(), topic, "aerokv/msg/PlanInputs", &[0, 1, 0, 0, 7]),
            Some(Err(Rejection::Malformed))
        );
        assert_eq!(verify_recorded(&mut roster(), "/uav1/battery_state", "sensor_msgs/msg/BatteryState", &[]), None);
        // A scheduler's heartbeat is the scheduler's whose role it names.
        let mut hb = Heartbeat { uav_id: "primary".into(), ..Default::default() };
        scheduler.sign_scheduler_heartbeat(&mut hb);
        let beat = |h: &Heartbeat| h.to_serialized_bytes().unwrap();
        let sched = names::SCHEDULER_HEARTBEAT;
        assert_eq!(verify_recorded(&mut roster(), sched, "aerokv/msg/Heartbeat", &beat(&hb)), Some(Ok(())));
        hb.uav_id = "standby".into();
        scheduler.sign_scheduler_heartbeat(&mut hb);
        assert_eq!(
            verify_recorded(&mut roster(), sched, "aerokv/msg/Heartbeat", &beat(&hb)),
            Some(Err(Rejection::WrongRole))
        );
        // A battery report is its UAV's monitor's, on its own topic.
        let mut b = BatteryHealth { uav_id: "uav1".into(), ..Default::default() };
        b.auth = scheduler.sign("/uav1/battery", |e| encode_battery(e, &b));
        let bytes = b.to_serialized_bytes().unwrap();
        assert_eq!(
            verify_recorded(&mut roster(), "/uav1/battery", "aerokv/msg/BatteryHealth", &bytes),
            Some(Err(Rejection::WrongRole))
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// The standby signs with its own key and the scheduler's role: the executors take its
    /// embeddings as the gateway's; nobody else may sign them; a scheduler heartbeat must come
    /// from the role it names.
    #[test]
    fn the_standby_speaks_as_a_scheduler_under_its_own_name() {
        let tmp = std::env::temp_dir().join(format!("aerokv-ros-auth-standby-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (scheduler, _watchdog, uav1) = keystore(&tmp);
        let standby = NodeAuth::load_as(tmp.to_str().unwrap(), NodeId::standby_scheduler()).unwrap();
        let topic = names::stage_input("uav1");
        let mut a = Activation { source: GATEWAY_SOURCE.into(), epoch: 4, ..Default::default() };
        standby.sign_activation(&topic, &mut a);
        assert_eq!(a.auth.sender, "aerokv/standby_scheduler");
        assert!(uav1.accept_activation(&topic, &a));
        let mut forged = Activation { source: GATEWAY_SOURCE.into(), epoch: 5, ..Default::default() };
        uav1.sign_activation(&topic, &mut forged);
        assert!(!scheduler.accept_activation(&topic, &forged), "an executor signed the gateway's embeddings");
        let mut hb = Heartbeat { uav_id: "primary".into(), ..Default::default() };
        standby.sign_scheduler_heartbeat(&mut hb);
        assert!(!uav1.accept_scheduler_heartbeat(&hb), "the standby posed as the primary");
        let mut hb = Heartbeat { uav_id: "standby".into(), sequence: 1, ..Default::default() };
        standby.sign_scheduler_heartbeat(&mut hb);
        assert!(scheduler.accept_scheduler_heartbeat(&hb));
        let mut r = RequestSpec { request_id: 7, prompt_ids: vec![1, 2], max_tokens: 3, ..Default::default() };
        scheduler.sign_request(&mut r);
        let mut forged = r.clone();
        forged.prompt_ids.push(3);
        assert!(!standby.accept_request(&forged));
        assert!(standby.accept_request(&r));
        let _ = std::fs::remove_dir_all(&tmp);
    }

    fn keystore(dir: &std::path::Path) -> (Arc<NodeAuth>, Arc<NodeAuth>, Arc<NodeAuth>) {
        Keystore::init(dir, &aerokv_auth::swarm_identities(2).unwrap(), false).unwrap();
        let d = dir.to_str().unwrap();
        (
            NodeAuth::load(d, Role::Scheduler, None).unwrap(),
            NodeAuth::load(d, Role::Watchdog, None).unwrap(),
            NodeAuth::load(d, Role::ShardExecutor, Some("uav1")).unwrap(),
        )
    }

    #[test]
    fn every_field_is_covered_by_the_signature() {
        let tmp = std::env::temp_dir().join(format!("aerokv-ros-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let (scheduler, watchdog, uav1) = keystore(&tmp);
        let mut a = Assignment {
            epoch: 3,
            ring: vec!["uav1".into(), "uav2".into()],
            uavs: vec![UavAssignment { uav_id: "uav1".into(), layer_end: 15, ..Default::default() }],
            requests: vec![m::RequestResume { request_id: 4, resume_position: 9, replay_from: 8 }],
            ..Default::default()
        };
        scheduler.sign_assignment(&mut a);
        let tamper: [fn(&mut Assignment); 17] = [
            |a| a.epoch += 1,
            |a| a.stamp.nanosec += 1,
            |a| a.model_variant.push('x'),
            |a| a.num_layers += 1,
            |a| a.ring.swap(0, 1),
            |a| a.uavs[0].uav_id.push('x'),
            |a| a.uavs[0].layer_end -= 1,
            |a| a.uavs[0].overlap_layers += 1,
            |a| a.reason.push('x'),
            |a| a.request_id += 1,
            |a| a.resume_position += 1,
            |a| a.replay_from += 1,
            |a| a.activation_codec.push('x'),
            |a| a.requests.push(m::RequestResume::default()),
            |a| a.requests[0].request_id += 1,
            |a| a.requests[0].resume_position += 1,
            |a| a.requests[0].replay_from -= 1,
        ];
        for t in tamper {
            let mut forged = a.clone();
            t(&mut forged);
            assert!(!uav1.accept_assignment(&forged));
        }
        assert!(uav1.accept_assignment(&a));
        assert!(!uav1.accept_assignment(&a), "replay accepted");
        let mut f =
            FailureEvent { epoch: 3, uav_id: "uav2".into(), reason: "heartbeat_timeout".into(), ..Default::default() };
        watchdog.sign_failure(&mut f);
        let mut forged = f.clone();
        forged.uav_id = "uav1".into();
        assert!(!scheduler.accept_failure(&forged));
        assert!(scheduler.accept_failure(&f));
        let mut by_scheduler = f.clone();
        scheduler.sign_failure(&mut by_scheduler);
        assert!(!uav1.accept_failure(&by_scheduler), "a failure declared by the scheduler counted");
        let c = uav1.counters();
        assert_eq!((c.accepted, c.bad_signature, c.replayed, c.wrong_role), (1, 17, 1, 1));
        assert!(uav1.admits_uav("uav2") && !uav1.admits_uav("uav3"));
        // Data plane: an activation is the sender's own (`source`), and every field is signed.
        let topic = names::stage_input("uav2");
        let mut act = Activation { source: "uav1".into(), payload: vec![1, 2, 3], ..Default::default() };
        uav1.sign_activation(&topic, &mut act);
        let mut moved = act.payload.clone();
        moved[0] ^= 1;
        assert!(!scheduler.accept_activation(&topic, &Activation { payload: moved, ..act.clone() }));
        assert!(!scheduler.accept_activation(&topic, &Activation { source: "uav2".into(), ..act.clone() }));
        assert!(!scheduler.accept_activation(&topic, &Activation { context_tokens: 9, ..act.clone() }));
        assert!(scheduler.accept_activation(&topic, &act));
        let mut gw = Activation { source: GATEWAY_SOURCE.into(), ..Default::default() };
        uav1.sign_activation(&topic, &mut gw);
        assert!(!scheduler.accept_activation(&topic, &gw), "an executor posing as the gateway");
        scheduler.sign_activation(&topic, &mut gw);
        assert!(uav1.accept_activation(&topic, &gw));
        // A heartbeat for uav2 signed by uav1's executor, on uav2's topic or on its own.
        let mut hb = Heartbeat { uav_id: "uav2".into(), ..Default::default() };
        uav1.sign_heartbeat(&names::heartbeat("uav2"), &mut hb);
        assert!(!scheduler.accept_heartbeat(&names::heartbeat("uav2"), &hb));
        let mut own = Heartbeat { uav_id: "uav1".into(), ..Default::default() };
        uav1.sign_heartbeat(&names::heartbeat("uav1"), &mut own);
        assert!(scheduler.accept_heartbeat(&names::heartbeat("uav1"), &own));
        let counts = scheduler.counters();
        assert_eq!((counts.accepted, counts.bad_signature, counts.wrong_role), (3, 3, 3), "{counts:?}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn without_a_keystore_everything_passes_unsigned() {
        let off = NodeAuth::load("", Role::Scheduler, None).unwrap();
        let mut a = Assignment::default();
        off.sign_assignment(&mut a);
        assert!(a.auth.signature.is_empty() && off.accept_assignment(&a) && off.admits_uav("uav7"));
    }
}
