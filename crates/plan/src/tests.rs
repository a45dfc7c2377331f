//! Unit and property tests of the planning core (brute force on small swarms).
use proptest::prelude::*;

use crate::initial::{layer_counts, params, tokens_of};
use crate::*;

fn uav(id: UavId, energy: f64, mem: f64, lat: f64) -> UavState {
    UavState {
        id,
        energy_j: energy,
        capacity_j: energy,
        memory_bytes: mem,
        link_bps: 20e6,
        flight_power_w: 80.0,
        compute_power_w: 35.0,
        layer_latency_s: lat,
        latency_measured: false,
        tx_power_w: 2.5,
    }
}

fn cfg(deadline: f64, periods: Vec<u32>) -> PlanConfig {
    PlanConfig {
        deadline_s: deadline,
        weight_load_bps: 16.0,
        snapshot_periods: periods,
        power: PowerModel::default(),
        recoverable_memory: true,
        lifetime_target_factor: None,
        channel: None,
    }
}

fn model(l: u32, tokens: u64) -> ModelSpec {
    // one layer of weights = 1 byte x 8 bits / 16 bit/s = 0.5 s to load
    ModelSpec {
        num_layers: l,
        weight_bytes_per_layer: 1.0,
        kv_bytes_per_token_layer: 0.001,
        total_tokens: tokens,
        tokens_done: 0,
    }
}

#[test]
fn layout_validation_names_the_offender() {
    let ok = Layout::new(8, vec![(1, LayerInterval::new(0, 3)), (2, LayerInterval::new(3, 8))]);
    assert!(ok.is_ok());
    let gap = Layout::new(8, vec![(1, LayerInterval::new(0, 3)), (2, LayerInterval::new(4, 8))]);
    assert!(matches!(gap, Err(PlanError::NotContiguous { uav: 1, .. })), "{gap:?}");
    let empty = Layout::new(8, vec![(1, LayerInterval::new(0, 8)), (2, LayerInterval::new(8, 8))]);
    assert!(
        matches!(
            empty,
            Err(PlanError::EmptyInterval { uav: 2, .. }) | Err(PlanError::IntervalOutOfRange { uav: 2, .. })
        ),
        "{empty:?}"
    );
    let dup = Layout::new(8, vec![(1, LayerInterval::new(0, 4)), (1, LayerInterval::new(4, 8))]);
    assert!(matches!(dup, Err(PlanError::DuplicateUav { uav: 1 })));
    let short = Layout::new(8, vec![(1, LayerInterval::new(0, 4)), (2, LayerInterval::new(4, 7))]);
    assert!(short.is_err());
    // wrapping interval around the gateway: uav 2 holds 6, 7, 0, 1
    let wrap = Layout::new(8, vec![(1, LayerInterval::new(2, 6)), (2, LayerInterval::new(6, 10))]).unwrap();
    assert_eq!(wrap.owner(0), Some(2));
    assert_eq!(wrap.owner(5), Some(1));
    assert!(wrap.interval(2).unwrap().wraps(8));
}

#[test]
fn power_model_knees() {
    let p = PowerModel::default();
    assert_eq!(power_fraction(0.9, &p), 1.0);
    assert_eq!(power_fraction(0.4, &p), 1.0);
    assert!((power_fraction(0.2, &p) - 0.4).abs() < 1e-12);
    assert!((power_fraction(0.05, &p) - 0.4).abs() < 1e-12);
    let mut last = 0.0;
    for i in 0..=100 {
        let f = power_fraction(f64::from(i) / 100.0, &p);
        assert!(f >= last - 1e-12);
        last = f;
    }
    let mid = power_fraction(0.3, &p);
    assert!(mid > 0.4 && mid < 1.0);
}

