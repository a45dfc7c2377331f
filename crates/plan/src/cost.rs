//! Cost model (docs/design.md §4): battery-aware power and latency, per-token energy, memory,
//! worst-case recovery time, lifetime and expected remaining tokens.
use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};
use crate::types::{
    Layout, ModelSpec, PlanConfig, PowerModel, Protection, ProtectionPlan, Ring, SwarmState, UavId, UavState,
};

/// Fraction of full inference power available at state of charge `soc` (0..=1).
pub fn power_fraction(soc: f64, p: &PowerModel) -> f64 {
    if !soc.is_finite() || soc <= p.floor_soc {
        return p.floor_fraction;
    }
    if soc >= p.full_soc {
        return 1.0;
    }
    let x = (soc - p.floor_soc) / (p.full_soc - p.floor_soc);
    p.floor_fraction + (1.0 - p.floor_fraction) * x.powf(p.curve_exponent)
}

/// Effective (battery-scaled) figures of one UAV right now.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Effective {
    pub power_fraction: f64,
    /// Inference power, W.
    pub compute_power_w: f64,
    /// Per-layer latency, s.
    pub layer_latency_s: f64,
    /// Compute energy of one layer for one token, J.
    pub layer_energy_j: f64,
    /// TX energy of one layer's KV row for one token, J.
    pub tx_layer_token_j: f64,
}

pub fn effective(u: &UavState, model: &ModelSpec, cfg: &PlanConfig) -> Effective {
    let soc = if u.capacity_j > 0.0 { u.energy_j / u.capacity_j } else { 0.0 };
    let f = power_fraction(soc, &cfg.power);
    let lat = if u.latency_measured { u.layer_latency_s } else { u.layer_latency_s / f.powf(cfg.power.alpha) };
    let pw = u.compute_power_w * f;
    Effective {
        power_fraction: f,
        compute_power_w: pw,
        layer_latency_s: lat,
        layer_energy_j: pw * lat,
        tx_layer_token_j: tx_energy_j(u, cfg, model.kv_bytes_per_token_layer),
    }
}

/// The rate at which `u` moves payload: its nominal link rate, or over a shared 802.11 channel
/// what is left of it after MAC overhead and retries.
pub fn link_rate_bps(u: &UavState, cfg: &PlanConfig) -> f64 {
    cfg.channel.as_ref().map_or(u.link_bps, |c| c.effective_rate_bps(u.link_bps))
}

/// Radio energy of sending `bytes` from `u`: TX power x bits / link rate.
pub fn tx_energy_j(u: &UavState, cfg: &PlanConfig, bytes: f64) -> f64 {
    u.tx_power_w * tx_time_s(u, cfg, bytes)
}

/// Time to send `bytes` over `u`'s link.
pub fn tx_time_s(u: &UavState, cfg: &PlanConfig, bytes: f64) -> f64 {
    bytes * 8.0 / link_rate_bps(u, cfg)
}

/// Time to load `layers` layers of weights from storage.
pub fn weight_load_s(model: &ModelSpec, cfg: &PlanConfig, layers: u32) -> f64 {
    f64::from(layers) * model.weight_bytes_per_layer * 8.0 / cfg.weight_load_bps
}

/// Worst-case recovery time of a shard protected by `(k, period)`: tail weight load +
/// (T-1) x tail layers x per-layer latency on the successor. Infinite for an unprotected tail.
pub fn worst_recovery_s(
    model: &ModelSpec,
    cfg: &PlanConfig,
    layers: u32,
    prot: Protection,
    succ_layer_latency_s: f64,
) -> f64 {
    let tail = layers.saturating_sub(prot.k);
    if tail == 0 {
        return 0.0;
    }
    match prot.period {
        None => f64::INFINITY,
        Some(t) => {
            weight_load_s(model, cfg, tail) + f64::from(t.saturating_sub(1)) * f64::from(tail) * succ_layer_latency_s
        }
    }
}

