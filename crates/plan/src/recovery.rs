//! Recovery of a failed UAV, P2 (state-constrained reconfiguration), P1-new, and planned retirement.
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::cost::{effective, evaluate, tx_energy_j, tx_time_s, weight_load_s};
use crate::error::{PlanError, Result};
use crate::p1::Combine;
use crate::protection::{plan_protection, plan_protection_relaxed};
use crate::types::{LayerInterval, Layout, ModelSpec, ProtectionPlan, Ring, SwarmState, UavId};

/// How the tail of the failed shard gets its KV back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TailSource {
    /// No tail: the head replica was the whole shard.
    None,
    /// Restore the boundary snapshot taken at `token`, then replay the buffered activations since.
    Snapshot { token: u64 },
    /// Planned retirement: the UAV is still alive and hands its tail KV over directly.
    Handover,
    /// Unprotected tail: replay the whole context through it.
    FullReplay,
}

/// Inputs that only the runtime knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryContext {
    /// Token of the failed UAV's last boundary snapshot that reached succ; `None`: derive it
    /// from the period (`floor(t / T) * T`).
    pub last_snapshot_token: Option<u64>,
    /// The UAV is retiring (alive): it hands its state over, nothing is replayed.
    pub graceful: bool,
}

/// Who takes which layers of the failed UAV, and what it costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveryPlan {
    pub failed: UavId,
    pub pred: UavId,
    pub succ: UavId,
    /// Head promoted from pred's live replica (KV already current).
    pub head: Option<LayerInterval>,
    /// Tail loaded by succ.
    pub tail: Option<LayerInterval>,
    pub tail_source: TailSource,
    /// Tokens replayed one by one through the tail on succ.
    pub replay_tokens: u64,
    pub load_s: f64,
    pub replay_s: f64,
    /// Handover transfer time (retirement only).
    pub transfer_s: f64,
    /// Total recovery time (the generation stalls this long).
    pub time_s: f64,
    /// Compute energy of the replay on succ, J.
    pub compute_energy_j: f64,
    /// Radio energy of a retirement handover, J (spent by the retiring UAV).
    pub tx_energy_j: f64,
    pub meets_deadline: bool,
    /// Layout and ring over the survivors right after recovery (pred and succ grown).
    pub layout: Layout,
    pub ring: Ring,
}