/// All (K, T) combinations, evaluated by the cost model (not by P1's own code).
/// Returns (best minimum expected tokens, least total energy per token among plans reaching
/// `floor` with a pipeline latency <= `max_lat`).
fn brute_p1(swarm: &SwarmState, m: &ModelSpec, layout: &Layout, floor: f64, max_lat: f64) -> (Option<f64>, f64) {
    let ring = layout.ring();
    let ids: Vec<UavId> = ring.order().to_vec();
    let mut opts: Vec<Vec<Protection>> = Vec::new();
    for &u in &ids {
        let n = layout.layers_of(u);
        // a replica never reaches past the gateway (LayerInterval::max_head)
        let k_max = layout.interval(u).unwrap().max_head(layout.num_layers());
        let mut o = if k_max == n { vec![Protection { k: n, period: None }] } else { Vec::new() };
        for k in 0..n.min(k_max + 1) {
            for &t in &swarm.config.snapshot_periods {
                o.push(Protection { k, period: Some(t) });
            }
        }
        opts.push(o);
    }
    let sat = swarm.config.lifetime_target_factor.map_or(f64::INFINITY, |f| f * m.remaining_tokens().max(1) as f64);
    let mut best: Option<f64> = None;
    let mut least = f64::INFINITY;
    let mut idx = vec![0usize; ids.len()];
    loop {
        let plan = ProtectionPlan {
            per_uav: ids.iter().zip(&idx).enumerate().map(|(i, (&u, &j))| (u, opts[i][j])).collect(),
            min_expected_tokens: 0.0,
            pipeline_latency_s: 0.0,
            worst_recovery_s: 0.0,
            meets_deadline: true,
        };
        let c = evaluate(swarm, m, layout, &ring, &plan, m.total_tokens).unwrap();
        let ok = c.per_uav.iter().all(|u| {
            u.worst_recovery_s <= swarm.config.deadline_s * (1.0 + 1e-12)
                && u.memory.total() <= u.memory_budget_bytes * (1.0 + 1e-12)
                && (!swarm.config.recoverable_memory
                    || u.recovery_memory_bytes <= u.memory_budget_bytes * (1.0 + 1e-12))
        });
        let v = c.expected_remaining_tokens.min(sat);
        if ok && best.is_none_or(|b| v > b) {
            best = Some(v);
        }
        if ok && v >= floor && c.pipeline_latency_s <= max_lat * (1.0 + 1e-12) {
            least = least.min(c.per_uav.iter().map(|u| u.energy.total()).sum::<f64>());
        }
        // next combination
        let mut i = 0;
        loop {
            if i == idx.len() {
                return (best, least);
            }
            idx[i] += 1;
            if idx[i] < opts[i].len() {
                break;
            }
            idx[i] = 0;
            i += 1;
        }
    }
}

