//! The I/O of a live replay (crate::replay, docs/bags.md): plays a recorded mission's battery
//! inputs into a running swarm in step with the tokens it generates.
use crate::replay::{battery_due, BatteryStep};
use futures::{FutureExt, StreamExt};
use r2r::aerokv::msg::TokenChunk;
use r2r::sensor_msgs::msg::BatteryState;
use r2r::QosProfile;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Each UAV's battery input is published again this often (a monitor that starts late, or a
/// best-effort message lost, still gets it).
const REPUBLISH: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct FeedReport {
    /// The most tokens the swarm had out.
    pub tokens_out: u32,
    pub published: u64,
}

/// Publishes, on `/<uav>/battery_state` (`sensor_msgs/BatteryState`, best effort like Gazebo's
/// bridge and MAVROS: what a battery monitor follows), each UAV's recorded state of charge due
/// once as many tokens are out on `/aerokv/tokens` as when it was recorded, until `stop`.
pub fn feed_battery(steps: &[BatteryStep], stop: &AtomicBool) -> anyhow::Result<FeedReport> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "aerokv_replay_battery", "")?;
    let mut tokens = node.subscribe::<TokenChunk>("/aerokv/tokens", QosProfile::default().keep_last(1000))?;
    let mut publishers = BTreeMap::new();
    for s in steps {
        if !publishers.contains_key(&s.uav) {
            let topic = format!("/{}/battery_state", s.uav);
            publishers.insert(s.uav.clone(), node.create_publisher::<BatteryState>(&topic, QosProfile::sensor_data())?);
        }
    }
    let mut report = FeedReport::default();
    let mut last = Instant::now() - REPUBLISH;
    let mut due_at = u32::MAX;
    while !stop.load(Ordering::Relaxed) {
        node.spin_once(Duration::from_millis(20));
        while let Some(Some(t)) = tokens.next().now_or_never() {
            if !t.done {
                report.tokens_out = report.tokens_out.max(t.index.saturating_add(1));
            }
        }
        if due_at == report.tokens_out && last.elapsed() < REPUBLISH {
            continue;
        }
        for (uav, s) in battery_due(steps, report.tokens_out) {
            let Some(p) = publishers.get(uav) else { continue };
            let msg = BatteryState {
                header: r2r::std_msgs::msg::Header { stamp: crate::ros::now_stamp(), frame_id: String::new() },
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
        due_at = report.tokens_out;
        last = Instant::now();
    }
    Ok(report)
}
