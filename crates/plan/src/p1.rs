//! P1: protection planning (K_u, T_u per UAV) for a fixed layout and ring.
//!
//! Objective: maximise the minimum over UAVs of expected remaining tokens (remaining energy /
//! energy per token), subject to every UAV's memory budget (planned for `total_tokens` of KV)
//! and the recovery deadline tau. Lifetime in seconds is that times the pipeline latency; we
//! maximise tokens, not seconds, because seconds reward a slower pipeline.
//!
//! Why it is exact: u's choice K_u touches u (TX of its tail), pred(u) (replica compute, memory,
//! stage latency) and succ(u) (snapshot memory). T_u only matters for u's own recovery time
//! (snapshot memory is planned for the worst case of all rows), so for each K_u the largest
//! period meeting the deadline is optimal. What remains is a cycle of window-3 constraints:
//! u's feasibility and value depend on (K_pred, K_u, K_succ). For a fixed pipeline-latency
//! cap we fix (K_0, K_1) and run a max-min DP with state (K_{i-1}, K_i) around the ring,
//! closing the cycle at the end. Every pipeline latency the plan can have is one of finitely
//! many stage latencies; we try them in increasing order and stop once an upper bound on any
//! larger cap cannot beat the best plan found (the bound falls as the cap grows).
use crate::cost::{worst_recovery_s, RingData};
use crate::error::{PlanError, Result};
use crate::types::{Layout, ModelSpec, Protection, ProtectionPlan, Ring, SwarmState};

/// One allowed protection of a shard, with its worst-case recovery time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Choice {
    pub k: u32,
    pub period: Option<u32>,
    pub rec_s: f64,
}

pub(crate) struct Problem<'a> {
    pub d: &'a RingData,
    pub per_layer_bytes: f64,
    pub kv_bytes: f64,
    pub recoverable_memory: bool,
    /// Expected tokens above which lifetime counts as enough (infinity: pure max-min).
    pub saturate: f64,
}

impl Problem<'_> {
    /// (expected tokens, energy per token) of UAV i given K of pred, itself, succ, under `cap`;
    /// None if a constraint fails.
    #[inline]
    pub fn window(&self, i: usize, kp: u32, ki: u32, ks: u32, cap: f64) -> Option<(f64, f64)> {
        let d = self.d;
        let m = d.len();
        let pi = (i + m - 1) % m;
        let n = d.n[i];
        let stage = f64::from(n + ks) * d.lat[i];
        if stage > cap * (1.0 + 1e-12) {
            return None;
        }
        // snapshot rows of pred's tail (tails are always snapshotted in P1)
        let pred_tail = d.n[pi] - kp;
        let mem = f64::from(n + ks) * self.per_layer_bytes + f64::from(pred_tail) * self.kv_bytes;
        if mem > d.mem_budget[i] * (1.0 + 1e-12) {
            return None;
        }
        if self.recoverable_memory
            && f64::from(n + ks + pred_tail) * self.per_layer_bytes > d.mem_budget[i] * (1.0 + 1e-12)
        {
            return None;
        }
        let e = d.flight[i] * cap + d.layer_energy[i] * f64::from(n + ks) + d.tx_layer[i] * f64::from(n - ki);
        Some(((if e > 0.0 { d.energy[i] / e } else { f64::INFINITY }).min(self.saturate), e))
    }
}

/// How per-UAV scores combine around the ring (the DP maximises the combination).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Combine {
    Min,
    Sum,
}

impl Combine {
    pub(crate) fn identity(self) -> f64 {
        match self {
            Combine::Min => f64::INFINITY,
            Combine::Sum => 0.0,
        }
    }
    #[inline]
    pub(crate) fn join(self, a: f64, b: f64) -> f64 {
        match self {
            Combine::Min => a.min(b),
            Combine::Sum => a + b,
        }
    }
}