fn small_case() -> impl Strategy<Value = (SwarmState, ModelSpec, Layout)> {
    (2usize..=5)
        .prop_flat_map(|m| {
            (
                prop::collection::vec((1u32..=3, 1e3f64..1e4, 0.0f64..4.0, 0.01f64..0.1), m),
                0.6f64..3.0,
                prop::sample::subsequence(vec![1u32, 2, 3, 4, 8], 1..=3),
                any::<bool>(),
                prop::option::of(1.0f64..100.0),
                0u32..16,
            )
        })
        .prop_map(|(spec, deadline, periods, recoverable, target, rotate)| {
            let l: u32 = spec.iter().map(|s| s.0).sum();
            let uavs: Vec<UavState> = spec
                .iter()
                .enumerate()
                .map(|(i, &(n, e, extra, lat))| uav(i as u32, e, f64::from(n) * 1.01 + extra + 0.05, lat))
                .collect();
            let counts: Vec<u32> = spec.iter().map(|s| s.0).collect();
            let mut config = cfg(deadline, periods);
            config.recoverable_memory = recoverable;
            config.lifetime_target_factor = target;
            let swarm = SwarmState { uavs, config };
            let ring = Ring::new((0..spec.len() as u32).collect()).unwrap();
            // rotated: some cases have a stage around the gateway, as after the last stage failed
            let shift = rotate % l;
            let entries = Layout::from_counts(l, &ring, &counts)
                .unwrap()
                .entries()
                .iter()
                .map(|&(u, iv)| (u, LayerInterval::new((iv.start + shift) % l, (iv.start + shift) % l + iv.len())))
                .collect();
            let layout = Layout::new(l, entries).unwrap();
            (swarm, model(l, 10), layout)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn p1_is_exact_against_brute_force((swarm, m, layout) in small_case()) {
        let ring = layout.ring();
        let got = plan_protection(&swarm, &m, &layout, &ring);
        let sat = swarm.config.lifetime_target_factor.map_or(f64::INFINITY, |f| f * m.remaining_tokens().max(1) as f64);
        let (floor, lat) = got.as_ref().map_or((f64::INFINITY, 0.0), |p| (p.min_expected_tokens.min(sat) * (1.0 - 1e-9), p.pipeline_latency_s));
        let (brute, least) = brute_p1(&swarm, &m, &layout, floor, lat);
        match (brute, got) {
            (None, Err(_)) => {}
            (Some(b), Ok(plan)) => {
                let c = evaluate(&swarm, &m, &layout, &ring, &plan, m.total_tokens).unwrap();
                for u in &c.per_uav {
                    prop_assert!(u.worst_recovery_s <= swarm.config.deadline_s * (1.0 + 1e-9), "deadline {u:?}");
                    prop_assert!(u.memory.total() <= u.memory_budget_bytes * (1.0 + 1e-9), "memory {u:?}");
                    if swarm.config.recoverable_memory {
                        prop_assert!(u.recovery_memory_bytes <= u.memory_budget_bytes * (1.0 + 1e-9), "recovery memory {u:?}");
                    }
                }
                prop_assert!((c.expected_remaining_tokens.min(sat) - b).abs() <= 2e-9 * b.abs().max(1.0),
                    "p1 {} brute {}", c.expected_remaining_tokens, b);
                prop_assert!((plan.min_expected_tokens.min(sat) - b).abs() <= 2e-9 * b.abs().max(1.0));
                // tie-break: least total energy among the optimal plans at that latency
                let total: f64 = c.per_uav.iter().map(|u| u.energy.total()).sum();
                prop_assert!(total <= least * (1.0 + 1e-9), "energy {total} vs brute {least}");
                // the heuristic can only be as good
                if let Ok(beam) = plan_protection_beam(&swarm, &m, &layout, &ring, 4) {
                    prop_assert!(beam.min_expected_tokens.min(sat) <= b * (1.0 + 1e-9));
                }
            }
            (b, g) => prop_assert!(false, "brute {:?} vs p1 {:?}", b, g),
        }
    }

    #[test]
    fn a_recoverable_plan_always_passes_the_recovery_memory_check(
        (swarm, m, layout) in small_case(),
        failed_at in 0usize..5,
    ) {
        let ring = layout.ring();
        prop_assume!(swarm.config.recoverable_memory);
        let Ok(plan) = plan_protection(&swarm, &m, &layout, &ring) else { return Ok(()) };
        let failed = ring.order()[failed_at % ring.len()];
        let survivors = SwarmState {
            uavs: swarm.uavs.iter().filter(|u| u.id != failed).cloned().collect(),
            config: swarm.config.clone(),
        };
        let r = plan_failover(&survivors, &m, &layout, &ring, &plan, failed, RecoveryContext::default());
        prop_assert!(!matches!(r, Err(PlanError::RecoveryMemory { .. })), "{r:?}");
    }

    #[test]
    fn relaxed_p1_never_fails((swarm, m, layout) in small_case()) {
        let ring = layout.ring();
        let plan = plan_protection_relaxed(&swarm, &m, &layout, &ring).unwrap();
        prop_assert_eq!(plan.per_uav.len(), ring.len());
        if plan_protection(&swarm, &m, &layout, &ring).is_ok() {
            prop_assert!(plan.meets_deadline);
        }
    }

    #[test]
    fn initial_layout_is_optimal(
        spec in prop::collection::vec((1e3f64..1e5, 0.01f64..0.05, 2.0f64..9.0), 2..=4),
        extra in 0u32..4,
        sat in prop::option::of(10.0f64..2000.0),
    ) {
        let m = spec.len() as u32;
        let l = m + extra + 1;
        let uavs: Vec<UavState> = spec.iter().enumerate().map(|(i, &(e, lat, mem))| uav(i as u32, e, mem, lat)).collect();
        let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
        let md = model(l, 10);
        let ring = Ring::new((0..m).collect()).unwrap();
        let obj = LayoutObjective { saturate_tokens: sat };
        let p = params(&swarm, &md, &ring).unwrap();
        // brute force over all compositions that fit memory
        let mut all = Vec::new();
        let mut n = vec![1u32; m as usize];
        fn rec(i: usize, left: u32, n: &mut Vec<u32>, out: &mut Vec<Vec<u32>>) {
            if i + 1 == n.len() { if left >= 1 { n[i] = left; out.push(n.clone()); } return; }
            for k in 1..left { n[i] = k; rec(i + 1, left - k, n, out); }
        }
        rec(0, l, &mut n, &mut all);
        let feasible: Vec<Vec<u32>> = all.into_iter().filter(|n| n.iter().zip(&p.mem_cap).all(|(a, b)| a <= b)).collect();
        let got = layer_counts(&swarm, &md, &ring, obj);
        if feasible.is_empty() {
            prop_assert!(got.is_err());
        } else {
            let got = got.unwrap();
            prop_assert_eq!(got.iter().sum::<u32>(), l);
            prop_assert!(got.iter().zip(&p.mem_cap).all(|(a, b)| *a >= 1 && a <= b));
            let (gt, gl) = tokens_of(&p, &got);
            let s = sat.unwrap_or(f64::INFINITY);
            let best_sat = feasible.iter().map(|n| tokens_of(&p, n).0.min(s)).fold(0.0, f64::max);
            prop_assert!(gt.min(s) >= best_sat * (1.0 - 1e-9), "got {gt} brute {best_sat}");
            let best_lat = feasible.iter().map(|n| tokens_of(&p, n)).filter(|k| k.0.min(s) >= best_sat * (1.0 - 1e-9)).map(|k| k.1).fold(f64::INFINITY, f64::min);
            prop_assert!(gl <= best_lat * (1.0 + 1e-9), "latency {gl} brute {best_lat}");
        }
    }

    #[test]
    fn less_battery_never_gets_more_layers(e_low in 1e3f64..5e4, ratio in 1.0f64..10.0, others in prop::collection::vec(1e3f64..1e5, 1..4), l in 6u32..20) {
        let mut uavs = vec![uav(0, e_low, 100.0, 0.02), uav(1, e_low * ratio, 100.0, 0.02)];
        for (i, &e) in others.iter().enumerate() { uavs.push(uav(i as u32 + 2, e, 100.0, 0.02)); }
        let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
        let md = model(l, 10);
        prop_assume!(l as usize >= swarm.uavs.len());
        let layout = plan_initial_layout_with(&swarm, &md, LayoutObjective { saturate_tokens: None }).unwrap();
        prop_assert!(layout.layers_of(0) <= layout.layers_of(1), "{layout:?}");
    }

    #[test]
    fn p2_matches_brute_force(
        counts in prop::collection::vec(1u32..=4, 2..=5),
        reps in prop::collection::vec(0u32..=4, 5),
        lats in prop::collection::vec(0.01f64..0.05, 5),
        offset in 0u32..20,
    ) {
        let m = counts.len();
        let l: u32 = counts.iter().sum();
        let offset = offset % l;
        let ring = Ring::new((0..m as u32).collect()).unwrap();
        let mut entries = Vec::new();
        let mut s = offset;
        for (i, &c) in counts.iter().enumerate() { entries.push((i as u32, LayerInterval::new(s, s + c).normalized(l))); s += c; }
        let layout = Layout::new(l, entries).unwrap();
        let held: Vec<(UavId, LayerInterval)> = (0..m).map(|i| {
            let iv = layout.interval(i as u32).unwrap();
            let succ_n = counts[(i + 1) % m];
            let r = reps[i].min(succ_n);
            (i as u32, LayerInterval::new(iv.start, iv.end + r))
        }).collect();
        let uavs: Vec<UavState> = (0..m).map(|i| uav(i as u32, 1e4, 100.0, lats[i])).collect();
        let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
        let md = model(l, 10);
        let got = reconfigure(&swarm, &md, &layout, &ring, &held).unwrap();
        // every survivor only takes held layers
        for &(u, iv) in got.layout.entries() {
            let h = held.iter().find(|x| x.0 == u).unwrap().1;
            prop_assert!(h.covers(&iv, l), "uav {u} got {iv} holds {h}");
        }
        // brute force over all cut vectors
        let mut best = f64::INFINITY;
        let mut n = vec![1u32; m];
        fn rec(i: usize, left: u32, n: &mut Vec<u32>, out: &mut Vec<Vec<u32>>) {
            if i + 1 == n.len() { if left >= 1 { n[i] = left; out.push(n.clone()); } return; }
            for k in 1..left { n[i] = k; rec(i + 1, left - k, n, out); }
        }
        let mut all = Vec::new();
        rec(0, l, &mut n, &mut all);
        // the best layout without a stage wrapping around the gateway, and the best of all
        let mut best_unwrapped = f64::INFINITY;
        for c0 in 0..l {
            for ns in &all {
                let mut s = c0;
                let mut ok = true;
                let mut wraps = false;
                let mut b = 0.0f64;
                for i in 0..m {
                    let iv = LayerInterval::new(s, s + ns[i]);
                    if !held[i].1.covers(&iv, l) { ok = false; break; }
                    wraps |= iv.normalized(l).wraps(l);
                    b = b.max(f64::from(ns[i]) * lats[i]);
                    s += ns[i];
                }
                if ok {
                    best = best.min(b);
                    if !wraps { best_unwrapped = best_unwrapped.min(b); }
                }
            }
        }
        let got_wraps = got.layout.entries().iter().any(|(_, iv)| iv.wraps(l));
        if best_unwrapped.is_finite() {
            prop_assert!(!got_wraps, "p2 wrapped {:?} though an unwrapped layout exists", got.layout.entries());
            prop_assert!((got.bottleneck_s - best_unwrapped).abs() <= 1e-12, "p2 {} brute {}", got.bottleneck_s, best_unwrapped);
        } else {
            prop_assert!((got.bottleneck_s - best).abs() <= 1e-12, "p2 {} brute {}", got.bottleneck_s, best);
        }
    }
}

#[test]
fn last_stage_failure_wraps_and_recovers() {
    // 4 UAVs x 3 layers; the last stage (uav 3) fails; its succ is uav 0, the first stage
    let uavs: Vec<UavState> = (0..4).map(|i| uav(i, 1e5, 100.0, 0.02)).collect();
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![1, 2, 4]) };
    let mut md = model(12, 100);
    let ring = Ring::new(vec![0, 1, 2, 3]).unwrap();
    let layout = Layout::from_counts(12, &ring, &[3, 3, 3, 3]).unwrap();
    let mut plan = plan_protection(&swarm, &md, &layout, &ring).unwrap();
    plan.per_uav.insert(3, Protection { k: 1, period: Some(2) });
    md.tokens_done = 41;
    let survivors = SwarmState { uavs: swarm.uavs[..3].to_vec(), config: swarm.config.clone() };
    let rec = plan_recovery(&survivors, &md, &layout, &ring, &plan, 3, RecoveryContext::default()).unwrap();
    assert_eq!(rec.pred, 2);
    assert_eq!(rec.succ, 0);
    assert_eq!(rec.head, Some(LayerInterval::new(9, 10)));
    assert_eq!(rec.tail, Some(LayerInterval::new(10, 12)));
    assert_eq!(rec.tail_source, TailSource::Snapshot { token: 40 });
    assert_eq!(rec.replay_tokens, 1);
    // uav 0 now holds 10, 11, 0, 1, 2: an interval that wraps around the gateway
    assert_eq!(rec.layout.interval(0), Some(LayerInterval::new(10, 15)));
    assert_eq!(rec.layout.interval(2), Some(LayerInterval::new(6, 10)));
    let f = plan_failover(&survivors, &md, &layout, &ring, &plan, 3, RecoveryContext::default()).unwrap();
    assert_eq!(f.reconfiguration.layout.entries().len(), 3);
    assert_eq!(f.protection.per_uav.len(), 3);
    // P2 cannot move layers nobody holds: uav 1's replica of uav 2's head lets it rebalance only there
    for &(u, iv) in f.reconfiguration.layout.entries() {
        let h = held_state(&layout, &plan, &rec.layout).into_iter().find(|x| x.0 == u).unwrap().1;
        assert!(h.covers(&iv, 12));
    }
    // nobody but uav 0 holds layer 11, and only uav 0 holds layer 0: the wrap cannot be avoided
    assert!(f.reconfiguration.layout.interval(0).unwrap().wraps(12));
}

