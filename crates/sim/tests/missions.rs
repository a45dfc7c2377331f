//! End-to-end missions over the planning core.
use aerokv_sim::{failure_events, run_mission, run_mission_with, FailureEvent, Method, Scenario, Summary};

const PAPER: &str = include_str!("../../../config/scenarios/paper.yaml");
const HARSH: &str = include_str!("../../../config/scenarios/harsh.yaml");

fn summary(scn: &Scenario, m: Method, seed: u64) -> Summary {
    run_mission(scn, m, seed, false).summary.expect("a summary")
}

#[test]
fn missions_are_deterministic() {
    let scn = Scenario::parse(PAPER).unwrap();
    let a = summary(&scn, Method::AeroKv, 3);
    let b = summary(&scn, Method::AeroKv, 3);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    // every method sees the same failure draws
    assert_eq!(failure_events(&scn, 3), failure_events(&scn, 3));
}

#[test]
fn aerokv_meets_every_deadline_on_the_paper_scenario() {
    let scn = Scenario::parse(PAPER).unwrap();
    let mut failures = 0;
    for seed in 0..10 {
        let s = summary(&scn, Method::AeroKv, seed);
        assert!(s.mission_success, "seed {seed}: {}", s.failure_reason);
        assert!(s.deadline_met, "seed {seed}: max recovery {}", s.max_recovery_latency_s);
        assert_eq!(s.tokens_done, scn.tokens);
        failures += s.failures;
    }
    assert!(failures > 0, "the seeds must exercise failures");
}

#[test]
fn np_replays_the_context_and_misses_the_deadline() {
    let scn = Scenario::parse(PAPER).unwrap();
    let ev = [FailureEvent { token: 4000, pick: 0.5 }];
    let np = run_mission_with(&scn, Method::Np, 1, &ev, false).summary.unwrap();
    assert!(np.mission_success);
    assert!(!np.deadline_met);
    assert!(np.max_recovery_latency_s > 30.0, "{}", np.max_recovery_latency_s);
    let a = run_mission_with(&scn, Method::AeroKv, 1, &ev, false).summary.unwrap();
    assert!(a.deadline_met && a.max_recovery_latency_s <= scn.deadline_s);
}

#[test]
fn last_stage_failures_wrap_around_the_gateway() {
    // the last stage fails (pick ~1), then the new last stage, then again: the first stage
    // ends up holding layers at both ends of the model
    let scn = Scenario::parse(PAPER).unwrap();
    let ev: Vec<FailureEvent> =
        [1000, 2000, 3000, 5000].iter().map(|&t| FailureEvent { token: t, pick: 0.999 }).collect();
    for m in [Method::AeroKv, Method::AeroKvNoP2] {
        let s = run_mission_with(&scn, m, 2, &ev, true).summary.unwrap();
        assert!(s.mission_success, "{}: {}", s.method, s.failure_reason);
        assert_eq!(s.failures, 4);
    }
    // SO piles every failed shard onto the first stage: it runs out of memory, it does not lose layers
    let so = run_mission_with(&scn, Method::So, 2, &ev, false).summary.unwrap();
    assert!(so.mission_success || so.failure_reason.contains("memory_exceeded"), "{}", so.failure_reason);
    let a = run_mission_with(&scn, Method::AeroKv, 2, &ev, false).summary.unwrap();
    assert!(a.deadline_met, "max {}", a.max_recovery_latency_s);
}

#[test]
fn two_uavs_left_still_finish() {
    let mut scn = Scenario::parse(PAPER).unwrap();
    scn.uavs = 4;
    scn.layers = 8;
    scn.params = 4.0e9;
    let ev = [FailureEvent { token: 100, pick: 0.1 }, FailureEvent { token: 200, pick: 0.6 }];
    let s = run_mission_with(&scn, Method::AeroKv, 0, &ev, false).summary.unwrap();
    assert!(s.mission_success, "{}", s.failure_reason);
    // the last survivor cannot be recovered
    let ev3 = [
        FailureEvent { token: 100, pick: 0.1 },
        FailureEvent { token: 200, pick: 0.6 },
        FailureEvent { token: 300, pick: 0.2 },
        FailureEvent { token: 400, pick: 0.2 },
    ];
    let s = run_mission_with(&scn, Method::AeroKv, 0, &ev3, false).summary.unwrap();
    assert!(!s.mission_success);
    assert!(s.failure_reason.contains("all_uavs_lost") || s.failure_reason.contains("lost"), "{}", s.failure_reason);
}

#[test]
fn harsh_scenario_runs_every_method() {
    let scn = Scenario::parse(HARSH).unwrap();
    for m in [
        Method::Np,
        Method::Oo,
        Method::So,
        Method::AeroKv,
        Method::AeroKvUniform,
        Method::AeroKvBeam,
        Method::AeroKvNoRetire,
        Method::AeroKvNoP2,
    ] {
        let s = summary(&scn, m, 0);
        assert!(s.tokens_done > 0 || !s.failure_reason.is_empty(), "{s:?}");
    }
}