/// Allowed choices per ring position for a recovery deadline `deadline_s`: for each K the
/// largest period whose worst-case recovery meets it.
pub(crate) fn choices(d: &RingData, model: &ModelSpec, swarm: &SwarmState, deadline_s: f64) -> Vec<Vec<Choice>> {
    let cfg = &swarm.config;
    let mut periods = cfg.snapshot_periods.clone();
    periods.sort_unstable();
    periods.dedup();
    let m = d.len();
    (0..m)
        .map(|i| {
            let succ_lat = d.lat[(i + 1) % m];
            let mut out = Vec::new();
            for k in 0..=d.k_max[i] {
                if k == d.n[i] {
                    out.push(Choice { k, period: None, rec_s: 0.0 });
                    continue;
                }
                let best = periods
                    .iter()
                    .rev()
                    .map(|&t| (t, worst_recovery_s(model, cfg, d.n[i], Protection { k, period: Some(t) }, succ_lat)))
                    .find(|(_, r)| *r <= deadline_s * (1.0 + 1e-12));
                if let Some((t, r)) = best {
                    out.push(Choice { k, period: Some(t), rec_s: r });
                }
            }
            out
        })
        .collect()
}

/// Exact optimum over the cycle of `combine` of per-UAV scores; `score(i, k_pred, k_i, k_succ)`
/// is None when a constraint fails. Returns the best combination and the choice index per position.
pub(crate) fn solve_cycle(
    ch: &[Vec<Choice>],
    score: &dyn Fn(usize, u32, u32, u32) -> Option<f64>,
    comb: Combine,
) -> Option<(f64, Vec<usize>)> {
    let m = ch.len();
    let mut best: Option<(f64, Vec<usize>)> = None;
    if m == 2 {
        for (a, ca) in ch[0].iter().enumerate() {
            for (b, cb) in ch[1].iter().enumerate() {
                if let (Some(v0), Some(v1)) = (score(0, cb.k, ca.k, cb.k), score(1, ca.k, cb.k, ca.k)) {
                    let v = comb.join(v0, v1);
                    if best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                        best = Some((v, vec![a, b]));
                    }
                }
            }
        }
        return best;
    }
    // back[i][b * |A_i| + c] = index a at position i-2 that reached state (b, c) at positions (i-1, i)
    for (a0, c0) in ch[0].iter().enumerate() {
        for (a1, c1) in ch[1].iter().enumerate() {
            let mut table = vec![f64::NEG_INFINITY; ch[0].len() * ch[1].len()];
            table[a0 * ch[1].len() + a1] = comb.identity();
            let mut back: Vec<Vec<u32>> = Vec::with_capacity(m);
            back.push(Vec::new());
            back.push(Vec::new());
            let mut feasible = true;
            for i in 2..m {
                let (na, nb, nc) = (ch[i - 2].len(), ch[i - 1].len(), ch[i].len());
                let mut next = vec![f64::NEG_INFINITY; nb * nc];
                let mut bk = vec![u32::MAX; nb * nc];
                for a in 0..na {
                    for b in 0..nb {
                        let v = table[a * nb + b];
                        if v == f64::NEG_INFINITY {
                            continue;
                        }
                        for c in 0..nc {
                            if let Some(w) = score(i - 1, ch[i - 2][a].k, ch[i - 1][b].k, ch[i][c].k) {
                                let nv = comb.join(v, w);
                                if nv > next[b * nc + c] {
                                    next[b * nc + c] = nv;
                                    bk[b * nc + c] = a as u32;
                                }
                            }
                        }
                    }
                }
                if next.iter().all(|v| *v == f64::NEG_INFINITY) {
                    feasible = false;
                    break;
                }
                table = next;
                back.push(bk);
            }
            if !feasible {
                continue;
            }
            let (na, nb) = (ch[m - 2].len(), ch[m - 1].len());
            for a in 0..na {
                for b in 0..nb {
                    let v = table[a * nb + b];
                    if v == f64::NEG_INFINITY {
                        continue;
                    }
                    let (ka, kb) = (ch[m - 2][a].k, ch[m - 1][b].k);
                    if let (Some(w1), Some(w0)) = (score(m - 1, ka, kb, c0.k), score(0, kb, c0.k, c1.k)) {
                        let tot = comb.join(comb.join(v, w1), w0);
                        if best.as_ref().is_none_or(|(bv, _)| tot > *bv) {
                            let mut idx = vec![0usize; m];
                            idx[0] = a0;
                            idx[1] = a1;
                            idx[m - 2] = a;
                            idx[m - 1] = b;
                            let mut i = m - 1;
                            while i >= 3 {
                                let nc = ch[i].len();
                                idx[i - 2] = back[i][idx[i - 1] * nc + idx[i]] as usize;
                                i -= 1;
                            }
                            best = Some((tot, idx));
                        }
                    }
                }
            }
        }
    }
    best
}

