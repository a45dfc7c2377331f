//! Swarm and model specification, layer intervals, layouts, rings and protection plans.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::PlanError;

/// Identifier of one UAV (drone).
pub type UavId = u32;

/// Live state of one UAV as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UavState {
    pub id: UavId,
    /// Remaining battery energy, joules.
    pub energy_j: f64,
    /// Full battery energy, joules (for the state of charge).
    pub capacity_j: f64,
    /// Memory budget for weights + KV + snapshots, bytes.
    pub memory_bytes: f64,
    /// Radio link rate, bit/s.
    pub link_bps: f64,
    /// Constant flight power, W.
    pub flight_power_w: f64,
    /// Inference power at full power, W.
    pub compute_power_w: f64,
    /// Per-layer decode latency, seconds. At full power unless `latency_measured` is set.
    pub layer_latency_s: f64,
    /// The scheduler measured `layer_latency_s` at the current power: do not scale it by the battery model.
    #[serde(default)]
    pub latency_measured: bool,
    /// Radio transmit power, W.
    pub tx_power_w: f64,
}

/// Battery-aware power: full power above `full_soc`, nonlinear decay to `floor_fraction` at
/// `floor_soc`, floor below. Latency = base / fraction^alpha.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PowerModel {
    pub full_soc: f64,
    pub floor_soc: f64,
    pub floor_fraction: f64,
    pub alpha: f64,
    /// Shape of the decay between the two knees (2 = quadratic).
    pub curve_exponent: f64,
}

impl Default for PowerModel {
    fn default() -> Self {
        Self { full_soc: 0.4, floor_soc: 0.2, floor_fraction: 0.4, alpha: 0.7, curve_exponent: 2.0 }
    }
}

/// Swarm-wide planning parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanConfig {
    /// Recovery deadline tau, seconds.
    pub deadline_s: f64,
    /// Rate at which a UAV loads layer weights from its local storage, bit/s.
    pub weight_load_bps: f64,
    /// Allowed snapshot periods T (tokens), any order.
    pub snapshot_periods: Vec<u32>,
    pub power: PowerModel,
    /// P1 also requires that succ(u) can hold u's tail after recovering it (native + replica +
    /// recovered tail layers, weights and KV, within its budget). Without it a plan can meet
    /// the memory formula yet overflow memory at the first recovery.
    #[serde(default = "yes")]
    pub recoverable_memory: bool,
    /// `None`: P1 and the initial layout maximise the minimum lifetime, whatever it costs (the
    /// paper). `Some(f)`: lifetime beyond `f` x the request's remaining tokens counts as enough;
    /// among plans reaching it P1 takes the least energy (fewest replicas: less compute, less
    /// memory) and the layout the fastest pipeline.
    #[serde(default)]
    pub lifetime_target_factor: Option<f64>,
    /// A shared 802.11 channel: links then carry payload at its effective rate (MAC overhead,
    /// retries) instead of the UAVs' nominal `link_bps` ([`crate::radio`]). `None`: nominal rates.
    #[serde(default)]
    pub channel: Option<crate::radio::Channel>,
}

fn yes() -> bool {
    true
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            deadline_s: 3.0,
            weight_load_bps: 16e9,
            snapshot_periods: vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128],
            power: PowerModel::default(),
            recoverable_memory: true,
            lifetime_target_factor: None,
            channel: None,
        }
    }
}

/// What the planner knows about the swarm now: live UAVs (any order) and parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwarmState {
    pub uavs: Vec<UavState>,
    pub config: PlanConfig,
}

impl SwarmState {
    pub fn uav(&self, id: UavId) -> Result<&UavState, PlanError> {
        self.uavs.iter().find(|u| u.id == id).ok_or(PlanError::UnknownUav { uav: id })
    }

