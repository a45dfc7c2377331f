//! One mission, token by token, for one method.
//!
//! Between events every UAV's per-token cost is constant except for the battery model, so the
//! per-token rates are recomputed only after an event and every `RATE_REFRESH` tokens.
//! Failures: a Poisson number of events at uniform tokens, each at a uniformly chosen surviving
//! UAV; the same draws are used for every method so methods face the same failures.
//! Rebuilding protection after a re-plan (replica KV copies, first full snapshots) runs in the
//! background: it costs radio energy and its duration is reported, but it does not stall
//! generation. Recovery itself stalls generation (that is the latency checked against tau).
use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tracing::debug;

use aerokv_plan::{
    evaluate, plan_failover, plan_fixed, plan_initial_layout, plan_protection, plan_protection_beam,
    plan_protection_relaxed, plan_recovery, retirements_due, uniform_layout, FixedPolicy, Layout, ModelSpec, PlanError,
    Protection, ProtectionPlan, RecoveryContext, RecoveryPlan, Ring, SwarmState, UavId, UavState,
};

use crate::error::SimError;
use crate::scenario::Scenario;

const RATE_REFRESH: u64 = 16;
const UAV_TRACE_EVERY: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Np,
    Oo,
    So,
    AeroKv,
    AeroKvNoP2,
    AeroKvUniform,
    AeroKvBeam,
    AeroKvNoRetire,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Np => "np",
            Method::Oo => "oo",
            Method::So => "so",
            Method::AeroKv => "aerokv",
            Method::AeroKvNoP2 => "aerokv-nop2",
            Method::AeroKvUniform => "aerokv-uniform",
            Method::AeroKvBeam => "aerokv-beam",
            Method::AeroKvNoRetire => "aerokv-noretire",
        }
    }
    pub fn parse(s: &str) -> Result<Self, SimError> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "np" => Method::Np,
            "oo" => Method::Oo,
            "so" => Method::So,
            "aerokv" => Method::AeroKv,
            "aerokv-nop2" => Method::AeroKvNoP2,
            "aerokv-uniform" => Method::AeroKvUniform,
            "aerokv-beam" => Method::AeroKvBeam,
            "aerokv-noretire" => Method::AeroKvNoRetire,
            other => return Err(SimError::UnknownMethod(other.to_string())),
        })
    }
    pub fn parse_list(s: &str) -> Result<Vec<Self>, SimError> {
        s.split(',').filter(|x| !x.trim().is_empty()).map(Method::parse).collect()
    }
    fn is_aerokv(&self) -> bool {
        matches!(
            self,
            Method::AeroKv | Method::AeroKvNoP2 | Method::AeroKvUniform | Method::AeroKvBeam | Method::AeroKvNoRetire
        )
    }
}

/// One scheduled failure: after `token` tokens, the UAV at `pick` x (number of survivors).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureEvent {
    pub token: u64,
    pub pick: f64,
}

/// Poisson failure draws for a seed (independent of the method).
pub fn failure_events(scn: &Scenario, seed: u64) -> Vec<FailureEvent> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_FA11_u64);
    // Knuth's method is fine for the small means used here
    let lambda = scn.expected_failures;
    let limit = (-lambda).exp();
    let mut count = 0u32;
    let mut p = 1.0f64;
    loop {
        p *= rng.gen::<f64>();
        if p <= limit || count > 10_000 {
            break;
        }
        count += 1;
    }
    let mut ev: Vec<FailureEvent> = (0..count)
        .map(|_| FailureEvent { token: rng.gen_range(1..scn.tokens.max(2)), pick: rng.gen::<f64>() })
        .collect();
    ev.sort_by_key(|e| e.token);
    ev
}

/// One recovery as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryRecord {
    pub method: String,
    pub token: u64,
    pub uav: UavId,
    pub kind: String,
    pub pred: UavId,
    pub succ: UavId,
    pub head_layers: u32,
    pub tail_layers: u32,
    pub replay_tokens: u64,
    pub recovery_s: f64,
    pub deadline_met: bool,
    pub rebuild_s: f64,
    pub rebuild_tx_j: f64,
    pub moved_layers: u32,
}

