//! The scheduler's decisions, without ROS: live telemetry -> the planning core's [`SwarmState`],
//! the initial lifespan-aware plan, failover (recovery + P2 + P1-new), planned retirement, and the
//! conversion of the core's layouts and protection plans into the [`SwarmPlan`]s the executors
//! follow. UAVs are named (`uav3`) on the wire and numbered in the planning core.
use crate::dataplane::{Stage, SwarmPlan};
use aerokv_plan::{
    plan_failover, plan_initial_layout, plan_protection, plan_protection_relaxed, predict_tokens_per_s,
    retirements_due, Layout, ModelSpec, PlanConfig, PlanError, ProtectionPlan, RadioPrediction, RecoveryContext, Ring,
    SwarmState, Traffic, UavId, UavState,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no UAV is up")]
    NoUavs,
    #[error("{0} is not in the current plan")]
    NotMember(String),
    #[error("no battery health from {0} yet")]
    NoTelemetry(String),
    #[error("planning failed: {0}")]
    Plan(#[from] PlanError),
}

pub type Result<T> = std::result::Result<T, ControlError>;

/// Figures the scheduler's parameters give for every UAV (the messages carry energy and the
/// measured latency; powers, link rate and memory are per-airframe configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct Airframe {
    pub flight_power_w: f64,
    pub compute_power_w: f64,
    pub tx_power_w: f64,
    pub link_bps: f64,
    pub memory_bytes: f64,
}

/// Sizes of the model, measured from the manifest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelSize {
    pub num_layers: u32,
    pub weight_bytes_per_layer: f64,
    pub kv_bytes_per_token_layer: f64,
}

/// What the scheduler knows about one UAV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Telemetry {
    pub energy_j: f64,
    pub capacity_j: f64,
    /// Decode latency of one layer at full power, seconds (measured).
    pub layer_latency_s: f64,
    /// Its link's rate, bit/s, when measured (`crate::linkrate::LinkRates`); else the airframe's.
    pub link_bps: Option<f64>,
}

/// A plan in both forms: the core's (for the next failover) and the executors'.
#[derive(Debug, Clone)]
pub struct Planned {
    pub plan: SwarmPlan,
    pub layout: Layout,
    pub ring: Ring,
    pub protection: ProtectionPlan,
}

pub struct Controller {
    pub config: PlanConfig,
    pub airframe: Airframe,
    pub model: ModelSize,
    ids: BTreeMap<String, UavId>,
}

impl Controller {
    pub fn new(config: PlanConfig, airframe: Airframe, model: ModelSize) -> Self {
        Controller { config, airframe, model, ids: BTreeMap::new() }
    }

    /// The planning id of a UAV name (stable for the life of the scheduler; a UAV that comes back
    /// under the same name keeps its id but only joins through a new plan).
    pub fn id(&mut self, name: &str) -> UavId {
        let next = self.ids.len() as UavId;
        *self.ids.entry(name.to_string()).or_insert(next)
    }