    /// Reject values that would make the cost model meaningless (NaN, non-positive rates...).
    pub fn validate(&self) -> Result<(), PlanError> {
        let mut seen = BTreeSet::new();
        for u in &self.uavs {
            if !seen.insert(u.id) {
                return Err(PlanError::DuplicateUav { uav: u.id });
            }
            let checks: [(&'static str, f64, bool); 8] = [
                ("energy_j", u.energy_j, u.energy_j >= 0.0),
                ("capacity_j", u.capacity_j, u.capacity_j > 0.0),
                ("memory_bytes", u.memory_bytes, u.memory_bytes >= 0.0),
                ("link_bps", u.link_bps, u.link_bps > 0.0),
                ("flight_power_w", u.flight_power_w, u.flight_power_w >= 0.0),
                ("compute_power_w", u.compute_power_w, u.compute_power_w >= 0.0),
                ("layer_latency_s", u.layer_latency_s, u.layer_latency_s > 0.0),
                ("tx_power_w", u.tx_power_w, u.tx_power_w >= 0.0),
            ];
            for (field, value, ok) in checks {
                if !value.is_finite() || !ok {
                    return Err(PlanError::InvalidUav { uav: u.id, field, value });
                }
            }
        }
        let c = &self.config;
        let p = &c.power;
        let ok = c.deadline_s.is_finite()
            && c.deadline_s >= 0.0
            && c.weight_load_bps.is_finite()
            && c.weight_load_bps > 0.0
            && !c.snapshot_periods.is_empty()
            && c.snapshot_periods.iter().all(|&t| t >= 1)
            && p.floor_soc >= 0.0
            && p.full_soc > p.floor_soc
            && p.floor_fraction > 0.0
            && p.floor_fraction <= 1.0
            && p.alpha.is_finite()
            && p.alpha >= 0.0
            && p.curve_exponent.is_finite()
            && p.curve_exponent > 0.0
            && c.lifetime_target_factor.is_none_or(|f| f.is_finite() && f > 0.0);
        if !ok {
            return Err(PlanError::InvalidConfig(format!("{c:?}")));
        }
        c.channel.as_ref().map_or(Ok(()), |ch| ch.validate())
    }
}

/// The model and the request: sizes the planner needs (measured from the engine when it runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub num_layers: u32,
    pub weight_bytes_per_layer: f64,
    pub kv_bytes_per_token_layer: f64,
    /// Tokens of the request (prompt + generation); memory is planned for this many.
    pub total_tokens: u64,
    /// Tokens already completed.
    pub tokens_done: u64,
}

impl ModelSpec {
    pub fn validate(&self) -> Result<(), PlanError> {
        let ok = self.num_layers >= 1
            && self.weight_bytes_per_layer.is_finite()
            && self.weight_bytes_per_layer >= 0.0
            && self.kv_bytes_per_token_layer.is_finite()
            && self.kv_bytes_per_token_layer >= 0.0
            && self.tokens_done <= self.total_tokens;
        if ok {
            Ok(())
        } else {
            Err(PlanError::InvalidModel(format!("{self:?}")))
        }
    }
    pub fn remaining_tokens(&self) -> u64 {
        self.total_tokens.saturating_sub(self.tokens_done)
    }
}

/// Half-open layer interval `[start, end)`. Layers are taken modulo the layer count, so an
/// interval with `end > L` wraps around the gateway: `[start, L) ∪ [0, end - L)`.
/// This is what lets the first stage also hold the last layers after the last stage fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerInterval {
    pub start: u32,
    pub end: u32,
}

