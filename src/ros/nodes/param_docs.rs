//! What `ros2 param describe` says about each node's parameters: description, range, and
//! whether the node follows a change while it runs (live) or reads it once at start
//! (read-only). docs/ros-interface.md has the same tables.
use crate::node_params::Doc;

const KEYSTORE: Doc = Doc::fixed("keystore", "keystore directory (`aerokv keys init`); empty: authentication off");
const MODELS_DIR: Doc = Doc::fixed("models_dir", "model parts root; empty: $AEROKV_MODELS");
const VARIANT: Doc = Doc::fixed("variant", "model variant (fp32, q4, q4-fast, tiny)");
const UAV_ID: Doc = Doc::fixed("uav_id", "this UAV's id; empty: the node's namespace");
const BIG: f64 = 1e12;

pub const WATCHDOG: &[Doc] = &[
    Doc::fixed_in(
        "expected_interval_s",
        "executors' heartbeat period: a UAV's model before its first inter-arrivals, s",
        0.0,
        60.0,
    ),
    Doc::fixed_in("window", "inter-arrival samples kept per UAV (>= 4)", 4.0, 1e6),
    Doc::live_in("min_std_dev_s", "floor of the jitter estimate, s (> 0)", 0.0, 60.0),
    Doc::live_in("min_loss", "floor of the loss estimate (0..1, exclusive)", 0.0, 1.0),
    Doc::live_in(
        "suspect_phi",
        "phi from which a UAV is suspected (logged, on /diagnostics; nothing else)",
        0.0,
        100.0,
    ),
    Doc::live_in("declare_phi", "phi from which a UAV is declared failed (> suspect_phi)", 0.0, 100.0),
    Doc::live_in("min_declare_s", "no declaration from heartbeats before this much silence, s", 0.0, 3600.0),
    Doc::live_in(
        "max_silence_s",
        "declared after this much silence whatever phi says, s (>= min_declare_s)",
        0.0,
        3600.0,
    ),
    Doc::live_in(
        "stall_tolerance_s",
        "a check this much later than its period means the watchdog was not listening, s",
        0.0,
        60.0,
    ),
    Doc::fixed_in("check_period_s", "how often the detectors are checked, s", 0.0, 60.0),
    Doc::fixed_in("discovery_period_s", "how often new UAV topics are looked for, s", 0.0, 3600.0),
    KEYSTORE,
];

pub const BATTERY_MONITOR: &[Doc] = &[
    UAV_ID,
    KEYSTORE,
    Doc::fixed("source", "auto (simulated until a BatteryState arrives), simulation, battery_state or px4"),
    Doc::fixed_in("capacity_j", "simulated battery capacity, J", 0.0, crate::battery::MAX_CAPACITY_J),
    Doc::fixed_in("initial_soc", "simulated state of charge at start (0..1)", 0.0, 1.0),
    Doc::live_in("flight_power_w", "flight power, W", 0.0, 1e5),
    Doc::live_in("inference_power_w", "inference power at full power, W (battery-aware below 40 %)", 0.0, 1e5),
    Doc::live_in("tx_power_w", "radio transmit power, W", 0.0, 1e4),
    Doc::live_in("link_rate_bps", "link rate for the transmit energy, bit/s (> 0)", 0.0, BIG),
    Doc::live_in("time_scale", "simulated battery seconds per clock second (> 0)", 0.0, 1e6),
    Doc::fixed_in("publish_period_s", "how often battery health is published, s (> 0)", 0.0, 3600.0),
    Doc::live_in("token_period_s", "seconds per token until the executor's heartbeats show the rate", 0.0, 3600.0),
    Doc::live("battery_state_topic", "sensor_msgs/BatteryState topic; relative names are under /<uav>/"),
    Doc::live("battery_state_qos", "best_effort (Gazebo bridge, MAVROS) or reliable"),
    Doc::live("battery_state_soc", "where a BatteryState's charge is read: percentage, percent or charge"),
    Doc::fixed("px4_topic", "PX4's battery status topic"),
    Doc::fixed("px4_namespace", "PX4 vehicle namespace in a multi-vehicle setup (px4_1)"),
    Doc::fixed(
        "px4_empty_at_warning",
        "from this PX4 warning on the UAV has no energy for the swarm: low, critical, emergency, failed, never",
    ),
];

pub const SHARD_EXECUTOR: &[Doc] = &[
    UAV_ID,
    Doc::live_in("heartbeat_period_s", "heartbeat period, s (> 0)", 0.0, 60.0),
    MODELS_DIR,
    VARIANT,
    Doc::fixed_in("threads", "ONNX Runtime intra-op threads (identical on every executor)", 1.0, 256.0),
    Doc::fixed("kv_codec", "how this UAV's KV snapshots travel: raw or zstd"),
    Doc::fixed(
        "station_dump_file",
        "`iw dev wlan0 station dump` text, refreshed ~1 s, for the radio's PHY rate (empty: off)",
    ),
    Doc::fixed("station_macs", "host=MAC, ... of the swarm's radios: which station is the next hop (empty: median)"),
    KEYSTORE,
];