    /// The planning ids handed out so far: the UAV at index i has id i.
    pub fn planning_ids(&self) -> Vec<String> {
        let mut v: Vec<(UavId, &String)> = self.ids.iter().map(|(k, &v)| (v, k)).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k.clone()).collect()
    }

    /// Hands out the ids of a recorded decision again (`planning_ids` of the scheduler then):
    /// the UAV at index i gets id i. Names already known keep theirs.
    pub fn restore_ids(&mut self, names: &[String]) {
        for (i, n) in names.iter().enumerate() {
            self.ids.entry(n.clone()).or_insert(i as UavId);
        }
    }

    fn name(&self, id: UavId) -> String {
        self.ids.iter().find(|(_, &v)| v == id).map(|(k, _)| k.clone()).unwrap_or_else(|| format!("#{id}"))
    }

    fn swarm(&mut self, members: &[String], telemetry: &BTreeMap<String, Telemetry>) -> Result<SwarmState> {
        let mut uavs = Vec::with_capacity(members.len());
        for name in members {
            let t = telemetry.get(name).ok_or_else(|| ControlError::NoTelemetry(name.clone()))?;
            uavs.push(UavState {
                id: self.id(name),
                energy_j: t.energy_j.max(0.0),
                capacity_j: t.capacity_j.max(t.energy_j).max(1.0),
                memory_bytes: self.airframe.memory_bytes,
                link_bps: t.link_bps.unwrap_or(self.airframe.link_bps),
                flight_power_w: self.airframe.flight_power_w,
                compute_power_w: self.airframe.compute_power_w,
                layer_latency_s: t.layer_latency_s,
                // Measured at full power; the battery model throttles it as the charge drops
                // (this machine's CPU is not throttled by a simulated battery).
                latency_measured: false,
                tx_power_w: self.airframe.tx_power_w,
            });
        }
        Ok(SwarmState { uavs, config: self.config.clone() })
    }

    fn spec(&self, total_tokens: u64, tokens_done: u64) -> ModelSpec {
        ModelSpec {
            num_layers: self.model.num_layers,
            weight_bytes_per_layer: self.model.weight_bytes_per_layer,
            kv_bytes_per_token_layer: self.model.kv_bytes_per_token_layer,
            total_tokens: total_tokens.max(tokens_done).max(1),
            tokens_done,
        }
    }

    /// Lifespan-aware layout over `members` (ring order as given) and P1 for a request of
    /// `total_tokens`, starting from an empty context.
    pub fn initial(
        &mut self,
        members: &[String],
        telemetry: &BTreeMap<String, Telemetry>,
        total_tokens: u64,
        epoch: u64,
        request_id: u64,
    ) -> Result<Planned> {
        if members.is_empty() {
            return Err(ControlError::NoUavs);
        }
        let swarm = self.swarm(members, telemetry)?;
        let spec = self.spec(total_tokens, 0);
        let layout = plan_initial_layout(&swarm, &spec)?;
        let ring = layout.ring();
        let protection = if ring.len() < 2 {
            ProtectionPlan::none(&layout)
        } else {
            match plan_protection(&swarm, &spec, &layout, &ring) {
                Ok(p) => p,
                Err(PlanError::ProtectionMemory(why)) => {
                    tracing::warn!(%why, "strict protection infeasible, best effort");
                    plan_protection_relaxed(&swarm, &spec, &layout, &ring)?
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(self.planned(layout, ring, protection, epoch, request_id, 0))
    }

    /// Recovery of `failed` (or its planned retirement when `graceful`), P2 over the survivors
    /// and P1-new, resuming at token position `resume`.
    #[allow(clippy::too_many_arguments)]
    pub fn failover(
        &mut self,
        current: &Planned,
        failed: &str,
        telemetry: &BTreeMap<String, Telemetry>,
        total_tokens: u64,
        resume: usize,
        snapshot: Option<usize>,
        epoch: u64,
        graceful: bool,
    ) -> Result<Planned> {
        if current.plan.stage(failed).is_none() {
            return Err(ControlError::NotMember(failed.into()));
        }
        let failed_id = self.id(failed);
        let survivors: Vec<String> =
            current.plan.stages.iter().map(|s| s.uav.clone()).filter(|u| u != failed).collect();
        let mut swarm = self.swarm(&survivors, telemetry)?;
        if graceful {
            // The retiring UAV is alive: the core may use its figures for the handover.
            if let Ok(mut s) = self.swarm(&[failed.to_string()], telemetry) {
                swarm.uavs.append(&mut s.uavs);
            }
        }
        let spec = self.spec(total_tokens, resume as u64);
        // How far the failed UAV's successor holds its tail's snapshot, as it last reported; the
        // core estimates it (floor(t / T) * T) when unknown. The replay starts there.
        let snapshot = snapshot.map(|s| s.min(resume));
        let ctx = RecoveryContext { last_snapshot_token: snapshot.map(|s| s as u64), graceful };
        let f = plan_failover(&swarm, &spec, &current.layout, &current.ring, &current.protection, failed_id, ctx)?;
        tracing::info!(
            failed,
            graceful,
            replay_tokens = f.recovery.replay_tokens,
            planned_recovery_s = f.recovery.time_s,
            moves = f.reconfiguration.moves.len(),
            "failover planned"
        );
        let request_id = current.plan.request_id;
        let mut planned =
            self.planned(f.reconfiguration.layout, f.recovery.ring, f.protection, epoch, request_id, resume);
        planned.plan.replay_from = snapshot.unwrap_or(0);
        Ok(planned)
    }

    /// The member that will run out of energy before the request ends and within
    /// `horizon_tokens`, if any: retire it now, at the last safe moment.
    pub fn retirement_candidate(
        &mut self,
        current: &Planned,
        telemetry: &BTreeMap<String, Telemetry>,
        total_tokens: u64,
        tokens_done: u64,
        horizon_tokens: u64,
    ) -> Result<Option<String>> {
        if current.plan.stages.len() < 2 {
            return Ok(None);
        }
        let members: Vec<String> = current.plan.stages.iter().map(|s| s.uav.clone()).collect();
        let swarm = self.swarm(&members, telemetry)?;
        let spec = self.spec(total_tokens, tokens_done);
        let c = retirements_due(&swarm, &spec, &current.layout, &current.ring, &current.protection, horizon_tokens)?;
        Ok(c.first().map(|&id| self.name(id)))
    }

    /// The cost model's decoding tokens/s for `current` over the radio channel (the planner's
    /// channel, or a loss-free one), with the members' telemetry (link rates) and `traffic` (the
    /// activation codec's bytes, the gateway's time).
    pub fn predict(
        &mut self,
        current: &Planned,
        telemetry: &BTreeMap<String, Telemetry>,
        traffic: &Traffic,
    ) -> Result<RadioPrediction> {
        let members: Vec<String> = current.plan.stages.iter().map(|s| s.uav.clone()).collect();
        let swarm = self.swarm(&members, telemetry)?;
        let spec = self.spec(1, 0);
        let channel = self.config.channel.clone().unwrap_or_default();
        Ok(predict_tokens_per_s(&swarm, &spec, &current.layout, &current.ring, &current.protection, &channel, traffic)?)
    }

    fn planned(
        &self,
        layout: Layout,
        ring: Ring,
        protection: ProtectionPlan,
        epoch: u64,
        request_id: u64,
        resume: usize,
    ) -> Planned {
        let l = layout.num_layers() as usize;
        let stages = ring
            .order()
            .iter()
            .filter_map(|&id| layout.interval(id).map(|iv| (id, iv)))
            .map(|(id, iv)| {
                let (start, len) = (iv.start as usize % l, iv.len() as usize);
                let p = protection.get(id);
                // P1 plans within `max_head` already; this only guards the data plane's invariant.
                let k = (p.k as usize).min(iv.max_head(layout.num_layers()) as usize);
                let t = if k < len { p.period.unwrap_or(0) as usize } else { 0 };
                Stage { uav: self.name(id), start, len, k, t }
            })
            .collect();
        Planned {
            plan: SwarmPlan {
                epoch,
                num_layers: l,
                stages,
                request_id,
                resume_position: resume,
                replay_from: 0,
                requests: Vec::new(),
            },
            layout,
            ring,
            protection,
        }
    }
}

/// What the scheduler has heard from one UAV's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heard {
    pub sequence: u64,
    /// Start of the current unbroken run of heartbeats (no gap longer than the member timeout,
    /// no restart of the sequence).
    pub since: Instant,
    pub last: Instant,
    /// Its battery health has arrived too (the planner needs it) and is not empty (an empty
    /// battery leaves the membership).
    pub battery: bool,
}

impl Heard {
    /// The next heartbeat at `now`: the run goes on, or starts over after a silence or a restart.
    pub fn next(prev: Option<Heard>, sequence: u64, now: Instant, gap: Duration) -> Heard {
        let since = match prev {
            Some(p) if sequence > p.sequence && now.saturating_duration_since(p.last) <= gap => p.since,
            _ => now,
        };
        Heard { sequence, since, last: now, battery: prev.is_some_and(|p| p.battery) }
    }
}

/// Why a UAV that beats is kept out of plans.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Out {
    /// Declared failed at this instant.
    Failed(Instant),
    /// Retired for its battery while its heartbeat sequence was here: it rejoins only as a new
    /// process (recharged), whose sequence starts over.
    Retired(u64),
}