#[test]
fn a_head_replica_stops_at_the_gateway() {
    // uav 0 runs 10, 11, 0, 1, 2 of 12 layers: its predecessor can replicate 10 and 11 from its
    // input, not 0, 1, 2 (their input is the next token's embedding).
    let uavs: Vec<UavState> = (0..3).map(|i| uav(i, 1e5, 100.0, 0.02)).collect();
    let md = model(12, 100);
    let layout = Layout::new(
        12,
        vec![(0, LayerInterval::new(10, 15)), (1, LayerInterval::new(3, 6)), (2, LayerInterval::new(6, 10))],
    )
    .unwrap();
    let ring = layout.ring();
    assert_eq!(layout.interval(0).unwrap().max_head(12), 2);
    assert_eq!(layout.interval(1).unwrap().max_head(12), 3);
    // A deadline only live replicas meet: the largest replica each shard allows.
    for deadline in [0.0, 3.0] {
        let swarm = SwarmState { uavs: uavs.clone(), config: cfg(deadline, vec![1, 2, 4]) };
        for plan in [
            plan_protection_relaxed(&swarm, &md, &layout, &ring).unwrap(),
            plan_fixed(&swarm, &md, &layout, &ring, FixedPolicy::OverlapOnly).unwrap(),
        ] {
            assert!(plan.per_uav[&0].k <= 2, "deadline {deadline}: {:?}", plan.per_uav[&0]);
        }
    }
    let swarm = SwarmState { uavs, config: cfg(0.0, vec![1, 2, 4]) };
    let plan = plan_fixed(&swarm, &md, &layout, &ring, FixedPolicy::OverlapOnly).unwrap();
    assert_eq!((plan.per_uav[&0].k, plan.per_uav[&1].k, plan.per_uav[&2].k), (2, 3, 4));
}