/// Per-token energy of one UAV, split by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EnergyBreakdown {
    pub flight_j: f64,
    pub native_compute_j: f64,
    pub replica_compute_j: f64,
    pub tx_j: f64,
}

impl EnergyBreakdown {
    pub fn total(&self) -> f64 {
        self.flight_j + self.native_compute_j + self.replica_compute_j + self.tx_j
    }
}

/// Memory of one UAV, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    pub native_bytes: f64,
    pub replica_bytes: f64,
    pub snapshot_bytes: f64,
}

impl MemoryBreakdown {
    pub fn total(&self) -> f64 {
        self.native_bytes + self.replica_bytes + self.snapshot_bytes
    }
}

/// Everything the cost model says about one UAV under a layout and plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UavCost {
    pub uav: UavId,
    pub native_layers: u32,
    /// Layers of succ(u)'s head that u holds and computes.
    pub replica_layers: u32,
    /// Layers of pred(u)'s tail that u keeps snapshots of.
    pub snapshot_layers: u32,
    pub effective: Effective,
    pub stage_latency_s: f64,
    pub energy: EnergyBreakdown,
    pub memory: MemoryBreakdown,
    pub memory_budget_bytes: f64,
    /// Memory right after u recovers pred(u)'s tail (native + replica + that tail, weights and KV).
    pub recovery_memory_bytes: f64,
    /// Worst-case time to recover u's shard if u fails.
    pub worst_recovery_s: f64,
    /// Remaining energy / energy per token.
    pub expected_tokens: f64,
    /// Expected tokens x pipeline latency, seconds.
    pub lifetime_s: f64,
}

/// Cost of the whole swarm under a layout and plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwarmCost {
    pub pipeline_latency_s: f64,
    pub per_uav: Vec<UavCost>,
    /// Minimum over UAVs of expected remaining tokens.
    pub expected_remaining_tokens: f64,
    pub min_lifetime_s: f64,
}

/// Evaluate the cost model. `kv_tokens` is the KV length the memory is computed for (use
/// `model.total_tokens` for planning, the current token for accounting). Snapshots are
/// assumed to hold `kv_tokens` rows (worst case).
pub fn evaluate(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
    kv_tokens: u64,
) -> Result<SwarmCost> {
    layout.check_ring(ring)?;
    let cfg = &swarm.config;
    let order = ring.order();
    let m = order.len();
    let uavs: Vec<&UavState> = order.iter().map(|&u| swarm.uav(u)).collect::<Result<_>>()?;
    let eff: Vec<Effective> = uavs.iter().map(|u| effective(u, model, cfg)).collect();
    let n: Vec<u32> = order.iter().map(|&u| layout.layers_of(u)).collect();
    let prot: Vec<Protection> = order
        .iter()
        .zip(&n)
        .map(|(&u, &ni)| {
            let p = plan.get(u);
            Protection { k: p.k.min(ni), period: p.period }
        })
        .collect();
    let rep: Vec<u32> = (0..m).map(|i| if m > 1 { prot[(i + 1) % m].k } else { 0 }).collect();
    let stage: Vec<f64> = (0..m).map(|i| f64::from(n[i] + rep[i]) * eff[i].layer_latency_s).collect();
    let pipeline = stage.iter().copied().fold(0.0, f64::max);
    let kv_t = kv_tokens as f64 * model.kv_bytes_per_token_layer;
    let per_layer = model.weight_bytes_per_layer + kv_t;
    let mut per_uav = Vec::with_capacity(m);
    for i in 0..m {
        let tail = n[i] - prot[i].k;
        let snapshotted = m > 1 && prot[i].period.is_some() && tail > 0;
        let pi = (i + m - 1) % m;
        let pred_tail = n[pi] - prot[pi].k;
        let snap_layers = if m > 1 && prot[pi].period.is_some() { pred_tail } else { 0 };
        let energy = EnergyBreakdown {
            flight_j: uavs[i].flight_power_w * pipeline,
            native_compute_j: f64::from(n[i]) * eff[i].layer_energy_j,
            replica_compute_j: f64::from(rep[i]) * eff[i].layer_energy_j,
            tx_j: if snapshotted { f64::from(tail) * eff[i].tx_layer_token_j } else { 0.0 },
        };
        let memory = MemoryBreakdown {
            native_bytes: f64::from(n[i]) * per_layer,
            replica_bytes: f64::from(rep[i]) * per_layer,
            snapshot_bytes: f64::from(snap_layers) * kv_t,
        };
        let succ_lat = eff[(i + 1) % m].layer_latency_s;
        let rec = if m > 1 { worst_recovery_s(model, cfg, n[i], prot[i], succ_lat) } else { f64::INFINITY };
        let total = energy.total();
        let tokens = if total > 0.0 { uavs[i].energy_j / total } else { f64::INFINITY };
        per_uav.push(UavCost {
            uav: order[i],
            native_layers: n[i],
            replica_layers: rep[i],
            snapshot_layers: snap_layers,
            effective: eff[i],
            stage_latency_s: stage[i],
            energy,
            memory,
            memory_budget_bytes: uavs[i].memory_bytes,
            recovery_memory_bytes: f64::from(n[i] + rep[i] + if m > 1 { pred_tail } else { 0 }) * per_layer,
            worst_recovery_s: rec,
            expected_tokens: tokens,
            lifetime_s: tokens * pipeline,
        });
    }
    let expected_remaining_tokens = per_uav.iter().map(|c| c.expected_tokens).fold(f64::INFINITY, f64::min);
    let min_lifetime_s = per_uav.iter().map(|c| c.lifetime_s).fold(f64::INFINITY, f64::min);
    Ok(SwarmCost { pipeline_latency_s: pipeline, per_uav, expected_remaining_tokens, min_lifetime_s })
}