/// Who may be in the next plan. A UAV declared failed is a new member when it comes back: it
/// rejoins only through a new plan (the scheduler plans at request boundaries and for exact
/// restarts), and only once it has been heard without a gap for `rejoin_after` since the
/// declaration, so a UAV at the edge of radio range does not flap in and out of plans; when it
/// was never silent (a false declaration), that is `rejoin_after` after the declaration.
#[derive(Debug, Clone)]
pub struct Membership {
    pub member_timeout: Duration,
    pub rejoin_after: Duration,
    out: BTreeMap<String, Out>,
}

impl Membership {
    pub fn new(member_timeout: Duration, rejoin_after: Duration) -> Self {
        Membership { member_timeout, rejoin_after, out: BTreeMap::new() }
    }

    pub fn declare_failed(&mut self, uav: &str, now: Instant) {
        self.out.insert(uav.to_string(), Out::Failed(now));
    }

    pub fn retire(&mut self, uav: &str, sequence: u64) {
        self.out.insert(uav.to_string(), Out::Retired(sequence));
    }

    /// Kept out of plans for now.
    pub fn is_out(&self, uav: &str) -> bool {
        self.out.contains_key(uav)
    }

    /// The UAVs that may be planned at `now`, in ring order; those that have come back are
    /// members again from here on.
    pub fn members(&mut self, heard: &BTreeMap<String, Heard>, now: Instant) -> Vec<String> {
        let rejoin_after = self.rejoin_after;
        self.out.retain(|uav, out| {
            let Some(h) = heard.get(uav) else { return true };
            let back = match *out {
                Out::Failed(at) => now.saturating_duration_since(h.since.max(at)) >= rejoin_after,
                Out::Retired(sequence) => h.sequence < sequence,
            };
            if back {
                tracing::info!(%uav, "back: a member again from the next plan");
            }
            !back
        });
        self.current(heard, now)
    }

    /// The members at `now` as things stand, without moving anyone back (for reports).
    pub fn current(&self, heard: &BTreeMap<String, Heard>, now: Instant) -> Vec<String> {
        let mut m: Vec<String> = heard
            .iter()
            .filter(|(uav, h)| {
                now.saturating_duration_since(h.last) < self.member_timeout && h.battery && !self.out.contains_key(*uav)
            })
            .map(|(uav, _)| uav.clone())
            .collect();
        ring_order(&mut m);
        m
    }
}

/// The figures of a `BatteryHealth` message the scheduler and the watchdog act on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatteryHealthFields<'a> {
    pub uav_id: &'a str,
    pub energy_j: f64,
    pub capacity_j: f64,
    pub state_of_charge: f32,
    pub power_w: f64,
    pub expected_remaining_tokens: f64,
}

/// The figures of a `Heartbeat` message the scheduler acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatFields<'a> {
    pub uav_id: &'a str,
    pub layer_start: u32,
    pub layer_end: u32,
    pub replica_start: u32,
    pub replica_end: u32,
    pub compute_ms_per_layer: f64,
    pub compute_s_total: f64,
    /// Goodput of the bulk data it received, bit/s; 0 until measured (`crate::linkrate`).
    pub link_goodput_bps: f64,
    /// The radio's PHY rate toward its next hop, bit/s; 0 unknown (`crate::stations`).
    pub link_phy_bps: f64,
    /// Weights + every request's bytes ([`HeartbeatFields::kv`]).
    pub memory_bytes: u64,
    /// Weights of the layers loaded (a layer held natively and as a replica once).
    pub weight_bytes: u64,
    /// What each request it holds occupies.
    pub kv: Vec<KvHeld>,
}

/// What one request occupies on one executor (the heartbeat's `kv`, docs/design.md "Memory").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHeld {
    pub request_id: u64,
    /// Rows in the native KV caches.
    pub kv_tokens: u32,
    /// Its KV rows (native and replica layers), the predecessor's tail snapshot and the
    /// successor's buffered tail inputs held for it.
    pub kv_bytes: u64,
    /// How far its predecessor's tail of this request could be restored there (the request's
    /// `replay_from` after that predecessor fails); never more than `kv_tokens`.
    pub pred_snapshot_tokens: u32,
}

/// Most requests one heartbeat may account for (a bound on a hostile message's work).
pub const MAX_REQUESTS_HELD: usize = 64;