#[test]
fn p2_does_not_wrap_a_stage_it_can_keep_inside_the_layers() {
    // Seen in a live swarm (30 layers, uav 2 and 3 of 4 failed in turn): uav 0 holds [0, 16),
    // uav 3 holds [16, 30) plus its replica of uav 0's first layer. Balancing alone gives
    // uav 3 [16, 31) (layer 0 at the far end: one hop more per token);
    // P2 keeps the cut at layer 0 instead.
    let uavs: Vec<UavState> = [0, 3].iter().map(|&i| uav(i, 1e5, 100.0, 0.02)).collect();
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![32]) };
    let md = model(30, 48);
    let ring = Ring::new(vec![0, 3]).unwrap();
    let layout = Layout::new(30, vec![(0, LayerInterval::new(0, 16)), (3, LayerInterval::new(16, 30))]).unwrap();
    let held = vec![(0, LayerInterval::new(0, 16)), (3, LayerInterval::new(16, 31))];
    let got = reconfigure(&swarm, &md, &layout, &ring, &held).unwrap();
    assert_eq!(got.layout.entries(), &[(0, LayerInterval::new(0, 16)), (3, LayerInterval::new(16, 30))]);
    assert!(got.moves.is_empty());
    // The sole survivor of a ring runs every layer from the gateway's side, whatever it started with.
    let alone = SwarmState { uavs: vec![uav(3, 1e5, 100.0, 0.02)], config: cfg(3.0, vec![32]) };
    let ring = Ring::new(vec![3]).unwrap();
    let layout = Layout::new(30, vec![(3, LayerInterval::new(16, 46))]).unwrap();
    let got = reconfigure(&alone, &md, &layout, &ring, &[(3, LayerInterval::new(16, 46))]).unwrap();
    assert_eq!(got.layout.entries(), &[(3, LayerInterval::new(0, 30))]);
}

