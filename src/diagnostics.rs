//! What each node says about itself on `/diagnostics`, without ROS: a level, a message and
//! key/value pairs per status (the ROS adapter turns them into `diagnostic_msgs/DiagnosticStatus`).
//! Keys are documented in docs/ros-interface.md.

/// `diagnostic_msgs/DiagnosticStatus` levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warn = 1,
    Error = 2,
    Stale = 3,
}

/// One status of a `DiagnosticArray`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub level: Level,
    /// `aerokv/<who>/<what>`.
    pub name: String,
    pub message: String,
    pub hardware_id: String,
    pub values: Vec<(String, String)>,
}

impl Status {
    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn kv(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// The scheduler's view: the request in progress, membership, the plan's epoch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerView {
    /// The request being served (0: idle), and its tokens so far.
    pub request_id: u64,
    pub request_tokens: usize,
    pub requests_served: u64,
    pub epoch: u64,
    /// UAVs that may be planned now, in ring order; the current plan's ring.
    pub members: Vec<String>,
    pub ring: Vec<String>,
    pub expected_uavs: usize,
    /// Messages of an older epoch or request dropped; telemetry refused by its checks.
    pub stale_dropped: u64,
    pub telemetry_refused: u64,
}

pub fn scheduler(v: &SchedulerView) -> Status {
    let (level, message) = if v.ring.is_empty() && v.members.len() < v.expected_uavs {
        (Level::Warn, format!("waiting for UAVs: {} of {} up", v.members.len(), v.expected_uavs))
    } else if v.request_id != 0 {
        (Level::Ok, format!("serving request {}", v.request_id))
    } else {
        (Level::Ok, "idle".to_string())
    };
    Status {
        level,
        name: "aerokv/scheduler".into(),
        message,
        hardware_id: String::new(),
        values: vec![
            kv("request_id", v.request_id),
            kv("request_tokens", v.request_tokens),
            kv("requests_served", v.requests_served),
            kv("epoch", v.epoch),
            kv("members", v.members.join(" ")),
            kv("ring", v.ring.join(" ")),
            kv("expected_uavs", v.expected_uavs),
            kv("stale_dropped", v.stale_dropped),
            kv("telemetry_refused", v.telemetry_refused),
        ],
    }
}

/// A shard executor's view of its data plane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutorView {
    pub uav: String,
    /// waiting, loading, ready, recovering, or "error: ...".
    pub state: String,
    pub epoch: u64,
    /// Native layers `[start, end)`, and the successor's head held as a replica.
    pub layers: (u32, u32),
    pub replica: (u32, u32),
    pub kv_tokens: u32,
    /// Weights and KV held.
    pub memory_bytes: u64,
    pub stale_messages: u64,
    /// Messages that could not be used (undecodable, for another UAV, failed checks) and
    /// authenticated messages dropped.
    pub ignored_messages: u64,
    pub auth_rejected: u64,
}

pub fn executor(v: &ExecutorView) -> Status {
    let (level, message) = if v.state.starts_with("error") {
        (Level::Error, v.state.clone())
    } else if v.state == "recovering" || v.state == "loading" {
        (Level::Warn, v.state.clone())
    } else {
        (Level::Ok, v.state.clone())
    };
    Status {
        level,
        name: format!("aerokv/{}/shard_executor", v.uav),
        message,
        hardware_id: v.uav.clone(),
        values: vec![
            kv("epoch", v.epoch),
            kv("layers", format!("{}..{}", v.layers.0, v.layers.1)),
            kv("replica_layers", format!("{}..{}", v.replica.0, v.replica.1)),
            kv("kv_tokens", v.kv_tokens),
            kv("memory_bytes", v.memory_bytes),
            kv("stale_messages", v.stale_messages),
            kv("ignored_messages", v.ignored_messages),
            kv("auth_rejected", v.auth_rejected),
        ],
    }
}

/// The watchdog's summary (each UAV's own status is published beside it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchdogView {
    pub epoch: u64,
    /// Members of the current plan (empty: no plan yet).
    pub ring: Vec<String>,
    pub watched: Vec<String>,
    pub suspected: Vec<String>,
    pub declared: Vec<String>,
    pub telemetry_refused: u64,
}

pub fn watchdog(v: &WatchdogView) -> Status {
    let (level, message) = if !v.declared.is_empty() {
        (Level::Error, format!("declared failed: {}", v.declared.join(" ")))
    } else if !v.suspected.is_empty() {
        (Level::Warn, format!("suspected: {}", v.suspected.join(" ")))
    } else {
        (Level::Ok, format!("{} UAVs alive", v.watched.len()))
    };
    Status {
        level,
        name: "aerokv/watchdog".into(),
        message,
        hardware_id: String::new(),
        values: vec![
            kv("epoch", v.epoch),
            kv("ring", v.ring.join(" ")),
            kv("members", v.watched.len()),
            kv("watched", v.watched.join(" ")),
            kv("suspected", v.suspected.join(" ")),
            kv("declared", v.declared.join(" ")),
            kv("telemetry_refused", v.telemetry_refused),
        ],
    }
}

/// The battery monitor's view: the figures it publishes, where they come from and how old the
/// last reading is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatteryView {
    pub uav: String,
    pub source: String,
    /// Seconds since the last accepted external reading (`None`: none yet, or simulated).
    pub reading_age_s: Option<f64>,
    pub energy_j: f64,
    pub state_of_charge: f32,
    pub power_w: f64,
    pub expected_remaining_tokens: f64,
    pub rejected_readings: u64,
    pub last_rejected: Option<String>,
    pub px4_warning: Option<String>,
}

