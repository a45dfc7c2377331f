//! Public protection planners: exact P1, its relaxed form, the beam-search heuristic of the
//! reference simulator (for ablations), and the fixed baseline policies (OO, SO).
use std::collections::BTreeMap;

use tracing::debug;

use crate::cost::{evaluate, worst_recovery_s, RingData};
use crate::error::{PlanError, Result};
use crate::p1;
use crate::types::{Layout, ModelSpec, Protection, ProtectionPlan, Ring, SwarmState};

/// P1: the exact optimum of K_u, T_u (maximise the minimum expected tokens) under memory
/// budgets and the recovery deadline. Errors name the UAVs whose memory cannot hold the
/// protection the deadline needs.
pub fn plan_protection(swarm: &SwarmState, model: &ModelSpec, layout: &Layout, ring: &Ring) -> Result<ProtectionPlan> {
    let d = RingData::new(swarm, model, layout, ring)?;
    match p1::solve(swarm, model, layout, ring, &d, swarm.config.deadline_s)? {
        Some(plan) => {
            debug!(min_tokens = plan.min_expected_tokens, latency = plan.pipeline_latency_s, "P1 plan");
            Ok(plan)
        }
        None => Err(p1::diagnose(&d, model, swarm)),
    }
}

/// P1 when the strict problem has no solution: first the smallest achievable worst-case
/// recovery time (exact, by bisection over candidate deadlines), then the best lifetime under
/// it; if even that does not fit memory, the largest replicas and snapshots that fit
/// (some tails unprotected). Never fails on a valid input with at least two UAVs.
pub fn plan_protection_relaxed(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
) -> Result<ProtectionPlan> {
    let d = RingData::new(swarm, model, layout, ring)?;
    if let Some(plan) = p1::solve(swarm, model, layout, ring, &d, swarm.config.deadline_s)? {
        return Ok(plan);
    }
    let m = d.len();
    let mut cands: Vec<f64> = Vec::new();
    for i in 0..m {
        let succ_lat = d.lat[(i + 1) % m];
        for k in 0..d.n[i].min(d.k_max[i] + 1) {
            for &t in &swarm.config.snapshot_periods {
                let r = worst_recovery_s(model, &swarm.config, d.n[i], Protection { k, period: Some(t) }, succ_lat);
                if r > swarm.config.deadline_s {
                    cands.push(r);
                }
            }
        }
    }
    cands.sort_by(f64::total_cmp);
    cands.dedup();
    // feasibility grows with the deadline (more periods allowed, memory does not depend on T)
    let (mut lo, mut hi) = (0usize, cands.len());
    let mut found: Option<ProtectionPlan> = None;
    while lo < hi {
        let mid = (lo + hi) / 2;
        match p1::solve(swarm, model, layout, ring, &d, cands[mid])? {
            Some(plan) => {
                found = Some(plan);
                hi = mid;
            }
            None => lo = mid + 1,
        }
    }
    if let Some(mut plan) = found {
        plan.meets_deadline = false;
        return Ok(plan);
    }
    Ok(greedy_fallback(swarm, model, layout, ring, &d))
}

/// Replicas as large as pred's memory allows, then snapshots where succ's memory allows.
fn greedy_fallback(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    d: &RingData,
) -> ProtectionPlan {
    let m = d.len();
    let kv = model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    let per_layer = model.weight_bytes_per_layer + kv;
    let mut k = vec![0u32; m];
    for (i, k_i) in k.iter_mut().enumerate() {
        let pi = (i + m - 1) % m;
        let free = d.mem_budget[pi] - f64::from(d.n[pi]) * per_layer;
        let fit = if per_layer > 0.0 { (free / per_layer).floor().max(0.0) } else { f64::from(d.n[i]) };
        *k_i = (fit as u32).min(d.k_max[i]);
    }
    let mut per_uav = BTreeMap::new();
    let mut periods = swarm.config.snapshot_periods.clone();
    periods.sort_unstable();
    for i in 0..m {
        let s = (i + 1) % m;
        let tail = d.n[i] - k[i];
        let used = f64::from(d.n[s] + k[(s + 1) % m]) * per_layer;
        let period =
            if tail > 0 && used + f64::from(tail) * kv <= d.mem_budget[s] { periods.first().copied() } else { None };
        per_uav.insert(d.ids[i], Protection { k: k[i], period });
    }
    measured(swarm, model, layout, ring, per_uav)
}

/// A plan from per-UAV choices, with its summary figures from the cost model.
fn measured(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    per_uav: BTreeMap<crate::types::UavId, Protection>,
) -> ProtectionPlan {
    let mut plan = ProtectionPlan {
        per_uav,
        min_expected_tokens: 0.0,
        pipeline_latency_s: 0.0,
        worst_recovery_s: f64::INFINITY,
        meets_deadline: false,
    };
    fill_metrics(swarm, model, layout, ring, &mut plan);
    plan
}