/// Convenience: per-UAV ring data the planners sweep over (index = ring position).
#[derive(Clone, Debug)]
pub(crate) struct RingData {
    pub ids: Vec<UavId>,
    pub n: Vec<u32>,
    /// The largest K each UAV's shard allows ([`crate::LayerInterval::max_head`]).
    pub k_max: Vec<u32>,
    pub energy: Vec<f64>,
    pub flight: Vec<f64>,
    pub lat: Vec<f64>,
    pub layer_energy: Vec<f64>,
    pub tx_layer: Vec<f64>,
    pub mem_budget: Vec<f64>,
}

impl RingData {
    pub fn new(swarm: &SwarmState, model: &ModelSpec, layout: &Layout, ring: &Ring) -> Result<Self> {
        swarm.validate()?;
        model.validate()?;
        if layout.num_layers() != model.num_layers {
            return Err(PlanError::InvalidModel(format!(
                "layout has {} layers, model {}",
                layout.num_layers(),
                model.num_layers
            )));
        }
        layout.check_ring(ring)?;
        let mut d = RingData {
            ids: vec![],
            n: vec![],
            k_max: vec![],
            energy: vec![],
            flight: vec![],
            lat: vec![],
            layer_energy: vec![],
            tx_layer: vec![],
            mem_budget: vec![],
        };
        for &u in ring.order() {
            let s = swarm.uav(u)?;
            let e = effective(s, model, &swarm.config);
            d.ids.push(u);
            d.n.push(layout.layers_of(u));
            d.k_max.push(layout.interval(u).map_or(0, |iv| iv.max_head(layout.num_layers())));
            d.energy.push(s.energy_j);
            d.flight.push(s.flight_power_w);
            d.lat.push(e.layer_latency_s);
            d.layer_energy.push(e.layer_energy_j);
            d.tx_layer.push(e.tx_layer_token_j);
            d.mem_budget.push(s.memory_bytes);
        }
        Ok(d)
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}