impl LayerInterval {
    pub fn new(start: u32, end: u32) -> Self {
        Self { start, end }
    }
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn wraps(&self, num_layers: u32) -> bool {
        self.end > num_layers
    }
    /// Layer indices in execution order (already reduced modulo `num_layers`).
    pub fn layers(&self, num_layers: u32) -> impl Iterator<Item = u32> {
        let l = num_layers.max(1);
        (self.start..self.end).map(move |x| x % l)
    }
    pub fn contains(&self, layer: u32, num_layers: u32) -> bool {
        let l = num_layers.max(1);
        if self.len() >= l {
            return true;
        }
        let off = (layer % l + l - self.start % l) % l;
        off < self.len()
    }
    /// Whether `other` lies inside `self` on the layer circle.
    pub fn covers(&self, other: &LayerInterval, num_layers: u32) -> bool {
        let l = num_layers.max(1);
        if other.is_empty() {
            return true;
        }
        if self.len() >= l {
            return true;
        }
        let off = (other.start % l + l - self.start % l) % l;
        off + other.len() <= self.len()
    }
    /// The most layers a live head replica can cover. The replica runs on the predecessor from
    /// the stage's input; past the gateway a layer's input is the next token's embedding, not
    /// the previous layer's output, so a replica of a wrapping stage stops at the last layer.
    pub fn max_head(&self, num_layers: u32) -> u32 {
        let n = self.normalized(num_layers);
        if n.wraps(num_layers) {
            num_layers - n.start
        } else {
            n.len()
        }
    }
    /// Same interval with `start` reduced into `[0, L)`.
    pub fn normalized(&self, num_layers: u32) -> Self {
        let l = num_layers.max(1);
        let len = self.len().min(l);
        let s = self.start % l;
        Self { start: s, end: s + len }
    }
}

impl std::fmt::Display for LayerInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// Logical order of live UAVs; `pred` and `succ` wrap around.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    order: Vec<UavId>,
}

impl Ring {
    pub fn new(order: Vec<UavId>) -> Result<Self, PlanError> {
        if order.is_empty() {
            return Err(PlanError::EmptySwarm);
        }
        let mut seen = BTreeSet::new();
        for &u in &order {
            if !seen.insert(u) {
                return Err(PlanError::DuplicateUav { uav: u });
            }
        }
        Ok(Self { order })
    }
    pub fn order(&self) -> &[UavId] {
        &self.order
    }
    pub fn len(&self) -> usize {
        self.order.len()
    }
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
    pub fn position(&self, u: UavId) -> Option<usize> {
        self.order.iter().position(|&x| x == u)
    }
    pub fn pred(&self, u: UavId) -> Option<UavId> {
        let i = self.position(u)?;
        Some(self.order[(i + self.order.len() - 1) % self.order.len()])
    }
    pub fn succ(&self, u: UavId) -> Option<UavId> {
        let i = self.position(u)?;
        Some(self.order[(i + 1) % self.order.len()])
    }
    /// The ring without `u` (order of the others kept).
    pub fn without(&self, u: UavId) -> Result<Self, PlanError> {
        Ring::new(self.order.iter().copied().filter(|&x| x != u).collect())
    }
}

/// UAV id -> native layer interval, stored in ring order. Validated: exact cover of `[0, L)`,
/// at least one layer per UAV, contiguous in ring order (each interval starts where its ring
/// predecessor's ends, modulo L).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    num_layers: u32,
    entries: Vec<(UavId, LayerInterval)>,
}

impl Layout {
    /// Build and validate a layout from `(uav, interval)` pairs listed in ring order.
    pub fn new(num_layers: u32, entries: Vec<(UavId, LayerInterval)>) -> Result<Self, PlanError> {
        if num_layers == 0 {
            return Err(PlanError::InvalidModel("num_layers is 0".into()));
        }
        if entries.is_empty() {
            return Err(PlanError::EmptySwarm);
        }
        let mut seen = BTreeSet::new();
        let mut total: u64 = 0;
        for &(u, iv) in entries.iter() {
            if !seen.insert(u) {
                return Err(PlanError::DuplicateUav { uav: u });
            }
            if iv.is_empty() {
                return Err(PlanError::EmptyInterval { uav: u, interval: iv });
            }
            if iv.start >= num_layers || iv.len() > num_layers {
                return Err(PlanError::IntervalOutOfRange { uav: u, interval: iv, num_layers });
            }
            total += u64::from(iv.len());
        }
        // contiguity only after every interval is known to be sane, so errors name the real offender
        for (i, &(u, iv)) in entries.iter().enumerate() {
            let (_, next) = entries[(i + 1) % entries.len()];
            if entries.len() > 1 && iv.end % num_layers != next.start {
                return Err(PlanError::NotContiguous { uav: u, interval: iv, next_start: next.start });
            }
        }
        if total != u64::from(num_layers) {
            return Err(PlanError::NotExactCover { covered: total, num_layers });
        }
        Ok(Self { num_layers, entries })
    }

