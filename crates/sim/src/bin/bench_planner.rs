//! bench-planner: time P1 and P2 at 16x64, 64x256, 256x1024 (UAVs x layers) and a full
//! 4-method standard mission, against the targets (P1+P2 < 5 ms at 16x64, < 2 s at 256x1024;
//! 4-method mission < 2 s; 64x256 is held to the large target). Prints ratio = measured / target (< 1 is within target).
use std::time::Instant;

use aerokv_plan::{
    held_state, plan_initial_layout, plan_protection, plan_protection_relaxed, plan_recovery, reconfigure,
    RecoveryContext, SwarmState,
};
use aerokv_sim::{run_mission, Method, Scenario};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const PAPER: &str = include_str!("../../../../config/scenarios/paper.yaml");

fn scenario(uavs: u32, layers: u32) -> Result<Scenario, aerokv_sim::SimError> {
    let mut s = Scenario::parse(PAPER)?;
    s.uavs = uavs;
    s.layers = layers;
    // keep 1 GB of weights per layer as in the paper
    s.params = 32.0e9 * f64::from(layers) / 64.0;
    s.validate()?;
    Ok(s)
}

/// Median of `reps` runs of `f`, in seconds.
fn time<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut v: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").try_init();
    println!("{:<10} {:>12} {:>12} {:>12} {:>12} {:>8}", "swarm", "P1_ms", "P2_ms", "P1+P2_ms", "target_ms", "ratio");
    for &(m, l, target_s, reps) in &[(16u32, 64u32, 5e-3, 21usize), (64, 256, 2.0, 5), (256, 1024, 2.0, 3)] {
        let scn = scenario(m, l)?;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let swarm = scn.swarm(&mut rng);
        let model = scn.model();
        let layout = plan_initial_layout(&swarm, &model)?;
        let ring = layout.ring();
        let p1 = time(reps, || plan_protection(&swarm, &model, &layout, &ring));
        let plan = plan_protection(&swarm, &model, &layout, &ring)
            .or_else(|_| plan_protection_relaxed(&swarm, &model, &layout, &ring))?;
        // P2 after the failure of a middle UAV at mid-mission
        let failed = ring.order()[ring.len() / 2];
        let mut mid = model.clone();
        mid.tokens_done = model.total_tokens / 2;
        let survivors = SwarmState {
            uavs: swarm.uavs.iter().filter(|u| u.id != failed).cloned().collect(),
            config: swarm.config.clone(),
        };
        let rec = plan_recovery(&survivors, &mid, &layout, &ring, &plan, failed, RecoveryContext::default())?;
        let held = held_state(&layout, &plan, &rec.layout);
        let p2 = time(reps, || reconfigure(&survivors, &mid, &rec.layout, &rec.ring, &held));
        let total = p1 + p2;
        println!(
            "{:<10} {:>12.3} {:>12.3} {:>12.3} {:>12.1} {:>8.3}",
            format!("{m}x{l}"),
            p1 * 1e3,
            p2 * 1e3,
            total * 1e3,
            target_s * 1e3,
            total / target_s
        );
    }
    let paper = Scenario::parse(PAPER)?;
    let methods = [Method::Np, Method::Oo, Method::So, Method::AeroKv];
    // seed 0 of the paper scenario has failures; full traces kept, as `aerokv sim` does
    let mission = time(5, || {
        for m in methods {
            std::hint::black_box(run_mission(&paper, m, 0, true));
        }
    });
    let fails = aerokv_sim::failure_events(&paper, 0).len();
    println!(
        "4-method standard mission (16x64, 8192 tokens, {fails} failures): {:.1} ms, target 2000 ms, ratio {:.4}",
        mission * 1e3,
        mission / 2.0
    );
    Ok(())
}