/// Why a telemetry message was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TelemetryReject {
    #[error("it names {named:?} but came on {topic_uav:?}'s topic")]
    WrongUav { named: String, topic_uav: String },
    #[error("{field} is {value}: not a finite number >= 0")]
    BadNumber { field: &'static str, value: f64 },
    #[error("{field} {value} is beyond any UAV battery (at most {limit})")]
    Absurd { field: &'static str, value: f64, limit: f64 },
    #[error("energy {energy_j} J exceeds the capacity {capacity_j} J")]
    EnergyAboveCapacity { energy_j: f64, capacity_j: f64 },
    #[error("capacity is 0")]
    ZeroCapacity,
    #[error("layer interval [{start}, {end}) is not within the model's {layers} layers")]
    BadInterval { start: u32, end: u32, layers: u32 },
    #[error("memory_bytes {memory_bytes} is not weight_bytes {weight_bytes} + the requests' kv_bytes {kv_bytes:?}")]
    MemoryMismatch { memory_bytes: u64, weight_bytes: u64, kv_bytes: Option<u64> },
    #[error("kv: {0}")]
    BadKv(KvReject),
}

/// Why a heartbeat's per-request memory is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KvReject {
    #[error("{0} entries, more than {MAX_REQUESTS_HELD}")]
    TooMany(usize),
    #[error("request id 0")]
    ZeroId,
    #[error("request {0} appears twice")]
    Duplicate(u64),
    #[error("request {request}: a predecessor snapshot of {snapshot} tokens, past its {kv_tokens} tokens held")]
    SnapshotPastContext { request: u64, snapshot: u32, kv_tokens: u32 },
}

fn number(field: &'static str, value: f64) -> std::result::Result<f64, TelemetryReject> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(TelemetryReject::BadNumber { field, value })
    }
}

fn same_uav(named: &str, topic_uav: &str) -> std::result::Result<(), TelemetryReject> {
    if named == topic_uav {
        Ok(())
    } else {
        Err(TelemetryReject::WrongUav { named: named.into(), topic_uav: topic_uav.into() })
    }
}

/// A battery health report from `topic_uav`'s topic that planning may use: its own UAV, finite
/// figures, energy within a real capacity. A refused report changes nothing (the last good one
/// stands); an empty battery that is reported correctly is taken (see [`is_depleted`]).
pub fn validate_battery_health(m: &BatteryHealthFields, topic_uav: &str) -> std::result::Result<(), TelemetryReject> {
    same_uav(m.uav_id, topic_uav)?;
    let energy_j = number("energy_j", m.energy_j)?;
    let capacity_j = number("capacity_j", m.capacity_j)?;
    if capacity_j == 0.0 {
        return Err(TelemetryReject::ZeroCapacity);
    }
    if capacity_j > crate::battery::MAX_CAPACITY_J {
        return Err(TelemetryReject::Absurd {
            field: "capacity_j",
            value: capacity_j,
            limit: crate::battery::MAX_CAPACITY_J,
        });
    }
    // The monitor derives energy from the charge it reads; float rounding may overshoot a little.
    if energy_j > capacity_j * (1.0 + 1e-6) {
        return Err(TelemetryReject::EnergyAboveCapacity { energy_j, capacity_j });
    }
    let soc = number("state_of_charge", f64::from(m.state_of_charge))?;
    if soc > 1.0 + 1e-6 {
        return Err(TelemetryReject::Absurd { field: "state_of_charge", value: soc, limit: 1.0 });
    }
    let power_w = number("power_w", m.power_w)?;
    if power_w > crate::battery::MAX_POWER_W {
        return Err(TelemetryReject::Absurd { field: "power_w", value: power_w, limit: crate::battery::MAX_POWER_W });
    }
    // Infinite remaining tokens is what an idle UAV reports (no energy per token yet).
    if m.expected_remaining_tokens.is_nan() || m.expected_remaining_tokens < 0.0 {
        return Err(TelemetryReject::BadNumber {
            field: "expected_remaining_tokens",
            value: m.expected_remaining_tokens,
        });
    }
    Ok(())
}

/// A battery that is really empty (a validated report): its UAV leaves the membership.
pub fn is_depleted(m: &BatteryHealthFields) -> bool {
    m.energy_j <= 0.0
}

/// A heartbeat from `topic_uav`'s topic that the scheduler may use: its own UAV, intervals within
/// the model's `layers`, finite compute figures. A stage around the gateway ends past `layers`
/// (its end is start + length); a replica's layers are numbered modulo `layers`, so its end may
/// come before its start.
pub fn validate_heartbeat(
    m: &HeartbeatFields,
    topic_uav: &str,
    layers: u32,
) -> std::result::Result<(), TelemetryReject> {
    same_uav(m.uav_id, topic_uav)?;
    let bad = |start, end| Err(TelemetryReject::BadInterval { start, end, layers });
    let (start, end) = (m.layer_start, m.layer_end);
    if start > end || start > layers || end - start > layers {
        return bad(start, end);
    }
    if m.replica_start > layers || m.replica_end > layers {
        return bad(m.replica_start, m.replica_end);
    }
    number("compute_ms_per_layer", m.compute_ms_per_layer)?;
    number("compute_s_total", m.compute_s_total)?;
    let goodput = number("link_goodput_bps", m.link_goodput_bps)?;
    if goodput > crate::linkrate::MAX_GOODPUT_BPS {
        return Err(TelemetryReject::Absurd {
            field: "link_goodput_bps",
            value: goodput,
            limit: crate::linkrate::MAX_GOODPUT_BPS,
        });
    }
    let phy = number("link_phy_bps", m.link_phy_bps)?;
    if phy > crate::stations::MAX_PHY_BPS {
        return Err(TelemetryReject::Absurd { field: "link_phy_bps", value: phy, limit: crate::stations::MAX_PHY_BPS });
    }
    validate_memory(m)
}