/// Per-token trace row.
#[derive(Clone, Debug, Serialize)]
pub struct TokenRow {
    pub method: String,
    pub token: u64,
    pub time_s: f64,
    pub latency_s: f64,
    pub epoch: u64,
    pub alive: usize,
    pub min_energy_j: f64,
    pub event: String,
}

/// Per-UAV trace row (every 64 tokens and at events).
#[derive(Clone, Debug, Serialize)]
pub struct UavRow {
    pub method: String,
    pub token: u64,
    pub time_s: f64,
    pub uav: UavId,
    pub alive: bool,
    pub energy_j: f64,
    pub native_layers: u32,
    pub replica_layers: u32,
    pub snapshot_layers: u32,
    pub memory_bytes: f64,
    pub power_fraction: f64,
}

/// Summary of one mission of one method (one row of summary.csv).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub method: String,
    pub seed: u64,
    pub mission_success: bool,
    pub failure_reason: String,
    pub tokens_done: u64,
    pub completion_s: f64,
    pub failures: u32,
    pub retirements: u32,
    pub total_recovery_latency_s: f64,
    pub max_recovery_latency_s: f64,
    pub deadline_met: bool,
    pub deadline_misses: u32,
    pub tx_energy_j: f64,
    pub protection_compute_energy_j: f64,
    pub reconfiguration_energy_j: f64,
    pub min_remaining_energy_j: f64,
    pub avg_remaining_energy_j: f64,
    pub peak_memory_bytes: f64,
    pub peak_memory_fraction: f64,
    pub expected_remaining_tokens: f64,
}

/// Everything one mission produced.
#[derive(Clone, Debug, Default)]
pub struct MissionOutput {
    pub summary: Option<Summary>,
    pub tokens: Vec<TokenRow>,
    pub uavs: Vec<UavRow>,
    pub recoveries: Vec<RecoveryRecord>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Random,
    Battery,
    Retire,
}

struct Rates {
    latency: f64,
    /// per UAV id: (flight + native + replica compute per token, replica compute per token)
    per_uav: BTreeMap<UavId, (f64, f64)>,
}

struct Run<'a> {
    scn: &'a Scenario,
    method: Method,
    seed: u64,
    model: ModelSpec,
    all: Vec<UavState>,
    alive: Vec<bool>,
    layout: Layout,
    ring: Ring,
    plan: ProtectionPlan,
    /// token at which each UAV's current snapshot schedule started
    snap_base: BTreeMap<UavId, u64>,
    epoch: u64,
    time: f64,
    traces: bool,
    out: MissionOutput,
    s: Summary,
}

/// Simulate one mission of `method` for `seed`. `traces`: keep per-token and per-UAV rows.
pub fn run_mission(scn: &Scenario, method: Method, seed: u64, traces: bool) -> MissionOutput {
    run_mission_with(scn, method, seed, &failure_events(scn, seed), traces)
}

/// Same, with given failure events (tests, what-if studies). The swarm still comes from `seed`.
pub fn run_mission_with(
    scn: &Scenario,
    method: Method,
    seed: u64,
    events: &[FailureEvent],
    traces: bool,
) -> MissionOutput {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let swarm = scn.swarm(&mut rng);
    let model = scn.model();
    let mut s = Summary {
        method: method.name().to_string(),
        seed,
        mission_success: false,
        failure_reason: String::new(),
        tokens_done: 0,
        completion_s: 0.0,
        failures: 0,
        retirements: 0,
        total_recovery_latency_s: 0.0,
        max_recovery_latency_s: 0.0,
        deadline_met: true,
        deadline_misses: 0,
        tx_energy_j: 0.0,
        protection_compute_energy_j: 0.0,
        reconfiguration_energy_j: 0.0,
        min_remaining_energy_j: 0.0,
        avg_remaining_energy_j: 0.0,
        peak_memory_bytes: 0.0,
        peak_memory_fraction: 0.0,
        expected_remaining_tokens: 0.0,
    };
    let setup = initial_state(&swarm, &model, method, scn);
    let (layout, plan) = match setup {
        Ok(x) => x,
        Err(e) => {
            s.failure_reason = format!("initial plan: {e}");
            return MissionOutput { summary: Some(s), ..Default::default() };
        }
    };
    let ring = layout.ring();
    let n = swarm.uavs.len();
    let mut run = Run {
        scn,
        method,
        seed,
        model,
        snap_base: swarm.uavs.iter().map(|u| (u.id, 0)).collect(),
        all: swarm.uavs,
        alive: vec![true; n],
        layout,
        ring,
        plan,
        epoch: 1,
        time: 0.0,
        traces,
        out: MissionOutput::default(),
        s,
    };
    run.simulate(events);
    let mut out = run.out;
    out.summary = Some(run.s);
    out
}