#[test]
fn p2_reports_lost_layers() {
    let uavs: Vec<UavState> = (0..2).map(|i| uav(i, 1e5, 100.0, 0.02)).collect();
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
    let md = model(6, 10);
    let ring = Ring::new(vec![0, 1]).unwrap();
    let layout = Layout::from_counts(6, &ring, &[3, 3]).unwrap();
    // claim uav 1 holds nothing beyond [3, 5): layer 5 lost
    let held = vec![(0, LayerInterval::new(0, 3)), (1, LayerInterval::new(3, 5))];
    // held must cover native, so reconfigure falls back to native: no loss
    assert!(reconfigure(&swarm, &md, &layout, &ring, &held).is_ok());
    // recovery of a shard whose last UAV is gone
    let one = Ring::new(vec![0]).unwrap();
    let lay1 = Layout::from_counts(6, &one, &[6]).unwrap();
    let r = plan_recovery(&swarm, &md, &lay1, &one, &ProtectionPlan::none(&lay1), 0, RecoveryContext::default());
    assert!(matches!(r, Err(PlanError::LayersLost { .. })), "{r:?}");
}

#[test]
fn a_failover_that_does_not_fit_memory_names_the_uav() {
    // 3 layers each, memory for 4: uav 2 cannot also take uav 1's 3-layer tail (no replica).
    let uavs: Vec<UavState> = (0..3).map(|i| uav(i, 1e5, 4.5, 0.02)).collect();
    let swarm = SwarmState { uavs, config: cfg(30.0, vec![1]) };
    let md = model(9, 100);
    let ring = Ring::new(vec![0, 1, 2]).unwrap();
    let layout = Layout::from_counts(9, &ring, &[3, 3, 3]).unwrap();
    let plan = ProtectionPlan::none(&layout);
    let survivors =
        SwarmState { uavs: swarm.uavs.iter().filter(|u| u.id != 1).cloned().collect(), config: swarm.config };
    let r = plan_failover(&survivors, &md, &layout, &ring, &plan, 1, RecoveryContext::default());
    match r {
        Err(PlanError::RecoveryMemory { uav: 2, layers: 6, need_bytes, budget_bytes }) => {
            assert!((need_bytes - 6.0 * 1.1).abs() < 1e-9 && budget_bytes == 4.5);
        }
        other => panic!("{other:?}"),
    }
    // with room for it, the same failover is planned
    let roomy = SwarmState {
        uavs: survivors.uavs.iter().map(|u| UavState { memory_bytes: 7.0, ..u.clone() }).collect(),
        config: survivors.config.clone(),
    };
    assert!(plan_failover(&roomy, &md, &layout, &ring, &plan, 1, RecoveryContext::default()).is_ok());
}

