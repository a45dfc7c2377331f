//! Which role may sign on which topic: the swarm's lines of authority.
//!
//! Only the scheduler's assignments count as plans and only the watchdog's declarations count as
//! failures; a UAV's telemetry is signed by that UAV's own node. A topic not in this table has
//! no legitimate signer: everything on it is rejected as [`crate::Rejection::WrongRole`].
use crate::identity::{Role, SWARM_NAMESPACE};

/// Who may sign on one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub roles: &'static [Role],
    /// The topic is `/<uav>/...` and only that UAV's own node may sign on it (its telemetry).
    pub own_uav_only: bool,
}

/// The rule for `topic` (a fully qualified ROS topic name).
pub fn rule(topic: &str) -> Option<Rule> {
    use Role::*;
    let any = |roles| Some(Rule { roles, own_uav_only: false });
    let own = |roles| Some(Rule { roles, own_uav_only: true });
    let (ns, leaf) = topic.strip_prefix('/')?.split_once('/')?;
    if ns == SWARM_NAMESPACE {
        return match leaf {
            // The primary scheduler and the standby (after its takeover) share the role.
            "assignment" | "tokens" | "finished" | "progress" | "plan_inputs" | "requests" | "scheduler/heartbeat" => {
                any(&[Scheduler])
            }
            "failures" | "watchdog/heartbeat" => any(&[Watchdog]),
            "gateway/input" => any(&[ShardExecutor]),
            _ => None,
        };
    }
    match leaf {
        "heartbeat" => own(&[ShardExecutor]),
        "battery" => own(&[BatteryMonitor]),
        // The gateway feeds the first stage and replays embeddings; executors feed each other.
        "input" | "replay" => any(&[ShardExecutor, Scheduler]),
        "kv" => any(&[ShardExecutor]),
        _ => None,
    }
}

/// The UAV whose topic this is (`/<uav>/...`), if it is not a swarm-wide topic.
pub fn topic_uav(topic: &str) -> Option<&str> {
    let (ns, _) = topic.strip_prefix('/')?.split_once('/')?;
    (ns != SWARM_NAMESPACE).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_lines() {
        assert_eq!(rule("/aerokv/assignment").unwrap().roles, &[Role::Scheduler]);
        assert_eq!(rule("/aerokv/plan_inputs").unwrap().roles, &[Role::Scheduler]);
        assert_eq!(rule("/aerokv/failures").unwrap().roles, &[Role::Watchdog]);
        assert_eq!(rule("/aerokv/watchdog/heartbeat").unwrap().roles, &[Role::Watchdog]);
        assert!(rule("/uav2/heartbeat").unwrap().own_uav_only);
        assert!(!rule("/uav2/input").unwrap().own_uav_only);
        assert_eq!(rule("/aerokv/unknown"), None);
        assert_eq!(rule("nonsense"), None);
        assert_eq!(topic_uav("/uav2/heartbeat"), Some("uav2"));
        assert_eq!(topic_uav("/aerokv/failures"), None);
    }
}