fn initial_state(
    swarm: &SwarmState,
    model: &ModelSpec,
    method: Method,
    scn: &Scenario,
) -> Result<(Layout, ProtectionPlan), PlanError> {
    let ring = Ring::new(swarm.uavs.iter().map(|u| u.id).collect())?;
    let layout = match method {
        Method::Np | Method::Oo | Method::So | Method::AeroKvUniform => uniform_layout(model, &ring)?,
        _ => plan_initial_layout(swarm, model)?,
    };
    let plan = protect(swarm, model, &layout, &layout.ring(), method, scn)?;
    Ok((layout, plan))
}

/// The protection policy of each method.
fn protect(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    method: Method,
    scn: &Scenario,
) -> Result<ProtectionPlan, PlanError> {
    if ring.len() < 2 {
        return Ok(ProtectionPlan::none(layout));
    }
    match method {
        Method::Np => plan_fixed(swarm, model, layout, ring, FixedPolicy::None),
        Method::Oo => plan_fixed(swarm, model, layout, ring, FixedPolicy::OverlapOnly),
        Method::So => plan_fixed(swarm, model, layout, ring, FixedPolicy::SnapshotOnly { period: scn.so_period }),
        Method::AeroKvBeam => match plan_protection_beam(swarm, model, layout, ring, 256) {
            Ok(p) => Ok(p),
            Err(_) => plan_protection_relaxed(swarm, model, layout, ring),
        },
        _ => match plan_protection(swarm, model, layout, ring) {
            Ok(p) => Ok(p),
            Err(PlanError::ProtectionMemory(why)) => {
                debug!(%why, "strict P1 infeasible, relaxed plan");
                plan_protection_relaxed(swarm, model, layout, ring)
            }
            Err(e) => Err(e),
        },
    }
}

