//! The scheduler's decisions, without ROS: live telemetry -> the planning core's [`SwarmState`],
//! the initial lifespan-aware plan, failover (recovery + P2 + P1-new), planned retirement, and the
//! conversion of the core's layouts and protection plans into the [`SwarmPlan`]s the executors
//! follow. UAVs are named (`uav3`) on the wire and numbered in the planning core.
use crate::dataplane::{Stage, SwarmPlan};
use aerokv_plan::{
    plan_failover, plan_initial_layout, plan_protection, plan_protection_relaxed, retirements_due, Layout, ModelSpec,
    PlanConfig, PlanError, ProtectionPlan, RecoveryContext, Ring, SwarmState, UavId, UavState,
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
#[derive(Debug, Clone)]
pub struct Airframe {
    pub flight_power_w: f64,
    pub compute_power_w: f64,
    pub tx_power_w: f64,
    pub link_bps: f64,
    pub memory_bytes: f64,
}

/// Sizes of the model, measured from the manifest.
#[derive(Debug, Clone, Copy)]
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
                link_bps: self.airframe.link_bps,
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
            plan: SwarmPlan { epoch, num_layers: l, stages, request_id, resume_position: resume, replay_from: 0 },
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
    /// Its battery health has arrived too (the planner needs it).
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
            .map(|(n, &e)| (n.to_string(), Telemetry { energy_j: e, capacity_j: 2.7e6, layer_latency_s: 2e-3 }))
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