    /// Contiguous layout from layer counts along the ring, the first UAV starting at layer 0.
    pub fn from_counts(num_layers: u32, ring: &Ring, counts: &[u32]) -> Result<Self, PlanError> {
        if counts.len() != ring.len() {
            return Err(PlanError::InvalidModel(format!("{} layer counts for a ring of {}", counts.len(), ring.len())));
        }
        let mut start = 0u32;
        let mut entries = Vec::with_capacity(counts.len());
        for (&u, &c) in ring.order().iter().zip(counts) {
            entries.push((u, LayerInterval::new(start, start + c)));
            start += c;
        }
        Layout::new(num_layers, entries)
    }

    pub fn num_layers(&self) -> u32 {
        self.num_layers
    }
    /// `(uav, interval)` in ring order.
    pub fn entries(&self) -> &[(UavId, LayerInterval)] {
        &self.entries
    }
    pub fn interval(&self, u: UavId) -> Option<LayerInterval> {
        self.entries.iter().find(|(x, _)| *x == u).map(|(_, iv)| *iv)
    }
    pub fn layers_of(&self, u: UavId) -> u32 {
        self.interval(u).map(|iv| iv.len()).unwrap_or(0)
    }
    /// The ring implied by the layout order.
    pub fn ring(&self) -> Ring {
        Ring { order: self.entries.iter().map(|(u, _)| *u).collect() }
    }
    /// The UAV that executes `layer`.
    pub fn owner(&self, layer: u32) -> Option<UavId> {
        self.entries.iter().find(|(_, iv)| iv.contains(layer, self.num_layers)).map(|(u, _)| *u)
    }
    /// Check that `ring` lists exactly this layout's UAVs in the same cyclic order.
    pub fn check_ring(&self, ring: &Ring) -> Result<(), PlanError> {
        if ring.len() != self.entries.len() {
            return Err(PlanError::RingMismatch(format!(
                "ring has {} UAVs, layout {}",
                ring.len(),
                self.entries.len()
            )));
        }
        let first = self.entries[0].0;
        let Some(p) = ring.position(first) else {
            return Err(PlanError::RingMismatch(format!("uav {first} of the layout is not in the ring")));
        };
        for (i, (u, _)) in self.entries.iter().enumerate() {
            let r = ring.order()[(p + i) % ring.len()];
            if r != *u {
                return Err(PlanError::RingMismatch(format!("layout order has uav {u} where the ring has uav {r}")));
            }
        }
        Ok(())
    }
}

/// Protection of one UAV's shard: the first `k` layers (head) are live-overlapped on `pred(u)`;
/// the rest (tail) is snapshotted to `succ(u)` every `period` tokens. `period` is `None` when
/// the head is the whole shard, or (only from best-effort planning) when the tail is unprotected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    pub k: u32,
    pub period: Option<u32>,
}

/// Protection plan: K_u and T_u per UAV, with the epoch it belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProtectionPlan {
    pub per_uav: BTreeMap<UavId, Protection>,
    /// Minimum expected remaining tokens over UAVs under this plan (the P1 objective).
    pub min_expected_tokens: f64,
    /// Pipeline latency under this plan, seconds per token.
    pub pipeline_latency_s: f64,
    /// Largest worst-case recovery time over UAVs, seconds.
    pub worst_recovery_s: f64,
    /// False when the plan is best effort: some recovery may miss the deadline or a tail is unprotected.
    pub meets_deadline: bool,
}

impl ProtectionPlan {
    pub fn get(&self, u: UavId) -> Protection {
        self.per_uav.get(&u).copied().unwrap_or(Protection { k: 0, period: None })
    }
    /// Plan with no protection at all (NP).
    pub fn none(layout: &Layout) -> Self {
        ProtectionPlan {
            per_uav: layout.entries().iter().map(|(u, _)| (*u, Protection { k: 0, period: None })).collect(),
            min_expected_tokens: 0.0,
            pipeline_latency_s: 0.0,
            worst_recovery_s: f64::INFINITY,
            meets_deadline: false,
        }
    }
}
