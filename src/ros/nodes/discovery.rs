//! Finds UAVs by their per-UAV topics (`/<uav>/heartbeat`, `/<uav>/battery`): DDS has no wildcard
//! subscriptions, and a swarm's membership changes (a drone that comes back is a new member).
use crate::ros::NodeContext;
use std::collections::BTreeSet;

/// UAV ids that currently have a topic named `/<uav>/<leaf>`.
pub fn uavs_with_topic(ctx: &NodeContext, leaf: &str) -> BTreeSet<String> {
    let topics = match ctx.lock().get_topic_names_and_types() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!("topic discovery failed: {e}");
            return BTreeSet::new();
        }
    };
    topics
        .keys()
        .filter_map(|name| {
            let rest = name.strip_prefix('/')?;
            let (uav, topic) = rest.split_once('/')?;
            (topic == leaf && uav != "aerokv").then(|| uav.to_string())
        })
        .collect()
}