/// Plan the recovery of `failed` at `model.tokens_done`: pred(f) promotes its head replica,
/// succ(f) loads f's tail, restores the last snapshot and replays the buffered tokens.
/// `swarm` must hold the survivors (and may hold `failed`).
pub fn plan_recovery(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
    failed: UavId,
    ctx: RecoveryContext,
) -> Result<RecoveryPlan> {
    model.validate()?;
    layout.check_ring(ring)?;
    let l = layout.num_layers();
    let fiv = layout.interval(failed).ok_or(PlanError::NotInRing { uav: failed })?;
    if ring.len() < 2 {
        return Err(PlanError::LayersLost { lost: vec![fiv], reason: format!("uav {failed} was the last UAV") });
    }
    let pred = ring.pred(failed).ok_or(PlanError::NotInRing { uav: failed })?;
    let succ = ring.succ(failed).ok_or(PlanError::NotInRing { uav: failed })?;
    let prot = plan.get(failed);
    let k = prot.k.min(fiv.len());
    let head = (k > 0).then(|| LayerInterval::new(fiv.start, fiv.start + k).normalized(l));
    let tail_len = fiv.len() - k;
    let tail = (tail_len > 0).then(|| LayerInterval::new(fiv.start + k, fiv.end).normalized(l));
    let t = model.tokens_done;
    let s_state = swarm.uav(succ)?;
    let s_eff = effective(s_state, model, &swarm.config);
    let (tail_source, replay) = match (tail, ctx.graceful, prot.period) {
        (None, _, _) => (TailSource::None, 0),
        (Some(_), true, _) => (TailSource::Handover, 0),
        (Some(_), false, Some(period)) => {
            let period = u64::from(period.max(1));
            let snap = ctx.last_snapshot_token.unwrap_or((t / period) * period).min(t);
            (TailSource::Snapshot { token: snap }, t - snap)
        }
        (Some(_), false, None) => (TailSource::FullReplay, t),
    };
    let load_s = weight_load_s(model, &swarm.config, tail_len);
    let replay_s = replay as f64 * f64::from(tail_len) * s_eff.layer_latency_s;
    let (transfer_s, tx_energy) = if tail_source == TailSource::Handover {
        // the retiring UAV sends the KV rows succ does not have yet
        let since = match prot.period {
            Some(p) => {
                let p = u64::from(p.max(1));
                t - ctx.last_snapshot_token.unwrap_or((t / p) * p).min(t)
            }
            None => t,
        };
        let bytes = f64::from(tail_len) * since as f64 * model.kv_bytes_per_token_layer;
        match swarm.uav(failed) {
            Ok(f) => (tx_time_s(f, &swarm.config, bytes), tx_energy_j(f, &swarm.config, bytes)),
            Err(_) => (tx_time_s(s_state, &swarm.config, bytes), tx_energy_j(s_state, &swarm.config, bytes)),
        }
    } else {
        (0.0, 0.0)
    };
    let time_s = load_s.max(transfer_s) + replay_s;
    let compute_energy_j = replay as f64 * f64::from(tail_len) * s_eff.layer_energy_j;
    // layout after recovery: pred grows by the head, succ by the tail (an interval may wrap)
    let mut entries = Vec::with_capacity(ring.len() - 1);
    for &(u, iv) in layout.entries() {
        if u == failed {
            continue;
        }
        let mut niv = iv;
        if pred == succ && u == pred {
            niv = LayerInterval::new(iv.start, iv.start + l);
        } else if u == pred {
            niv = LayerInterval::new(iv.start, iv.end + k);
        } else if u == succ {
            niv = LayerInterval::new(fiv.start + k, fiv.start + k + tail_len + iv.len());
        }
        entries.push((u, niv.normalized(l)));
    }
    let new_layout = Layout::new(l, entries)?;
    let new_ring = ring.without(failed)?;
    Ok(RecoveryPlan {
        failed,
        pred,
        succ,
        head,
        tail,
        tail_source,
        replay_tokens: replay,
        load_s,
        replay_s,
        transfer_s,
        time_s,
        compute_energy_j,
        tx_energy_j: tx_energy,
        meets_deadline: time_s <= swarm.config.deadline_s * (1.0 + 1e-12),
        layout: new_layout,
        ring: new_ring,
    })
}

/// Layers each survivor holds current state (weights + KV) for after a recovery: its native
/// interval, extended by the head replica it held of its (unchanged) successor.
pub fn held_state(old_layout: &Layout, old_plan: &ProtectionPlan, new_layout: &Layout) -> Vec<(UavId, LayerInterval)> {
    let l = new_layout.num_layers();
    let old_ring = old_layout.ring();
    new_layout
        .entries()
        .iter()
        .map(|&(u, iv)| {
            let mut held = iv;
            if let Some(os) = old_ring.succ(u) {
                if let (Some(osiv), Some(_)) = (old_layout.interval(os), new_layout.interval(os)) {
                    let k = old_plan.get(os).k.min(osiv.len());
                    if k > 0 && osiv.start % l == iv.end % l && held.len() + k <= l {
                        held = LayerInterval::new(iv.start, iv.end + k);
                    }
                }
            }
            (u, held)
        })
        .collect()
}

/// Result of P2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reconfiguration {
    pub layout: Layout,
    /// Slowest stage latency (no protection), s.
    pub bottleneck_s: f64,
    /// Minimum expected tokens without protection costs.
    pub min_expected_tokens: f64,
    /// Layers that changed owner: (layers, from, to).
    pub moves: Vec<(LayerInterval, UavId, UavId)>,
}