/// Exact P1 for a given deadline. Returns (plan, value) or None if no plan fits.
pub(crate) fn solve(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    d: &RingData,
    deadline_s: f64,
) -> Result<Option<ProtectionPlan>> {
    let m = d.len();
    if m < 2 {
        return Err(PlanError::SingleUav);
    }
    let ch = choices(d, model, swarm, deadline_s);
    if ch.iter().any(|c| c.is_empty()) {
        return Ok(None);
    }
    let p = Problem {
        d,
        per_layer_bytes: model.weight_bytes_per_layer + model.total_tokens as f64 * model.kv_bytes_per_token_layer,
        kv_bytes: model.total_tokens as f64 * model.kv_bytes_per_token_layer,
        recoverable_memory: swarm.config.recoverable_memory,
        saturate: saturation(swarm, model),
    };
    // every stage latency a plan can produce
    let base = (0..m).map(|i| f64::from(d.n[i]) * d.lat[i]).fold(0.0, f64::max);
    let mut caps: Vec<f64> = (0..m)
        .flat_map(|i| ch[(i + 1) % m].iter().map(move |c| (i, c.k)))
        .map(|(i, k)| f64::from(d.n[i] + k) * d.lat[i])
        .filter(|&c| c >= base)
        .collect();
    caps.sort_by(f64::total_cmp);
    caps.dedup();
    let ub = |cap: f64| -> f64 {
        (0..m)
            .map(|i| {
                let e = d.flight[i] * cap + d.layer_energy[i] * f64::from(d.n[i]);
                if e > 0.0 {
                    d.energy[i] / e
                } else {
                    f64::INFINITY
                }
            })
            .fold(f64::INFINITY, f64::min)
            .min(p.saturate)
    };
    let mut best: Option<(f64, f64, Vec<usize>)> = None;
    for &cap in &caps {
        if let Some((bv, _, _)) = &best {
            if ub(cap) <= *bv {
                break;
            }
        }
        let score = |i: usize, kp: u32, ki: u32, ks: u32| p.window(i, kp, ki, ks, cap).map(|w| w.0);
        if let Some((_, idx)) = solve_cycle(&ch, &score, Combine::Min) {
            // true value: with the actual pipeline latency (<= cap)
            let (val, lat) = true_value(&p, &ch, &idx);
            let better = match &best {
                None => true,
                Some((bv, bl, _)) => val > *bv || (val == *bv && lat < *bl),
            };
            if better {
                best = Some((val, lat, idx));
            }
        }
    }
    let Some((val, lat, mut idx)) = best else { return Ok(None) };
    // Max-min leaves the UAVs that are not the bottleneck free; among the optimal plans take
    // the one with the least total energy per token (fewest replicas: less compute and memory).
    // values within a relative 1e-9 count as ties (a 1e-11 gain is not worth a replica)
    let floor = val * (1.0 - 1e-9);
    let energy = |i: usize, kp: u32, ki: u32, ks: u32| match p.window(i, kp, ki, ks, lat) {
        Some((t, e)) if t >= floor => Some(-e),
        _ => None,
    };
    if let Some((_, idx2)) = solve_cycle(&ch, &energy, Combine::Sum) {
        let (v2, l2) = true_value(&p, &ch, &idx2);
        if v2 >= floor && l2 <= lat * (1.0 + 1e-12) {
            idx = idx2;
        }
    }
    // report the real minimum, not the saturated one
    let real = Problem { saturate: f64::INFINITY, ..p };
    let (val, lat) = true_value(&real, &ch, &idx);
    let mut per_uav = std::collections::BTreeMap::new();
    let mut worst = 0.0f64;
    for i in 0..m {
        let c = ch[i][idx[i]];
        per_uav.insert(d.ids[i], Protection { k: c.k, period: c.period });
        worst = worst.max(c.rec_s);
    }
    let _ = (layout, ring);
    Ok(Some(ProtectionPlan {
        per_uav,
        min_expected_tokens: val,
        pipeline_latency_s: lat,
        worst_recovery_s: worst,
        meets_deadline: worst <= swarm.config.deadline_s * (1.0 + 1e-12),
    }))
}

