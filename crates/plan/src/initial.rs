//! Lifespan-aware initial layout: layer counts per UAV so the swarm lasts longest.
//!
//! Cost of UAV u with n layers at pipeline latency L: flight_u x L + n x (compute energy per
//! layer + TX of a full-shard snapshot row per layer), the worst case before P1 decides.
//! Objective, lexicographic: (1) the minimum expected tokens, saturated at `saturate_tokens`
//! (`PlanConfig::lifetime_target_factor` x the request; once every UAV outlasts the request
//! with margin, more lifetime buys nothing; no saturation by default), (2) the
//! smallest pipeline latency, (3) the unsaturated minimum expected tokens. Exact: for every
//! possible pipeline latency cap the best minimum is found by bisection on the token target
//! (the number of layers a UAV can take is monotone in the target), and caps are visited in
//! increasing order until a falling upper bound cannot win.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::cost::effective;
use crate::error::{PlanError, Result};
use crate::types::{Layout, ModelSpec, Ring, SwarmState};

/// Options of the initial layout planner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayoutObjective {
    /// Expected tokens above which more lifetime is not worth a slower pipeline. `None`: never.
    pub saturate_tokens: Option<f64>,
}

impl LayoutObjective {
    /// Saturate at `factor` x the remaining tokens of the request (`None`: never).
    pub fn for_request(model: &ModelSpec, factor: Option<f64>) -> Self {
        Self { saturate_tokens: factor.map(|f| f * model.remaining_tokens().max(1) as f64) }
    }
}

pub(crate) struct Params {
    pub energy: Vec<f64>,
    pub flight: Vec<f64>,
    pub lat: Vec<f64>,
    pub per_layer_j: Vec<f64>,
    pub mem_cap: Vec<u32>,
}

pub(crate) fn params(swarm: &SwarmState, model: &ModelSpec, ring: &Ring) -> Result<Params> {
    let per_layer_bytes = model.weight_bytes_per_layer + model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    let mut p = Params { energy: vec![], flight: vec![], lat: vec![], per_layer_j: vec![], mem_cap: vec![] };
    for &id in ring.order() {
        let u = swarm.uav(id)?;
        let e = effective(u, model, &swarm.config);
        p.energy.push(u.energy_j);
        p.flight.push(u.flight_power_w);
        p.lat.push(e.layer_latency_s);
        p.per_layer_j.push(e.layer_energy_j + e.tx_layer_token_j);
        let cap = if per_layer_bytes > 0.0 {
            (u.memory_bytes / per_layer_bytes).floor()
        } else {
            f64::from(model.num_layers)
        };
        p.mem_cap.push(cap.clamp(0.0, f64::from(model.num_layers)) as u32);
    }
    Ok(p)
}

/// Expected tokens of each UAV for counts `n` (pipeline latency from the counts).
pub(crate) fn tokens_of(p: &Params, n: &[u32]) -> (f64, f64) {
    let lat = n.iter().zip(&p.lat).map(|(&k, &l)| f64::from(k) * l).fold(0.0, f64::max);
    let t = (0..n.len())
        .map(|i| {
            let e = p.flight[i] * lat + p.per_layer_j[i] * f64::from(n[i]);
            if e > 0.0 {
                p.energy[i] / e
            } else {
                f64::INFINITY
            }
        })
        .fold(f64::INFINITY, f64::min);
    (t, lat)
}

/// Lexicographic comparison key.
pub(crate) fn better(obj: &LayoutObjective, a: (f64, f64), b: (f64, f64)) -> bool {
    let s = obj.saturate_tokens.unwrap_or(f64::INFINITY);
    let (sa, sb) = (a.0.min(s), b.0.min(s));
    let tol = 1e-12;
    if sa > sb * (1.0 + tol) {
        return true;
    }
    if sb > sa * (1.0 + tol) {
        return false;
    }
    if a.1 < b.1 * (1.0 - tol) {
        return true;
    }
    if b.1 < a.1 * (1.0 - tol) {
        return false;
    }
    a.0 > b.0 * (1.0 + tol)
}

/// Lifespan-aware layout over the UAVs of `swarm` in the order given (that order is the ring).
pub fn plan_initial_layout(swarm: &SwarmState, model: &ModelSpec) -> Result<Layout> {
    plan_initial_layout_with(swarm, model, LayoutObjective::for_request(model, swarm.config.lifetime_target_factor))
}

/// Same, with an explicit objective.
pub fn plan_initial_layout_with(swarm: &SwarmState, model: &ModelSpec, obj: LayoutObjective) -> Result<Layout> {
    swarm.validate()?;
    model.validate()?;
    let ring = Ring::new(swarm.uavs.iter().map(|u| u.id).collect())?;
    let counts = layer_counts(swarm, model, &ring, obj)?;
    Layout::from_counts(model.num_layers, &ring, &counts)
}

/// Uniform split (the first `L mod m` UAVs get one more layer), for baselines.
pub fn uniform_layout(model: &ModelSpec, ring: &Ring) -> Result<Layout> {
    let m = ring.len() as u32;
    if m == 0 {
        return Err(PlanError::EmptySwarm);
    }
    if model.num_layers < m {
        return Err(PlanError::TooFewLayers { uavs: ring.len(), num_layers: model.num_layers });
    }
    let (base, extra) = (model.num_layers / m, model.num_layers % m);
    let counts: Vec<u32> = (0..m).map(|i| base + u32::from(i < extra)).collect();
    Layout::from_counts(model.num_layers, ring, &counts)
}