/// P2: a new contiguous layout over the survivors in ring order where each survivor takes at
/// least one layer and only layers in its `held` interval. Among the layouts with no stage
/// around the gateway (all of them if none exists): minimises the slowest stage, then maximises
/// the minimum expected tokens, then moves the fewest layers. Errors say which layers no
/// survivor holds.
///
/// Why avoiding the wrap comes first: a stage that holds both the last and the first layers is entered
/// twice per token (the embedding comes in, leaves for the next stage and comes back), one hop
/// more than the same layers unwrapped, and its predecessor can replicate only the layers before
/// the gateway ([`LayerInterval::max_head`]). It is needed only when the survivors' state leaves
/// no cut at layer 0: after the last stage fails, its tail goes to its successor, the first stage.
pub fn reconfigure(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    held: &[(UavId, LayerInterval)],
) -> Result<Reconfiguration> {
    swarm.validate()?;
    model.validate()?;
    layout.check_ring(ring)?;
    let l = model.num_layers;
    if layout.num_layers() != l {
        return Err(PlanError::InvalidModel("layout and model disagree on the layer count".into()));
    }
    let m = ring.len();
    let order = ring.order();
    let mut h = Vec::with_capacity(m);
    let mut lat = Vec::with_capacity(m);
    let mut en = Vec::with_capacity(m);
    let mut fl = Vec::with_capacity(m);
    let mut le = Vec::with_capacity(m);
    for &u in order {
        let nat = layout.interval(u).ok_or(PlanError::NotInRing { uav: u })?;
        let hv = held.iter().find(|(x, _)| *x == u).map(|(_, iv)| *iv).unwrap_or(nat);
        // a survivor always holds its native layers
        let hv = if hv.covers(&nat, l) { hv } else { nat };
        h.push(hv.normalized(l));
        let s = swarm.uav(u)?;
        let e = effective(s, model, &swarm.config);
        lat.push(e.layer_latency_s);
        en.push(s.energy_j);
        fl.push(s.flight_power_w);
        le.push(e.layer_energy_j);
    }
    // layers nobody holds
    let lost: Vec<u32> = (0..l).filter(|&x| !h.iter().any(|iv| iv.contains(x, l))).collect();
    if !lost.is_empty() {
        return Err(PlanError::LayersLost {
            lost: runs(&lost),
            reason: "no survivor holds weights and KV for them".into(),
        });
    }
    if m == 1 {
        if h[0].len() < l {
            return Err(PlanError::NoReconfiguration(format!(
                "uav {} is the only survivor and does not hold every layer",
                order[0]
            )));
        }
        // It holds every layer, so it runs them from the gateway's side: [0, L), never wrapped.
        let iv = LayerInterval::new(0, l);
        let lay = Layout::new(l, vec![(order[0], iv)])?;
        return Ok(Reconfiguration {
            layout: lay,
            bottleneck_s: f64::from(l) * lat[0],
            min_expected_tokens: en[0] / (fl[0] * f64::from(l) * lat[0] + le[0] * f64::from(l)),
            moves: vec![],
        });
    }
    // candidate cut positions: c_i in H_i and c_i - 1 in H_{i-1}
    let cands: Vec<Vec<u32>> = (0..m)
        .map(|i| {
            let p = (i + m - 1) % m;
            h[i].layers(l).filter(|&c| h[p].contains((c + l - 1) % l, l)).collect()
        })
        .collect();
    if let Some(i) = cands.iter().position(|c| c.is_empty()) {
        return Err(PlanError::NoReconfiguration(format!(
            "uav {} holds {} and its ring predecessor uav {} holds {}: no boundary between them",
            order[i],
            h[i],
            order[(i + m - 1) % m],
            h[(i + m - 1) % m]
        )));
    }
    // rotate so position 0 has the fewest candidates
    let r0 = (0..m).min_by_key(|&i| cands[i].len()).unwrap_or(0);
    let idx: Vec<usize> = (0..m).map(|j| (r0 + j) % m).collect();
    let natives: Vec<LayerInterval> =
        order.iter().map(|&u| layout.interval(u).unwrap_or(LayerInterval::new(0, 0))).collect();
    let dp = |value: &dyn Fn(usize, u32, u32) -> Option<f64>, comb| cycle_dp(l, &idx, &cands, &h, value, comb);
    let stage = |i: usize, len: u32| f64::from(len) * lat[i];
    // The three passes, over stages inside [0, L) only unless `allow_wrap`: the slowest stage,
    // then the minimum expected tokens under it, then the fewest layers moved.
    let balance = |allow_wrap: bool| -> Option<(f64, f64, Vec<u32>)> {
        let fits = |start: u32, len: u32| allow_wrap || start + len <= l;
        let (neg_b, _) = dp(&|i, start, len| fits(start, len).then(|| -stage(i, len)), Combine::Min)?;
        let bottleneck = -neg_b;
        let tokens = |i: usize, start: u32, len: u32| -> Option<f64> {
            if !fits(start, len) || stage(i, len) > bottleneck * (1.0 + 1e-12) {
                return None;
            }
            let e = fl[i] * bottleneck + le[i] * f64::from(len);
            Some(if e > 0.0 { en[i] / e } else { f64::INFINITY })
        };
        let (min_tokens, _) = dp(&tokens, Combine::Min)?;
        // each move is a switch-over to coordinate
        let floor = min_tokens * (1.0 - 1e-9);
        let moved = |i: usize, start: u32, len: u32| -> Option<f64> {
            match tokens(i, start, len) {
                Some(t) if t >= floor => {
                    let kept =
                        LayerInterval::new(start, start + len).layers(l).filter(|&x| natives[i].contains(x, l)).count()
                            as u32;
                    Some(-f64::from(len - kept))
                }
                _ => None,
            }
        };
        let (_, cuts) = dp(&moved, Combine::Sum)?;
        Some((bottleneck, min_tokens, cuts))
    };
    let Some((bottleneck, min_tokens, cuts)) = balance(false).or_else(|| balance(true)) else {
        return Err(PlanError::NoReconfiguration(
            "no set of boundaries gives every survivor a held, non-empty interval".into(),
        ));
    };
    let mut entries = vec![(0u32, LayerInterval::new(0, 1)); m];
    for j in 0..m {
        let i = idx[j];
        let c = cuts[j];
        let next = cuts[(j + 1) % m];
        let len = (next + l - c) % l;
        entries[i] = (order[i], LayerInterval::new(c, c + len));
    }
    let new_layout = Layout::new(l, entries)?;
    let mut moves: Vec<(LayerInterval, UavId, UavId)> = Vec::new();
    for x in 0..l {
        if let (Some(a), Some(b)) = (layout.owner(x), new_layout.owner(x)) {
            if a != b {
                match moves.last_mut() {
                    Some((iv, fa, tb)) if *fa == a && *tb == b && iv.end % l == x => iv.end += 1,
                    _ => moves.push((LayerInterval::new(x, x + 1), a, b)),
                }
            }
        }
    }
    debug!(bottleneck, min_tokens, moved = moves.len(), "P2 reconfiguration");
    Ok(Reconfiguration { layout: new_layout, bottleneck_s: bottleneck, min_expected_tokens: min_tokens, moves })
}