pub const SCHEDULER: &[Doc] = &[
    Doc::live_in("expected_uavs", "the first plan waits for this many UAVs", 1.0, 1e4),
    MODELS_DIR,
    VARIANT,
    Doc::fixed_in("threads", "ONNX Runtime threads for the embedding and the LM head", 1.0, 256.0),
    Doc::fixed_in("layer_latency_s", "seconds per layer every plan assumes (0: measured at start-up)", 0.0, 10.0),
    Doc::live_in("max_tokens_limit", "longest answer a request may ask for (next request on)", 1.0, 1e6),
    Doc::live_in("max_prompt_tokens", "longest prompt a request may bring (next request on)", 1.0, 1e6),
    Doc::fixed_in("max_queue", "requests that may wait; a goal beyond them is refused", 1.0, 1e6),
    Doc::fixed_in("max_running", "requests served at once, their steps interleaved", 1.0, 8.0),
    Doc::fixed_in("finished_kept", "finished answers kept for a client that resumes by request id", 0.0, 1e6),
    Doc::fixed("role", "primary (serves from the start) or standby (follows the primary, takes over when it dies)"),
    Doc::fixed_in("scheduler_heartbeat_period_s", "this scheduler's heartbeat period, s (> 0)", 0.0, 60.0),
    Doc::fixed_in("primary_timeout_s", "a standby takes over after the primary is silent this long, s", 0.0, 3600.0),
    Doc::live_in("plan_tokens", "request length the idle plan is made for", 1.0, 1e6),
    Doc::fixed_in("memory_budget_bytes", "per-UAV memory for weights and KV, bytes", 0.0, BIG),
    Doc::fixed_in("flight_power_w", "per-UAV flight power for planning, W", 0.0, 1e5),
    Doc::fixed_in("inference_power_w", "per-UAV inference power for planning, W", 0.0, 1e5),
    Doc::fixed_in("tx_power_w", "per-UAV transmit power for planning, W", 0.0, 1e4),
    Doc::fixed_in("link_rate_bps", "link rate for planning, bit/s", 0.0, BIG),
    Doc::fixed("shared_channel", "plan with one shared 802.11 channel's effective rate"),
    Doc::fixed_in("frame_loss", "per-attempt frame loss with shared_channel [0, 1)", 0.0, 1.0),
    Doc::fixed_in("recovery_deadline_s", "a failure may cost at most this much replay and loading, s", 0.0, 3600.0),
    Doc::fixed_in("weight_load_bps", "weight loading rate, bytes/s", 0.0, BIG),
    Doc::fixed("snapshot_periods", "KV snapshot periods T the planner may choose (>= 1)"),
    Doc::fixed_in(
        "lifetime_target_factor",
        "lifetime beyond this many times the request counts as enough (0: max-min)",
        0.0,
        1e6,
    ),
    Doc::fixed_in("member_timeout_s", "a UAV whose last heartbeat is older is not up, s", 0.0, 3600.0),
    Doc::fixed_in("rejoin_after_s", "a UAV declared failed rejoins once heard this long without a gap, s", 0.0, 3600.0),
    Doc::live_in("ready_timeout_s", "how long executors may take to apply a plan, s (next request on)", 0.0, 86400.0),
    Doc::live_in(
        "step_timeout_s",
        "a pipeline step slower than this with no failure declared fails the request, s",
        0.0,
        86400.0,
    ),
    Doc::live_in("replan_period_s", "how often an idle swarm re-plans from fresh battery health, s", 0.0, 86400.0),
    Doc::live("retirement", "move the layers of a UAV whose battery will not last before it dies"),
    Doc::live_in("retirement_horizon_tokens", "retire once fewer tokens than this are left", 0.0, 1e6),
    Doc::fixed("activation_codec", "how hidden states travel, swarm-wide: raw, f16 or int8"),
    Doc::fixed("kv_codec", "the executors' KV codec (raw or zstd), for the cost model's snapshot bytes"),
    KEYSTORE,
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_params::undocumented;

    #[test]
    fn every_parameter_of_every_node_is_documented() {
        let none: Vec<String> = Vec::new();
        assert_eq!(undocumented(&crate::detector::WatchdogParams::default(), WATCHDOG), none);
        assert_eq!(undocumented(&super::super::battery_monitor::Params::default(), BATTERY_MONITOR), none);
        assert_eq!(undocumented(&super::super::shard_executor::Params::default(), SHARD_EXECUTOR), none);
        assert_eq!(undocumented(&super::super::scheduler::Params::default(), SCHEDULER), none);
    }

    #[test]
    fn docs_name_only_real_parameters() {
        use crate::node_params::Table;
        fn ok<P>(_: &P) -> Result<(), String> {
            Ok(())
        }
        let t = Table::new(crate::detector::WatchdogParams::default(), WATCHDOG, ok, false, "info").expect("table");
        for d in WATCHDOG {
            assert!(t.get(d.name).is_some(), "{}", d.name);
        }
        let t = Table::new(super::super::scheduler::Params::default(), SCHEDULER, ok, false, "info").expect("table");
        for d in SCHEDULER {
            assert!(t.get(d.name).is_some(), "{}", d.name);
            // Every live number's default lies within its range.
            if let (Some((lo, hi)), Some(crate::node_params::Value::Double(x))) = (d.range, t.get(d.name)) {
                assert!(lo <= x && x <= hi, "{}", d.name);
            }
        }
    }
}
