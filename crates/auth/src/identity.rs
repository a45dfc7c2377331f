//! Who may speak in a swarm: node identities and their roles.
//!
//! One identity per node, named like the node's fully qualified ROS name without the leading
//! slash (`aerokv/scheduler`, `uav3/shard_executor`): the same granularity as DDS Security
//! enclaves, and the least privilege each node needs (a battery monitor cannot sign a stage's
//! activations, an executor cannot sign a battery report).
use serde::{Deserialize, Serialize};
use std::fmt;

/// The namespace of the swarm-wide nodes.
pub const SWARM_NAMESPACE: &str = "aerokv";

/// The ROS node name of the standby scheduler (in [`SWARM_NAMESPACE`]).
pub const STANDBY_SCHEDULER_NODE: &str = "standby_scheduler";

/// What a member is allowed to say (see [`crate::policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The control plane and gateway: the only source of assignments (plans, epochs).
    Scheduler,
    /// The only source of failure declarations.
    Watchdog,
    /// One UAV's data plane: activations, KV rows, replays, heartbeats.
    ShardExecutor,
    /// One UAV's battery health.
    BatteryMonitor,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Scheduler, Role::Watchdog, Role::ShardExecutor, Role::BatteryMonitor];

    /// The ROS node name that carries this role.
    pub fn node_name(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Watchdog => "watchdog",
            Role::ShardExecutor => "shard_executor",
            Role::BatteryMonitor => "battery_monitor",
        }
    }

    /// True for the roles that belong to one UAV (their namespace is the UAV id).
    pub fn per_uav(self) -> bool {
        matches!(self, Role::ShardExecutor | Role::BatteryMonitor)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.node_name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad node identity {0:?}: expected `<namespace>/<node>`, each 1-64 of [a-z0-9_], not starting with a digit")]
pub struct BadNodeId(pub String);

/// `<namespace>/<node>`, e.g. `uav3/shard_executor`. Validated: it names a key file, so it can
/// hold no path separators beyond the one, no `..`, nothing but `[a-z0-9_]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

fn valid_segment(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl NodeId {
    pub fn parse(s: &str) -> Result<Self, BadNodeId> {
        match s.split_once('/') {
            Some((ns, node)) if valid_segment(ns) && valid_segment(node) => Ok(NodeId(s.to_string())),
            _ => Err(BadNodeId(s.to_string())),
        }
    }

    pub fn new(namespace: &str, node: &str) -> Result<Self, BadNodeId> {
        Self::parse(&format!("{namespace}/{node}"))
    }

    /// The identity of a role's node: swarm nodes live in [`SWARM_NAMESPACE`], UAV nodes in the UAV's.
    pub fn of(role: Role, uav: Option<&str>) -> Result<Self, BadNodeId> {
        let ns = if role.per_uav() { uav.unwrap_or("") } else { SWARM_NAMESPACE };
        Self::new(ns, role.node_name())
    }

    /// The standby scheduler (docs/security.md, "The standby"): a second member with the
    /// scheduler's role and a key of its own, whose plans count once it has taken over.
    pub fn standby_scheduler() -> Self {
        NodeId(format!("{SWARM_NAMESPACE}/{STANDBY_SCHEDULER_NODE}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }
}

impl TryFrom<String> for NodeId {
    type Error = BadNodeId;
    fn try_from(s: String) -> Result<Self, BadNodeId> {
        NodeId::parse(&s)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        assert_eq!(NodeId::parse("uav3/shard_executor").unwrap().namespace(), "uav3");
        for bad in ["", "uav3", "/uav3/x", "uav3/x/y", "../x", "uav3/..", "Uav3/x", "uav 3/x", "3uav/x", "a/"] {
            assert!(NodeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(NodeId::of(Role::Scheduler, Some("uav1")).unwrap().as_str(), "aerokv/scheduler");
        assert_eq!(NodeId::of(Role::BatteryMonitor, Some("uav1")).unwrap().as_str(), "uav1/battery_monitor");
        assert!(NodeId::of(Role::ShardExecutor, None).is_err());
    }
}