/// Max-min DP over cut positions around the cycle. `idx[j]` is the survivor at rotated
/// position j; `value(i, start, len)` the value of survivor i taking `len` layers from `start`
/// (None: not allowed).
/// Returns the best value and the cut (start layer) of each rotated position.
fn cycle_dp(
    l: u32,
    idx: &[usize],
    cands: &[Vec<u32>],
    h: &[LayerInterval],
    value: &dyn Fn(usize, u32, u32) -> Option<f64>,
    comb: crate::p1::Combine,
) -> Option<(f64, Vec<u32>)> {
    let m = idx.len();
    let mut best: Option<(f64, Vec<u32>)> = None;
    for &c0 in &cands[idx[0]] {
        let off = |c: u32| (c + l - c0) % l;
        // dp over rotated positions 1..m: (offset, value, back index)
        let mut layers: Vec<Vec<(u32, f64, usize)>> = Vec::with_capacity(m);
        layers.push(vec![(0, comb.identity(), 0)]);
        let mut ok = true;
        for j in 1..m {
            let i = idx[j];
            let pi = idx[j - 1];
            let prev = &layers[j - 1];
            let mut cur: Vec<(u32, f64, usize)> = Vec::new();
            for &c in &cands[i] {
                let d = off(c);
                if d == 0 {
                    continue;
                }
                let mut bestv = f64::NEG_INFINITY;
                let mut bi = usize::MAX;
                for (a, &(pd, pv, _)) in prev.iter().enumerate() {
                    if pv == f64::NEG_INFINITY || pd >= d {
                        continue;
                    }
                    let len = d - pd;
                    let start = (c0 + pd) % l;
                    if !h[pi].covers(&LayerInterval::new(start, start + len), l) {
                        continue;
                    }
                    if let Some(v) = value(pi, start, len) {
                        let nv = comb.join(pv, v);
                        if nv > bestv {
                            bestv = nv;
                            bi = a;
                        }
                    }
                }
                if bi != usize::MAX {
                    cur.push((d, bestv, bi));
                }
            }
            if cur.is_empty() {
                ok = false;
                break;
            }
            layers.push(cur);
        }
        if !ok {
            continue;
        }
        // close: the last survivor runs to c0 + L
        let last = idx[m - 1];
        for (a, &(pd, pv, _)) in layers[m - 1].iter().enumerate() {
            let len = l - pd;
            let start = (c0 + pd) % l;
            if len == 0 || !h[last].covers(&LayerInterval::new(start, start + len), l) {
                continue;
            }
            if let Some(v) = value(last, start, len) {
                let tot = comb.join(pv, v);
                if best.as_ref().is_none_or(|(bv, _)| tot > *bv) {
                    let mut cuts = vec![0u32; m];
                    let mut k = a;
                    for j in (1..m).rev() {
                        let (d, _, b) = layers[j][k];
                        cuts[j] = (c0 + d) % l;
                        k = b;
                    }
                    cuts[0] = c0;
                    best = Some((tot, cuts));
                }
            }
        }
    }
    best
}

