//! Topic and service names and their QoS (docs/design.md §6): data plane reliable, telemetry best
//! effort, assignments transient-local so that a late joiner gets the current plan.
use r2r::QosProfile;

/// Swarm-wide topics live under this namespace.
pub const SWARM_NS: &str = "/aerokv";
pub const ASSIGNMENT: &str = "/aerokv/assignment";
/// What each assignment was decided from (latched beside it; `aerokv bag audit` reads it).
pub const PLAN_INPUTS: &str = "/aerokv/plan_inputs";
pub const FAILURES: &str = "/aerokv/failures";
/// The watchdog's own heartbeat: the scheduler notices its death (docs/security.md §5).
pub const WATCHDOG_HEARTBEAT: &str = "/aerokv/watchdog/heartbeat";
/// The schedulers' heartbeats: the standby notices the primary's death (docs/failure-detection.md,
/// "The standby scheduler").
pub const SCHEDULER_HEARTBEAT: &str = "/aerokv/scheduler/heartbeat";
/// The requests the serving scheduler admitted, for the standby (`RequestSpec`).
pub const REQUESTS: &str = "/aerokv/requests";
/// `Activation.source` of the gateway's messages (the scheduler's embeddings).
pub const GATEWAY_SOURCE: &str = "gateway";
pub const TOKENS: &str = "/aerokv/tokens";
/// Each request's last token chunk (`done`) again, alone: the executors free its caches on it
/// without taking every token over the radio.
pub const FINISHED: &str = "/aerokv/finished";
/// How much of a request's prompt has gone through the swarm (long prompts take seconds).
pub const PROGRESS: &str = "/aerokv/progress";
pub const GENERATE: &str = "/aerokv/generate";
/// Hidden states leaving the last stage, back to the gateway (the scheduler).
pub const GATEWAY_INPUT: &str = "/aerokv/gateway/input";
pub const DIAGNOSTICS: &str = "/diagnostics";

pub fn heartbeat(uav: &str) -> String {
    format!("/{uav}/heartbeat")
}
pub fn battery(uav: &str) -> String {
    format!("/{uav}/battery")
}
/// Input hidden states of `uav`'s shard. The stage subscribes; its predecessor too when the gateway
/// feeds it (any other predecessor produced this input itself and uses it directly).
pub fn stage_input(uav: &str) -> String {
    format!("/{uav}/input")
}
/// KV rows for `holder` to keep: its predecessor's tail snapshots and its successor's head seeds.
/// Named by the receiver, so that each one crosses the link once (a topic per sender reached both
/// of its neighbours, and one of them dropped it).
pub fn kv_inbox(holder: &str) -> String {
    format!("/{holder}/kv")
}
/// Inputs of a failed `uav`'s tail for its recovering successor: its predecessor's buffer, and
/// the gateway's embeddings when the stage ran layer 0 after layers of its own.
pub fn replay(uav: &str) -> String {
    format!("/{uav}/replay")
}

/// Data plane: reliable; a short transient-local history so that a subscription made when a new
/// plan arrives still gets what its neighbour sent right after the same plan. Short, because r2r
/// hands messages over through a queue of 10 and drops what overflows it: a history replayed to a
/// new subscriber must fit.
pub fn data_plane() -> QosProfile {
    QosProfile::default().reliable().keep_last(8).transient_local()
}
/// Replays carry all of a failed stage's buffered inputs of one request in one message; a
/// failover sends one per running request (at most `max_running`, 8), from the predecessor and,
/// around the gateway, from the scheduler: none may push another out of the history.
pub fn replay_qos() -> QosProfile {
    QosProfile::default().reliable().keep_last(8).transient_local()
}
/// The QoS of an activation topic: a stage input or a replay.
pub fn activation_qos(topic: &str) -> QosProfile {
    if topic.ends_with("/replay") {
        replay_qos()
    } else {
        data_plane()
    }
}
pub fn telemetry() -> QosProfile {
    QosProfile::sensor_data().keep_last(10)
}
/// A heartbeat's writer: best effort, and only the newest one is worth sending (a writer that
/// queues, e.g. behind a flow controller on a radio link, sends no stale ones).
pub fn heartbeat_qos() -> QosProfile {
    QosProfile::sensor_data().keep_last(1)
}
pub fn latched() -> QosProfile {
    QosProfile::default().reliable().keep_last(1).transient_local()
}
/// Readers of the latched plan keep several: anyone on the network can write on the topic, and
/// with a history of one a forged plan arriving just after a genuine one replaces it unread
/// (docs/security.md). Older plans are ignored by epoch.
pub fn latched_reader() -> QosProfile {
    QosProfile::default().reliable().keep_last(16).transient_local()
}
pub fn events() -> QosProfile {
    QosProfile::default().reliable().keep_last(100).transient_local()
}