pub(crate) fn layer_counts(
    swarm: &SwarmState,
    model: &ModelSpec,
    ring: &Ring,
    obj: LayoutObjective,
) -> Result<Vec<u32>> {
    let m = ring.len();
    let l = model.num_layers;
    if (l as usize) < m {
        return Err(PlanError::TooFewLayers { uavs: m, num_layers: l });
    }
    let p = params(swarm, model, ring)?;
    if let Some(i) = p.mem_cap.iter().position(|&c| c == 0) {
        return Err(PlanError::LayoutInfeasible(format!("uav {} cannot hold even one layer", ring.order()[i])));
    }
    let mem_total: u64 = p.mem_cap.iter().map(|&c| u64::from(c)).sum();
    if mem_total < u64::from(l) {
        return Err(PlanError::LayoutInfeasible(format!("the swarm holds at most {mem_total} of {l} layers")));
    }
    // candidate caps: every stage latency n x lat_u that memory allows
    let mut caps: Vec<f64> =
        (0..m).flat_map(|i| (1..=p.mem_cap[i]).map(move |n| (i, n))).map(|(i, n)| f64::from(n) * p.lat[i]).collect();
    caps.sort_by(f64::total_cmp);
    caps.dedup();
    let sat = obj.saturate_tokens.unwrap_or(f64::INFINITY);
    let ub = |cap: f64| -> f64 {
        (0..m)
            .map(|i| {
                let e = p.flight[i] * cap + p.per_layer_j[i];
                if e > 0.0 {
                    p.energy[i] / e
                } else {
                    f64::INFINITY
                }
            })
            .fold(f64::INFINITY, f64::min)
    };
    let mut best: Option<((f64, f64), Vec<u32>)> = None;
    for &cap in &caps {
        let cap_n: Vec<u32> =
            (0..m).map(|i| (((cap / p.lat[i]) * (1.0 + 1e-12)).floor() as u32).min(p.mem_cap[i])).collect();
        if cap_n.contains(&0) || cap_n.iter().map(|&c| u64::from(c)).sum::<u64>() < u64::from(l) {
            continue;
        }
        if let Some(((bt, _), _)) = &best {
            let bsat = bt.min(sat);
            if bsat >= sat || ub(cap).min(sat) < bsat * (1.0 - 1e-12) {
                break;
            }
        }
        let nmax = |i: usize, t: f64| -> u32 {
            if p.per_layer_j[i] <= 0.0 {
                return cap_n[i];
            }
            let x = (p.energy[i] / t - p.flight[i] * cap) / p.per_layer_j[i];
            if x.is_nan() || x < 0.0 {
                0
            } else {
                (x.floor().min(f64::from(cap_n[i]))) as u32
            }
        };
        let feasible = |t: f64| -> bool {
            let mut s = 0u64;
            for i in 0..m {
                let k = nmax(i, t);
                if k == 0 {
                    return false;
                }
                s += u64::from(k);
            }
            s >= u64::from(l)
        };
        // bisection on the token target (geometric: targets span orders of magnitude)
        let mut hi = ub(cap);
        if !hi.is_finite() {
            hi = 1e300;
        }
        let mut lo;
        if !feasible(hi) {
            if !feasible(f64::MIN_POSITIVE) {
                continue;
            }
            lo = f64::MIN_POSITIVE;
            for _ in 0..200 {
                let mid = if lo > 0.0 && hi / lo > 4.0 { (lo * hi).sqrt() } else { 0.5 * (lo + hi) };
                if feasible(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
                if hi - lo <= hi * 1e-14 {
                    break;
                }
            }
        } else {
            lo = hi;
        }
        let mut n: Vec<u32> = (0..m).map(|i| nmax(i, lo)).collect();
        trim(&mut n, &p, u64::from(l));
        let key = tokens_of(&p, &n);
        if best.as_ref().is_none_or(|(bk, _)| better(&obj, key, *bk)) {
            best = Some((key, n));
        }
    }
    best.map(|(_, n)| n).ok_or_else(|| PlanError::LayoutInfeasible("no pipeline latency admits a layout".into()))
}

#[derive(PartialEq)]
struct Stage {
    latency: f64,
    energy: f64,
    idx: usize,
}
impl Eq for Stage {}
impl PartialOrd for Stage {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Stage {
    // longest stage first; among equals the lower battery gives up a layer first
    fn cmp(&self, o: &Self) -> Ordering {
        self.latency.total_cmp(&o.latency).then(o.energy.total_cmp(&self.energy)).then(o.idx.cmp(&self.idx))
    }
}

/// Remove layers from the longest stages until the counts sum to `l` (every count stays >= 1).
fn trim(n: &mut [u32], p: &Params, l: u64) {
    let mut excess = n.iter().map(|&x| u64::from(x)).sum::<u64>().saturating_sub(l);
    let mut heap: BinaryHeap<Stage> = (0..n.len())
        .filter(|&i| n[i] > 1)
        .map(|i| Stage { latency: f64::from(n[i]) * p.lat[i], energy: p.energy[i], idx: i })
        .collect();
    while excess > 0 {
        let Some(s) = heap.pop() else { break };
        n[s.idx] -= 1;
        excess -= 1;
        if n[s.idx] > 1 {
            heap.push(Stage { latency: f64::from(n[s.idx]) * p.lat[s.idx], energy: s.energy, idx: s.idx });
        }
    }
}