#[test]
fn unprotected_tail_replays_whole_context() {
    let uavs: Vec<UavState> = (0..3).map(|i| uav(i, 1e5, 100.0, 0.02)).collect();
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
    let mut md = model(9, 100);
    md.tokens_done = 50;
    let ring = Ring::new(vec![0, 1, 2]).unwrap();
    let layout = Layout::from_counts(9, &ring, &[3, 3, 3]).unwrap();
    let plan = ProtectionPlan::none(&layout);
    let rec = plan_recovery(&swarm, &md, &layout, &ring, &plan, 1, RecoveryContext::default()).unwrap();
    assert_eq!(rec.tail_source, TailSource::FullReplay);
    assert_eq!(rec.replay_tokens, 50);
    assert!(!rec.meets_deadline);
    let g =
        plan_recovery(&swarm, &md, &layout, &ring, &plan, 1, RecoveryContext { graceful: true, ..Default::default() })
            .unwrap();
    assert_eq!(g.replay_tokens, 0);
    assert!(g.tx_energy_j > 0.0);
}

#[test]
fn retirement_flags_short_lived_uavs() {
    let mut uavs: Vec<UavState> = (0..3).map(|i| uav(i, 1e6, 100.0, 0.02)).collect();
    uavs[1].energy_j = 10.0;
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![1, 2]) };
    let md = model(9, 1000);
    let ring = Ring::new(vec![0, 1, 2]).unwrap();
    let layout = Layout::from_counts(9, &ring, &[3, 3, 3]).unwrap();
    let plan = plan_protection(&swarm, &md, &layout, &ring).unwrap();
    assert_eq!(retirement_candidates(&swarm, &md, &layout, &ring, &plan).unwrap(), vec![1]);
}