/// Recompute a plan's summary figures from the cost model.
pub fn fill_metrics(swarm: &SwarmState, model: &ModelSpec, layout: &Layout, ring: &Ring, plan: &mut ProtectionPlan) {
    if let Ok(c) = evaluate(swarm, model, layout, ring, plan, model.total_tokens) {
        plan.min_expected_tokens = c.expected_remaining_tokens;
        plan.pipeline_latency_s = c.pipeline_latency_s;
        plan.worst_recovery_s = c.per_uav.iter().map(|u| u.worst_recovery_s).fold(0.0, f64::max);
        plan.meets_deadline = plan.worst_recovery_s <= swarm.config.deadline_s * (1.0 + 1e-12)
            && c.per_uav.iter().all(|u| u.memory.total() <= u.memory_budget_bytes * (1.0 + 1e-12));
    }
}

/// A fixed policy applied to every UAV, clipped to the shard: used for the OO and SO baselines.
pub fn plan_fixed(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    policy: FixedPolicy,
) -> Result<ProtectionPlan> {
    let d = RingData::new(swarm, model, layout, ring)?;
    let m = d.len();
    let kv = model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    let per_layer = model.weight_bytes_per_layer + kv;
    let mut per_uav = BTreeMap::new();
    for i in 0..m {
        let prot = match policy {
            FixedPolicy::None => Protection { k: 0, period: None },
            FixedPolicy::SnapshotOnly { period } => Protection { k: 0, period: Some(period) },
            FixedPolicy::OverlapOnly => {
                // the whole shard if pred's memory holds it, else as much as fits; the rest unprotected
                let pi = (i + m - 1) % m;
                let free = d.mem_budget[pi] - f64::from(d.n[pi]) * per_layer;
                let fit = if per_layer > 0.0 { (free / per_layer).floor().max(0.0) as u32 } else { d.n[i] };
                Protection { k: fit.min(d.k_max[i]), period: None }
            }
        };
        per_uav.insert(d.ids[i], prot);
    }
    Ok(measured(swarm, model, layout, ring, per_uav))
}

/// Baseline protection policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FixedPolicy {
    /// NP: nothing.
    None,
    /// OO: live overlap of the whole shard (as far as memory allows), no snapshots.
    OverlapOnly,
    /// SO: full-shard snapshots every `period` tokens, no overlap.
    SnapshotOnly { period: u32 },
}

/// The reference simulator's heuristic (for ablations): per UAV, deadline-feasible candidates
/// ordered by local protection cost; a beam over UAVs in ring order ranked by the largest
/// local cost; complete plans checked for memory; best minimum expected tokens wins.
pub fn plan_protection_beam(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    beam_width: usize,
) -> Result<ProtectionPlan> {
    let d = RingData::new(swarm, model, layout, ring)?;
    let m = d.len();
    if m < 2 {
        return Err(PlanError::SingleUav);
    }
    let ch = p1::choices(&d, model, swarm, swarm.config.deadline_s);
    let local = |i: usize, c: &p1::Choice| -> f64 {
        let pi = (i + m - 1) % m;
        d.layer_energy[pi] * f64::from(c.k) + d.tx_layer[i] * f64::from(d.n[i] - c.k)
    };
    let mut beam: Vec<(f64, Vec<usize>)> = vec![(0.0, Vec::new())];
    for (i, chi) in ch.iter().enumerate() {
        let mut order: Vec<usize> = (0..chi.len()).collect();
        order.sort_by(|&a, &b| local(i, &chi[a]).total_cmp(&local(i, &chi[b])));
        let mut next = Vec::with_capacity(beam.len() * order.len());
        for (score, idx) in &beam {
            for &c in &order {
                let mut v = idx.clone();
                v.push(c);
                next.push((score.max(local(i, &chi[c])), v));
            }
        }
        next.sort_by(|a, b| a.0.total_cmp(&b.0));
        next.truncate(beam_width.max(1));
        beam = next;
    }
    let p = p1::Problem {
        d: &d,
        per_layer_bytes: model.weight_bytes_per_layer + model.total_tokens as f64 * model.kv_bytes_per_token_layer,
        kv_bytes: model.total_tokens as f64 * model.kv_bytes_per_token_layer,
        recoverable_memory: swarm.config.recoverable_memory,
        saturate: f64::INFINITY,
    };
    let mut best: Option<(f64, f64, Vec<usize>)> = None;
    for (_, idx) in beam {
        let (val, lat) = p1::true_value(&p, &ch, &idx);
        if val.is_finite() && val > best.as_ref().map_or(f64::NEG_INFINITY, |b| b.0) {
            best = Some((val, lat, idx));
        }
    }
    let Some((val, lat, idx)) = best else { return Err(p1::diagnose(&d, model, swarm)) };
    let mut per_uav = BTreeMap::new();
    let mut worst = 0.0f64;
    for i in 0..m {
        let c = ch[i][idx[i]];
        per_uav.insert(d.ids[i], Protection { k: c.k, period: c.period });
        worst = worst.max(c.rec_s);
    }
    Ok(ProtectionPlan {
        per_uav,
        min_expected_tokens: val,
        pipeline_latency_s: lat,
        worst_recovery_s: worst,
        meets_deadline: true,
    })
}