impl Run<'_> {
    fn live_swarm(&self, include: Option<UavId>) -> SwarmState {
        // A battery that ran out during the step just taken is empty, not negative: the planner
        // sees 0 J, and the next event check declares that UAV dead.
        let view = |u: &UavState| UavState { energy_j: u.energy_j.max(0.0), ..u.clone() };
        SwarmState {
            uavs: self.all.iter().filter(|u| self.alive[u.id as usize] || Some(u.id) == include).map(view).collect(),
            config: self.scn.config(),
        }
    }

    fn fail(&mut self, reason: String) {
        self.s.mission_success = false;
        if self.s.failure_reason.is_empty() {
            self.s.failure_reason = reason;
        }
    }

    fn rates(&mut self, t: u64) -> Option<Rates> {
        let swarm = self.live_swarm(None);
        self.model.tokens_done = t;
        let cost = match evaluate(&swarm, &self.model, &self.layout, &self.ring, &self.plan, t) {
            Ok(c) => c,
            Err(e) => {
                self.fail(format!("cost model: {e}"));
                return None;
            }
        };
        let mut per_uav = BTreeMap::new();
        for c in &cost.per_uav {
            let mem = c.memory.total();
            if mem > self.s.peak_memory_bytes {
                self.s.peak_memory_bytes = mem;
            }
            let frac = if c.memory_budget_bytes > 0.0 { mem / c.memory_budget_bytes } else { f64::INFINITY };
            self.s.peak_memory_fraction = self.s.peak_memory_fraction.max(frac);
            if mem > c.memory_budget_bytes * (1.0 + 1e-9) {
                self.fail(format!(
                    "memory_exceeded: uav {} needs {:.2} GiB of {:.2} GiB at token {t}",
                    c.uav,
                    mem / 1024f64.powi(3),
                    c.memory_budget_bytes / 1024f64.powi(3)
                ));
                return None;
            }
            per_uav.insert(
                c.uav,
                (
                    c.energy.flight_j + c.energy.native_compute_j + c.energy.replica_compute_j,
                    c.energy.replica_compute_j,
                ),
            );
        }
        Some(Rates { latency: cost.pipeline_latency_s, per_uav })
    }

    fn trace_uavs(&mut self, t: u64) {
        if !self.traces {
            return;
        }
        let swarm = self.live_swarm(None);
        let cost = evaluate(&swarm, &self.model, &self.layout, &self.ring, &self.plan, t).ok();
        for u in &self.all {
            let c = cost.as_ref().and_then(|c| c.per_uav.iter().find(|x| x.uav == u.id));
            self.out.uavs.push(UavRow {
                method: self.method.name().into(),
                token: t,
                time_s: self.time,
                uav: u.id,
                alive: self.alive[u.id as usize],
                energy_j: u.energy_j,
                native_layers: c.map_or(0, |c| c.native_layers),
                replica_layers: c.map_or(0, |c| c.replica_layers),
                snapshot_layers: c.map_or(0, |c| c.snapshot_layers),
                memory_bytes: c.map_or(0.0, |c| c.memory.total()),
                power_fraction: c.map_or(0.0, |c| c.effective.power_fraction),
            });
        }
    }

    fn simulate(&mut self, events: &[FailureEvent]) {
        let n_tokens = self.scn.tokens;
        let mut ev = 0usize;
        let mut rates: Option<Rates> = None;
        let mut event_label = String::new();
        self.s.mission_success = true;
        for t in 0..n_tokens {
            let mut dirty = rates.is_none() || t % RATE_REFRESH == 0;
            // scheduled failures after t tokens
            while ev < events.len() && events[ev].token == t {
                let alive: Vec<UavId> = self.ring.order().to_vec();
                let pick = ((events[ev].pick * alive.len() as f64) as usize).min(alive.len().saturating_sub(1));
                ev += 1;
                if let Some(&u) = alive.get(pick) {
                    event_label = format!("fail:{u}");
                    if !self.handle(u, Kind::Random, t) {
                        return self.finish(t);
                    }
                    dirty = true;
                }
            }
            // empty batteries
            let dead: Vec<UavId> =
                self.ring.order().iter().copied().filter(|&u| self.all[u as usize].energy_j <= 0.0).collect();
            for u in dead {
                event_label = format!("battery:{u}");
                if !self.handle(u, Kind::Battery, t) {
                    return self.finish(t);
                }
                dirty = true;
            }
            // planned retirement
            if self.method.is_aerokv()
                && self.method != Method::AeroKvNoRetire
                && (dirty || t % UAV_TRACE_EVERY == 0)
                && self.ring.len() > 2
            {
                let swarm = self.live_swarm(None);
                self.model.tokens_done = t;
                // the last check before it would die (checks run every UAV_TRACE_EVERY tokens)
                let horizon = 2 * UAV_TRACE_EVERY;
                if let Ok(c) = retirements_due(&swarm, &self.model, &self.layout, &self.ring, &self.plan, horizon) {
                    if let Some(&u) = c.first() {
                        event_label = format!("retire:{u}");
                        if !self.handle(u, Kind::Retire, t) {
                            return self.finish(t);
                        }
                        dirty = true;
                    }
                }
            }
            if dirty {
                rates = self.rates(t);
                if rates.is_none() {
                    return self.finish(t);
                }
            }
            if t % UAV_TRACE_EVERY == 0 || !event_label.is_empty() {
                self.trace_uavs(t);
            }
            let Some(r) = rates.as_ref() else { return self.finish(t) };
            // token t + 1
            for (&u, &(e, rep)) in &r.per_uav {
                self.all[u as usize].energy_j -= e;
                self.s.protection_compute_energy_j += rep;
            }
            let done = t + 1;
            let cfg = self.scn.config();
            for &(u, iv) in self.layout.entries() {
                let p = self.plan.get(u);
                let tail = iv.len().saturating_sub(p.k);
                if let (Some(period), true) = (p.period, tail > 0 && self.ring.len() > 1) {
                    let base = self.snap_base.get(&u).copied().unwrap_or(0);
                    if done > base && (done - base) % u64::from(period.max(1)) == 0 {
                        let bytes = f64::from(tail) * f64::from(period) * self.model.kv_bytes_per_token_layer;
                        let st = &mut self.all[u as usize];
                        let e = aerokv_plan::cost::tx_energy_j(st, &cfg, bytes);
                        st.energy_j -= e;
                        self.s.tx_energy_j += e;
                    }
                }
            }
            self.time += r.latency;
            if self.traces {
                let min_e =
                    self.ring.order().iter().map(|&u| self.all[u as usize].energy_j).fold(f64::INFINITY, f64::min);
                self.out.tokens.push(TokenRow {
                    method: self.method.name().into(),
                    token: done,
                    time_s: self.time,
                    latency_s: r.latency,
                    epoch: self.epoch,
                    alive: self.ring.len(),
                    min_energy_j: min_e,
                    event: std::mem::take(&mut event_label),
                });
            } else {
                event_label.clear();
            }
        }
        self.finish(n_tokens);
    }

    fn finish(&mut self, t: u64) {
        self.s.tokens_done = t;
        self.s.completion_s = self.time;
        if t < self.scn.tokens {
            self.s.mission_success = false;
        }
        let alive: Vec<f64> = self.ring.order().iter().map(|&u| self.all[u as usize].energy_j).collect();
        self.s.min_remaining_energy_j = alive.iter().copied().fold(f64::INFINITY, f64::min);
        self.s.avg_remaining_energy_j =
            if alive.is_empty() { 0.0 } else { alive.iter().sum::<f64>() / alive.len() as f64 };
        let swarm = self.live_swarm(None);
        self.model.tokens_done = t.min(self.scn.tokens);
        if let Ok(c) = evaluate(&swarm, &self.model, &self.layout, &self.ring, &self.plan, t) {
            self.s.expected_remaining_tokens = c.expected_remaining_tokens;
        }
        self.trace_uavs(t);
        debug!(method = self.method.name(), seed = self.seed, ok = self.s.mission_success, "mission done");
    }

    /// One UAV leaves (failure, empty battery or planned retirement). False: the mission ends.
    fn handle(&mut self, u: UavId, kind: Kind, t: u64) -> bool {
        if self.ring.len() < 2 {
            self.fail(format!("all_uavs_lost at token {t}"));
            return false;
        }
        self.model.tokens_done = t;
        let graceful = kind == Kind::Retire;
        let swarm = self.live_swarm(graceful.then_some(u));
        let survivors = self.live_swarm(None).uavs.into_iter().filter(|x| x.id != u).collect::<Vec<_>>();
        let surv_swarm = SwarmState { uavs: survivors, config: self.scn.config() };
        let base = self.snap_base.get(&u).copied().unwrap_or(0);
        let last_snap = self.plan.get(u).period.map(|p| {
            let p = u64::from(p.max(1));
            base + ((t.saturating_sub(base)) / p) * p
        });
        let ctx = RecoveryContext { last_snapshot_token: last_snap, graceful };
        let old_layout = self.layout.clone();
        let old_plan = self.plan.clone();
        let result: Result<(RecoveryPlan, Layout, ProtectionPlan, u32), PlanError> = (|| match self.method {
            Method::Np => {
                let rec = np_recovery(&swarm, &self.model, &self.layout, &self.ring, u, t)?;
                let lay = rec.layout.clone();
                let p = protect(&surv_swarm, &self.model, &lay, &rec.ring, self.method, self.scn)?;
                Ok((rec, lay, p, 0))
            }
            Method::Oo | Method::So | Method::AeroKvNoP2 => {
                let rec = plan_recovery(&swarm, &self.model, &self.layout, &self.ring, &self.plan, u, ctx)?;
                let lay = rec.layout.clone();
                let p = protect(&surv_swarm, &self.model, &lay, &rec.ring, self.method, self.scn)?;
                Ok((rec, lay, p, 0))
            }
            _ => {
                let f = plan_failover(&swarm, &self.model, &self.layout, &self.ring, &self.plan, u, ctx)?;
                let moved: u32 = f.reconfiguration.moves.iter().map(|m| m.0.len()).sum();
                let lay = f.reconfiguration.layout.clone();
                let p = if self.method == Method::AeroKvBeam {
                    protect(&surv_swarm, &self.model, &lay, &f.recovery.ring, self.method, self.scn)?
                } else {
                    f.protection
                };
                Ok((f.recovery, lay, p, moved))
            }
        })();
        let (rec, new_layout, new_plan, moved) = match result {
            Ok(x) => x,
            Err(e) => {
                self.fail(format!("recovery of uav {u} at token {t}: {e}"));
                return false;
            }
        };
        // the generation stalls for the recovery; everyone keeps flying
        for &x in rec.ring.order() {
            let st = &mut self.all[x as usize];
            st.energy_j -= st.flight_power_w * rec.time_s;
        }
        self.all[rec.succ as usize].energy_j -= rec.compute_energy_j;
        if graceful {
            self.all[u as usize].energy_j -= rec.tx_energy_j;
        }
        self.s.tx_energy_j += rec.tx_energy_j;
        self.time += rec.time_s;
        match kind {
            Kind::Retire => self.s.retirements += 1,
            _ => self.s.failures += 1,
        }
        self.s.total_recovery_latency_s += rec.time_s;
        self.s.max_recovery_latency_s = self.s.max_recovery_latency_s.max(rec.time_s);
        if !rec.meets_deadline {
            self.s.deadline_met = false;
            self.s.deadline_misses += 1;
        }
        self.alive[u as usize] = false;
        // rebuild protection for the new plan (background, costs radio energy)
        let (rebuild_s, rebuild_tx, changed) =
            self.rebuild(&old_layout, &old_plan, &new_layout, &new_plan, &rec.ring, t);
        for &x in &changed {
            self.all[x as usize].energy_j -= self.scn.reconfiguration_energy_j;
            self.s.reconfiguration_energy_j += self.scn.reconfiguration_energy_j;
        }
        self.out.recoveries.push(RecoveryRecord {
            method: self.method.name().into(),
            token: t,
            uav: u,
            kind: format!("{kind:?}").to_lowercase(),
            pred: rec.pred,
            succ: rec.succ,
            head_layers: rec.head.map_or(0, |h| h.len()),
            tail_layers: rec.tail.map_or(0, |h| h.len()),
            replay_tokens: rec.replay_tokens,
            recovery_s: rec.time_s,
            deadline_met: rec.meets_deadline,
            rebuild_s,
            rebuild_tx_j: rebuild_tx,
            moved_layers: moved,
        });
        self.layout = new_layout;
        self.ring = rec.ring;
        self.plan = new_plan;
        self.epoch += 1;
        for v in self.snap_base.values_mut() {
            *v = t;
        }
        true
    }

    /// Radio energy and time to build the new replicas and first snapshots; UAVs whose
    /// assignment changed.
    fn rebuild(
        &mut self,
        old_l: &Layout,
        old_p: &ProtectionPlan,
        new_l: &Layout,
        new_p: &ProtectionPlan,
        new_ring: &Ring,
        t: u64,
    ) -> (f64, f64, Vec<UavId>) {
        let l = new_l.num_layers();
        let old_ring = old_l.ring();
        let sets = |lay: &Layout, plan: &ProtectionPlan, ring: &Ring, h: UavId| -> (Vec<bool>, Vec<bool>, Vec<bool>) {
            let mut nat = vec![false; l as usize];
            let mut rep = vec![false; l as usize];
            let mut snap = vec![false; l as usize];
            if let Some(iv) = lay.interval(h) {
                for x in iv.layers(l) {
                    nat[x as usize] = true;
                }
            }
            if ring.len() > 1 {
                if let Some(s) = ring.succ(h) {
                    if let Some(iv) = lay.interval(s) {
                        let k = plan.get(s).k.min(iv.len());
                        for x in iv.layers(l).take(k as usize) {
                            rep[x as usize] = true;
                        }
                    }
                }
                if let Some(p) = ring.pred(h) {
                    if let Some(iv) = lay.interval(p) {
                        let pp: Protection = plan.get(p);
                        if pp.period.is_some() {
                            for x in iv.layers(l).skip(pp.k.min(iv.len()) as usize) {
                                snap[x as usize] = true;
                            }
                        }
                    }
                }
            }
            (nat, rep, snap)
        };
        let w_load = self.model.weight_bytes_per_layer * 8.0 / (self.scn.weight_load_gbps * 1e9);
        let kv = self.model.kv_bytes_per_token_layer * t as f64;
        let mut time = 0.0f64;
        let mut tx = 0.0f64;
        let mut changed = Vec::new();
        let mut sent: BTreeMap<UavId, f64> = BTreeMap::new();
        for &h in new_ring.order() {
            let (on, orp, osn) = sets(old_l, old_p, &old_ring, h);
            let (nn, nr, ns) = sets(new_l, new_p, new_ring, h);
            if on != nn || orp != nr || osn != ns {
                changed.push(h);
            }
            let mut new_rep = 0u32;
            let mut new_snap = 0u32;
            for x in 0..l as usize {
                if nr[x] && !on[x] && !orp[x] {
                    new_rep += 1;
                }
                if ns[x] && !on[x] && !orp[x] && !osn[x] {
                    new_snap += 1;
                }
            }
            time = time.max(f64::from(new_rep) * w_load);
            if new_rep > 0 {
                if let Some(s) = new_ring.succ(h) {
                    *sent.entry(s).or_default() += f64::from(new_rep) * kv;
                }
            }
            if new_snap > 0 {
                if let Some(p) = new_ring.pred(h) {
                    *sent.entry(p).or_default() += f64::from(new_snap) * kv;
                }
            }
        }
        let cfg = self.scn.config();
        for (&src, &bytes) in &sent {
            let st = &mut self.all[src as usize];
            let e = aerokv_plan::cost::tx_energy_j(st, &cfg, bytes);
            st.energy_j -= e;
            tx += e;
            time = time.max(aerokv_plan::cost::tx_time_s(st, &cfg, bytes));
        }
        self.s.tx_energy_j += tx;
        (time, tx, changed)
    }
}