/// Expected tokens at which P1 stops buying lifetime (`lifetime_target_factor` x remaining tokens).
pub(crate) fn saturation(swarm: &SwarmState, model: &ModelSpec) -> f64 {
    match swarm.config.lifetime_target_factor {
        Some(f) if f.is_finite() && f > 0.0 => f * model.remaining_tokens().max(1) as f64,
        _ => f64::INFINITY,
    }
}

/// Min tokens and pipeline latency of a complete assignment, with the actual latency.
pub(crate) fn true_value(p: &Problem, ch: &[Vec<Choice>], idx: &[usize]) -> (f64, f64) {
    let d = p.d;
    let m = ch.len();
    let k = |i: usize| ch[i % m][idx[i % m]].k;
    let lat = (0..m).map(|i| f64::from(d.n[i] + k(i + 1)) * d.lat[i]).fold(0.0, f64::max);
    let val = (0..m)
        .map(|i| p.window(i, k(i + m - 1), k(i), k(i + 1), lat).map_or(f64::NEG_INFINITY, |w| w.0))
        .fold(f64::INFINITY, f64::min);
    (val, lat)
}

/// Why no strict plan exists, in words that name UAVs.
pub(crate) fn diagnose(d: &RingData, model: &ModelSpec, swarm: &SwarmState) -> PlanError {
    let ch = choices(d, model, swarm, swarm.config.deadline_s);
    let m = d.len();
    let per_layer = model.weight_bytes_per_layer + model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    let kv = model.total_tokens as f64 * model.kv_bytes_per_token_layer;
    let mut msgs = Vec::new();
    for i in 0..m {
        let s = (i + 1) % m;
        let pi = (i + m - 1) % m;
        let min_rep = ch[s].iter().map(|c| c.k).min().unwrap_or(0);
        let min_snap = d.n[pi].saturating_sub(ch[pi].iter().map(|c| c.k).max().unwrap_or(0));
        let need = f64::from(d.n[i] + min_rep) * per_layer + f64::from(min_snap) * kv;
        if need > d.mem_budget[i] {
            msgs.push(format!(
                "uav {} needs at least {:.3} GB ({} native layers + {} replica layers of uav {} to meet the deadline) but has {:.3} GB",
                d.ids[i],
                need / 1e9,
                d.n[i],
                min_rep,
                d.ids[s],
                d.mem_budget[i] / 1e9
            ));
        }
    }
    if msgs.is_empty() {
        msgs.push(
            "each UAV fits on its own, but no combination of neighbouring replicas and snapshots fits around the ring"
                .into(),
        );
    }
    PlanError::ProtectionMemory(msgs.join("; "))
}