/// The heartbeat's memory adds up: at most [`MAX_REQUESTS_HELD`] requests with distinct non-zero
/// ids, each with a predecessor snapshot no longer than its rows, and `memory_bytes` =
/// `weight_bytes` + their bytes (without overflow).
fn validate_memory(m: &HeartbeatFields) -> std::result::Result<(), TelemetryReject> {
    if m.kv.len() > MAX_REQUESTS_HELD {
        return Err(TelemetryReject::BadKv(KvReject::TooMany(m.kv.len())));
    }
    let mut ids = std::collections::BTreeSet::new();
    for k in &m.kv {
        if k.request_id == 0 {
            return Err(TelemetryReject::BadKv(KvReject::ZeroId));
        }
        if !ids.insert(k.request_id) {
            return Err(TelemetryReject::BadKv(KvReject::Duplicate(k.request_id)));
        }
        if k.pred_snapshot_tokens > k.kv_tokens {
            return Err(TelemetryReject::BadKv(KvReject::SnapshotPastContext {
                request: k.request_id,
                snapshot: k.pred_snapshot_tokens,
                kv_tokens: k.kv_tokens,
            }));
        }
    }
    let kv_bytes = m.kv.iter().try_fold(0u64, |sum, k| sum.checked_add(k.kv_bytes));
    if kv_bytes.and_then(|kv| kv.checked_add(m.weight_bytes)) != Some(m.memory_bytes) {
        return Err(TelemetryReject::MemoryMismatch {
            memory_bytes: m.memory_bytes,
            weight_bytes: m.weight_bytes,
            kv_bytes,
        });
    }
    Ok(())
}

/// Refused messages of one kind, counted; says which refusals deserve a log line (the 1st, 2nd,
/// 4th, 8th ...), so that a stream of bad messages cannot flood the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rejects {
    pub count: u64,
}

impl Rejects {
    /// Counts one refusal; true when it should be logged.
    pub fn note(&mut self) -> bool {
        self.count += 1;
        self.count.is_power_of_two()
    }
}

/// The telemetry messages the scheduler and the watchdog take from every UAV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TelemetryKind {
    Heartbeat,
    BatteryHealth,
}

/// Refused telemetry, counted per UAV and kind.
#[derive(Debug, Default, Clone)]
pub struct TelemetryRejects(BTreeMap<(String, TelemetryKind), Rejects>);

impl TelemetryRejects {
    /// Messages refused so far, every UAV and kind.
    pub fn total(&self) -> u64 {
        self.0.values().map(|r| r.count).sum()
    }

    /// Counts one refusal; its count when it deserves a log line.
    pub fn note(&mut self, uav: &str, kind: TelemetryKind) -> Option<u64> {
        let r = self.0.entry((uav.to_string(), kind)).or_default();
        r.note().then_some(r.count)
    }

    /// True when a message passed its check; counts (and now and then logs) one that did not.
    pub fn passed(
        &mut self,
        uav: &str,
        kind: TelemetryKind,
        checked: std::result::Result<(), TelemetryReject>,
    ) -> bool {
        let Err(why) = checked else { return true };
        if let Some(count) = self.note(uav, kind) {
            tracing::warn!(%uav, ?kind, count, "telemetry refused: {why}");
        }
        false
    }

    pub fn count(&self, uav: &str, kind: TelemetryKind) -> u64 {
        self.0.get(&(uav.to_string(), kind)).map_or(0, |r| r.count)
    }
}