/// NP: the failed shard is split between pred (first half) and succ (rest); both load weights
/// and replay the whole context, token by token, through their new layers.
fn np_recovery(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    u: UavId,
    t: u64,
) -> Result<RecoveryPlan, PlanError> {
    let n = layout.layers_of(u);
    let a = n.div_ceil(2);
    let mut fake = ProtectionPlan::none(layout);
    fake.per_uav.insert(u, Protection { k: a, period: None });
    let mut rec = plan_recovery(swarm, model, layout, ring, &fake, u, RecoveryContext::default())?;
    let cfg = &swarm.config;
    let ep = aerokv_plan::cost::effective(swarm.uav(rec.pred)?, model, cfg);
    let es = aerokv_plan::cost::effective(swarm.uav(rec.succ)?, model, cfg);
    let b = n - a;
    let load = aerokv_plan::cost::weight_load_s(model, cfg, a.max(b));
    let replay = t as f64 * (f64::from(a) * ep.layer_latency_s + f64::from(b) * es.layer_latency_s);
    rec.load_s = load;
    rec.replay_s = replay;
    rec.replay_tokens = t;
    rec.time_s = load + replay;
    rec.compute_energy_j = t as f64 * (f64::from(a) * ep.layer_energy_j + f64::from(b) * es.layer_energy_j);
    rec.meets_deadline = rec.time_s <= cfg.deadline_s;
    Ok(rec)
}