/// Sorted layer indices -> maximal runs as intervals.
fn runs(xs: &[u32]) -> Vec<LayerInterval> {
    let mut out: Vec<LayerInterval> = Vec::new();
    for &x in xs {
        match out.last_mut() {
            Some(iv) if iv.end == x => iv.end += 1,
            _ => out.push(LayerInterval::new(x, x + 1)),
        }
    }
    out
}

/// The whole failover path: recovery, P2 over the survivors, P1-new (strict, or relaxed when
/// the strict problem has no solution).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    pub recovery: RecoveryPlan,
    pub reconfiguration: Reconfiguration,
    pub protection: ProtectionPlan,
}

/// Recovery -> P2 -> P1-new for `failed`. `swarm` must hold the survivors.
pub fn plan_failover(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
    failed: UavId,
    ctx: RecoveryContext,
) -> Result<Failover> {
    let recovery = plan_recovery(swarm, model, layout, ring, plan, failed, ctx)?;
    let held = held_state(layout, plan, &recovery.layout);
    check_recovery_memory(swarm, model, &held)?;
    let reconfiguration = reconfigure(swarm, model, &recovery.layout, &recovery.ring, &held)?;
    let protection = if recovery.ring.len() < 2 {
        ProtectionPlan::none(&reconfiguration.layout)
    } else {
        match plan_protection(swarm, model, &reconfiguration.layout, &recovery.ring) {
            Ok(p) => p,
            Err(PlanError::ProtectionMemory(why)) => {
                debug!(%why, "strict P1-new infeasible, relaxing");
                plan_protection_relaxed(swarm, model, &reconfiguration.layout, &recovery.ring)?
            }
            Err(e) => return Err(e),
        }
    };
    Ok(Failover { recovery, reconfiguration, protection })
}

/// Before anything is committed: right after the recovery every survivor holds its `held`
/// layers (native, the failed UAV's head or tail it takes over, the replica it keeps) with their
/// weights and the KV of the whole request. A survivor whose memory cannot hold that is named
/// instead of running out of memory mid-answer (a plan made with `recoverable_memory` off, or a
/// budget that has shrunk since the plan).
pub fn check_recovery_memory(swarm: &SwarmState, model: &ModelSpec, held: &[(UavId, LayerInterval)]) -> Result<()> {
    let per_layer = model.weight_bytes_per_layer + model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    for &(u, iv) in held {
        let budget = swarm.uav(u)?.memory_bytes;
        let need = f64::from(iv.len()) * per_layer;
        if need > budget * (1.0 + 1e-12) {
            return Err(PlanError::RecoveryMemory { uav: u, layers: iv.len(), need_bytes: need, budget_bytes: budget });
        }
    }
    Ok(())
}

/// UAVs whose expected remaining tokens (under the current plan) fall below the request's
/// remaining tokens, lowest first: they will not last the request.
pub fn retirement_candidates(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
) -> Result<Vec<UavId>> {
    retirements_due(swarm, model, layout, ring, plan, u64::MAX)
}

/// The candidates that are also within `horizon_tokens` of their end: retire them now (graceful
/// `plan_failover`), not earlier. A UAV that will not last the request still serves until
/// shortly before it would die; retiring it at the start would pile its layers (and the memory
/// they need) on the others for the whole request.
pub fn retirements_due(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
    horizon_tokens: u64,
) -> Result<Vec<UavId>> {
    let cost = evaluate(swarm, model, layout, ring, plan, model.total_tokens)?;
    let need = (model.remaining_tokens() as f64).min(horizon_tokens as f64);
    let mut v: Vec<(f64, UavId)> =
        cost.per_uav.iter().filter(|c| c.expected_tokens < need).map(|c| (c.expected_tokens, c.uav)).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(v.into_iter().map(|(_, u)| u).collect())
}