#[test]
fn invalid_input_is_an_error_not_a_panic() {
    let mut uavs: Vec<UavState> = (0..3).map(|i| uav(i, 1e6, 100.0, 0.02)).collect();
    uavs[2].link_bps = f64::NAN;
    let swarm = SwarmState { uavs, config: cfg(3.0, vec![1]) };
    let md = model(9, 10);
    let r = plan_initial_layout(&swarm, &md);
    assert!(matches!(r, Err(PlanError::InvalidUav { uav: 2, field: "link_bps", .. })), "{r:?}");
    let swarm2 = SwarmState { uavs: vec![], config: cfg(3.0, vec![1]) };
    assert!(plan_initial_layout(&swarm2, &md).is_err());
}

#[test]
fn retirement_waits_for_the_last_safe_moment() {
    // uav 1 cannot last the request; it is due for retirement only within the horizon of its end
    let swarm = SwarmState {
        uavs: vec![uav(0, 2.0e6, 1e12, 1e-3), uav(1, 2.0e3, 1e12, 1e-3), uav(2, 2.0e6, 1e12, 1e-3)],
        config: cfg(3.0, vec![1, 2, 4]),
    };
    let m = model(12, 1_000_000);
    let ring = Ring::new(vec![0, 1, 2]).unwrap();
    let layout = Layout::from_counts(12, &ring, &[4, 4, 4]).unwrap();
    let plan = ProtectionPlan::none(&layout);
    assert_eq!(retirement_candidates(&swarm, &m, &layout, &ring, &plan).unwrap(), vec![1]);
    let cost = evaluate(&swarm, &m, &layout, &ring, &plan, m.total_tokens).unwrap();
    let left = cost.per_uav.iter().find(|c| c.uav == 1).unwrap().expected_tokens;
    assert!(left > 10.0 && left < 1e6, "{left}");
    assert!(retirements_due(&swarm, &m, &layout, &ring, &plan, (left * 0.5) as u64).unwrap().is_empty());
    assert_eq!(retirements_due(&swarm, &m, &layout, &ring, &plan, (left * 1.5) as u64).unwrap(), vec![1]);
}
