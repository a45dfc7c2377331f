//! The I/O of a live replay (crate::replay, docs/bags.md): owns `/clock` for a swarm that runs
//! with `use_sim_time` ([`crate::replay::Pacer`]) and plays a recorded mission's battery inputs
//! into it, on the recorded clock and in step with the tokens it generates.
use crate::replay::{battery_due, BatteryStep, Pace, Pacer};
use crate::ros::record::time as stamp;
use futures::{FutureExt, StreamExt};
use r2r::aerokv::msg::TokenChunk;
use r2r::rosgraph_msgs::msg::Clock;
use r2r::sensor_msgs::msg::BatteryState;
use r2r::QosProfile;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Each UAV's battery input is published again this often (wall time; a best-effort message lost
/// is sent again).
const REPUBLISH: Duration = Duration::from_millis(200);
/// `/clock` is published this often (wall time): the nodes' finest timer is the watchdog's 20 ms
/// check, their heartbeats every 50 ms.
const CLOCK_PERIOD: Duration = Duration::from_millis(5);
/// A hold longer than this (wall time) is given up: the clock runs past the recorded time of the
/// next token (counted in [`FeedReport::released`]) rather than stall a swarm that waits for its
/// own timers (a failover waits for heartbeats: when the new swarm spent more of the recorded
/// time between two tokens computing, the rest is not enough).
const MAX_HOLD: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct FeedReport {
    /// The most tokens the swarm had out.
    pub tokens_out: u32,
    pub published: u64,
    /// Wall seconds the clock stood at the recording's start until every played topic had its
    /// subscribers (the UAV's battery monitor and the recorder).
    pub matched_after_s: f64,
    /// The new swarm's first token came this much later (negative: earlier) on its clock than
    /// the recorded one on the recorded clock: the shift of every later recorded time.
    pub offset_s: f64,
    /// Holds at a token's recorded time: how many, and how many were given up.
    pub holds: u32,
    pub released: u32,
    /// The most the clock was past a token's (shifted) recorded time when it came out, seconds.
    pub ahead_s: f64,
    /// The simulated time at the end (ns since the UNIX epoch).
    pub end_ns: u64,
}

/// Publishes `/clock` from the recorded mission's start (held there until every played battery
/// topic has `subscribers` matched, so that no input is published before its reader is there),
/// then paced by `pacer` on the tokens of `/aerokv/tokens`; and on `/<uav>/battery_state`
/// (`sensor_msgs/BatteryState`, best effort like Gazebo's bridge and MAVROS: what a battery
/// monitor with `source: auto` follows) each UAV's recorded state of charge when due
/// ([`battery_due`]), until `stop`.
pub fn drive(
    mut pacer: Pacer,
    steps: &[BatteryStep],
    subscribers: usize,
    match_timeout: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<FeedReport> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "aerokv_replay", "")?;
    let mut tokens = node.subscribe::<TokenChunk>("/aerokv/tokens", QosProfile::default().keep_last(1000))?;
    let clock = node.create_publisher::<Clock>(crate::ros::clock::CLOCK_TOPIC, QosProfile::default().keep_last(1))?;
    let mut publishers = BTreeMap::new();
    for s in steps {
        if !publishers.contains_key(&s.uav) {
            let topic = format!("/{}/battery_state", s.uav);
            publishers.insert(s.uav.clone(), node.create_publisher::<BatteryState>(&topic, QosProfile::sensor_data())?);
        }
    }
    let mut report = FeedReport::default();
    let started = Instant::now();
    let mut matched = publishers.is_empty();
    let mut arrived = 0u32;
    let mut last_wall = Instant::now();
    let mut last_clock = Instant::now() - CLOCK_PERIOD;
    let mut last_battery = Instant::now() - REPUBLISH;
    let mut published_for: Option<(u32, BTreeMap<String, u64>)> = None;
    let mut held_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        node.spin_once(Duration::from_millis(2));
        while let Some(Some(t)) = tokens.next().now_or_never() {
            arrived = arrived.max(t.index.saturating_add(1));
            if !t.done {
                report.tokens_out = report.tokens_out.max(t.index.saturating_add(1));
            }
        }
        let now = Instant::now();
        let wall = now - last_wall;
        last_wall = now;
        if !matched {
            let waiting: Vec<&str> = publishers
                .iter()
                .filter(|(_, p)| p.get_inter_process_subscription_count().unwrap_or(0) < subscribers)
                .map(|(uav, _)| uav.as_str())
                .collect();
            if waiting.is_empty() {
                matched = true;
                report.matched_after_s = started.elapsed().as_secs_f64();
                // The first inputs go out before the clock moves (a monitor reports at its next tick).
                last_battery = now - REPUBLISH;
            } else if started.elapsed() > match_timeout {
                anyhow::bail!(
                    "the battery inputs of {} have no reader after {:.0} s (is the battery monitor's source auto or battery_state?)",
                    waiting.join(" "),
                    match_timeout.as_secs_f64()
                );
            }
        } else {
            // From the iteration after the first inputs went out.
            match pacer.advance(wall, arrived) {
                Pace::Running => held_since = None,
                Pace::Held { next } => {
                    let since = *held_since.get_or_insert_with(|| {
                        report.holds += 1;
                        now
                    });
                    if now - since > MAX_HOLD {
                        tracing::info!(
                            next,
                            "the swarm needs more time for token {next} than the recording took: the clock runs on"
                        );
                        pacer.release(next);
                        report.released += 1;
                        held_since = None;
                    }
                }
            }
        }
        if now - last_clock >= CLOCK_PERIOD {
            clock.publish(&Clock { clock: stamp(pacer.now_ns()) })?;
            last_clock = now;
        }
        if !matched {
            continue;
        }
        let due = battery_due(steps, report.tokens_out, pacer.recorded_now_ns());
        let due_ns: BTreeMap<String, u64> = due.iter().map(|(u, s)| (u.to_string(), s.log_ns)).collect();
        let changed = published_for.as_ref().is_none_or(|(n, d)| *n != report.tokens_out || *d != due_ns);
        if !changed && now - last_battery < REPUBLISH {
            continue;
        }
        for (uav, s) in due {
            let Some(p) = publishers.get(uav) else { continue };
            let msg = BatteryState {
                header: r2r::std_msgs::msg::Header { stamp: stamp(pacer.now_ns()), frame_id: String::new() },
                percentage: s.state_of_charge as f32,
                voltage: f32::NAN,
                current: f32::NAN,
                charge: f32::NAN,
                capacity: f32::NAN,
                design_capacity: f32::NAN,
                temperature: f32::NAN,
                present: true,
                ..Default::default()
            };
            p.publish(&msg)?;
            report.published += 1;
        }
        published_for = Some((report.tokens_out, due_ns));
        last_battery = now;
    }
    report.offset_s = pacer.offset_ns().unwrap_or(0) as f64 / 1e9;
    report.end_ns = pacer.now_ns();
    report.ahead_s = pacer.ahead_ns() as f64 / 1e9;
    Ok(report)
}