/// `uav2` before `uav10`: names compared by their text, then by the number they end with.
pub fn ring_order(names: &mut [String]) {
    fn key(s: &str) -> (String, u64, String) {
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (stem, num) = s.split_at(s.len() - digits);
        (stem.to_string(), num.parse().unwrap_or(0), s.to_string())
    }
    names.sort_by_key(|a| key(a));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller::new(
            PlanConfig { deadline_s: 3.0, weight_load_bps: 8e9, ..PlanConfig::default() },
            Airframe {
                flight_power_w: 80.0,
                compute_power_w: 35.0,
                tx_power_w: 2.5,
                link_bps: 20e6,
                memory_bytes: 2e9,
            },
            ModelSize { num_layers: 30, weight_bytes_per_layer: 3.0e6, kv_bytes_per_token_layer: 1536.0 },
        )
    }

    fn telemetry(names: &[&str], energy: &[f64]) -> BTreeMap<String, Telemetry> {
        names
            .iter()
            .zip(energy)
            .map(|(n, &e)| {
                (n.to_string(), Telemetry { energy_j: e, capacity_j: 2.7e6, layer_latency_s: 2e-3, link_bps: None })
            })
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ring_order_is_natural() {
        let mut v = names(&["uav10", "uav2", "uav1"]);
        ring_order(&mut v);
        assert_eq!(v, names(&["uav1", "uav2", "uav10"]));
    }

    #[test]
    fn a_low_battery_gets_fewer_layers_and_the_plan_is_valid() {
        let mut c = controller();
        let m = names(&["uav1", "uav2", "uav3", "uav4"]);
        let t = telemetry(&["uav1", "uav2", "uav3", "uav4"], &[2.7e6, 2.7e4, 2.7e6, 2.7e6]);
        let p = c.initial(&m, &t, 256, 1, 7).unwrap();
        p.plan.validate().unwrap();
        let len = |u: &str| p.plan.stage(u).unwrap().len;
        assert!(len("uav2") < len("uav1") && len("uav2") < len("uav3"), "{:?}", p.plan.stages);
        assert_eq!(p.plan.first().unwrap().uav, "uav1");
    }

    #[test]
    fn failover_keeps_every_layer_on_held_state() {
        let mut c = controller();
        let m = names(&["uav1", "uav2", "uav3", "uav4"]);
        let t = telemetry(&["uav1", "uav2", "uav3", "uav4"], &[2.7e6; 4]);
        let p = c.initial(&m, &t, 256, 1, 7).unwrap();
        for failed in ["uav1", "uav2", "uav4"] {
            let f = c.failover(&p, failed, &t, 256, 40, None, 2, false).unwrap();
            f.plan.validate().unwrap();
            assert!(f.plan.stage(failed).is_none());
            assert_eq!((f.plan.epoch, f.plan.resume_position, f.plan.request_id, f.plan.replay_from), (2, 40, 7, 0));
            // The replay starts where the successor's snapshot ends, never past the resume position.
            assert_eq!(c.failover(&p, failed, &t, 256, 40, Some(32), 2, false).unwrap().plan.replay_from, 32);
            assert_eq!(c.failover(&p, failed, &t, 256, 40, Some(64), 2, false).unwrap().plan.replay_from, 40);
            // the failed UAV's head went to its predecessor, its tail to its successor
            let old = p.plan.stage(failed).unwrap();
            let (pred, succ) = (p.plan.pred(failed).unwrap(), p.plan.succ(failed).unwrap());
            for layer in p.plan.layers(old) {
                let owner = &f.plan.owner(layer).unwrap().uav;
                assert!(
                    owner == &pred.uav || owner == &succ.uav || p.plan.stage(owner).is_some(),
                    "{layer} -> {owner}"
                );
            }
        }
        assert!(matches!(c.failover(&p, "uav9", &t, 256, 40, None, 2, false), Err(ControlError::NotMember(_))));
    }

    fn health(energy_j: f64) -> BatteryHealthFields<'static> {
        BatteryHealthFields {
            uav_id: "uav1",
            energy_j,
            capacity_j: 2.7e6,
            state_of_charge: (energy_j / 2.7e6) as f32,
            power_w: 120.0,
            expected_remaining_tokens: 1e5,
        }
    }

    #[test]
    fn battery_health_is_checked_before_planning_uses_it() {
        assert_eq!(validate_battery_health(&health(1.35e6), "uav1"), Ok(()));
        // An empty battery is a valid report, and its UAV leaves the membership.
        assert_eq!(validate_battery_health(&health(0.0), "uav1"), Ok(()));
        assert!(is_depleted(&health(0.0)) && !is_depleted(&health(1.0)));
        let idle = BatteryHealthFields { expected_remaining_tokens: f64::INFINITY, ..health(1e6) };
        assert_eq!(validate_battery_health(&idle, "uav1"), Ok(()));
        let refused = |m: BatteryHealthFields| validate_battery_health(&m, "uav1").unwrap_err();
        assert!(matches!(refused(health(f64::NAN)), TelemetryReject::BadNumber { field: "energy_j", .. }));
        assert!(matches!(refused(health(-5.0)), TelemetryReject::BadNumber { field: "energy_j", .. }));
        assert!(matches!(refused(health(3e6)), TelemetryReject::EnergyAboveCapacity { .. }));
        assert_eq!(
            refused(BatteryHealthFields { capacity_j: 0.0, energy_j: 0.0, ..health(0.0) }),
            TelemetryReject::ZeroCapacity
        );
        let huge = BatteryHealthFields { capacity_j: 1e12, ..health(1e6) };
        assert!(matches!(refused(huge), TelemetryReject::Absurd { field: "capacity_j", .. }));
        let soc = BatteryHealthFields { state_of_charge: 7.0, ..health(1e6) };
        assert!(matches!(refused(soc), TelemetryReject::Absurd { field: "state_of_charge", .. }));
        let power = BatteryHealthFields { power_w: f64::INFINITY, ..health(1e6) };
        assert!(matches!(refused(power), TelemetryReject::BadNumber { field: "power_w", .. }));
        let tokens = BatteryHealthFields { expected_remaining_tokens: f64::NAN, ..health(1e6) };
        assert!(matches!(refused(tokens), TelemetryReject::BadNumber { field: "expected_remaining_tokens", .. }));
        // Another UAV's name on this UAV's topic.
        assert!(matches!(validate_battery_health(&health(1e6), "uav2"), Err(TelemetryReject::WrongUav { .. })));
    }

    #[test]
    fn heartbeats_are_checked_before_the_scheduler_uses_them() {
        let hb = HeartbeatFields {
            uav_id: "uav1",
            layer_start: 0,
            layer_end: 8,
            replica_start: 8,
            replica_end: 10,
            compute_ms_per_layer: 0.4,
            compute_s_total: 12.0,
            link_goodput_bps: 0.0,
            link_phy_bps: 0.0,
            memory_bytes: 0,
            weight_bytes: 0,
            kv: Vec::new(),
        };
        assert_eq!(validate_heartbeat(&hb, "uav1", 30), Ok(()));
        assert_eq!(
            validate_heartbeat(
                &HeartbeatFields { layer_end: 0, replica_start: 0, replica_end: 0, ..hb.clone() },
                "uav1",
                30
            ),
            Ok(())
        );
        assert!(matches!(validate_heartbeat(&hb, "uav3", 30), Err(TelemetryReject::WrongUav { .. })));
        assert!(matches!(validate_heartbeat(&hb, "uav1", 9), Err(TelemetryReject::BadInterval { end: 10, .. })));
        let around_the_gateway =
            HeartbeatFields { layer_start: 25, layer_end: 35, replica_start: 29, replica_end: 1, ..hb.clone() };
        assert_eq!(validate_heartbeat(&around_the_gateway, "uav1", 30), Ok(()));
        let too_long = HeartbeatFields { layer_start: 25, layer_end: 56, ..hb.clone() };
        assert!(matches!(validate_heartbeat(&too_long, "uav1", 30), Err(TelemetryReject::BadInterval { .. })));
        let reversed = HeartbeatFields { layer_start: 9, ..hb.clone() };
        assert!(matches!(
            validate_heartbeat(&reversed, "uav1", 30),
            Err(TelemetryReject::BadInterval { start: 9, .. })
        ));
        let nan = HeartbeatFields { compute_s_total: f64::NAN, ..hb.clone() };
        assert!(matches!(validate_heartbeat(&nan, "uav1", 30), Err(TelemetryReject::BadNumber { .. })));
        let negative = HeartbeatFields { compute_ms_per_layer: -1.0, ..hb.clone() };
        assert!(matches!(validate_heartbeat(&negative, "uav1", 30), Err(TelemetryReject::BadNumber { .. })));
        let measured = HeartbeatFields { link_goodput_bps: 18e6, ..hb.clone() };
        assert_eq!(validate_heartbeat(&measured, "uav1", 30), Ok(()));
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let goodput = HeartbeatFields { link_goodput_bps: bad, ..hb.clone() };
            assert!(matches!(
                validate_heartbeat(&goodput, "uav1", 30),
                Err(TelemetryReject::BadNumber { field: "link_goodput_bps", .. })
            ));
        }
        let absurd = HeartbeatFields { link_goodput_bps: 1e15, ..hb.clone() };
        assert!(matches!(validate_heartbeat(&absurd, "uav1", 30), Err(TelemetryReject::Absurd { .. })));
        let phy = HeartbeatFields { link_phy_bps: 54e6, ..hb.clone() };
        assert_eq!(validate_heartbeat(&phy, "uav1", 30), Ok(()));
        for bad in [f64::NAN, -1.0, f64::NEG_INFINITY, f64::INFINITY] {
            let r = validate_heartbeat(&HeartbeatFields { link_phy_bps: bad, ..hb.clone() }, "uav1", 30);
            assert!(matches!(r, Err(TelemetryReject::BadNumber { field: "link_phy_bps", .. })), "{bad}: {r:?}");
        }
        let absurd = HeartbeatFields { link_phy_bps: 2e11, ..hb.clone() };
        assert!(matches!(
            validate_heartbeat(&absurd, "uav1", 30),
            Err(TelemetryReject::Absurd { field: "link_phy_bps", .. })
        ));
        // Memory: weights + every request's bytes, requests named once each.
        let held = |id, kv_bytes| KvHeld { request_id: id, kv_tokens: 3, kv_bytes, pred_snapshot_tokens: 2 };
        let memory = HeartbeatFields {
            memory_bytes: 1_000,
            weight_bytes: 700,
            kv: vec![held(4, 100), held(5, 200)],
            ..hb.clone()
        };
        assert_eq!(validate_heartbeat(&memory, "uav1", 30), Ok(()));
        let refused = |m: HeartbeatFields| validate_heartbeat(&m, "uav1", 30).unwrap_err();
        assert_eq!(
            refused(HeartbeatFields { memory_bytes: 999, ..memory.clone() }),
            TelemetryReject::MemoryMismatch { memory_bytes: 999, weight_bytes: 700, kv_bytes: Some(300) }
        );
        let overflow = HeartbeatFields { kv: vec![held(4, u64::MAX), held(5, 1)], ..memory.clone() };
        assert!(matches!(refused(overflow), TelemetryReject::MemoryMismatch { kv_bytes: None, .. }));
        let wrapped = HeartbeatFields { memory_bytes: 99, weight_bytes: u64::MAX, ..memory.clone() };
        assert!(matches!(refused(wrapped), TelemetryReject::MemoryMismatch { .. }));
        assert_eq!(
            refused(HeartbeatFields { kv: vec![held(4, 100), held(4, 200)], ..memory.clone() }),
            TelemetryReject::BadKv(KvReject::Duplicate(4))
        );
        assert_eq!(
            refused(HeartbeatFields { kv: vec![held(0, 300)], ..memory.clone() }),
            TelemetryReject::BadKv(KvReject::ZeroId)
        );
        let many = (1..=65).map(|id| held(id, 0)).collect();
        assert_eq!(
            refused(HeartbeatFields { kv: many, memory_bytes: 700, ..memory.clone() }),
            TelemetryReject::BadKv(KvReject::TooMany(65))
        );
        // A request's predecessor snapshot is never past the rows it holds (up to them: fine).
        let full = KvHeld { pred_snapshot_tokens: 3, ..held(5, 200) };
        assert_eq!(
            validate_heartbeat(&HeartbeatFields { kv: vec![held(4, 100), full], ..memory.clone() }, "uav1", 30),
            Ok(())
        );
        let past = KvHeld { pred_snapshot_tokens: 4, ..held(5, 200) };
        assert_eq!(
            refused(HeartbeatFields { kv: vec![held(4, 100), past], ..memory.clone() }),
            TelemetryReject::BadKv(KvReject::SnapshotPastContext { request: 5, snapshot: 4, kv_tokens: 3 })
        );
    }

    #[test]
    fn the_prediction_follows_the_codec_and_the_measured_link_rate() {
        let mut c = controller();
        c.config.channel = Some(aerokv_plan::Channel { frame_loss: 0.05, ..Default::default() });
        let m = names(&["uav1", "uav2", "uav3"]);
        let mut t = telemetry(&["uav1", "uav2", "uav3"], &[2.7e6; 3]);
        let p = c.initial(&m, &t, 64, 1, 1).unwrap();
        let raw = crate::linkrate::traffic(aerokv_codec::ActivationCodec::Raw, aerokv_codec::KvCodec::Raw, 576, 0.002);
        let int8 =
            crate::linkrate::traffic(aerokv_codec::ActivationCodec::Int8, aerokv_codec::KvCodec::Raw, 576, 0.002);
        let at_configured = c.predict(&p, &t, &raw).unwrap();
        // Fewer bytes per token: less airtime, more tokens/s.
        let smaller = c.predict(&p, &t, &int8).unwrap();
        assert!(smaller.activation_airtime_s < at_configured.activation_airtime_s / 2.0);
        assert!(smaller.tokens_per_s > at_configured.tokens_per_s);
        // A measured slow link (6 Mbit/s instead of 20) costs airtime; the planner sees it too.
        for v in t.values_mut() {
            v.link_bps = Some(6e6);
        }
        let slow = c.predict(&p, &t, &raw).unwrap();
        assert!(slow.activation_airtime_s > 2.0 * at_configured.activation_airtime_s);
        assert!(slow.tokens_per_s < at_configured.tokens_per_s);
        assert!(c.swarm(&m, &t).unwrap().uavs.iter().all(|u| u.link_bps == 6e6));
        // A UAV outside the telemetry cannot be predicted.
        t.remove("uav2");
        assert!(matches!(c.predict(&p, &t, &raw), Err(ControlError::NoTelemetry(_))));
    }

    #[test]
    fn rejects_log_at_powers_of_two() {
        let mut r = Rejects::default();
        let logged: Vec<u64> = (1..=20).filter(|_| r.note()).collect();
        assert_eq!((logged, r.count), (vec![1, 2, 4, 8, 16], 20));
    }

    #[test]
    fn telemetry_rejects_count_per_uav_and_kind() {
        let mut r = TelemetryRejects::default();
        assert_eq!(r.note("uav1", TelemetryKind::Heartbeat), Some(1));
        assert_eq!(r.note("uav1", TelemetryKind::Heartbeat), Some(2));
        assert_eq!(r.note("uav1", TelemetryKind::Heartbeat), None);
        assert_eq!(r.note("uav1", TelemetryKind::BatteryHealth), Some(1));
        assert_eq!((r.count("uav1", TelemetryKind::Heartbeat), r.count("uav2", TelemetryKind::Heartbeat)), (3, 0));
    }

    #[test]
    fn a_uav_declared_failed_rejoins_once_heard_without_a_gap_for_a_while() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let (timeout, rejoin) = (Duration::from_secs(2), Duration::from_secs(1));
        let mut m = Membership::new(timeout, rejoin);
        let mut heard = BTreeMap::new();
        let beat = |heard: &mut BTreeMap<String, Heard>, uav: &str, seq: u64, at: f64| {
            let prev = heard.get(uav).copied();
            let mut h = Heard::next(prev, seq, s(at), timeout);
            h.battery = true;
            heard.insert(uav.to_string(), h);
        };
        // uav1 beats every 0.5 s throughout; uav2 as given.
        let members_at = |m: &mut Membership, heard: &mut BTreeMap<String, Heard>, at: f64| {
            beat(heard, "uav1", (at * 20.0) as u64, at);
            m.members(heard, s(at))
        };
        for i in 0..=20 {
            beat(&mut heard, "uav2", i, i as f64 * 0.05);
        }
        assert_eq!(members_at(&mut m, &mut heard, 1.0), names(&["uav1", "uav2"]));
        // uav2 flies out of range at 1.0 s, is declared failed at 2.0 s, comes back at 5.0 s with
        // its sequence far ahead (it kept beating while cut off).
        m.declare_failed("uav2", s(2.0));
        assert_eq!(members_at(&mut m, &mut heard, 2.0), names(&["uav1"]));
        beat(&mut heard, "uav2", 100, 5.0);
        assert_eq!(heard["uav2"].since, s(5.0), "a silence starts a new run");
        assert_eq!(members_at(&mut m, &mut heard, 5.0), names(&["uav1"]), "one heartbeat back is not enough");
        beat(&mut heard, "uav2", 101, 5.6);
        assert_eq!(members_at(&mut m, &mut heard, 5.6), names(&["uav1"]));
        // Out again before a second had passed (the edge of range): the run starts over.
        beat(&mut heard, "uav2", 140, 8.0);
        assert_eq!(members_at(&mut m, &mut heard, 8.5), names(&["uav1"]));
        beat(&mut heard, "uav2", 160, 9.0);
        assert_eq!(members_at(&mut m, &mut heard, 9.0), names(&["uav1", "uav2"]), "heard for 1 s without a gap");
        assert!(!m.is_out("uav2"));

        // A false declaration (it never went silent): back one rejoin period after it.
        m.declare_failed("uav1", s(9.0));
        assert_eq!(members_at(&mut m, &mut heard, 9.5), names(&["uav2"]));
        beat(&mut heard, "uav2", 180, 10.0);
        assert_eq!(members_at(&mut m, &mut heard, 10.0), names(&["uav1", "uav2"]));

        // Retired for its battery: out until it restarts (its sequence starts over).
        m.retire("uav2", 180);
        beat(&mut heard, "uav2", 181, 10.5);
        assert_eq!(members_at(&mut m, &mut heard, 11.0), names(&["uav1"]));
        beat(&mut heard, "uav2", 1, 12.0);
        assert_eq!(members_at(&mut m, &mut heard, 12.0), names(&["uav1", "uav2"]));
        // Silent longer than the member timeout, or without battery health: not planned.
        assert_eq!(members_at(&mut m, &mut heard, 14.5), names(&["uav1"]));
        beat(&mut heard, "uav2", 2, 14.5);
        heard.get_mut("uav2").unwrap().battery = false;
        assert_eq!(members_at(&mut m, &mut heard, 14.5), names(&["uav1"]));
    }

    #[test]
    fn missing_telemetry_is_named() {
        let mut c = controller();
        let t = telemetry(&["uav1"], &[2.7e6]);
        let e = c.initial(&names(&["uav1", "uav2"]), &t, 64, 1, 0).unwrap_err();
        assert!(e.to_string().contains("uav2"), "{e}");
    }
}