/// A reading older than this is stale (the input stopped).
pub const STALE_READING_S: f64 = 5.0;

pub fn battery(v: &BatteryView) -> Status {
    let stale = v.reading_age_s.is_some_and(|a| a > STALE_READING_S);
    let (level, message) = match v.state_of_charge {
        s if s <= 0.0 => (Level::Error, "battery empty".to_string()),
        s if s < 0.2 => (Level::Warn, "battery low: inference at floor power".to_string()),
        _ if stale => {
            (Level::Warn, format!("no reading for {:.1} s: the last one stands", v.reading_age_s.unwrap_or(0.0)))
        }
        _ if v.last_rejected.is_some() => {
            (Level::Warn, "battery readings refused: the last good one stands".to_string())
        }
        _ => (Level::Ok, "ok".to_string()),
    };
    let mut values = vec![
        kv("energy_j", format!("{:.1}", v.energy_j)),
        kv("state_of_charge", format!("{:.3}", v.state_of_charge)),
        kv("power_w", format!("{:.1}", v.power_w)),
        kv("expected_remaining_tokens", format!("{:.0}", v.expected_remaining_tokens)),
        kv("source", &v.source),
        kv("reading_age_s", v.reading_age_s.map_or("none".to_string(), |a| format!("{a:.3}"))),
        kv("rejected_readings", v.rejected_readings),
    ];
    if let Some(why) = &v.last_rejected {
        values.push(kv("last_rejected", why));
    }
    if let Some(w) = &v.px4_warning {
        values.push(kv("px4_warning", w));
    }
    Status { level, name: format!("aerokv/{}/battery", v.uav), message, hardware_id: v.uav.clone(), values }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduler_waits_then_serves() {
        let mut v = SchedulerView { expected_uavs: 4, members: vec!["uav1".into()], ..Default::default() };
        let s = scheduler(&v);
        assert_eq!((s.level, s.message.as_str()), (Level::Warn, "waiting for UAVs: 1 of 4 up"));
        v.members = ["uav1", "uav2", "uav3", "uav4"].map(String::from).to_vec();
        v.ring = v.members.clone();
        v.epoch = 3;
        v.request_id = 7;
        v.request_tokens = 12;
        let s = scheduler(&v);
        assert_eq!((s.level, s.message.as_str()), (Level::Ok, "serving request 7"));
        assert_eq!(s.value("epoch"), Some("3"));
        assert_eq!(s.value("members"), Some("uav1 uav2 uav3 uav4"));
        assert_eq!(s.value("request_tokens"), Some("12"));
        v.request_id = 0;
        assert_eq!(scheduler(&v).message, "idle");
    }

    #[test]
    fn executor_levels_and_keys() {
        let mut v = ExecutorView {
            uav: "uav2".into(),
            state: "ready".into(),
            epoch: 2,
            layers: (8, 15),
            replica: (15, 17),
            kv_tokens: 40,
            memory_bytes: 123,
            stale_messages: 1,
            ignored_messages: 2,
            auth_rejected: 3,
        };
        let s = executor(&v);
        assert_eq!((s.level, s.name.as_str()), (Level::Ok, "aerokv/uav2/shard_executor"));
        assert_eq!(s.value("layers"), Some("8..15"));
        assert_eq!(s.value("replica_layers"), Some("15..17"));
        assert_eq!(s.value("memory_bytes"), Some("123"));
        assert_eq!(s.value("stale_messages"), Some("1"));
        assert_eq!(s.value("ignored_messages"), Some("2"));
        v.state = "recovering".into();
        assert_eq!(executor(&v).level, Level::Warn);
        v.state = "error: no layer file".into();
        assert_eq!(executor(&v).level, Level::Error);
    }

    #[test]
    fn watchdog_worst_state_wins() {
        let mut v = WatchdogView { watched: vec!["uav1".into(), "uav2".into()], ..Default::default() };
        assert_eq!((watchdog(&v).level, watchdog(&v).message.as_str()), (Level::Ok, "2 UAVs alive"));
        v.suspected = vec!["uav2".into()];
        assert_eq!(watchdog(&v).level, Level::Warn);
        v.declared = vec!["uav1".into()];
        let s = watchdog(&v);
        assert_eq!((s.level, s.message.as_str()), (Level::Error, "declared failed: uav1"));
        assert_eq!(s.value("suspected"), Some("uav2"));
        assert_eq!(s.value("members"), Some("2"));
    }

    #[test]
    fn battery_source_age_and_staleness() {
        let mut v = BatteryView {
            uav: "uav3".into(),
            source: "sensor_msgs/BatteryState".into(),
            reading_age_s: Some(0.25),
            energy_j: 1000.0,
            state_of_charge: 0.5,
            ..Default::default()
        };
        let s = battery(&v);
        assert_eq!((s.level, s.name.as_str()), (Level::Ok, "aerokv/uav3/battery"));
        assert_eq!(s.value("source"), Some("sensor_msgs/BatteryState"));
        assert_eq!(s.value("reading_age_s"), Some("0.250"));
        v.reading_age_s = Some(STALE_READING_S + 1.0);
        assert_eq!(battery(&v).level, Level::Warn);
        v.reading_age_s = None;
        assert_eq!(battery(&v).value("reading_age_s"), Some("none"));
        v.state_of_charge = 0.0;
        assert_eq!(battery(&v).level, Level::Error);
        v.state_of_charge = 0.5;
        v.last_rejected = Some("voltage is NaN".into());
        let s = battery(&v);
        assert_eq!(s.level, Level::Warn);
        assert_eq!(s.value("last_rejected"), Some("voltage is NaN"));
    }
}
